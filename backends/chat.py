"""Framework-free chat logic: the canonical message list, template rendering, prefix reuse."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

from xqchat.models.errors import XQError
from xqchat.models.tokenizer import Tokenizer

from .base import GenerationConfig, Model, Session, TokenEvent


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """One conversation. Each turn renders the whole message list with the chat template, keeps
    the longest common token prefix already in the cache, and prefills only what follows it."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.session: Session = model.new_session()
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def send(
        self, text: str, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Add a user message and stream the assistant's reply (appended to `messages` at the end)."""
        if not text.strip():
            raise XQError("the prompt is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            yield from self._reply(cfg, cancel)
        except BaseException:
            if self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise

    def _reply(self, cfg: GenerationConfig, cancel: threading.Event | None) -> Iterator[TokenEvent]:
        prompt = self.tokenizer.render(self.messages)
        limit = self.model.spec.max_context
        if len(prompt) >= limit:
            raise XQError(f"the prompt is {len(prompt)} tokens; the model's context holds {limit}")
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
