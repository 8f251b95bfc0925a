"""Framework-free chat logic: the canonical message list, template rendering, prefix reuse and
what a turn does when the conversation outgrows the model's context."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from xqchat.models.errors import XQError
from xqchat.models.tokenizer import Tokenizer

from .base import CacheSpec, GenerationConfig, Model, Session, TokenEvent

OVERFLOW_POLICIES = ("stop", "drop-oldest", "sink-window")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class ContextPolicy:
    """What a turn does when the conversation and room for the reply no longer fit the context.

    stop: refuse the turn with a message. drop-oldest: leave out whole oldest turns (never the
    system prompt or the newest user message). sink-window: keep the first `sink` tokens (the
    attention sinks) and the newest `window` tokens of the rendered conversation, drop the middle
    and prefill the window again (the cache kinds cannot evict a middle, so the window is re-read
    at each cut; between cuts it grows and is reused like any prefix)."""

    overflow: str = "stop"
    sink: int = 4
    window: int = 0  # 0 = half of what the context holds besides the reply's room

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise XQError(
                f"unknown overflow policy '{self.overflow}' ({', '.join(OVERFLOW_POLICIES)})"
            )
        if self.sink < 0 or self.window < 0:
            raise XQError("sink and window are token counts: 0 or more")


class ContextFull(XQError):
    """The `stop` policy refused a turn: the conversation no longer fits the context."""

    def __init__(self, message: str, prompt: int = 0, room: int = 0):
        super().__init__(message)
        self.prompt, self.room = prompt, room  # tokens: the prompt's, and the reply's room


class Conversation:
    """A message list answered turn by turn: `reply` (each kind its own) streams the answer to
    the list as it stands and appends it; `notices` says what it left out on the last turn."""

    messages: list[dict]
    notices: list[str]

    def reply(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        raise NotImplementedError

    def send(
        self, text: str, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Add a user message and stream the assistant's reply (appended to `messages` at the end)."""
        if not text.strip():
            raise XQError("the prompt is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            yield from self.reply(cfg, cancel)
        except BaseException:
            if self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise


class ChatSession(Conversation):
    """One conversation. Each turn renders the message list with the chat template (as the context
    policy shapes it), keeps the longest common token prefix already in the cache, and prefills
    only what follows it. `notices` says what the policy left out on the last turn."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        system: str | None = None,
        messages: list[dict] | None = None,
        policy: ContextPolicy | None = None,
        cache: CacheSpec | None = None,
        session: Session | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        # `session`: one that holds another conversation's tokens (a server's pool); its longest
        # common prefix with this conversation is kept, as between turns
        self.session: Session = session if session is not None else model.new_session(cache)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.messages += messages or []
        self.policy = policy or ContextPolicy()
        self.notices: list[str] = []
        self._dropped = 0  # drop-oldest: messages left out after the system prompt
        self._cut = 0  # sink-window: where the kept window starts in the rendered conversation

    @property
    def limit(self) -> int:
        return self.model.spec.max_context

    def _prompt(self, cfg: GenerationConfig) -> list[int]:
        """The tokens this turn feeds the model, after the context policy has had its say."""
        room = min(cfg.max_tokens, self.limit // 4)  # the reply needs room too
        budget = self.limit - room
        self.notices = []
        if self.policy.overflow == "drop-oldest":
            return self._drop_oldest(budget)
        full = self.tokenizer.render(self.messages)
        if self.policy.overflow == "sink-window":
            return self._sink_window(full, budget)
        if len(full) > budget:
            raise ContextFull(
                f"the context is full: the prompt is {len(full)} tokens; the model's context "
                f"holds {self.limit} and the reply needs room for up to {room} more (start a new "
                "chat, or choose the drop-oldest or sink-window overflow policy)",
                len(full),
                room,
            )
        return full

    def _drop_oldest(self, budget: int) -> list[int]:
        head = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        system, rest = self.messages[:head], self.messages[head:]
        dropped = min(self._dropped, len(rest) - 1)
        while True:
            prompt = self.tokenizer.render(system + rest[dropped:])
            if len(prompt) <= budget:
                break
            # the next turn starts at the next user message; the newest one is never dropped
            later = [i for i in range(dropped + 1, len(rest)) if rest[i]["role"] == "user"]
            if not later:
                raise ContextFull(
                    f"the newest message alone needs {len(prompt)} tokens with the system prompt; "
                    f"{budget} fit beside the reply's room"
                )
            dropped = later[0]
        if dropped > self._dropped:
            turns = sum(m["role"] == "user" for m in rest[self._dropped : dropped])
            self.notices.append(
                f"context full: left out the {turns} oldest turn(s) ({dropped} messages are now "
                "outside the context; the model no longer sees them)"
            )
        self._dropped = dropped
        return prompt

    def _sink_window(self, full: list[int], budget: int) -> list[int]:
        sink = min(self.policy.sink, budget // 2)
        if self._cut >= len(full):  # an edit shortened the chat past the old cut
            self._cut = 0
        view = full[:sink] + full[self._cut :] if self._cut else full
        if len(view) <= budget:
            return view
        window = min(self.policy.window or (budget - sink) // 2, budget - sink)
        self._cut = len(full) - window
        self.notices.append(
            f"context full: kept the first {sink} tokens (attention sinks) and the newest "
            f"{window}; the {self._cut - sink} tokens between are gone for the model, and the "
            "window was read again"
        )
        return full[:sink] + full[self._cut :]

    def reply(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Answer the message list as it stands (a front end that edits the list, to regenerate a
        reply or resend an edited message, calls this: only what changed is prefilled)."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise XQError("there is no user message to answer")
        prompt = self._prompt(cfg)
        keep = min(common_prefix(self.session.tokens, prompt), len(prompt) - 1)
        self.session.trim(keep)
        self.session.prefill(prompt[keep:])
        cfg = dataclasses.replace(cfg, stop_tokens=cfg.stop_tokens | self.tokenizer.stop_tokens)
        detok = self.tokenizer.detokenizer()
        event = None
        for event in self.session.generate(cfg, cancel):
            text = "" if event.finish_reason == "stop" else detok.add(event.token)
            yield dataclasses.replace(event, text=text)
        reply = {"role": "assistant", "content": detok.text}
        if event is not None and event.finish_reason == "cancelled":
            reply["cancelled"] = True
        self.messages.append(reply)
