"""Per-layer attention caches for the PyTorch backend. Each cache owns its layer's attention:
`attend(layer, x, q, k, v, cos, sin, mask)` gets the layer, its (normed) input x, the new tokens'
q and pre-RoPE k, v; it stores what its kind keeps and returns the attention output, so the model
never needs to know how the past is held."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from xqchat.models.spec import ModelSpec

from ..base import CacheSpec
from ..int8 import quantize as quantize_int8
from ..latents import LayerLatents, cl_chains, row_group
from ..window import SlidingStore, WindowStores
from . import cpu_kernels, kernels
from .quant import Quantized, dequantize, quantize, quantize_columns


def rotate(x, cos, sin, out=None):
    """RoPE on x (B, H, T, D) with tables (T, D); sin's first half is negated (see Rope.table).
    rotate_half(x) * sin is two half-width products added in place: no copy of x is rolled."""
    half = x.shape[-1] // 2
    out = torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def attention(q, k, v, mask):
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


class Scratch:
    """Reused buffers for a layer's transient tensors (cached K/V in the activation dtype, rows
    rebuilt from a quantized store): fresh temporaries of that size page-fault on every step;
    these are allocated once per slot and grow rarely. Layers run one at a time, so one set
    serves the whole model."""

    def __init__(self):
        self.buffers: dict = {}

    def __call__(self, slot, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        buffer = self.buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < n:
            size = max(n, 2 * (0 if buffer is None else buffer.numel()))
            buffer = self.buffers[slot, dtype] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:n].view(shape)


def attend_tree_bf16(q, keys, values, start: int, newest: torch.Tensor | None) -> torch.Tensor:
    """cpu_kernels.attend_bf16 of the m new rows at `start` (their keys and values written there),
    each seeing the cache and those of the newest its row of `newest` (m, m) allows (None: all).
    A branching drafter's tree goes one beam at a time, each beam's rows moved to the positions
    of their depths: the pass sums a row's tokens by where they lie (its parts of ATTEND_CHUNK
    tokens, the lanes within a part), so a node must see its ancestors where plain decoding
    holds them (start + depth) to give a decode step's bits, and greedy speculation plain
    decoding's text. A chain (one beam, or a decode step) is already laid out so."""
    m = q.shape[2]
    end = start + m
    if newest is None or bool(newest.equal(torch.ones(m, m, dtype=torch.bool).tril())):
        return cpu_kernels.attend_bf16(q, keys, values, end, newest)
    tree_keys, tree_values = keys[:, :, start:end].clone(), values[:, :, start:end].clone()
    out = torch.empty_like(q)
    for leaf in (newest.sum(0) == 1).nonzero().squeeze(1).tolist():  # nobody's ancestor
        path = newest[leaf].nonzero().squeeze(1)  # the leaf's ancestors and itself, by depth
        n = len(path)
        keys[:, :, start : start + n], values[:, :, start : start + n] = (
            tree_keys[:, :, path],
            tree_values[:, :, path],
        )
        chain = torch.ones(n, n, dtype=torch.bool).tril()
        out[:, :, path] = cpu_kernels.attend_bf16(q[:, :, path], keys, values, start + n, chain)
    keys[:, :, start:end], values[:, :, start:end] = tree_keys, tree_values
    return out


