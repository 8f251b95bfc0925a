"""LLM.int8() linear layers in MLX (backends/int8.py has the method and the conversion); the
mirror of backends/cuda/int8.py. Weights are held like every MLX matrix here, transposed (in, out),
as int8 codes with one float32 scale per output channel (per column). The product runs in a Metal
kernel, or in plain mx off Metal (kernels.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..int8 import THRESHOLD
from .kernels import int8_matmul


class Int8Linear(nn.Module):
    observe = None  # set by Engine.int8_outliers: called with each input

    def __init__(self, d_in: int, d_out: int, bias: bool = False, threshold=THRESHOLD):
        super().__init__()
        self.weight = mx.zeros((d_in, d_out), dtype=mx.int8)  # (in, out)
        self.scale = mx.zeros((d_out,))
        if bias:
            self.bias = mx.zeros((d_out,))
        self.threshold = threshold

    def dense_weight(self) -> mx.array:
        """The dequantised (in, out) weight, float32."""
        return self.weight.astype(mx.float32) * self.scale

    def __call__(self, x):
        if self.observe is not None:
            self.observe(x)
        shape = x.shape
        y = int8_matmul(x.reshape(-1, shape[-1]), self.weight, self.scale, self.threshold)
        y = y.reshape(*shape[:-1], -1)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


class Int8Embedding(Int8Linear):
    """A tied table in int8, held (dim, vocab) like the float one: a lookup gathers and dequantises
    columns, and the LM head multiplies by the codes."""

    def __init__(self, vocab_size: int, dim: int, dtype: mx.Dtype, threshold=THRESHOLD):
        super().__init__(dim, vocab_size, threshold=threshold)
        self.dtype = dtype  # of the rows it gives: the model's activations

    def __call__(self, tokens):
        rows = self.weight.T[tokens].astype(mx.float32) * self.scale[tokens, None]
        return rows.astype(self.dtype)

    def as_linear(self, x):
        return super().__call__(x)
