"""Per-layer attention caches for the PyTorch backend. Each cache owns its layer's attention:
`attend(layer, x, q, k, v, cos, sin, mask)` gets the layer, its (normed) input x, the new tokens'
q and pre-RoPE k, v; it stores what its kind keeps and returns the attention output, so the model
never needs to know how the past is held."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xqchat.models.spec import ModelSpec

from ..base import CacheSpec
from ..quant import hadamard
from .quant import Quantized, dequantize, quantize


def rotate(x, cos, sin):
    """RoPE on x (B, H, T, D) with tables (T, D); sin's first half is negated (see Rope.table)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def attention(q, k, v, mask):
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


class Upcast:
    """Reused buffers holding one layer's cached K/V in the activation dtype. Fresh temporaries
    of that size page-fault on every step; these are allocated once and grow rarely."""

    def __init__(self):
        self.buffer = None

    def __call__(self, k, v, dtype):
        if k.dtype == dtype:
            return k, v
        n = k.numel()
        if self.buffer is None or self.buffer.shape[1] < n or self.buffer.dtype != dtype:
            size = max(n, 2 * (0 if self.buffer is None else self.buffer.shape[1]))
            self.buffer = torch.empty(2, size, dtype=dtype, device=k.device)
        return (
            self.buffer[0, :n].view(k.shape).copy_(k),
            self.buffer[1, :n].view(v.shape).copy_(v),
        )


