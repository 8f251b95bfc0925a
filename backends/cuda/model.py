"""Llama-family decoder in PyTorch: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

In the spirit of gpt-fast's model.py; transformers' modeling_llama/qwen2/qwen3 are the numerical
oracle the tests compare against. Q/K/V and gate/up are fused into one matmul each.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from xqchat.models.errors import XQError
from xqchat.models.registry import ModelFiles
from xqchat.models.spec import ModelSpec
from xqchat.models.weights import open_checkpoint

from ..base import EngineOptions
from .cache import KVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rope(nn.Module):
    """Rotate-half RoPE with a cos/sin table grown on demand (positions are absolute)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        inv_freq = torch.from_numpy(spec.rope.inv_freq(spec.head_dim)).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cos = self.sin = None

    def table(self, end: int, dtype):
        if self.cos is None or self.cos.shape[0] < end or self.cos.dtype != dtype:
            n = max(end, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self.cos, self.sin

    @staticmethod
    def apply(x, cos, sin):  # x: (B, H, T, D); cos, sin: (T, D)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_dim = spec.n_heads * spec.head_dim
        self.splits = [q_dim, spec.kv_dim, spec.kv_dim]
        self.wqkv = nn.Linear(spec.dim, q_dim + 2 * spec.kv_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(q_dim, spec.dim, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.qk_norm = spec.qk_norm

    def forward(self, x, cos, sin, cache: KVCache, mask):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(self.splits, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = Rope.apply(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = Rope.apply(k.transpose(1, 2), cos, sin)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k, v = cache.update_and_fetch(k, v)
        causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.hidden_dim = spec.hidden_dim
        self.w13 = nn.Linear(spec.dim, 2 * spec.hidden_dim, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(spec.hidden_dim, spec.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.attention = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.feed_forward = FeedForward(spec)

    def forward(self, x, cos, sin, cache, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.rope = Rope(spec)
        if not spec.tied_embeddings:
            self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """tokens (B, T) continuing what `caches` hold -> final normed hidden states (B, T, dim)."""
        start = caches[0].offset
        end = start + tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.rope.table(end, x.dtype)
        cos, sin = cos[start:end], sin[start:end]
        mask = None
        if start > 0 and tokens.shape[1] > 1:  # new tokens see the whole cache and each other causally
            mask = torch.ones(end - start, end, dtype=torch.bool, device=x.device).tril(start)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.spec.tied_embeddings:
            return F.linear(hidden, self.embed.weight)
        return self.lm_head(hidden)

    def new_caches(self) -> list[KVCache]:
        p = self.embed.weight
        spec = self.spec
        return [
            KVCache(spec.n_kv_heads, spec.head_dim, spec.max_context, p.dtype, p.device)
            for _ in range(spec.n_layers)
        ]


def sanitize(weights: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """transformers' checkpoint names -> this module's names, fusing q/k/v and gate/up."""
    out = {"embed.weight": weights.pop("model.embed_tokens.weight"),
           "norm.weight": weights.pop("model.norm.weight")}
    if not spec.tied_embeddings:
        out["lm_head.weight"] = weights.pop("lm_head.weight")
    weights.pop("lm_head.weight", None)
    for i in range(spec.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[o + "attention.wqkv.weight"] = torch.cat(
            [weights.pop(a + n + "_proj.weight") for n in "qkv"], dim=0)
        if spec.qkv_bias:
            out[o + "attention.wqkv.bias"] = torch.cat([weights.pop(a + n + "_proj.bias") for n in "qkv"])
        out[o + "attention.wo.weight"] = weights.pop(a + "o_proj.weight")
        if spec.qk_norm:
            out[o + "attention.q_norm.weight"] = weights.pop(a + "q_norm.weight")
            out[o + "attention.k_norm.weight"] = weights.pop(a + "k_norm.weight")
        out[o + "feed_forward.w13.weight"] = torch.cat(
            [weights.pop(p + "mlp.gate_proj.weight"), weights.pop(p + "mlp.up_proj.weight")], dim=0)
        out[o + "feed_forward.w2.weight"] = weights.pop(p + "mlp.down_proj.weight")
        out[o + "attention_norm.weight"] = weights.pop(p + "input_layernorm.weight")
        out[o + "ffn_norm.weight"] = weights.pop(p + "post_attention_layernorm.weight")
    leftover = [k for k in weights if "rotary_emb" not in k]
    if leftover:
        raise XQError(f"unexpected tensors in the checkpoint, e.g. {leftover[0]}")
    return out


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
        # bf16 halves the bytes each decode step reads; this pays on GPUs and on CPUs with
        # native bf16 dot products (AVX-512 BF16 / AMX), where PyTorch's oneDNN path uses them.
        return "bf16" if device == "cuda" or torch.backends.mkldnn.is_available() else "fp32"
    if weights not in DTYPES:
        raise XQError(f"unknown weights '{weights}' (use auto, fp32, bf16 or fp16)")
    return weights


class TorchModel:
    """A loaded model: the Transformer plus what the engine contract asks of it."""

    backend = "torch"

    def __init__(self, module: Transformer, device: str, dtype: str):
        self.module, self.spec, self.device, self.dtype = module, module.spec, device, dtype

    def new_session(self):
        from .session import TorchSession

        return TorchSession(self)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())


def load(files: ModelFiles, opts: EngineOptions) -> TorchModel:
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.weights, device)
    checkpoint = open_checkpoint(files)
    spec = checkpoint.spec
    torch_dtype = DTYPES[dtype]
    with warnings.catch_warnings():  # memory-mapped arrays are read-only; weights are never written
        warnings.simplefilter("ignore", UserWarning)
        weights = {name: torch.from_numpy(array).to(device=device, dtype=torch_dtype)
                   for name, array in checkpoint.tensors()}
    try:
        state = sanitize(weights, spec)
    except KeyError as e:
        raise XQError(f"the checkpoint lacks the tensor {e.args[0]}") from None
    with torch.device("meta"):
        module = Transformer(spec)
    try:
        module.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise XQError(f"the checkpoint does not match its config: {str(e).splitlines()[1].strip()}") from None
    module.rope = Rope(spec).to(device)  # its table was built on the meta device
    return TorchModel(module.eval().requires_grad_(False), device, dtype)
