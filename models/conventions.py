"""What differs between the architectures' checkpoints, undone as tensors are read so that every
reader yields transformers' Llama-style names and one convention: Phi-3's fused q/k/v and
gate/up are split, Gemma's RMSNorm weights counted from 1 (it stores w and scales by 1 + w),
a partially rotating head's dimensions reordered (`rotary_order`), LongRoPE's attention factor
(which scales cos and sin, so the rotating part of q and k) folded into W_q and W_k, Gemma 3's
multimodal checkpoint's text model taken alone."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .qweights import Packed
from .spec import ModelSpec

# a multimodal Gemma 3's text model under transformers' 5 names and the older ones
_MULTIMODAL_TEXT = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
_MULTIMODAL_OTHER = (
    "vision_tower",
    "multi_modal_projector",
    "model.vision_tower",
    "model.multi_modal_projector",
)


def fused_parts(spec: ModelSpec, name: str) -> list[tuple[str, int, int]] | None:
    """(name, first row, end row) of the matrices a fused Phi-3 tensor holds, else None."""
    q, kv, h = spec.n_heads * spec.head_dim, spec.kv_dim, spec.hidden_dim
    for fused, parts in (
        ("self_attn.qkv_proj.", (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))),
        ("mlp.gate_up_proj.", (("gate_proj", 0, h), ("up_proj", h, 2 * h))),
    ):  # fmt: skip
        if fused in name:
            stem, _, suffix = name.partition(fused)
            owner = "self_attn." if fused.startswith("self_attn") else "mlp."
            return [(f"{stem}{owner}{part}.{suffix}", a, b) for part, a, b in parts]
    return None


def text_name(name: str) -> str | None:
    """A multimodal Gemma 3 checkpoint's tensor under its text model's name; None for the
    vision tower's."""
    if name.startswith(_MULTIMODAL_OTHER):
        return None
    for prefix, text in _MULTIMODAL_TEXT.items():
        if name.startswith(prefix):
            return text + name[len(prefix) :]
    return name


def rotary_order(spec: ModelSpec) -> np.ndarray | None:
    """For a head whose first `rotary_dim` dimensions rotate (pairs i and i + rotary_dim / 2), the
    order of its dimensions in which rotate-half over the whole head pairs the same ones, the
    others pairing among themselves (at frequency 0: RoPESpec.inv_freq); q . k is unchanged, as
    both are reordered alike. None when the whole head rotates."""
    d, r = spec.head_dim, spec.rope.rotary_dim
    if not r or r >= d:
        return None
    half, rest = r // 2, (d - r) // 2
    first = [*range(half), *range(r, r + rest)]
    second = [*range(half, r), *range(r + rest, d)]
    return np.array(first + second)


def rotary_factors(spec: ModelSpec, rows: int) -> np.ndarray | None:
    """Per output row of W_q or W_k, in the checkpoint's order: LongRoPE's attention factor on
    the rotating dimensions of each head, 1 elsewhere; None when the factor is 1."""
    factor = spec.rope.attention_factor
    if factor == 1.0:
        return None
    per_head = np.ones(spec.head_dim)
    per_head[: spec.rope.rotary_dim or spec.head_dim] = factor
    return np.tile(per_head, rows // spec.head_dim)


def _rows(w, a: int, b: int):
    return w[a:b] if isinstance(w, np.ndarray) else w.take_rows(np.arange(a, b))


def canonical(
    spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray | Packed]], norms_from_one: bool
) -> Iterator[tuple[str, np.ndarray | Packed]]:
    """The readers' tensors in the one convention (module docstring). `norms_from_one`: the
    file stores Gemma's norm weights as w (safetensors; llama.cpp's converter adds the 1)."""
    order = rotary_order(spec)
    for name, w in tensors:
        name = text_name(name) if spec.gemma else name
        if name is None:
            continue
        parts = fused_parts(spec, name)
        for part, a, b in parts or [(name, 0, None)]:
            t = w if parts is None else _rows(w, a, b)
            projection = part.endswith(("q_proj.weight", "k_proj.weight"))
            factors = rotary_factors(spec, t.shape[0]) if projection else None
            if factors is not None:
                t = (
                    (t * factors[:, None]).astype(np.float32)
                    if isinstance(t, np.ndarray)
                    else t.scale_rows(factors)
                )
            if order is not None and projection:
                heads = np.arange(t.shape[0]).reshape(-1, spec.head_dim)[:, order].reshape(-1)
                t = t[heads] if isinstance(t, np.ndarray) else t.take_rows(heads)
            if norms_from_one and spec.gemma and part.endswith("norm.weight"):
                t = t.astype(np.float32) + 1
            yield part, t


def canonical_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> dict:
    """A reader's tensor shapes under the names `canonical` gives them."""
    out = {}
    for name, shape in shapes.items():
        name = text_name(name) if spec.gemma else name
        if name is None:
            continue
        for part, a, b in fused_parts(spec, name) or [(name, 0, shape[0])]:
            out[part] = (b - a, *shape[1:])
    return out
