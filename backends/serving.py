"""Serving one model to many clients (`xqchat serve`), free of HTTP: recent conversations'
sessions kept in an LRU bounded by bytes, each request matched to the session that shares the
longest token prefix with its prompt (clients resend the whole conversation every turn), and
stop strings cut from the streamed text."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from xqchat.models.tokenizer import Tokenizer

from .base import GenerationConfig, Model, Session
from .chat import ChatSession, common_prefix

# OpenAI's finish reasons: the context running out ends a reply as its length limit does
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "cancelled"}


class Cancelled(Exception):
    """The client went away: raised between prefill chunks, so a long prompt stops being read."""


@dataclass(frozen=True)
class Completion:
    """One request: the conversation to answer, how to sample, and where the text stops."""

    messages: list[dict]
    cfg: GenerationConfig
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """A piece of the reply, with the counts OpenAI's `usage` reports."""

    text: str
    finish_reason: str | None  # stop | length | cancelled, on the last piece
    prompt_tokens: int  # the whole prompt, reused tokens included
    cached_tokens: int  # of which the cache already held
    completion_tokens: int


class SessionPool:
    """Sessions not answering anyone, least recently used first, holding at most `budget` bytes
    together (what their caches have allocated): the oldest go first."""

    def __init__(self, model: Model, budget: int):
        self.model, self.budget = model, budget
        self.idle: list[Session] = []
        self.held = 0  # bytes the idle sessions hold (read from other threads: /health)

    def take(self, prompt: list[int]) -> Session:
        """The idle session sharing the longest prefix with `prompt`, when answering from it keeps
        at least as many of its tokens as it drops; else a new one, so a new conversation that
        shares only the system prompt does not cut a long one's cache down to it."""
        best, shared = None, 0
        for session in self.idle:
            n = common_prefix(session.tokens, prompt)
            if n > shared:
                best, shared = session, n
        if best is None or shared < len(best.tokens) - shared:
            return self.model.new_session()
        self.idle.remove(best)
        self.held = self.nbytes()
        return best

    def put(self, session: Session) -> None:
        self.idle.append(session)
        while self.idle and self.nbytes() > self.budget:
            self.idle.pop(0)
        self.held = self.nbytes()

    def nbytes(self) -> int:
        return sum(session.memory().reserved_bytes for session in self.idle)


class StopStrings:
    """Cuts a streamed reply at the first of `stops`, holding back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def add(self, text: str) -> tuple[str, bool]:
        """What may be sent of the text so far, and whether a stop string ended it."""
        text = self.held + text
        found = [i for stop in self.stops if (i := text.find(stop)) >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        hold = max(
            (k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])),
            default=0,
        )
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Completions:
    """Answers requests one at a time (on the caller's thread: the server's engine thread)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, budget: int):
        self.model, self.tokenizer = model, tokenizer
        self.pool = SessionPool(model, budget)

    def run(self, request: Completion, cancel: threading.Event) -> Iterator[Piece]:
        """Stream the reply to `request`. Raises ContextFull (prompt past the context), XQError
        (a request the chat logic refuses) or Cancelled (`cancel` set during the prefill)."""
        session = self.pool.take(self.tokenizer.render(request.messages))

        def check(done: int, total: int) -> None:
            if cancel.is_set():
                raise Cancelled

        session.on_prefill = check
        chat = ChatSession(self.model, self.tokenizer, messages=request.messages, session=session)
        stops = StopStrings(request.stop)
        try:
            events = chat.reply(request.cfg, cancel)
            for event in events:
                text, stopped = stops.add(event.text)
                finish = "stop" if stopped else FINISH_REASONS.get(event.finish_reason)
                if finish and not stopped:
                    text += stops.flush()
                prompt = event.prompt_tokens + event.cached_tokens
                yield Piece(text, finish, prompt, event.cached_tokens, event.new_tokens)
                if stopped:
                    events.close()  # the session holds what was generated: still a valid prefix
                    return
        finally:
            session.on_prefill = None
            self.pool.put(session)
