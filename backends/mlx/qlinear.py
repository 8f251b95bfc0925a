"""Group-wise quantized linear layers, q4 and q8, in MLX (models/qweights.py has the format); the
mirror of backends/cuda/qlinear.py. MLX has the kernels: `mx.quantized_matmul` reads its affine
layout (codes packed into uint32, w = code * scale + bias per group), held (out, in) as
nn.QuantizedLinear holds it, on Metal and on the CPU alike. q4 is that layout exactly; q8's
symmetric codes are stored offset by 128 with bias -128 * scale (qweights.to_mlx)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class QLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool, bits: int, group: int):
        super().__init__()
        self.bits, self.group = bits, group
        self.weight = mx.zeros((d_out, d_in * bits // 32), dtype=mx.uint32)  # (out, in) packed
        self.scales = mx.zeros((d_out, d_in // group), dtype=mx.float16)
        self.biases = mx.zeros((d_out, d_in // group), dtype=mx.float16)
        if bias:
            self.bias = mx.zeros((d_out,))

    def _rows(self, rows=None) -> mx.array:
        """Rows of the dequantized (out, in) weight, float32 (all of them when rows is None)."""
        w, s, b = (self.weight, self.scales, self.biases)
        if rows is not None:
            flat = rows.reshape(-1)
            w, s, b = w[flat], s[flat], b[flat]
        s, b = s.astype(mx.float32), b.astype(mx.float32)
        w = mx.dequantize(w, s, b, group_size=self.group, bits=self.bits)
        return w if rows is None else w.reshape(*rows.shape, -1)

    def dense_weight(self) -> mx.array:
        """The dequantized (in, out) weight, float32, as every MLX matrix here is held."""
        return self._rows().T

    def __call__(self, x):
        y = mx.quantized_matmul(
            x, self.weight, self.scales, self.biases, True, self.group, self.bits
        )
        return y + self.bias.astype(y.dtype) if "bias" in self else y


class QEmbedding(QLinear):
    """The embedding table in q4 or q8, held (vocab, dim): a lookup gathers and dequantizes rows;
    a tied table's codes are also the LM head."""

    def __init__(self, vocab_size: int, dim: int, bits: int, group: int, dtype: mx.Dtype):
        super().__init__(dim, vocab_size, False, bits, group)
        self.dtype = dtype  # of the rows it gives: the model's activations

    def __call__(self, tokens):
        return self._rows(tokens).astype(self.dtype)

    def as_linear(self, x):
        return super().__call__(x)
