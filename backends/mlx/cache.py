"""Per-layer attention caches for the MLX backend (mirror of backends/cuda/cache.py)."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Exact K and V in the weights' dtype. Storage grows in steps and is written by slice, so a
    decode step allocates nothing; `trim` only moves the offset."""

    kind = "kv"
    step = 256

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, dtype):
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.max_len, self.dtype = max_len, dtype
        self.keys = self.values = mx.zeros(self.shape, dtype=dtype)
        self.offset = 0

    def _reserve(self, length: int) -> None:
        capacity = min(self.max_len, max(length, 2 * self.keys.shape[2], self.step))
        capacity = max(capacity, length)
        b, h, _, d = self.shape
        keys = mx.zeros((b, h, capacity, d), dtype=self.dtype)
        values = mx.zeros_like(keys)
        keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
        values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = keys, values

    def update_and_fetch(self, k: mx.array, v: mx.array):
        """Append k, v (B, H, T, D); return all cached K, V up to and including them."""
        end = self.offset + k.shape[2]
        if end > self.keys.shape[2]:
            self._reserve(end)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def trim(self, n_keep: int) -> None:
        self.offset = min(self.offset, n_keep)

    @property
    def state(self) -> list[mx.array]:
        return [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 2 * self.offset * self.keys.shape[1] * self.keys.shape[3] * self.keys.itemsize

    @property
    def reserved_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
