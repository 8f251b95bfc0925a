"""The chat store: SQLite in the user data dir, WAL mode, schema versioned with `PRAGMA
user_version`. Every write commits at once, so a killed app loses nothing already written.

Opening checks the file (`PRAGMA quick_check`). A damaged store is never deleted and never locks
the user out: it is moved aside as `chats.sqlite3.broken-<time>` (with its -wal and -shm), every
chat and message that still reads is copied into a fresh store, and `Store.recovery` says what
came back. A store that cannot be opened at all (a folder in its place, no permission, locked) is
an XQError: one line, the file left where it is."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xqchat.models.errors import XQError
from xqchat.models.paths import data_dir

try:
    import fcntl
except ImportError:  # Windows: opens are then guarded by SQLite's own locking alone
    fcntl = None

# Each entry moves the schema one version up; a database at version N runs MIGRATIONS[N:].
MIGRATIONS = [
    # 1: chats and their messages
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
    # 2: a system prompt per chat; how each reply ended (a partial reply stays marked)
    """
    ALTER TABLE chats ADD COLUMN system TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'done';
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    """,
]

# How a reply ended, as the conversation shows it. "streaming" is a reply still being written;
# one found at start-up was cut off by a killed app and becomes "interrupted".
STATUS_NOTES = {
    "cancelled": "cancelled: partial reply",
    "interrupted": "interrupted: the app stopped mid-reply",
    "length": "stopped at the max tokens setting",
    "context": "stopped: the context is full",
    "error": "failed",
}


@dataclass(frozen=True)
class Chat:
    id: int
    title: str
    system: str
    updated: float


@dataclass(frozen=True)
class Message:
    id: int
    role: str  # user | assistant | notice (what the context policy did; never sent to the model)
    content: str
    status: str = "done"


@dataclass(frozen=True)
class Recovery:
    """What opening a damaged store did: where the damaged file went and what came back."""

    broken: Path
    chats: int
    messages: int
    untitled: int  # chats rebuilt from their messages because their own row did not read

    @property
    def notice(self) -> str:
        """One message for the user: what happened, what came back, where the old file is."""
        kept = f"The damaged file is kept as {self.broken}"
        if not self.chats:
            return f"The chat store was damaged: no chats could be read from it. {kept}"
        untitled = f" ({self.untitled} of them without their title)" if self.untitled else ""
        return (
            f"The chat store was damaged: {plural(self.chats, 'chat')} came back{untitled} with "
            f"{plural(self.messages, 'message')}, in a new store. {kept}"
        )


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


SAVE_EVERY_S = 1.0  # a streaming reply reaches the store at least this often
BUSY_TIMEOUT_S = 30.0  # how long an open waits for another xqchat that holds the write lock


def default_path() -> Path:
    """Where the app keeps its chats."""
    return data_dir() / "chats.sqlite3"


class Store:
    def __init__(self, path: Path | None = None) -> None:
        """Open the store at `path` (default: the user data dir), creating or migrating it, and
        rebuilding it if it is damaged (see `recovery`). XQError if it cannot be opened."""
        self.path = path or default_path()
        self.recovery: Recovery | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise XQError(
                f"cannot create {self.path.parent} for the chat store: {e.strerror or e}"
            ) from None
        if self.path.is_dir():
            raise XQError(
                f"{self.path} is a folder, not the chat store: move it away and start xqchat again"
            )
        # One process at a time checks, rebuilds and migrates: a second app starting at the same
        # moment must not move aside the store the first is rebuilding.
        with open_lock(self.path):
            try:
                self.db = connect(self.path)
            except sqlite3.DatabaseError as e:
                if not damaged(e):
                    raise XQError(cannot_open(self.path, e)) from None
                self.recovery = recover(self.path)
                try:
                    self.db = connect(self.path)
                except sqlite3.DatabaseError as e:  # the store just built: the disk is failing
                    raise XQError(cannot_open(self.path, e)) from None

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    # -- chats ---------------------------------------------------------------------------------
    def chats(self, search: str = "") -> list[Chat]:
        """Newest first; `search` keeps those whose title contains it (ignoring ASCII case)."""
        rows = self.db.execute(
            "SELECT id, title, system, updated FROM chats WHERE instr(lower(title), lower(?)) > 0 "
            "ORDER BY updated DESC, id DESC",
            (search,),
        )
        return [Chat(*row) for row in rows]

    def chat(self, chat_id: int) -> Chat:
        row = self.db.execute(
            "SELECT id, title, system, updated FROM chats WHERE id = ?", (chat_id,)
        ).fetchone()
        return Chat(*row)

    def new_chat(self, title: str = "New chat", system: str = "") -> int:
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO chats (title, system, created, updated) VALUES (?, ?, ?, ?)",
            (title, system, now, now),
        )
        return cursor.lastrowid

    def rename(self, chat_id: int, title: str) -> None:
        self.db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def set_system(self, chat_id: int, system: str) -> None:
        self.db.execute("UPDATE chats SET system = ? WHERE id = ?", (system, chat_id))

    def delete(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    # -- messages ------------------------------------------------------------------------------
    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, role, content, status FROM messages WHERE chat_id = ? ORDER BY id",
            (chat_id,),
        )
        return [Message(*row) for row in rows]

    def add(self, chat_id: int, role: str, content: str, status: str = "done") -> int:
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, status, created) VALUES (?, ?, ?, ?, ?)",
            (chat_id, role, content, status, now),
        )
        self.db.execute("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id))
        return cursor.lastrowid

    def update(self, message_id: int, content: str, status: str | None = None) -> None:
        self.db.execute(
            "UPDATE messages SET content = ?, status = coalesce(?, status) WHERE id = ?",
            (content, status, message_id),
        )

    def remove(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))


class ReplyWriter:
    """Writes a streaming reply to the store: created with its first piece, saved again whenever
    `interval` seconds have passed (and on `flush`), and finished with how it ended."""

    def __init__(
        self,
        store: Store,
        chat_id: int,
        interval: float = SAVE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.chat_id, self.interval, self.clock = store, chat_id, interval, clock
        self.text = ""
        self.id: int | None = None
        self._saved_at = 0.0
        self._dirty = False

    def add(self, piece: str) -> None:
        self.text += piece
        if self.id is None:
            self.id = self.store.add(self.chat_id, "assistant", self.text, "streaming")
            self._saved_at = self.clock()
        else:
            self._dirty = True
            if self.clock() - self._saved_at >= self.interval:
                self.flush()

    def flush(self) -> None:
        if self.id is not None and self._dirty:
            self.store.update(self.id, self.text)
            self._saved_at, self._dirty = self.clock(), False

    def finish(self, status: str) -> None:
        if self.id is not None:
            self.store.update(self.id, self.text, status)


def to_markdown(chat: Chat, messages: list[Message]) -> str:
    """A chat as a Markdown document."""
    parts = [f"# {chat.title}\n"]
    if chat.system:
        parts.append(f"**System prompt:** {chat.system}\n")
    for message in messages:
        if message.role == "notice":
            parts.append(f"> {message.content}\n")
            continue
        parts.append(
            f"## {'You' if message.role == 'user' else 'Assistant'}\n\n{message.content}\n"
        )
        if message.status in STATUS_NOTES:
            parts.append(f"*({STATUS_NOTES[message.status]})*\n")
    return "\n".join(parts)


# -- opening, migrating, recovering -----------------------------------------------------------------
# SQLite's primary result codes (Python names them only from 3.11 on)
CORRUPT, NOTADB, BUSY, LOCKED, PERM, READONLY, CANTOPEN, AUTH = 11, 26, 5, 6, 3, 8, 14, 23
DAMAGE_MESSAGES = ("file is not a database", "database disk image is malformed")
ROWID_MIN, ROWID_MAX = -(2**63), 2**63 - 1


class Damaged(sqlite3.DatabaseError):
    """The file opens but `PRAGMA quick_check` finds it damaged."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the sound store at `path` (created if missing), migrated and in WAL mode;
    sqlite3.DatabaseError (Damaged where the check found it) if it is not sound. Apps opening one
    store together may find it locked for a moment even past the busy timeout: switching to WAL
    needs every other connection gone, and SQLite answers "locked" at once rather than wait where
    waiting could deadlock (seen: 1 of 10 processes opening a fresh store without the open lock).
    So the whole open is tried again until BUSY_TIMEOUT_S has passed."""
    check(path)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)  # autocommit
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            migrate(db)
            db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if not locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            db.close()
            raise


def locked(error: sqlite3.DatabaseError) -> bool:
    """Whether `error` says another connection holds the store (busy or locked)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # Python 3.10: only the message tells
        return "database is locked" in str(error)
    return code & 0xFF in (BUSY, LOCKED)


