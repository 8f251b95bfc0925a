"""A damaged chat store never locks the user out: it is moved aside (never deleted), every row that
still reads comes back in a fresh store, and the app starts and says so. Fresh stores opened by
many processes at once all come up at the current schema. A store that cannot be opened at all is
one line, not an internal error."""

from __future__ import annotations

import multiprocessing
import os
import random
import sqlite3
from pathlib import Path

import pytest
from textual.widgets import OptionList
from tui_fakes import app_with, settle

from xqchat.app.cli import describe
from xqchat.app.tui import store as store_module
from xqchat.app.tui.app import XQChatApp
from xqchat.app.tui.store import MIGRATIONS, Chat, Message, Recovery, Store
from xqchat.models.errors import XQError

SIZE = (110, 32)
PAGE = 4096  # SQLite's default page size, which the store keeps
CHATS, ROUNDS = 6, 40  # six chats, each asked and answered 20 times, the rounds interleaved


def build_store(path: Path) -> tuple[list[Chat], list[Message]]:
    """A real store, written through Store as the app writes it: (its chats by id, its messages
    by id)."""
    store = Store(path)
    ids = [store.new_chat(f"Chat {n}", system=f"Be brief {n}.") for n in range(CHATS)]
    for turn in range(ROUNDS):
        for n, chat_id in enumerate(ids):
            role = "user" if turn % 2 == 0 else "assistant"
            store.add(chat_id, role, f"chat {n} turn {turn}: " + "lorem ipsum " * 12)
    chats = sorted(store.chats(), key=lambda chat: chat.id)
    messages = [m for chat in chats for m in store.messages(chat.id)]
    store.close()
    assert not Path(f"{path}-wal").exists()  # closing checkpoints: the file is the whole store
    return chats, sorted(messages, key=lambda m: m.id)


def leaves(path: Path, table: str) -> list[tuple[int, int]]:
    """(page number, rows) of each leaf page of `table`, in page order (SQLite's dbstat)."""
    db = sqlite3.connect(path)
    rows = db.execute(
        "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
        (table,),
    ).fetchall()
    db.close()
    return rows


def root_page(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    db.close()
    return page


def broken_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".broken-" in p.name)


def broken_stores(folder: Path) -> list[str]:
    """The stores moved aside (their -wal and -shm go with them)."""
    return [name for name in broken_files(folder) if not name.endswith(("-wal", "-shm"))]


def all_rows(store: Store) -> tuple[list[Chat], list[Message]]:
    chats = sorted(store.chats(), key=lambda chat: chat.id)
    messages = [m for chat in chats for m in store.messages(chat.id)]
    return chats, sorted(messages, key=lambda m: m.id)


def test_a_store_of_random_bytes_is_moved_aside_and_a_fresh_one_opens(tmp_path):
    path = tmp_path / "chats.sqlite3"
    junk = random.Random(0).randbytes(3 * PAGE)
    path.write_bytes(junk)
    Path(f"{path}-wal").write_bytes(junk[:1000])  # companions travel with it
    Path(f"{path}-shm").write_bytes(junk[:500])
    store = Store(path)
    (broken,) = broken_stores(tmp_path)
    assert broken_files(tmp_path) == [broken, broken + "-shm", broken + "-wal"]
    assert (tmp_path / broken).read_bytes() == junk
    assert (tmp_path / (broken + "-wal")).read_bytes() == junk[:1000]  # the -shm is an index
    assert store.recovery == Recovery(tmp_path / broken, chats=0, messages=0, untitled=0)
    assert store.recovery.notice == (
        "The chat store was damaged: no chats could be read from it. "
        f"The damaged file is kept as {tmp_path / broken}"
    )
    assert store.version == len(MIGRATIONS) and store.chats() == []
    store.new_chat("After")  # the fresh store works
    store.close()
    again = Store(path)
    assert again.recovery is None and [c.title for c in again.chats()] == ["After"]


