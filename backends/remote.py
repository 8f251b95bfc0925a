"""A model behind any OpenAI-compatible server (vLLM, llama-server, Ollama, LM Studio,
`xqchat serve`), driven as the front ends drive a local one: a conversation sends its messages
and streams the reply as TokenEvents. Speed is measured here, on the client; what the server's
engine holds (cache, weights, context) it does not say, so nothing is claimed about it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

from xqchat.models.errors import XQError
from xqchat.models.registry import DEFAULT_MODEL

from .base import GenerationConfig, TokenEvent
from .chat import Conversation

TIMEOUT_S = 600.0  # a long prompt on a slow server takes a while to its first token
CONNECT_TIMEOUT_S = 10.0


class RemoteError(XQError):
    """The server could not be reached, or refused: one line saying which and why."""


def api_url(url: str) -> str:
    """The API's base URL: a bare server address (http://host:8000) means its /v1."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"--url {url}: give the server's address, e.g. http://127.0.0.1:8000/v1")
    return url.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")


def failure(url: str, error: openai.OpenAIError) -> RemoteError:
    """One line for what went wrong talking to the server."""
    if isinstance(error, openai.APITimeoutError):
        return RemoteError(f"{url} did not answer in time")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return RemoteError(f"cannot reach {url}: {cause}".rstrip(": "))
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or str(error)
        return RemoteError(f"{url} answered {error.status_code}: {message}")
    return RemoteError(f"{url}: {error}")


@dataclass(frozen=True)
class RemoteSpec:
    max_context: int = 0  # not told by the OpenAI API: 0 = unknown
    notes: tuple[str, ...] = ()


class RemoteModel:
    """The server at `url` and one of its models: `model`, or its first one when `model` is the
    local default (a server rarely has that)."""

    backend, dtype, drafter, notes = "openai", "", None, ()
    spec = RemoteSpec()

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        self.url = api_url(url)
        self.device = urlsplit(self.url).netloc
        timeout = openai.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        # Servers without keys take any; the client refuses to start without one
        key = api_key or "none"
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)
        try:
            names = [m.id for m in self.client.models.list()]
        except openai.OpenAIError as e:
            raise failure(self.url, e) from None
        if not names:
            raise RemoteError(f"{self.url} serves no model")
        if model in (None, "default", DEFAULT_MODEL) and model not in names:
            model = names[0]
        if model not in names:
            raise RemoteError(f"{self.url} has no model '{model}' (it has {', '.join(names)})")
        self.name = model

    def conversation(self, messages: list[dict] | None = None) -> RemoteChat:
        return RemoteChat(self, messages)


class RemoteChat(Conversation):
    """One conversation with a remote model: each turn sends the whole message list (servers keep
    no state; the good ones reuse their cache of the common prefix)."""

    def __init__(self, model: RemoteModel, messages: list[dict] | None = None):
        self.model = model
        self.messages: list[dict] = list(messages or [])
        self.notices: list[str] = []

    def reply(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        if not self.messages or self.messages[-1]["role"] != "user":
            raise XQError("there is no user message to answer")
        model = self.model
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p}
        if cfg.seed is not None:
            sampling["seed"] = cfg.seed
        text, n, first, finish, usage = "", 0, None, None, None
        try:
            stream = model.client.chat.completions.create(
                model=model.name,
                messages=[{"role": m["role"], "content": m["content"]} for m in self.messages],
                max_tokens=cfg.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                **sampling,
            )
            with stream:
                for chunk in stream:
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
                    usage = chunk.usage or usage
                    if not chunk.choices:
                        continue
                    finish = chunk.choices[0].finish_reason or finish
                    piece = chunk.choices[0].delta.content
                    if piece:
                        n += 1  # a chunk per token, as servers stream (usage corrects it)
                        first = first or time.perf_counter()
                        text += piece
                        yield self._event(piece, n, first, usage)
        except openai.OpenAIError as e:
            raise failure(model.url, e) from None
        if usage is not None and finish != "cancelled":
            n = usage.completion_tokens
        finish = {"length": "length", "cancelled": "cancelled"}.get(finish, "stop")
        yield self._event("", n, first, usage, finish)
        reply = {"role": "assistant", "content": text}
        if finish == "cancelled":
            reply["cancelled"] = True
        self.messages.append(reply)

    @staticmethod
    def _event(text: str, n: int, first: float | None, usage, finish: str | None = None):
        elapsed = time.perf_counter() - first if first else 0.0
        cached = 0
        if usage is not None and usage.prompt_tokens_details is not None:
            cached = usage.prompt_tokens_details.cached_tokens or 0
        return TokenEvent(
            token=-1,  # the server sends text, not token ids
            text=text,
            prompt_tokens=usage.prompt_tokens - cached if usage else 0,
            cached_tokens=cached,
            new_tokens=n,
            prefill_tok_s=0.0,
            decode_tok_s=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            cache_bytes=0,
            fp16_kv_bytes=0,
            finish_reason=finish,
        )
