"""How long a chat fits in a given memory, for each weights x cache choice (`xqchat show MODEL
--fit 16GB`): the exact bytes of the weights (as the engines hold them on a CPU) and of each
cache kind at a number of tokens (per layer: the exact sink and newest rows, and the quantized
blocks, as the caches flush them), plus what the runtime itself takes, measured. Framework-free."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from xqchat.models import qweights
from xqchat.models.spec import ModelSpec

from . import int8
from .base import CacheSpec
from .latents import cl_chains, row_group, uses_latents
from .quant import quantized_nbytes

# XQuant-CL's first layers: plain xquant at 4 bits or more (cuda/cache.py, mlx/cache.py)
BASE_LAYERS, BASE_BITS = 3, 4
# The PyTorch engine's own memory beside weights and cache, measured on this project's Linux
# machine (RSS after loading the default model, less its weights: 0.34 GB), plus a prompt chunk's
# transient activations, rounded up.
RUNTIME_BYTES = 512 * 2**20
WEIGHTS = ("bf16", "int8", "q8", "q4")
CACHES = (
    CacheSpec("kv"),
    CacheSpec("kv-quant", bits=4),
    CacheSpec("xquant", bits=4),
    CacheSpec("xquant-cl", bits=3),
    CacheSpec("xquant-cl", bits=2),
)


def matrices(spec: ModelSpec) -> list[tuple[int, int]]:
    """Every (out, in) matrix that int8/q4/q8 quantize: per layer q, k+v, o, gate+up, down; the
    head (with tied embeddings: the table, which is then also the head)."""
    q, kv = spec.n_heads * spec.head_dim, 2 * spec.kv_dim
    layer = [(q, spec.dim), (kv, spec.dim), (spec.dim, q)]
    layer += [(2 * spec.hidden_dim, spec.dim), (spec.dim, spec.hidden_dim)]
    return layer * spec.n_layers + [(spec.vocab_size, spec.dim)]


def weight_bytes(spec: ModelSpec, weights: str) -> int:
    """The weights' bytes as the PyTorch engine holds them on a CPU: matrices in `weights` (q4/q8:
    an untied input table too; bf16 and int8 keep it in bf16), norms in float32, biases in
    float32 (bf16 beside bf16 matrices)."""
    per_matrix = {
        "bf16": lambda n, k: 2 * n * k,
        "int8": int8.nbytes,
        "q8": lambda n, k: qweights.nbytes(n, k, 8),
        "q4": lambda n, k: qweights.nbytes(n, k, 4),
    }[weights]
    total = sum(per_matrix(n, k) for n, k in matrices(spec))
    if not spec.tied_embeddings:
        table = per_matrix if weights in ("q4", "q8") else lambda n, k: 2 * n * k
        total += table(spec.vocab_size, spec.dim)
    block_norms = 4 if spec.gemma else 2  # Gemma norms attention's and the FFN's outputs too
    norms = spec.n_layers * (block_norms * spec.dim + 2 * spec.head_dim * spec.qk_norm) + spec.dim
    biases = spec.n_layers * (spec.n_heads * spec.head_dim + 2 * spec.kv_dim) * spec.qkv_bias
    return total + 4 * norms + (2 if weights == "bf16" else 4) * biases


@dataclass(frozen=True)
class Stream:
    width: int
    per_channel: bool
    spans_rows: bool = False


def streams(spec: ModelSpec, kind: str) -> list[Stream]:
    """What one layer of a quantized cache kind stores per token."""
    kv = spec.kv_dim
    if kind == "kv-quant":
        return [Stream(kv, True), Stream(kv, False)]
    if uses_latents(spec.dim, kv):  # GQA: the SVD latents of K and V
        return [Stream(kv, True), Stream(kv, False)]
    return [Stream(spec.dim, False, spans_rows=True)]  # X itself


def store_bytes(tokens: int, s: Stream, cache: CacheSpec, exact_bytes: int, window: int = 0) -> int:
    """One stream after `tokens` tokens: the first `sink` and the newest (residual to residual +
    group - 1) rows exact, the rest flushed in blocks of `group` tokens. A sliding-window
    layer's (`window`) has dropped the sink once all of it is older than the newest `window`
    tokens, and each whole group of `group` tokens that is (flushed or not)."""
    n_sink = min(cache.sink, tokens)
    blocks = max(0, (tokens - n_sink - cache.residual) // cache.group)
    exact = tokens - blocks * cache.group
    older = tokens - window
    if window and older >= n_sink:
        dropped = (older - n_sink) // cache.group  # groups, after the sink
        exact -= n_sink + max(0, dropped - blocks) * cache.group
        blocks = max(0, blocks - dropped)
    group = cache.group if s.per_channel or s.spans_rows else row_group(s.width, cache.group)
    block = quantized_nbytes(cache.group * s.width, cache.bits, group)
    return exact * s.width * exact_bytes + blocks * block


def cache_bytes(spec: ModelSpec, cache: CacheSpec, tokens: int, exact_bytes: int = 2) -> int:
    """The cache's bytes after `tokens` tokens (Session.memory().cache_bytes), exact rows in
    `exact_bytes` per value (bf16 on a CPU, float32 with fp32 weights). XQuant's rebuild matrices
    are held once per model and are not counted here (`factor_bytes`)."""
    if cache.kind == "kv":  # a sliding-window layer holds only its window
        rows = sum(min(tokens, spec.window(i) or tokens) for i in range(spec.n_layers))
        return rows * 2 * spec.kv_dim * exact_bytes
    # XQuant-CL: the first layers of each chain (backends/latents.py) are the plain base
    base = {i for chain in cl_chains(spec.windows, spec.n_layers) for i in chain[:BASE_LAYERS]}
    total = 0
    for layer in range(spec.n_layers):
        layer_cache = cache
        if cache.kind == "xquant-cl" and layer in base:
            layer_cache = dataclasses.replace(cache, bits=max(cache.bits, BASE_BITS))
        for s in streams(spec, cache.kind):
            total += store_bytes(tokens, s, layer_cache, exact_bytes, spec.window(layer))
    return total


def factor_bytes(spec: ModelSpec, cache: CacheSpec, exact_bytes: int = 2) -> int:
    """XQuant's per-layer matrices: encode X into the streams, rebuild K (and its int8 codes
    with a scale per output, which CPUs with fast int8 products keep: counted always, so this is
    exact there and a bound elsewhere), and each K/V head's block of the value projection
    (float32)."""
    if not cache.kind.startswith("xquant"):
        return 0
    widths = sum(s.width for s in streams(spec, cache.kind))
    key_width = streams(spec, cache.kind)[0].width
    per_layer = spec.dim * widths * exact_bytes + key_width * spec.kv_dim * exact_bytes
    per_layer += key_width * spec.kv_dim * 4 + key_width * spec.kv_dim + 4 * spec.kv_dim
    return spec.n_layers * per_layer


def longest_chat(spec: ModelSpec, weights: str, cache: CacheSpec, memory: int) -> int:
    """The most tokens a chat can hold in `memory` bytes (0: not even the weights fit), at most
    the model's context."""
    room = memory - RUNTIME_BYTES - weight_bytes(spec, weights) - factor_bytes(spec, cache)
    if room < cache_bytes(spec, cache, 1):
        return 0
    low, high = 1, spec.max_context
    while low < high:  # the cache only grows with tokens: the largest that fits
        middle = (low + high + 1) // 2
        if cache_bytes(spec, cache, middle) <= room:
            low = middle
        else:
            high = middle - 1
    return low


