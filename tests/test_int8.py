"""LLM.int8() weights (`--weights int8`) in both backends: the int8 product against an exact integer
reference, the layer against fp32, the outlier decomposition, weight bytes, the conversion cache,
every cache kind, and the kernels (Triton under its interpreter and compiled ahead of time for
sm_80/sm_90; Metal traced for its call contract, run where Metal exists)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_metal_contract
from test_conformance import pieces

from xqchat.backends import int8
from xqchat.backends.base import CACHE_KINDS, CacheSpec, EngineOptions, load_model
from xqchat.backends.cuda import cpu_kernels
from xqchat.models import resolve

RNG = np.random.default_rng(0)


def layer_case(m=5, k=192, n=96, outliers=()):
    """x (m, k) in [-3, 3] with huge values planted in the `outliers` columns, w (n, k)."""
    x = RNG.uniform(-3, 3, (m, k)).astype(np.float32)
    for column in outliers:
        x[:, column] = RNG.choice([-1, 1], m) * RNG.uniform(20, 60, m)  # the paper's magnitudes
    return x, (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)


def planted_in_some_rows(m, k=320, n=72):
    """layer_case's x with outliers in a few rows only, in columns shared by some of them: a row
    without them quantizes another way under the union of the rows' outlier columns."""
    x, w = layer_case(m=m, k=k, n=n)
    for row, column, value in [(1, 5, 40), (4, 77, -30), (4, 200, 25), (m - 2, 5, -55)]:
        x[row, column] = value
    return x, w


def integer_reference(x, codes, scale, threshold=int8.THRESHOLD):
    """LLM.int8 in int64 numpy, each row's outliers its own: exact int32 product of a row's
    regular values plus its outliers in float."""
    outliers = int8.outliers(x, threshold)
    regular = np.where(outliers, 0, x)
    row_scale = np.maximum(np.abs(regular).max(1, keepdims=True), 1e-12) / 127
    q = np.rint(regular / row_scale).astype(np.int64)
    acc = q @ codes.astype(np.int64).T
    assert np.abs(acc).max() < 2**31
    dense = codes.astype(np.float64) * scale[:, None]
    return acc * row_scale * scale + np.where(outliers, x, 0).astype(np.float64) @ dense.T


def layer(backend: str, w: np.ndarray, threshold=int8.THRESHOLD, bias=None):
    """An Int8Linear of either backend holding w, and a numpy -> numpy call of it."""
    codes, scale = int8.quantize(w)
    if backend == "torch":
        from xqchat.backends.cuda.int8 import Int8Linear

        lin = Int8Linear(w.shape[1], w.shape[0], bias is not None, threshold)
        lin.weight.copy_(torch.from_numpy(codes))
        lin.scale.copy_(torch.from_numpy(scale))
        if bias is not None:
            lin.bias.data.copy_(torch.from_numpy(bias))
        return lambda x: lin(torch.from_numpy(x)).detach().numpy()
    import mlx.core as mx

    from xqchat.backends.mlx.int8 import Int8Linear

    lin = Int8Linear(w.shape[1], w.shape[0], bias is not None, threshold)
    lin.weight, lin.scale = mx.array(np.ascontiguousarray(codes.T)), mx.array(scale)
    if bias is not None:
        lin.bias = mx.array(bias)
    return lambda x: np.array(lin(mx.array(x)))


def test_weight_quantization_is_absmax_per_output_channel():
    w = RNG.standard_normal((40, 64)).astype(np.float32)
    w[3] = 0  # an all-zero channel keeps a usable scale
    codes, scale = int8.quantize(w)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (40,)
    assert np.abs(codes).max(1).tolist() == [0 if i == 3 else 127 for i in range(40)]
    assert np.all(np.abs(codes * scale[:, None] - w) <= scale[:, None] / 2 + 1e-7)
    assert int8.nbytes(40, 64) == codes.nbytes + scale.nbytes


