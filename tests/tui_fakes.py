"""A scripted engine for TUI tests: the real tokenizer and ChatSession logic (templates, prefix
reuse, context policies) over a fake model whose replies are fixed text and whose stats are
fixed numbers, so tests and snapshots are exact."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xqchat.backends.base import CacheMemory, CacheSpec, GenerationConfig, TokenEvent
from xqchat.backends.decoding import PREFILL_CHUNK
from xqchat.models.errors import XQError

CACHE_BYTES_PER_TOKEN, FP16_BYTES_PER_TOKEN = 1024, 4096  # "4.0× smaller than fp16 KV"


@dataclass(frozen=True)
class FakeSpec:
    max_context: int
    notes: tuple[str, ...] = ()
    dim: int = 576  # the default model's widths: a GQA model, so xquant caches SVD latents
    kv_dim: int = 192


class FakeModel:
    backend, device, dtype, notes = "fake", "cpu", "fp32", ()

    def __init__(
        self,
        tokenizer,
        replies: list[str],
        max_context: int = 4096,
        hold_after: int | None = None,
        seconds_per_token: float = 0.0,
        pause_at: tuple[str, ...] = (),
        drafter: object | None = None,
    ):
        self.tokenizer = tokenizer
        self.replies = list(replies)  # one per turn, the last repeats
        self.spec = FakeSpec(max_context)
        self.cache = CacheSpec()
        self.drafter = drafter
        self.hold_after = hold_after  # after this many tokens, wait until cancelled or released
        self.seconds_per_token = seconds_per_token
        self.turns = 0
        self.prefills: list[int] = []  # tokens prefilled, per turn
        self.prompts: list[list[int]] = []  # what the cache held when each reply began
        self.configs: list[GenerationConfig] = []  # how each reply was asked to sample
        self.held = threading.Event()  # set when a reply is holding
        self.release = threading.Event()  # ends a hold, as a cancel does, but the reply goes on
        # Stages at which the engine thread stops until `resume` is set ("session": a new
        # session, as xquant's factors take a while; "prefill": a prefill of more than one chunk,
        # once it has read the first and said so), so a test can look at the screen mid-way.
        # `paused` says which stage is waiting.
        self.pause_at = set(pause_at)
        self.paused: str | None = None
        self.resume = threading.Event()

    def wait(self, stage: str) -> None:
        if stage in self.pause_at:
            self.paused = stage
            assert self.resume.wait(timeout=30), f"the test never resumed the {stage} stage"
            self.resume.clear()
            self.paused = None

    def new_session(self, cache: CacheSpec | None = None) -> FakeSession:
        self.wait("session")
        return FakeSession(self)

    def next_reply(self) -> str:
        text = self.replies[min(self.turns, len(self.replies) - 1)]
        self.turns += 1
        return text


class FakeSession:
    def __init__(self, model: FakeModel):
        self.model = model
        self.tokens: list[int] = []
        self.on_prefill = None  # as DecodingSession's: (tokens done, tokens to do)

    def prefill(self, tokens: list[int]) -> None:
        """In chunks, telling `on_prefill` before each and at the end, as the real one does."""
        self.model.prefills.append(len(tokens))
        for i in range(0, len(tokens), PREFILL_CHUNK):
            if self.on_prefill is not None:
                self.on_prefill(i, len(tokens))
            if i == PREFILL_CHUNK:  # one chunk read, and said so
                self.model.wait("prefill")
            self.tokens += tokens[i : i + PREFILL_CHUNK]
        if self.on_prefill is not None:
            self.on_prefill(len(tokens), len(tokens))

    def trim(self, n_keep: int) -> None:
        del self.tokens[n_keep:]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens}))

    def load(self, path) -> None:
        """Like the real one: a missing or damaged file is refused and changes nothing."""
        try:
            tokens = json.loads(Path(path).read_text())["tokens"]
        except FileNotFoundError:
            raise XQError(f"no saved cache at {path}") from None
        except (ValueError, KeyError, TypeError):
            raise XQError(f"{path} is not a readable xqchat cache (damaged or truncated)") from None
        self.tokens = list(tokens)

    def memory(self) -> CacheMemory:
        n = len(self.tokens)
        return CacheMemory(n, n * CACHE_BYTES_PER_TOKEN, 0, 0, n * FP16_BYTES_PER_TOKEN, 0)

    def generate(self, cfg: GenerationConfig, cancel: threading.Event | None = None):
        model = self.model
        model.prompts.append(list(self.tokens))
        model.configs.append(cfg)
        fed = model.prefills[-1]
        text = model.next_reply()
        ids = model.tokenizer.encode(text) + [min(model.tokenizer.stop_tokens)]
        for n, token in enumerate(ids, 1):
            if model.hold_after is not None and n == model.hold_after + 1:
                model.held.set()
                deadline = time.monotonic() + 30
                while not (cancel.is_set() or model.release.is_set()):
                    assert time.monotonic() < deadline, "the test never ended the hold"
                    time.sleep(0.01)
            time.sleep(model.seconds_per_token)
            if token in cfg.stop_tokens:
                finish = "stop"
            elif cancel is not None and cancel.is_set():
                finish = "cancelled"
            elif n >= cfg.max_tokens:
                finish = "length"
            elif len(self.tokens) + 1 >= model.spec.max_context:
                finish = "context"
            else:
                finish = None
            mem = self.memory()
            yield TokenEvent(
                token=token,
                text="",
                prompt_tokens=fed,
                cached_tokens=len(self.tokens) - fed - (n - 1),
                new_tokens=n,
                prefill_tok_s=500.0,
                decode_tok_s=42.0,
                cache_bytes=mem.cache_bytes,
                fp16_kv_bytes=mem.fp16_kv_bytes,
                finish_reason=finish,
            )
            if finish:
                return
            self.tokens.append(token)


def loader(model: FakeModel):
    """A loader for XQChatApp that hands over the fake model."""

    def load(settings, progress):
        progress("loading fake-model …")
        return "fake-model", model.tokenizer, model

    return load


def app_with(tokenizer, replies=("Hello there!",), overrides=None, **model_kw):
    """The TUI over a FakeModel (and the model, to look at what it was fed)."""
    from xqchat.app.tui.app import XQChatApp

    model = FakeModel(tokenizer, list(replies), **model_kw)
    return XQChatApp(overrides, loader=loader(model)), model


async def settle(pilot) -> None:
    """Let every worker (model loading, a reply) finish."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def send(pilot, text: str) -> None:
    """Type a message, send it, wait for the reply."""
    from xqchat.app.tui.widgets import PromptInput

    pilot.app.screen.query_one(PromptInput).text = text
    await pilot.press("enter")
    await settle(pilot)
