"""Compressed caches, held to the same expectations in every backend: bytes equal the formula,
quality close to exact K/V, trim exact, and the two backends agree."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tiny

from xqchat.backends.base import CacheSpec
from xqchat.backends.quant import quantized_nbytes


def kv_quant_bytes(spec, tokens, cache, itemsize):
    """Formula: whole blocks of `group` tokens quantized, the rest exact: the sink's tokens and
    the newest ones (see TokenStore)."""
    blocks = max(0, (tokens - cache.sink - cache.residual) // cache.group)
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


@pytest.fixture(scope="module")
def exact_ppl(default_fp32, wikitext_ids):
    return perplexity(default_fp32, wikitext_ids, CacheSpec())[0]


@pytest.mark.parametrize("kind", ["kv-quant", "xquant", "xquant-cl"])
def test_eight_bits_are_within_a_tenth_of_a_percent(default_fp32, wikitext_ids, exact_ppl, kind):
    quant, session = perplexity(default_fp32, wikitext_ids, CacheSpec(kind=kind, bits=8))
    # most of the window really went through the quantizer
    assert session.memory().residual_tokens < 256
    assert abs(quant / exact_ppl - 1) < 1e-3


def test_backends_agree_on_kv_quant_perplexity(default_files, wikitext_ids):
    from conftest import BACKENDS

    from xqchat.backends.base import EngineOptions, load_model

    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    cache = CacheSpec(kind="kv-quant", bits=3, residual=64)
    ppl = [
        perplexity(
            load_model(default_files, EngineOptions(backend=b, weights="auto")), wikitext_ids, cache
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
    """A TokenStore's rows as numpy (a copy: a chained store reads into its chain's buffer), read
    as its backend requires."""
    if backend == "torch":
        import torch

        with torch.inference_mode():
            return store.read(torch.float32).numpy().copy()
    import mlx.core as mx

    from xqchat.backends.mlx.session import ENGINE

    return ENGINE.call(lambda: np.array(store.read(mx.float32)))


def test_trim_into_quantized_blocks_keeps_what_attention_saw(default_fp32):
    cache = CacheSpec(kind="kv-quant", bits=4, residual=64)
    session = default_fp32.new_session(cache)
    session.prefill(list(range(3000, 3400)))  # the sink, 2 blocks of 128 flushed, 140 in the window
    layer = session.caches[5]
    keys, values = (stored_rows(s, default_fp32.backend)[:200] for s in (layer.keys, layer.values))
    session.trim(200)  # the sink, one whole block, 68 rows of the second back to the window
    memory = session.memory()
    assert memory.tokens == 200 and memory.residual_tokens == 4 + 68
    expected, _, _ = kv_quant_bytes(
        default_fp32.spec, 200, CacheSpec(kind="kv-quant", bits=4, residual=68), 4
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
    blocks = (100 - cache.sink - 16) // 32
    exact = 100 - blocks * 32
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


@pytest.mark.parametrize("group, n", [(32, 100), (128, 200)])  # 128: groups span two rows of 64
def test_backends_agree_on_xquant(tiny_models, monkeypatch, group, n):
    """The same algorithm in both: keys rebuilt in float (the torch CPU engine's int8 rebuild,
    which MLX has not, is tested in test_cpu_kernels)."""
    from conftest import BACKENDS

    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.backends.cuda import cache as caches
    from xqchat.models import resolve

    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    monkeypatch.setattr(caches, "INT8_KEYS_BITS", 0)
    cache = CacheSpec(kind="xquant", bits=4, group=group, residual=16)
    opts = [EngineOptions(backend=b, weights="fp32", mha=True, cache=cache) for b in BACKENDS]
    ids = list(range(600, 600 + n))
    torch_logits, mlx_logits = (
        load_model(resolve(str(tiny_models["qwen3"])), o).new_session().logits(ids) for o in opts
    )
    assert np.abs(torch_logits - mlx_logits).max() <= 1e-3 * np.abs(torch_logits).max()


def token_store(backend, width, cache, per_channel, spans_rows=False):
    """A bare TokenStore of `backend` with functions that feed it numpy rows and read its rows
    back as numpy (on this thread, where its arrays live)."""
    if backend == "torch":
        import torch

        from xqchat.backends.cuda.cache import Scratch, TokenStore

        store = TokenStore(
            width, cache, per_channel, torch.float32, "cpu", Scratch(), spans_rows=spans_rows
        )
        return store, torch.from_numpy, lambda: store.read(torch.float32).numpy()
    import mlx.core as mx

    from xqchat.backends.mlx.cache import TokenStore

    store = TokenStore(width, cache, per_channel, mx.float32, spans_rows=spans_rows)
    return store, mx.array, lambda: np.array(store.read(mx.float32))


def test_hadamard_rotation_contains_an_outlier_channel(backend):
    """Per-token groups with one huge channel: in the Hadamard basis (folded into a stream's
    encode matrix) its energy is spread over the group, the rows are rebuilt more closely than
    in their own basis (where the quantizer must clip the outlier or coarsen every step), and the
    rotation is undone exactly."""
    from xqchat.backends.latents import block_hadamard

    turn = block_hadamard(128, 64)
    np.testing.assert_allclose(turn @ turn.T, np.eye(128), atol=1e-6)
    rows = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    rows[:, 5] *= 50
    cache = CacheSpec(kind="xquant", bits=2, group=64, residual=0, sink=0)
    errors = []
    for basis in (np.eye(128, dtype=np.float32), turn.astype(np.float32)):
        store, array, read = token_store(backend, 128, cache, per_channel=False)
        store.append(array(rows @ basis))
        assert store.exact.shape[0] == 0  # all 64 rows went through the quantizer
        errors.append(np.square(read() @ basis.T - rows).mean())
    assert errors[1] < 0.8 * errors[0]


def test_groups_that_span_rows(backend):
    """Rows of 96 values in groups of 64 that span rows (X's layout): each group takes the
    block's next 64 values, across row ends (not 3 groups of 32 per row: the bytes are those of
    groups of 64), and rebuilds them as a plain min/max quantizer of those values does."""
    rows = np.random.default_rng(2).standard_normal((128, 96)).astype(np.float32)
    cache = CacheSpec(kind="xquant", bits=3, group=64, residual=0, sink=0)
    store, array, read = token_store(backend, 96, cache, per_channel=False, spans_rows=True)
    store.append(array(rows))
    assert (store.n_blocks, store.n_exact) == (2, 0)
    groups = 128 * 96 // 64
    assert store.nbytes == 128 * 96 * 3 // 8 + groups * 2 * 2  # codes, fp16 scale and zero
    values = rows.reshape(groups, 64)
    low, high = values.min(1, keepdims=True), values.max(1, keepdims=True)
    scale = ((high - low) / 7).astype(np.float16).astype(np.float32)
    zero = low.astype(np.float16).astype(np.float32)
    codes = np.clip(np.round((values - zero) / scale), 0, 7)
    np.testing.assert_allclose(read(), (codes * scale + zero).reshape(128, 96), atol=1e-6)


@pytest.mark.parametrize("per_channel", [True, False])
def test_the_sink_stays_exact_and_spares_its_block(backend, per_channel):
    """The first tokens (attention sinks, whose values are often far out) are kept exact and
    out of the first block's ranges; without the sink the quantizer must clip them or, per
    channel, coarsen the whole block."""
    rows = np.random.default_rng(1).standard_normal((72, 64)).astype(np.float32)
    rows[0] *= 40
    errors = []
    for sink in (0, 4):
        cache = CacheSpec(kind="kv-quant", bits=3, group=32, residual=8, sink=sink)
        store, array, read = token_store(backend, 64, cache, per_channel)
        store.append(array(rows))
        assert (store.n_blocks, store.n_exact) == ((72 - sink - 8) // 32, 72 - store.n_blocks * 32)
        got = read()
        if sink:
            assert np.array_equal(got[:sink], rows[:sink])
        errors.append(np.square(got - rows)[:36].mean())
    assert errors[1] < 0.1 * errors[0]


def test_rows_kept_from_a_tree_may_fill_the_sink(backend):
    """A drafter's tree appended before the sink is full: `keep` picks the accepted rows, and
    the sink and the window hold them in order, exactly."""
    rows = np.arange(7 * 32, dtype=np.float32).reshape(7, 32)
    cache = CacheSpec(kind="xquant", bits=4, group=32, residual=8, sink=4)
    store, array, read = token_store(backend, 32, cache, per_channel=False)
    store.append(array(rows[:2]))
    store.append(array(rows[2:]))  # a tree of 5 nodes after 2 tokens
    store.keep(2, [0, 2, 3])
    assert len(store) == 5 and store.sink.shape[0] == 4
    np.testing.assert_array_equal(read(), rows[[0, 1, 2, 4, 5]])


# -- XQuant on GQA layers (SVD latents) and XQuant-CL ------------------------------------------


@pytest.fixture(scope="module", params=["gqa-qwen2", "gqa-qwen3"])
def tiny_gqa(request, tiny_models, backend):
    """GQA with K/V bias (qwen2) or k-norm (qwen3): both must survive the latent rebuild."""
    return load_tiny(tiny_models, request.param, backend)


@pytest.mark.parametrize("kind", ["xquant", "xquant-cl"])
def test_latents_rebuild_keys_and_values_exactly(tiny_gqa, kind, monkeypatch):
    """Before any quantization (the exact window holds everything) attention from latents, with
    V never rebuilt, equals attention over exact K/V (keys rebuilt in float: the int8 rebuild of
    the CPU engine's steps, for caches of 4 bits or fewer, is tested in test_cpu_kernels)."""
    from xqchat.backends.cuda import cache as caches

    monkeypatch.setattr(caches, "INT8_KEYS_BITS", 0)
    ids = list(range(700, 800))
    exact = tiny_gqa.new_session().logits(ids)
    session = tiny_gqa.new_session(CacheSpec(kind=kind, residual=128))
    assert [s.width for s in session.caches[0].stores] == [32, 32]  # L_k and L_v, not X (128)
    got = session.logits(ids[:60])
    got = np.concatenate([got, session.logits(ids[60:61]), session.logits(ids[61:])])
    assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()


def latent_bytes(spec, tokens, cache, base_layers=0):
    """Formula: per flushed block of `group` tokens, L_k per channel and L_v per token (groups
    of 32 here, the row width being 32); the exact rows (sink and window) in fp32; base layers
    at >= 4 bits."""
    blocks = max(0, (tokens - cache.sink - cache.residual) // cache.group)
    exact = tokens - blocks * cache.group
    width = spec.kv_dim

    def layer(bits):
        per_block = quantized_nbytes(width * cache.group, bits, cache.group)
        per_block += quantized_nbytes(width * cache.group, bits, min(32, cache.group))
        return blocks * per_block + exact * 2 * width * 4

    n = spec.n_layers
    return base_layers * layer(max(cache.bits, 4)) + (n - base_layers) * layer(cache.bits)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("kind", ["xquant", "xquant-cl"])
def test_latent_bytes_match_the_formula(tiny_gqa, kind, bits):
    cache = CacheSpec(kind=kind, bits=bits, group=32, residual=16)
    session = tiny_gqa.new_session(cache)
    session.prefill(list(range(1000, 1090)))
    base = min(3, tiny_gqa.spec.n_layers) if kind == "xquant-cl" else 0
    memory = session.memory()
    assert memory.cache_bytes == latent_bytes(tiny_gqa.spec, 90, cache, base)
    assert memory.residual_tokens == 90 - 2 * 32
    assert memory.factor_bytes > 0


@pytest.fixture(scope="module")
def deep_gqa(default_tokenizer, backend, tmp_path_factory):
    """A 6-layer GQA model, so XQuant-CL has layers past its 3 base layers that store deltas."""
    import torch
    from conftest import WIDE
    from transformers import AutoModelForCausalLM, Qwen2Config

    from xqchat.backends.base import EngineOptions, load_model
    from xqchat.models import resolve

    path = tmp_path_factory.mktemp("deep") / "gqa6"
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**{**WIDE, "num_hidden_layers": 6}, tie_word_embeddings=True)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    default_tokenizer.hf.save_pretrained(path)
    return load_model(resolve(str(path)), EngineOptions(backend=backend, weights="fp32"))


def test_cross_layer_deltas_are_stored_and_eight_bits_stay_close(deep_gqa):
    ids = list(range(2000, 2100))
    exact = deep_gqa.new_session().logits(ids)
    errors = {}
    for bits in (8, 4):
        session = deep_gqa.new_session(
            CacheSpec(kind="xquant-cl", bits=bits, group=32, residual=16)
        )
        got = session.logits(ids)
        errors[bits] = np.abs(got - exact).max() / np.abs(exact).max()
    assert [c.stores[0].delta for c in session.caches] == [False] * 3 + [True] * 3
    assert [c.stores[0].bits for c in session.caches] == [4] * 6
    # random weights make this model sensitive (plain xquant: 1.5% at 8 bits, 19% at 4)
    assert errors[8] <= 3e-2 and errors[8] < errors[4] / 5


def all_rows(session, backend):
    """Every layer's cached rows, read in layer order (XQuant-CL layers accumulate)."""
    return [[stored_rows(store, backend) for store in c.stores] for c in session.caches]


def test_cross_layer_trim_keeps_what_attention_saw(deep_gqa):
    session = deep_gqa.new_session(CacheSpec(kind="xquant-cl", bits=3, group=32, residual=16))
    session.prefill(list(range(3000, 3150)))  # 4 blocks flushed in every layer
    before = all_rows(session, deep_gqa.backend)
    session.trim(110)  # the sink, 3 whole blocks, 10 rows of the fourth back to the window
    assert session.memory().residual_tokens == 4 + 10
    after = all_rows(session, deep_gqa.backend)
    for old, new in zip(before, after, strict=True):
        for a, b in zip(old, new, strict=True):
            assert np.array_equal(a[:110], b)


def test_backends_agree_on_latents_and_cross_layer(tiny_models):
    from conftest import BACKENDS

    if len(BACKENDS) < 2:
        pytest.skip("needs both backends")
    ids = list(range(600, 700))
    for kind in ("xquant", "xquant-cl"):
        # 8 bits: float rounding differs between the frameworks, and now and then it moves a value
        # across a rounding boundary of the quantizer; a step of 1/255 of the range keeps that small
        cache = CacheSpec(kind=kind, bits=8, group=32, residual=16)
        torch_logits, mlx_logits = (
            load_tiny(tiny_models, "gqa-qwen3", b, cache=cache).new_session().logits(ids)
            for b in BACKENDS
        )
        assert np.abs(torch_logits - mlx_logits).max() <= 1e-3 * np.abs(torch_logits).max()


def test_svd_factors_are_computed_once_and_kept(tiny_models, backend):
    first = load_tiny(tiny_models, "gqa-qwen2", backend)
    store = first.module.derived
    for f in store.glob("*.npz"):
        f.unlink()
    first.new_session(CacheSpec(kind="xquant"))
    assert first.module.svd_seconds > 0 and len(list(store.glob("*.npz"))) == 1
    second = load_tiny(tiny_models, "gqa-qwen2", backend)
    second.new_session(CacheSpec(kind="xquant"))
    assert second.module.svd_seconds == 0  # read back, not recomputed
    next(store.glob("*.npz")).write_bytes(b"damaged")
    third = load_tiny(tiny_models, "gqa-qwen2", backend)
    third.new_session(CacheSpec(kind="xquant"))
    assert third.module.svd_seconds > 0  # a damaged file is recomputed, not trusted


# -- save / load ---------------------------------------------------------------------------------


KINDS = [
    CacheSpec(),
    CacheSpec(kind="kv-quant", bits=3, group=32, residual=16),
    CacheSpec(kind="xquant", bits=3, group=32, residual=16),
    CacheSpec(kind="xquant-cl", bits=2, group=32, residual=16),
]


@pytest.mark.parametrize("cache", KINDS, ids=lambda c: c.kind)
def test_save_and_load_round_trip_exactly(deep_gqa, cache, tmp_path):
    ids = list(range(5000, 5120))
    original = deep_gqa.new_session(cache)
    original.prefill(ids[:100])
    original.save(tmp_path / "chat.cache")
    resumed = deep_gqa.new_session(cache)
    resumed.load(tmp_path / "chat.cache")
    assert resumed.tokens == original.tokens
    stored = [dataclasses.replace(s.memory(), reserved_bytes=0) for s in (resumed, original)]
    assert stored[0] == stored[1]  # room reserved for growth is not saved
    assert np.array_equal(resumed.logits(ids[100:]), original.logits(ids[100:]))


def test_a_damaged_or_mismatched_cache_file_is_refused(deep_gqa, tiny_fp32, tmp_path):
    from xqchat.models import XQError

    cache = CacheSpec(kind="xquant", bits=4, group=32, residual=16)
    session = deep_gqa.new_session(cache)
    session.prefill(list(range(100)))
    path = tmp_path / "chat.cache"
    session.save(path)
    good = path.read_bytes()

    target = deep_gqa.new_session(cache)
    target.prefill([1, 2, 3])
    with pytest.raises(XQError, match="holds a xquant cache .*this session uses another"):
        deep_gqa.new_session(CacheSpec(kind="xquant", bits=3, group=32, residual=16)).load(path)
    with pytest.raises(XQError, match="saved by another model"):
        tiny_fp32.new_session(cache).load(path)
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit in the last tensor
    with pytest.raises(XQError, match="damaged"):
        target.load(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(XQError, match="not a readable xqchat cache"):
        target.load(path)
    with pytest.raises(XQError, match="no saved cache"):
        target.load(tmp_path / "missing.cache")
    assert target.tokens == [1, 2, 3]  # a refused load leaves the session as it was


def test_pull_prepares_the_xquant_factors(tiny_models):
    from xqchat.app.cli import prepare_xquant
    from xqchat.models import resolve

    files = resolve(str(tiny_models["gqa-qwen3"]))
    (line,) = prepare_xquant(files)
    directory = line.rsplit(": ", 1)[1]
    assert {p.name.split("-")[0] for p in Path(directory).glob("*.npz")} == {"svd"}
    assert prepare_xquant(resolve(str(tiny_models["llama"]))) == []  # X itself: no SVD needed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mlx_products_read_the_packed_blocks_in_place(bits):
    """mx.quantized_matmul on the stored blocks (per channel: transposed, packed along tokens)
    equals the product with the dequantized rows."""
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from xqchat.backends.mlx.cache import TokenStore
    from xqchat.backends.mlx.session import ENGINE

    def check():
        g = np.random.default_rng(bits)
        cache = CacheSpec(kind="xquant", bits=bits, group=32, residual=8)
        rows = mx.array(g.standard_normal((80, 64)).astype(np.float32))
        m = mx.array(g.standard_normal((64, 48)).astype(np.float32))
        a = mx.array(g.standard_normal((3, 2, 80)).astype(np.float32))
        for per_channel in (True, False):
            store = TokenStore(64, cache, per_channel=per_channel, dtype=mx.float32)
            store.append(rows)
            assert store.n_blocks == 2  # rows 0-3 the sink, 4-67 two blocks, 68-79 exact
            dense = store.read(mx.float32)
            for start, stop in ((0, 80), (0, 4), (0, 36), (36, 80), (68, 80)):
                part = dense[start:stop]
                np.testing.assert_allclose(
                    np.array(store.rows_times(m, start, stop)), np.array(part @ m), atol=1e-4
                )
                if not per_channel:
                    got = store.times_rows(a[..., start:stop], start, stop)
                    np.testing.assert_allclose(
                        np.array(got), np.array(a[..., start:stop] @ part), atol=1e-4
                    )

    ENGINE.call(check)


@pytest.mark.parametrize("kind", ["xquant", "xquant-cl"])
def test_long_caches_are_read_in_spans(tiny_models, backend, kind, monkeypatch):
    """Keys rebuilt 32 tokens at a time, spans merged by their softmax statistics: the logits
    of prefill chunks (masked) and decode steps are those of one span over the whole cache."""
    import importlib

    import torch

    spans = importlib.import_module(
        f"xqchat.backends.{'cuda' if backend == 'torch' else 'mlx'}.cache"
    )
    engine = load_tiny(tiny_models, "gqa-qwen2", backend)
    spec = CacheSpec(kind=kind, bits=4, group=32, residual=8)
    runs = []
    for span in (4096, 32):
        monkeypatch.setattr(spans, "SPAN", span)
        session = engine.new_session(spec)
        session.prefill(list(range(500, 560)))
        chunk = session.logits(list(range(600, 620)))  # 20 new tokens over 3 spans, masked
        runs.append(np.concatenate([chunk, session.logits([5]), session.logits([6])]))
    # float32 sums in another order: differences of ~1e-4 on logits of magnitude ~1
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=2e-4
    )


def test_scratch_buffers_keep_their_size_when_dtypes_alternate():
    """A slot asked for in two dtypes keeps a buffer for each, which grows only when more is
    asked of it (one buffer regrown at every switch had doubled each time)."""
    import torch

    from xqchat.backends.cuda.cache import Scratch

    scratch = Scratch()
    for _ in range(40):
        for dtype in (torch.float32, torch.bfloat16):
            rows = scratch("rows", (100, 8), dtype, "cpu")
            assert rows.dtype == dtype and rows.shape == (100, 8)
    assert {key: b.numel() for key, b in scratch.buffers.items()} == {
        ("rows", torch.float32): 800,
        ("rows", torch.bfloat16): 800,
    }
    assert scratch("rows", (300, 8), torch.float32, "cpu").shape == (300, 8)
    assert scratch.buffers["rows", torch.float32].numel() == 2400  # grown: max(asked, twice)


@pytest.mark.parametrize("arch", ["smollm3", "phi4", "mistral-window", "gemma3"])
def test_every_kind_runs_the_new_architectures(tiny_models, backend, arch, monkeypatch):
    """Sliding windows (16), layers without RoPE, partial RoPE, Gemma's query scale: with
    everything held exact every kind equals K/V; at 8 bits each stays close."""
    from xqchat.backends.cuda import cache as caches

    monkeypatch.setattr(caches, "INT8_KEYS_BITS", 0)  # keys rebuilt in float (see above)
    model = load_tiny(tiny_models, arch, backend)
    ids = list(range(700, 800))
    exact = model.new_session().logits(ids)
    scale = np.abs(exact).max()
    for kind in ("kv-quant", "xquant", "xquant-cl"):
        for residual, bits, tol in [(128, 4, 1e-5), (16, 8, 2e-2)]:
            session = model.new_session(
                CacheSpec(kind=kind, bits=bits, group=32, residual=residual)
            )
            got = [session.logits(ids[:60]), *(session.logits([t]) for t in ids[60:64])]
            got = np.concatenate([*got, session.logits(ids[64:])])
            assert np.abs(got - exact).max() <= tol * scale, (kind, residual)
