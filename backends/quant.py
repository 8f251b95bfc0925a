"""Byte accounting of asymmetric group quantization, the same in both backends: codes bit-packed
(2 bits: 4 per byte, 3 bits: 8 per 3 bytes, 4 bits: 2 per byte, 8 bits: 1), plus one fp16 scale
and one fp16 zero point per group."""

BITS = (2, 3, 4, 8)


def quantized_nbytes(n_values: int, bits: int, group: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    if n_values % group or group % 32:
        raise ValueError("values must fill whole groups, and groups must hold a multiple of 32")
    return n_values * bits // 8 + (n_values // group) * 2 * 2