class KVCache:
    """Exact K (after RoPE) and V in the weights' dtype. Storage grows in steps and is written by
    index, so a decode step allocates nothing; `trim` only moves the offset."""

    kind = "kv"
    step = 256

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, dtype, device, upcast: Upcast):
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.max_len, self.dtype, self.device, self.upcast = max_len, dtype, device, upcast
        self.keys = self.values = torch.empty(self.shape, dtype=dtype, device=device)
        self.offset = 0

    def _reserve(self, length: int) -> None:
        capacity = min(self.max_len, max(length, 2 * self.keys.shape[2], self.step))
        capacity = max(capacity, length)
        b, h, _, d = self.shape
        keys = torch.empty(b, h, capacity, d, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
        values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = keys, values

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, H, T, D); return all cached K, V up to and including them."""
        end = self.offset + k.shape[2]
        if end > self.keys.shape[2]:
            self._reserve(end)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def attend(self, layer, x, q, k, v, cos, sin, mask):
        start, end = self.offset, self.offset + k.shape[2]
        q, k = rotate(q, cos[start:end], sin[start:end]), rotate(k, cos[start:end], sin[start:end])
        keys, values = self.upcast(*self.update_and_fetch(k, v), q.dtype)
        return attention(q, keys, values, mask)

    def trim(self, n_keep: int) -> None:
        self.offset = min(self.offset, n_keep)

    @property
    def nbytes(self) -> int:
        return 2 * self.offset * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()

    residual_nbytes = residual_tokens = 0  # every token is stored exactly; none is "residual"

    @property
    def reserved_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def feature_group(width: int, group: int) -> int:
    """Groups along a row must divide it: the largest of 128/64/32 (up to `group`) that does."""
    for size in (128, 64, 32):
        if size <= group and width % size == 0:
            return size
    raise ValueError(f"rows of width {width} cannot be split into groups of 32, 64 or 128")


class TokenStore:
    """A growing sequence of token rows of one width. The newest rows stay exact (between
    `residual` and `residual + group - 1` of them); older rows are flushed to the quantized store
    in whole blocks of `group` tokens, each block quantized per token (groups along the row) or
    per channel (each channel's `group` values share a scale: outlier channels stay contained).
    With `rotate`, per-token blocks are quantized in a Hadamard basis (see backends/quant.py)."""

    def __init__(self, width: int, spec: CacheSpec, per_channel: bool, dtype, device, rotate=False):
        self.width, self.bits, self.group, self.residual = (
            width,
            spec.bits,
            spec.group,
            spec.residual,
        )
        self.per_channel = per_channel
        self.row_group = self.group if per_channel else feature_group(width, spec.group)
        self.rotation = torch.from_numpy(hadamard(self.row_group)).to(device) if rotate else None
        self.exact = torch.empty(0, width, dtype=dtype, device=device)
        self.blocks: Quantized | None = None  # stacked: codes (n_blocks, rows, packed bytes)

    @property
    def n_blocks(self) -> int:
        return 0 if self.blocks is None else self.blocks.codes.shape[0]

    def __len__(self) -> int:
        return self.n_blocks * self.group + self.exact.shape[0]

    def append(self, rows: torch.Tensor) -> None:
        self.exact = torch.cat([self.exact, rows.to(self.exact.dtype)])
        while self.exact.shape[0] >= self.residual + self.group:
            block, self.exact = self.exact[: self.group], self.exact[self.group :]
            if self.rotation is not None:
                block = self._turn(block.float(), self.rotation)
            block = quantize(block.T if self.per_channel else block, self.bits, self.row_group)
            self.blocks = _append_block(self.blocks, block)

    def read(self, dtype) -> torch.Tensor:
        """All rows, (len, width), the flushed ones dequantized."""
        if self.blocks is None:
            return self.exact.to(dtype)
        old = dequantize(
            self.blocks, torch.float32 if self.rotation is not None else dtype
        )  # (n, rows, cols)
        old = (old.transpose(1, 2) if self.per_channel else old).reshape(-1, self.width)
        if self.rotation is not None:
            old = self._turn(old, self.rotation.T).to(dtype)
        return torch.cat([old, self.exact.to(dtype)])

    def _turn(self, rows, rotation):  # each row-group of `rows` times `rotation`
        return (rows.reshape(rows.shape[0], -1, self.row_group) @ rotation).reshape(rows.shape)

    def trim(self, n_keep: int) -> None:
        flushed = self.n_blocks * self.group
        if n_keep >= flushed:
            self.exact = self.exact[: n_keep - flushed]
            return
        # Rows of a partly kept block go back to the exact window as their reconstruction: the
        # kept tokens keep exactly the values attention saw before.
        keep_blocks = n_keep // self.group
        rows = self.read(self.exact.dtype)[keep_blocks * self.group : n_keep]
        self.blocks = None if keep_blocks == 0 else _take(self.blocks, keep_blocks)
        self.exact = rows

    @property
    def residual_nbytes(self) -> int:
        return self.exact.numel() * self.exact.element_size()

    @property
    def nbytes(self) -> int:
        return self.residual_nbytes + (0 if self.blocks is None else self.blocks.nbytes)


def _append_block(blocks: Quantized | None, block: Quantized) -> Quantized:
    """Stack `block` onto `blocks` along a leading block axis."""
    parts = [block.codes[None], block.scale[None], block.zero[None]]
    if blocks is not None:
        parts = [
            torch.cat([a, b])
            for a, b in zip((blocks.codes, blocks.scale, blocks.zero), parts, strict=True)
        ]
    return Quantized(*parts, block.bits, block.group)


def _take(blocks: Quantized, n: int) -> Quantized:
    return Quantized(blocks.codes[:n], blocks.scale[:n], blocks.zero[:n], blocks.bits, blocks.group)


class QuantKVCache:
    """The peer baseline (KIVI; what mlx-lm --kv-bits, llama.cpp -ctk/-ctv and HF QuantizedCache
    offer): keys quantized per channel before RoPE (a key's outlier channels are fixed, so each
    channel gets its own scale), values per token; the newest tokens exact. RoPE is applied to all
    keys at each step, at their original positions."""

    kind = "kv-quant"

    def __init__(self, n_kv_heads: int, head_dim: int, spec: CacheSpec, dtype, device):
        width = n_kv_heads * head_dim
        self.heads, self.head_dim = n_kv_heads, head_dim
        self.keys = TokenStore(width, spec, per_channel=True, dtype=dtype, device=device)
        self.values = TokenStore(width, spec, per_channel=False, dtype=dtype, device=device)

    @property
    def offset(self) -> int:
        return len(self.keys)

    def attend(self, layer, x, q, k, v, cos, sin, mask):
        start, end = self.offset, self.offset + k.shape[2]
        self.keys.append(_rows(k))
        self.values.append(_rows(v))
        keys = rotate(self._heads(self.keys.read(q.dtype)), cos[:end], sin[:end])
        q = rotate(q, cos[start:end], sin[start:end])
        return attention(q, keys, self._heads(self.values.read(q.dtype)), mask)

    def _heads(self, rows):  # (S, H * D) -> (1, H, S, D)
        return rows.view(1, -1, self.heads, self.head_dim).transpose(1, 2)

    def trim(self, n_keep: int) -> None:
        self.keys.trim(n_keep)
        self.values.trim(n_keep)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def residual_nbytes(self) -> int:
        return self.keys.residual_nbytes + self.values.residual_nbytes

    @property
    def residual_tokens(self) -> int:
        return self.keys.exact.shape[0]

    reserved_bytes = nbytes


def _rows(x):  # (1, H, T, D) -> (T, H * D)
    return x[0].transpose(0, 1).reshape(x.shape[2], -1)


class XQuantCache:
    """XQuant (Tomar, Hooper et al., arXiv 2508.10395): cache the layer's normed input X, quantized
    per token in a Hadamard basis (X's outlier channels would otherwise set every group's scale),
    instead of K and V, and rebuild both at each step with one matmul (k-norm and bias
    as in the forward, RoPE at each token's original position). For an MHA layer X is as wide as
    K alone, so this holds half the values of K/V at equal bits. The newest tokens are exact X,
    so their K/V are exact."""

    kind = "xquant"

    def __init__(self, spec: ModelSpec, cache: CacheSpec, dtype, device):
        self.x = TokenStore(
            spec.dim, cache, per_channel=False, dtype=dtype, device=device, rotate=True
        )

    @property
    def offset(self) -> int:
        return len(self.x)

    def attend(self, layer, x, q, k, v, cos, sin, mask):
        start, end = self.offset, self.offset + x.shape[1]
        self.x.append(x[0])
        keys, values = layer.keys_values(self.x.read(q.dtype)[None])
        return attention(
            rotate(q, cos[start:end], sin[start:end]),
            rotate(keys, cos[:end], sin[:end]),
            values,
            mask,
        )

    def trim(self, n_keep: int) -> None:
        self.x.trim(n_keep)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes

    @property
    def residual_nbytes(self) -> int:
        return self.x.residual_nbytes

    @property
    def residual_tokens(self) -> int:
        return self.x.exact.shape[0]

    reserved_bytes = nbytes


def new_cache(cache: CacheSpec, spec: ModelSpec, dtype, device, upcast):
    if cache.kind == "kv":
        return KVCache(spec.n_kv_heads, spec.head_dim, spec.max_context, dtype, device, upcast)
    if cache.kind == "kv-quant":
        return QuantKVCache(spec.n_kv_heads, spec.head_dim, cache, dtype, device)
    return XQuantCache(spec, cache, dtype, device)