def check(path: Path) -> None:
    """Raise sqlite3.DatabaseError if the store at `path` (if any) is damaged. The check reads
    only: on closing, a read-write connection checkpoints the WAL into the file, or deletes a WAL
    it cannot use, and a damaged store must be moved aside exactly as it was found."""
    if not path.exists():
        return
    uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    finally:
        db.close()
    if problems != ["ok"]:
        raise Damaged(problems[0])


def migrate(db: sqlite3.Connection) -> None:
    """Run the migrations the database lacks. The version is read again and raised inside one
    write transaction (BEGIN IMMEDIATE), so apps starting together never run a step twice."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
        return  # the usual open: no write lock taken
    db.execute("BEGIN IMMEDIATE")  # waits (busy timeout) for another app migrating this store
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for script in MIGRATIONS[version:]:
            for statement in statements(script):
                db.execute(statement)  # not executescript: it would commit first
        db.execute(f"PRAGMA user_version = {max(version, len(MIGRATIONS))}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def statements(script: str) -> list[str]:
    """The SQL statements of a migration (none of which holds a ';' of its own)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]


@contextlib.contextmanager
def open_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock beside the store (`chats.sqlite3.lock`) while it is opened."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a read-only folder: SQLite then says what is wrong
            fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def damaged(error: sqlite3.DatabaseError) -> bool:
    """Whether `error` says the file itself is damaged (rather than locked or not permitted)."""
    if isinstance(error, Damaged):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:  # Python 3.10: only the message tells
        return str(error) in DAMAGE_MESSAGES
    return code & 0xFF in (CORRUPT, NOTADB)