@pytest.mark.parametrize("outliers", [(), (5, 77), "rows"])
@pytest.mark.parametrize("m", [7, 40])  # a decode step's or a tree's rows; a prompt's chunk
def test_int8_layer_equals_the_integer_reference(backend, outliers, m):
    if outliers == "rows":
        x, w = planted_in_some_rows(m)
    else:
        x, w = layer_case(m=m, k=320, n=72, outliers=outliers)
    codes, scale = int8.quantize(w)
    bias = RNG.standard_normal(72).astype(np.float32)
    got = layer(backend, w, bias=bias)(x)
    expected = integer_reference(x, codes, scale) + bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (m, 72) and got.dtype == np.float32


@pytest.mark.parametrize("path", ["c-pass", "torch-ops", "mlx"])
def test_a_row_gives_the_same_bits_alone_and_in_a_batch(path, monkeypatch):
    """Each row's outliers are its own, so a row of a drafter's tree gives a decode step's result
    bit for bit on every path (the C pass, the torch ops, MLX's): under LLM.int8's union of the
    rows' outlier columns a row quantized another way beside a row with outliers, and greedy
    speculation's text could differ from plain decoding's."""
    if path == "mlx" and "mlx" not in BACKENDS:
        pytest.skip("mlx is not installed")
    if path == "c-pass" and cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    if path == "torch-ops":
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    x, w = planted_in_some_rows(9, k=576, n=96)
    run = layer(
        "mlx" if path == "mlx" else "torch", w, bias=RNG.standard_normal(96).astype(np.float32)
    )
    together = run(x)
    for r in range(len(x)):
        np.testing.assert_array_equal(run(x[r : r + 1])[0], together[r], err_msg=f"row {r}")


def test_mlx_plain_product_is_exact_past_float32_integers():
    """K = 2048 products of 127·127 sum past 2^24, where float32 stops holding every integer: the
    off-Metal path must still give the exact int32 sum."""
    if "mlx" not in BACKENDS:
        pytest.skip("mlx is not installed")
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import int8_matmul_reference

    k = 2048
    codes = RNG.integers(120, 128, (3, k)).astype(np.int8)
    x = RNG.integers(120, 128, (2, k)).astype(np.float32)
    x[:, 0] = 127  # the row scale is exactly 1: x is its own codes
    got = np.array(int8_matmul_reference(mx.array(x), mx.array(codes.T), mx.ones(3), 6.0))
    exact = x.astype(np.int64) @ codes.astype(np.int64).T
    assert exact.max() > 2**24 and np.array_equal(got, exact.astype(np.float32))


def relative_error(got, expected):
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_layer_is_close_to_fp32(backend):
    x, w = layer_case(m=9, k=576, n=128)
    assert relative_error(layer(backend, w)(x), x @ w.T) < 0.02


def test_outlier_decomposition_is_what_keeps_planted_outliers_accurate(backend):
    """Without it, one outlier sets its row's scale and the ordinary features (|x| <= 3) fall on
    a grid of 60/127: their part of the product is lost in noise. (Measured against the
    dequantised weights: the activations' quantization is what the decomposition is about.)"""
    columns = (11, 300, 301)
    x, w = layer_case(m=9, k=576, n=128, outliers=columns)
    codes, scale = int8.quantize(w)
    exact = x @ (codes * scale[:, None]).T
    ordinary = x.copy()
    ordinary[:, columns] = 0
    scale = np.sqrt(np.mean((ordinary @ w.T) ** 2))

    def error(threshold):
        return np.sqrt(np.mean((layer(backend, w, threshold)(x) - exact) ** 2)) / scale

    with_outliers, without = error(int8.THRESHOLD), error(math.inf)
    assert with_outliers < 0.01
    assert without > 10 * with_outliers and without > 0.05


