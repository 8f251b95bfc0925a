"""The C passes on the CPU (backends/cuda/cpu_kernels.c: XQuant decode, LLM.int8()'s product,
decode attention on a bf16 cache) against the torch ops they replace, which also remain the path where no C compiler works."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny
from test_conformance import pieces

from xqchat.backends import int8
from xqchat.backends.base import CacheSpec, EngineOptions, load_model
from xqchat.backends.cuda import cpu_kernels, cpu_paths, quant
from xqchat.backends.cuda import layers as cuda_layers
from xqchat.backends.cuda.cache import attend_tree_bf16, attention, rotate
from xqchat.backends.cuda.int8 import Int8Linear
from xqchat.backends.drafter import build_tree
from xqchat.models import resolve

needs_c = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler")
# the engine rebuilds keys in int8 only where torch._int_mm is exact (cpu_paths.py)
needs_exact_int_mm = pytest.mark.skipif(
    not cpu_paths.int_mm_exact(),
    reason="torch._int_mm is not exact on this CPU (no VNNI): the engine rebuilds keys in float",
)


def without_c(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)


@needs_c
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


@needs_c
def test_one_block_and_one_column_wide_blocks(monkeypatch):
    """An unstacked block (as a flush quantizes it) and per-channel blocks one column wide."""
    g = torch.Generator().manual_seed(0)
    cases = [quant.quantize(torch.randn(64 * 8, generator=g), 3, 32)]
    cases += [quant.quantize_columns(torch.randn(n, 16, 1, generator=g), 4) for n in (1, 3)]
    got = [quant.dequantize(q) for q in cases]
    without_c(monkeypatch)
    for q, values in zip(cases, got, strict=True):
        assert torch.equal(values, quant.dequantize(q))


def scores_case(d, t, keys_dtype, bias_and_norm, m=4):
    """rope_scores' and rope_attend's operands, and the scores as the forward computes them."""
    g = torch.Generator().manual_seed(0)
    n_kv = 3
    keys = torch.randn(t, n_kv * d, generator=g).to(keys_dtype)
    q = torch.randn(n_kv, m, d, generator=g)
    bias = torch.randn(n_kv * d, generator=g) if bias_and_norm else None
    norm = 1 + 0.1 * torch.randn(d, generator=g) if bias_and_norm else None
    angles = torch.arange(t)[:, None] * 0.3 ** torch.arange(d // 2)[None]
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)  # the first half negated, as Rope's table
    k = keys.float() + (0 if bias is None else bias)
    k = k.view(t, n_kv, d).transpose(0, 1)
    if norm is not None:
        k = F.rms_norm(k, (d,), norm, 1e-6)
    scores = q @ rotate(k, cos, sin).transpose(1, 2) * d**-0.5
    return (keys, q, cos, sin, bias, norm, 1e-6), scores


@needs_c
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("keys_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_and_norm", [False, True])
def test_scores_equal_the_torch_ops(d, keys_dtype, bias_and_norm):
    """Keys (T, H_kv * D) get the bias, the k-norm and RoPE at their positions, then the scaled
    products with each head's queries: as the forward computes them (head sizes 64 and 128 have
    their own compiled loops)."""
    operands, want = scores_case(d, 50, keys_dtype, bias_and_norm)
    torch.testing.assert_close(cpu_kernels.rope_scores(*operands), want, rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize(
    ("d", "t", "width"), [(64, 1, 192), (64, 700, 192), (128, 256, 80), (80, 257, 7)]
)
@pytest.mark.parametrize("keys_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_and_norm", [False, True])
def test_fused_attention_equals_the_torch_ops(d, t, width, keys_dtype, bias_and_norm):
    """rope_attend: the same scores, their softmax, its weighted sum of rows every head shares
    and that sum through each head's value projection, with the log-sum-exp by which spans
    merge: one token, across parts of 256 tokens (700, 257), rows of the tile (3 heads x 3
    queries) and columns beyond whole tiles (80, 7)."""
    operands, scores = scores_case(d, t, keys_dtype, bias_and_norm, m=3)
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(t, width, generator=generator)
    value_heads = torch.randn(scores.shape[0], width, d, generator=generator)
    out, lse = cpu_kernels.rope_attend(*operands, values, value_heads)
    want = torch.softmax(scores, -1) @ values @ value_heads
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize("kind", ["kv-quant", "xquant", "xquant-cl"])
@pytest.mark.parametrize("model", ["gqa-qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("span", [None, 64])
def test_decoding_with_and_without_the_c_passes(tiny_models, kind, model, span, monkeypatch):
    """The logits of prefill chunks and decode steps (k-norm on Qwen3; MHA X on Llama; a K/V
    bias on Qwen2) are the same through the C passes and the torch ops. One base layer, so the
    second layer stores differences that are added to the first's rows. Spans of 64 tokens:
    XQuant's attention over a long chat, merged span by span."""
    from xqchat.backends.cuda import cache as caches

    monkeypatch.setattr(caches, "BASE_LAYERS", 1)
    monkeypatch.setattr(caches, "INT8_KEYS_BITS", 0)  # keys rebuilt in float, as the torch ops do
    if span:
        monkeypatch.setattr(caches, "SPAN", span)
    calls = []
    for name in ("dequantize", "rope_scores", "rope_attend"):
        run = getattr(cpu_kernels, name)
        monkeypatch.setattr(
            cpu_kernels, name, lambda *a, _run=run, _name=name: calls.append(_name) or _run(*a)
        )
    engine = load_tiny(tiny_models, model, "torch")
    runs = []
    for c_passes in (True, False):
        if not c_passes:
            without_c(monkeypatch)
        session = engine.new_session(CacheSpec(kind=kind, bits=3, group=32, residual=8))
        session.prefill(list(range(400, 480)))
        chunk = session.logits(list(range(600, 610)))
        runs.append(np.concatenate([chunk, *(session.logits([t]) for t in (7, 8, 9))]))
        # chunks score through rope_scores; decode steps attend in one pass
        expected = {"dequantize", "rope_scores", "rope_attend"}
        expected = expected if kind != "kv-quant" else {"dequantize"}
        assert set(calls) == (expected if c_passes else set())
        calls.clear()
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=1e-4
    )


