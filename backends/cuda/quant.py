"""Asymmetric group quantization with bit-packed codes, in PyTorch. Every `group` consecutive
values along the last axis share an fp16 scale and zero point: x ~ code * scale + zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8 (..., n * bits / 8), packed
    scale: torch.Tensor  # fp16 (..., n / group)
    zero: torch.Tensor  # fp16 (..., n / group)
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) each < 2**bits -> packed uint8 (..., n * bits / 8), low bits first."""
    if bits == 8:
        return codes
    per = 8 if bits == 3 else 8 // bits  # 3 bits: 8 codes fill exactly 3 bytes
    c = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int32)
    word = (c << torch.arange(0, per * bits, bits, device=codes.device, dtype=torch.int32)).sum(-1)
    if bits != 3:
        return word.to(torch.uint8)
    shifts = torch.tensor([0, 8, 16], device=codes.device, dtype=torch.int32)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes (..., n). All in uint8 (this runs on every cached token
    at every step): byte-wide shifts, and for 3 bits the two codes that straddle bytes are
    joined from their pieces."""
    if bits == 8:
        return packed
    if bits == 3:
        b0, b1, b2 = packed.unflatten(-1, (-1, 3)).unbind(-1)
        codes = [b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7]
        codes += [(b1 >> 4) & 7, (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5]
    else:
        mask = (1 << bits) - 1
        codes = [(packed >> s) & mask for s in range(0, 8, bits)]
    return torch.stack(codes, dim=-1).flatten(-2)


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    """x (..., n) with n a multiple of `group` -> packed codes and fp16 scales/zeros."""
    g = x.float().reshape(*x.shape[:-1], -1, group)
    low, high = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    # codes are computed against the fp16-rounded parameters, so dequantising is consistent
    scale = ((high - low) / levels).clamp_min(1e-8).half()
    zero = low.half()
    codes = ((g - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels)
    return Quantized(pack(codes.to(torch.uint8).flatten(-2), bits), scale, zero, bits, group)


def dequantize(q: Quantized, dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Values (..., n) in `dtype`; written into `out` (any strides) when given."""
    codes = unpack(q.codes, q.bits).reshape(*q.scale.shape, q.group).to(dtype)
    zero, scale = q.zero.to(dtype)[..., None], q.scale.to(dtype)[..., None]
    if out is None:
        return torch.addcmul(zero, codes, scale).flatten(-2)
    torch.addcmul(zero, codes, scale, out=out.unflatten(-1, (-1, q.group)))
    return out
