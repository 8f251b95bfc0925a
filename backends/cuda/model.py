"""Llama-family decoder in PyTorch: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3
(q/k norm), SmolLM3 (no RoPE in every fourth layer), Phi-3/Phi-4-mini (checkpoints normalised at
load: models/conventions.py), Gemma 3 (scaled embeddings, GeGLU, norms after attention and the
FFN, per-layer RoPE bases, sliding-window layers, logit soft-capping).

In the spirit of gpt-fast's model.py; transformers' modeling files are the numerical oracle the
tests compare against. K/V (`wkv`) and gate/up (`w13`) are each one matmul; a cache
that holds X rebuilds K and V with `wkv` alone.

Two dtypes: the weights' (fp32, bf16, fp16) and the activations'. On a GPU they are the same. On a
CPU the residual stream and attention run in fp32: PyTorch's CPU attention and elementwise kernels
are several times faster in fp32 than in fp16/bf16, and fp32 cannot overflow. Only the matmuls,
which read the weights and so bound decode speed, run in the weights' dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from . import cpu_paths
from .cache import Latents, Scratch, new_caches
from .int8 import Int8Embedding, Int8Linear
from .layers import Linear, RMSNorm, Rope, window_mask
from .qlinear import QEmbedding, QLinear
from .session import EngineSession

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = ("int8", "q4", "q8")  # weights held as codes; the rest of the model in bf16


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_dim = spec.n_heads * spec.head_dim
        self.kv_dim = spec.kv_dim
        self.wq = Linear(spec.dim, q_dim, bias=spec.qkv_bias)
        self.wkv = Linear(spec.dim, 2 * spec.kv_dim, bias=spec.qkv_bias)  # one matmul rebuilds both
        self.wo = Linear(q_dim, spec.dim, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.qk_norm, self.query_scale = spec.qk_norm, spec.query_scale

    def forward(self, x, cos, sin, cache, mask, step):
        """cos, sin: RoPE tables for every position up to the last new token; the cache rotates.
        `step`: a decode step or a drafter's tree (not a prompt's chunk)."""
        b, t, _ = x.shape
        q = self.wq(x).to(x.dtype).view(b, t, self.n_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
        if self.query_scale != 1.0:  # Gemma's query_pre_attn_scalar, in place of sqrt(head_dim)
            q = q * self.query_scale
        # the cache computes K and V from x if it keeps them (XQuant keeps x instead)
        out = cache.attend(self, x, q.transpose(1, 2), cos, sin, mask, step)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def keys_values(self, x):
        """x (B, T, dim) -> K before RoPE (k-norm and bias applied) and V, each (B, H_kv, T, D)."""
        b, t, _ = x.shape
        k, v = self.wkv(x).to(x.dtype).split(self.kv_dim, dim=-1)
        return self._keys(k), v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def _keys(self, k):  # (B, T, kv_dim) -> (B, H_kv, T, D), k-norm applied
        k = k.view(*k.shape[:2], self.n_kv_heads, self.head_dim)
        return (self.k_norm(k) if self.qk_norm else k).transpose(1, 2)

    def finish_keys(self, k):
        """Keys a cache rebuilt as x @ W_k, (B, T, kv_dim) -> (B, H_kv, T, D) with the bias and
        k-norm the forward applies."""
        if self.wkv.bias is not None:
            k = k + self.wkv.bias[: self.kv_dim].to(k.dtype)
        return self._keys(k)

    def finish_values(self, out):
        """Attention output a cache built from values rebuilt without their bias, (B, H, T, D):
        the weights of each query sum to one, so the bias adds once per head."""
        if self.wkv.bias is None:
            return out
        bias = self.wkv.bias[self.kv_dim :].to(out.dtype).view(self.n_kv_heads, 1, self.head_dim)
        return out + bias.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.hidden_dim, self.gelu = spec.hidden_dim, spec.gemma  # Gemma: GeGLU
        self.w13 = Linear(spec.dim, 2 * spec.hidden_dim, bias=False)  # gate and up, fused
        self.w2 = Linear(spec.hidden_dim, spec.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w2(gate * up)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attention = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.feed_forward = FeedForward(spec)
        if spec.gemma:  # Gemma norms what attention and the FFN add to the residual, too
            self.post_attention_norm = RMSNorm(spec.dim, spec.norm_eps)
            self.post_ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.gemma = spec.gemma

    def forward(self, x, cos, sin, cache, mask, step):
        attended = self.attention(self.attention_norm(x), cos, sin, cache, mask, step)
        h = x + (self.post_attention_norm(attended) if self.gemma else attended)
        fed = self.feed_forward(self.ffn_norm(h))
        return h + (self.post_ffn_norm(fed) if self.gemma else fed)


def layer_ropes(spec: ModelSpec) -> tuple[nn.ModuleList, list[int]]:
    """One Rope per distinct RoPE among the layers (Gemma's local and global, SmolLM3's none),
    and each layer's index into them."""
    kinds = list(dict.fromkeys(spec.layer_rope(i) for i in range(spec.n_layers)))
    ropes = nn.ModuleList(Rope(kind, spec.head_dim) for kind in kinds)
    return ropes, [kinds.index(spec.layer_rope(i)) for i in range(spec.n_layers)]


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.ropes, self.layer_rope = layer_ropes(spec)
        if not spec.tied_embeddings:
            self.lm_head = Linear(spec.dim, spec.vocab_size, bias=False)
        self.scratch = Scratch()
        self.bf16_paths = None  # (decode, prompt) paths of bf16 matmuls on a CPU (see load)
        self.int8_keys = False  # XQuant's CPU key rebuild in int8 (torch._int_mm pays here)
        self.latent_layers: dict = {}  # (group, cross_layer) -> per-layer Latents, built on demand

    def forward(
        self, tokens: torch.Tensor, caches: list, tree=None, long_from: int | None = None
    ) -> torch.Tensor:
        """tokens (B, T) continuing what `caches` hold -> final normed hidden states (B, T, dim).
        With `tree` = (positions (T,), mask (T, T) bool), the new tokens are a drafter's tree:
        each sits at its own position and sees the cache and the new tokens its mask allows.
        `long_from`: LongRoPE's rows rotated with its long factors from there on."""
        start = caches[0].offset
        end = start + tokens.shape[1]
        x = self.embed(tokens).to(self.norm.weight.dtype)
        if self.spec.gemma:  # Gemma scales its embeddings, by sqrt(dim) rounded to their dtype
            x = x * torch.tensor(self.spec.dim**0.5, dtype=self.embed.weight.dtype).to(x.dtype)
        mask, positions, rows = None, None, None
        if tree is not None:
            positions, tree_mask = tree
            last = int(positions.max())
            # caches index the tables by row: row i of the cache is at position rows[i]
            rows = torch.cat([torch.arange(start, device=x.device), positions])
            past = torch.ones(len(positions), start, dtype=torch.bool, device=x.device)
            mask = torch.cat([past, tree_mask], dim=1)
        else:
            last = end - 1
            if (
                start > 0 and tokens.shape[1] > 1
            ):  # new tokens see the cache and each other causally
                mask = torch.ones(end - start, end, dtype=torch.bool, device=x.device).tril(start)
        tables = [rope.table(last + 1, x.dtype, long_from) for rope in self.ropes]
        if rows is not None:
            tables = [(cos[rows], sin[rows]) for cos, sin in tables]
        masks = {0: mask}  # by window; a window the newest token does not pass changes nothing
        for window in set(self.spec.windows) - {0}:
            narrow = last >= window
            masks[window] = (
                window_mask(mask, start, end, window, x.device, positions) if narrow else mask
            )
        step = tree is not None or tokens.shape[1] == 1
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            cos, sin = tables[self.layer_rope[i]]
            x = layer(x, cos, sin, cache, masks[self.spec.window(i)], step)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._logits(hidden)
        cap = self.spec.final_softcap
        return logits if not cap else cap * torch.tanh(logits / cap)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.spec.tied_embeddings:
            return self.lm_head(hidden)
        if isinstance(self.embed, (Int8Embedding, QEmbedding)):  # the table is the head
            return self.embed.logits(hidden)
        table = self.embed.weight
        if table.dtype == torch.float16 and table.device.type == "cpu" and hidden.shape[-2] > 1:
            return self.rows_head()(hidden)
        return F.linear(hidden.to(table.dtype), table)

    def rows_head(self) -> Linear:
        """The fp16 tied table (see load) as a bf16 Linear, for products of many rows (a drafter's
        tree, perplexity chunks): fp16 is fast here for one row only, and converting the table per
        call costs more than the product (13 rows, one thread: fp16 46 ms, convert + bf16 70 ms,
        packed bf16 6 ms). Built on first use; weight_bytes counts it from then on."""
        if not hasattr(self, "head_for_rows"):
            self.head_for_rows = self.linear(self.embed.weight.T.float().numpy())
        return self.head_for_rows

    def new_caches(self, cache: CacheSpec) -> list:
        device = self.embed.weight.device
        return new_caches(cache, self.spec, self.kv_dtype, device, self.scratch, self.latents)

    def linear(self, matrix: np.ndarray, bias: torch.Tensor | None = None) -> Linear:
        """x @ matrix (+ bias) as a Linear in the weights' dtype and layout (packed where they
        are)."""
        device = self.embed.weight.device
        linear = Linear(*matrix.shape, bias=bias is not None, device=device)
        # row-major (out, in), as every Linear holds its weight: the fused decode kernel reads it so
        weight = torch.from_numpy(np.ascontiguousarray(matrix.T))
        linear.weight = nn.Parameter(weight.to(device, self.kv_dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(device, self.kv_dtype), requires_grad=False)
        if self.bf16_paths is not None and linear.weight.dtype == torch.bfloat16:
            linear.use(*self.bf16_paths)
        return linear

    def latents(self, group: int, cross_layer: bool) -> list[Latents]:
        """XQuant's per-layer streams (backends/latents.py), from the weights as the engine
        holds them; the SVDs are computed once per model and kept with it."""
        key = (group, cross_layer)
        if key not in self.latent_layers:
            kv_dim = self.spec.kv_dim
            w = [
                layer.attention.wkv.dense_weight().float().T.cpu().numpy() for layer in self.layers
            ]
            layers, self.svd_seconds = layer_latents(
                [a[:, :kv_dim] for a in w],
                [a[:, kv_dim:] for a in w],
                group,
                self.derived,
                cross_layer,
                self.spec.windows,
            )
            device, act_dtype = self.embed.weight.device, self.norm.weight.dtype
            self.latent_layers[key] = [
                Latents(layer, self.linear, self.spec.head_dim, act_dtype, device, self.int8_keys)
                for layer in layers
            ]
            del w, layers  # the float copies the SVDs read, the numpy factors: handed back now
            release_freed_memory()
        return self.latent_layers[key]


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise XQError("--device cuda: no CUDA GPU is visible to PyTorch")
    if device not in ("cpu", "cuda"):
        raise XQError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return device


def pick_dtype(weights: str, device: str) -> str:
    if weights == "auto":
        # Half-width weights halve the bytes each decode step reads. On CPU, fp16 has the fastest
        # plain matrix-vector product but PyTorch's fp16 matrix-matrix product is ~10x slower than
        # bf16's (prompts, drafter verification); packed bf16 is fast at every width.
        return "bf16"
    if weights not in (*DTYPES, "int8", "q4", "q8"):
        raise XQError(f"unknown weights '{weights}' (use auto, fp32, bf16, fp16, int8, q4 or q8)")
    return weights


@contextlib.contextmanager
def uninitialized():
    """Modules built without initializing their parameters, which the checkpoint then assigns:
    on the meta device PyTorch's init functions import torch._dynamo (and sympy), which cost
    each load 1.5 s and 70 MB."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def as_int8(module: Transformer, names, threshold: float) -> None:
    """Replace the Linear (and tied Embedding) modules whose weights are `names` by their int8
    forms, still on the meta device: load_state_dict then assigns codes and scales."""
    for name in names:
        path, _ = name.rsplit(".", 1)
        parent, _, child = path.rpartition(".")
        owner = module.get_submodule(parent)
        old = getattr(owner, child)
        if isinstance(old, nn.Embedding):
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, threshold)
        else:
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, threshold)
        setattr(owner, child, new)


def as_packed(module: Transformer, packed: dict) -> None:
    """Replace the Linear (and tied Embedding) modules of the `packed` engine matrices by their
    q4/q8 forms, still on the meta device: load_state_dict then assigns codes, scales and mins."""
    for name, p in packed.items():
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        owner = module.get_submodule(parent)
        old = getattr(owner, child)
        if isinstance(old, nn.Embedding):
            new = QEmbedding(old.num_embeddings, old.embedding_dim, p.bits, p.group)
        else:
            new = QLinear(old.in_features, old.out_features, old.bias is not None, p.bits, p.group)
        setattr(owner, child, new)


class Engine(EngineBase):
    """A loaded model: the Transformer plus what the engine contract asks of it."""

    backend = "torch"
    session_class = EngineSession

    def profile_decode(self, prompt: list[int], steps: int = 32) -> dict:
        from .profile import profile_decode

        return profile_decode(self, prompt, steps)

    def int8_layers(self) -> dict:
        return {n: m for n, m in self.module.named_modules() if type(m) is Int8Linear}

    def use_int8_threshold(self, threshold: float) -> None:
        """LLM.int8's outlier threshold for every int8 matrix, the head's included."""
        for layer in self.module.modules():
            if isinstance(layer, Int8Linear):
                layer.threshold = threshold

    @staticmethod
    def to_numpy(x):
        return x.detach().float().cpu().numpy()

    def load_drafter(self, folder):
        from .drafter import load_drafter

        return load_drafter(folder, self.module)

    def weight_bytes(self) -> int:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        frequencies = {id(b) for b in self.module.ropes.buffers()}  # LongRoPE's long ones too
        return sum(t.numel() * t.element_size() for t in tensors if id(t) not in frequencies)


def load(files: ModelFiles, opts: EngineOptions) -> Engine:
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.weights, device)
    spec, tensors = engine_checkpoint(files, opts)
    derived = derived_dir(files)
    if dtype == "int8":  # converted once, then read from the cache next to the model
        tensors, _ = int8.cached(spec, tensors, derived / "int8", opts.mha, opts.int8_head)
    # int8, q4, q8: what stays in floating point (norms, biases, an untied embedding table, the
    # K/V cache, a quantized file's float matrices)
    torch_dtype = DTYPES.get(dtype, torch.bfloat16)
    act_dtype = torch_dtype if device == "cuda" else torch.float32
    # A tied table on CPU is held in fp16 when its values fit: the one-row head product (every
    # decode step) runs ~2.4x faster in fp16 than in bf16 (1.7 vs 4.1 ms here), and is closer to
    # fp32. Same bytes; products of many rows go through a bf16 copy made on first use
    # (see Transformer.rows_head).
    half_table = device == "cpu" and dtype in ("bf16", "int8") and spec.tied_embeddings

    def working_dtype(name, array):
        if array.dtype == np.int8 or name.endswith(int8.SCALE_SUFFIX):
            return None  # int8 codes and their float32 scales stay as they are
        if name.endswith("norm.weight") or (dtype in QUANTIZED and name.endswith("bias")):
            return act_dtype
        if half_table and name == "model.embed_tokens.weight" and np.abs(array).max() < 6e4:
            return torch.float16
        return torch_dtype

    with warnings.catch_warnings():  # memory-mapped arrays are read-only; weights are never written
        warnings.simplefilter("ignore", UserWarning)
        weights, quantized = {}, {}
        for name, array in tensors:
            if isinstance(array, qweights.Packed):
                quantized[name] = array
            else:
                weights[name] = torch.from_numpy(array).to(device, working_dtype(name, array))
    packed = qweights.engine_packed(quantized, weights, spec, lambda t: t.float().cpu().numpy())
    if packed and dtype == "bf16":  # --weights auto on a quantized file keeps its quantization
        dtype = qweights.label(packed)
    scales = int8.engine_scales(int8.split_scales(weights), spec, torch.cat)
    state = to_engine_layout(weights, spec, torch.cat, skip=packed)
    state |= {name.removesuffix("weight") + "scale": s for name, s in scales.items()}
    for name, p in packed.items():
        stem = name.removesuffix("weight")
        arrays = {"weight": p.codes, "scale": p.scale, "min": p.min}
        state |= {
            stem + k: torch.from_numpy(a).to(device) for k, a in arrays.items() if a is not None
        }
    with torch.device("meta"), uninitialized():
        module = Transformer(spec)
        as_int8(module, scales, opts.int8_threshold or 0.0)  # None (auto): set after the load
        as_packed(module, packed)
    try:
        module.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise XQError(
            f"the checkpoint does not match its config: {str(e).splitlines()[1].strip()}"
        ) from None
    module.ropes = layer_ropes(spec)[0].to(device)  # their tables were built on the meta device
    module.kv_dtype = torch_dtype
    module.derived = derived / "xquant"  # SVD factors, kept with the model
    module.eval().requires_grad_(False)
    paths = None
    if device == "cpu":  # what is fastest on this CPU, measured (cpu_paths.py)
        paths = cpu_paths.choose(2 * spec.hidden_dim, spec.dim)
        module.int8_keys = paths.int_mm
        for layer in module.modules():
            if isinstance(layer, Int8Linear):
                layer.int_mm = paths.int_mm
        if packed:
            paths = dataclasses.replace(paths, q_prompt=cpu_paths.q_prompt(spec.dim))
            for layer in module.modules():
                if isinstance(layer, QLinear):
                    layer.prompt = cpu_paths.Q_PROMPTS[paths.q_prompt]
        if torch_dtype == torch.bfloat16:
            module.bf16_paths = (paths.bf16, paths.bf16_prompt)
            for linear in module.modules():
                if isinstance(linear, Linear):
                    linear.use(*module.bf16_paths)
    engine = Engine(module, device, dtype, opts.cache)
    if paths is not None:
        engine.paths |= paths.describe(bf16=torch_dtype == torch.bfloat16)
    return engine
