"""Group-wise quantized weights, q4 and q8: what both backends share. Framework-free numpy; each
backend's qlinear.py holds the layer and its kernels.

A matrix (out, in) is held as codes plus fp16 scales, one per group of `group` input values
(32, 64 or 128) along each row:

- q4: w = code * scale + min, codes 0..15, an fp16 min per group too; codes two to a byte, each
  block of 32 values in 16 bytes as GGUF's Q4_0/Q4_1 hold them (byte i: value i in the low
  nibble, value i + 16 in the high one). GGUF Q4_1 is this format exactly, Q4_0 too (min =
  -8 * scale), and MLX's 4-bit affine with its scales and biases.
- q8: w = code * scale, codes int8 in [-127, 127] (symmetric, so the CPU's dot products need no
  zero point): GGUF Q8_0 exactly.

Other GGUF types map like this (`from_gguf`): Q4_K keeps its codes, and each 32-value
sub-block's scale d * sc and min dmin * m become fp16 (the only rounding, at most 2^-11
relative); Q5_K and Q6_K have more than 4 bits per code, so they are requantized to q8 (groups of
32). Any other quantized type is dequantized to float like an unquantized file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

BLOCK = 32  # values per block of q4 codes, and per quantized block of x in the CPU's kernels
GROUPS = (32, 64, 128)
SCALE_SUFFIX, MIN_SUFFIX = ".q_scale", ".q_min"  # checkpoint names beside a matrix's codes
CACHE_VERSION = 1


@dataclasses.dataclass
class Packed:
    """One quantized matrix (out, in): codes (uint8 (out, in / 2) for q4, int8 (out, in) for
    q8), fp16 scale (out, in / group) and, for q4, fp16 min (same shape)."""

    bits: int
    codes: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scale, self.min) if a is not None)

    def take_rows(self, rows) -> Packed:
        """The same rows of codes, scales and mins (a permutation or repetition of outputs)."""
        return Packed(
            self.bits,
            self.codes[rows],
            self.scale[rows],
            None if self.min is None else self.min[rows],
        )

    def scale_rows(self, factors: np.ndarray) -> Packed:
        """The matrix with each row multiplied by its factor (its scales and mins are)."""
        f = factors[:, None]
        low = None if self.min is None else (self.min * f).astype(self.min.dtype)
        return Packed(self.bits, self.codes, (self.scale * f).astype(self.scale.dtype), low)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix the codes stand for."""
        n, k = self.shape
        codes = unpack_q4(self.codes) if self.bits == 4 else self.codes
        scale = np.repeat(self.scale.astype(np.float32), self.group, axis=1)
        w = codes.astype(np.float32) * scale
        if self.min is not None:
            w += np.repeat(self.min.astype(np.float32), self.group, axis=1)
        return w.reshape(n, k)


def nbytes(out_features: int, in_features: int, bits: int, group: int = 32) -> int:
    """Bytes of one q4 (codes, scale and min) or q8 (codes and scale) matrix."""
    per_group = 4 if bits == 4 else 2
    return out_features * in_features * bits // 8 + out_features * in_features // group * per_group


