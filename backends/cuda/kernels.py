"""Triton kernels for the PyTorch backend on CUDA, each with a plain-torch reference that the
tests compare it against (on CPU tensors, under TRITON_INTERPRET=1) and that documents what it
computes.

`latent_attention`: XQuant's decode attention in one pass over the cache, flash-decoding style.
Each program takes one KV head and one chunk of cached tokens: it reads the key stream's rows
(unpacking and dequantising the bit planes of backends/cuda/quant.py in registers when they
are quantized), rebuilds the chunk's keys (rows @ the head's slice of the rebuild matrix, bias,
k-norm), rotates them at their positions, scores the head's queries, and folds the value
stream's rows into a partial output with its own softmax maximum and sum. Only those partials
(chunks x queries x width) reach memory; no full-length K or X does. The partials are merged in
torch, and the caller projects the mixed rows once per head (V is never rebuilt).

`int8_matmul`: LLM.int8's int8 GEMM/GEMV with the dequantising epilogue (backends/cuda/int8.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .quant import Quantized, dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, or a torch without Triton: the reference runs instead
    triton = None


@dataclass
class Rows:
    """One stream's cached rows as the kernel reads them: `blocks` whole quantized blocks of
    `group` tokens (codes (blocks, packed bytes), fp16 scale/zero as backends/cuda/quant.py
    stores them; `columns`: one scale per channel per block, else per `row_group` values),
    or float rows (blocks = 0)."""

    width: int
    rows: torch.Tensor | None = None  # float (n, width)
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bits: int = 8
    group: int = 128  # tokens per block
    row_group: int = 128  # values per scale, along a block's rows (when not `columns`)
    columns: bool = False

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    def __len__(self) -> int:
        return self.codes.shape[0] * self.group if self.quantized else self.rows.shape[0]


def latent_attention_reference(q, keys: Rows, values: Rows, to_keys, bias, norm, eps, cos, sin):
    """q (H, D) for one new token, rotated; keys/values: the cached rows of both streams;
    to_keys (H_kv * D, width): the key rebuild matrix as a Linear holds it; bias (H_kv * D,) or
    None; norm: k-norm weight (D,) or None; cos, sin (n, D/2): each cached token's rotation.
    -> mixed rows (H_kv, H / H_kv, values.width)."""
    key_rows, value_rows = dense(keys), dense(values)
    n, heads, head_dim = key_rows.shape[0], q.shape[0], q.shape[1]
    k = key_rows @ to_keys.T.float()
    if bias is not None:
        k = k + bias
    k = k.view(n, -1, head_dim)
    if norm is not None:
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * norm
    k1, k2 = k.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    k = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], dim=-1).transpose(0, 1)  # (H_kv, n, D)
    n_kv = k.shape[0]
    scores = q.view(n_kv, heads // n_kv, head_dim) @ k.transpose(1, 2) / math.sqrt(head_dim)
    return torch.softmax(scores.float(), dim=-1).to(value_rows.dtype) @ value_rows


def dense(stream: Rows) -> torch.Tensor:
    """The stream's rows as floats (n, width), dequantized when quantized."""
    if not stream.quantized:
        return stream.rows.float()
    if stream.columns:
        shape = (stream.group, stream.width)
    else:
        shape = (stream.group * stream.width // stream.row_group, stream.row_group)
    blocks = Quantized(stream.codes, stream.scale, stream.zero, stream.bits, shape)
    return dequantize(blocks).view(-1, stream.width)


if triton is not None:

    @triton.jit
    def _codes(base, i, R: tl.constexpr, BITS: tl.constexpr):
        """Codes of values i of one block packed in bit planes (backends/cuda/quant.py)."""
        if BITS == 8:
            code = tl.load(base + i).to(tl.int32)
        elif BITS == 3:
            low = (tl.load(base + i % (R // 4)).to(tl.int32) >> (2 * (i // (R // 4)))) & 3
            high = (tl.load(base + R // 4 + i % (R // 8)).to(tl.int32) >> (i // (R // 8))) & 1
            code = low | (high << 2)
        else:
            plane = R * BITS // 8
            code = (tl.load(base + i % plane).to(tl.int32) >> (BITS * (i // plane))) & (
                (1 << BITS) - 1
            )
        return code

    @triton.jit
    def _rows(
        rows, codes, scale, zero, chunk, t, w, valid,
        WIDTH: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
        ROW_GROUP: tl.constexpr, COLUMNS: tl.constexpr,
    ):  # fmt: skip
        """A (tokens, channels) tile of a stream's rows as float32."""
        if QUANT:
            i = t[:, None] * WIDTH + w[None, :]  # value index within the block
            code = _codes(codes + chunk * (GROUP * WIDTH * BITS // 8), i, GROUP * WIDTH, BITS)
            if COLUMNS:
                at = chunk * WIDTH + w[None, :]
            else:
                at = chunk * (GROUP * WIDTH // ROW_GROUP) + i // ROW_GROUP
            tile = code.to(tl.float32) * tl.load(scale + at).to(tl.float32)
            tile += tl.load(zero + at).to(tl.float32)
        else:
            tile = tl.load(
                rows + (chunk * GROUP + t)[:, None] * WIDTH + w[None, :],
                mask=valid[:, None],
                other=0.0,
            ).to(tl.float32)
        return tile

    @triton.jit
    def _latent_attention(
        q, key_rows, key_codes, key_scale, key_zero, value_rows, value_codes, value_scale,
        value_zero, to_keys, bias, norm, cos, sin, out, out_max, out_sum, n, eps, sm_scale,
        N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, KEY_WIDTH: tl.constexpr,
        VALUE_WIDTH: tl.constexpr, QUANT: tl.constexpr,
        BITS: tl.constexpr, GROUP: tl.constexpr, KEY_ROW_GROUP: tl.constexpr,
        KEY_COLUMNS: tl.constexpr, VALUE_ROW_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_Q: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        head, chunk = tl.program_id(0), tl.program_id(1)
        chunks = tl.num_programs(1)
        HALF: tl.constexpr = HEAD_DIM // 2
        t = tl.arange(0, GROUP)
        token = chunk * GROUP + t
        valid = token < n
        d = tl.arange(0, HALF)
        k1 = tl.zeros((GROUP, HALF), tl.float32)
        k2 = tl.zeros((GROUP, HALF), tl.float32)
        for w0 in tl.static_range(0, KEY_WIDTH, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            tile = _rows(
                key_rows, key_codes, key_scale, key_zero, chunk, t, w, valid,
                KEY_WIDTH, QUANT, BITS, GROUP, KEY_ROW_GROUP, KEY_COLUMNS,
            )  # fmt: skip
            tile = tile.to(to_keys.dtype.element_ty)  # the rebuild runs in the weights' dtype
            column = to_keys + (head * HEAD_DIM + d)[None, :] * KEY_WIDTH + w[:, None]
            k1 += tl.dot(tile, tl.load(column), input_precision=PRECISION)
            k2 += tl.dot(tile, tl.load(column + HALF * KEY_WIDTH), input_precision=PRECISION)
        if HAS_BIAS:
            k1 += tl.load(bias + head * HEAD_DIM + d)[None, :].to(tl.float32)
            k2 += tl.load(bias + head * HEAD_DIM + HALF + d)[None, :].to(tl.float32)
        if HAS_NORM:
            inv = tl.rsqrt((tl.sum(k1 * k1, 1) + tl.sum(k2 * k2, 1)) / HEAD_DIM + eps)[:, None]
            k1 = k1 * inv * tl.load(norm + d)[None, :].to(tl.float32)
            k2 = k2 * inv * tl.load(norm + HALF + d)[None, :].to(tl.float32)
        angle = token[:, None] * HALF + d[None, :]
        c = tl.load(cos + angle, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.load(sin + angle, mask=valid[:, None], other=0.0).to(tl.float32)
        r1, r2 = k1 * c - k2 * s, k2 * c + k1 * s
        qi = tl.arange(0, BLOCK_Q)
        at = q + (head * N_REP + qi)[:, None] * HEAD_DIM + d[None, :]
        q1 = tl.load(at, mask=qi[:, None] < N_REP, other=0.0).to(tl.float32)
        q2 = tl.load(at + HALF, mask=qi[:, None] < N_REP, other=0.0).to(tl.float32)
        if HALF >= 16:
            scores = tl.dot(q1, tl.trans(r1), input_precision=PRECISION)
            scores += tl.dot(q2, tl.trans(r2), input_precision=PRECISION)
        else:  # tl.dot needs 16 along the reduction: narrow heads (tiny test models) sum by hand
            scores = tl.sum(q1[:, None, :] * r1[None, :, :], 2)
            scores += tl.sum(q2[:, None, :] * r2[None, :, :], 2)
        scores = tl.where(valid[None, :], scores * sm_scale, float("-inf"))
        top = tl.max(scores, 1)
        p = tl.exp(scores - top[:, None])
        partial = (head * chunks + chunk) * BLOCK_Q + qi
        tl.store(out_max + partial, top)
        tl.store(out_sum + partial, tl.sum(p, 1))
        for w0 in tl.static_range(0, VALUE_WIDTH, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            tile = _rows(
                value_rows, value_codes, value_scale, value_zero, chunk, t, w, valid,
                VALUE_WIDTH, QUANT, BITS, GROUP, VALUE_ROW_GROUP, False,
            )  # fmt: skip
            mixed = tl.dot(p, tile, input_precision=PRECISION)
            tl.store(out + partial[:, None] * VALUE_WIDTH + w[None, :], mixed)


BLOCK_W = 32  # channels per tile: every stream width is a multiple of 32 (latents.row_group)
BLOCK_Q = 16  # queries per head group, padded: tl.dot needs 16 rows
FLOAT_CHUNK = 64  # float rows (exact window, XQuant-CL's accumulator) per program


def dot_precision(weights_dtype) -> str:
    """fp32 weights get IEEE float32 dots, so the kernel computes what the torch path does (the
    drafter's verification, which runs there, must see the same logits). In bf16/fp16 models the
    float32 dots run on the tensor cores in TF32, finer than the model's own bf16 matmuls."""
    return "ieee" if weights_dtype == torch.float32 else "tf32"


def latent_attention_partials(q, keys: Rows, values: Rows, to_keys, bias, norm, eps, cos, sin):
    """Run the kernel over one segment of the cache (all quantized blocks, or float rows); ->
    per chunk: mixed rows (H_kv, chunks, BLOCK_Q, width), their softmax maximum and sum."""
    n_kv = to_keys.shape[0] // q.shape[1]
    n_rep, head_dim = q.shape[0] // n_kv, q.shape[1]
    group = keys.group if keys.quantized else FLOAT_CHUNK
    chunks = triton.cdiv(len(keys), group)
    out = q.new_empty(n_kv, chunks, BLOCK_Q, values.width, dtype=torch.float32)
    out_max = q.new_empty(n_kv, chunks, BLOCK_Q, dtype=torch.float32)
    out_sum = torch.empty_like(out_max)
    dummy = q.new_empty(1)

    def parts(stream: Rows):
        if stream.quantized:
            return dummy, stream.codes, stream.scale, stream.zero
        return stream.rows, dummy, dummy, dummy

    _latent_attention[(n_kv, chunks)](
        q, *parts(keys), *parts(values), to_keys,
        dummy if bias is None else bias, dummy if norm is None else norm, cos, sin,
        out, out_max, out_sum, len(keys), eps, head_dim**-0.5,
        N_REP=n_rep, HEAD_DIM=head_dim, KEY_WIDTH=keys.width,
        VALUE_WIDTH=values.width, QUANT=keys.quantized, BITS=keys.bits, GROUP=group,
        KEY_ROW_GROUP=keys.row_group, KEY_COLUMNS=keys.columns, VALUE_ROW_GROUP=values.row_group,
        HAS_BIAS=bias is not None, HAS_NORM=norm is not None, BLOCK_W=BLOCK_W, BLOCK_Q=BLOCK_Q,
        PRECISION=dot_precision(to_keys.dtype),
    )  # fmt: skip
    return out[:, :, :n_rep], out_max[:, :, :n_rep], out_sum[:, :, :n_rep]


def merge_partials(parts) -> torch.Tensor:
    """Partials of several segments -> mixed rows (H_kv, n_rep, width), softmax-normalised."""
    out, top, total = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    weight = torch.exp(top - top.amax(1, keepdim=True))
    return (out * weight[..., None]).sum(1) / (total * weight).sum(1)[..., None]


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