class KVCache:
    """Exact K (after RoPE) and V in the weights' dtype. Storage grows in steps and is written by
    index, so a decode step allocates nothing; `trim` only moves the offset."""

    kind = "kv"
    step = 256

    def __init__(
        self, n_kv_heads: int, head_dim: int, max_len: int, dtype, device, scratch: Scratch
    ):
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.max_len, self.dtype, self.device, self.scratch = max_len, dtype, device, scratch
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

    def attend(self, layer, x, q, cos, sin, mask, step):
        k, v = layer.keys_values(x)
        start, end = self.offset, self.offset + k.shape[2]
        if self.one_pass(q, mask, start):  # rotation, cache write and attention: two C calls
            if end > self.keys.shape[2]:
                self._reserve(end)
            q = cpu_kernels.rope_append_bf16(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos[start:end],
                sin[start:end], self.keys, self.values, start,
            )  # fmt: skip
            self.offset = end
            newest = None if mask is None else mask[:, start:]
            return attend_tree_bf16(q, self.keys, self.values, start, newest)
        q, k = rotate(q, cos[start:end], sin[start:end]), rotate(k, cos[start:end], sin[start:end])
        keys, values = self.update_and_fetch(k, v)
        if keys.dtype != q.dtype:  # attention runs in the activation dtype (fp32 on CPU)
            keys = self.scratch("keys", keys.shape, q.dtype, q.device).copy_(keys)
            values = self.scratch("values", values.shape, q.dtype, q.device).copy_(values)
        return attention(q, keys, values, mask)

    def one_pass(self, q, mask, start: int) -> bool:
        """A CPU decode step or drafter's tree on bf16 K/V goes through one C pass that reads the
        cache as it is (cpu_kernels.attend_bf16) instead of a float32 copy of it and PyTorch's
        attention. The pass lets every new row see all rows cached before them."""
        rows = q.shape[2]
        return (
            (rows == 1 or mask is not None) and rows <= cpu_kernels.ATTEND_ROWS
            and not q.is_cuda and q.dtype == torch.float32 and self.dtype == torch.bfloat16
            and cpu_kernels.library() is not None and (mask is None or bool(mask[:, :start].all()))
        )  # fmt: skip

    def trim(self, n_keep: int) -> None:
        self.offset = min(self.offset, n_keep)

    @property
    def room(self) -> int:
        """New rows that fit before anything already held would change (here: the context)."""
        return self.max_len - self.offset

    def keep(self, start: int, rows: list[int]) -> None:
        """Of the rows from `start` on (a drafter's tree), keep `rows` (ascending) as the rows
        start, start + 1, ...; drop the rest."""
        index = torch.tensor(rows, device=self.device) + start
        end = start + len(rows)
        self.keys[:, :, start:end] = self.keys[:, :, index]
        self.values[:, :, start:end] = self.values[:, :, index]
        self.offset = end

    def state_dict(self) -> dict:
        return {"keys": self.keys[:, :, : self.offset], "values": self.values[:, :, : self.offset]}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.values = state["keys"], state["values"]
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.offset * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()

    residual_nbytes = residual_tokens = 0  # every token is stored exactly; none is "residual"

    @property
    def reserved_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class Chain:
    """XQuant-CL's transient accumulator for one stream of a stack of layers. Layers run in order,
    so layer i finds here what layer i-1 reconstructed in this forward: the blocks it flushed
    (their rows predict the same tokens' rows of layer i, which stores only the difference) and,
    in `rows`, all its flushed rows, to which layer i adds its own dequantized differences in
    place: one buffer per stream for the whole stack."""

    def __init__(self):
        self.blocks: list[torch.Tensor] = []
        self.scratch = Scratch()

    def rows(self, n: int, width: int, dtype, device) -> torch.Tensor:
        return self.scratch("rows", (n, width), dtype, device)


