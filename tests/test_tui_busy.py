"""What the reply block and the status bar say while the engine is busy: the model loading, XQuant's
factors on first use, a long prefill with its progress (and Esc during it), a failed load, the
weights and drafter once loaded, and a speed that belongs to the chat on screen."""

from __future__ import annotations

import threading

import pytest
from tui_fakes import FakeModel, app_with, send, settle

from xqchat.app.tui.app import XQChatApp
from xqchat.app.tui.engine import Busy, ChatEngine, PrefillCancelled
from xqchat.app.tui.settings import Settings
from xqchat.app.tui.widgets import BusyLine, MessageView, PromptInput, StatusBar
from xqchat.backends import decoding
from xqchat.backends.base import CacheMemory, GenerationConfig, TokenEvent
from xqchat.backends.decoding import PREFILL_CHUNK
from xqchat.models.errors import XQError
from xqchat.models.registry import DEFAULT_MODEL

SIZE = (110, 32)
LONG = "rivers and mountains and lakes " * 300  # well over two prefill chunks

pytestmark = pytest.mark.usefixtures("dirs")


def status_text(app) -> dict[str, str]:
    """Each status bar segment on show, by id (hidden ones are left out)."""
    bar = app.chat_screen.query_one(StatusBar)
    return {s.id: str(s.render()) for s in bar.query("Static") if s.display}


def busy_line(app) -> BusyLine | None:
    lines = app.chat_screen.query(BusyLine)
    return lines.last() if lines else None


def busy_text(app) -> str:
    return str(busy_line(app).query_one(".busy-text").render())


async def until(pilot, condition, what: str) -> None:
    """Let the app run until `condition()` holds (the engine thread works meanwhile)."""
    for _ in range(600):
        if condition():
            for _ in range(3):  # what the engine thread handed over before it is now on screen
                await pilot.pause(0.05)
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def type_and_send(pilot, text: str) -> None:
    """Send without waiting for the reply (send() waits for it)."""
    pilot.app.screen.query_one(PromptInput).text = text
    await pilot.press("enter")


async def test_a_reply_sent_while_the_model_loads_says_so(default_tokenizer):
    model = FakeModel(default_tokenizer, ["Loaded and answering."])
    gate = threading.Event()

    def slow_load(settings, progress):
        progress("loading fake-model …")
        assert gate.wait(timeout=30)
        return "fake-model", default_tokenizer, model

    app = XQChatApp(None, loader=slow_load)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: status_text(app).get("model") == "loading fake-model …", "load")
        await type_and_send(pilot, "Hello?")
        await until(pilot, lambda: busy_line(app) is not None, "the busy line")
        assert busy_text(app) == "loading fake-model …"
        assert busy_line(app).query_one("LoadingIndicator").display
        assert not busy_line(app).query_one("ProgressBar").display  # no bar: no known total
        view = app.chat_screen.query(MessageView).last()
        assert (view.role, view.text, view.status) == ("assistant", "", "streaming")
        gate.set()
        await settle(pilot)
        assert busy_line(app) is None
        assert [(v.role, v.text) for v in app.chat_screen.query(MessageView)] == [
            ("user", "Hello?"),
            ("assistant", "Loaded and answering."),
        ]
        assert status_text(app)["model"] == "fake-model"