@pytest.mark.parametrize("pages", [0, 1, 2, 3, 4, 8, 12, 15])
def test_a_truncated_store_gives_back_every_row_before_the_cut(tmp_path, pages):
    """Cut at a page boundary (0: inside the header), the pages before the cut are intact: every
    row on them comes back, exactly, and nothing else."""
    path = tmp_path / "chats.sqlite3"
    chats, messages = build_store(path)
    chat_leaves, message_leaves = leaves(path, "chats"), leaves(path, "messages")
    assert chat_leaves == [(2, CHATS)]  # six small chats fit the first page after the schema
    assert message_leaves[-1][0] == 16 and os.path.getsize(path) == 16 * PAGE
    messages_root = root_page(path, "messages")  # an inner page: every leaf is reached from it
    os.truncate(path, pages * PAGE if pages else 50)

    store = Store(path)
    kept_chats = CHATS if pages >= 2 else 0
    kept = 0
    if messages_root <= pages:
        kept = sum(rows for page, rows in message_leaves if page <= pages)
    assert all_rows(store) == (chats[:kept_chats], messages[:kept])
    assert store.recovery.chats == kept_chats and store.recovery.messages == kept
    assert store.recovery.untitled == 0
    assert (kept_chats, kept) == {
        0: (0, 0),
        1: (0, 0),
        2: (6, 0),
        3: (6, 0),
        4: (6, 0),
        8: (6, 84),  # four leaves of 21 messages
        12: (6, 168),
        15: (6, 231),  # all but the last leaf's 9
    }[pages]


def zero_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(bytes(PAGE))


def test_reading_resumes_past_a_damaged_page_in_the_middle(tmp_path):
    path = tmp_path / "chats.sqlite3"
    chats, messages = build_store(path)
    message_leaves = leaves(path, "messages")
    # Messages are appended, so leaf pages hold ascending ids: the fifth leaf's ids are these.
    first = sum(rows for _, rows in message_leaves[:4])
    lost = {m.id for m in messages[first : first + message_leaves[4][1]]}
    zero_page(path, message_leaves[4][0])

    store = Store(path)
    assert all_rows(store) == (chats, [m for m in messages if m.id not in lost])
    assert len(lost) == message_leaves[4][1] > 0
    assert store.recovery.messages == len(messages) - len(lost)


def test_messages_whose_chat_row_is_lost_come_back_under_a_rebuilt_chat(tmp_path):
    path = tmp_path / "chats.sqlite3"
    chats, messages = build_store(path)
    zero_page(path, 2)  # the chats table's only page
    store = Store(path)
    rebuilt, recovered = all_rows(store)
    assert recovered == messages
    assert [(c.id, c.title, c.system) for c in rebuilt] == [
        (c.id, f"Recovered chat {c.id}", "") for c in chats
    ]
    assert store.recovery.untitled == store.recovery.chats == CHATS
    assert store.recovery.notice.startswith(
        f"The chat store was damaged: 6 chats came back (6 of them without their title) with "
        f"{len(messages)} messages, in a new store. The damaged file is kept as "
    )


def test_a_damaged_version_1_store_comes_back_at_the_current_version(tmp_path):
    path = tmp_path / "chats.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    old.executemany(
        "INSERT INTO chats VALUES (?, ?, 10.0, 20.0)", [(n, f"Old {n}") for n in range(1, 4)]
    )
    old.executemany(
        "INSERT INTO messages VALUES (?, 1, 'user', ?, 11.0)",
        [(n, "x" * 300) for n in range(1, 200)],
    )
    old.commit()
    old.close()
    message_leaves = leaves(path, "messages")
    zero_page(path, message_leaves[-1][0])
    store = Store(path)
    kept = sum(rows for _, rows in message_leaves[:-1])
    assert store.version == len(MIGRATIONS)
    assert store.chats() == [Chat(n, f"Old {n}", "", 20.0) for n in (3, 2, 1)]
    assert store.messages(1) == [Message(n, "user", "x" * 300, "done") for n in range(1, kept + 1)]


