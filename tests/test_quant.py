"""Group quantization with packed codes, the primitive every compressed cache stands on: exact
byte counts, codes really packed, exact pack/unpack round trips, bounded error, both backends."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS

from xqchat.backends.quant import quantized_nbytes

BITS = [2, 3, 4, 8]


def backend_quant(backend):
    if backend == "torch":
        from xqchat.backends.cuda import quant

        return quant, torch.from_numpy, lambda t: t.numpy()
    import mlx.core as mx

    from xqchat.backends.mlx import quant

    return quant, mx.array, np.array


@pytest.mark.parametrize("bits", BITS)
def test_packed_codes_round_trip_exactly(bits):
    from xqchat.backends.cuda.quant import pack, unpack

    codes = torch.randint(
        0, 1 << bits, (3, 5, 256), generator=torch.Generator().manual_seed(bits)
    ).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 256 * bits // 8  # really packed
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_torch_codes_are_packed_in_bit_planes(bits):
    """Byte i of a plane holds code i of each of its segments, low bits first; 3 bits are a
    2-bit plane of the low bits followed by a 1-bit plane of the high bits."""
    from xqchat.backends.cuda.quant import pack

    codes = torch.randint(0, 1 << bits, (64,), generator=torch.Generator().manual_seed(5))
    codes = codes.to(torch.uint8)

    def planes(c, width):
        segments = c.view(8 // width, -1)
        return [
            sum(int(s[i]) << (width * j) for j, s in enumerate(segments))
            for i in range(len(c) * width // 8)
        ]

    expected = planes(codes & 3, 2) + planes(codes >> 2, 1) if bits == 3 else planes(codes, bits)
    assert pack(codes, bits).tolist() == expected


def test_unpack_reads_unaligned_slices_and_writes_into_a_buffer():
    """Stacked blocks are unpacked as 64-bit words when they line up, as bytes when not."""
    from xqchat.backends.cuda.quant import pack, unpack

    generator = torch.Generator().manual_seed(6)
    for bits, n in [(2, 40), (3, 40), (4, 24), (3, 512)]:
        codes = torch.randint(0, 1 << bits, (5, n), generator=generator).to(torch.uint8)
        packed = pack(codes, bits)
        out = torch.full((4, n), 255, dtype=torch.uint8)
        assert unpack(packed[1:], bits, out=out) is out
        assert torch.equal(out, codes[1:])


def test_columns_share_one_scale_over_all_rows():
    from xqchat.backends.cuda.quant import dequantize, quantize_columns

    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(7))
    x[:, 3] *= 50  # an outlier channel stays in its own column
    q = quantize_columns(x, 4)
    assert q.scale.shape == q.zero.shape == (1, 64)
    err = (dequantize(q).view(128, 64) - x).abs()
    step = (x.amax(0) - x.amin(0)) / 15  # 4 bits: plain min/max ranges (no search)
    assert (err <= 0.5 * step + 2e-3 * x.abs().amax(0) + 1e-6).all()
    assert err[:, 4:].max() < err[:, 3].max() / 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_bytes_and_error(backend, bits, group):
    """Bytes as the formula says; each group's squared error no larger than with its plain
    min/max range (the search over narrower ranges includes it), and clearly smaller overall at
    2 bits, where narrower ranges are tried (`clip_ratios`)."""
    quant, to_backend, to_numpy = backend_quant(backend)
    x = np.random.default_rng(bits * group).standard_normal((4, 3, 512)).astype(np.float32)
    x[..., 7] *= 20  # an outlier channel, as in real activations
    q = quant.quantize(to_backend(x), bits, group)
    assert (
        q.nbytes
        == quantized_nbytes(x.size, bits, group)
        == x.size * bits // 8 + (x.size // group) * 4
    )
    groups = x.reshape(4, 3, -1, group)
    error = np.square(to_numpy(quant.dequantize(q)).reshape(groups.shape) - groups).sum(-1)
    levels = (1 << bits) - 1
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    scale = ((high - low) / levels).astype(np.float16).astype(np.float32)
    zero = low.astype(np.float16).astype(np.float32)
    codes = np.clip(np.round((groups - zero) / scale), 0, levels)
    min_max = np.square(codes * scale + zero - groups).sum(-1)
    assert (error <= min_max * (1 + 1e-4) + 1e-9).all()
    if bits == 2:
        assert error.sum() < 0.95 * min_max.sum()


def test_bytes_formula_refuses_what_it_cannot_count():
    with pytest.raises(ValueError):
        quantized_nbytes(100, 4, 128)
    with pytest.raises(ValueError):
        quantized_nbytes(256, 5, 128)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")
@pytest.mark.parametrize("bits", BITS)
def test_both_backends_store_the_same_codes(bits):
    """Same codes, scales and zero points; each backend packs them in the layout its own kernels
    read (MLX: its affine layout, for mx.quantized_matmul; PyTorch: bit planes)."""
    import mlx.core as mx

    from xqchat.backends.cuda import quant as tq
    from xqchat.backends.mlx import quant as mq

    x = np.random.default_rng(bits).standard_normal((6, 256)).astype(np.float32)
    a, b = tq.quantize(torch.from_numpy(x), bits, 128), mq.quantize(mx.array(x), bits, 128)
    assert a.nbytes == b.nbytes
    assert np.array_equal(a.scale.numpy().reshape(6, 2), np.array(b.scale)) and np.array_equal(
        a.zero.numpy().reshape(6, 2), np.array(b.zero)
    )
    assert np.array_equal(np.array(mq.unpack(b.codes, bits)), tq.unpack(a.codes, bits).numpy())
    np.testing.assert_allclose(
        np.array(mq.dequantize(b)), tq.dequantize(a).numpy(), rtol=1e-6, atol=1e-6
    )
