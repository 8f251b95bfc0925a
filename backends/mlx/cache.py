"""Per-layer attention caches for the MLX backend (mirror of backends/cuda/cache.py). Each cache
owns its layer's attention: `attend(layer, x, q, k, v, rope, mask)` gets the layer, its (normed)
input x, the new tokens' q and pre-RoPE k, v; it stores what its kind keeps and returns the
attention output."""

from __future__ import annotations

import dataclasses
import itertools
import math

import mlx.core as mx
import numpy as np

from xqchat.models.spec import ModelSpec

from ..base import CacheSpec
from ..latents import LayerLatents, cl_chains, row_group
from ..window import SlidingStore, WindowStores
from .kernels import merge_partials, rope_scores
from .layers import TreeRope
from .quant import Quantized, dequantize, quantize


def attention(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)


class KVCache:
    """Exact K (after RoPE) and V in the weights' dtype. Storage grows in steps and is written by
    slice, so a decode step allocates nothing; `trim` only moves the offset."""

    kind = "kv"
    step = 256

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, dtype):
        self.shape = (1, n_kv_heads, 0, head_dim)
        self.max_len, self.dtype = max_len, dtype
        self.keys = self.values = mx.zeros(self.shape, dtype=dtype)
        self.offset = 0

    def _reserve(self, length: int) -> None:
        capacity = min(self.max_len, max(length, 2 * self.keys.shape[2], self.step))
        capacity = max(capacity, length)
        b, h, _, d = self.shape
        keys = mx.zeros((b, h, capacity, d), dtype=self.dtype)
        values = mx.zeros_like(keys)
        keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
        values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = keys, values

    def update_and_fetch(self, k: mx.array, v: mx.array):
        """Append k, v (B, H, T, D); return all cached K, V up to and including them."""
        end = self.offset + k.shape[2]
        if end > self.keys.shape[2]:
            self._reserve(end)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def attend(self, layer, x, q, rope, mask):
        k, v = layer.keys_values(x)
        q, k = rope(q, self.offset), rope(k, self.offset)
        return attention(q, *self.update_and_fetch(k, v), mask)

    def trim(self, n_keep: int) -> None:
        self.offset = min(self.offset, n_keep)

    @property
    def room(self) -> int:
        """New rows that fit before anything already held would change (here: the context)."""
        return self.max_len - self.offset

    def keep(self, start: int, rows: list[int]) -> None:
        """Of the rows from `start` on (a drafter's tree), keep `rows` (ascending) as the rows
        start, start + 1, ...; drop the rest."""
        index = mx.array(rows) + start
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
        return 2 * self.offset * self.keys.shape[1] * self.keys.shape[3] * self.keys.itemsize

    residual_nbytes = residual_tokens = 0  # every token is stored exactly; none is "residual"

    @property
    def reserved_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class Chain:
    """XQuant-CL's transient accumulator for one stream of a stack of layers. Layers run in order,
    so layer i finds here what layer i-1 reconstructed in this forward: the blocks it flushed
    (their rows predict the same tokens' rows of layer i, which stores only the difference) and
    all its flushed rows (to which layer i adds its own dequantized differences)."""

    def __init__(self):
        self.blocks: list[mx.array] = []
        self.rows: mx.array | None = None


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
        self, width, spec: CacheSpec, per_channel: bool, dtype, chain=None, delta=False,
        spans_rows=False, window=0,
    ):  # fmt: skip
        self.width, self.bits, self.group, self.residual = (
            width,
            spec.bits,
            spec.group,
            spec.residual,
        )
        self.per_channel, self.chain, self.delta = per_channel, chain, delta
        # values per scale and zero point
        spanned = per_channel or spans_rows
        self.row_group = self.group if spanned else row_group(width, spec.group)
        # per token, MLX's groups run along a packed row: one that spans rows packs as many
        # tokens as make whole groups (576 wide in groups of 128: two), read as PyTorch's
        self.tokens_per_row = (
            1 if per_channel else self.row_group // math.gcd(width, self.row_group)
        )
        self.n_sink, self.window, self.first = spec.sink, window, 0
        self.sink = self.exact = mx.zeros((0, width), dtype=dtype)
        self.blocks: Quantized | None = None  # stacked: codes (n_blocks, rows, packed words)

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
        if take > 0 and self.exact.shape[0] and not self.first:
            self.sink = mx.concatenate([self.sink, self.exact[:take]])
            self.exact = self.exact[take:]

    def append(self, rows: mx.array) -> None:
        self.exact = mx.concatenate([self.exact, rows.astype(self.exact.dtype)])
        self._fill_sink()
        predictions = self.chain.blocks if self.delta else []
        flushed = []
        while self.exact.shape[0] >= self.residual + self.group:
            block = self.exact[: self.group].astype(mx.float32)
            self.exact = self.exact[self.group :]
            if self.delta:
                block = block - predictions[len(flushed)]
            quantized = quantize(self._packed_rows(block), self.bits, self.row_group)
            self.blocks = _append_block(self.blocks, quantized)
            rebuilt = self._rows(dequantize(quantized))
            flushed.append(rebuilt + predictions[len(flushed)] if self.delta else rebuilt)
        if self.chain is not None:
            self.chain.blocks = flushed

    def _drop_blocks(self, n: int) -> None:  # the oldest n flushed blocks (backends/window.py)
        last = self.n_blocks
        self.blocks = None if n == last else _take(self.blocks, n, last)

    def _packed_rows(self, block):  # (group, width) -> the rows `quantize` packs
        if self.per_channel:
            return block.T
        return block.reshape(-1, self.tokens_per_row * self.width)

    def _rows(self, values):  # dequantized block(s) -> rows (..., group, width)
        if self.per_channel:
            return values.swapaxes(-1, -2)
        return values.reshape(*values.shape[:-2], self.group, self.width)

    def flushed(self) -> mx.array:
        """The flushed blocks' rows, (n_blocks * group, width) float32, dequantized (and
        accumulated: a chain carries the blocks' rows, the sink's are exact in every layer)."""
        if self.blocks is None:
            rows = mx.zeros((0, self.width), dtype=mx.float32)
        else:
            rows = self._rows(dequantize(self.blocks)).reshape(-1, self.width)
        if self.delta:
            rows = rows + self.chain.rows
        if self.chain is not None:
            self.chain.rows = rows
        return rows

    def read(self, dtype) -> mx.array:
        """All rows held, (held, width)."""
        parts = (self.sink, self.flushed(), self.exact)
        return mx.concatenate([p.astype(dtype) for p in parts])

    def _split(self, start: int, stop: int):
        """Rows start..stop (counted from `first`; start 0, or the sink's end plus a multiple of
        the group) as the sink rows, the block indices they cover and the exact rows they take."""
        n_sink, n_old = self.sink.shape[0], self.n_fixed

        def block(i):
            return (min(max(i, n_sink), n_old) - n_sink) // self.group

        exact = self.exact[max(start, n_old) - n_old : max(stop, n_old) - n_old]
        return self.sink[start:stop], (block(start), block(stop)), exact

    def rows_times(self, m: mx.array, start: int, stop: int) -> mx.array:
        """rows[start:stop] @ m, (stop - start, m columns), for a store outside a chain. The
        quantized blocks go to mx.quantized_matmul as the quantized operand, so they are
        dequantized inside the product, never as an array: a per-token block is rows packed
        along the width (m on the left, transposed; a row of p tokens meets p copies of m down
        a block diagonal), a per-channel one is stored transposed, channels packed along
        tokens."""
        sink, (first, last), exact = self._split(start, stop)
        parts = [sink.astype(m.dtype) @ m]
        if first < last:
            codes, scale, zero = self._operand(first, last)
            p = self.tokens_per_row
            left = m.T.astype(mx.float32)
            if p > 1:  # (p * columns, p * width): token j of a row -> output rows j
                left = mx.concatenate(
                    [mx.pad(left, [(0, 0), (j * self.width, (p - 1 - j) * self.width)])
                     for j in range(p)]
                )  # fmt: skip
            old = mx.quantized_matmul(
                left, codes, scale, zero, transpose=not self.per_channel,
                group_size=self.row_group, bits=self.bits,
            )  # fmt: skip
            # (p * columns, packed rows) -> (tokens, columns)
            old = old.reshape(p, m.shape[1], -1).transpose(2, 0, 1).reshape(-1, m.shape[1])
            parts.append(old.astype(m.dtype))
        return mx.concatenate([*parts, exact.astype(m.dtype) @ m])

    def times_rows(self, a: mx.array, start: int, stop: int) -> mx.array:
        """a @ rows[start:stop] for a (..., stop - start) over a per-token store, the same way
        (a row of p tokens: the weights of its token j times the row, whose part j is kept)."""
        sink, (first, last), exact = self._split(start, stop)
        n_sink, n_old = sink.shape[0], sink.shape[0] + (last - first) * self.group
        out = a[..., :n_sink] @ sink.astype(a.dtype) + a[..., n_old:] @ exact.astype(a.dtype)
        if first == last:
            return out
        codes, scale, zero = self._operand(first, last)
        p, w = self.tokens_per_row, self.width
        weights = a[..., n_sink:n_old].astype(mx.float32)
        weights = weights.reshape(*a.shape[:-1], -1, p).swapaxes(-1, -2)  # (..., p, rows)
        old = mx.quantized_matmul(
            weights, codes, scale, zero, transpose=False, group_size=self.row_group, bits=self.bits
        )  # (..., p, p * width)
        old = sum(old[..., j, j * w : (j + 1) * w] for j in range(p))
        return old.astype(a.dtype) + out

    def _operand(self, first: int, last: int):
        """Blocks first..last as one quantized matrix: (tokens / p, p * width) per token,
        (width, tokens) per channel; scales and zero points in float32, as dequantize uses them."""
        b, n = self.blocks, last - first
        parts = (b.codes, b.scale.astype(mx.float32), b.zero.astype(mx.float32))
        parts = tuple(p[first:last] for p in parts)
        if self.per_channel:  # (blocks, width, packed) -> (width, blocks * packed)
            return tuple(p.transpose(1, 0, 2).reshape(self.width, -1) for p in parts)
        return tuple(p.reshape(n * self.group // self.tokens_per_row, -1) for p in parts)

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
        rows = self.read(self.exact.dtype)[min(kept, n_keep) : n_keep]
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
            exact, first = mx.concatenate([self.sink, self.exact]), start
            self.sink = self.sink[:0]
        else:
            exact, first = self.exact, start - self.n_fixed
            assert first >= 0, "the rows to keep were flushed"
        self.exact = mx.concatenate([exact[:first], exact[mx.array(rows) + first]])
        self._fill_sink()

    def state_dict(self) -> dict:
        state = {"sink": self.sink, "exact": self.exact}
        if self.blocks is not None:
            state.update(codes=self.blocks.codes, scale=self.blocks.scale, zero=self.blocks.zero)
        if self.first:
            state["first"] = mx.array([self.first])
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sink, self.exact, self.blocks = state["sink"], state["exact"], None
        self.first = int(state["first"][0]) if "first" in state else 0
        if "codes" in state:
            self.blocks = Quantized(
                state["codes"], state["scale"], state["zero"], self.bits, self.row_group
            )

    @property
    def residual_nbytes(self) -> int:
        """The exact rows: the sink's and the newest window's (fixed, however long the chat)."""
        return self.sink.nbytes + self.exact.nbytes

    @property
    def nbytes(self) -> int:
        return self.residual_nbytes + (0 if self.blocks is None else self.blocks.nbytes)


def _append_block(blocks: Quantized | None, block: Quantized) -> Quantized:
    """Stack `block` onto `blocks` along a leading block axis."""
    parts = [block.codes[None], block.scale[None], block.zero[None]]
    if blocks is not None:
        parts = [
            mx.concatenate([a, b])
            for a, b in zip((blocks.codes, blocks.scale, blocks.zero), parts, strict=True)
        ]
    return Quantized(*parts, block.bits, block.group)


def _take(blocks: Quantized, first: int, last: int) -> Quantized:
    parts = (blocks.codes[first:last], blocks.scale[first:last], blocks.zero[first:last])
    return Quantized(*parts, blocks.bits, blocks.group)


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

    def __init__(self, n_kv_heads: int, head_dim: int, spec: CacheSpec, dtype, window=0):
        width = n_kv_heads * head_dim
        self.heads, self.head_dim, self.window = n_kv_heads, head_dim, window
        self.keys = TokenStore(width, spec, per_channel=True, dtype=dtype, window=window)
        self.values = TokenStore(width, spec, per_channel=False, dtype=dtype, window=window)
        self.stores = [self.keys, self.values]

    @property
    def offset(self) -> int:
        return len(self.keys)

    def attend(self, layer, x, q, rope, mask):
        k, v = layer.keys_values(x)
        start = self.offset
        self.slide(start)
        self.keys.append(_rows(k))
        self.values.append(_rows(v))
        first = self.first
        keys = rope(self._heads(self.keys.read(q.dtype)), first)
        if mask is not None and not isinstance(mask, str):
            mask = mask[:, first:]
        out = attention(rope(q, start), keys, self._heads(self.values.read(q.dtype)), mask)
        if not isinstance(rope, TreeRope):  # a tree's path is chosen after it
            self.slide(self.offset)
        return out

    def _heads(self, rows):  # (S, H * D) -> (1, H, S, D)
        return rows.reshape(1, -1, self.heads, self.head_dim).transpose(0, 2, 1, 3)

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


def _rows(x):  # (1, H, T, D) -> (T, H * D)
    return x[0].transpose(1, 0, 2).reshape(x.shape[2], -1)


class Latents:
    """One layer's XQuant streams and rebuild matrices (backends/latents.py) as arrays."""

    def __init__(self, layer: LayerLatents, dtype):
        self.encode = mx.array(np.concatenate([s.encode for s in layer.streams], axis=1), dtype)
        self.widths = [s.encode.shape[1] for s in layer.streams]
        self.layouts = [(s.per_channel, s.spans_rows) for s in layer.streams]
        self.keys, self.values = (
            (i, mx.array(matrix, dtype)) for i, matrix in (layer.keys, layer.values)
        )
        self.nbytes = self.encode.nbytes + self.keys[1].nbytes + self.values[1].nbytes


class XQuantCache(WindowStores):
    """XQuant (Tomar, Hooper et al., arXiv 2508.10395): cache the layer's normed input X, or for
    a GQA layer its SVD latents, quantized (backends/latents.py), instead of K and V, and rebuild
    what attention needs at each step: K (bias and k-norm as in the forward, RoPE at each token's
    original position), but never V: the output of head h is (sum_t a_ht L_t) @ D_v,h, the
    attention-weighted sum of cached rows projected once. The newest tokens' rows are exact.
    In a chain (xquant-cl), layers past the first few store differences from the layer before.
    A sliding-window layer's (`window`) holds only the groups of tokens its window overlaps."""

    def __init__(
        self, latents: Latents, cache: CacheSpec, dtype, chains=None, delta=False, window=0
    ):
        self.kind, self.latents, self.window = cache.kind, latents, window
        self.stores = [
            TokenStore(w, cache, pc, dtype, chains[i] if chains else None, delta, spans, window)
            for i, (w, (pc, spans)) in enumerate(zip(latents.widths, latents.layouts, strict=True))
        ]

    @property
    def offset(self) -> int:
        return len(self.stores[0])

    def attend(self, layer, x, q, rope, mask):
        start, t = self.offset, x.shape[1]
        self.slide(start)
        encode = self.latents.encode
        rows = mx.split(x[0].astype(encode.dtype) @ encode, _cuts(self.latents.widths), axis=-1)
        for store, new in zip(self.stores, rows, strict=True):
            store.append(new)
        first = self.first  # rows are counted from the oldest held
        held = start + t - first
        h_kv = layer.n_kv_heads
        q = rope(q, start).reshape(h_kv, -1, q.shape[-1])  # (H_kv, n_rep * T, D)
        if mask is not None:  # "causal": new tokens see the cache and each other causally
            causal = isinstance(mask, str)
            visible = (
                mx.tril(mx.ones((t, held), dtype=mx.bool_), k=held - t)
                if causal
                else mask[:, first:]
            )
            mask = mx.tile(visible, (q.shape[1] // t, 1))
        mixed = self._mixed(layer, q, rope, mask, held, first)
        if not isinstance(rope, TreeRope):  # a tree's path is chosen after it
            self.slide(self.offset)
        to_values = self.latents.values[1]
        heads = to_values.reshape(to_values.shape[0], h_kv, -1).swapaxes(0, 1)
        out = (mixed @ heads).reshape(1, q.shape[0] * q.shape[1] // t, t, -1).astype(q.dtype)
        return layer.finish_values(out)

    def _mixed(self, layer, q, rope, mask, end, first):
        """The attention-weighted sums of the value stream's rows, (H_kv, n_rep * T, width), over
        the `end` rows held, the oldest at position `first`:
        the cache is read a span of tokens at a time (span_for; K rebuilt for that span only, spans merged by
        their softmax maxima and sums), so no full-length K is built however long the chat. A
        chain's accumulated rows are whole by nature."""
        (ki, to_keys), (vi, to_values) = self.latents.keys, self.latents.values
        chained = [s.read(to_keys.dtype) if s.chain is not None else None for s in self.stores]

        def times(i, m, start, stop):  # rows[start:stop] @ m of stream i
            if chained[i] is None:
                return self.stores[i].rows_times(m, start, stop)
            return chained[i][start:stop] @ m

        def weighted(i, a, start, stop):  # a @ rows[start:stop] of stream i
            if chained[i] is None:
                return self.stores[i].times_rows(a, start, stop)
            return a @ chained[i][start:stop].astype(a.dtype)

        parts, scale, n_sink = [], q.shape[-1] ** -0.5, self.stores[0].sink.shape[0]
        span = span_for(q.size // q.shape[-1])
        for start, stop in itertools.pairwise([0, *range(n_sink + span, end, span), end]):
            keys = layer.finish_keys(times(ki, to_keys, start, stop)[None].astype(q.dtype))[0]
            # decode: RoPE on the keys inside the scores, no rotated copy (where one set of
            # frequencies rotates the span: LongRoPE's switch may fall inside it)
            inv_freq = rope.freqs_for(first + start, first + stop) if mask is None else None
            if inv_freq is not None:
                flat = q.reshape(-1, q.shape[-1])
                scores = rope_scores(flat, keys, inv_freq, scale, first + start)
                scores = scores.reshape(q.shape[0], q.shape[1], -1)
            else:
                keys = rope(keys[None], first + start)[0]
                scores = (q @ keys.swapaxes(1, 2)).astype(mx.float32) * scale
                if mask is not None:
                    scores = mx.where(mask[:, start:stop], scores, -mx.inf)
            if stop - start == end:  # one span: a plain softmax
                weights = mx.softmax(scores, axis=-1).astype(to_values.dtype)
                return weighted(vi, weights, start, stop)
            top = mx.max(scores, axis=-1, keepdims=True)
            weights = mx.exp(scores - mx.where(top == -mx.inf, 0.0, top))
            mixed = weighted(vi, weights.astype(to_values.dtype), start, stop)
            parts.append((mixed.astype(mx.float32), top, weights.sum(-1, keepdims=True)))
        return merge_partials(parts).astype(to_values.dtype)

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


def _cuts(widths):  # split points between consecutive widths
    return [sum(widths[: i + 1]) for i in range(len(widths) - 1)]


SPAN = 4096  # cached tokens whose keys are rebuilt at once (a multiple of every group size)
SCORES_BYTES = 2**24  # a prompt chunk's span is shortened so its float32 scores stay within this


def span_for(rows: int) -> int:
    """Cached tokens read at once for `rows` query rows (heads x new tokens): SPAN for a decode
    step; for a prompt's chunk as many as keep its scores within SCORES_BYTES (cuda/cache.py)."""
    return min(SPAN, max(128, SCORES_BYTES // (4 * rows) // 128 * 128))


BASE_LAYERS, BASE_BITS = 3, 4  # XQuant-CL: the first layers are plain xquant and seed the chain


def new_caches(cache: CacheSpec, spec: ModelSpec, dtype, latents) -> list:
    """One cache per layer. `latents(group, cross_layer)` gives every layer's Latents."""
    from .window import WindowKVCache  # it builds on KVCache

    n = spec.n_layers
    if cache.kind == "kv":  # a sliding-window layer holds only its window
        return [
            WindowKVCache(spec.window(i), spec.n_kv_heads, spec.head_dim, dtype)
            if spec.window(i)
            else KVCache(spec.n_kv_heads, spec.head_dim, spec.max_context, dtype)
            for i in range(n)
        ]
    if cache.kind == "kv-quant":
        return [
            QuantKVCache(spec.n_kv_heads, spec.head_dim, cache, dtype, spec.window(i))
            for i in range(n)
        ]
    layers = latents(cache.group, cross_layer=cache.kind == "xquant-cl")
    if cache.kind == "xquant":
        return [
            XQuantCache(layer, cache, dtype, window=spec.window(i))
            for i, layer in enumerate(layers)
        ]
    # one chain per kind of layer (backends/latents.py, cl_chains)
    base = dataclasses.replace(cache, bits=max(cache.bits, BASE_BITS))
    caches = [None] * n
    for chain in cl_chains(spec.windows, n):
        streams = [Chain() for _ in layers[0].widths]
        for place, i in enumerate(chain):
            caches[i] = XQuantCache(
                layers[i], base if place < BASE_LAYERS else cache, dtype, streams,
                place >= BASE_LAYERS, spec.window(i),
            )  # fmt: skip
    return caches
