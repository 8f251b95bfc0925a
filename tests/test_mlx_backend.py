"""What only the MLX backend does: its engine thread and its Metal kernels."""

import threading

import numpy as np
import pytest
from conftest import BACKENDS, assert_metal_contract

pytestmark = pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")


def test_ci_tests_every_backend():
    import os

    if os.environ.get("CI"):
        assert BACKENDS == ["torch", "mlx"], "CI must run the conformance suite on both backends"


def test_all_mlx_work_runs_on_one_engine_thread(tiny_models, monkeypatch):
    from xqchat.backends.base import EngineOptions, GenerationConfig, load_model
    from xqchat.backends.mlx.session import ENGINE, EngineSession
    from xqchat.models import resolve

    ran_on = set()
    forward = EngineSession._forward

    def recording(self, tokens, all_logits=False):
        ran_on.add(threading.current_thread())
        return forward(self, tokens, all_logits)

    monkeypatch.setattr(EngineSession, "_forward", recording)
    model = load_model(resolve(str(tiny_models["llama"])), EngineOptions(backend="mlx"))
    results = []

    def request():  # each request on a brand-new thread, as a UI would make them
        session = model.new_session()
        session.prefill([5, 6, 7])
        results.append([e.token for e in session.generate(GenerationConfig(max_tokens=4))])

    for _ in range(3):
        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
    assert len(results) == 3 and results[0] == results[1] == results[2] and len(results[0]) == 4
    assert ran_on == {ENGINE._thread}


SHAPES = [(1, 1, 64), (1, 7, 3072), (2, 3, 10)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_swiglu_kernel_call_contract(tmp_path, shape, dtype):
    """Traced without running (no Metal here): the kernel's declared outputs match the reference."""
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import swiglu_metal, swiglu_reference

    x = mx.zeros(shape, dtype=getattr(mx, dtype))
    assert_metal_contract(tmp_path / "swiglu.mlxfn", swiglu_metal, swiglu_reference, x)


def test_swiglu_reference_is_silu_gate_times_up():
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import swiglu_reference

    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    gate, up = x[:, :4], x[:, 4:]
    expected = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(
        np.array(swiglu_reference(mx.array(x))), expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.metal
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 1e-2), ("float16", 2e-3)])
def test_swiglu_kernel_matches_reference_on_metal(shape, dtype, tol):
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import swiglu_metal, swiglu_reference

    x = mx.random.normal(shape, key=mx.random.key(0)).astype(getattr(mx, dtype))
    got, expected = swiglu_metal(x), swiglu_reference(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32)), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_scores_kernel_call_contract(tmp_path, dtype):
    """Traced without running: the kernel's declared output matches its reference's."""
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import rope_scores_metal, rope_scores_reference

    q, keys = mx.zeros((6, 64)), mx.zeros((2, 50, 64), dtype=getattr(mx, dtype))
    expected = assert_metal_contract(
        tmp_path / "rope_scores.mlxfn",
        lambda *a: rope_scores_metal(*a, 0.125, 7),
        lambda *a: rope_scores_reference(*a, 0.125, 7),
        q,
        keys,
        mx.ones((32,)),
    )
    assert (expected.shape, expected.dtype) == ((6, 50), mx.float32)


def rope_scores_case():
    import mlx.core as mx

    g = np.random.default_rng(3)
    q = mx.array(g.standard_normal((6, 64)).astype(np.float32))
    keys = mx.array(g.standard_normal((2, 300, 64)).astype(np.float32))
    inv_freq = mx.array((10000.0 ** (-np.arange(32) / 32)).astype(np.float32))
    return q, keys, inv_freq


def test_rope_scores_reference_is_rope_then_scores():
    """Against mx.fast.rope on the keys (what the prefill path does) and a plain product, for
    keys from the start of the cache and for a later span of it."""
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import rope_scores_reference

    q, keys, inv_freq = rope_scores_case()
    for first in (0, 4096):
        rotated = mx.fast.rope(
            keys[None], 64, traditional=False, base=None, scale=1.0, offset=first,
            freqs=1 / inv_freq,
        )[0]  # fmt: skip
        expected = (q.reshape(2, 3, 64) @ rotated.swapaxes(1, 2)).reshape(6, -1) * 0.125
        got = rope_scores_reference(q, keys, inv_freq, 0.125, first)
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-4)


@pytest.mark.metal
def test_rope_scores_kernel_matches_reference_on_metal():
    from xqchat.backends.mlx.kernels import rope_scores_metal, rope_scores_reference

    q, keys, inv_freq = rope_scores_case()
    for first in (0, 4096):
        np.testing.assert_allclose(
            np.array(rope_scores_metal(q, keys, inv_freq, 0.125, first)),
            np.array(rope_scores_reference(q, keys, inv_freq, 0.125, first)),
            atol=2e-4,
        )


def test_mlx_lm_baseline_is_the_same_model(tiny_models, default_tokenizer, tmp_path):
    """`bench speed --compare mlx-lm` times mlx-lm on a folder we write: it must hold our weights."""
    import mlx.core as mx
    import mlx_lm

    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve
    from xqchat.models.hf import save_hf_folder

    files = resolve(str(tiny_models["qwen2"]))
    folder = save_hf_folder(files, default_tokenizer, tmp_path / "hf")
    baseline, _ = mlx_lm.load(str(folder))
    ids = list(range(40, 70))
    expected = np.array(baseline(mx.array([ids]))[0].astype(mx.float32))
    ours = load_model(files, EngineOptions(backend="mlx", weights="fp32")).new_session().logits(ids)
    assert np.abs(ours - expected).max() <= 1e-4
