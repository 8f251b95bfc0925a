"""ChatSession's context policies and message-list edits, over a scripted model with the real
default tokenizer and chat template."""

import pytest
from tui_fakes import FakeModel

from xqchat.backends.base import GenerationConfig
from xqchat.backends.chat import ChatSession, ContextFull, ContextPolicy, common_prefix
from xqchat.models.errors import XQError

CFG = GenerationConfig(max_tokens=10)  # room for the reply: min(10, 300 // 4) = 10
LIMIT = 300
BUDGET = LIMIT - 10


def question(i: int) -> str:
    return f"Question {i}: " + "tell me about rivers and mountains " * 6


def chat_with(tokenizer, policy: str, **kw) -> tuple[ChatSession, FakeModel]:
    model = FakeModel(tokenizer, ["A short answer."], max_context=LIMIT)
    return ChatSession(model, tokenizer, "Be brief.", policy=ContextPolicy(policy, **kw)), model


def test_stop_refuses_when_the_reply_would_not_fit(default_tokenizer):
    chat, model = chat_with(default_tokenizer, "stop")
    turns = 0
    with pytest.raises(ContextFull, match="the context is full"):
        for i in range(20):
            list(chat.send(question(i), CFG))
            turns += 1
    assert turns >= 2
    assert all(len(prompt) <= BUDGET for prompt in model.prompts)
    # the refused message is not in the list; the next would have exceeded the budget
    assert chat.messages[-1]["role"] == "assistant"
    refused = chat.messages + [{"role": "user", "content": question(turns)}]
    assert len(default_tokenizer.render(refused)) > BUDGET


def test_drop_oldest_keeps_system_and_newest_message(default_tokenizer):
    chat, model = chat_with(default_tokenizer, "drop-oldest")
    system = chat.messages[:1]
    noticed = []
    for i in range(8):
        list(chat.send(question(i), CFG))
        prompt = model.prompts[-1]
        assert len(prompt) <= BUDGET
        # the prompt is the system prompt plus the newest whole turns, ending with this question
        history = chat.messages[1:-1]
        starts = [k for k, m in enumerate(history) if m["role"] == "user"]
        kept = [k for k in starts if default_tokenizer.render(system + history[k:]) == prompt]
        assert kept, f"turn {i}: the prompt is not the system prompt plus whole newest turns"
        if kept[0] > 0:  # something was left out: one more turn would not have fitted
            earlier = max(k for k in starts if k < kept[0])
            assert len(default_tokenizer.render(system + history[earlier:])) > BUDGET
        noticed.append(bool(chat.notices))
        if chat.notices:
            assert "left out the 1 oldest turn(s)" in chat.notices[0]
    assert not noticed[0] and any(noticed)
    assert history[-1]["content"] == question(7)


def test_sink_window_keeps_sinks_and_recent_window(default_tokenizer):
    chat, model = chat_with(default_tokenizer, "sink-window", sink=4, window=120)
    cut_turn = None
    for i in range(8):
        list(chat.send(question(i), CFG))
        if chat.notices:
            full = default_tokenizer.render(chat.messages[:-1])  # as the turn saw it
            assert model.prompts[-1] == full[:4] + full[-120:]
            assert "kept the first 4 tokens (attention sinks) and the newest 120" in chat.notices[0]
            cut_turn = i
            break
    assert cut_turn is not None and cut_turn > 0
    # the next turn reuses the window: only the new tokens are prefilled
    list(chat.send("And lakes?", CFG))
    full = default_tokenizer.render(chat.messages[:-1])
    cut = len(default_tokenizer.render(chat.messages[:-3])) - 120
    assert model.prompts[-1] == full[:4] + full[cut:]
    assert not chat.notices
    held = model.prompts[-2] + default_tokenizer.encode("A short answer.")
    assert model.prefills[-1] == len(model.prompts[-1]) - common_prefix(held, model.prompts[-1])
    assert model.prefills[-1] < 40


def test_reply_after_an_edit_prefills_only_what_changed(default_tokenizer):
    model = FakeModel(default_tokenizer, ["Four.", "Six."])
    chat = ChatSession(model, default_tokenizer)
    list(chat.send("What is 2+2?", CFG))
    held = model.prompts[0] + default_tokenizer.encode("Four.")
    chat.messages[-2:] = [{"role": "user", "content": "What is 3+3?"}]  # edit: drop the reply
    list(chat.reply(CFG))
    new = default_tokenizer.render(chat.messages[:-1])
    assert model.prompts[1] == new
    assert model.prefills == [len(model.prompts[0]), len(new) - common_prefix(held, new)]
    assert model.prefills[1] < len(new) // 3
    assert chat.messages[-1] == {"role": "assistant", "content": "Six."}


def test_reply_needs_a_user_message_last(default_tokenizer):
    chat = ChatSession(FakeModel(default_tokenizer, ["Hi."]), default_tokenizer)
    with pytest.raises(XQError, match="no user message"):
        list(chat.reply(CFG))