def test_both_backends_compute_the_same_layer():
    if "mlx" not in BACKENDS:
        pytest.skip("mlx is not installed")
    x, w = layer_case(m=4, k=256, n=64, outliers=(9,))
    np.testing.assert_allclose(layer("torch", w)(x), layer("mlx", w)(x), rtol=1e-5, atol=1e-5)


def int8_model(files, backend, **options):
    options.setdefault("int8_threshold", int8.THRESHOLD)  # auto has its own test
    return load_model(files, EngineOptions(backend=backend, weights="int8", **options))


@pytest.mark.parametrize("head", [True, False])  # --int8-head / --float-head
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # tied table (the head) and untied lm_head
def test_weight_bytes_match_the_formula(tiny_models, backend, arch, head):
    files = resolve(str(tiny_models[arch]))
    model = int8_model(files, backend, int8_head=head)
    s = model.spec
    q, kv = s.n_heads * s.head_dim, 2 * s.kv_dim
    matrices = [
        (q, s.dim),
        (kv, s.dim),
        (s.dim, q),
        (2 * s.hidden_dim, s.dim),
        (s.dim, s.hidden_dim),
    ]
    expected = s.n_layers * sum(int8.nbytes(o, i) for o, i in matrices)
    floating = 2 if backend == "torch" else 4  # a float head: bf16/fp16 on a CPU; MLX: fp32
    expected += int8.nbytes(s.vocab_size, s.dim) if head else s.vocab_size * s.dim * floating
    floats = s.n_layers * 2 * s.dim + s.dim  # norms
    floats += s.n_layers * (q + kv) * s.qkv_bias + s.n_layers * 2 * s.head_dim * s.qk_norm
    floats += 0 if s.tied_embeddings else s.vocab_size * s.dim  # the input table stays float
    if backend == "torch":  # norms and biases in the activations' dtype, the table in bf16
        table = 0 if s.tied_embeddings else s.vocab_size * s.dim
        activations = 2 if torch.cuda.is_available() else 4  # bf16 on a GPU, float32 on a CPU
        expected += (floats - table) * activations + table * 2
    else:  # MLX on a CPU: fp32 for everything not int8
        expected += floats * 4
    assert model.weight_bytes() == expected
    assert model.dtype == "int8"


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_int8_composes_with_every_cache_kind(tiny_models, backend, kind):
    """Each cache kind on int8 weights stays as close to the same cache on fp32 weights as the
    exact cache does (XQuant builds its latents from W_k/W_v dequantised)."""
    files = resolve(str(tiny_models["gqa-qwen2"]))  # GQA: xquant caches the SVD latents
    spec = CacheSpec(kind=kind, bits=8, group=32, residual=32)
    ids = list(range(600, 680))
    fp32 = load_model(files, EngineOptions(backend=backend, weights="fp32"))
    exact = pieces(fp32.new_session(spec), ids, [70, 1, 9])
    got = pieces(int8_model(files, backend).new_session(spec), ids, [70, 1, 9])
    # random tiny weights are harsh on int8 activations: 4% RMS on every kind, kv included
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.06


def test_auto_threshold_is_measured_once_and_kept(tiny_models, backend, monkeypatch):
    """`--int8-threshold auto`: the largest candidate within the perplexity budget, else the one
    closest to the float model; measured at the first load, read at the next."""
    from xqchat.backends import base
    from xqchat.models.paths import derived_dir

    files = resolve(str(tiny_models["llama"]))
    model = int8_model(files, backend, int8_threshold=None)
    (kept,) = (derived_dir(files) / "int8").glob(f"threshold-v1-{backend}-model.json")
    result = json.loads(kept.read_text())
    chosen = result["threshold"]
    budget = result["float_ppl"] * int8.PPL_BUDGET
    within = [float(t) for t, p in result["ppl"].items() if p <= budget]
    if within:
        assert chosen == within[0] == max(within)
    else:  # every candidate measured, the closest kept
        assert len(result["kl"]) == len(int8.CANDIDATES)
        assert result["kl"][str(chosen)] == min(result["kl"].values())
    layers = [m for m in model.int8_layers().values()]
    assert layers and all(layer.threshold == chosen for layer in layers)
    monkeypatch.setattr(base, "load_model", None)  # the next load must not measure again
    assert int8_model(files, backend, int8_threshold=None).int8_layers()
    assert base.int8_auto_threshold(files, EngineOptions(backend=backend), model) == result


