"""A conversation's state on the PyTorch backend: the tensor work behind DecodingSession."""

from __future__ import annotations

import numpy as np
import torch

from ..base import GenerationConfig
from ..decoding import DecodingSession


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


class EngineSession(DecodingSession):
    def _new_caches(self):
        return self.model.module.new_caches(self.cache)

    @torch.inference_mode()
    def _forward(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        module, start = self.model.module, len(self.tokens)
        long_from = self._long_rows(start, start + len(tokens) - 1)
        hidden = module(
            torch.tensor([tokens], device=self.model.device), self.caches, None, long_from
        )
        self.tokens.extend(tokens)
        logits = module.logits(hidden[0] if all_logits else hidden[0, -1:])
        self._next_logits, self._next_hidden = logits[-1], hidden[0, -1]
        return logits

    @torch.inference_mode()  # a trim may rebuild rows in the caches' reused (inference) buffers
    def trim(self, n_keep: int) -> None:
        super().trim(n_keep)

    @torch.inference_mode()
    def _speculative_step(self, token, cfg, rng) -> list[int]:
        return super()._speculative_step(token, cfg, rng)  # caches are written in place

    @torch.inference_mode()
    def _rewind(self, i: int) -> None:
        super()._rewind(i)

    @torch.inference_mode()
    def _verify(self, tree, start: int):
        device = self.model.device
        positions = torch.from_numpy(tree.depths).to(device) + start
        mask = torch.from_numpy(tree.mask()).to(device)
        tokens = torch.from_numpy(tree.tokens).to(device)[None]
        long_from = self._long_rows(start, start + int(tree.depths.max()), tree=True)
        hidden = self.model.module(tokens, self.caches, (positions, mask), long_from)[0]
        return self.model.module.logits(hidden), hidden

    def _argmax(self, logits) -> np.ndarray:
        return logits.argmax(-1).cpu().numpy()

    def _numpy(self, logits) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _sample(self, cfg: GenerationConfig, rng) -> int:
        return sample(self._next_logits, cfg, rng)

    def _rng(self, seed: int | None):
        return None if seed is None else torch.Generator(self.model.device).manual_seed(seed)

    def _write(self, path, arrays, metadata):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in arrays.items()}, path, metadata=metadata)

    def _read(self, path):
        from safetensors import safe_open

        with safe_open(path, "pt", device=str(self.model.device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118

    def _bytes(self, array) -> bytes:
        return array.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens; the next-token logits after each of them, (T, V) float32."""
        return self._forward(tokens, all_logits=True).float().cpu().numpy()

    @torch.inference_mode()
    def logprobs(self, tokens: list[int]) -> list[float]:
        """log p(token_i | everything before it) for each token, extending the cache with them."""
        assert self._next_logits is not None, "logprobs needs at least one token already held"
        previous = self._next_logits[None]
        logits = torch.cat([previous, self._forward(tokens, all_logits=True)[:-1]])
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