def pack_q4(codes: np.ndarray) -> np.ndarray:
    """(n, k) codes 0..15 -> (n, k / 2) bytes in GGUF's block order."""
    n, k = codes.shape
    blocks = codes.astype(np.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(n, k // 2)


def unpack_q4(packed: np.ndarray) -> np.ndarray:
    """pack_q4's inverse: (n, k / 2) bytes -> (n, k) codes 0..15 (uint8)."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(n, 2 * half)


def quantize(w: np.ndarray, bits: int, group: int = 32) -> Packed:
    """A float (out, in) matrix as q4 (min/max per group) or q8 (absmax per group). Codes are
    rounded against the fp16 scale and min that are stored, so they are what dequantizing sees."""
    if bits not in (4, 8) or group not in GROUPS:
        raise ValueError("q4 or q8, in groups of 32, 64 or 128")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input features do not fill groups of {group}")
    g = w.reshape(n, k // group, group)
    if bits == 8:
        scale = _half_at_least(np.abs(g).max(axis=2) / 127)
        s = scale.astype(np.float32)[..., None]
        codes = np.clip(np.rint(np.divide(g, s, out=np.zeros_like(g), where=s > 0)), -127, 127)
        return Packed(8, codes.astype(np.int8).reshape(n, k), scale)
    low, high = g.min(axis=2), g.max(axis=2)
    minimum = low.astype(np.float16)
    scale = _half_at_least((high - minimum.astype(np.float32)) / 15)
    s, m = scale.astype(np.float32)[..., None], minimum.astype(np.float32)[..., None]
    codes = np.clip(np.rint(np.divide(g - m, s, out=np.zeros_like(g), where=s > 0)), 0, 15)
    return Packed(4, pack_q4(codes.reshape(n, k)), scale, minimum)


def _half_at_least(x: np.ndarray) -> np.ndarray:
    """x as fp16, rounded up where rounding to nearest went down: a scale rounded down would
    push a group's largest value past the top code, where it would be clipped."""
    half = x.astype(np.float16)
    return np.where(half < x, np.nextafter(half, np.float16(np.inf)), half)


def requantize(p: Packed, bits: int, group: int = 32) -> Packed:
    """`p` in another format: as it is when it already has `bits`, else through its values."""
    return p if p.bits == bits else quantize(p.dequantize(), bits, group)


def common_format(parts: list) -> tuple[int, int]:
    """(bits, group) that the parts of one engine matrix (K and V; gate and up), Packed or float,
    share: theirs when all are quantized alike, else q8 in groups of 32, which holds a q4 or a
    float part closely."""
    packed = [p for p in parts if isinstance(p, Packed)]
    if len(packed) == len(parts) and len({p.bits for p in packed}) == 1:
        return packed[0].bits, min(p.group for p in packed)
    return 8, BLOCK


def join(parts: list) -> Packed:
    """Parts of one engine matrix stacked along their outputs in their `common_format`:
    converting is rare (a Q4_K_M file's Q4_K K beside its Q6_K V)."""
    bits, group = common_format(parts)
    parts = [
        p
        if isinstance(p, Packed) and (p.bits, p.group) == (bits, group)
        else quantize(p.dequantize() if isinstance(p, Packed) else p, bits, group)
        for p in parts
    ]
    if len(parts) == 1:
        return parts[0]
    return Packed(
        bits,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scale for p in parts]),
        None if bits == 8 else np.concatenate([p.min for p in parts]),
    )


def is_matrix(name: str, spec) -> bool:
    """The matrices q4/q8 hold: every attention and MLP matrix, the embedding table (a lookup
    dequantizes its rows; tied, it is also the head) and an untied LM head."""
    return name.endswith("_proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight")


def convert(spec, tensors: Iterable, bits: int) -> Iterator:
    """`--weights q4|q8`: every matrix in that format (a quantized one converted through its
    values unless it already is); the rest as they are."""
    for name, array in tensors:
        if isinstance(array, Packed):
            yield name, requantize(array, bits)
        elif is_matrix(name, spec):
            yield name, quantize(array, bits)
        else:
            yield name, array


def dequantized(tensors: Iterable) -> Iterator:
    """A float `--weights` (bf16, int8, ...) from a quantized file: every Packed as float32."""
    for name, array in tensors:
        yield name, array.dequantize() if isinstance(array, Packed) else array


def engine_packed(quantized: dict, floats: dict, spec, to_numpy) -> dict:
    """{engine name: Packed} for every engine matrix with a quantized source, its parts joined
    as `engine_layout` joins floats. Sources are taken out of `quantized` (checkpoint name ->
    Packed) and, for a float part beside a quantized one, out of `floats` (through `to_numpy`)."""
    from .errors import XQError
    from .weights import engine_layout

    packed = {}
    for name, sources in engine_layout(spec).items():
        if any(s in quantized for s in sources):
            missing = [s for s in sources if s not in quantized and s not in floats]
            if missing:
                raise XQError(f"the checkpoint lacks the tensor {missing[0]}")
            parts = [
                quantized.pop(s) if s in quantized else to_numpy(floats.pop(s)) for s in sources
            ]
            packed[name] = join(parts)
    if spec.tied_embeddings:
        quantized.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    if quantized:
        raise XQError(f"unexpected tensor in the checkpoint: {next(iter(quantized))}")
    return packed


def label(packed: dict) -> str:
    """The weights' name for a model holding these Packed matrices: q4 if any is q4, else q8."""
    return "q4" if any(p.bits == 4 for p in packed.values()) else "q8"


def flatten(tensors: Iterable) -> Iterator[tuple[str, np.ndarray]]:
    """Packed matrices as plain arrays, "<name>" (codes), "<name>.q_scale", "<name>.q_min"."""
    for name, array in tensors:
        if isinstance(array, Packed):
            yield name, array.codes
            yield name + SCALE_SUFFIX, array.scale
            if array.min is not None:
                yield name + MIN_SUFFIX, array.min
        else:
            yield name, array


def unflatten(arrays: dict) -> Iterator:
    """`flatten`'s inverse."""
    for name, array in arrays.items():
        if name.endswith((SCALE_SUFFIX, MIN_SUFFIX)):
            continue
        if name + SCALE_SUFFIX in arrays:
            bits = 4 if array.dtype == np.uint8 else 8
            array = Packed(bits, array, arrays[name + SCALE_SUFFIX], arrays.get(name + MIN_SUFFIX))
        yield name, array


