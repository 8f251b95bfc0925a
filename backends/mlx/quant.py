"""Asymmetric group quantization with bit-packed codes, in MLX (mirror of backends/cuda/quant.py).
Every `group` consecutive values along the last axis share an fp16 scale and zero point:
x ~ code * scale + zero. The codes are the PyTorch backend's (min/max per group, at 2 bits
narrowed where that rebuilds the group more closely; round half to even), packed as a
little-endian bit stream into uint32 words: exactly MLX's affine layout, so mx.dequantize and
mx.quantized_matmul read them, and the same bytes as the PyTorch packing."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..quant import clip_ratios


@dataclass
class Quantized:
    codes: mx.array  # uint32 (..., n * bits / 32), packed
    scale: mx.array  # fp16 (..., n / group)
    zero: mx.array  # fp16 (..., n / group)
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def pack(codes: mx.array, bits: int) -> mx.array:
    """uint32 codes (..., n) each < 2**bits -> uint32 words (..., n * bits / 32)."""
    stream = (codes[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1  # (..., n, bits)
    stream = stream.reshape(*codes.shape[:-1], -1, 32)
    return (stream << mx.arange(32, dtype=mx.uint32)).sum(-1).astype(mx.uint32)


def unpack(words: mx.array, bits: int) -> mx.array:
    """The inverse of `pack`: uint32 codes (..., n)."""
    stream = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1  # (..., words, 32)
    stream = stream.reshape(*words.shape[:-1], -1, bits)
    return (stream << mx.arange(bits, dtype=mx.uint32)).sum(-1).astype(mx.uint32)


def quantize(x: mx.array, bits: int, group: int) -> Quantized:
    """x (..., n) with n a multiple of `group` -> packed codes and fp16 scales/zeros; each
    group's range is its min/max narrowed by the ratio of `clip_ratios` (as in the PyTorch
    backend) that rebuilds it with the least squared error."""
    g = x.astype(mx.float32).reshape(*x.shape[:-1], -1, group)
    low, high = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    ratios, levels, best = clip_ratios(bits), (1 << bits) - 1, None
    for ratio in ratios:
        low_r = low + (1 - ratio) * (high - low) / 2
        high_r = high - (1 - ratio) * (high - low) / 2
        # codes are computed against the fp16-rounded parameters, so dequantising is consistent
        scale = mx.maximum((high_r - low_r) / levels, 1e-8).astype(mx.float16)
        zero = low_r.astype(mx.float16)
        codes = mx.clip(
            mx.round((g - zero.astype(mx.float32)) / scale.astype(mx.float32)), 0, levels
        )
        if len(ratios) == 1:  # plain min/max: nothing to compare
            best = [None, scale, zero, codes]
            break
        rebuilt = codes * scale.astype(mx.float32) + zero.astype(mx.float32)
        error = mx.square(rebuilt - g).sum(-1, keepdims=True)
        if best is None:
            best = [error, scale, zero, codes]
            continue
        better = error < best[0]
        best = [
            mx.where(better, c, b) for c, b in zip((error, scale, zero, codes), best, strict=True)
        ]
    _, scale, zero, codes = best
    codes = codes.astype(mx.uint32).reshape(x.shape)
    return Quantized(pack(codes, bits), scale[..., 0], zero[..., 0], bits, group)


def dequantize(q: Quantized, dtype=mx.float32) -> mx.array:
    scale, zero = q.scale.astype(mx.float32), q.zero.astype(mx.float32)  # full-precision output
    return mx.dequantize(q.codes, scale, zero, group_size=q.group, bits=q.bits).astype(dtype)