def test_conversion_is_cached_next_to_the_model(tiny_models, backend, tmp_path):
    from xqchat.models.paths import derived_dir

    files = resolve(str(tiny_models["llama"]))
    folder = derived_dir(files) / "int8"
    ids = list(range(50, 70))
    first = int8_model(files, backend).new_session().logits(ids)
    (cache,) = folder.glob("weights-*-model.safetensors")
    stamp = cache.stat().st_mtime_ns
    again = int8_model(files, backend).new_session().logits(ids)
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(first, again)
    cache.write_bytes(b"broken")  # a damaged cache is converted again and replaced
    np.testing.assert_array_equal(int8_model(files, backend).new_session().logits(ids), first)
    assert cache.stat().st_size > 100


# ---- kernels -----------------------------------------------------------------------------------

triton_missing = importlib.util.find_spec("triton") is None


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize("m, n, k", [(1, 96, 576), (1, 70, 40), (17, 130, 200)])
def test_triton_int8_matmul_equals_reference(m, n, k):
    """On the GPU, or without one in Triton's interpreter (conftest sets TRITON_INTERPRET)."""
    from xqchat.backends.cuda.kernels import int8_matmul, int8_matmul_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    row_scale, col_scale = torch.rand(m, 1, generator=g), torch.rand(n, generator=g)
    args = [t.to(device) for t in (a, row_scale, w, col_scale)]
    got = int8_matmul(*args).cpu()
    expected = int8_matmul_reference(a, row_scale, w, col_scale)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    exact = a.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T
    np.testing.assert_allclose(
        got.numpy(), exact * row_scale.numpy() * col_scale.numpy(), rtol=1e-6
    )


@pytest.mark.skipif(triton_missing, reason="triton is not installed")
@pytest.mark.parametrize("capability", [80, 90])
def test_triton_int8_matmul_compiles_for_tensor_cores(capability):
    """Compiled ahead of time without a GPU: the product runs on int8 tensor cores (s8 x s8 -> s32).
    In a subprocess: this one has Triton's interpreter patched in (see conftest)."""
    script = f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xqchat.backends.cuda.kernels import INT8_BLOCKS, _int8_matmul_kernel

pointers = {{"a_ptr": "*i8", "w_ptr": "*i8", "row_scale_ptr": "*fp32"}}
pointers |= {{"col_scale_ptr": "*fp32", "out_ptr": "*fp32"}}
ints = {{name: "i32" for name in ["M", "N", "K", "stride_am", "stride_wn", "stride_om"]}}
signature = pointers | ints | {{name: "constexpr" for name in INT8_BLOCKS}}
source = ASTSource(_int8_matmul_kernel(), signature, constexprs=dict(INT8_BLOCKS))
compiled = triton.compile(source, target=GPUTarget("cuda", {capability}, 32))
assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in compiled.asm["ptx"]
assert len(compiled.asm["cubin"]) > 0
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.cuda
def test_int8_layer_on_cuda_equals_the_integer_reference():
    from xqchat.backends.cuda.int8 import Int8Linear

    for m in (1, 33):
        x, w = layer_case(m=m, k=576, n=384, outliers=(17,))
        codes, scale = int8.quantize(w)
        lin = Int8Linear(576, 384, bias=False).cuda()
        lin.weight.copy_(torch.from_numpy(codes))
        lin.scale.copy_(torch.from_numpy(scale))
        got = lin(torch.from_numpy(x).cuda()).cpu().numpy()
        np.testing.assert_allclose(got, integer_reference(x, codes, scale), rtol=1e-4, atol=1e-4)


