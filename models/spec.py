"""ModelSpec: one normalised description of a Llama-family model, from config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import XQError

# architecture (HF model_type, llama.cpp's name) -> whether it has qkv bias / q-k RMSNorm.
ARCHITECTURES = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
    "smollm3": dict(qkv_bias=False, qk_norm=False),
    "phi3": dict(qkv_bias=False, qk_norm=False),
    "gemma3": dict(qkv_bias=False, qk_norm=True),
}
ALIASES = {"gemma3_text": "gemma3"}  # transformers' name of Gemma 3's text-only model
# what a multimodal Gemma 3's config.json leaves out of its text_config (transformers' defaults)
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    max_position_embeddings=131_072,
    sliding_window=4096,
    rope_theta=1_000_000.0,
)
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# Gemma 3 scales its embeddings by sqrt(dim), uses GeGLU, norms each block's attention and FFN
# outputs too, and counts its RMSNorm weights from 1 (checkpoints store w, the norm uses 1 + w).
GEMMA = ("gemma3",)


def runnable_architecture(name: str | None) -> bool:
    """Whether a config's model_type or a GGUF's architecture is one xqchat runs."""
    return ALIASES.get(name, name) in ARCHITECTURES


def unsupported_architecture(name: str) -> XQError:
    return XQError(
        f"unsupported architecture '{name}': xqchat runs {', '.join(sorted(ARCHITECTURES))} "
        "(Llama 2/3.x, SmolLM2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3/Phi-4-mini, Gemma 3)"
    )


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # Per-frequency divisors stored in some GGUF files (llama.cpp's rope_freqs tensor), and
    # LongRoPE's (Phi-3) for a context within its original length (its `short_factor`).
    freq_divisors: tuple[float, ...] | None = field(default=None, repr=False)
    # LongRoPE's divisors past the original length (`long_factor`; see `long`)
    long_divisors: tuple[float, ...] | None = field(default=None, repr=False)
    # LongRoPE multiplies cos and sin by this (folded into W_q and W_k: conventions.py)
    attention_factor: float = 1.0
    # Dimensions of each head that rotate (Phi-4-mini: 3/4); 0: all. The weights' Q/K rows are
    # permuted at load (weights.rotary_order) so the rotating ones pair as rotate-half pairs all
    # dimensions; the others get frequency 0, which rotates nothing.
    rotary_dim: int = 0
    none: bool = False  # a layer without RoPE (SmolLM3's every fourth): every frequency is 0

    def long(self) -> RopeSpec | None:
        """LongRoPE's RoPE past `original_max_position`, None for others. As transformers, a
        forward whose last position is past it rotates its tokens with the long factors; the
        tokens fed before keep the rotation they had (the session tracks it: decoding.py)."""
        if self.long_divisors is None:
            return None
        return dataclasses.replace(self, freq_divisors=self.long_divisors, long_divisors=None)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies, float64, shape (head_dim // 2,)."""
        if self.none:
            return np.zeros(head_dim // 2)
        if self.rotary_dim and self.rotary_dim < head_dim:
            rotating = dataclasses.replace(self, rotary_dim=0).inv_freq(self.rotary_dim)
            return np.concatenate([rotating, np.zeros((head_dim - self.rotary_dim) // 2)])
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
    # each layer's sliding window (a token sees itself and the window - 1 before it), 0: global
    # attention; () when every layer is global
    windows: tuple[int, ...] = ()
    local_rope: RopeSpec | None = None  # the sliding layers' RoPE where it differs (Gemma 3)
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3)
    query_scale: float = 1.0  # q is multiplied by it before attention's 1/sqrt(head_dim)
    gemma: bool = False  # Gemma's block: see GEMMA
    final_softcap: float = 0.0  # logits = c * tanh(logits / c) when set

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    def layer_rope(self, layer: int) -> RopeSpec:
        if layer in self.nope_layers:
            return RopeSpec(none=True)
        if self.local_rope is not None and self.window(layer):
            return self.local_rope
        return self.rope

    def fp16_kv_bytes(self, tokens: int) -> int:
        """Bytes an fp16 K/V cache holds for `tokens` tokens: the reference every cache is compared to."""
        return tokens * self.n_layers * 2 * self.kv_dim * 2

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelSpec:
        if cfg.get("model_type") == "gemma3":  # the multimodal checkpoint: its text model
            cfg = {
                **GEMMA3_TEXT_DEFAULTS,
                **cfg.get("text_config", {}),
                "model_type": "gemma3_text",
            }
        arch = ALIASES.get(cfg.get("model_type", "?"), cfg.get("model_type", "?"))
        if arch not in ARCHITECTURES:
            raise unsupported_architecture(arch)
        gemma = arch in GEMMA
        try:
            n_heads = cfg["num_attention_heads"]
            dim = cfg["hidden_size"]
            head_dim = cfg.get("head_dim") or dim // n_heads
            n_layers = cfg["num_hidden_layers"]
            max_context = cfg.get("max_position_embeddings", 4096)
            notes = []
            rope, local_rope = _rope_from_hf(cfg, arch, head_dim)
            query_scale = 1.0
            if gemma:
                query_scale *= (head_dim / cfg.get("query_pre_attn_scalar", head_dim)) ** 0.5
                if cfg.get("attn_logit_softcapping"):
                    raise XQError("attention logit soft-capping (Gemma 2) is not supported")
            nope = ()
            if arch == "smollm3":
                interval = cfg.get("no_rope_layer_interval", 4)
                uses_rope = cfg.get("no_rope_layers") or [
                    int((i + 1) % interval != 0) for i in range(n_layers)
                ]
                nope = tuple(i for i, use in enumerate(uses_rope) if not use)
            return cls(
                arch=arch,
                n_layers=n_layers,
                dim=dim,
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=head_dim,
                hidden_dim=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope=rope,
                qkv_bias=cfg.get("attention_bias", ARCHITECTURES[arch]["qkv_bias"]),
                qk_norm=ARCHITECTURES[arch]["qk_norm"],
                tied_embeddings=cfg.get("tie_word_embeddings", gemma),
                max_context=max_context,
                notes=tuple(notes),
                windows=_windows_from_hf(cfg, arch, n_layers, max_context),
                local_rope=local_rope,
                nope_layers=nope,
                query_scale=query_scale,
                gemma=gemma,
                final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
            )
        except KeyError as e:
            raise XQError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf(
        cls, meta: dict, tensor_names: set[str], rope_freqs=None, long_freqs=None
    ) -> ModelSpec:
        """`meta`: GGUF key/values; `rope_freqs`: the optional rope_freqs tensor's values (for
        Phi-3, its rope_factors_short; `long_freqs`: its rope_factors_long, which LongRoPE
        switches to past the original context). What llama.cpp fixes in code rather than metadata is
        fixed here the same way: Gemma 3's pattern of 5 sliding layers to 1 global and local
        base 10^4, SmolLM3's RoPE-less fourth layers."""
        arch = meta.get("general.architecture", "?")
        if arch not in ARCHITECTURES:
            raise unsupported_architecture(arch)
        a = arch + "."
        try:
            dim = int(meta[a + "embedding_length"])
            n_heads = int(meta[a + "attention.head_count"])
            n_layers = int(meta[a + "block_count"])
            head_dim = int(meta.get(a + "attention.key_length", dim // n_heads))
            max_context = int(meta.get(a + "context_length", 4096))
            scaling = meta.get(a + "rope.scaling.type", "none")
            if scaling not in ("none", "linear"):
                raise XQError(
                    f"unsupported RoPE scaling '{scaling}' (supported: {', '.join(ROPE_TYPES)})"
                )
            rotary_dim = int(meta.get(a + "rope.dimension_count", head_dim))
            original = meta.get(a + "rope.scaling.original_context_length")
            longrope = arch == "phi3" and original and long_freqs is not None
            rope = RopeSpec(
                theta=float(meta.get(a + "rope.freq_base", 10000.0)),
                type="linear" if scaling == "linear" else "default",
                factor=float(meta.get(a + "rope.scaling.factor", 1.0)),
                freq_divisors=None if rope_freqs is None else tuple(float(x) for x in rope_freqs),
                attention_factor=float(meta.get(a + "rope.scaling.attn_factor", 1.0)),
                rotary_dim=rotary_dim if rotary_dim < head_dim else 0,
            )
            if longrope:
                long_divisors = tuple(float(x) for x in long_freqs)
                rope = dataclasses.replace(
                    rope, long_divisors=long_divisors, original_max_position=int(original)
                )
            notes = []
            if arch == "phi3" and original and max_context > int(original) and not longrope:
                max_context = int(original)  # the short factors serve only this far
                notes.append(
                    f"context limited to {max_context} tokens: the file has no LongRoPE long "
                    "factors (rope_factors_long)"
                )
            window = int(meta.get(a + "attention.sliding_window", 0))
            windows = [window] * n_layers if 0 < window < max_context else []
            local_rope, query_scale, gemma = None, 1.0, arch in GEMMA
            if gemma and windows:
                pattern = int(meta.get(a + "attention.sliding_window_pattern", 6))
                windows = [window if (i + 1) % pattern else 0 for i in range(n_layers)]
                local_rope = RopeSpec(theta=float(meta.get(a + "rope.freq_base_swa", 10000.0)))
            if gemma and n_layers == 62:  # Gemma 3 27B scales by dim / heads (as llama.cpp)
                query_scale = (head_dim / (dim / n_heads)) ** 0.5
            nope = tuple(range(3, n_layers, 4)) if arch == "smollm3" else ()
            return cls(
                arch=arch,
                n_layers=n_layers,
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
                max_context=max_context,
                notes=tuple(notes),
                windows=tuple(windows) if any(windows) else (),
                local_rope=local_rope,
                nope_layers=nope,
                query_scale=query_scale,
                gemma=gemma,
                final_softcap=float(meta.get(a + "final_logit_softcapping", 0.0)),
            )
        except KeyError as e:
            raise XQError(f"GGUF metadata lacks the key {e.args[0]!r}") from None


def _windows_from_hf(cfg: dict, arch: str, n_layers: int, max_context: int) -> tuple[int, ...]:
    """Each layer's sliding window (0: global). transformers >= 5 writes `layer_types`; older
    configs say it with `sliding_window_pattern` (Gemma 3), `use_sliding_window` (Qwen, SmolLM3:
    off unless set) or `sliding_window` alone (Mistral, Phi-3: every layer)."""
    window = cfg.get("sliding_window") or 0
    if arch in ("qwen2", "qwen3", "smollm3") and not cfg.get("use_sliding_window"):
        window = 0
    if not window or window >= max_context:
        return ()
    types = cfg.get("layer_types")
    if types is None and arch in GEMMA:
        pattern = cfg.get("sliding_window_pattern", 6)
        types = ["sliding" if (i + 1) % pattern else "full" for i in range(n_layers)]
    if types is None:
        types = ["sliding"] * n_layers
    windows = tuple(window if t.startswith("sliding") else 0 for t in types)
    return windows if any(windows) else ()


def _rope_from_hf(cfg: dict, arch: str, head_dim: int) -> tuple[RopeSpec, RopeSpec | None]:
    """The global layers' RoPE and, where it differs, the sliding layers' (Gemma 3)."""
    params = cfg.get("rope_parameters") or {}
    if arch in GEMMA:
        if "full_attention" in params:
            return (
                _rope(cfg, params["full_attention"], head_dim),
                _rope(cfg, params.get("sliding_attention") or {}, head_dim),
            )
        # older configs: rope_theta and rope_scaling for the global layers, a local base
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        return _rope(cfg, None, head_dim), _rope(cfg, local, head_dim)
    return _rope(cfg, None, head_dim), None


def _rope(cfg: dict, params: dict | None, head_dim: int) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters` (holding rope_theta); older configs use a top-level
    # `rope_theta` and an optional `rope_scaling`. A wrong base still gives fluent text, so read both.
    if params is None:
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    kind = "longrope" if kind in ("su", "longrope") else kind
    if kind not in ROPE_TYPES:
        raise XQError(f"unsupported RoPE scaling '{kind}' (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial) if partial < 1 else 0
    original = params.get(
        "original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192)
    )
    divisors, long_divisors, attention_factor = None, None, 1.0
    if kind == "longrope":
        divisors = tuple(float(x) for x in params["short_factor"])
        long_divisors = tuple(float(x) for x in params["long_factor"])
        factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
        attention_factor = params.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    return RopeSpec(
        theta=float(theta),
        type=kind,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(original),
        freq_divisors=divisors,
        long_divisors=long_divisors,
        attention_factor=float(attention_factor),
        rotary_dim=rotary_dim,
    )
