"""A conversation's state on the PyTorch backend: the caches, the tokens they hold, the pending
next-token logits, and the generation loop with sampling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import torch

from ..base import CacheMemory, GenerationConfig, TokenEvent

PREFILL_CHUNK = 512  # bounds attention's transient memory on long prompts


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator) -> int:
    """logits (V,) -> token id: greedy at temperature 0, else temperature + nucleus (top-p)."""
    if cfg.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchSession:
    def __init__(self, model):
        self.model = model
        self.module = model.module
        self.spec = model.spec
        self.caches = self.module.new_caches()
        self.tokens: list[int] = []
        self._next_logits: torch.Tensor | None = None  # (V,) after the last token held
        self._prefilled = (0, 0, 0.0)  # (tokens fed, tokens reused, seconds) of the last prefill

    def _forward(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.model.device)
        hidden = self.module(ids, self.caches)
        self.tokens.extend(tokens)
        logits = self.module.logits(hidden[0] if all_logits else hidden[0, -1:])
        self._next_logits = logits[-1]
        return logits

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> None:
        reused = len(self.tokens)
        start = time.perf_counter()
        for i in range(0, len(tokens), PREFILL_CHUNK):
            self._forward(tokens[i : i + PREFILL_CHUNK])
        self._prefilled = (len(tokens), reused, time.perf_counter() - start)

    @torch.inference_mode()
    def logprobs(self, tokens: list[int]) -> list[float]:
        """log p(token_i | everything before it) for each token, extending the cache with them."""
        assert self._next_logits is not None, "logprobs needs at least one token already held"
        previous = self._next_logits[None]
        logits = torch.cat([previous, self._forward(tokens, all_logits=True)[:-1]])
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()

    def trim(self, n_keep: int) -> None:
        for cache in self.caches:
            cache.trim(n_keep)
        del self.tokens[n_keep:]
        self._next_logits = None

    def memory(self) -> CacheMemory:
        n = len(self.tokens)
        return CacheMemory(
            tokens=n,
            cache_bytes=sum(c.nbytes for c in self.caches),
            fp16_kv_bytes=self.spec.fp16_kv_bytes(n),
            reserved_bytes=sum(c.reserved_bytes for c in self.caches),
        )

    @torch.inference_mode()
    def generate(
        self, cfg: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        assert self._next_logits is not None, "prefill before generate"
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
        fed, reused, prefill_s = self._prefilled
        prefill_tok_s = fed / prefill_s if prefill_s > 0 else 0.0
        first = time.perf_counter()
        n = 0
        while True:
            token = sample(self._next_logits, cfg, generator)
            n += 1
            if token in cfg.stop_tokens:
                finish = "stop"
            elif cancel is not None and cancel.is_set():
                finish = "cancelled"
            elif n >= cfg.max_tokens:
                finish = "length"
            elif len(self.tokens) + 1 >= self.spec.max_context:
                finish = "context"
            else:
                finish = None
            elapsed = time.perf_counter() - first
            mem = self.memory()
            yield TokenEvent(
                token=token,
                text="",
                prompt_tokens=fed,
                cached_tokens=reused,
                new_tokens=n,
                prefill_tok_s=prefill_tok_s,
                decode_tok_s=(n - 1) / elapsed if n > 1 else 0.0,
                cache_bytes=mem.cache_bytes,
                fp16_kv_bytes=mem.fp16_kv_bytes,
                finish_reason=finish,
            )
            if finish:
                return
            self._forward([token])