@needs_c
def test_quantize_rows_equals_the_torch_ops_bit_for_bit():
    """Rows of every scale, a row of zeros, and values on rounding ties (half to even)."""
    from xqchat.backends.cuda.int8 import quantize_rows, row_absmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 192, generator=g) * torch.logspace(-3, 3, 300)[:, None]
    x[7] = 0
    x[8, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: codes 127, 0, 2, -2
    codes, scale = cpu_kernels.quantize_rows(x)
    want_codes, want_scale = quantize_rows(x, row_absmax(x))
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    assert codes[8, :4].tolist() == [127, 0, 2, -2]


@needs_c
@needs_exact_int_mm
def test_int8_keys_stay_within_int8_error():
    """Latents.int8_keys against the float product, on rows with an outlier channel (as the key
    latent's first channels are): within 1.5% of K's norm. Without the per-channel scales of the
    rebuild matrix, or without the row scales, the error would be of order one."""
    from xqchat.backends.cuda.cache import Latents
    from xqchat.backends.latents import LayerLatents, Stream

    g = np.random.default_rng(0)
    width, kv_dim = 48, 64
    layer = LayerLatents(
        (Stream(g.standard_normal((96, width)).astype(np.float32), per_channel=True),),
        (0, (g.standard_normal((width, kv_dim)) * g.uniform(0.1, 3, kv_dim)).astype(np.float32)),
        (0, g.standard_normal((width, kv_dim)).astype(np.float32)),
    )
    latents = Latents(layer, lambda m: torch.nn.Linear(*m.shape), 16, torch.float32, "cpu", True)
    rows = torch.from_numpy(g.standard_normal((500, width)).astype(np.float32))
    rows[:, 0] *= 8
    want = rows.double() @ torch.from_numpy(layer.keys[1]).double()
    products, row_scale, column_scale = latents.int8_keys(rows)
    assert products.dtype == torch.int32
    error = (products.double() * column_scale * row_scale - want).norm() / want.norm()
    assert error < 0.015


@needs_c
def test_rope_attend_applies_the_scales_of_int8_keys_as_the_torch_ops_do():
    """Keys handed over as int32 products and scales attend exactly as the keys the torch
    epilogue (int8_product) makes of them."""
    from xqchat.backends.cuda.int8 import int8_product

    operands, _ = scores_case(64, 300, torch.float32, True, m=3)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (300, 40), dtype=torch.int8, generator=g)
    weight = torch.randint(-127, 128, (192, 40), dtype=torch.int8, generator=g)
    row_scale, column_scale = torch.rand(300, 1, generator=g), torch.rand(192, generator=g)
    products = torch.mm(codes.int(), weight.int().t())  # exact on every CPU
    keys = cpu_kernels.IntKeys(products, row_scale, column_scale)
    values = torch.randn(300, 50, generator=g)
    value_heads = torch.randn(3, 50, 64, generator=g)
    float_keys = int8_product(codes, row_scale, weight, column_scale)
    for got, want in zip(
        cpu_kernels.rope_attend(keys, *operands[1:], values, value_heads),
        cpu_kernels.rope_attend(float_keys, *operands[1:], values, value_heads),
        strict=True,
    ):
        assert torch.equal(got, want)
    assert torch.equal(
        cpu_kernels.rope_scores(keys, *operands[1:]),
        cpu_kernels.rope_scores(float_keys, *operands[1:]),
    )


