"""What both backends' group quantization share: byte accounting (codes bit-packed, 2 bits: 4 per
byte, 3 bits: 8 per 3 bytes, 4 bits: 2 per byte, 8 bits: 1, plus one fp16 scale and one fp16 zero
point per group), the ranges tried, and the Hadamard rotation."""

BITS = (2, 3, 4, 8)


def quantized_nbytes(n_values: int, bits: int, group: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    if n_values % group or group % 32:
        raise ValueError("values must fill whole groups, and groups must hold a multiple of 32")
    return n_values * bits // 8 + (n_values // group) * 2 * 2


def hadamard(n: int):
    """The orthonormal n x n Hadamard matrix (Sylvester; n a power of two), float32 numpy.
    Rotating each quantization group by it spreads an outlier channel's energy across the group,
    so one large value no longer sets the scale for all the others; it is undone exactly."""
    import numpy as np

    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n, dtype=np.float32)


def clip_ratios(bits: int) -> tuple[float, ...]:
    """The fractions of a group's range, about its middle, that quantization tries. With four
    levels, clipping a few far values buys a much finer step for all the others (WikiText-2,
    default model: kv-quant 2 33.57 -> 31.23, xquant-cl 2 30.75 -> 29.92); from 3 bits on it
    cost kv-quant and xquant more than it gave, so their ranges stay min/max."""
    return (1.0, 0.95, 0.9, 0.85, 0.8, 0.75) if bits == 2 else (1.0,)
