"""A per-chat answer lock shared by every xqchat on one data dir, so two windows never answer one
chat at once (their turns would interleave: user, user, assistant, assistant).

The lock is an OS file lock on `<data dir>/locks/chat-<id>.lock`, taken without waiting: flock on
POSIX, msvcrt.locking on Windows. Both belong to the open file, so two windows in one process
exclude each other as two processes do, and the OS drops the lock when its holder dies (a killed
xqchat never leaves a chat locked). The file itself stays: deleting it while another process
opens it would let two holders lock two different files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

ANSWERED_ELSEWHERE = "this chat is being answered in another xqchat window"


def lock_dir(store_path: Path) -> Path:
    """The locks sit next to the database they guard: one data dir, one set of locks."""
    return store_path.parent / "locks"


def _try_lock(handle: IO[bytes]) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        # One byte at offset 0 stands for the whole chat (locking starts at the file position,
        # which "a+" mode puts at the end); LK_NBLCK fails at once if another handle holds it.
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    # No OS file lock at all (no known CPython platform): O_EXCL on a marker file would survive a
    # crash and lock the chat for good, which is worse than the race it prevents. Say so.
    raise OSError("this platform has neither fcntl nor msvcrt: chats cannot be locked")


def _unlock(handle: IO[bytes]) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    elif msvcrt is not None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


class ChatLock:
    """The right to answer one chat: `acquire` takes it if no xqchat (this one included) holds
    it, `release` gives it back. Held from the user's send until the reply ends."""

    def __init__(self, directory: Path, chat_id: int):
        self.path = directory / f"chat-{chat_id}.lock"
        self._handle: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> bool:
        """Take the lock without waiting: False when another holder has it."""
        if self._handle is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")  # noqa: SIM115 (kept open while the lock is held)
        try:
            locked = _try_lock(handle)
        except BaseException:
            handle.close()
            raise
        if not locked:
            handle.close()
            return False
        self._handle = handle
        try:  # who holds it, for a person looking at the file; the lock does not depend on it
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n".encode())
            handle.flush()
        except OSError:
            pass
        return True

    def release(self) -> None:
        """Give the lock back (nothing happens if it is not held)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            _unlock(handle)
        finally:
            handle.close()  # closing drops the lock anyway
