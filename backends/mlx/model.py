"""Llama-family decoder in MLX: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3
(q/k norm), SmolLM3, Phi-3/Phi-4-mini and Gemma 3 (see backends/cuda/model.py).

The mirror of backends/cuda/model.py, in the spirit of mlx-lm's models/llama.py, using MLX's
fused kernels (mx.fast.rms_norm, mx.fast.rope, mx.fast.scaled_dot_product_attention).

Every matrix is stored transposed, (in, out): MLX's CPU matrix-vector product runs ~2.5x faster
on that layout than on nn.Linear's (out, in) (all of SmolLM2-135M's layer matmuls: 44 vs 111 ms
per token, measured with mlx[cpu] 0.32), and Metal has fast kernels for both. The embedding table
is held the same way, so a tied LM head multiplies by it directly and a lookup gathers columns.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from xqchat.models import qweights
from xqchat.models.errors import XQError
from xqchat.models.paths import derived_dir
from xqchat.models.registry import ModelFiles
from xqchat.models.spec import ModelSpec
from xqchat.models.weights import to_engine_layout

from .. import int8
from ..base import CacheSpec, EngineBase, EngineOptions, engine_checkpoint
from ..heap import release_freed_memory
from ..latents import layer_latents
from .cache import Latents, new_caches
from .int8 import Int8Embedding, Int8Linear
from .kernels import geglu, swiglu
from .layers import Embedding, Linear, RMSNorm, Rope, TreeRope, window_mask
from .qlinear import BlockQLinear, QEmbedding, QLinear, use_block_layout
from .session import ENGINE, EngineSession

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_dim = spec.n_heads * spec.head_dim
        self.kv_dim = spec.kv_dim
        self.wq = Linear(spec.dim, q_dim, bias=spec.qkv_bias)
        self.wkv = Linear(spec.dim, 2 * spec.kv_dim, bias=spec.qkv_bias)  # one matmul rebuilds both
        self.wo = Linear(q_dim, spec.dim)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.qk_norm, self.query_scale = spec.qk_norm, spec.query_scale
        self.rope = Rope(spec.layer_rope(layer), spec.head_dim)

    def __call__(self, x, cache, mask, tree=None, long_from=None):
        """`tree`: (start, positions) of a drafter's tree, else None. `long_from`: LongRoPE's
        rows rotated with its long factors from there on."""
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.n_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
        if self.query_scale != 1.0:  # Gemma's query_pre_attn_scalar, in place of sqrt(head_dim)
            q = q * self.query_scale
        rope = self.rope.at(long_from)
        rope = rope if tree is None else TreeRope(rope, *tree)
        # the cache computes K and V from x if it keeps them (XQuant keeps x instead)
        out = cache.attend(self, x, q.transpose(0, 2, 1, 3), rope, mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(b, t, -1))

    def keys_values(self, x):
        """x (B, T, dim) -> K before RoPE (k-norm and bias applied) and V, each (B, H_kv, T, D)."""
        b, t, _ = x.shape
        k, v = mx.split(self.wkv(x), [self.kv_dim], axis=-1)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
        return self._keys(k), v.transpose(0, 2, 1, 3)

    def _keys(self, k):  # (B, T, kv_dim) -> (B, H_kv, T, D), k-norm applied
        k = k.reshape(*k.shape[:2], self.n_kv_heads, self.head_dim)
        return (self.k_norm(k) if self.qk_norm else k).transpose(0, 2, 1, 3)

    def finish_keys(self, k):
        """Keys a cache rebuilt as x @ W_k, (B, T, kv_dim) -> (B, H_kv, T, D) with the bias and
        k-norm the forward applies."""
        if "bias" in self.wkv:
            k = k + self.wkv.bias[: self.kv_dim].astype(k.dtype)
        return self._keys(k)

    def finish_values(self, out):
        """Attention output a cache built from values rebuilt without their bias, (B, H, T, D):
        the weights of each query sum to one, so the bias adds once per head."""
        if "bias" not in self.wkv:
            return out
        bias = self.wkv.bias[self.kv_dim :].astype(out.dtype).reshape(self.n_kv_heads, 1, -1)
        return out + mx.repeat(bias, self.n_heads // self.n_kv_heads, axis=0)


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w13 = Linear(spec.dim, 2 * spec.hidden_dim)  # gate and up, fused
        self.w2 = Linear(spec.hidden_dim, spec.dim)
        self.gelu = spec.gemma  # Gemma: GeGLU

    def __call__(self, x):
        return self.w2((geglu if self.gelu else swiglu)(self.w13(x)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attention = Attention(spec, layer)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.feed_forward = FeedForward(spec)
        if spec.gemma:  # Gemma norms what attention and the FFN add to the residual, too
            self.post_attention_norm = RMSNorm(spec.dim, spec.norm_eps)
            self.post_ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.gemma = spec.gemma

    def __call__(self, x, cache, mask, tree=None, long_from=None):
        attended = self.attention(self.attention_norm(x), cache, mask, tree, long_from)
        h = x + (self.post_attention_norm(attended) if self.gemma else attended)
        fed = self.feed_forward(self.ffn_norm(h))
        return h + (self.post_ffn_norm(fed) if self.gemma else fed)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = Embedding(spec.vocab_size, spec.dim)
        self.layers = [Block(spec, i) for i in range(spec.n_layers)]
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        if not spec.tied_embeddings:
            self.lm_head = Linear(spec.dim, spec.vocab_size)
        # (group, cross_layer) -> per-layer Latents, built on demand; a plain attribute, not a
        # child module (nn.Module keeps dict attributes in its parameter tree)
        object.__setattr__(self, "latent_layers", {})

    def __call__(self, tokens: mx.array, caches: list, tree=None, long_from=None) -> mx.array:
        """tokens (B, T) continuing what `caches` hold -> final normed hidden states (B, T, dim).
        With `tree` = (positions (T,), mask (T, T) bool), the new tokens are a drafter's tree:
        each sits at its own position and sees the cache and the new tokens its mask allows.
        `long_from`: LongRoPE's rows rotated with its long factors from there on."""
        x = self.embed(tokens)
        if self.spec.gemma:  # Gemma scales its embeddings, by sqrt(dim) rounded to their dtype
            x = x * mx.array(self.spec.dim**0.5, dtype=x.dtype)
        # new tokens see the whole cache and each other causally (MLX aligns "causal" bottom-right)
        mask = "causal" if tokens.shape[1] > 1 else None
        start = caches[0].offset
        end, last, positions = start + tokens.shape[1], start + tokens.shape[1] - 1, None
        if tree is not None:
            positions, tree_mask = tree
            past = mx.ones((tree_mask.shape[0], start), dtype=mx.bool_)
            mask = mx.concatenate([past, tree_mask], axis=1)
            last = int(positions.max())
            tree = (start, positions)
        masks = {0: mask}  # by window; a window the newest token does not pass changes nothing
        for window in set(self.spec.windows) - {0}:
            narrow = last >= window
            masks[window] = window_mask(mask, start, end, window, positions) if narrow else mask
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            x = layer(x, cache, masks[self.spec.window(i)], tree, long_from)
        return self.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        logits = self.embed.as_linear(hidden) if self.spec.tied_embeddings else self.lm_head(hidden)
        cap = self.spec.final_softcap
        return logits if not cap else cap * mx.tanh(logits / cap)

    def new_caches(self, cache: CacheSpec) -> list:
        return new_caches(cache, self.spec, self.kv_dtype, self.latents)

    def latents(self, group: int, cross_layer: bool) -> list[Latents]:
        """XQuant's per-layer streams (backends/latents.py), from the weights as the engine
        holds them; the SVDs are computed once per model and kept with it."""
        key = (group, cross_layer)
        if key not in self.latent_layers:
            kv_dim = self.spec.kv_dim
            w = [np.array(dense_weight(layer.attention.wkv)) for layer in self.layers]
            layers, self.svd_seconds = layer_latents(
                [a[:, :kv_dim] for a in w],
                [a[:, kv_dim:] for a in w],
                group,
                self.derived,
                cross_layer,
                self.spec.windows,
            )
            self.latent_layers[key] = [Latents(layer, self.kv_dtype) for layer in layers]
            del w, layers  # the float copies the SVDs read, the numpy factors: handed back now
            release_freed_memory()
        return self.latent_layers[key]


