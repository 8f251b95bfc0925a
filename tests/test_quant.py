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


def test_three_bit_layout_is_a_little_endian_bit_stream():
    from xqchat.backends.cuda.quant import pack

    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_bytes_and_error_bound(backend, bits, group):
    quant, to_backend, to_numpy = backend_quant(backend)
    x = np.random.default_rng(bits * group).standard_normal((4, 3, 512)).astype(np.float32)
    x[..., 7] *= 20  # an outlier channel, as in real activations
    q = quant.quantize(to_backend(x), bits, group)
    assert (
        q.nbytes
        == quantized_nbytes(x.size, bits, group)
        == x.size * bits // 8 + (x.size // group) * 4
    )
    err = np.abs(to_numpy(quant.dequantize(q)) - x).reshape(4, 3, -1, group)
    span = x.reshape(4, 3, -1, group)
    step = (span.max(-1) - span.min(-1)) / ((1 << bits) - 1)
    bound = 0.5 * step + 2e-3 * np.abs(span).max(-1)  # half a step, plus fp16 parameters
    assert (err.max(-1) <= bound + 1e-6).all()


def test_bytes_formula_refuses_what_it_cannot_count():
    with pytest.raises(ValueError):
        quantized_nbytes(100, 4, 128)
    with pytest.raises(ValueError):
        quantized_nbytes(256, 5, 128)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")
@pytest.mark.parametrize("bits", BITS)
def test_both_backends_store_the_same_bytes(bits):
    """Same codes, same packing: the PyTorch bytes are the MLX uint32 words' bytes."""
    import mlx.core as mx

    from xqchat.backends.cuda import quant as tq
    from xqchat.backends.mlx import quant as mq

    x = np.random.default_rng(bits).standard_normal((6, 256)).astype(np.float32)
    a, b = tq.quantize(torch.from_numpy(x), bits, 128), mq.quantize(mx.array(x), bits, 128)
    assert np.array_equal(a.codes.numpy(), np.array(b.codes).view(np.uint8))
    assert np.array_equal(a.scale.numpy(), np.array(b.scale)) and np.array_equal(
        a.zero.numpy(), np.array(b.zero)
    )
    assert np.array_equal(np.array(mq.unpack(b.codes, bits)), tq.unpack(a.codes, bits).numpy())
    np.testing.assert_allclose(
        np.array(mq.dequantize(b)), tq.dequantize(a).numpy(), rtol=1e-6, atol=1e-6
    )
