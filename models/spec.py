"""ModelSpec: one normalised description of a Llama-family model, from config.json or GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import XQError

# HF model_type -> whether the architecture has qkv bias / q-k RMSNorm.
ARCHITECTURES = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
}
ROPE_TYPES = ("default", "linear", "llama3")


def unsupported_architecture(name: str) -> XQError:
    return XQError(
        f"unsupported architecture '{name}': xqchat runs {', '.join(sorted(ARCHITECTURES))} "
        "(Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3)"
    )


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # Per-frequency divisors stored in some GGUF files (llama.cpp's rope_freqs tensor).
    freq_divisors: tuple[float, ...] | None = field(default=None, repr=False)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies, float64, shape (head_dim // 2,)."""
        inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.freq_divisors is not None:
            return inv / np.asarray(self.freq_divisors, dtype=np.float64)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            # Long wavelengths are stretched by `factor`, short ones kept, the band between
            # interpolated smoothly (Llama 3.1 paper, "RoPE scaling").
            wavelen = 2 * math.pi / inv
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            blended = (1 - smooth) * inv / self.factor + smooth * inv
            return np.where(
                wavelen > low_wavelen,
                inv / self.factor,
                np.where(wavelen < high_wavelen, inv, blended),
            )
        return inv


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float
    rope: RopeSpec
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    max_context: int
    notes: tuple[str, ...] = ()  # limitations the user should be told about

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def fp16_kv_bytes(self, tokens: int) -> int:
        """Bytes an fp16 K/V cache holds for `tokens` tokens: the reference every cache is compared to."""
        return tokens * self.n_layers * 2 * self.kv_dim * 2

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelSpec:
        arch = cfg.get("model_type", "?")
        if arch not in ARCHITECTURES:
            raise unsupported_architecture(arch)
        try:
            n_heads = cfg["num_attention_heads"]
            dim = cfg["hidden_size"]
            max_context = cfg.get("max_position_embeddings", 4096)
            notes = []
            window = cfg.get("sliding_window")
            window_on = cfg.get("use_sliding_window", arch == "mistral")
            if window and window_on and window < max_context:
                notes.append(
                    f"context limited to the {window}-token sliding window "
                    "(sliding-window attention is not implemented)"
                )
                max_context = window
            return cls(
                arch=arch,
                n_layers=cfg["num_hidden_layers"],
                dim=dim,
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or dim // n_heads,
                hidden_dim=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope=_rope_from_hf(cfg),
                qkv_bias=cfg.get("attention_bias", ARCHITECTURES[arch]["qkv_bias"]),
                qk_norm=ARCHITECTURES[arch]["qk_norm"],
                tied_embeddings=cfg.get("tie_word_embeddings", False),
                max_context=max_context,
                notes=tuple(notes),
            )
        except KeyError as e:
            raise XQError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set[str], rope_freqs=None) -> ModelSpec:
        """`meta`: GGUF key/values; `rope_freqs`: the optional rope_freqs tensor's values."""
        arch = meta.get("general.architecture", "?")
        if arch not in ARCHITECTURES:
            raise unsupported_architecture(arch)
        a = arch + "."
        try:
            dim = int(meta[a + "embedding_length"])
            n_heads = int(meta[a + "attention.head_count"])
            head_dim = int(meta.get(a + "attention.key_length", dim // n_heads))
            scaling = meta.get(a + "rope.scaling.type", "none")
            rope = RopeSpec(
                theta=float(meta.get(a + "rope.freq_base", 10000.0)),
                type="linear" if scaling == "linear" else "default",
                factor=float(meta.get(a + "rope.scaling.factor", 1.0)),
                freq_divisors=None if rope_freqs is None else tuple(float(x) for x in rope_freqs),
            )
            if scaling not in ("none", "linear"):
                raise XQError(
                    f"unsupported RoPE scaling '{scaling}' (supported: {', '.join(ROPE_TYPES)})"
                )
            return cls(
                arch=arch,
                n_layers=int(meta[a + "block_count"]),
                dim=dim,
                n_heads=n_heads,
                n_kv_heads=int(meta.get(a + "attention.head_count_kv", n_heads)),
                head_dim=head_dim,
                hidden_dim=int(meta[a + "feed_forward_length"]),
                vocab_size=int(meta.get(a + "vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
                norm_eps=float(meta[a + "attention.layer_norm_rms_epsilon"]),
                rope=rope,
                qkv_bias="blk.0.attn_q.bias" in tensor_names,
                qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
                tied_embeddings="output.weight" not in tensor_names,
                max_context=int(meta.get(a + "context_length", 4096)),
            )
        except KeyError as e:
            raise XQError(f"GGUF metadata lacks the key {e.args[0]!r}") from None


def _rope_from_hf(cfg: dict) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters` (holding rope_theta); older configs use a top-level
    # `rope_theta` and an optional `rope_scaling`. A wrong base still gives fluent text, so read both.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise XQError(f"unsupported RoPE scaling '{kind}' (supported: {', '.join(ROPE_TYPES)})")
    return RopeSpec(
        theta=float(theta),
        type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )
