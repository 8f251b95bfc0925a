"""A chat's cache outlives the app: saved after each reply, loaded when the chat comes back, so
the next turn prefills only what is new; a cache that cannot be loaded means reading the chat
again, said in a notification, never a crash or a lost message."""

from __future__ import annotations

import json

import pytest
from tui_fakes import app_with, send, settle

from xqchat.app.tui.app import XQChatApp
from xqchat.backends.base import TokenEvent
from xqchat.backends.chat import common_prefix

SIZE = (110, 32)
pytestmark = pytest.mark.usefixtures("dirs")


def record_events(app) -> list[TokenEvent]:
    """Every TokenEvent the engine hands the chat screen."""
    events, reply = [], app.engine.reply

    async def recorded(*args):
        async for item in reply(*args):
            if isinstance(item, TokenEvent):
                events.append(item)
            yield item

    app.engine.reply = recorded
    return events


def cache_notes(app) -> list[str]:
    return [n.message for n in app._notifications if n.title == "chat cache"]


def answered_prompt(app) -> list[int]:
    """The prompt the last reply of the chat on screen answered, as the model read it."""
    screen = app.chat_screen
    return app.engine.tokenizer.render(screen.history(screen.chat_id)[:-1])


async def test_a_reopened_chat_prefills_only_the_new_turn(default_tokenizer, dirs):
    app, _ = app_with(default_tokenizer, ["Paris."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Capital of France?")
        chat_id = app.chat_screen.chat_id
        held = list(app.engine.sessions[chat_id].session.tokens)
    saved = dirs / "data" / "xqchat" / "caches" / f"{chat_id}.safetensors"
    assert app.engine.saved_cache(chat_id) == saved and saved.is_file()

    again, model = app_with(default_tokenizer, ["Rome."])
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert again.chat_screen.chat_id == chat_id
        await send(pilot, "And of Italy?")
        prompt = answered_prompt(again)
        assert model.prompts == [prompt]
        assert model.prefills == [len(prompt) - common_prefix(held, prompt)]
        assert model.prefills[0] < len(prompt) // 3  # the first turn came from the file
        assert cache_notes(again) == []

        await pilot.press("f8", "y")  # deleting the chat deletes its cache
        await pilot.pause()
        assert not again.store.chats() and not saved.exists()


async def test_a_refused_cache_means_reading_the_chat_again(default_tokenizer, dirs):
    app, _ = app_with(default_tokenizer, ["Paris."])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "Capital of France?")
        saved = app.engine.saved_cache(app.chat_screen.chat_id)
    saved.write_text('{"tokens": [1, 2')  # cut short

    again, model = app_with(default_tokenizer, ["Rome."])
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, "And of Italy?")
        prompt = answered_prompt(again)
        assert model.prefills == [len(prompt)]
        (note,) = cache_notes(again)
        assert note.startswith("Reading the chat again from the start: its saved cache was not")
        assert "damaged or truncated" in note
        chat_id = again.chat_screen.chat_id
        assert [m.content for m in again.store.messages(chat_id)] == [
            "Capital of France?",
            "Paris.",
            "And of Italy?",
            "Rome.",
        ]
        held = again.engine.sessions[chat_id].session.tokens
    assert json.loads(saved.read_text()) == {"tokens": held}  # saved again, whole


async def turn(overrides: dict, text: str) -> dict:
    """Open the real app on its newest chat, send `text`, quit: what the reply's first event said,
    the prompt it answered, what the cache held at the end, and the chat's saved cache."""
    app = XQChatApp(overrides)
    events = record_events(app)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await send(pilot, text)
        chat_id = app.chat_screen.chat_id
        return {
            "stats": (events[0].cached_tokens, events[0].prompt_tokens),
            "prompt": answered_prompt(app),
            "held": list(app.engine.sessions[chat_id].session.tokens),
            "saved": app.engine.saved_cache(chat_id),
            "notes": cache_notes(app),
            "messages": [(m.role, m.content) for m in app.store.messages(chat_id)],
        }


async def test_the_real_engine_resumes_from_disk_and_survives_a_damaged_file(tiny_models):
    """The torch engine on a tiny model: the saved safetensors cache, its checksum, its tokens."""
    overrides = {"model": str(tiny_models["llama"]), "backend": "torch", "max_tokens": 4}
    first = await turn(overrides, "Hello there")
    assert first["stats"] == (0, len(first["prompt"]))

    second = await turn(overrides, "And again")
    reused = common_prefix(first["held"], second["prompt"])
    assert reused >= len(first["prompt"])  # at least the whole first prompt came from the file
    assert second["stats"] == (reused, len(second["prompt"]) - reused)
    assert second["notes"] == []

    data = bytearray(second["saved"].read_bytes())
    data[-8] ^= 0xFF  # one flipped byte in the arrays: the checksum no longer matches
    second["saved"].write_bytes(data)
    third = await turn(overrides, "Once more")
    (note,) = third["notes"]
    assert "damaged: its contents do not match their checksum" in note
    assert third["stats"] == (0, len(third["prompt"]))
    assert [role for role, _ in third["messages"]] == ["user", "assistant"] * 3


@pytest.mark.slow
async def test_the_default_model_resumes_a_chat_after_a_restart():
    overrides = {"max_tokens": 16, "backend": "torch"}
    first = await turn(overrides, "What is the capital of France?")
    second = await turn(overrides, "And of Italy?")
    reused = common_prefix(first["held"], second["prompt"])
    assert second["stats"] == (reused, len(second["prompt"]) - reused)
    assert reused == len(first["held"])  # everything the saved cache held was of use
    assert second["stats"][1] < len(second["prompt"]) // 3 and second["notes"] == []
    assert [role for role, _ in second["messages"]] == ["user", "assistant"] * 2
    assert "Paris" in second["messages"][1][1]
