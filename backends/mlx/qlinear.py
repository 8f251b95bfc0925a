"""Group-wise quantized linear layers, q4 and q8, in MLX (models/qweights.py has the format); the
mirror of backends/cuda/qlinear.py. MLX has the kernels: `mx.quantized_matmul` reads its affine
layout (codes packed into uint32, w = code * scale + bias per group), held (out, in) as
nn.QuantizedLinear holds it, on Metal and on the CPU alike. q4 is that layout exactly; q8's
symmetric codes are stored offset by 128 with bias -128 * scale (qweights.to_mlx).

Off macOS, MLX's CPU build has no SIMD quantized kernels: the product over (out, in) codes is a
scalar loop (~1.6 G weights/s on one core here), while the one over codes packed along the
outputs (`transpose=False`) vectorizes (3.6-4.4 G/s). `BlockQLinear` holds a layer that way,
exactly (docs/architecture.md, MLX)."""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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


class BlockQLinear(nn.Module):
    """A QLinear in the layout MLX's CPU build multiplies fastest: each block of `group` inputs
    holds its codes (in, out), packed along the outputs, with its own row of the layer's scales
    and biases in float32 (blocks, out). The product multiplies each block of x by its codes
    alone (a scale of 1, bias 0: exact, whatever groups the kernel reads them in), then applies
    the block's scales and biases to those partial sums: the QLinear's product, reordered."""

    PARTIAL_BYTES = 8 << 20  # the (blocks, rows, out) float32 partial sums of one product

    def __init__(self, layer: QLinear):
        super().__init__()
        self.bits, self.group = layer.bits, layer.group
        d_out, n_blocks = layer.scales.shape
        self.unit = next(u for u in (128, 64, 32) if d_out % u == 0)  # the kernel's own groups
        words = along_outputs(np.array(layer.weight), self.bits)  # (in, out * bits / 32)
        self.weight = mx.array(words.reshape(n_blocks, layer.group, -1))
        self.scales = layer.scales.T.astype(mx.float32)  # (blocks, out)
        self.biases = layer.biases.T.astype(mx.float32)
        if "bias" in layer:
            self.bias = layer.bias
        mx.eval(self.parameters())  # one matrix at a time: a load holds no more than that

    def dense_weight(self) -> mx.array:
        """The dequantized (in, out) weight, float32: the same values as the QLinear's."""
        shape = self.weight.shape[:2] + self.scales.shape[1:]
        w = _codes(self.weight, shape, self.unit, self.bits) * self.scales[:, None]
        return (w + self.biases[:, None]).reshape(-1, shape[-1])

    def __call__(self, x):
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, self.PARTIAL_BYTES // (4 * self.scales.size))  # a prompt chunk in slices
        parts = [self._product(rows[i : i + step]) for i in range(0, len(rows), step)]
        y = (parts[0] if len(parts) == 1 else mx.concatenate(parts)).reshape(*x.shape[:-1], -1)
        return y + self.bias.astype(y.dtype) if "bias" in self else y

    def _product(self, x):  # (M, in) -> (M, out)
        blocks = x.reshape(len(x), -1, self.group).transpose(1, 0, 2)  # (blocks, M, group)
        ones, zeros = _unit_scales(self.weight.shape, self.unit, self.bits, x.dtype)
        partial = mx.quantized_matmul(blocks, self.weight, ones, zeros, False, self.unit, self.bits)
        sums = blocks.sum(-1, keepdims=True)  # (blocks, M, 1): what each block's biases multiply
        return _combine(partial, sums, self.scales[:, None], self.biases[:, None]).astype(x.dtype)


class BlockQEmbedding(BlockQLinear):
    """A tied q4/q8 table in the block layout: the LM head is the block product; a lookup reads
    each token's column of codes, scales and biases."""

    def __init__(self, table: QEmbedding):
        super().__init__(table)
        self.dtype = table.dtype

    def __call__(self, tokens):
        flat, per_word = tokens.reshape(-1), 32 // self.bits
        words = self.weight[:, :, flat // per_word]  # (blocks, group, T)
        shifts = (flat % per_word * self.bits).astype(mx.uint32)
        codes = ((words >> shifts) & ((1 << self.bits) - 1)).astype(mx.float32)
        rows = codes * self.scales[:, None, flat] + self.biases[:, None, flat]
        return rows.reshape(-1, len(flat)).T.reshape(*tokens.shape, -1).astype(self.dtype)

    def as_linear(self, x):
        return super().__call__(x)


@mx.compile  # one pass instead of four (it runs with no C++ compiler on PATH too: checked)
def _combine(partial, sums, scales, biases):
    return (partial * scales + sums * biases).sum(0)


def along_outputs(words: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed (out, in * bits / 32) words, codes along the inputs -> (in, out * bits / 32),
    the same codes packed along the outputs. In numpy, a code to a byte: a matrix's own size."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    codes = np.empty((words.shape[1] * per_word, words.shape[0]), np.uint8)  # (in, out)
    for i in range(per_word):  # input k sits in word k // per_word at bit bits * (k % per_word)
        codes[i::per_word] = ((words >> (bits * i)) & mask).T
    packed = np.zeros((codes.shape[0], codes.shape[1] // per_word), np.uint32)
    for i in range(per_word):
        packed |= codes[:, i::per_word].astype(np.uint32) << (bits * i)
    return packed


def _codes(words, shape, group: int, bits: int) -> mx.array:
    """Packed words -> their codes as float32 (exact), `shape` (..., n)."""
    ones, zeros = _unit_scales(words.shape, group, bits, mx.float32)
    return mx.dequantize(words, ones, zeros, group_size=group, bits=bits).reshape(shape)


@cache
def _unit_scales(shape: tuple, group: int, bits: int, dtype) -> tuple[mx.array, mx.array]:
    """Scales of 1 and biases of 0 for packed words of `shape`: the codes as they are. Shared by
    every layer of a shape (they are no part of the weights)."""
    shape = (*shape[:-1], shape[-1] * 32 // bits // group)
    unit = mx.ones(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)
    mx.eval(unit)  # data, not a graph on the stream of whichever thread asked first
    return unit


def use_block_layout(module) -> None:
    """Hold every q4/q8 product of `module` (its layers, the LM head) in the block layout. An
    untied input table keeps the usual one: it is only looked up. So does a matrix whose outputs
    are no multiple of 32, the kernel's smallest group."""
    fits = lambda layer: layer.scales.shape[0] % 32 == 0  # noqa: E731
    for block in module.layers:
        for _, owner in block.named_modules():
            for name, child in owner.children().items():
                if type(child) is QLinear and fits(child):
                    setattr(owner, name, BlockQLinear(child))
    if module.spec.tied_embeddings and type(module.embed) is QEmbedding and fits(module.embed):
        module.embed = BlockQEmbedding(module.embed)
    elif "lm_head" in module and type(module.lm_head) is QLinear and fits(module.lm_head):
        module.lm_head = BlockQLinear(module.lm_head)