async def test_the_first_xquant_session_says_it_prepares_the_factors(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Sure."], {"cache": "xquant"}, pause_at=("session",))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await type_and_send(pilot, "First chat")
        await until(pilot, lambda: model.paused == "session", "the new session")
        assert busy_text(app) == "preparing XQuant factors (first use) …"
        model.resume.set()
        await settle(pilot)
        assert busy_line(app) is None

        await pilot.press("ctrl+n")  # the factors are made: a second chat only starts
        await type_and_send(pilot, "Second chat")
        await until(pilot, lambda: model.paused == "session", "the second session")
        assert busy_text(app) == "starting the reply …"
        model.resume.set()
        await settle(pilot)
        assert [m.content for m in app.store.messages(app.chat_screen.chat_id)] == [
            "Second chat",
            "Sure.",
        ]


async def test_a_kv_cache_never_mentions_factors(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Sure."], pause_at=("session",))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await type_and_send(pilot, "Hello")
        await until(pilot, lambda: model.paused == "session", "the new session")
        assert busy_text(app) == "starting the reply …"
        model.resume.set()
        await settle(pilot)


async def test_a_chat_coming_back_says_it_loads_its_saved_cache(default_tokenizer):
    app, _ = app_with(default_tokenizer, ["Paris."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Capital of France?")
    again, model = app_with(default_tokenizer, ["Rome."], pause_at=("session",))
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await type_and_send(pilot, "And of Italy?")
        await until(pilot, lambda: model.paused == "session", "the new session")
        assert busy_text(again) == "loading the chat's saved cache …"
        model.resume.set()
        await settle(pilot)
        assert busy_line(again) is None
        assert again.store.messages(again.chat_screen.chat_id)[-1].content == "Rome."


async def long_chat(app) -> int:
    """A stored chat whose first reply has to read a long conversation; its id."""
    chat = app.store.new_chat("Long")
    app.store.add(chat, "user", LONG)
    app.store.add(chat, "assistant", "Noted.")
    return chat


async def test_a_long_prefill_shows_its_progress(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Done reading."], pause_at=("prefill",))
    chat = await long_chat(app)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.chat_screen.chat_id == chat
        await type_and_send(pilot, "Summarise.")
        total = len(default_tokenizer.render(app.chat_screen.history(chat)))
        assert total > 2 * PREFILL_CHUNK
        await until(pilot, lambda: model.paused == "prefill", "the prefill")
        line = busy_line(app)
        assert busy_text(app) == f"reading the chat ({total:,} tokens) …"
        bar = line.query_one("ProgressBar")
        assert bar.display and (bar.progress, bar.total) == (PREFILL_CHUNK, total)
        model.resume.set()
        await settle(pilot)
        assert busy_line(app) is None
        assert model.prefills == [total]
        assert app.store.messages(chat)[-1].content == "Done reading."


async def test_escape_during_a_long_prefill_stops_it_and_keeps_what_was_read(default_tokenizer):
    app, model = app_with(default_tokenizer, ["Done reading."], pause_at=("prefill",))
    chat = await long_chat(app)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await type_and_send(pilot, "Summarise.")
        prompt = default_tokenizer.render(app.chat_screen.history(chat))
        await until(pilot, lambda: model.paused == "prefill", "the prefill")
        await pilot.press("escape")
        model.resume.set()
        await settle(pilot)
        assert model.prompts == []  # it never began to generate
        assert [(m.role, m.content) for m in app.store.messages(chat)] == [
            ("user", LONG),
            ("assistant", "Noted."),
            ("user", "Summarise."),
        ]
        assert [v.role for v in app.chat_screen.query(MessageView)] == ["user", "assistant", "user"]
        notes = [n.message for n in app._notifications]
        assert (
            "Cancelled before the reply began: your message is kept (Ctrl+R answers it)." in notes
        )
        held = app.engine.sessions[chat].session.tokens
        assert held == prompt[: 2 * PREFILL_CHUNK]  # the chunk under way was finished

        model.pause_at.clear()
        await pilot.press("ctrl+r")  # answers it, reading only what the cancelled turn had not
        await settle(pilot)
        assert model.prefills == [len(prompt), len(prompt) - 2 * PREFILL_CHUNK]
        assert app.store.messages(chat)[-1].content == "Done reading."


async def test_weights_and_drafter_show_once_the_model_is_loaded(default_tokenizer):
    app, _ = app_with(default_tokenizer, overrides={"drafter": "lookup"}, drafter=object())
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert status_text(app) == {
            "model": "fake-model",
            "engine": "fake/cpu",
            "weights": "fp32",
            "cache": "kv",
            "drafter": "drafter: lookup",
            "gauge": "ctx 0/4,096",
            "memory": "cache 0 KiB",
        }


async def test_no_drafter_no_drafter_segment(default_tokenizer):
    app, _ = app_with(default_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "drafter" not in status_text(app)
        assert status_text(app)["weights"] == "fp32"


@pytest.mark.parametrize(
    "error, note",
    [
        (XQError("no model named 'nope'"), "no model named 'nope'"),
        (ValueError("bad shape"), "internal error: ValueError: bad shape"),
    ],
)
async def test_a_failed_load_says_failed_in_the_status_bar(default_tokenizer, error, note):
    def failing(settings, progress):
        progress("loading nope …")
        raise error

    app = XQChatApp(None, loader=failing)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert status_text(app) == {"model": f"{DEFAULT_MODEL}: failed to load"}
        assert app.chat_screen.query_one("#model").has_class("-failed")
        assert not app.chat_screen.query_one("#loading").display
        assert note in [n.message for n in app._notifications]

        await send(pilot, "Anyone there?")  # refused in the conversation, the message kept
        chat = app.chat_screen.chat_id
        assert [(m.role, m.content) for m in app.store.messages(chat)] == [
            ("user", "Anyone there?"),
            ("notice", "no reply: no model is loaded (Settings, Ctrl+S, picks one)"),
        ]


async def test_the_speed_is_the_chat_on_screens(default_tokenizer):
    app, _ = app_with(default_tokenizer, ["Hi."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "First")
        first = app.chat_screen.chat_id
        assert status_text(app)["speed"] == "42.0 tok/s"
        await pilot.press("ctrl+n")
        await settle(pilot)
        assert "speed" not in status_text(app)
        assert status_text(app)["gauge"] == "ctx 0/4,096"
        await send(pilot, "Second")
        assert status_text(app)["speed"] == "42.0 tok/s"
        app.chat_screen.open_chat(first)  # switching back: that reply's speed is long gone
        await settle(pilot)
        assert "speed" not in status_text(app)


# -- the real engine (torch, on tiny models) -------------------------------------------------------
def test_a_prefill_stopped_between_chunks_keeps_what_it_read(tiny_models, monkeypatch):
    """The backend's hook: told before each chunk and at the end; raising from it stops the
    prefill there, and the cache holds exactly the chunks read (the next prefill goes on)."""
    from conftest import load_tiny

    monkeypatch.setattr(decoding, "PREFILL_CHUNK", 16)
    model = load_tiny(tiny_models, "llama", "torch")
    tokens = [(7 * i) % 500 + 10 for i in range(40)]
    told = []
    whole = model.new_session()
    whole.on_prefill = lambda done, total: told.append((done, total))
    whole.prefill(tokens)
    assert told == [(0, 40), (16, 40), (32, 40), (40, 40)]

    def stop_at_32(done: int, total: int) -> None:
        if done == 32:
            raise PrefillCancelled

    cut = model.new_session()
    cut.on_prefill = stop_at_32
    with pytest.raises(PrefillCancelled):
        cut.prefill(tokens)
    assert cut.tokens == tokens[:32]
    cut.on_prefill = None
    cut.prefill(tokens[32:])
    assert cut.tokens == whole.tokens
    cfg = GenerationConfig(max_tokens=6)
    assert [e.token for e in cut.generate(cfg)] == [e.token for e in whole.generate(cfg)]


@pytest.mark.parametrize("name, factors", [("gqa-qwen2", True), ("mha", False)])
async def test_the_real_engine_says_what_it_is_busy_with(tiny_models, monkeypatch, name, factors):
    monkeypatch.setattr(decoding, "PREFILL_CHUNK", 16)
    settings = Settings(model=str(tiny_models[name]), backend="torch", cache="xquant", max_tokens=2)
    engine = ChatEngine()
    await engine.configure(settings, lambda stage: None)
    messages = [{"role": "user", "content": "rivers and mountains " * 8}]
    total = len(engine.tokenizer.render(messages))
    items = [item async for item in engine.reply(1, messages, settings)]
    said = [(b.text, b.done, b.total) for b in items if isinstance(b, Busy)]
    reading = f"reading the chat ({total:,} tokens) …"
    expected = [("starting the reply …", 0, None)]
    expected += [("preparing XQuant factors (first use) …", 0, None)] if factors else []
    expected += [(reading, done, total) for done in range(0, total, 16)] + [(reading, total, total)]
    assert said == expected
    first_token = next(i for i, item in enumerate(items) if isinstance(item, TokenEvent))
    assert all(not isinstance(item, Busy) for item in items[first_token:])
    assert isinstance(items[-1], CacheMemory)  # the reply ran to its end after the stages
