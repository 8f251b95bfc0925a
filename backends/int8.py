"""LLM.int8() weights (Dettmers et al., arXiv 2208.07339): what both backends share. Framework-free
numpy; each backend's int8.py holds its Int8Linear and kernels.

A weight matrix is stored as int8 codes with one absmax scale per output channel
(w ~ codes * scale). At run time each token row of X gets its own absmax scale; the feature
columns of X where any |x| exceeds the outlier threshold are multiplied in floating point against
the dequantised weight, the rest in int8 with int32 accumulation:

    Y = int32(X_q · W_qᵀ) * (row scale ⊗ column scale) + X[:, outliers] · W[:, outliers]ᵀ

Conversion is one pass over the checkpoint's tensors, and its result is cached as one safetensors
file next to the model (in the checkpoint's own names and layout, so both backends read it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

THRESHOLD = 6.0  # the paper's: features with any |x| above it are outliers
SCALE_SUFFIX = ".int8_scale"  # the checkpoint name of a weight's scales: "<name>.int8_scale"
CACHE_VERSION = 1


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float -> int8 codes (out, in) and float32 scales (out,), w ~ codes * scale[:, None].
    Codes lie in [-127, 127]: the sign is symmetric, so X_q · W_q never needs a zero point."""
    w = np.asarray(w, dtype=np.float32)
    absmax = np.abs(w).max(axis=1)
    scale = np.where(absmax > 0, absmax / 127, 1).astype(np.float32)
    return np.rint(w / scale[:, None]).astype(np.int8), scale


def nbytes(out_features: int, in_features: int) -> int:
    """Bytes of one int8 matrix: a byte per weight plus a float32 scale per output channel."""
    return out_features * in_features + 4 * out_features


def is_int8(name: str, spec, head: bool = True) -> bool:
    """Every attention and MLP matrix, and unless `head` is False the LM head (with tied
    embeddings: the table)."""
    if name.endswith("_proj.weight"):
        return True
    lm_head = "model.embed_tokens.weight" if spec.tied_embeddings else "lm_head.weight"
    return head and name == lm_head


def convert(
    spec, tensors: Iterable[tuple[str, np.ndarray]], head: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint's tensors with each int8 matrix as its codes plus "<name>.int8_scale"."""
    for name, array in tensors:
        if is_int8(name, spec, head):
            codes, scale = quantize(array)
            yield name, codes
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, array


def cached(spec, tensors: Iterable[tuple[str, np.ndarray]], folder: Path, mha: bool, head: bool):
    """`convert`, read from `folder` when done before: (tensors, seconds spent converting; 0 when
    read from the cache). One file per variant: the exact-MHA form of a GQA model, a float head."""
    import time

    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    key = ("mha" if mha else "model") + ("" if head else "-float-head")
    path = folder / f"weights-v{CACHE_VERSION}-{key}.safetensors"
    if path.exists():
        try:
            return list(load_file(path).items()), 0.0
        except (OSError, SafetensorError):
            pass  # damaged (e.g. an interrupted write elsewhere): convert again and rewrite it
    start = time.perf_counter()
    converted = {name: np.ascontiguousarray(a) for name, a in convert(spec, tensors, head)}
    seconds = time.perf_counter() - start
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file(converted, partial)
        partial.replace(path)
    except OSError:
        pass  # a read-only cache dir costs a conversion per load, nothing else
    return list(converted.items()), seconds


def split_scales(weights: dict) -> dict:
    """Remove the scales from `weights` (checkpoint names): {weight name: scales}."""
    names = [n for n in weights if n.endswith(SCALE_SUFFIX)]
    return {n.removesuffix(SCALE_SUFFIX): weights.pop(n) for n in names}


def engine_scales(scales: dict, spec, concatenate) -> dict:
    """Scales in the engine's names (q/k/v and gate/up joined like their matrices)."""
    from xqchat.models.weights import engine_layout

    return {
        name: concatenate([scales[s] for s in sources])
        for name, sources in engine_layout(spec).items()
        if sources[0] in scales
    }


def outlier_columns(x: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The feature columns of x (tokens, features) in which any |x| > threshold."""
    return np.flatnonzero((np.abs(x) > threshold).any(axis=0))