def dense_weight(linear) -> mx.array:
    """A Linear's (in, out) weight in float32, dequantised when it is int8, q4 or q8."""
    if isinstance(linear, (Int8Linear, QLinear, BlockQLinear)):
        return linear.dense_weight()
    return linear.weight.astype(mx.float32)


def as_int8(module: Transformer, names, dtype: mx.Dtype, threshold: float) -> None:
    """Replace the Linear (and tied Embedding) modules whose weights are `names` by their int8
    forms; load_weights then assigns codes and scales."""
    for name in names:
        *path, child, _ = name.split(".")
        owner = module
        for part in path:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        d_in, d_out = getattr(owner, child).weight.shape
        if isinstance(getattr(owner, child), Embedding):
            new = Int8Embedding(d_out, d_in, dtype, threshold)
        else:
            new = Int8Linear(d_in, d_out, "bias" in getattr(owner, child), threshold)
        setattr(owner, child, new)


def as_packed(module: Transformer, packed: dict, dtype: mx.Dtype) -> None:
    """Replace the Linear (and tied Embedding) modules of the `packed` engine matrices by their
    q4/q8 forms; load_weights then assigns codes, scales and biases."""
    for name, p in packed.items():
        *path, child, _ = name.split(".")
        owner = module
        for part in path:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        d_out, d_in = p.shape
        if isinstance(getattr(owner, child), Embedding):
            new = QEmbedding(d_out, d_in, p.bits, p.group, dtype)
        else:
            new = QLinear(d_in, d_out, "bias" in getattr(owner, child), p.bits, p.group)
        setattr(owner, child, new)


