"""What an XQuant layer caches instead of K and V, and the matrices that rebuild K and V from it
(Tomar, Hooper et al., arXiv 2508.10395). Framework-free: numpy in float64, converted by each
backend to its own arrays.

- MHA (K and V together are at least as wide as X): cache X itself, one row per token.
- GQA: cache the latents L_k = X·U_k and L_v = X·U_v, where W_k = U_k·Σ_k·B_kᵀ is the thin SVD
  (U_k: dim x kv_dim). Full rank, so K = L_k·(Σ_k·B_kᵀ) is exact before quantization, and the two
  latents hold as many values as K and V, not the width of X. L_k is quantized per channel (its
  first channels carry X's outliers); L_v per token.
- Per-token streams are quantized in a Hadamard basis (backends/quant.py: one outlier channel no
  longer sets its whole group's scale); the rotation is folded into the encode/decode matrices.
  X's groups may span rows: its channels are alike, so a row of 576 takes 4.5 groups of 128,
  not 9 of 64. A latent's channels fall off in magnitude along the row (the SVD orders them),
  so a group spanning one row's tail and the next row's head would quantize the tail coarsely:
  its groups divide the row.
- For XQuant-CL each layer's bases are rotated (orthogonal Procrustes) to be as close as possible
  to the previous layer's, so a token's latent row in layer i predicts its row in layer i+1 and
  only the difference is quantized. A rotation of the basis changes nothing exact, and with the
  identity as predictor the accumulator is a plain sum.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quant import hadamard


@dataclass(frozen=True)
class Stream:
    encode: np.ndarray  # (dim, width): the cached row of a token is x @ encode
    per_channel: bool  # quantize each channel over a block of tokens, or each token's row
    spans_rows: bool = False  # per token: groups of `group` values run on across row ends


@dataclass(frozen=True)
class LayerLatents:
    streams: tuple[Stream, ...]
    keys: tuple[int, np.ndarray]  # (stream, (width, kv_dim)): K before bias, k-norm and RoPE
    values: tuple[int, np.ndarray]  # (stream, (width, kv_dim)): V before bias

    @property
    def nbytes_fp32(self) -> int:
        arrays = [s.encode for s in self.streams] + [self.keys[1], self.values[1]]
        return sum(a.size * 4 for a in arrays)


def uses_latents(dim: int, kv_dim: int) -> bool:
    """Two latents of kv_dim are smaller than X only when K and V together are narrower than X."""
    return 2 * kv_dim < dim


def row_group(width: int, group: int) -> int:
    """Groups along a row must divide it: the largest of 128/64/32 (up to `group`) that does."""
    for size in (128, 64, 32):
        if size <= group and width % size == 0:
            return size
    raise ValueError(f"rows of width {width} cannot be split into groups of 32, 64 or 128")


def block_hadamard(width: int, group: int) -> np.ndarray:
    return np.kron(np.eye(width // row_group(width, group)), hadamard(row_group(width, group)))


@dataclass(frozen=True)
class Bases:
    """Per layer: W_k = u_k @ d_k and W_v = u_v @ d_v, u with orthonormal columns."""

    u_k: np.ndarray  # (layers, dim, kv_dim)
    d_k: np.ndarray  # (layers, kv_dim, kv_dim)
    u_v: np.ndarray
    d_v: np.ndarray
    seconds: float  # to compute them (0 when read from the cache file)


def thin_svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return u, s[:, None] * vt


def cl_chains(windows: tuple[int, ...], n_layers: int) -> list[list[int]]:
    """XQuant-CL's chains of layers, each storing its difference from the one before it: the
    layers of each sliding window (0: the global layers) in order. A window layer drops the rows
    that leave its window, so a global layer cannot build on its rows, nor one of another window
    on them: each kind of layer chains with its own kind (a model without windows: one chain)."""
    chains: dict[int, list[int]] = {}
    for i in range(n_layers):
        chains.setdefault(windows[i] if windows else 0, []).append(i)
    return list(chains.values())


def aligned(
    us: np.ndarray, ds: np.ndarray, chains: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate each layer's basis towards the previous one in its chain: R = argmin ||u_i R - u_j||
    over orthogonal R, from the SVD of u_iᵀ u_j; then u_i R and Rᵀ d_i rebuild the same W."""
    us, ds = us.copy(), ds.copy()
    for chain in chains:
        for j, i in itertools.pairwise(chain):
            p, _, qt = np.linalg.svd(us[i].T @ us[j])
            r = p @ qt
            us[i], ds[i] = us[i] @ r, r.T @ ds[i]
    return us, ds


