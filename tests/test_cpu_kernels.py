"""The C passes of XQuant decode on the CPU (backends/cuda/cpu_kernels.c) against the torch ops
they replace, which also remain the path where no C compiler works."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny

from xqchat.backends.base import CacheSpec
from xqchat.backends.cuda import cpu_kernels, quant
from xqchat.backends.cuda.cache import rotate

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler")


def without_c(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_dequantize_equals_the_torch_ops_bit_for_bit(bits, columns, accumulate, monkeypatch):
    """Three stacked blocks of 64 tokens x 96 channels, per channel or in groups of 32 along
    the rows; written, or added to rows already there (XQuant-CL's differences)."""
    g = torch.Generator().manual_seed(bits)
    blocks = torch.randn(3, 64, 96, generator=g) * torch.linspace(0.1, 5, 96)
    q = (
        quant.quantize_columns(blocks, bits)
        if columns
        else quant.quantize(blocks.flatten(1), bits, 32)
    )
    start = torch.randn(3, 64 * 96, generator=g)
    got = quant.dequantize(q, out=start.clone(), accumulate=accumulate)
    without_c(monkeypatch)
    want = quant.dequantize(q, out=start.clone(), accumulate=accumulate)
    assert torch.equal(got, want)
    if not accumulate:  # and the values are the quantized rows, not just equal garbage
        assert (want.view(3, 64, 96) - blocks).abs().max() < (blocks.amax() - blocks.amin()) / 2


@pytest.mark.parametrize("keys_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_and_norm", [False, True])
def test_scores_equal_the_torch_ops(keys_dtype, bias_and_norm):
    """Keys (T, H_kv * D) get the bias, the k-norm and RoPE at their positions, then the scaled
    products with each head's queries: as the forward computes them."""
    g = torch.Generator().manual_seed(0)
    n_kv, m, d, t = 3, 4, 64, 50
    keys = torch.randn(t, n_kv * d, generator=g).to(keys_dtype)
    q = torch.randn(n_kv, m, d, generator=g)
    bias = torch.randn(n_kv * d, generator=g) if bias_and_norm else None
    norm = 1 + 0.1 * torch.randn(d, generator=g) if bias_and_norm else None
    angles = torch.arange(t)[:, None] * 0.3 ** torch.arange(d // 2)[None]
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)  # the first half negated, as Rope's table
    got = cpu_kernels.rope_scores(keys, q, cos, sin, bias, norm, 1e-6)
    k = keys.float() + (0 if bias is None else bias)
    k = k.view(t, n_kv, d).transpose(0, 1)
    if norm is not None:
        k = F.rms_norm(k, (d,), norm, 1e-6)
    want = q @ rotate(k, cos, sin).transpose(1, 2) * d**-0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["kv-quant", "xquant", "xquant-cl"])
@pytest.mark.parametrize("model", ["gqa-qwen3", "llama"])
def test_decoding_with_and_without_the_c_passes(tiny_models, kind, model, monkeypatch):
    """The logits of prefill chunks and decode steps (k-norm on Qwen3; MHA X on Llama) are the
    same through the C passes and the torch ops."""
    engine = load_tiny(tiny_models, model, "torch")
    runs = []
    for _ in range(2):
        session = engine.new_session(CacheSpec(kind=kind, bits=3, group=32, residual=8))
        session.prefill(list(range(400, 480)))
        chunk = session.logits(list(range(600, 610)))
        runs.append(np.concatenate([chunk, *(session.logits([t]) for t in (7, 8, 9))]))
        without_c(monkeypatch)
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=1e-4
    )


def test_without_a_compiler_the_torch_ops_run_and_the_engine_says_so(
    tiny_models, tmp_path, monkeypatch
):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built before
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        engine = load_tiny(tiny_models, "llama", "torch", cache=CacheSpec(kind="xquant", bits=4))
        assert any("C compiler" in note for note in engine.notes)
        session = engine.new_session()
        session.prefill(list(range(400, 480)))
        assert np.isfinite(session.logits([7])).all()
    finally:
        cpu_kernels.library.cache_clear()
