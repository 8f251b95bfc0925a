"""Compressed caches, held to the same expectations in every backend: bytes equal the formula,
quality close to exact K/V, trim exact, and the two backends agree."""

import math

import numpy as np
import pytest

from xqchat.backends.base import CacheSpec
from xqchat.backends.quant import quantized_nbytes


def kv_quant_bytes(spec, tokens, cache, itemsize):
    """Formula: whole blocks of `group` tokens quantized, the rest exact (see TokenStore)."""
    blocks = max(0, (tokens - cache.residual) // cache.group)
    exact = tokens - blocks * cache.group
    width = spec.kv_dim
    row_group = next(g for g in (128, 64, 32) if g <= cache.group and width % g == 0)
    keys = blocks * quantized_nbytes(width * cache.group, cache.bits, cache.group)  # per channel
    values = blocks * quantized_nbytes(width * cache.group, cache.bits, row_group)  # per token
    return spec.n_layers * (keys + values + 2 * exact * width * itemsize), blocks, exact


@pytest.fixture(scope="module")
def tiny_fp32(tiny_models, backend):
    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve

    return load_model(
        resolve(str(tiny_models["llama"])), EngineOptions(backend=backend, weights="fp32")
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens, group", [(100, 32), (200, 64), (233, 32), (240, 128)])
def test_kv_quant_bytes_match_the_formula(tiny_fp32, bits, tokens, group):
    cache = CacheSpec(kind="kv-quant", bits=bits, group=group, residual=16)
    session = tiny_fp32.new_session(cache)
    session.prefill(list(range(1000, 1000 + tokens)))
    expected, blocks, exact = kv_quant_bytes(tiny_fp32.spec, tokens, cache, itemsize=4)
    memory = session.memory()
    assert blocks > 0 and memory.cache_bytes == expected
    assert memory.residual_tokens == exact and memory.residual_bytes == 2 * 2 * exact * 32 * 4


def perplexity(model, ids, cache, chunk=64):
    session = model.new_session(cache)
    session.prefill(ids[:1])
    logprobs = []
    for i in range(1, len(ids), chunk):
        logprobs += session.logprobs(ids[i : i + chunk])
    return math.exp(-sum(logprobs) / len(logprobs)), session


@pytest.fixture(scope="module")
def wikitext_ids(default_tokenizer):
    from pathlib import Path

    text = (
        Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.txt"
    ).read_text()
    return default_tokenizer.encode(text[:20000])[:320]


def test_eight_bit_kv_quant_is_within_a_tenth_of_a_percent(default_fp32, wikitext_ids):
    exact, _ = perplexity(default_fp32, wikitext_ids, CacheSpec())
    quant, session = perplexity(
        default_fp32, wikitext_ids, CacheSpec(kind="kv-quant", bits=8, residual=128)
    )
    assert (
        session.memory().residual_tokens < 256
    )  # most of the window really went through the quantizer
    assert abs(quant / exact - 1) < 1e-3


def test_backends_agree_on_kv_quant_perplexity(default_files, wikitext_ids):
    from conftest import BACKENDS

    from xqchat.backends.base import EngineOptions, load_model

    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    cache = CacheSpec(kind="kv-quant", bits=3, residual=64)
    ppl = [
        perplexity(
            load_model(default_files, EngineOptions(backend=b, weights="fp32")), wikitext_ids, cache
        )[0]
        for b in BACKENDS
    ]
    assert abs(ppl[0] / ppl[1] - 1) < 5e-3


def test_trim_inside_the_exact_window_reproduces_the_run(tiny_fp32):
    cache = CacheSpec(kind="kv-quant", bits=4, group=32, residual=16)
    ids = list(range(3000, 3100))
    session = tiny_fp32.new_session(cache)
    session.prefill(ids[:90])  # two blocks of 32 flushed
    first = session.logits(ids[90:])
    session.trim(90)  # the last 10 tokens are still exact: trimming them is lossless
    assert session.memory().residual_tokens == 26
    assert np.array_equal(session.logits(ids[90:]), first)


def stored_rows(store, backend):
    """A TokenStore's rows as numpy, read on the thread its backend requires."""
    if backend == "torch":
        import torch

        return store.read(torch.float32).numpy()
    import mlx.core as mx

    from xqchat.backends.mlx.session import ENGINE

    return ENGINE.call(lambda: np.array(store.read(mx.float32)))


def test_trim_into_quantized_blocks_keeps_what_attention_saw(default_fp32):
    cache = CacheSpec(kind="kv-quant", bits=4, residual=64)
    session = default_fp32.new_session(cache)
    session.prefill(list(range(3000, 3400)))  # 2 blocks of 128 flushed, 144 exact
    layer = session.caches[5]
    keys, values = (stored_rows(s, default_fp32.backend)[:200] for s in (layer.keys, layer.values))
    session.trim(200)  # one whole block kept, 72 rows of the second back to the exact window
    memory = session.memory()
    assert memory.tokens == 200 and memory.residual_tokens == 72
    expected, _, _ = kv_quant_bytes(
        default_fp32.spec, 200, CacheSpec(kind="kv-quant", bits=4, residual=72), 4
    )
    assert memory.cache_bytes == expected
    assert np.array_equal(stored_rows(layer.keys, default_fp32.backend), keys)
    assert np.array_equal(stored_rows(layer.values, default_fp32.backend), values)


@pytest.fixture(scope="module")
def tiny_mha(tiny_models, backend):
    """The tiny GQA llama (4 query heads, 2 K/V heads) in its exact MHA form."""
    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve

    return load_model(
        resolve(str(tiny_models["llama"])), EngineOptions(backend=backend, weights="fp32", mha=True)
    )


def test_mha_form_is_exact(tiny_fp32, tiny_mha):
    assert tiny_mha.spec.n_kv_heads == tiny_mha.spec.n_heads == 2 * tiny_fp32.spec.n_kv_heads
    ids = list(range(500, 560))
    gqa, mha = tiny_fp32.new_session().logits(ids), tiny_mha.new_session().logits(ids)
    assert np.abs(gqa - mha).max() <= 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_xquant_bytes_match_the_formula(tiny_mha, bits):
    cache = CacheSpec(kind="xquant", bits=bits, group=32, residual=16)
    session = tiny_mha.new_session(cache)
    session.prefill(list(range(1000, 1100)))
    blocks, exact = (100 - 16) // 32, 100 - (100 - 16) // 32 * 32
    dim = tiny_mha.spec.dim
    x_bytes = (
        blocks * quantized_nbytes(dim * 32, bits, 32) + exact * dim * 4
    )  # per token groups of 32
    memory = session.memory()
    assert memory.cache_bytes == tiny_mha.spec.n_layers * x_bytes
    assert memory.residual_tokens == exact


def test_eight_bit_xquant_stays_close_to_exact_kv(tiny_mha):
    ids = list(range(2000, 2100))
    exact = tiny_mha.new_session().logits(ids)
    xquant = tiny_mha.new_session(CacheSpec(kind="xquant", bits=8, group=32, residual=16)).logits(
        ids
    )
    assert np.abs(xquant - exact).max() <= 1e-2 * np.abs(exact).max()


def test_xquant_trim_inside_the_exact_window_reproduces_the_run(tiny_mha):
    session = tiny_mha.new_session(CacheSpec(kind="xquant", bits=3, group=32, residual=16))
    ids = list(range(4000, 4100))
    session.prefill(ids[:90])
    first = session.logits(ids[90:])
    session.trim(90)
    assert np.array_equal(session.logits(ids[90:]), first)


def test_backends_agree_on_xquant(tiny_models):
    from conftest import BACKENDS

    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve

    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    cache = CacheSpec(kind="xquant", bits=4, group=32, residual=16)
    opts = [EngineOptions(backend=b, weights="fp32", mha=True, cache=cache) for b in BACKENDS]
    ids = list(range(600, 700))
    torch_logits, mlx_logits = (
        load_model(resolve(str(tiny_models["qwen3"])), o).new_session().logits(ids) for o in opts
    )
    assert np.abs(torch_logits - mlx_logits).max() <= 1e-3 * np.abs(torch_logits).max()


def test_hadamard_rotation_contains_an_outlier_channel(backend):
    """Per-token groups with one huge channel: in the Hadamard basis (folded into a stream's
    encode matrix) the other values keep their precision, and the rotation is undone exactly."""
    from xqchat.backends.latents import block_hadamard

    turn = block_hadamard(128, 64)
    np.testing.assert_allclose(turn @ turn.T, np.eye(128), atol=1e-6)
    rows = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    rows[:, 5] *= 50
    cache = CacheSpec(kind="xquant", bits=2, group=64, residual=0)
    errors = []
    for basis in (np.eye(128, dtype=np.float32), turn.astype(np.float32)):
        if backend == "torch":
            import torch

            from xqchat.backends.cuda.cache import TokenStore

            store = TokenStore(128, cache, per_channel=False, dtype=torch.float32, device="cpu")
            store.append(torch.from_numpy(rows @ basis))
            got = store.read(torch.float32).numpy() @ basis.T
        else:
            import mlx.core as mx

            from xqchat.backends.mlx.cache import TokenStore

            store = TokenStore(128, cache, per_channel=False, dtype=mx.float32)
            store.append(mx.array(rows @ basis))
            got = np.array(store.read(mx.float32)) @ basis.T
        assert store.exact.shape[0] == 0  # all 64 rows went through the quantizer
        errors.append(np.abs(np.delete(got - rows, 5, axis=1)).mean())
    assert errors[1] < 0.65 * errors[0]