async def test_the_app_starts_on_a_truncated_store_and_says_what_came_back(default_tokenizer, dirs):
    folder = dirs / "data" / "xqchat"
    folder.mkdir(parents=True)
    chats, messages = build_store(folder / "chats.sqlite3")
    os.truncate(folder / "chats.sqlite3", 8 * PAGE)
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        (broken,) = broken_stores(folder)
        notices = [n for n in app._notifications if n.title == "chat store"]
        assert [(n.message, n.severity) for n in notices] == [
            (
                "The chat store was damaged: 6 chats came back with 84 messages, in a new store. "
                f"The damaged file is kept as {folder / broken}",
                "warning",
            )
        ]
        listing = app.chat_screen.query_one("#chats", OptionList)
        shown = [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]
        assert sorted(shown) == sorted(c.title for c in chats)
        assert app.chat_screen.chat_id == app.store.chats()[0].id


async def test_the_app_starts_on_a_store_of_random_bytes(default_tokenizer, dirs):
    folder = dirs / "data" / "xqchat"
    folder.mkdir(parents=True)
    (folder / "chats.sqlite3").write_bytes(random.Random(1).randbytes(10_000))
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        (broken,) = broken_stores(folder)
        notices = [n.message for n in app._notifications if n.title == "chat store"]
        assert notices == [
            "The chat store was damaged: no chats could be read from it. "
            f"The damaged file is kept as {folder / broken}"
        ]
        assert app.chat_screen.query_one("#chats", OptionList).option_count == 0


def test_a_folder_in_place_of_the_store_is_one_line_and_stays_put(dirs):
    store = dirs / "data" / "xqchat" / "chats.sqlite3"
    (store / "inside").mkdir(parents=True)
    with pytest.raises(XQError) as error:
        XQChatApp()
    assert describe(error.value) == (
        f"{store} is a folder, not the chat store: move it away and start xqchat again",
        1,
    )
    assert (store / "inside").is_dir()


def test_a_file_in_place_of_the_data_folder_is_one_line_and_stays_put(dirs):
    folder = dirs / "data" / "xqchat"
    folder.parent.mkdir(parents=True)
    folder.write_text("mine")
    with pytest.raises(XQError) as error:
        XQChatApp()
    assert describe(error.value) == (f"cannot create {folder} for the chat store: File exists", 1)
    assert folder.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_store_is_one_line_and_stays_put(tmp_path):
    path = tmp_path / "chats.sqlite3"
    build_store(path)
    path.chmod(0)
    try:
        with pytest.raises(XQError, match=r"^cannot open the chat store .*: check its permissions"):
            Store(path)
    finally:
        path.chmod(0o600)
    assert broken_files(tmp_path) == []


def open_at_once(path: str, barrier, results) -> None:
    barrier.wait()  # every process opens the fresh store at the same moment
    try:
        store = Store(Path(path))
        store.new_chat(f"from {os.getpid()}")
        results.put(store.version)
        store.close()
    except Exception as e:  # reported to the test, which shows it
        results.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("attempt", range(2))
@pytest.mark.parametrize("lock", ["flock", "sqlite alone"])
def test_many_processes_opening_a_fresh_store_at_once_all_succeed(
    tmp_path, monkeypatch, lock, attempt
):
    """On main, 3 of 9 such starts died with "table chats already exists". "sqlite alone" is a
    system without flock (Windows): the migration's write transaction must suffice."""
    if lock == "sqlite alone":
        monkeypatch.setattr(store_module, "fcntl", None)  # the forked processes inherit this
    processes = 10
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    path = tmp_path / "data" / "chats.sqlite3"  # the folder is made by the racers too
    workers = [
        context.Process(target=open_at_once, args=(str(path), barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [len(MIGRATIONS)] * processes
    store = Store(path)
    assert store.version == len(MIGRATIONS) and len(store.chats()) == processes
    assert store.recovery is None and broken_files(path.parent) == []


def recover_at_once(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        store = Store(Path(path))
        results.put((store.recovery is not None, len(store.chats())))
        store.close()
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_processes_starting_on_a_damaged_store_at_once_recover_it_once(tmp_path):
    path = tmp_path / "chats.sqlite3"
    build_store(path)
    os.truncate(path, 8 * PAGE)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=recover_at_once, args=(str(path), barrier, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == [(False, CHATS)] * 3 + [(True, CHATS)]
    assert len(broken_stores(tmp_path)) == 1