def cached(spec, tensors: Iterable, folder: Path, bits: int, mha: bool):
    """`convert` of a float checkpoint, read from `folder` when done before: (tensors, seconds
    spent converting; 0 when read from the cache)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    path = folder / f"weights-v{CACHE_VERSION}-q{bits}-{'mha' if mha else 'model'}.safetensors"
    if path.exists():
        try:
            return list(unflatten(load_file(path))), 0.0
        except (OSError, SafetensorError):
            pass  # damaged (e.g. an interrupted write elsewhere): convert again and rewrite it
    start = time.perf_counter()
    converted = dict(convert(spec, tensors, bits))
    seconds = time.perf_counter() - start
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file({n: np.ascontiguousarray(a) for n, a in flatten(converted.items())}, partial)
        partial.replace(path)
    except OSError:
        pass  # a read-only cache dir costs a conversion per load, nothing else
    return list(converted.items()), seconds


def from_mlx(
    weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, packed: bool
) -> Packed | np.ndarray:
    """An MLX-quantized matrix (codes packed low bits first into uint32 (out, in * bits / 32),
    w = code * scale + bias per group) in the engine's form: its 4 bits exactly (scales and biases
    as fp16), its 8 bits requantized to q8 (MLX's are affine, ours symmetric), other widths and
    `packed` False as float32."""
    n, group = weight.shape[0], weight.shape[1] * 32 // bits // scales.shape[1]
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = ((weight[..., None] >> shifts) & ((1 << bits) - 1)).reshape(n, -1).astype(np.uint8)
    if packed and bits == 4 and group in GROUPS:
        return Packed(4, pack_q4(codes), scales.astype(np.float16), biases.astype(np.float16))
    values = codes.reshape(n, -1, group) * scales.astype(np.float32)[..., None]
    values = (values + biases.astype(np.float32)[..., None]).reshape(n, -1)
    return quantize(values, 8) if packed and bits == 8 and group in GROUPS else values


def to_mlx(p: Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`p` as MLX's affine quantization holds it: (uint32 codes, scales, biases), w = code *
    scale + bias; q8's signed codes offset by 128 (bias -128 * scale, exact in fp16)."""
    n, k = p.shape
    if p.bits == 4:
        codes, biases = unpack_q4(p.codes).astype(np.uint32), p.min
    else:
        codes = (p.codes.astype(np.int32) + 128).astype(np.uint32)
        biases = (p.scale.astype(np.float32) * -128).astype(np.float16)
    shifts = np.arange(0, 32, p.bits, dtype=np.uint32)
    words = (codes.reshape(n, -1, 32 // p.bits) << shifts).sum(axis=2, dtype=np.uint32)
    return words, p.scale, biases


def from_gguf(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> Packed | None:
    """A GGUF tensor's raw blocks (uint8, as stored) of a (out, in) matrix in the engine's form,
    or None for a type that does not map (the caller dequantizes it)."""
    n, k = shape
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        width = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
        blocks = raw.reshape(n, k // BLOCK, width)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0]
        if kind == "Q8_0":
            return Packed(8, blocks[..., 2:].copy().view(np.int8).reshape(n, k), scale)
        codes = blocks[..., width - 16 :].reshape(n, k // 2).copy()
        if kind == "Q4_1":
            return Packed(4, codes, scale, blocks[..., 2:4].copy().view(np.float16)[..., 0])
        return Packed(4, codes, scale, (scale.astype(np.float32) * -8).astype(np.float16))
    if kind == "Q4_K":
        from gguf.quants import Q4_K

        blocks = raw.reshape(n * k // 256, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
        scale = (d * sc.astype(np.float32)).astype(np.float16).reshape(n, k // BLOCK)
        minimum = (-dmin * m.astype(np.float32)).astype(np.float16).reshape(n, k // BLOCK)
        # each 64 values' 32 bytes: values 0..31 in the low nibbles, 32..63 in the high ones
        qs = blocks[:, 16:].reshape(-1, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=1).reshape(n, k)
        return Packed(4, pack_q4(codes), scale, minimum)
    if kind in ("Q5_K", "Q6_K"):  # a slice of rows at a time: a 128K-token table is 1 GB as float
        import gguf

        qtype = gguf.GGMLQuantizationType[kind]
        rows = raw.reshape(n, -1)
        step = max(1, 2**22 // k)
        parts = [
            quantize(gguf.quants.dequantize(rows[a : a + step], qtype).reshape(-1, k), 8)
            for a in range(0, n, step)
        ]
        return Packed(
            8, *(np.concatenate([getattr(p, f) for p in parts]) for f in ("codes", "scale"))
        )
    return None