@needs_c
@needs_exact_int_mm
@pytest.mark.parametrize("kind", ["xquant", "xquant-cl"])
@pytest.mark.parametrize("model", ["gqa-qwen3", "llama"])
def test_steps_rebuild_keys_in_int8_at_4_bits_or_fewer(tiny_models, kind, model, monkeypatch):
    """Decode steps of a cache of 4 bits or fewer rebuild their keys in int8, once per layer and
    step, and so does a drafter's tree (test_speculative checks that its text is the steps'); a
    prompt's chunks, and 8-bit caches, in float. The error int8 adds is small beside the
    cache's own."""
    from xqchat.backends.cuda import cache as caches
    from xqchat.backends.drafter import build_tree

    calls = []
    run = cpu_kernels.quantize_rows
    monkeypatch.setattr(cpu_kernels, "quantize_rows", lambda x: calls.append(len(x)) or run(x))
    monkeypatch.setenv("XQCHAT_INT_MM", "1")  # wherever the CPU runs torch._int_mm fast or not
    engine = load_tiny(tiny_models, model, "torch")

    def logits(cache):  # of a chunk after a prefill, then of three steps
        session = engine.new_session(cache)
        session.prefill(list(range(400, 480)))
        chunk = session.logits(list(range(600, 610)))
        steps = np.concatenate([session.logits([t]) for t in (7, 8, 9)])
        session._verify(build_tree(np.array([[5, 6, 7], [5, 8, 9]])), session.caches[0].offset)
        return chunk, steps

    n, runs = engine.spec.n_layers, []
    for bits, int8_bits in ((4, 4), (4, 0), (8, 4)):
        monkeypatch.setattr(caches, "INT8_KEYS_BITS", int8_bits)
        runs.append(logits(CacheSpec(kind=kind, bits=bits, group=32, residual=8)))
        int8 = bits <= int8_bits  # three steps, then a tree of five tokens
        assert calls == ([91] * n + [92] * n + [93] * n + [98] * n if int8 else [])
        calls.clear()
    (chunk, steps), (float_chunk, float_steps) = runs[:2]
    np.testing.assert_array_equal(chunk, float_chunk)
    exact = logits(CacheSpec(kind="kv"))[1]
    # int8's error is a small part of the 4-bit cache's own (~11% on these models)
    assert np.linalg.norm(steps - float_steps) < np.linalg.norm(float_steps - exact) / 4
    assert not np.array_equal(steps, float_steps)


def int8_layer(n, k, bias: bool, threshold=int8.THRESHOLD, seed=0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    codes, scale = int8.quantize((torch.randn(n, k, generator=g) * 0.05).numpy())
    layer = Int8Linear(k, n, bias, threshold)
    layer.weight.copy_(torch.from_numpy(codes))
    layer.scale.copy_(torch.from_numpy(scale))
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=g))
    return layer