def cannot_open(path: Path, error: sqlite3.DatabaseError) -> str:
    """The line the user reads when the store at `path` cannot be opened (not damage)."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (BUSY, LOCKED):
        return f"the chat store {path} is locked by another program ({error}): try again"
    if code in (PERM, READONLY, CANTOPEN, AUTH):
        return (
            f"cannot open the chat store {path} ({error}): check its permissions and its folder's "
            "(xqchat needs to read and write both)"
        )
    return f"cannot open the chat store {path}: {error}"


def recover(path: Path) -> Recovery:
    """Build a sound store from every row of the damaged one at `path` that still reads, move the
    damaged one aside and put the new one in its place. The caller holds `open_lock`."""
    building = path.with_name(path.name + ".recovering")
    try:
        building.unlink(missing_ok=True)  # our own leftover from a recovery that was killed
        # Read from a copy: SQLite may write to a file it opens (its WAL, a checkpoint), and the
        # file moved aside must stay exactly as it was found.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".recover-") as folder:
            copy = Path(folder) / "damaged.sqlite3"
            for suffix in ("", "-wal"):  # the -shm is rebuilt from the WAL
                if Path(f"{path}{suffix}").is_file():
                    shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
            chats, messages = read_damaged(copy)
        db = sqlite3.connect(building, isolation_level=None)  # rollback journal: one file
        try:
            migrate(db)
            counts = write_recovered(db, chats, messages)
        finally:
            db.close()
        # Moved aside only now, so a recovery killed before this point starts over next time.
        broken = move_aside(path)
        building.replace(path)
    except (OSError, sqlite3.Error) as e:
        raise XQError(
            f"the chat store {path} is damaged and could not be rebuilt ({e}): move it away "
            "and start xqchat again"
        ) from None
    return Recovery(broken, *counts)


def move_aside(path: Path) -> Path:
    """Rename the store at `path` and its -wal and -shm to `<name>.broken-<time>[-n]`, keeping
    each companion beside its database (SQLite finds a WAL by its name)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        broken = path.with_name(f"{path.name}.broken-{stamp}{f'-{n}' if n > 1 else ''}")
        if not any(Path(f"{broken}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            break
        n += 1
    # The companions go first: a WAL left behind would be replayed into the store built next.
    for suffix in ("-wal", "-shm", ""):
        if Path(f"{path}{suffix}").exists():
            Path(f"{path}{suffix}").rename(f"{broken}{suffix}")
    return broken


# What recovery reads, after the rowid; a store from before migration 2 lacks ADDED's columns.
CHAT_COLUMNS = ("title", "system", "created", "updated")
MESSAGE_COLUMNS = ("chat_id", "role", "content", "created", "status")
ADDED = {"system": "''", "status": "'done'"}  # their defaults, as SQL
CHAT_TYPES = (int, str, str, (int, float), (int, float))
MESSAGE_TYPES = (int, int, str, str, (int, float), str)


def read_damaged(path: Path) -> tuple[list[tuple], list[tuple]]:
    """The chats and messages of the damaged store at `path` that read, table by table."""
    db = sqlite3.connect(path, isolation_level=None)
    db.text_factory = lambda data: data.decode("utf-8", "replace")  # damage can break UTF-8
    # writable_schema: a file shorter than its header says (a truncated one) is otherwise refused
    # whole; nothing is written. cell_size_check: a damaged page fails rather than yield nonsense.
    db.execute("PRAGMA writable_schema=ON")
    db.execute("PRAGMA cell_size_check=ON")
    try:
        return read_table(db, "chats", CHAT_COLUMNS), read_table(db, "messages", MESSAGE_COLUMNS)
    finally:
        db.close()


def read_table(db: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> list[tuple]:
    """(rowid, *columns) for every row of `table` that reads; none if its schema does not."""
    try:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    except sqlite3.DatabaseError:
        return []  # the schema itself is lost: nothing says where the table is
    if any(name not in present and name not in ADDED for name in columns):
        return []  # not the table this store made
    picked = ", ".join(name if name in present else ADDED[name] for name in columns)
    select = f"SELECT rowid, {picked} FROM {table}"

    def first_key(low: int) -> int | None:  # raises where the way to `low` is damaged
        row = db.execute(
            f"SELECT rowid FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1", (low,)
        ).fetchone()
        return None if row is None else row[0]

    rows: list[tuple] = []
    after = ROWID_MIN - 1  # the last rowid read or skipped
    while after < ROWID_MAX:
        try:  # the fast way: one scan, until it meets a damaged page
            for row in db.execute(f"{select} WHERE rowid >= ? ORDER BY rowid", (after + 1,)):
                rows.append(row)
                after = row[0]
            return rows
        except sqlite3.DatabaseError:
            pass
        key = next_key(first_key, after)
        if key is None:
            return rows
        with contextlib.suppress(sqlite3.DatabaseError):  # a row whose own bytes are lost
            rows.extend(db.execute(f"{select} WHERE rowid = ?", (key,)).fetchall())
        after = key
    return rows


def next_key(first_key: Callable[[int], int | None], after: int) -> int | None:
    """The first rowid past `after` that can be reached: jump `after + 2**k` for growing k until
    a look-up reads, then halve the last jump back to where the damage ends."""
    failed, step = after, 1  # the look-up from `failed` on failed (at first: none was tried)
    while failed < ROWID_MAX:
        low = min(after + step, ROWID_MAX)
        step *= 2
        try:
            key = first_key(low)
        except sqlite3.DatabaseError:
            failed = low
            continue
        while low - failed > 1:
            middle = (failed + low) // 2
            try:
                found = first_key(middle)
            except sqlite3.DatabaseError:
                failed = middle
            else:
                low, key = middle, found
        return key
    return None


def write_recovered(
    db: sqlite3.Connection, chats: list[tuple], messages: list[tuple]
) -> tuple[int, int, int]:
    """Insert the rows read into the fresh store `db`, keeping their ids (saved caches are
    named by chat id); a chat whose row was lost is rebuilt from its messages. Returns (chats,
    messages, chats rebuilt)."""
    kept = {row[0]: row for row in chats if fits(row, CHAT_TYPES)}
    messages = [row for row in messages if fits(row, MESSAGE_TYPES)]
    lost: dict[int, list[float]] = {}
    for row in messages:
        if row[1] not in kept:
            lost.setdefault(row[1], []).append(row[4])
    for chat_id, stamps in lost.items():
        kept[chat_id] = (chat_id, f"Recovered chat {chat_id}", "", min(stamps), max(stamps))
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO chats (id, title, system, created, updated) VALUES (?, ?, ?, ?, ?)",
        kept.values(),
    )
    db.executemany(
        "INSERT INTO messages (id, chat_id, role, content, created, status) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        messages,
    )
    db.execute("COMMIT")
    return len(kept), len(messages), len(lost)


def fits(row: tuple, types: tuple) -> bool:
    """Whether each value has its column's type: damage can leave a readable row of nonsense."""
    return all(isinstance(value, kind) for value, kind in zip(row, types, strict=True))