def machine_memory() -> int:
    """This machine's physical memory in bytes, what the app plans with (0 where the OS does not
    say through sysconf, e.g. Windows: the app then shows no plan)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def fits(spec: ModelSpec, weights: str, cache: CacheSpec, memory: int) -> int | None:
    """longest_chat for weights the planner knows (bf16, int8, q8, q4) in a known memory, else
    None (fp32/fp16 weights, an unknown memory)."""
    if weights not in WEIGHTS or memory <= 0:
        return None
    return longest_chat(spec, weights, cache, memory)


def plan(spec: ModelSpec, memory: int) -> list[dict]:
    """A row per weights x cache choice: weight bytes, cache bytes per 1K tokens (at 32K tokens,
    where the exact rows no longer count), and the longest chat in `memory`."""
    rows = []
    for weights in WEIGHTS:
        for cache in CACHES:
            name = cache.kind + (f" {cache.bits}-bit" if cache.kind != "kv" else "")
            per_1k = cache_bytes(spec, cache, 32768) / 32
            rows.append(
                {
                    "weights": weights,
                    "cache": name,
                    "weight_bytes": weight_bytes(spec, weights),
                    "cache_bytes_per_1k_tokens": round(per_1k),
                    "tokens": longest_chat(spec, weights, cache, memory),
                }
            )
    return rows