def spy_int8(monkeypatch) -> list[int]:
    """The rows of each call of the int8 C pass, from now on."""
    calls = []
    run = cpu_kernels.Int8Product.__call__
    monkeypatch.setattr(
        cpu_kernels.Int8Product, "__call__", lambda *a: calls.append(len(a[1])) or run(*a)
    )
    return calls


@needs_c
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("k", [576, 100])  # whole 64-byte steps, and a masked tail
@pytest.mark.parametrize("outliers", [(), (5, 77, 90)])
def test_int8_linear_equals_the_torch_ops(rows, k, outliers, monkeypatch):
    """Without outlier features the C pass equals the torch ops bit for bit (the same integer
    products, scaled in the same order); with them, the float part sums in another order."""
    g = torch.Generator().manual_seed(rows)
    layer = int8_layer(300, k, bias=rows % 2 == 1)
    x = torch.rand(rows, k, generator=g) * 6 - 3  # below the threshold, but where planted
    x[:, list(outliers)] *= 20
    calls = spy_int8(monkeypatch)
    got = layer(x)
    assert calls
    without_c(monkeypatch)
    want = layer(x)
    if outliers:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


@needs_c
def test_int8_linear_serves_a_few_rows_and_leaves_prefill_to_onednn(monkeypatch):
    layer = int8_layer(64, 128, bias=False)
    calls = spy_int8(monkeypatch)
    for rows in (1, cpu_kernels.INT8_ROWS, cpu_kernels.INT8_ROWS + 1, 64):
        layer(torch.randn(rows, 128))
    layer(torch.randn(2, 128, dtype=torch.float64))  # not float32: the torch ops
    assert calls == [1, cpu_kernels.INT8_ROWS]
    with pytest.raises(ValueError, match="int8_linear"):
        layer.fused(torch.randn(1, 128))(torch.randn(cpu_kernels.INT8_ROWS + 1, 128), 6.0)


@needs_c
def test_int8_decoding_with_and_without_the_c_pass(tiny_models, monkeypatch):
    """An int8 model's decode steps and a drafter-sized tree of rows (the C pass) give the logits
    the torch ops give."""
    files = resolve(str(tiny_models["qwen2"]))  # a K/V bias through the pass
    calls = spy_int8(monkeypatch)
    monkeypatch.setenv("XQCHAT_INT_MM", "1")  # without the pass: LLM.int8's torch ops, not floats
    runs = []
    for c_pass in (True, False):
        if not c_pass:
            without_c(monkeypatch)
        engine = load_model(files, EngineOptions(backend="torch", weights="int8", int8_threshold=6))
        session = engine.new_session()
        session.prefill(list(range(400, 480)))
        chunk = session.logits(list(range(600, 607)))
        runs.append(np.concatenate([chunk, *(session.logits([t]) for t in (7, 8, 9))]))
        assert (7 in calls and 1 in calls) == c_pass
        calls.clear()
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=1e-4
    )


