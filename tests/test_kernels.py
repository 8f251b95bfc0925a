"""The PyTorch backend's Triton kernels against their plain-torch references, run on CPU tensors
in Triton's interpreter (conftest sets TRITON_INTERPRET off a GPU), and compiled ahead of time
for the GPUs we ship for (sm_80, sm_90) without one."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_tiny

from xqchat.backends.base import CacheSpec

triton = pytest.importorskip("triton")

from xqchat.backends.cuda import kernels  # noqa: E402
from xqchat.backends.cuda.cache import Scratch, TokenStore  # noqa: E402

# The same tests run the compiled kernels on a GPU, and the interpreter on CPU tensors elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 64  # n_rep 3, as in the default model's head groups


def stream(width, per_channel, bits, n, group=32, residual=0, seed=0):
    """A TokenStore holding n random rows (one outlier channel), as a cache fills it."""
    store = TokenStore(
        width,
        CacheSpec(kind="xquant", bits=bits, group=group, residual=residual),
        per_channel,
        torch.float32,
        DEVICE,
        Scratch(),
    )
    rows = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    rows[:, 1] *= 8
    store.append(rows.to(DEVICE))
    return store


def inputs(n, key_width, seed=1, bias=True, norm=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(HEADS, HEAD_DIM, generator=g)
    to_keys = torch.randn(KV_HEADS * HEAD_DIM, key_width, generator=g) / math.sqrt(key_width)
    angles = torch.arange(n)[:, None] * 0.3 ** torch.arange(HEAD_DIM // 2)[None]
    args = dict(
        q=q,
        to_keys=to_keys,
        bias=torch.randn(KV_HEADS * HEAD_DIM, generator=g) if bias else None,
        norm=1 + 0.1 * torch.randn(HEAD_DIM, generator=g) if norm else None,
        eps=1e-6,
        cos=angles.cos(),
        sin=angles.sin(),
    )
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["gqa", "mha"])
def test_latent_attention_kernel_equals_its_reference(bits, layout):
    """The sink's exact rows, quantized blocks and the newest exact rows, merged: the kernel
    equals the reference on the same rows (GQA: per-channel key latent and per-token value
    latent; MHA: one per-token stream of X)."""
    n = 4 + 64 + 40  # the sink, two blocks of 32 flushed, 40 rows exact (not a whole chunk)
    if layout == "gqa":
        keys = stream(128, True, bits, n, residual=40)
        values = stream(96, False, bits, n, residual=40, seed=3)
    else:
        keys = values = stream(128, False, bits, n, residual=40)
    assert keys.n_blocks == 2
    args = inputs(n, keys.width, bias=layout == "gqa", norm=layout == "gqa")
    half = {k: v for k, v in args.items() if k not in ("cos", "sin")}
    parts, start = [], 0
    for k, v in zip(keys.segments(torch.float32), values.segments(torch.float32), strict=True):
        end = start + len(k)
        parts.append(
            kernels.latent_attention_partials(
                keys=k, values=v, cos=args["cos"][start:end], sin=args["sin"][start:end], **half
            )
        )
        start = end
    assert len(parts) == 3 and start == n
    got = kernels.merge_partials(parts)
    every_key = kernels.Rows(keys.width, rows=keys.read(torch.float32))
    every_value = kernels.Rows(values.width, rows=values.read(torch.float32))
    want = kernels.latent_attention_reference(keys=every_key, values=every_value, **args)
    assert got.shape == want.shape == (KV_HEADS, HEADS // KV_HEADS, values.width)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_float_rows_in_several_chunks_equal_one_softmax():
    """The merge of per-chunk maxima and sums is the softmax over every token (XQuant-CL reads
    its accumulated rows as floats: 150 rows are three chunks, the last one partial)."""
    n = 150
    rows = torch.randn(n, 96, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    keys = values = kernels.Rows(96, rows=rows)
    args = inputs(n, 96, norm=False)
    got = kernels.merge_partials(
        [kernels.latent_attention_partials(keys=keys, values=values, **args)]
    )
    want = kernels.latent_attention_reference(keys=keys, values=values, **args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["xquant", "xquant-cl"])
@pytest.mark.parametrize("model", ["gqa-qwen3", "llama"])
def test_decoding_through_the_kernel_equals_the_torch_path(tiny_models, kind, model, monkeypatch):
    """The cache's fused decode (blocks + exact rows, or a chain's accumulated rows; k-norm on
    Qwen3; MHA X on Llama, one stream for keys and values) gives the logits of its plain-torch
    path. One base layer, so the second of the two stores deltas. Keys rebuilt in float on both
    (the CPU engine's int8 rebuild is not CUDA's)."""
    from xqchat.backends.cuda import cache as caches
    from xqchat.backends.cuda.cache import XQuantCache

    monkeypatch.setattr(caches, "BASE_LAYERS", 1)
    monkeypatch.setattr(caches, "INT8_KEYS_BITS", 0)
    engine = load_tiny(tiny_models, model, "torch", device=DEVICE)
    cache = CacheSpec(kind=kind, bits=4, group=32, residual=8)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(XQuantCache, "fused_decode", fused)
        session = engine.new_session(cache)
        session.prefill(list(range(400, 480)))  # the sink, two blocks, 12 rows in the window
        runs.append(np.concatenate([session.logits([t]) for t in (7, 8, 9)]))  # decode steps
    torch.testing.assert_close(
        torch.from_numpy(runs[1]), torch.from_numpy(runs[0]), rtol=1e-4, atol=1e-4
    )


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xqchat.backends.cuda import kernels

signature = {name: "*fp32" for name in ("q", "key_rows", "value_rows", "bias", "norm",
                                        "cos", "sin", "out", "out_max", "out_sum")}
signature["to_keys"] = "*bf16"
signature.update({name: "*u8" for name in ("key_codes", "value_codes")})
signature.update({name: "*fp16" for name in ("key_scale", "key_zero", "value_scale", "value_zero")})
signature.update(n="i32", eps="fp32", sm_scale="fp32")
constants = dict(N_REP=3, HEAD_DIM=64, KEY_WIDTH=64, VALUE_WIDTH=64, QUANT=True, BITS=3,
                 GROUP=64, KEY_ROW_GROUP=64, KEY_COLUMNS=True, VALUE_ROW_GROUP=64,
                 HAS_BIAS=False, HAS_NORM=False, BLOCK_W=32, BLOCK_Q=16,
                 PRECISION="tf32")
signature.update({name: "constexpr" for name in constants})
for arch in (80, 90):
    source = ASTSource(fn=kernels._latent_attention, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    assert len(compiled.asm["cubin"]) > 1000, arch
    print(arch, "ok")
"""


def test_kernels_compile_ahead_of_time_for_sm80_and_sm90():
    """The kernel's own code in a small configuration: the default model's (width 192, blocks of
    128 tokens) takes minutes of ptxas for sm_90 on this CPU, too long for the suite."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["80", "ok", "90", "ok"]
