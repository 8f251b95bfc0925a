"""q4/q8 group-wise weights (`--weights q4|q8`, and a quantized file's own under `auto`) in both
backends: the format's round trips, each GGUF type against gguf's own dequantization, MLX's
layout against mx.quantize, the CPU product against an exact emulation of its integer
arithmetic on every path, whole models (weight bytes, logits, every cache kind, save/load, the
drafter), MLX-format checkpoints, and the memory a GGUF load takes."""

import importlib.util
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import BACKENDS
from test_conformance import pieces

from xqchat.backends.base import CACHE_KINDS, CacheSpec, EngineOptions, load_model
from xqchat.models import qweights, resolve
from xqchat.models.gguf_header import read_header

RNG = np.random.default_rng(0)
mlx_missing = importlib.util.find_spec("mlx") is None


def matrix(n=96, k=256, scale=0.05):
    return (RNG.standard_normal((n, k)) * scale).astype(np.float32)


# ---- the format --------------------------------------------------------------------------------


def test_q4_codes_pack_two_to_a_byte_in_gguf_block_order():
    codes = RNG.integers(0, 16, (3, 64)).astype(np.uint8)
    packed = qweights.pack_q4(codes)
    assert packed.shape == (3, 32)
    # byte i of a block: value i in the low nibble, value i + 16 in the high one
    assert packed[0, 5] == codes[0, 5] | codes[0, 21] << 4
    assert packed[1, 16 + 3] == codes[1, 32 + 3] | codes[1, 32 + 19] << 4
    np.testing.assert_array_equal(qweights.unpack_q4(packed), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_rounds_each_value_to_its_group_grid(bits, group):
    w = matrix()
    p = qweights.quantize(w, bits, group)
    assert p.group == group and p.shape == w.shape and (p.min is None) == (bits == 8)
    step = np.repeat(p.scale.astype(np.float32), group, axis=1)
    error = np.abs(p.dequantize() - w)
    # half a step, plus the fp16 rounding of a q4 group's min
    slack = 0 if bits == 8 else np.repeat(np.abs(p.min.astype(np.float32)), group, axis=1) / 1024
    assert (error <= step / 2 * 1.0001 + slack + 1e-7).all()
    assert p.nbytes == qweights.nbytes(*w.shape, bits, group)
    codes = qweights.unpack_q4(p.codes) if bits == 4 else p.codes.astype(int)
    assert codes.min() >= (0 if bits == 4 else -127) and codes.max() <= (15 if bits == 4 else 127)


def gguf_tensor(kind: str, n=8, k=512) -> np.ndarray:
    """Raw GGUF blocks of an (n, k) matrix: through gguf's quantizer where it has one, else random
    bytes with finite fp16 scales (every bit pattern of the codes and 6-bit scales is valid)."""
    qtype = gguf.GGMLQuantizationType[kind]
    try:
        return gguf.quants.quantize(matrix(n, k), qtype).reshape(-1)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = RNG.integers(0, 256, (n * k // block, size), dtype=np.uint8)
        halves = 2 if kind == "Q6_K" else 4  # Q6_K: one fp16 d at the end; Q4_K/Q5_K: d, dmin first
        at = size - 2 if kind == "Q6_K" else 0
        scales = (RNG.uniform(1e-4, 1e-3, (len(raw), halves // 2))).astype(np.float16)
        raw[:, at : at + halves] = scales.view(np.uint8)
        return raw.reshape(-1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_each_gguf_type_maps_to_the_engine_form(kind):
    raw = gguf_tensor(kind)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(8, 512)
    p = qweights.from_gguf(kind, raw, (8, 512))
    got = p.dequantize()
    if kind in ("Q4_0", "Q4_1", "Q8_0"):  # the same format: exact
        np.testing.assert_array_equal(got, expected)
        assert p.bits == (8 if kind == "Q8_0" else 4)
    elif kind == "Q4_K":  # codes kept; scale and min of each 32 values rounded to fp16
        assert p.bits == 4
        assert np.abs(got - expected).max() <= np.abs(expected).max() * 2**-10
    else:  # more than 4 bits: requantized to q8, within half a q8 step
        assert p.bits == 8
        step = np.repeat(p.scale.astype(np.float32), 32, axis=1)
        assert (np.abs(got - expected) <= step / 2 * 1.0001).all()


def test_other_gguf_types_are_left_to_dequantize():
    assert qweights.from_gguf("Q5_0", np.zeros(8 * 22, np.uint8), (8, 32)) is None


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32)])
def test_mlx_layout_is_what_mx_quantize_writes(bits, group):
    import mlx.core as mx

    w = matrix()
    p = qweights.quantize(w, bits, group)
    words, scale, bias = qweights.to_mlx(p)
    back = mx.dequantize(
        mx.array(words),
        mx.array(scale.astype(np.float32)),
        mx.array(bias.astype(np.float32)),
        group_size=group,
        bits=bits,
    )
    np.testing.assert_array_equal(np.array(back), p.dequantize())
    # an fp16 matrix, as mlx-community's are: its scales and biases are fp16 too
    codes, s, b = mx.quantize(mx.array(w, mx.float16), group_size=group, bits=bits)
    s32, b32 = s.astype(mx.float32), b.astype(mx.float32)  # dequantized in float32, not fp16
    reference = np.array(mx.dequantize(codes, s32, b32, group_size=group, bits=bits))
    got = qweights.from_mlx(np.array(codes), np.array(s), np.array(b), bits, packed=False)
    np.testing.assert_array_equal(got, reference)
    if bits == 4:  # MLX's 4 bits are q4 as they are
        exact = qweights.from_mlx(np.array(codes), np.array(s), np.array(b), 4, packed=True)
        np.testing.assert_array_equal(exact.dequantize(), reference)


# ---- the product -------------------------------------------------------------------------------


def integer_reference(x: np.ndarray, p: qweights.Packed, bias=None) -> np.ndarray:
    """cpu_qlinear.c's arithmetic in float64: each row's outliers (|x| beyond 6x its RMS)
    multiplied in float; the rest of x quantized per block of 32 (absmax / 127, rounded
    half to even in float32), exact integer block dots, scaled by the weight group's scale times
    the block's, plus each q4 min times its group's sum of x."""
    m, k = x.shape
    n, group = p.shape[0], p.group
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
    own = np.abs(x) > 6 * rms  # (m, k)
    outliers = np.where(own, x, 0).astype(np.float64) @ p.dequantize().T.astype(np.float64)
    x = np.where(own, 0, x).astype(np.float32)
    blocks = x.reshape(m, k // 32, 32)
    xs = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    xq = np.rint(np.divide(blocks, xs, out=np.zeros_like(blocks), where=xs > 0))
    codes = (qweights.unpack_q4(p.codes) if p.bits == 4 else p.codes).astype(np.float64)
    dots = np.einsum("mbi,nbi->mnb", xq.astype(np.float64), codes.reshape(n, k // 32, 32))
    d = np.repeat(p.scale.astype(np.float64), group // 32, axis=1)  # per block
    y = np.einsum("mnb,nb,mb->mn", dots, d, xs[..., 0].astype(np.float64))
    if p.min is not None:
        sums = x.astype(np.float64).reshape(m, k // group, group).sum(axis=2)
        y += sums @ p.min.astype(np.float64).T
    y += outliers
    return y if bias is None else y + bias


def torch_layer(p: qweights.Packed, bias=None):
    from xqchat.backends.cuda.qlinear import QLinear

    layer = QLinear(p.shape[1], p.shape[0], bias is not None, p.bits, p.group)
    layer.weight, layer.scale = torch.from_numpy(p.codes), torch.from_numpy(p.scale)
    if p.min is not None:
        layer.min = torch.from_numpy(p.min)
    if bias is not None:
        layer.bias = torch.nn.Parameter(torch.from_numpy(bias))
    return layer


@pytest.mark.parametrize("bits", [4, 8])
# k 224: an odd count of blocks, multiplied one block at a time rather than two
@pytest.mark.parametrize(("group", "k"), [(32, 256), (128, 256), (32, 224)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
def test_c_pass_equals_the_integer_reference(bits, group, k, m):
    p = qweights.quantize(matrix(n=70, k=k), bits, group)  # 70 outputs: a partial tile of 4
    x = RNG.uniform(-3, 3, (m, k)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    x[-1, 77] = 90.0  # an outlier feature (beyond 6x the row's RMS), in one row only
    x[:, 200] = -60.0  # and one in every row
    bias = RNG.standard_normal(70).astype(np.float32)
    got = torch_layer(p, bias)(torch.from_numpy(x)).numpy()
    expected = integer_reference(x, p, bias)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # the outliers in float keep the product within x's 8-bit rounding of the float one
    exact = x.astype(np.float64) @ p.dequantize().T.astype(np.float64) + bias
    assert np.abs(got - exact).max() <= 5e-3 * np.abs(exact).max()
    # each row as it would be alone, bit for bit (a drafter's tree must give plain decoding's
    # text): another row's outlier leaves this row's quantization alone
    for r in range(m):
        alone = torch_layer(p, bias)(torch.from_numpy(x[r : r + 1])).numpy()
        np.testing.assert_array_equal(alone[0], got[r])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("prompt", ["float32", "bf16", "q-pass"])
def test_prompt_chunks_take_each_path(bits, prompt):
    from xqchat.backends.cuda.cpu_paths import Q_PROMPTS

    p = qweights.quantize(matrix(n=130, k=128), bits)
    x = RNG.uniform(-3, 3, (40, 128)).astype(np.float32)
    layer = torch_layer(p)
    layer.prompt = Q_PROMPTS[prompt]
    got = layer(torch.from_numpy(x)).numpy()
    if prompt == "q-pass":
        expected, tolerance = integer_reference(x, p), 1e-5
    else:  # the dequantized weight, exact, through PyTorch's product in that dtype
        expected = x.astype(np.float64) @ p.dequantize().T.astype(np.float64)
        tolerance = 1e-5 if prompt == "float32" else 2e-2
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


def test_without_the_c_passes_the_weight_is_dequantized(monkeypatch):
    from xqchat.backends.cuda import cpu_kernels

    p = qweights.quantize(matrix(), 4)
    x = RNG.uniform(-3, 3, (2, 256)).astype(np.float32)
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    got = torch_layer(p)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, x @ p.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_layer_is_the_dequantized_product(bits):
    import mlx.core as mx

    from xqchat.backends.mlx.qlinear import QLinear

    p = qweights.quantize(matrix(), bits)
    layer = QLinear(256, 96, False, bits, 32)
    layer.weight, layer.scales, layer.biases = (mx.array(a) for a in qweights.to_mlx(p))
    x = RNG.uniform(-3, 3, (3, 256)).astype(np.float32)
    expected = x.astype(np.float64) @ p.dequantize().T
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(layer.dense_weight()), p.dequantize().T)


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 5])
def test_mlx_block_layout_is_the_same_layer(bits, rows, monkeypatch):
    """BlockQLinear holds a QLinear's codes along the outputs (MLX's vectorized CPU product) and
    applies each input block's scales and biases after: the same weight, the same product."""
    import mlx.core as mx

    from xqchat.backends.mlx.qlinear import BlockQLinear, QLinear

    p = qweights.quantize(matrix(n=192), bits)
    layer = QLinear(256, 192, True, bits, 32)
    layer.weight, layer.scales, layer.biases = (mx.array(a) for a in qweights.to_mlx(p))
    layer.bias = mx.array(RNG.standard_normal(192).astype(np.float32))
    block = BlockQLinear(layer)
    np.testing.assert_array_equal(np.array(block.dense_weight()), np.array(layer.dense_weight()))
    # a prompt chunk goes through in slices of rows: here 2 at a time
    monkeypatch.setattr(BlockQLinear, "PARTIAL_BYTES", 2 * 4 * block.scales.size)
    x = RNG.uniform(-3, 3, (rows, 256)).astype(np.float32)
    expected = x.astype(np.float64) @ p.dequantize().T + np.array(layer.bias)
    np.testing.assert_allclose(np.array(block(mx.array(x))), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
def test_mlx_block_layout_table_looks_up_the_same_rows():
    import mlx.core as mx

    from xqchat.backends.mlx.qlinear import BlockQEmbedding, QEmbedding

    p = qweights.quantize(matrix(n=320, k=64), 4)
    table = QEmbedding(320, 64, 4, 32, mx.float32)
    table.weight, table.scales, table.biases = (mx.array(a) for a in qweights.to_mlx(p))
    block, tokens = BlockQEmbedding(table), mx.array([[3, 319, 0], [8, 8, 161]])
    np.testing.assert_array_equal(np.array(block(tokens)), p.dequantize()[np.array(tokens)])
    x = RNG.uniform(-3, 3, (2, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ p.dequantize().T
    np.testing.assert_allclose(np.array(block.as_linear(mx.array(x))), expected, atol=1e-5)


@pytest.mark.skipif(mlx_missing or sys.platform == "darwin", reason="the CPU layout off macOS")
def test_mlx_block_layout_gives_the_model_the_same_logits(tiny_models, monkeypatch):
    from xqchat.backends.mlx import model as mlx_model

    files, ids = resolve(str(tiny_models["gqa-qwen2"])), list(range(600, 640))
    opts = EngineOptions(backend="mlx", weights="q4", drafter="none")
    got = load_model(files, opts).new_session().logits(ids)
    monkeypatch.setattr(mlx_model, "use_block_layout", lambda module: None)
    usual = load_model(files, opts).new_session().logits(ids)
    np.testing.assert_allclose(got, usual, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
def test_mlx_profile_times_the_quantized_products(tiny_models):
    """`bench speed --profile` on MLX: q4 layers and head are products too (they once counted
    as "the rest", leaving matmuls at 0 ms). Off macOS they are held in the block layout."""
    files = resolve(str(tiny_models["gqa-qwen2"]))
    model = load_model(files, EngineOptions(backend="mlx", weights="q4", drafter="none"))
    profile = model.profile_decode(list(range(600, 620)), steps=4)
    layers, head, rest = profile["top_ops"]
    n_layers, block = model.module.spec.n_layers, "" if sys.platform == "darwin" else "Block"
    assert layers["op"] == f"layer products ({5 * n_layers} {block}QLinear q4 g32; timed alone)"
    assert layers["calls_per_step"] == 5 * n_layers  # q, k|v, o, gate|up, down
    assert head["op"] == f"LM head ({block}QEmbedding q4 g32; timed alone)"  # the tied table
    assert layers["ms_per_step"] > 0 and head["ms_per_step"] > 0
    assert profile["matmul_ms"] == pytest.approx(layers["ms_per_step"] + head["ms_per_step"])
    assert rest["ms_per_step"] == pytest.approx(max(0, profile["step_ms"] - profile["matmul_ms"]))


# ---- whole models ------------------------------------------------------------------------------


def test_default_gguf_keeps_its_own_quantization(default_files, backend):
    model = load_model(default_files, EngineOptions(backend=backend))  # --weights auto
    assert model.dtype == "q4"
    header = read_header(default_files.path)
    stored = {t.name: t for t in header.tensors}
    assert {t.tensor_type.name for t in header.tensors} == {"Q4_1", "Q8_0", "F32"}
    expected = sum(t.n_bytes for t in header.tensors)  # every tensor as the file holds it
    if backend == "mlx" and sys.platform == "darwin":  # MLX's 8 bits: a bias beside each scale
        expected += stored["token_embd.weight"].n_elements // 32 * 2
    elif backend == "mlx":  # the CPU's block layout: each block's scale and bias in float32
        file_scales = {"Q4_1": 4, "Q8_0": 2}  # bytes per block of 32: scale and min, or scale
        kinds = [(t.n_elements, t.tensor_type.name) for t in header.tensors]
        expected += sum(n // 32 * (8 - file_scales[k]) for n, k in kinds if k in file_scales)
    assert model.weight_bytes() == expected
    stored_bytes = sum(t.n_bytes for t in header.tensors)
    assert stored_bytes <= 0.36 * 2 * sum(t.n_elements for t in header.tensors)  # of bf16's


@pytest.fixture(scope="module")
def default_q4_logits(default_files, default_tokenizer):
    ids = default_tokenizer.render([{"role": "user", "content": "Name three rivers in Europe."}])
    out = {}
    for backend in BACKENDS:
        for weights in ("auto", "fp32"):
            model = load_model(default_files, EngineOptions(backend=backend, weights=weights))
            out[backend, weights] = model.new_session().logits(ids)
    return out


def test_q4_logits_are_close_to_the_same_weights_in_float(default_q4_logits, backend):
    """fp32 dequantizes the same file: what differs is only the int8 rounding of the activations
    (torch's C pass, as llama.cpp does) or nothing at all (MLX multiplies in float)."""
    got, exact = default_q4_logits[backend, "auto"], default_q4_logits[backend, "fp32"]
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.02
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.95


@pytest.mark.skipif(mlx_missing, reason="mlx is not installed")
def test_both_backends_agree_on_q4(default_q4_logits):
    torch_logits, mlx_logits = default_q4_logits["torch", "auto"], default_q4_logits["mlx", "auto"]
    assert np.sqrt(np.mean((torch_logits - mlx_logits) ** 2) / np.mean(mlx_logits**2)) < 0.02


@pytest.mark.parametrize("weights", ["q4", "q8"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_q_weights_compose_with_every_cache_kind(tiny_models, backend, weights, kind):
    """Each cache kind on q4/q8 weights stays as close to the exact cache on the same weights as
    8-bit caches do on float ones (XQuant builds its latents from W_k/W_v dequantized)."""
    files = resolve(str(tiny_models["gqa-qwen2"]))  # GQA: xquant caches the SVD latents
    spec = CacheSpec(kind=kind, bits=8, group=32, residual=32)
    ids = list(range(600, 680))
    model = load_model(files, EngineOptions(backend=backend, weights=weights))
    assert model.dtype == weights
    exact = pieces(model.new_session(CacheSpec()), ids, [70, 1, 9])
    got = pieces(model.new_session(spec), ids, [70, 1, 9])
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.03
    if kind == "kv" and weights == "q8":  # q8 itself is close to the float weights
        fp32 = load_model(files, EngineOptions(backend=backend, weights="fp32"))
        reference = pieces(fp32.new_session(CacheSpec()), ids, [70, 1, 9])
        assert np.sqrt(np.mean((got - reference) ** 2) / np.mean(reference**2)) < 0.05


def test_q4_save_load_trim_and_drafter_give_the_same_text(default_files, backend, tmp_path):
    """On the real model (every cache kind composes with q4 in the tiny-model test above)."""
    from xqchat.backends.base import GenerationConfig

    def text(session, n=16):
        return [e.token for e in session.generate(GenerationConfig(max_tokens=n))]

    def session(model, *pieces):
        s = model.new_session(CacheSpec())
        for piece in pieces:
            s.prefill(piece)
        return s

    model = load_model(default_files, EngineOptions(backend=backend))
    prompt = list(range(1000, 1040))
    whole = session(model, prompt[:30], prompt[30:])
    expected = text(whole)
    session(model, prompt[:30]).save(tmp_path / "chat.safetensors")
    loaded = model.new_session(CacheSpec())
    loaded.load(tmp_path / "chat.safetensors")
    loaded.prefill(prompt[30:])
    assert text(loaded) == expected
    whole.trim(35)  # prefix reuse: keep 35 tokens, read the rest again
    whole.prefill(prompt[35:])
    assert text(whole) == expected
    drafted = load_model(default_files, EngineOptions(backend=backend, drafter="auto"))
    assert text(session(drafted, prompt[:30], prompt[30:])) == expected


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_format_checkpoints_load_in_both_backends(tiny_models, tmp_path, bits):
    """An mlx-community style folder: packed uint32 codes with scales and biases, the format in
    config.json; each backend runs it as the dequantized float model would."""
    from safetensors.numpy import load_file, save_file

    source = tiny_models["qwen2"]
    folder = tmp_path / "mlx-q"
    folder.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": bits}
    (folder / "config.json").write_text(json.dumps(config))
    quantized, dequantized = {}, {}
    for name, w in load_file(source / "model.safetensors").items():
        if name.endswith("_proj.weight") or name == "model.embed_tokens.weight":
            p = qweights.quantize(w, 4) if bits == 4 else qweights.quantize(w, 8)
            words, scale, bias = qweights.to_mlx(p)
            stem = name.removesuffix(".weight")
            quantized |= {name: words, stem + ".scales": scale, stem + ".biases": bias}
            dequantized[name] = p.dequantize()
        else:
            quantized[name] = dequantized[name] = w
    save_file(quantized, folder / "model.safetensors")
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (plain / f.name).write_bytes(f.read_bytes())
    save_file(dequantized, plain / "model.safetensors")
    ids = list(range(300, 340))
    for backend in BACKENDS:
        model = load_model(resolve(str(folder)), EngineOptions(backend=backend))
        assert model.dtype == ("q4" if bits == 4 else "q8")
        got = model.new_session().logits(ids)
        reference = load_model(resolve(str(plain)), EngineOptions(backend=backend, weights="fp32"))
        exact = reference.new_session().logits(ids)
        assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.05


def test_float_checkpoints_convert_once_and_cache_it(tiny_models, backend):
    from xqchat.models.paths import derived_dir

    files = resolve(str(tiny_models["llama"]))
    ids = list(range(50, 70))
    first = load_model(files, EngineOptions(backend=backend, weights="q4"))
    (cache,) = (derived_dir(files) / "qweights").glob("weights-*-q4-model.safetensors")
    stamp = cache.stat().st_mtime_ns
    again = load_model(files, EngineOptions(backend=backend, weights="q4"))
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(first.new_session().logits(ids), again.new_session().logits(ids))


LOAD_MEMORY = """
import resource, sys
from xqchat.backends.base import EngineOptions, load_model
from xqchat.backends.cuda import model, session  # imports are not the load's memory
from xqchat.models import resolve
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
files = resolve("default")
before = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
engine = load_model(files, EngineOptions())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before, engine.weight_bytes())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_gguf_load_holds_no_float_copy_of_the_model(default_files):
    """Peak RSS while loading grows by at most 1.3x the weights plus the largest tensor."""
    done = subprocess.run(
        [sys.executable, "-c", LOAD_MEMORY], capture_output=True, text=True, check=True
    )
    grew, weights = map(int, done.stdout.split())
    largest = max(t.n_bytes for t in read_header(default_files.path).tensors)
    assert grew <= 1.3 * weights + largest


@pytest.mark.parametrize("weights,limit", [("q8", 0.05), ("q4", 0.5)])
def test_an_untied_model_keeps_its_head_apart_from_its_table(tiny_models, backend, weights, limit):
    """qwen3 here has its own LM head: both it and the input table are quantized, and the logits
    come from the head (the table as head would be another model: ~140% off)."""
    files = resolve(str(tiny_models["qwen3"]))
    ids = list(range(300, 340))
    fp32 = load_model(files, EngineOptions(backend=backend, weights="fp32"))
    exact = fp32.new_session().logits(ids)
    got = (
        load_model(files, EngineOptions(backend=backend, weights=weights)).new_session().logits(ids)
    )
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < limit


@pytest.mark.parametrize("arch", ["phi4", "gemma3"])
def test_every_weights_choice_loads_the_new_architectures(tiny_models, backend, arch):
    """Phi-3's split fused matrices, the reordered partially rotating rows with LongRoPE's factor
    folded in, Gemma's norms and its window layer's ring: in q8, int8, bf16 and the MHA form."""
    files = resolve(str(tiny_models[arch]))
    ids = list(range(600, 680))

    def run(**options):
        model = load_model(files, EngineOptions(backend=backend, **options))
        return pieces(model.new_session(), ids, [60, 1, 1, 1, 17])

    exact = run(weights="fp32")
    assert np.abs(run(weights="fp32", mha=True) - exact).max() <= 1e-5 * np.abs(exact).max()
    for options in [
        dict(weights="q8"),
        dict(weights="int8", int8_threshold=0.0),
        dict(weights="bf16"),
    ]:
        got = run(**options)
        assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.05, options