@needs_c
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 3, 80)])
@pytest.mark.parametrize("n", [1, 256, 257, 700])  # one part, a whole part, one over, several
def test_decode_attention_on_a_bf16_cache_equals_the_torch_ops(heads, kv_heads, d, n):
    """One query row per head against the first n rows of a bf16 cache with room to spare: the
    pass (parts of 256 tokens, merged) gives PyTorch's attention on a float32 copy of the rows."""
    g = torch.Generator().manual_seed(n + d)
    q = 3 * torch.randn(1, heads, 1, d, generator=g)
    keys, values = (torch.randn(1, kv_heads, 800, d, generator=g).bfloat16() for _ in range(2))
    got = cpu_kernels.attend_bf16(q, keys, values, n)
    want = attention(q, keys[:, :, :n].float(), values[:, :, :n].float(), None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize(
    ("m", "n", "d"), [(7, 300, 64), (7, 258, 64), (16, 520, 64), (5, 5, 64), (7, 300, 20)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_tree_attention_on_a_bf16_cache_equals_the_torch_ops(m, n, d, causal):
    """m new rows (a prefill chunk's causal mask, or a drafter's tree) see every row before them
    and the new rows their mask allows. At n = 258 the new rows straddle two parts, and the first
    five see none of the second part's: that part weighs nothing in the merge (and is no NaN).
    Heads 20 wide are scored one dot product at a time, not from the 8-deep key tiles."""
    g = torch.Generator().manual_seed(m * n)
    q = 3 * torch.randn(1, 9, m, d, generator=g)
    keys, values = (torch.randn(1, 3, 600, d, generator=g).bfloat16() for _ in range(2))
    newest = torch.ones(m, m, dtype=torch.bool).tril()
    if not causal:  # a tree: each row sees itself and some of the rows before it
        newest &= (torch.rand(m, m, generator=g) < 0.5) | torch.eye(m, dtype=torch.bool)
    mask = torch.cat([torch.ones(m, n - m, dtype=torch.bool), newest], dim=1)
    got = cpu_kernels.attend_bf16(q, keys, values, n, newest)
    want = attention(q, keys[:, :, :n].float(), values[:, :, :n].float(), mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_c
def test_bf16_decoding_with_and_without_the_attention_pass(tiny_models, monkeypatch):
    """A bf16 model's chunk of 7 rows (causal among themselves) and its decode steps on the exact
    cache go through the pass, not its first prefill, and give the torch ops' logits."""
    calls = []
    run = cpu_kernels.attend_bf16
    monkeypatch.setattr(cpu_kernels, "attend_bf16", lambda *a: calls.append(a[3]) or run(*a))
    monkeypatch.setenv("XQCHAT_BF16_PATH", "torch")  # matmuls the same way in both runs
    # and norms: the C pass's last-bit differences would change the bf16 matmuls' inputs
    monkeypatch.setattr(cuda_layers, "few_cpu_rows", lambda x: False)
    engine = load_model(
        resolve(str(tiny_models["gqa-qwen2"])), EngineOptions(backend="torch", weights="bf16")
    )
    runs = []
    for c_pass in (True, False):
        if not c_pass:
            without_c(monkeypatch)
        session = engine.new_session()
        session.prefill(list(range(400, 600)))
        chunk = session.logits(list(range(600, 607)))
        runs.append(np.concatenate([chunk, *(session.logits([t]) for t in (7, 8, 9))]))
        layers = engine.spec.n_layers
        assert calls == ([n for n in (207, 208, 209, 210) for _ in range(layers)] if c_pass else [])
        calls.clear()
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=1e-4
    )


def test_without_a_compiler_the_torch_ops_run_and_the_paths_say_so(
    tiny_models, tmp_path, monkeypatch
):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built before
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        spec = CacheSpec(kind="xquant-cl", bits=8, group=32, residual=8)
        engine = load_tiny(tiny_models, "llama", "torch", cache=spec)
        assert engine.paths["c_passes"] == "off" and not engine.notes  # shown, not noted
        for weights in ("int8", "bf16"):  # their products run as torch ops
            other = load_model(
                resolve(str(tiny_models["llama"])), EngineOptions(backend="torch", weights=weights)
            )
            assert other.paths["c_passes"] == "off" and other.paths["bf16_decode"] != "c-pass"
            assert pieces(other.new_session(), list(range(300, 320)), [4, 1]).shape[0] == 5
        session = engine.new_session()
        session.prefill(list(range(400, 480)))  # blocks flushed: read back through torch ops
        logits = session.logits([7])
        exact = load_tiny(tiny_models, "llama", "torch").new_session()
        exact.prefill(list(range(400, 480)))
        np.testing.assert_allclose(logits, exact.logits([7]), atol=0.02)  # 8 bits: close to kv
    finally:
        cpu_kernels.library.cache_clear()


@needs_c
@pytest.mark.parametrize("rows, k", [(1, 576), (16, 64), (3, 2048)])
def test_rms_norm_equals_the_torch_op(rows, k):
    """A decode step's few rows normed in one C call: PyTorch's float32 result but for the
    order of the sum of squares (within a unit in the last place)."""
    g = torch.Generator().manual_seed(k)
    x, weight = 3 * torch.randn(rows, 1, k, generator=g), torch.randn(k, generator=g)
    got = cpu_kernels.rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape
    torch.testing.assert_close(got, F.rms_norm(x, (k,), weight, 1e-5), rtol=2.4e-7, atol=1e-7)


@needs_c
@pytest.mark.parametrize("m, heads, kv_heads, d", [(1, 9, 3, 64), (7, 4, 2, 128), (2, 6, 6, 20)])
def test_rope_into_a_bf16_cache_equals_the_torch_ops_bit_for_bit(m, heads, kv_heads, d):
    """The newest m rows' queries rotated, and their keys rotated and values stored as bf16 at
    the cache's offset, in one C call: exactly what rotate() and a bf16 copy give, with the keys
    and values read as the model leaves them (halves of the fused K/V product), and nothing else
    in the cache touched."""
    g = torch.Generator().manual_seed(m * d)
    q = torch.randn(1, m, heads, d, generator=g)
    k, v = torch.randn(1, m, 2 * kv_heads * d, generator=g).split(kv_heads * d, dim=-1)
    k, v = k.view(1, m, kv_heads, d), v.view(1, m, kv_heads, d)
    cos, sin = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    keys = torch.randn(1, kv_heads, 12, d, generator=g).bfloat16()
    values = torch.randn(1, kv_heads, 12, d, generator=g).bfloat16()
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[:, :, 3 : 3 + m] = rotate(k.transpose(1, 2), cos, sin)
    want_values[:, :, 3 : 3 + m] = v.transpose(1, 2)
    got = cpu_kernels.rope_append_bf16(q, k, v, cos, sin, keys, values, 3)
    assert torch.equal(got, rotate(q.transpose(1, 2), cos, sin))
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


@needs_c
@pytest.mark.parametrize("m", [2, 8, 16])
def test_a_row_attends_the_same_alone_and_in_a_tree(m):
    """Each of m new causal rows equals, bit for bit, the same row as a decode step of its own
    (its part then shorter by the masked rows): the q4/q8 pass quantizes attention's output, so a
    last-bit difference could make greedy speculation choose another token."""
    g = torch.Generator().manual_seed(m)
    q = torch.randn(1, 9, m, 64, generator=g)
    keys, values = (torch.randn(1, 3, 300, 64, generator=g).bfloat16() for _ in range(2))
    together = cpu_kernels.attend_bf16(q, keys, values, 40 + m, torch.ones(m, m).tril().bool())
    for r in range(m):
        alone = cpu_kernels.attend_bf16(q[:, :, r : r + 1].contiguous(), keys, values, 41 + r)
        assert torch.equal(alone[:, :, 0], together[:, :, r])


@needs_c
@pytest.mark.parametrize("start", [100, 250, 253])  # within a part; across the 256-token edge
def test_a_trees_nodes_attend_as_plain_decoding_does(start):
    """Each node of a branching drafter's tree (packed breadth first, so a node's index is past
    its depth) equals, bit for bit, plain decoding's step for it: the cache, then its ancestors
    at the positions of their depths. One pass over the packed tree summed a node's ancestors in
    other lanes, and across a part's edge in another part, than plain decoding does."""
    tree = build_tree([[1, 2, 3, 4, 5], [1, 2, 7, 8, 9], [1, 6, 10, 11, 12]])
    n = len(tree)
    g = torch.Generator().manual_seed(start)
    q = torch.randn(1, 9, n, 64, generator=g)
    keys, values = (torch.randn(1, 3, start + n, 64, generator=g).bfloat16() for _ in range(2))
    cached = keys.clone(), values.clone()
    together = attend_tree_bf16(q, keys, values, start, torch.from_numpy(tree.mask()))
    assert torch.equal(keys, cached[0]) and torch.equal(values, cached[1])  # left as found
    for i in range(n):
        seen = list(range(start)) + [start + j for j in tree.path(i)]
        plain = cpu_kernels.attend_bf16(
            q[:, :, i : i + 1], keys[:, :, seen].contiguous(), values[:, :, seen].contiguous(),
            len(seen),
        )  # fmt: skip
        assert torch.equal(plain[:, :, 0], together[:, :, i]), f"node {i}"
