"""Asymmetric group quantization with bit-packed codes, in MLX: mx.quantize's affine format (codes
packed into uint32 words; scale and bias per group in fp16), which mx.quantized_matmul consumes
directly. Every `group` consecutive values along the last axis share a scale and zero point."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


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


def quantize(x: mx.array, bits: int, group: int) -> Quantized:
    """x (..., n) with n a multiple of `group` -> packed codes and fp16 scales/zeros."""
    codes, scale, zero = mx.quantize(x.astype(mx.float16), group_size=group, bits=bits)
    return Quantized(codes, scale, zero, bits, group)


def dequantize(q: Quantized, dtype=mx.float32) -> mx.array:
    return mx.dequantize(q.codes, q.scale, q.zero, group_size=q.group, bits=q.bits).astype(dtype)
