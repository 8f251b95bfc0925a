"""The chat store: schema migrations, chats and messages, Markdown export, how often a streaming
reply is saved, and a kill -9 of the running app mid-reply."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from xqchat.app.tui.store import MIGRATIONS, Chat, Message, ReplyWriter, Store, to_markdown

TESTS = Path(__file__).resolve().parent


def test_migrates_a_version_1_database(tmp_path):
    path = tmp_path / "chats.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    old.execute("INSERT INTO chats VALUES (1, 'Rivers', 10.0, 20.0)")
    old.execute("INSERT INTO messages VALUES (1, 1, 'user', 'Name a river.', 11.0)")
    old.execute("INSERT INTO messages VALUES (2, 1, 'assistant', 'The Danube.', 12.0)")
    old.commit()
    old.close()

    store = Store(path)
    assert store.version == len(MIGRATIONS) == 2
    assert store.chats() == [Chat(1, "Rivers", "", 20.0)]
    assert store.messages(1) == [
        Message(1, "user", "Name a river.", "done"),
        Message(2, "assistant", "The Danube.", "done"),
    ]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert Store(path).version == 2  # opening again migrates nothing


def test_chats_newest_first_search_rename_delete(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    rivers = store.new_chat("Rivers of Europe")
    cakes = store.new_chat("Cakes")
    store.add(rivers, "user", "Name a river.")  # touching a chat moves it to the top
    assert [c.title for c in store.chats()] == ["Rivers of Europe", "Cakes"]
    assert [c.title for c in store.chats("europe")] == ["Rivers of Europe"]
    assert store.chats("100%") == []
    store.rename(cakes, "Cheesecakes")
    store.set_system(cakes, "Answer briefly.")
    assert (
        store.chat(cakes).title == "Cheesecakes" and store.chat(cakes).system == "Answer briefly."
    )
    store.delete(rivers)
    assert [c.id for c in store.chats()] == [cakes]
    assert store.messages(rivers) == []  # cascaded


def test_a_reply_left_streaming_is_marked_interrupted_on_open(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat()
    store.add(chat, "assistant", "Half a rep", "streaming")
    store.close()
    assert Store(tmp_path / "chats.sqlite3").messages(chat)[0].status == "interrupted"


def test_markdown_export():
    chat = Chat(1, "Rivers", "Answer briefly.", 0.0)
    messages = [
        Message(1, "user", "Name a river.", "done"),
        Message(2, "notice", "context full: left out the 1 oldest turn(s)", "done"),
        Message(3, "assistant", "The Dan", "cancelled"),
    ]
    assert to_markdown(chat, messages) == (
        "# Rivers\n\n**System prompt:** Answer briefly.\n\n## You\n\nName a river.\n\n"
        "> context full: left out the 1 oldest turn(s)\n\n## Assistant\n\nThe Dan\n\n"
        "*(cancelled: partial reply)*\n"
    )


def test_reply_writer_saves_at_least_every_interval(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat()
    now = [100.0]
    writer = ReplyWriter(store, chat, interval=1.0, clock=lambda: now[0])

    def saved() -> str:
        return store.messages(chat)[0].content

    writer.add("Hel")  # the first piece creates the row at once
    assert store.messages(chat) == [Message(writer.id, "assistant", "Hel", "streaming")]
    now[0] = 100.5
    writer.add("lo")
    assert saved() == "Hel"  # within the second: not yet
    now[0] = 101.0
    writer.add(",")
    assert saved() == "Hello,"
    now[0] = 101.2
    writer.add(" wor")
    writer.flush()  # the screen's one-second timer
    assert saved() == "Hello, wor"
    writer.add("ld")
    writer.finish("done")
    assert store.messages(chat) == [Message(writer.id, "assistant", "Hello, world", "done")]


CHILD = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from tui_fakes import FakeModel, loader
from xqchat.models import resolve
from xqchat.models.tokenizer import load_tokenizer
from xqchat.app.tui.app import XQChatApp
from xqchat.app.tui.widgets import PromptInput

tokenizer = load_tokenizer(resolve("default"))
model = FakeModel(tokenizer, ["First answer.", {long!r}], seconds_per_token=0.02)

async def main():
    app = XQChatApp(loader=loader(model))
    async with app.run_test() as pilot:
        for text in ("first question", "second question"):
            app.screen.query_one(PromptInput).text = text
            await pilot.press("enter")
            if text.startswith("first"):
                await pilot.pause()
                await app.workers.wait_for_complete()
        print("streaming", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def test_kill_9_mid_reply_keeps_user_messages_and_the_partial_reply(tmp_path):
    long = " ".join(f"word{i}" for i in range(3000))
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS), long=long)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "streaming"
        path = tmp_path / "data" / "xqchat" / "chats.sqlite3"
        deadline = time.monotonic() + 60
        partial = ""
        while len(partial) < 200 and time.monotonic() < deadline:  # two saves or more
            time.sleep(0.2)
            peek = sqlite3.connect(path)
            rows = peek.execute("SELECT content FROM messages WHERE role = 'assistant'").fetchall()
            peek.close()
            partial = rows[-1][0] if len(rows) == 2 else ""
        assert len(partial) >= 200, "the reply was not saved while streaming"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = Store(path)
    chat = store.chats()[0]
    messages = store.messages(chat.id)
    assert [(m.role, m.content) for m in messages if m.role == "user"] == [
        ("user", "first question"),
        ("user", "second question"),
    ]
    assert messages[1] == Message(messages[1].id, "assistant", "First answer.", "done")
    last = messages[-1]
    assert last.role == "assistant" and last.status == "interrupted"
    assert len(last.content) >= len(partial) and long.startswith(last.content)
    assert len(last.content) < len(long)
