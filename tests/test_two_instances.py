"""Two xqchat windows on one data dir: a chat is answered by one window at a time (its answer lock,
app/tui/chat_lock.py), so its turns never interleave; a refused message stays in its window's
prompt; the window that answers next reads the other's turns first. Two real apps run side by
side here (two App.run_test pilots, each with its own Store on the same database), and the lock
itself is checked across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tui_fakes import app_with, settle

from xqchat.app.tui.chat_lock import ANSWERED_ELSEWHERE, ChatLock, lock_dir
from xqchat.app.tui.widgets import MessageView, PromptInput

SIZE = (110, 32)
pytestmark = pytest.mark.usefixtures("dirs")


def rows(app, chat: int) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in app.store.messages(chat)]


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


def shown(app) -> list[tuple[str, str]]:
    return [(v.role, v.text) for v in app.chat_screen.query(MessageView)]


async def press_enter_with(pilot, text: str) -> None:
    pilot.app.chat_screen.query_one(PromptInput).text = text
    await pilot.press("enter")
    await pilot.pause()


async def test_two_windows_never_interleave_a_chat(default_tokenizer):
    a, model_a = app_with(default_tokenizer, ["Answer from A, held mid-way."], hold_after=2)
    b, model_b = app_with(default_tokenizer, ["Answer from B."])
    assert a.store is not b.store and a.store.path == b.store.path
    chat = a.store.new_chat("Shared")
    async with a.run_test(size=SIZE) as pa, b.run_test(size=SIZE) as pb:
        await settle(pa)
        await settle(pb)
        assert a.chat_screen.chat_id == b.chat_screen.chat_id == chat

        await press_enter_with(pa, "Question from A")
        while not model_a.held.is_set():
            await pa.pause(0.05)
        partial = rows(a, chat)
        assert [(r[0], r[2]) for r in partial] == [("user", "done"), ("assistant", "streaming")]

        await press_enter_with(pb, "Question from B")  # refused: A is answering this chat
        assert b.chat_screen.query_one(PromptInput).text == "Question from B"
        assert notes(b) == [ANSWERED_ELSEWHERE]
        await pb.press("ctrl+r")  # so is a regeneration, which would remove A's reply
        await pb.pause()
        assert notes(b) == [ANSWERED_ELSEWHERE] * 2
        assert rows(b, chat) == partial and model_b.prompts == []
        assert b.chat_screen.reply is None
        await pb.press("f8", "y")  # nor can B delete the chat under A's reply
        await pb.pause()
        assert notes(b) == [ANSWERED_ELSEWHERE] * 3
        assert [c.id for c in b.store.chats()] == [chat]

        model_a.release.set()
        await settle(pa)
        answered = [("user", "Question from A", "done")]
        answered += [("assistant", "Answer from A, held mid-way.", "done")]
        assert rows(a, chat) == answered

        await press_enter_with(pb, "Question from B")  # now it goes, after A's turn
        await settle(pb)
        expected = answered + [
            ("user", "Question from B", "done"),
            ("assistant", "Answer from B.", "done"),
        ]
        assert rows(a, chat) == rows(b, chat) == expected
        assert shown(b) == [(role, text) for role, text, _ in expected]
        history = [{"role": r, "content": t} for r, t, _ in expected[:3]]
        assert model_b.prompts == [default_tokenizer.render(history)]  # A's turn was read
        assert b.chat_screen.query_one(PromptInput).text == ""


async def test_an_edit_overtaken_by_another_window_is_kept_not_sent(default_tokenizer):
    a, model_a = app_with(default_tokenizer, ["Second answer."])
    b, model_b = app_with(default_tokenizer, ["Edited answer."])
    chat = a.store.new_chat("Shared")
    a.store.add(chat, "user", "First question")
    a.store.add(chat, "assistant", "First answer.")
    async with a.run_test(size=SIZE) as pa, b.run_test(size=SIZE) as pb:
        await settle(pa)
        await settle(pb)
        await pb.press("ctrl+e")  # B edits "First question" ...
        prompt = b.chat_screen.query_one(PromptInput)
        assert prompt.text == "First question"
        await press_enter_with(pa, "Second question")  # ... while A sends another turn
        await settle(pa)
        prompt.text = "First question, edited"
        await pb.press("enter")
        await settle(pb)
        assert prompt.text == "First question, edited"  # not sent, not lost
        assert notes(b)[-1].startswith("The chat changed in another xqchat window")
        expected = [
            ("user", "First question", "done"),
            ("assistant", "First answer.", "done"),
            ("user", "Second question", "done"),
            ("assistant", "Second answer.", "done"),
        ]
        assert rows(b, chat) == expected and model_b.prompts == []
        assert shown(b) == [(role, text) for role, text, _ in expected]  # what A wrote, on show
        assert not b.chat_screen.query_one("#edit-hint").display


def test_the_lock_is_per_chat_and_next_to_the_database(tmp_path):
    locks = lock_dir(tmp_path / "chats.sqlite3")
    assert locks == tmp_path / "locks"
    first, again, other = ChatLock(locks, 7), ChatLock(locks, 7), ChatLock(locks, 8)
    assert first.path == tmp_path / "locks" / "chat-7.lock"
    assert first.acquire() and first.held
    assert not again.acquire() and not again.held  # another holder in this very process
    assert other.acquire()  # another chat is free
    first.release()
    assert not first.held and again.acquire()
    again.release()
    other.release()
    first.release()  # releasing what is not held does nothing


HOLDER = """
import sys
from pathlib import Path
from xqchat.app.tui.chat_lock import ChatLock
lock = ChatLock(Path(sys.argv[1]), 7)
print("held" if lock.acquire() else "refused", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path, end):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        assert not ChatLock(tmp_path, 7).acquire()
        assert ChatLock(tmp_path, 8).acquire()
    finally:
        if end == "kill":  # a killed xqchat: the OS drops its lock
            child.kill()
        else:
            child.stdin.close()
        child.wait(timeout=30)
    lock = ChatLock(tmp_path, 7)
    assert lock.acquire()
    lock.release()
