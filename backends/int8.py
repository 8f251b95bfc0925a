"""LLM.int8() weights (Dettmers et al., arXiv 2208.07339): what both backends share. Framework-free
numpy; each backend's int8.py holds its Int8Linear and kernels.

A weight matrix is stored as int8 codes with one absmax scale per output channel
(w ~ codes * scale). At run time each token row of X gets its own absmax scale; a row's values
with |x| above the outlier threshold are multiplied in floating point against the dequantised
weight, its others in int8 with int32 accumulation:

    Y = int32(X_q · W_qᵀ) * (row scale ⊗ column scale) + X_outliers · Wᵀ

The paper takes out the union of the rows' outlier columns (a column is float for every row if
any row exceeds the threshold there); here the split is each row's own, so a row's result does
not depend on the rows beside it: a decode step and the same row in a drafter's tree give the
same bits, which lossless speculation needs. A prompt's rows quantize as they would one by one.

Conversion is one pass over the checkpoint's tensors, and its result is cached as one safetensors
file next to the model (in the checkpoint's own names and layout, so both backends read it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

THRESHOLD = 6.0  # the paper's: features with any |x| above it are outliers
# `--int8-threshold auto` tries these, largest first, and keeps the first within PPL_BUDGET of the
# float model's perplexity on SAMPLE (0: every feature in floating point, weight-only int8)
CANDIDATES = (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0)
PPL_BUDGET = 1.005
THRESHOLD_VERSION = 1
SAMPLE = (
    "The old harbour town sits where the river meets the sea. Fishing boats leave before dawn "
    "and come back in the afternoon, when the market opens on the quay. In winter the storms "
    "close the harbour for days, and the families mend nets and repair the hulls in long sheds "
    "behind the church. A railway reached the town in 1871; it brought visitors in summer, and "
    "a row of hotels grew along the beach. Most of them are flats now.\n\n"
    "To make bread, mix 500 grams of flour with 10 grams of salt and 7 grams of dried yeast. "
    "Add 320 millilitres of warm water and knead for ten minutes, until the dough is smooth and "
    "springs back when pressed. Leave it covered for an hour, shape it into a loaf, let it rise "
    "again for forty minutes, then bake at 220 degrees for about thirty minutes.\n\n"
    "def mean(values):\n    if not values:\n        raise ValueError('no values')\n"
    "    return sum(values) / len(values)\n\n"
    "Question: a train leaves at 9:40 and arrives at 13:15. How long is the journey? Answer: "
    "three hours and thirty-five minutes. Question: what is 17 times 23? Answer: 391.\n\n"
    "Dear Anna, thank you for your letter and the photographs of the garden. The apple tree "
    "you planted three years ago has its first fruit, and the roses by the gate have never been "
    "so tall. We hope to visit in September, when the children are back at school. With love, "
    "Tom."
)
SCALE_SUFFIX = ".int8_scale"  # the checkpoint name of a weight's scales: "<name>.int8_scale"
CACHE_VERSION = 1


def parse_threshold(value) -> float | None:
    """`--int8-threshold`: "auto" (None: chosen per model, see CANDIDATES) or a number >= 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is neither auto nor a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is neither auto nor a number") from None
    if not np.isfinite(number) or number < 0:
        raise ValueError(f"{value!r}: use auto or a number of 0 or more")
    return number


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def choose_threshold(ids: list[int], float_logits: np.ndarray, logits_at) -> dict:
    """The largest CANDIDATES threshold whose perplexity on `ids` (`logits_at(threshold)`: the
    next-token logits after each id) is within PPL_BUDGET of the float model's; where none is
    (a 400-token text moves perplexity by more than that between thresholds on noise alone), the
    one whose next-token distributions are closest to the float model's (mean KL divergence).
    Returns {"threshold", "float_ppl", "ppl", "kl"} with every threshold measured."""

    def ppl(logp: np.ndarray) -> float:
        return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))

    reference = log_softmax(float_logits[:-1].astype(np.float64))
    float_ppl = ppl(reference)
    measured, kl = {}, {}
    for threshold in CANDIDATES:
        logp = log_softmax(logits_at(threshold)[:-1].astype(np.float64))
        measured[threshold] = ppl(logp)
        kl[threshold] = float((np.exp(reference) * (reference - logp)).sum(axis=-1).mean())
        if measured[threshold] <= float_ppl * PPL_BUDGET:
            break
    within = [t for t, p in measured.items() if p <= float_ppl * PPL_BUDGET]
    threshold = within[0] if within else min(kl, key=kl.get)
    return {"threshold": threshold, "float_ppl": float_ppl, "ppl": measured, "kl": kl}


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


def outliers(x: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(tokens, features) bool: the values of x (tokens, features) that each row multiplies in
    float, |x| > threshold."""
    return np.abs(x) > threshold
