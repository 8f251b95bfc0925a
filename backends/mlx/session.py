"""A conversation's state on the MLX backend: the tensor work behind DecodingSession. Every public
method runs on the engine thread (see backends/engine_thread.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..base import GenerationConfig
from ..decoding import DecodingSession
from ..engine_thread import EngineThread

ENGINE = EngineThread("xqchat-mlx")


def sample(logits: mx.array, cfg: GenerationConfig, key) -> tuple[int, mx.array]:
    """logits (V,) -> (token id, next key): greedy at temperature 0, else temperature + top-p."""
    if cfg.temperature <= 0:
        return int(mx.argmax(logits)), key
    key, subkey = mx.random.split(key)
    logp = logits.astype(mx.float32) / cfg.temperature
    if cfg.top_p < 1.0:
        probs = mx.softmax(logp)
        order = mx.argsort(-probs)
        sorted_probs = probs[order]
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = mx.cumsum(sorted_probs) - sorted_probs >= cfg.top_p
        choice = mx.random.categorical(mx.where(outside, -mx.inf, mx.log(sorted_probs)), key=subkey)
        return int(order[choice]), key
    return int(mx.random.categorical(logp, key=subkey)), key


class EngineSession(DecodingSession):
    def __init__(self, model, cache=None):
        ENGINE.call(super().__init__, model, cache)

    def _new_caches(self):
        return self.model.module.new_caches(self.cache)

    def _forward(self, tokens: list[int], all_logits: bool = False) -> mx.array:
        module, start = self.model.module, len(self.tokens)
        long_from = self._long_rows(start, start + len(tokens) - 1)
        hidden = module(mx.array([tokens]), self.caches, None, long_from)
        self.tokens.extend(tokens)
        logits = module.logits(hidden[0] if all_logits else hidden[0, -1:])
        self._next_logits, self._next_hidden = logits[-1], hidden[0, -1]
        mx.eval(logits, hidden, [c.state_dict() for c in self.caches])  # keep graphs small
        return logits

    def _verify(self, tree, start: int):
        module = self.model.module
        tree_args = (mx.array(tree.depths + start), mx.array(tree.mask()))
        long_from = self._long_rows(start, start + int(tree.depths.max()), tree=True)
        hidden = module(mx.array(tree.tokens)[None], self.caches, tree_args, long_from)[0]
        logits = module.logits(hidden)
        mx.eval(logits, hidden)
        return logits, hidden

    def _speculative_step(self, token, cfg, rng) -> list[int]:
        decided = super()._speculative_step(token, cfg, rng)
        mx.eval([c.state_dict() for c in self.caches])
        return decided

    def _argmax(self, logits) -> np.ndarray:
        return np.array(mx.argmax(logits, axis=-1))

    def _numpy(self, logits) -> np.ndarray:
        return np.array(logits.astype(mx.float32))

    def _sample(self, cfg: GenerationConfig, rng) -> int:
        token, rng[0] = sample(self._next_logits, cfg, rng[0])
        return token

    def _rng(self, seed: int | None):
        return [mx.random.key(seed if seed is not None else np.random.randint(2**31))]

    def _write(self, path, arrays, metadata):
        mx.save_safetensors(str(path), arrays, metadata=metadata)

    def _read(self, path):
        if not path.is_file():
            raise FileNotFoundError(path)
        return mx.load(str(path), format="safetensors", return_metadata=True)

    def _bytes(self, array) -> bytes:
        return np.array(array.view(mx.uint8)).tobytes()

    def _logits(self, tokens: list[int]) -> np.ndarray:
        return np.array(self._forward(tokens, all_logits=True).astype(mx.float32))

    def _logprobs(self, tokens: list[int]) -> list[float]:
        assert self._next_logits is not None, "logprobs needs at least one token already held"
        previous = self._next_logits[None]
        logits = mx.concatenate([previous, self._forward(tokens, all_logits=True)[:-1]])
        logp = logits.astype(mx.float32) - mx.logsumexp(
            logits.astype(mx.float32), axis=-1, keepdims=True
        )
        return logp[mx.arange(len(tokens)), mx.array(tokens)].tolist()

    # the public contract, on the engine thread
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens; the next-token logits after each of them, (T, V) float32."""
        return ENGINE.call(self._logits, tokens)

    def logprobs(self, tokens: list[int]) -> list[float]:
        """log p(token_i | everything before it) for each token, extending the cache with them."""
        return ENGINE.call(self._logprobs, tokens)

    def prefill(self, tokens: list[int]) -> None:
        ENGINE.call(super().prefill, tokens)

    def generate(self, cfg, cancel=None):
        return ENGINE.iterate(super().generate(cfg, cancel))

    def trim(self, n_keep: int) -> None:
        ENGINE.call(super().trim, n_keep)

    def save(self, path) -> None:
        ENGINE.call(super().save, path)

    def load(self, path) -> None:
        ENGINE.call(super().load, path)
