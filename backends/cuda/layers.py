"""The PyTorch backend's building blocks: a Linear that takes this CPU's fastest path, RMSNorm,
RoPE tables and the attention masks of sliding-window layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xqchat.models.spec import RopeSpec

from . import cpu_kernels


class Linear(nn.Linear):
    """Casts its input to the weight dtype. A bf16 weight on a CPU takes the path cpu_paths.py
    chose there (`use`): oneDNN's blocked layout, where its matrix-vector product runs ~2x faster
    than PyTorch's plain bf16 one (all of SmolLM2-135M's layer matmuls: 11 ms vs 24 ms per token)
    and prompt-sized products are fast too; or a plain weight with decode's rows through the C
    pass `bf16_linear` and a prompt's chunks through a float32 copy of the weight."""

    packed = False
    path: str | None = None  # cpu_paths.BF16_PATHS, for a bf16 weight on a CPU
    prompt: str | None = None  # cpu_paths.CpuPaths.bf16_prompt
    _product = None  # the C pass bound to this weight (cpu_kernels.Bf16Product)

    def use(self, path: str, prompt: str) -> None:
        if path == "c-pass" and self.in_features % 16:  # the pass reads whole vectors of 16
            path = "torch"
        self.path, self.prompt = path, prompt
        if path == "onednn-packed":
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
            del self.weight
            self.register_buffer("weight", packed)
            self.packed = True

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight as a plain tensor; a packed one is read back through the identity
        (exact: each output is one weight times 1, summed with zeros)."""
        if not self.packed:
            return self.weight.detach()
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(eye, self.weight, None, "none", [], "").T

    def forward(self, x):
        if self.packed:
            x = x.to(self.weight.dtype)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        rows = x.numel() // self.in_features
        if (
            self.path == "c-pass"
            and rows <= cpu_kernels.LINEAR_ROWS
            and cpu_kernels.library() is not None  # the tests take it away after loading
        ):
            if self._product is None or self._product.held[0] is not self.weight:
                self._product = cpu_kernels.Bf16Product(self.weight, self.bias)
            y = self._product(x.reshape(rows, self.in_features))
            return y.view(*x.shape[:-1], self.out_features)
        if self.prompt == "float32 copy" and rows > cpu_kernels.LINEAR_ROWS:
            return float32_copy_linear(x.float(), self.weight, self.bias)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def float32_copy_linear(x, weight, bias, block: int = 8192):
    """x @ weightᵀ + bias in float32 from a bf16 weight, converted a block of output rows at a
    time, so the float32 copy stays bounded for a large vocabulary's head."""
    bias = None if bias is None else bias.float()
    if weight.shape[0] <= block:
        return F.linear(x, weight.float(), bias)
    return torch.cat(
        [
            F.linear(
                x, weight[a : a + block].float(), None if bias is None else bias[a : a + block]
            )
            for a in range(0, weight.shape[0], block)
        ],
        dim=-1,
    )


def few_cpu_rows(x: torch.Tensor) -> bool:
    """A decode step's or a drafter tree's float32 rows on a CPU: the elementwise steps take one
    C call each (cpu_step.c) where PyTorch would dispatch several kernels."""
    return (
        x.dtype == torch.float32 and not x.is_cuda
        and x.numel() <= cpu_kernels.LINEAR_ROWS * x.shape[-1]
        and cpu_kernels.library() is not None
    )  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if few_cpu_rows(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rope(nn.Module):
    """Rotate-half RoPE with a cos/sin table grown on demand (positions are absolute). LongRoPE's
    (`rope.long()`) rows from `long_from` on use its long factors (see DecodingSession)."""

    def __init__(self, rope: RopeSpec, head_dim: int):
        super().__init__()
        inv_freq = torch.from_numpy(rope.inv_freq(head_dim)).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.long = None if rope.long() is None else Rope(rope.long(), head_dim)
        self.cos = self.sin = None
        self.switched = None  # (long_from, cos, sin): the short rows, then the long ones

    def table(self, end: int, dtype, long_from: int | None = None):
        """cos, sin (end, D); sin's first half is negated so that rotate_half(x) * sin
        becomes x.roll(D/2) * sin: one kernel instead of two slices, a negation and a cat."""
        if self.cos is None or self.cos.shape[0] < end or self.cos.dtype != dtype:
            n = max(end, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            self.cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1).to(dtype)
            self.sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(dtype)
        if long_from is None or self.long is None:
            return self.cos, self.sin
        held = self.switched
        if held is None or held[0] != long_from or len(held[1]) < end or held[1].dtype != dtype:
            cos, sin = self.long.table(len(self.cos), dtype)
            cos = torch.cat([self.cos[:long_from], cos[long_from : len(self.cos)]])
            sin = torch.cat([self.sin[:long_from], sin[long_from : len(self.cos)]])
            self.switched = held = (long_from, cos, sin)
        return held[1], held[2]


def window_mask(mask, start: int, end: int, window: int, device, positions=None):
    """`mask` (new rows x end columns, bool; None: new rows see everything before them) narrowed to
    a sliding window: the row at position p sees positions p - window + 1 .. p. `positions`: the
    new rows' positions (a drafter's tree), else start .. end - 1. The cache's row i is at
    position i (a tree's rows past `start` are at its own positions)."""
    rows = torch.arange(start, end, device=device) if positions is None else positions
    columns = torch.arange(end, device=device)
    if positions is not None:
        columns = torch.cat([columns[:start], positions])
    near = columns[None, :] > rows[:, None] - window
    if mask is None:
        mask = columns[None, :] <= rows[:, None]
    return mask & near
