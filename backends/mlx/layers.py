"""The MLX backend's building blocks (mirror of backends/cuda/layers.py): Linear and Embedding
held (in, out), RMSNorm, RoPE (a drafter's tree's too) and the attention masks of
sliding-window layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from xqchat.models.spec import RopeSpec


class Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((d_in, d_out))  # (in, out): see the module docstring
        if bias:
            self.bias = mx.zeros((d_out,))

    def __call__(self, x):
        y = x @ self.weight
        return y + self.bias if "bias" in self else y

    def dense_weight(self) -> mx.array:  # (in, out), as Int8Linear's
        return self.weight


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = mx.zeros((dim, vocab_size))  # transposed: the tied head's (in, out)

    def __call__(self, tokens):
        return self.weight.T[tokens]

    def as_linear(self, x):
        return x @ self.weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Rope(nn.Module):
    """Rotate-half RoPE at absolute positions; the frequencies come from the spec (llama3 scaling,
    GGUF rope_freqs) and go to mx.fast.rope as periods. LongRoPE's (`rope.long()`) is `at` a
    row from which its long factors rotate (see DecodingSession)."""

    def __init__(self, rope: RopeSpec, head_dim: int):
        super().__init__()
        self.dims = head_dim
        inv_freq = rope.inv_freq(head_dim)
        with np.errstate(divide="ignore"):  # frequency 0 (no rotation): an infinite period
            self._periods = mx.array(1.0 / inv_freq, dtype=mx.float32)
        self._inv_freq = mx.array(inv_freq, dtype=mx.float32)
        long = rope.long()
        # a plain attribute, not a child module (its arrays are not weights)
        object.__setattr__(self, "long", None if long is None else Rope(long, head_dim))

    @property
    def inv_freq(self) -> mx.array:  # (D/2,): the angle of position p is p * inv_freq
        return self._inv_freq

    def at(self, long_from: int | None):
        """This RoPE for a forward whose rows from `long_from` on take the long factors."""
        return self if long_from is None or self.long is None else SwitchedRope(self, long_from)

    def freqs_for(self, start: int, stop: int) -> mx.array | None:
        """The inverse frequencies of rows start..stop, None where they differ among them."""
        return self._inv_freq

    def periods_at(self, positions: mx.array) -> mx.array:  # (T, D/2) for rows at positions
        return mx.broadcast_to(self._periods, (positions.shape[0], self._periods.shape[0]))

    def __call__(self, x, offset: int):  # x: (B, H, T, D)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )


class SwitchedRope:
    """A LongRoPE layer's RoPE in a forward: rows before `long_from` rotate with the short
    factors, the rest with the long ones. Caches call it as they call Rope."""

    def __init__(self, rope: Rope, long_from: int):
        self.short, self.long, self.long_from = rope, rope.long, long_from

    def __call__(self, x, offset: int):  # x: (B, H, T, D), rows offset .. offset + T
        split = max(0, min(self.long_from - offset, x.shape[2]))
        if split == x.shape[2]:
            return self.short(x, offset)
        if split == 0:
            return self.long(x, offset)
        short = self.short(x[:, :, :split], offset)
        return mx.concatenate([short, self.long(x[:, :, split:], offset + split)], axis=2)

    def freqs_for(self, start: int, stop: int) -> mx.array | None:
        if stop <= self.long_from:
            return self.short.inv_freq
        return self.long.inv_freq if start >= self.long_from else None

    def periods_at(self, positions: mx.array) -> mx.array:
        long = (positions >= self.long_from)[:, None]
        return mx.where(long, self.long._periods[None], self.short._periods[None])


class TreeRope:
    """RoPE for a drafter's tree: cache rows from `start` on are at `positions` (start + depth),
    the rows before at their index. Caches call it as they call Rope, with a row offset."""

    def __init__(self, rope: Rope, start: int, positions: mx.array):
        self.rope, self.start = rope, start
        self.positions = positions.astype(mx.float32)

    def __call__(self, x, offset: int):  # x: (B, H, T, D), rows offset .. offset + T
        split = max(0, min(self.start - offset, x.shape[2]))
        parts = [self.rope(x[:, :, :split], offset)] if split else []
        if split < x.shape[2]:
            first = offset + split - self.start
            positions = self.positions[first : first + x.shape[2] - split]
            parts.append(self._rotate(x[:, :, split:], positions))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    def _rotate(self, x, positions):  # rotate-half RoPE at explicit positions
        angles = positions[:, None] / self.rope.periods_at(positions)  # (T, D/2)
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def window_mask(mask, start: int, end: int, window: int, positions=None) -> mx.array:
    """`mask` (new rows x end columns, bool; "causal" or None: new rows see everything before
    them) narrowed to a sliding window: the row at position p sees positions p - window + 1 .. p.
    `positions`: the new rows' positions (a drafter's tree), else start .. end - 1. The cache's
    row i is at position i (a tree's rows past `start` are at its own positions)."""
    rows = mx.arange(start, end) if positions is None else positions
    columns = mx.arange(end)
    if positions is not None:
        columns = mx.concatenate([columns[:start], positions])
    near = columns[None, :] > rows[:, None] - window
    if mask is None or isinstance(mask, str):
        mask = columns[None, :] <= rows[:, None]
    return mask & near