def weights_key(w_k: list[np.ndarray], w_v: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for w in (*w_k, *w_v):
        digest.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


def _cached(path: Path, compute: Callable[[], Bases]) -> Bases:
    """Bases from `path`, or computed and saved there (atomically: a crash never leaves a
    half-written file under the name; a damaged file is computed again)."""
    try:
        with np.load(path) as saved:
            return Bases(saved["u_k"], saved["d_k"], saved["u_v"], saved["d_v"], 0.0)
    except (OSError, KeyError, ValueError):
        pass
    start = time.perf_counter()
    bases = compute()
    bases = Bases(bases.u_k, bases.d_k, bases.u_v, bases.d_v, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, u_k=bases.u_k, d_k=bases.d_k, u_v=bases.u_v, d_v=bases.d_v)
    partial.replace(path)
    return bases


def svd_bases(w_k: list[np.ndarray], w_v: list[np.ndarray], directory: Path) -> Bases:
    """Thin SVDs of every layer's W_k and W_v (each (dim, kv_dim), as x @ W), computed once per
    model and kept in `directory` (the model's derived artefacts) under a hash of the weights
    as the engine holds them (their dtype, the MHA form)."""

    def compute():
        (u_k, d_k), (u_v, d_v) = (
            [np.stack(a) for a in zip(*(_svd32(w) for w in ws), strict=True)] for ws in (w_k, w_v)
        )
        return Bases(u_k, d_k, u_v, d_v, 0.0)

    return _cached(directory / f"svd-{weights_key(w_k, w_v)}.npz", compute)


def _svd32(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """thin_svd in float64, kept in float32."""
    u, d = thin_svd(w)
    return u.astype(np.float32), d.astype(np.float32)


def layer_latents(
    w_k: list[np.ndarray],
    w_v: list[np.ndarray],
    group: int,
    directory: Path,
    cross_layer: bool = False,
    windows: tuple[int, ...] = (),
) -> tuple[list[LayerLatents], float]:
    """Every layer's streams and rebuild matrices (float32), and the seconds the SVDs took (0
    when read back from `directory`); for XQuant-CL (`cross_layer`) the bases are aligned along
    its chains (`cl_chains` of the layers' sliding `windows`)."""
    dim, kv_dim = w_k[0].shape
    if not uses_latents(dim, kv_dim):
        turn = block_hadamard(dim, group)
        layers = [
            LayerLatents(
                (Stream(turn, per_channel=False, spans_rows=True),),
                (0, turn.T @ wk),
                (0, turn.T @ wv),
            )
            for wk, wv in zip(w_k, w_v, strict=True)
        ]
        return _float32(layers), 0.0
    bases = svd_bases(w_k, w_v, directory)
    # in float32, as the engines use them: a 1B model's float64 bases, their aligned copies and
    # float32 casts took 600 MB at once (the first XQuant prefill's peak passed kv's)
    u_k, d_k, u_v, d_v = (
        np.asarray(a, dtype=np.float32) for a in (bases.u_k, bases.d_k, bases.u_v, bases.d_v)
    )
    seconds = bases.seconds
    del bases
    if cross_layer:
        chains = cl_chains(windows, len(w_k))
        (u_k, d_k), (u_v, d_v) = aligned(u_k, d_k, chains), aligned(u_v, d_v, chains)
    turn = block_hadamard(kv_dim, group)
    layers = [
        LayerLatents(
            (Stream(u_k[i], per_channel=True), Stream(u_v[i] @ turn, per_channel=False)),
            (0, d_k[i]),
            (1, turn.T @ d_v[i]),
        )
        for i in range(len(w_k))
    ]
    return _float32(layers), seconds


def _float32(layers: list[LayerLatents]) -> list[LayerLatents]:
    def f(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    return [
        LayerLatents(
            tuple(Stream(f(s.encode), s.per_channel, s.spans_rows) for s in layer.streams),
            (layer.keys[0], f(layer.keys[1])),
            (layer.values[0], f(layer.values[1])),
        )
        for layer in layers
    ]
