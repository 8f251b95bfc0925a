"""A sliding-window layer's exact K/V cache, holding only its window (MLX; the mirror of
backends/cuda/window.py, which explains the ring, the pending rows of a drafter's tree and how
far a trim can go back)."""

from __future__ import annotations

import mlx.core as mx

from ..window import WindowRows
from .cache import KVCache, attention
from .layers import TreeRope


class WindowKVCache(WindowRows, KVCache):
    def __init__(self, window: int, n_kv_heads: int, head_dim: int, dtype):
        super().__init__(n_kv_heads, head_dim, window, dtype)
        self.window = window
        self.first = 0  # the oldest position in the ring
        self.committed = 0  # positions before it are in the ring; pending rows follow
        self.pending = None  # a tree's (keys, values), (1, H, n, D), not yet in the ring

    def _slots(self, start: int, end: int) -> mx.array:
        return mx.arange(start, end) % self.window

    def _ordered(self):
        """The ring's rows in position order (first .. committed), then the pending rows."""
        slots = self._slots(self.first, self.committed)
        keys, values = self.keys[:, :, slots], self.values[:, :, slots]
        if self.pending is not None:
            keys = mx.concatenate([keys, self.pending[0]], axis=2)
            values = mx.concatenate([values, self.pending[1]], axis=2)
        return keys, values

    def _commit(self, keys, values, end: int) -> None:
        """Write the newest rows of `keys`, `values` (positions .. end - 1) into the ring."""
        if self.keys.shape[2] < self.window:  # the ring, allocated at its first rows
            b, h, _, d = self.shape
            self.keys = mx.zeros((b, h, self.window, d), dtype=self.dtype)
            self.values = mx.zeros_like(self.keys)
        n = min(self.window, keys.shape[2])
        slots = self._slots(end - n, end)
        self.keys[:, :, slots] = keys[:, :, -n:].astype(self.dtype)
        self.values[:, :, slots] = values[:, :, -n:].astype(self.dtype)
        self.first, self.committed, self.offset = max(0, end - self.window), end, end
        self.pending = None

    def attend(self, layer, x, q, rope, mask):
        if self.pending is not None:  # a tree kept its path: it joins the ring now
            self._commit(*self.pending, self.offset)
        k, v = layer.keys_values(x)
        start, end = self.offset, self.offset + k.shape[2]
        q, k = rope(q, start), rope(k, start)
        if k.shape[2] == 1:  # decode: the new row replaces the one leaving the window
            self._commit(k, v, end)
            held = min(end, self.window)
            return attention(q, self.keys[:, :, :held], self.values[:, :, :held], None)
        old_keys, old_values = self._ordered()
        keys, values = (
            mx.concatenate([old_keys, k], axis=2),
            mx.concatenate([old_values, v], axis=2),
        )
        if not isinstance(mask, str) and mask is not None:
            mask = mask[:, self.first :]
        if isinstance(rope, TreeRope):
            cut = self.committed - self.first
            self.pending, self.offset = (keys[:, :, cut:], values[:, :, cut:]), end
        else:
            self._commit(keys, values, end)
        return attention(q, keys, values, mask)

    def keep(self, start: int, rows: list[int]) -> None:
        if self.pending is None:  # a one-token tree went in as a decode step
            self.offset = start + len(rows)
            return
        index = mx.array(rows) + start - self.committed
        self.pending = (self.pending[0][:, :, index], self.pending[1][:, :, index])
        self.offset = start + len(rows)

    def state_dict(self) -> dict:
        keys, values = self._ordered()
        return {"keys": keys, "values": values, "first": mx.array([self.first])}

    def load_state_dict(self, state: dict) -> None:
        first = int(state["first"][0])
        self.keys = self.values = mx.zeros(self.shape, dtype=self.dtype)
        self._commit(state["keys"], state["values"], first + state["keys"].shape[2])

    @property
    def nbytes(self) -> int:
        rows = self.offset - self.first
        return 2 * rows * self.shape[1] * self.shape[3] * self.keys.itemsize
