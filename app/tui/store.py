"""The chat store: SQLite in the user data dir, WAL mode, schema versioned with `PRAGMA
user_version`. Every write commits at once, so a killed app loses nothing already written."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from xqchat.models.paths import data_dir

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


SAVE_EVERY_S = 1.0  # a streaming reply reaches the store at least this often


def default_path() -> Path:
    return data_dir() / "chats.sqlite3"


class Store:
    def __init__(self, path: Path | None = None):
        self.path = path or default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each write lands
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.migrate()
        self.db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'")

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        for version in range(self.version, len(MIGRATIONS)):
            # executescript commits first; the version bump rides in the same script
            self.db.executescript(
                f"BEGIN; {MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;"
            )

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
        self, store: Store, chat_id: int, interval: float = SAVE_EVERY_S, clock=time.monotonic
    ):
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