class TokenStore(SlidingStore):
    """A growing sequence of token rows of one width. The first `sink` rows stay exact: attention
    sinks, which every later token attends to and whose outlying values would otherwise set the
    scales of their whole block. So do the newest rows (between `residual` and `residual + group
    - 1` of them); the rows between are flushed to the quantized store in whole blocks of `group`
    tokens, each block quantized per token (groups along the row; with `spans_rows`, groups of
    `group` values read on across row ends, so a row of 576 takes 4.5 groups of 128, not 9 of
    64) or per channel (each channel's `group` values share a scale: outlier channels stay
    contained). In a `chain` with `delta`, a block is stored as its difference from the previous
    layer's reconstruction of the same tokens (closed loop: errors do not accumulate down the
    layers). A sliding-window layer's store (`window`) drops what leaves its window (`slide`);
    its rows are then counted from `first`, the oldest position held."""

    def __init__(
        self,
        width,
        spec: CacheSpec,
        per_channel: bool,
        dtype,
        device,
        scratch,
        chain=None,
        delta=False,
        spans_rows=False,
        window=0,
    ):
        self.width, self.bits, self.group = width, spec.bits, spec.group
        self.residual, self.per_channel, self.scratch = spec.residual, per_channel, scratch
        self.chain, self.delta = chain, delta
        # values per scale and zero point
        spanned = per_channel or spans_rows
        self.row_group = self.group if spanned else row_group(width, spec.group)
        self.n_sink, self.window, self.first = spec.sink, window, 0
        self.sink = self.exact = torch.empty(0, width, dtype=dtype, device=device)
        self.buffer: torch.Tensor | None = None  # holds `exact` as its first rows, room after
        self.blocks: Quantized | None = None  # stacked: codes (n_blocks, packed bytes)

    @property
    def n_blocks(self) -> int:
        return 0 if self.blocks is None else self.blocks.codes.shape[0]

    @property
    def n_fixed(self) -> int:
        """Rows before the exact window: the sink and the flushed blocks."""
        return self.sink.shape[0] + self.n_blocks * self.group

    @property
    def held(self) -> int:
        return self.n_fixed + self.exact.shape[0]

    def __len__(self) -> int:  # positions
        return self.first + self.held

    @property
    def n_exact(self) -> int:
        return self.sink.shape[0] + self.exact.shape[0]

    def _fill_sink(self) -> None:
        """The first rows of a chat go to the sink until it is full (only before any flush)."""
        take = self.n_sink - self.sink.shape[0]
        if take > 0 and len(self.exact) and not self.first:
            self.sink = torch.cat([self.sink, self.exact[:take]])
            self.exact = self.exact[take:]

    def _quantize(self, block: torch.Tensor) -> Quantized:  # (group, width) -> one packed block
        if self.per_channel:
            return quantize_columns(block, self.bits)
        return quantize(block.flatten(), self.bits, self.row_group)

    def _extended(self, rows: torch.Tensor) -> torch.Tensor:
        """The exact rows followed by `rows`, written into the buffer's room: a decode step
        copies its one row, not all exact rows (a new buffer when the rows are elsewhere: after a
        flush, a trim that cloned, a slide, a load)."""
        n, k = self.exact.shape[0], rows.shape[0]
        buffer = self.buffer
        if buffer is None or len(buffer) < n + k or self.exact.data_ptr() != buffer.data_ptr():
            buffer = self.exact.new_empty(max(n + k, self.residual + self.group), self.width)
            buffer[:n] = self.exact
            self.buffer = buffer
        buffer[n : n + k] = rows
        return buffer[: n + k]

    def append(self, rows: torch.Tensor) -> None:
        self.exact = self._extended(rows)
        self._fill_sink()
        predictions = self.chain.blocks if self.delta else []
        flushed = []
        while self.exact.shape[0] >= self.residual + self.group:
            block, self.exact = self.exact[: self.group].float(), self.exact[self.group :]
            if self.delta:
                block = block - predictions[len(flushed)]
            quantized = self._quantize(block)
            self.blocks = _append_block(self.blocks, quantized)
            rebuilt = dequantize(quantized).view(self.group, self.width)
            flushed.append(rebuilt + predictions[len(flushed)] if self.delta else rebuilt)
        if self.chain is not None:
            self.chain.blocks = flushed

    def _drop_blocks(self, n: int) -> None:  # the oldest n flushed blocks (backends/window.py)
        last = self.n_blocks
        self.blocks = None if n == last else _take(self.blocks, n, last)

    def read(self, dtype, out=None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop (default: all), (stop - start, width) in `dtype`, written into `out`
        when given (a reused buffer); both bounds fall on block boundaries, at the sink's end or
        among the exact rows. In a chain, all rows are read, into the chain's buffer: the flushed
        ones accumulate layer by layer (the sink's rows are exact in every layer). Rows are
        counted from the oldest held (`first`)."""
        stop = self.held if stop is None else stop
        if self.chain is not None:
            assert (start, stop) == (0, self.held), "a chain's rows are read whole"
            out = self.chain.rows(stop, self.width, dtype, self.exact.device)
        elif out is None:
            out = self.exact.new_empty(stop - start, self.width, dtype=dtype)
        rows = out[: stop - start]
        n_sink, n_old = self.sink.shape[0], self.n_fixed
        if start < n_sink:
            rows[: min(stop, n_sink) - start] = self.sink[start:stop]
        first = max(0, start - n_sink) // self.group
        last = min(self.n_blocks, -(-(stop - n_sink) // self.group))
        if first < last:
            at = n_sink + first * self.group - start
            flushed = rows[at : at + (last - first) * self.group].view(last - first, -1)
            dequantize(
                _take(self.blocks, first, last), dtype, flushed, self.delta,
                lambda name, shape, dtype: self.scratch(name, shape, dtype, out.device),
            )  # fmt: skip
        if stop > n_old:
            rows[max(0, n_old - start) :] = self.exact[max(0, start - n_old) : stop - n_old]
        return rows

    def segments(self, dtype) -> list[kernels.Rows]:
        """The rows as the fused kernel reads them: the quantized blocks as they are stored and
        the sink and the newest rows; in a chain, all rows as its accumulator holds them."""
        if self.chain is not None:
            return [kernels.Rows(self.width, rows=self.read(dtype))]
        parts = [kernels.Rows(self.width, rows=self.sink)] if len(self.sink) else []
        if self.blocks is not None:
            b = self.blocks
            parts.append(kernels.Rows(
                self.width, codes=b.codes, scale=b.scale, zero=b.zero, bits=self.bits,
                group=self.group, row_group=self.row_group, columns=self.per_channel,
            ))  # fmt: skip
        return parts + ([kernels.Rows(self.width, rows=self.exact)] if len(self.exact) else [])

    def trim(self, n_keep: int) -> None:
        n_keep -= self.first
        assert n_keep >= 0, "the rows to keep were dropped: the session restores a checkpoint"
        n_sink, flushed = self.sink.shape[0], self.n_fixed
        if n_keep >= flushed:
            self.exact = self.exact[: n_keep - flushed]
            return
        # Rows of a partly kept block go back to the exact window as their reconstruction: the
        # kept tokens keep exactly the values attention saw before.
        keep_blocks = max(0, n_keep - n_sink) // self.group
        kept = n_sink + keep_blocks * self.group
        rows = self.read(self.exact.dtype)[min(kept, n_keep) : n_keep].clone()
        self.blocks = None if keep_blocks == 0 else _take(self.blocks, 0, keep_blocks)
        self.sink, self.exact = self.sink[:n_keep], rows

    @property
    def room(self) -> int:
        """Rows that can be appended before a flush: a drafter's tree that fits stays exact, and
        nothing is flushed earlier than in a token-by-token run."""
        return self.residual + self.group - 1 - self.exact.shape[0]

    def keep(self, start: int, rows: list[int]) -> None:
        """Of the rows from `start` on (all exact: in the window, or in a sink still filling),
        keep `rows` (ascending) as the rows start, start + 1, ...; drop the rest."""
        start -= self.first
        if self.blocks is None:  # the sink and the window: exact rows counted from 0
            exact, first, self.sink = torch.cat([self.sink, self.exact]), start, self.sink[:0]
        else:
            exact, first = self.exact, start - self.n_fixed
            assert first >= 0, "the rows to keep were flushed"
        index = torch.tensor(rows, device=exact.device) + first
        self.exact = torch.cat([exact[:first], exact[index]])
        self._fill_sink()

    def state_dict(self) -> dict:
        # `exact` lives in a buffer later rows are written into: a checkpoint holds a copy
        state = {"sink": self.sink, "exact": self.exact.clone()}
        if self.blocks is not None:
            state.update(codes=self.blocks.codes, scale=self.blocks.scale, zero=self.blocks.zero)
        if self.first:
            state["first"] = torch.tensor([self.first], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sink, self.exact, self.blocks = state["sink"], state["exact"], None
        self.first = int(state["first"][0]) if "first" in state else 0
        if "codes" in state:
            shape = self._quantize(self.exact.new_zeros(self.group, self.width)).shape
            self.blocks = Quantized(state["codes"], state["scale"], state["zero"], self.bits, shape)

    @property
    def residual_nbytes(self) -> int:
        """The exact rows: the sink's and the newest window's (fixed, however long the chat)."""
        return (self.sink.numel() + self.exact.numel()) * self.exact.element_size()

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
    return Quantized(*parts, block.bits, block.shape)


def _take(blocks: Quantized, first: int, last: int) -> Quantized:
    parts = (blocks.codes[first:last], blocks.scale[first:last], blocks.zero[first:last])
    return Quantized(*parts, blocks.bits, blocks.shape)


def nested_state(parts: dict) -> dict:
    """The state of a cache made of parts (stores), each part's names under its own prefix."""
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()}


def load_nested_state(parts: dict, state: dict) -> None:
    for name, part in parts.items():
        part.load_state_dict(
            {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        )


class QuantKVCache(WindowStores):
    """The peer baseline (KIVI; what mlx-lm --kv-bits, llama.cpp -ctk/-ctv and HF QuantizedCache
    offer): keys quantized per channel before RoPE (a key's outlier channels are fixed, so each
    channel gets its own scale), values per token; the newest tokens exact. RoPE is applied to all
    keys at each step, at their original positions. A sliding-window layer's (`window`) holds
    only the groups of tokens its window overlaps (backends/window.py)."""

    kind = "kv-quant"

    def __init__(
        self, n_kv_heads: int, head_dim: int, spec: CacheSpec, dtype, device, scratch, window=0
    ):
        width = n_kv_heads * head_dim
        self.heads, self.head_dim, self.scratch, self.window = n_kv_heads, head_dim, scratch, window
        self.keys = TokenStore(width, spec, True, dtype, device, scratch, window=window)
        self.values = TokenStore(width, spec, False, dtype, device, scratch, window=window)
        self.stores = [self.keys, self.values]

    @property
    def offset(self) -> int:
        return len(self.keys)

    def attend(self, layer, x, q, cos, sin, mask, step):
        k, v = layer.keys_values(x)
        start, end = self.offset, self.offset + k.shape[2]
        self.slide(start)
        self.keys.append(_rows(k))
        self.values.append(_rows(v))
        first = self.first
        held = end - first
        keys = self.keys.read(
            q.dtype, self.scratch("keys", (held, self.keys.width), q.dtype, q.device)
        )
        keys = rotate(
            self._heads(keys),
            cos[first:end],
            sin[first:end],
            out=self.scratch("rotated", (1, self.heads, held, self.head_dim), q.dtype, q.device),
        )
        values = self.values.read(
            q.dtype, self.scratch("values", (held, self.values.width), q.dtype, q.device)
        )
        q = rotate(q, cos[start:end], sin[start:end])
        mask = None if mask is None else mask[:, first:]
        out = attention(q, keys, self._heads(values), mask)
        if not (step and k.shape[2] > 1):  # a tree's path is chosen after it
            self.slide(end)
        return out

    def _heads(self, rows):  # (S, H * D) -> (1, H, S, D)
        return rows.view(1, -1, self.heads, self.head_dim).transpose(1, 2)

    def trim(self, n_keep: int) -> None:
        self.keys.trim(n_keep)
        self.values.trim(n_keep)

    @property
    def room(self) -> int:
        return min(self.keys.room, self.values.room)

    def keep(self, start: int, rows: list[int]) -> None:
        self.keys.keep(start, rows)
        self.values.keep(start, rows)

    def state_dict(self) -> dict:
        return nested_state({"keys": self.keys, "values": self.values})

    def load_state_dict(self, state: dict) -> None:
        load_nested_state({"keys": self.keys, "values": self.values}, state)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def residual_nbytes(self) -> int:
        return self.keys.residual_nbytes + self.values.residual_nbytes

    @property
    def residual_tokens(self) -> int:
        return self.keys.n_exact

    reserved_bytes = nbytes


def key_finish(layer):
    """What the forward applies to x @ W_k before RoPE: (bias or None, k-norm weight or None, eps)."""
    bias = None if layer.wkv.bias is None else layer.wkv.bias[: layer.kv_dim]
    norm, eps = (layer.k_norm.weight, layer.k_norm.eps) if layer.qk_norm else (None, 0.0)
    return bias, norm, eps


def _rows(x):  # (1, H, T, D) -> (T, H * D)
    return x[0].transpose(0, 1).reshape(x.shape[2], -1)


class Latents:
    """One layer's XQuant streams and rebuild matrices (backends/latents.py) as tensors. The
    products over every cached token (encode, rebuild K) run through `linear(matrix)`, the
    model's fastest x @ matrix in the weights' dtype; the per-head V projection, applied once per
    query, is a plain matrix in the activation dtype. With `int8_keys` (a CPU where torch._int_mm
    pays, cpu_paths.py) the key rebuild is also kept as int8 codes per output channel."""

    key_codes = None

    def __init__(
        self, layer: LayerLatents, linear, head_dim: int, act_dtype, device, int8_keys=False
    ):
        self.encode = linear(np.concatenate([s.encode for s in layer.streams], axis=1))
        self.widths = [s.encode.shape[1] for s in layer.streams]
        self.layouts = [(s.per_channel, s.spans_rows) for s in layer.streams]
        self.key_stream, self.value_stream = layer.keys[0], layer.values[0]
        self.to_keys = linear(layer.keys[1])
        to_values = torch.from_numpy(layer.values[1]).to(device=device, dtype=act_dtype)
        # (H_kv, width, D): each K/V head's block of the value projection
        self.value_heads = heads = (
            to_values.view(to_values.shape[0], -1, head_dim).transpose(0, 1).contiguous()
        )
        held = [self.encode.weight, self.to_keys.weight, heads]
        if int8_keys:
            codes, scale = quantize_int8(layer.keys[1].T)
            self.key_codes, self.key_scale = torch.from_numpy(codes), torch.from_numpy(scale)
            held += [self.key_codes, self.key_scale]
        self.nbytes = sum(t.numel() * t.element_size() for t in held)

    def int8_keys(self, rows: torch.Tensor) -> cpu_kernels.IntKeys:
        """K before bias, k-norm and RoPE, (T, kv_dim), from float32 rows as LLM.int8()
        multiplies (no outliers): each row quantized to int8 by its absmax, products in int32 (the
        CPU's VNNI dot products: twice bf16's rate), both scales applied as the C pass reads them.
        It adds ~0.7% of K's norm as error, where a cache of 4 bits or fewer carries 4-11%."""
        codes, row_scale = cpu_kernels.quantize_rows(rows)
        return cpu_kernels.IntKeys(
            torch._int_mm(codes, self.key_codes.t()), row_scale, self.key_scale
        )


class XQuantCache(WindowStores):
    """XQuant (Tomar, Hooper et al., arXiv 2508.10395): cache the layer's normed input X, or for
    a GQA layer its SVD latents, quantized (backends/latents.py), instead of K and V, and rebuild
    what attention needs at each step: K (bias and k-norm as in the forward, RoPE at each token's
    original position), but never V: the output of head h is (sum_t a_ht L_t) @ D_v,h, the
    attention-weighted sum of cached rows projected once. The newest tokens' rows are exact.
    In a chain (xquant-cl), layers past the first few store differences from the layer before.
    A sliding-window layer's (`window`) holds only the groups of tokens its window overlaps."""

    def __init__(
        self,
        latents: Latents,
        cache: CacheSpec,
        dtype,
        device,
        scratch,
        chains=None,
        delta=False,
        window=0,
    ):
        self.kind, self.latents, self.scratch, self.window = cache.kind, latents, scratch, window
        # the CPU engine's steps rebuild keys in int8 where the cache's own error dwarfs int8's
        self.keys_in_int8 = cache.bits <= INT8_KEYS_BITS and latents.key_codes is not None
        self.stores = [
            TokenStore(
                w,
                cache,
                pc,
                dtype,
                device,
                scratch,
                chains[i] if chains else None,
                delta,
                spans,
                window,
            )  # fmt: skip
            for i, (w, (pc, spans)) in enumerate(zip(latents.widths, latents.layouts, strict=True))
        ]

    # Decode through the Triton kernel: on CUDA by default; the tests force it on CPU tensors,
    # which Triton's interpreter runs.
    fused_decode: bool | None = None

    def _fused(self, q) -> bool:
        if kernels.triton is None:
            return False
        return q.is_cuda if self.fused_decode is None else self.fused_decode

    @property
    def offset(self) -> int:
        return len(self.stores[0])

    def attend(self, layer, x, q, cos, sin, mask, step):
        start, end = self.offset, self.offset + x.shape[1]
        self.slide(start)
        latents = self.latents
        for store, new in zip(
            self.stores, latents.encode(x[0]).split(latents.widths, -1), strict=True
        ):
            store.append(new)
        q = rotate(q, cos[start:end], sin[start:end])
        first = self.first  # the tables and mask from the oldest row held on
        cos, sin = cos[first:end], sin[first:end]
        if q.shape[2] == 1 and mask is None and self._fused(q):
            mixed = self._fused_mixed(layer, q, cos, sin) @ latents.value_heads
        else:
            mask = None if mask is None else mask[:, first:]
            mixed = self._mixed(layer, q, cos, sin, mask, step)
        if not (step and x.shape[1] > 1):  # a tree's path is chosen after it
            self.slide(end)
        return layer.finish_values(mixed.view(1, q.shape[1], q.shape[2], -1))

    def _mixed(self, layer, q, cos, sin, mask, step):
        """The attention-weighted sums of the value stream's rows, each head's through its block
        of the value projection, (H_kv, n_rep * T, D): the cache is read a span of tokens at a time
        into reused buffers (K rebuilt and rotated for that span only; spans merged by their
        softmax maxima and sums), so the transient memory stays bounded however long the chat.
        A chain's accumulated rows are whole by nature."""
        latents, dtype, device, end = self.latents, q.dtype, q.device, cos.shape[0]
        heads = latents.value_heads
        n_kv, t = layer.n_kv_heads, q.shape[2]
        q = q.reshape(n_kv, -1, q.shape[-1])
        if mask is None and t > 1:
            mask = torch.ones(t, end, dtype=torch.bool, device=device).tril(end - t)
        if mask is not None:
            mask = mask.repeat(q.shape[1] // t, 1)
        # a decode step on the CPU: scores, softmax and weighted sum in one C pass per span
        engine = not q.is_cuda and cpu_kernels.library() is not None and not self._fused(q)
        one_pass = engine and t == 1 and mask is None
        # int8 keys where the rebuild is most of the pass: a decode step, and a drafter's tree,
        # which must score as the steps it stands for (lossless); a prompt's chunk spreads the
        # rebuild over its tokens and keeps the float rebuild's precision
        int8_keys = engine and step and self.keys_in_int8
        chained = [store.read(dtype) if store.chain is not None else None for store in self.stores]
        parts, n_sink = [], self.stores[0].sink.shape[0]
        span = span_for(q.shape[0] * q.shape[1])
        for start, stop in itertools.pairwise([0, *range(n_sink + span, end, span), end]):
            cached = [
                rows[start:stop] if rows is not None else self._span(i, store, start, stop, dtype)
                for i, (store, rows) in enumerate(zip(self.stores, chained, strict=True))
            ]
            key_rows, values = cached[latents.key_stream], cached[latents.value_stream]
            keys = latents.int8_keys(key_rows.float()) if int8_keys else latents.to_keys(key_rows)
            if one_pass:
                tables = cos[start:stop], sin[start:stop]
                finish = key_finish(layer)
                mixed, lse = cpu_kernels.rope_attend(keys, q, *tables, *finish, values, heads)
                if stop - start == end:
                    return mixed.to(dtype)
                parts.append((mixed[:, None], lse[:, None], torch.ones_like(lse)[:, None]))
                continue
            scores = self._scores(layer, q, keys, cos[start:stop], sin[start:stop])
            if mask is not None:
                scores.masked_fill_(~mask[:, start:stop], float("-inf"))
            if stop - start == end:  # one span: a plain softmax
                return torch.softmax(scores, dim=-1).to(dtype) @ values @ heads
            top = scores.amax(-1)
            weights = torch.exp(scores - top.nan_to_num(neginf=0.0)[..., None])
            mixed = weights.to(dtype) @ values @ heads
            parts.append((mixed[:, None], top[:, None], weights.sum(-1)[:, None]))
        return kernels.merge_partials(parts).to(dtype)

    def _scores(self, layer, q, keys, cos, sin):
        """q (H_kv, m, D) against the rebuilt keys x @ W_k (T, kv_dim): the forward's bias and
        k-norm, RoPE, the scaled products, (H_kv, m, T) float32; in one C pass over the keys on
        the CPU (cpu_kernels.c), else as torch ops."""
        if not q.is_cuda and cpu_kernels.library() is not None:
            return cpu_kernels.rope_scores(keys, q, cos, sin, *key_finish(layer))
        keys = layer.finish_keys(keys[None].to(q.dtype))
        rotated = self.scratch("rotated", keys.shape, q.dtype, q.device)
        keys = rotate(keys, cos, sin, out=rotated)
        return (q @ keys[0].transpose(1, 2)).float() * q.shape[-1] ** -0.5

    def _span(self, i, store, start, stop, dtype):  # stream i's rows start..stop, reused buffer
        buffer = self.scratch(i, (stop - start, store.width), dtype, store.exact.device)
        return store.read(dtype, buffer, start, stop)

    def _fused_mixed(self, layer, q, cos, sin):
        """The same for one new token, in the Triton kernel (backends/cuda/kernels.py): keys are
        rebuilt chunk by chunk in registers, straight from the packed codes."""
        half, bias = q.shape[-1] // 2, layer.wkv.bias
        norm = layer.k_norm if layer.qk_norm else None
        fixed = dict(
            q=q[0, :, 0].contiguous(),
            to_keys=self.latents.to_keys.weight,
            bias=None if bias is None else bias[: layer.kv_dim],
            norm=None if norm is None else norm.weight,
            eps=0.0 if norm is None else norm.eps,
        )
        cos, sin = cos[:, :half].contiguous(), sin[:, half:].contiguous()  # rows: positions
        keys, values = (
            self.stores[i] for i in (self.latents.key_stream, self.latents.value_stream)
        )
        key_segments = keys.segments(q.dtype)
        # one stream (X itself) is both: read once, a chain's deltas must not be added twice
        value_segments = key_segments if values is keys else values.segments(q.dtype)
        parts, start = [], 0
        for key_rows, value_rows in zip(key_segments, value_segments, strict=True):
            end = start + len(key_rows)
            parts.append(
                kernels.latent_attention_partials(
                    keys=key_rows,
                    values=value_rows,
                    cos=cos[start:end],
                    sin=sin[start:end],
                    **fixed,
                )
            )
            start = end
        return kernels.merge_partials(parts).to(q.dtype)

    def trim(self, n_keep: int) -> None:
        for store in self.stores:
            store.trim(n_keep)

    @property
    def room(self) -> int:
        return min(store.room for store in self.stores)

    def keep(self, start: int, rows: list[int]) -> None:
        for store in self.stores:
            store.keep(start, rows)

    def state_dict(self) -> dict:
        return nested_state({str(i): s for i, s in enumerate(self.stores)})

    def load_state_dict(self, state: dict) -> None:
        load_nested_state({str(i): s for i, s in enumerate(self.stores)}, state)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores)

    @property
    def residual_nbytes(self) -> int:
        return sum(store.residual_nbytes for store in self.stores)

    @property
    def residual_tokens(self) -> int:
        return self.stores[0].n_exact

    @property
    def factor_nbytes(self) -> int:
        return self.latents.nbytes

    reserved_bytes = nbytes


SPAN = 4096  # cached tokens whose keys the torch path rebuilds at once
SCORES_BYTES = 2**24  # a prompt chunk's span is shortened so its float32 scores stay within this


def span_for(rows: int) -> int:
    """Cached tokens read at once for `rows` query rows (heads x new tokens): SPAN for a decode
    step; for a prompt's chunk as many as keep its scores within SCORES_BYTES (the scores of 512
    new tokens of 32 heads against 4096 keys took 268 MB, and their softmax as much again: a
    quantized cache's prefill peaked above the exact cache's; with 64 MB of scores, a 4000-token
    prompt on the default model still peaked at 700 MB against kv's 588, with 16 MB at 631), a
    multiple of every group size."""
    return min(SPAN, max(128, SCORES_BYTES // (4 * rows) // 128 * 128))


INT8_KEYS_BITS = 4  # XQuant caches of at most these bits: steps rebuild keys in int8 (CPU engine)
BASE_LAYERS, BASE_BITS = 3, 4  # XQuant-CL: the first layers are plain xquant and seed the chain


def new_caches(cache: CacheSpec, spec: ModelSpec, dtype, device, scratch, latents) -> list:
    """One cache per layer. `latents(group, cross_layer)` gives every layer's Latents."""
    from .window import WindowKVCache  # it builds on KVCache

    n = spec.n_layers
    if cache.kind == "kv":  # a sliding-window layer holds only its window
        return [
            WindowKVCache(spec.window(i), spec.n_kv_heads, spec.head_dim, dtype, device, scratch)
            if spec.window(i)
            else KVCache(spec.n_kv_heads, spec.head_dim, spec.max_context, dtype, device, scratch)
            for i in range(n)
        ]
    if cache.kind == "kv-quant":
        return [
            QuantKVCache(
                spec.n_kv_heads, spec.head_dim, cache, dtype, device, scratch, spec.window(i)
            )
            for i in range(n)
        ]
    layers = latents(cache.group, cross_layer=cache.kind == "xquant-cl")
    if cache.kind == "xquant":
        return [
            XQuantCache(layer, cache, dtype, device, scratch, window=spec.window(i))
            for i, layer in enumerate(layers)
        ]
    # one chain per kind of layer (backends/latents.py, cl_chains)
    base = dataclasses.replace(cache, bits=max(cache.bits, BASE_BITS))
    caches = [None] * n
    for chain in cl_chains(spec.windows, n):
        streams = [Chain() for _ in layers[0].widths]
        for place, i in enumerate(chain):
            caches[i] = XQuantCache(
                layers[i], base if place < BASE_LAYERS else cache, dtype, device, scratch,
                streams, delta=place >= BASE_LAYERS, window=spec.window(i),
            )  # fmt: skip
    return caches