def pick_device(device: str) -> str:
    if device == "cuda":
        raise XQError("the MLX backend has no CUDA device; use --backend torch")
    if device not in ("auto", "cpu"):
        raise XQError(f"unknown device '{device}' (use auto, cpu or cuda)")
    metal = mx.metal.is_available()
    if device == "cpu" and metal:
        mx.set_default_device(mx.cpu)
        return "cpu"
    return "metal" if metal else "cpu"


def pick_dtype(weights: str, device: str) -> str:
    if weights == "auto":
        # MLX's CPU kernels for half types are no faster than fp32 (bf16) or ~4x slower (fp16).
        return "bf16" if device == "metal" else "fp32"
    if weights not in (*DTYPES, "int8", "q4", "q8"):
        raise XQError(f"unknown weights '{weights}' (use auto, fp32, bf16, fp16, int8, q4 or q8)")
    return weights


class Engine(EngineBase):
    """A loaded model: the Transformer plus what the engine contract asks of it."""

    backend = "mlx"
    session_class = EngineSession

    def profile_decode(self, prompt: list[int], steps: int = 32) -> dict:
        from .profile import profile_decode

        return profile_decode(self, prompt, steps)

    def int8_layers(self) -> dict:
        return {n: m for n, m in self.module.named_modules() if type(m) is Int8Linear}

    def use_int8_threshold(self, threshold: float) -> None:
        """LLM.int8's outlier threshold for every int8 matrix, the head's included."""
        for _, layer in self.module.named_modules():
            if isinstance(layer, Int8Linear):
                layer.threshold = threshold

    @staticmethod
    def to_numpy(x):
        return np.array(x.astype(mx.float32))

    def load_drafter(self, folder):
        from .drafter import load_drafter

        return load_drafter(folder, self.module)

    def use_drafter(
        self, folder, width: int = 4, length: int = 4, lookup: int = 0, adaptive: bool = False
    ) -> None:
        ENGINE.call(super().use_drafter, folder, width, length, lookup, adaptive)

    def weight_bytes(self) -> int:
        return sum(w.nbytes for _, w in nn.utils.tree_flatten(self.module.parameters()))


def load(files: ModelFiles, opts: EngineOptions) -> Engine:
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.weights, device)
    spec, tensors = engine_checkpoint(files, opts)
    derived = derived_dir(files)
    if dtype == "int8":  # converted once, then read from the cache next to the model
        tensors, _ = int8.cached(spec, tensors, derived / "int8", opts.mha, opts.int8_head)
    # int8, q4, q8: what stays in floating point (norms, biases, an untied table, the cache,
    # activations, a quantized file's float matrices)
    mx_dtype = DTYPES.get(dtype, DTYPES[pick_dtype("auto", device)])
    weights, quantized = {}, {}
    for name, array in tensors:
        if isinstance(array, qweights.Packed):
            quantized[name] = array
            continue
        array = np.ascontiguousarray(array.T) if array.ndim == 2 else array  # (in, out)
        keep = array.dtype == np.int8 or name.endswith(int8.SCALE_SUFFIX)  # codes and scales
        weights[name] = mx.array(array) if keep else mx.array(array).astype(mx_dtype)
        mx.eval(weights[name])
    packed = qweights.engine_packed(quantized, weights, spec, lambda a: np.array(a.T, np.float32))
    if packed and dtype == pick_dtype("auto", device):  # --weights auto keeps a file's quantization
        dtype = qweights.label(packed)
    # parts were transposed, so q/k/v and gate/up (and their scales) join along the last axis
    scales = int8.split_scales(weights)
    join = lambda parts: mx.concatenate(parts, axis=-1)  # noqa: E731
    scales = int8.engine_scales(scales, spec, join)
    state = to_engine_layout(weights, spec, join, skip=packed)
    state |= {name.removesuffix("weight") + "scale": s for name, s in scales.items()}
    for name, p in packed.items():
        stem = name.removesuffix("weight")
        arrays = zip(("weight", "scales", "biases"), qweights.to_mlx(p), strict=True)
        state |= {stem + key: mx.array(a) for key, a in arrays}
    module = Transformer(spec)
    as_int8(module, scales, mx_dtype, opts.int8_threshold or 0.0)  # auto: set after load
    as_packed(module, packed, mx_dtype)
    try:
        module.load_weights(list(state.items()), strict=True)
    except ValueError as e:
        raise XQError(f"the checkpoint does not match its config: {e}") from None
    if device == "cpu" and sys.platform != "darwin":  # no SIMD quantized kernels (qlinear.py)
        use_block_layout(module)
    module.kv_dtype = mx_dtype
    module.derived = derived / "xquant"  # SVD factors, kept with the model
    mx.eval(module.parameters())
    return Engine(module, device, dtype, opts.cache)
