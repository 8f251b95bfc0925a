"""Triton kernels for the PyTorch backend on CUDA. Each has a plain-torch reference that the tests
compare it against (under TRITON_INTERPRET=1 on CPU tensors) and that documents what it computes.
Triton is imported only when a kernel runs: a CPU-only install never needs it.
"""

from __future__ import annotations

import functools

import torch

# ---- int8 GEMM/GEMV with the dequantising epilogue (LLM.int8, backends/cuda/int8.py) ----------


def int8_matmul_reference(a, row_scale, w, col_scale) -> torch.Tensor:
    """a (M, K) int8, row_scale (M, 1), w (N, K) int8, col_scale (N,) -> float32 (M, N):
    the exact int32 product a · wᵀ, scaled by row_scale ⊗ col_scale."""
    acc = (a.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)
    return acc.float() * row_scale.float() * col_scale.float()


@functools.cache
def _int8_matmul_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul_kernel(
        a_ptr,  # (M, K) int8
        w_ptr,  # (N, K) int8: one row per output channel, as the layer stores it
        row_scale_ptr,  # (M,) float32
        col_scale_ptr,  # (N,) float32
        out_ptr,  # (M, N) float32
        M,
        N,
        K,
        stride_am,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Decode has M = 1: rows past M load as zeros, so one kernel serves GEMV and GEMM; the
        # weight tile is read once per block of BLOCK_M tokens, which is what bounds decode.
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, K, BLOCK_K):
            kk = k + rk
            a = tl.load(
                a_ptr + rm[:, None] * stride_am + kk[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0,
            )
            w = tl.load(
                w_ptr + rn[None, :] * stride_wn + kk[:, None],
                mask=(rn[None, :] < N) & (kk[:, None] < K),
                other=0,
            )
            acc += tl.dot(a, w)  # int8 x int8 -> int32, exact
        rows = tl.load(row_scale_ptr + rm, mask=rm < M, other=0.0)
        cols = tl.load(col_scale_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * rows[:, None] * cols[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=mask)

    return int8_matmul_kernel


INT8_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}  # int8 tl.dot needs K-blocks >= 32


def int8_matmul(a, row_scale, w, col_scale) -> torch.Tensor:
    """What `int8_matmul_reference` computes, in one Triton kernel (CUDA, or the interpreter)."""
    import triton

    m, k = a.shape
    n = w.shape[0]
    a, w = a.contiguous(), w.contiguous()
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, INT8_BLOCKS["BLOCK_M"]), triton.cdiv(n, INT8_BLOCKS["BLOCK_N"]))
    _int8_matmul_kernel()[grid](
        a,
        w,
        row_scale.float().contiguous(),
        col_scale.float().contiguous(),
        out,
        m,
        n,
        k,
        a.stride(0),
        w.stride(0),
        out.stride(0),
        **INT8_BLOCKS,
    )
    return out