mlx_missing = "mlx" not in BACKENDS


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
@pytest.mark.parametrize("shape", [(1, 576, 384), (7, 64, 3072)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_metal_int8_kernel_call_contract(tmp_path, shape, dtype):
    """Traced without running (no Metal here): the kernel's declared output matches the reference."""
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import int8_matmul_metal, int8_matmul_reference

    m, k, n = shape
    x = mx.zeros((m, k), dtype=getattr(mx, dtype))
    w, col_scale = mx.zeros((k, n), dtype=mx.int8), mx.ones((n,))
    assert_metal_contract(
        tmp_path / "int8.mlxfn",
        lambda *a: int8_matmul_metal(*a, 6.0),
        lambda *a: int8_matmul_reference(*a, 6.0),
        x,
        w,
        col_scale,
    )


@pytest.mark.metal
@pytest.mark.parametrize("m", [1, 9])
def test_metal_int8_kernel_matches_reference_on_metal(m):
    import mlx.core as mx

    from xqchat.backends.mlx.kernels import int8_matmul_metal, int8_matmul_reference

    x, w = layer_case(m=m, k=576, n=384, outliers=(3, 200))
    codes, scale = int8.quantize(w)
    args = mx.array(x), mx.array(np.ascontiguousarray(codes.T)), mx.array(scale)
    got, expected = int8_matmul_metal(*args, 6.0), int8_matmul_reference(*args, 6.0)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.array(got), integer_reference(x, codes, scale), rtol=1e-4, atol=1e-4
    )


# ---- the command line --------------------------------------------------------------------------


def test_bench_ppl_and_speed_report_int8_weight_bytes(capsys, tiny_models, backend):
    from conftest import cli
    from test_cli import DATA

    model = ["--backend", backend, "-m", str(tiny_models["qwen2"]), "--json"]
    weights = ["--weights", "int8", "--int8-threshold", "5"]
    text = ["--text", str(DATA / "wikitext2_test.txt"), "--window", "64", "--windows", "1"]
    code, out, err = cli(capsys, "bench", "ppl", *model, *weights, *text)
    assert code == 0, err
    ppl = json.loads(out)
    code, out, err = cli(capsys, "bench", "speed", *model, *weights, "--new-tokens", "3")
    assert code == 0, err
    speed = json.loads(out)
    expected = int8_model(resolve(str(tiny_models["qwen2"])), backend).weight_bytes()
    assert ppl["weight_bytes"] == speed["weight_bytes"] == expected
    assert ppl["weights"] == speed["weights"] == "int8" and 1 < ppl["ppl"] < 1e6


def test_show_int8_stats_lists_outlier_features(capsys, tiny_models, backend, tmp_path):
    from conftest import cli

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    model = str(tiny_models["llama"])
    args = ["show", model, "--int8-stats", "--backend", backend, "--text", str(text)]
    code, out, err = cli(capsys, *args, "--tokens", "40", "--int8-threshold", "1.5", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["tokens"] == 40 and stats["threshold"] == 1.5
    names = [m["matrix"] for m in stats["matrices"]]
    per_layer = ("attention.wq", "attention.wo", "feed_forward.w13", "feed_forward.w2")
    expected = [f"layers.{i}.{n}" for i in range(2) for n in per_layer] + ["lm_head"]  # untied
    assert names == expected
    assert any(m["features"] > 0 for m in stats["matrices"])
    for m in stats["matrices"]:
        counts = [n for _, n in m["tokens_per_feature"]]
        assert len(counts) == m["features"] and counts == sorted(counts, reverse=True)
        assert all(1 <= n <= 40 for n in counts)
    code, out, err = cli(capsys, *args, "--tokens", "40")
    assert code == 0, err
    assert out.splitlines()[0].startswith("outlier features (|x| > 6) in 40 tokens")
    assert len(out.splitlines()) == 1 + len(names)
