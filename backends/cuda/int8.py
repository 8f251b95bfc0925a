"""LLM.int8() linear layers in PyTorch (backends/int8.py has the method and the conversion).

The int8 product: on a CPU, for a few rows (decode, a drafter's tree), one fused C pass per matrix
(cpu_kernels.c: quantize, VNNI dot products, outliers, scales and bias), and for longer chunks
`torch._int_mm` (oneDNN, exact int32 accumulation) with the steps below as torch ops, or where
that runs as a scalar loop (CPUs without VNNI, cpu_paths.py), the dequantized weights in float32
(weight-only int8: closer to the float model, not LLM.int8's rounding of x); on CUDA a
Triton GEMM/GEMV with the scales applied in its epilogue (kernels.py), since `torch._int_mm`
there needs more than 16 rows and decode has one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..int8 import THRESHOLD
from . import cpu_kernels, cpu_paths
from .kernels import int8_matmul


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, math.inf, dim=-1, keepdim=True)


def quantize_rows(x: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float and its row_absmax -> int8 codes (M, K), float32 row scales (M, 1)."""
    scale = absmax.float().clamp_min(1e-12) / 127
    return torch.round(x / scale).to(torch.int8), scale


def int8_product(codes: torch.Tensor, row_scale, weight: torch.Tensor, scale) -> torch.Tensor:
    """int32(codes · weightᵀ) * (row_scale ⊗ scale) in float32, (M, N)."""
    if codes.is_cuda:
        return int8_matmul(codes, row_scale, weight, scale)
    if cpu_paths.int_mm_exact():
        products = torch._int_mm(codes, weight.t())
    else:  # exact, slow: the engine multiplies dequantized weights here instead (see forward)
        products = torch.mm(codes.int(), weight.int().t())
    return torch.mul(products, scale).mul_(row_scale)


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W as int8 codes (out, in) and one float32 scale per output channel."""

    observe = None  # set by Engine.int8_outliers: called with each input
    _product = None  # the C pass bound to these weights (cpu_kernels.Int8Product)
    int_mm = True  # many rows through torch._int_mm; False: the dequantized weights (see load)

    def __init__(self, in_features: int, out_features: int, bias: bool, threshold=THRESHOLD):
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The dequantised (out, in) weight, float32."""
        return self.weight.float() * self.scale[:, None]

    def fused(self, x: torch.Tensor) -> cpu_kernels.Int8Product | None:
        """The C pass for these weights where it serves x: a few float32 rows on the CPU."""
        if len(x) > cpu_kernels.INT8_ROWS or x.dtype != torch.float32 or x.is_cuda:
            return None
        if cpu_kernels.library() is None:  # no C compiler: the torch ops
            return None
        if self._product is None or self._product.weight is not self.weight:  # bound at first use
            self._product = cpu_kernels.Int8Product(self.weight, self.scale, self.bias)
        return self._product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            self.observe(x)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        product = self.fused(x)
        if product is not None:
            return product(x, self.threshold).view(*shape[:-1], self.out_features)
        # threshold 0 (every feature in float: weight-only int8, what `auto` picks where no
        # threshold keeps the float model's quality) is the dequantized weights' product
        if (not self.int_mm or self.threshold == 0) and not x.is_cuda:
            y = F.linear(x.float(), self.dense_weight(), self.bias)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        absmax = row_absmax(x)
        # the row absmax says whether any outlier exists: in the usual case that costs nothing more
        peak = float(absmax) if len(x) == 1 else float(absmax.max())
        outlier, regular = None, x
        if peak > self.threshold:  # each row's own outlier features (see backends/int8.py)
            outlier = x.abs() > self.threshold
            regular = x.masked_fill(outlier, 0)
            absmax = row_absmax(regular)
        codes, row_scale = quantize_rows(regular, absmax)
        y = int8_product(codes, row_scale, self.weight, self.scale)
        if outlier is not None:
            y = self.add_outliers(y, x, outlier)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def add_outliers(self, y: torch.Tensor, x: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
        """y plus each row's outlier features (`outlier`, (M, K) bool) in float, against the
        dequantised columns. A decode step's or a tree's few rows are done one by one, each as
        it would be alone (the same product of the same shapes), so a tree's rows give a decode
        step's bits; a prompt's chunk in one product over the columns any row needs, each row's
        other values there taken as zeros."""
        if len(x) <= cpu_kernels.INT8_ROWS:
            for r in outlier.any(1).nonzero().squeeze(1).tolist():
                columns = outlier[r].nonzero().squeeze(1)
                y[r] += x[r, columns].float() @ self.dense_columns(columns).T
            return y
        columns = outlier.any(0).nonzero().squeeze(1)
        own = x[:, columns].float().masked_fill(~outlier[:, columns], 0)
        return torch.addmm(y, own, self.dense_columns(columns).T)

    def dense_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """The dequantised (out, len(columns)) columns of the weight, float32."""
        return self.weight[:, columns].float() * self.scale[:, None]


class Int8Embedding(Int8Linear):
    """A tied table (vocab, dim) in int8: rows are gathered for tokens and dequantised, and the same
    codes serve as the LM head (each vocabulary row is one output channel)."""

    def __init__(self, vocab_size: int, dim: int, threshold=THRESHOLD):
        super().__init__(dim, vocab_size, bias=False, threshold=threshold)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight).float() * self.scale[tokens, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)
