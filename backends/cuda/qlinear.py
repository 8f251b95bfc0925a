"""Group-wise quantized linear layers, q4 and q8, in PyTorch (models/qweights.py has the format).

On a CPU, decode rows and a drafter's tree go through the C pass `q_linear` (cpu_qlinear.c): x
quantized per block of 32 to int8 (its outlier features kept in float) and multiplied in
integers against the codes as they are held, llama.cpp's way. A prompt's chunks take what
cpu_paths.q_prompt measured fastest here: the same pass, or the weight dequantized (C pass
`q_dequantize`) a slice of rows at a time, in bf16 or float32, for PyTorch's matrix product.
Without a C compiler, and on CUDA (not built yet: PyTorch's `_weight_int4pack_mm` would take q4
there), the weight is dequantized to float for each product: correct and slow, and
`engine.paths` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


def dequantize(codes, scale, min_, bits: int) -> torch.Tensor:
    """The float32 (rows, k) values of q4 or q8 rows (qweights.Packed.dequantize as torch ops)."""
    n = codes.shape[0]
    if bits == 4:  # each block's 16 bytes: values 0..15 in the low nibbles, 16..31 in the high
        blocks = codes.view(n, -1, 1, 16)
        codes = torch.cat([blocks & 15, blocks >> 4], dim=2).view(n, -1)
    group = codes.shape[1] // scale.shape[1]
    w = codes.float().view(n, -1, group) * scale.float()[..., None]
    if min_ is not None:
        w += min_.float()[..., None]
    return w.view(n, -1)


class QLinear(nn.Module):
    """y = x Wᵀ + b with W as q4 or q8 codes and fp16 scales (and q4 mins) per group."""

    _product = None  # the C pass bound to these weights (cpu_kernels.QProduct)
    prompt: torch.dtype | None = None  # many rows: dequantized slices in this dtype (cpu_paths)

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        width, dtype = (in_features // 2, torch.uint8) if bits == 4 else (in_features, torch.int8)
        self.register_buffer("weight", torch.empty(out_features, width, dtype=dtype))
        groups = in_features // group
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
        min_ = torch.empty(out_features, groups, dtype=torch.float16) if bits == 4 else None
        self.register_buffer("min", min_)  # q4 only
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight, float32."""
        return dequantize(self.weight, self.scale, self.min, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if x.is_cuda or cpu_kernels.library() is None:
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x.float(), self.dense_weight().to(x.device), bias)
        elif self.prompt is None or len(x) <= cpu_kernels.LINEAR_ROWS:
            y = self.product()(x if x.dtype == torch.float32 else x.float())
        else:
            y = self._sliced(x.to(self.prompt))
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def product(self) -> cpu_kernels.QProduct:
        """The C pass bound to these weights; bound again if they were replaced (it holds their
        addresses). Read from `_buffers`: a decode step calls this ~150 times, and the module's
        attribute lookup costs more than the dictionary's."""
        codes = self._buffers["weight"]
        if self._product is None or self._product.held[0] is not codes:
            self._product = cpu_kernels.QProduct(codes, self.scale, self.min, self.bits, self.bias)
        return self._product

    def _sliced(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ + b for many rows: W dequantized about 2M values at a time."""
        rows = max(1, 2**21 // self.in_features)
        parts = [
            F.linear(x, self.product().values(a, min(rows, self.out_features - a), x.dtype))
            for a in range(0, self.out_features, rows)
        ]
        y = torch.cat(parts, dim=-1).float()
        return y if self.bias is None else y + self.bias.float()


class QEmbedding(QLinear):
    """The embedding table (vocab, dim) in q4 or q8: rows are gathered for tokens and dequantized;
    a tied table's codes also serve as the LM head (each vocabulary row is one output channel)."""

    def __init__(self, vocab_size: int, dim: int, bits: int, group: int):
        super().__init__(dim, vocab_size, bias=False, bits=bits, group=group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        min_ = None if self.min is None else self.min[flat]
        rows = dequantize(self.weight[flat], self.scale[flat], min_, self.bits)
        return rows.view(*tokens.shape, self.in_features)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)
