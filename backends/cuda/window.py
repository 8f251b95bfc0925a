"""A sliding-window layer's exact K/V cache, holding only its window (PyTorch; mirrored in
backends/mlx/window.py). A token at position p sees positions p - window + 1 .. p, so the cache
keeps the newest `window` rows in a ring (position p in slot p % window): a decode step writes
its row over the one that just left the window and attends to the whole ring. A prompt's chunk
or a drafter's tree attends to the ring in position order plus its own rows, under the mask
narrowed to the window; a chunk's newest rows then go into the ring, a tree's wait (`pending`)
until the next forward, since `keep` and `_rewind` still choose among them and the rows before.

Trimming back is exact while the rows the next token needs are still held (`can_trim`: up to one
token back from a full ring); the session keeps checkpoints of these caches to go further
(DecodingSession.trim)."""

from __future__ import annotations

import torch

from ..window import WindowRows
from . import cpu_kernels
from .cache import KVCache, attention, rotate


class WindowKVCache(WindowRows, KVCache):
    def __init__(self, window: int, n_kv_heads: int, head_dim: int, dtype, device, scratch):
        super().__init__(n_kv_heads, head_dim, window, dtype, device, scratch)
        self.window = window
        self.first = 0  # the oldest position in the ring
        self.committed = 0  # positions before it are in the ring; pending rows follow
        self.pending = None  # a tree's (keys, values), (1, H, n, D), not yet in the ring

    def _slots(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device) % self.window

    def _ordered(self):
        """The ring's rows in position order (first .. committed), then the pending rows."""
        slots = self._slots(self.first, self.committed)
        keys, values = self.keys[:, :, slots], self.values[:, :, slots]
        if self.pending is not None:
            keys = torch.cat([keys, self.pending[0]], dim=2)
            values = torch.cat([values, self.pending[1]], dim=2)
        return keys, values

    def _commit(self, keys, values, end: int) -> None:
        """Write the newest rows of `keys`, `values` (positions .. end - 1) into the ring."""
        if self.keys.shape[2] < self.window:  # the ring, allocated at its first rows
            b, h, _, d = self.shape
            self.keys = torch.empty(b, h, self.window, d, dtype=self.dtype, device=self.device)
            self.values = torch.empty_like(self.keys)
        n = min(self.window, keys.shape[2])
        slots = self._slots(end - n, end)
        self.keys[:, :, slots] = keys[:, :, -n:].to(self.dtype)
        self.values[:, :, slots] = values[:, :, -n:].to(self.dtype)
        self.first, self.committed, self.offset = max(0, end - self.window), end, end
        self.pending = None

    def attend(self, layer, x, q, cos, sin, mask, step):
        if self.pending is not None:  # a tree kept its path: it joins the ring now
            self._commit(*self.pending, self.offset)
        k, v = layer.keys_values(x)
        start, end = self.offset, self.offset + k.shape[2]
        q, k = rotate(q, cos[start:end], sin[start:end]), rotate(k, cos[start:end], sin[start:end])
        tree = step and k.shape[2] > 1
        if k.shape[2] == 1 and not tree:  # decode: the new row replaces the one leaving the window
            self._commit(k, v, end)
            held = min(end, self.window)
            if self.one_pass(q, None, start):
                return cpu_kernels.attend_bf16(q, self.keys, self.values, held, None)
            keys, values = self.keys[:, :, :held], self.values[:, :, :held]
            mask = None
        else:
            old_keys, old_values = self._ordered()
            keys, values = torch.cat([old_keys, k], dim=2), torch.cat([old_values, v], dim=2)
            mask = None if mask is None else mask[:, self.first :]
            if tree:
                self.pending, self.offset = (keys[:, :, self.committed - self.first :],
                                             values[:, :, self.committed - self.first :]), end  # fmt: skip
            else:
                self._commit(keys, values, end)
        if keys.dtype != q.dtype:  # attention runs in the activation dtype (fp32 on CPU)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return attention(q, keys, values, mask)

    def keep(self, start: int, rows: list[int]) -> None:
        if self.pending is None:  # a one-token tree went in as a decode step
            self.offset = start + len(rows)
            return
        index = torch.tensor(rows, device=self.device) + start - self.committed
        self.pending = (self.pending[0][:, :, index], self.pending[1][:, :, index])
        self.offset = start + len(rows)

    def state_dict(self) -> dict:
        keys, values = self._ordered()
        first = torch.tensor([self.first], dtype=torch.int64)
        return {"keys": keys.clone(), "values": values.clone(), "first": first}

    def load_state_dict(self, state: dict) -> None:
        first = int(state["first"][0])
        self.keys = self.values = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._commit(state["keys"], state["values"], first + state["keys"].shape[2])

    @property
    def nbytes(self) -> int:
        rows = self.offset - self.first
        return 2 * rows * self.shape[1] * self.shape[3] * self.keys.element_size()
