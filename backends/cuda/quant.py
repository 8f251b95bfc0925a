"""Asymmetric quantization with bit-packed codes, in PyTorch: x ~ code * scale + zero, with an
fp16 scale and zero point per group of `group` consecutive values along the last axis
(`quantize`) or per column over all rows of a block (`quantize_columns`: a key channel's outliers
stay in that channel). Each group's range is its min/max; at 2 bits, narrowed where that
rebuilds the group more closely (`clip_ratios`).

Codes are packed in bit planes, not as a bit stream: a block's n codes are cut into 8/bits
consecutive segments and byte i holds code i of every segment (3 bits: a 2-bit plane of the low
bits, then a 1-bit plane of the high bits). Unpacking is then a few shifts and masks over whole
64-bit words, eight codes per operation, instead of one small operation per code position: this
runs over every cached token at every decode step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import clip_ratios
from . import cpu_kernels


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8 (..., n * bits / 8), bit planes of the trailing `shape` values
    scale: torch.Tensor  # fp16, broadcasts against (..., *shape)
    zero: torch.Tensor  # fp16, likewise
    bits: int
    shape: tuple[int, int]  # the values of one packed row: (groups, group) or (rows, columns)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def _lanes(*tensors: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Byte tensors viewed as int64 words when all of them line up (else as bytes), with the
    factor that copies a byte mask into every lane: the masks keep each byte's own bits, so a
    shift that carries bits across lanes changes nothing that is kept."""
    aligned = all(
        t.shape[-1] % 8 == 0
        and t.stride(-1) == 1
        and t.storage_offset() % 8 == 0
        and all(s % 8 == 0 for s in t.stride()[:-1])
        for t in tensors
    )
    if not aligned:
        return 1, list(tensors)
    return 0x0101010101010101, [t.view(torch.int64) for t in tensors]


def _pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:  # bits: 1, 2 or 4
    segments = codes.unflatten(-1, (8 // bits, -1)).unbind(-2)
    packed = torch.zeros_like(segments[0])
    for j, segment in enumerate(segments):
        packed |= segment << (bits * j)
    return packed


def _planes(packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Each bit plane's segments of `packed`, shifted down to bit 0 and masked, in one broadcast
    operation: (..., 8 / bits, words) written into `out` when given."""
    shifts = torch.arange(0, 8, bits, dtype=packed.dtype, device=packed.device).unsqueeze(-1)
    return torch.bitwise_right_shift(packed.unsqueeze(-2), shifts, out=out)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) each < 2**bits -> packed uint8 (..., n * bits / 8)."""
    if bits == 8:
        return codes
    if bits == 3:
        return torch.cat([_pack_planes(codes & 3, 2), _pack_planes(codes >> 2, 1)], dim=-1)
    return _pack_planes(codes, bits)


def unpack(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes (..., n), written into `out` when given."""
    if bits == 8:
        return packed if out is None else out.copy_(packed)
    n = packed.shape[-1] * 8 // bits
    if out is None:
        out = packed.new_empty(*packed.shape[:-1], n)
    low_bits = 2 if bits == 3 else bits
    lane, (words, codes) = _lanes(packed[..., : n * low_bits // 8], out)
    segments = codes.unflatten(-1, (8 // low_bits, -1))
    _planes(words, low_bits, segments).bitwise_and_(((1 << low_bits) - 1) * lane)
    if bits == 3:  # the high bits: one more plane, eight segments
        lane, (high, codes) = _lanes(packed[..., n // 4 :], out)
        codes.unflatten(-1, (8, -1)).bitwise_or_((_planes(high, 1, None) & lane) << 2)
    return out


def _quantized(values: torch.Tensor, low, high, bits: int, shape, axis: int) -> Quantized:
    """Quantize `values` with one scale and zero point per group (reduced along `axis`), each
    group's range [low, high] narrowed by the ratio of `clip_ratios` whose codes rebuild the
    group with the least squared error. Ratio 1 (plain min/max) is a candidate, so no group
    gets worse."""
    ratios, levels, best = clip_ratios(bits), (1 << bits) - 1, None
    for ratio in ratios:
        low_r = low + (1 - ratio) * (high - low) / 2
        high_r = high - (1 - ratio) * (high - low) / 2
        # codes are computed against the fp16-rounded parameters, so dequantising is consistent
        scale = ((high_r - low_r) / levels).clamp_min(1e-8).half()
        zero = low_r.half()
        codes = ((values - zero.float()) / scale.float()).round_().clamp_(0, levels)
        if len(ratios) == 1:  # plain min/max: nothing to compare
            best = [None, scale, zero, codes]
            break
        error = (codes * scale.float() + zero.float() - values).square_().sum(axis, keepdim=True)
        if best is None:
            best = [error, scale, zero, codes]
            continue
        better = error < best[0]
        best = [
            torch.where(better, c, b)
            for c, b in zip((error, scale, zero, codes), best, strict=True)
        ]
    _, scale, zero, codes = best
    return Quantized(pack(codes.to(torch.uint8).flatten(-2), bits), scale, zero, bits, tuple(shape))


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    """x (..., n) with n a multiple of `group` -> codes and fp16 scales/zeros per group."""
    g = x.float().unflatten(-1, (-1, group))
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    return _quantized(g, low, high, bits, g.shape[-2:], axis=-1)


def quantize_columns(x: torch.Tensor, bits: int) -> Quantized:
    """x (..., rows, columns) -> codes and fp16 scales/zeros per column."""
    x = x.float()
    low, high = x.amin(-2, keepdim=True), x.amax(-2, keepdim=True)
    return _quantized(x, low, high, bits, x.shape[-2:], axis=-2)


def dequantize(
    q: Quantized,
    dtype=torch.float32,
    out: torch.Tensor | None = None,
    accumulate=False,
    buffers=None,
) -> torch.Tensor:
    """Values (..., n) in `dtype`, n = the packed row's values; written into `out` (contiguous)
    when given, or added to it (`accumulate`). Float32 on the CPU runs in one fused C pass
    (cpu_kernels.c); the torch ops unpack the codes, and take the values to add, through
    `buffers(name, shape, dtype)` when given (reused buffers) or fresh tensors."""
    shape = (*q.codes.shape[:-1], math.prod(q.shape))
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=q.codes.device)
    if out.dtype == torch.float32 and not out.is_cuda and cpu_kernels.library() is not None:
        return cpu_kernels.dequantize(q, out, accumulate).view(shape)
    codes = None if buffers is None else buffers("codes", shape, torch.uint8)
    codes = unpack(q.codes, q.bits, out=codes)
    target = out
    if accumulate:
        target = torch.empty_like(out) if buffers is None else buffers("addend", out.shape, dtype)
    rows = target.view(*codes.shape[:-1], *q.shape)
    rows.copy_(codes.view(rows.shape))
    rows.mul_(q.scale.to(dtype)).add_(q.zero.to(dtype))
    return (out.add_(target) if accumulate else out).view(shape)
