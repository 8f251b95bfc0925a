"""What only the PyTorch backend does: its CPU paths (oneDNN packing, the bf16 C pass), the fp16 tied table, the transformers
baseline of `bench speed --compare hf`, and CUDA."""

import numpy as np
import pytest
import torch
from test_conformance import ARCHS, TOL, hf_logits, pieces
from transformers import AutoModelForCausalLM

from xqchat.backends.base import EngineOptions, load_model
from xqchat.models import XQError, resolve


@pytest.mark.parametrize("path", ["onednn-packed", "c-pass"])
def test_each_bf16_path_matches_plain_bf16(tiny_models, monkeypatch, path):
    """Every CPU path of bf16 weights that this CPU offers gives plain bf16's outputs, prompt
    chunks (float32 copies of the weights, where the path takes them) and decode rows alike."""
    from xqchat.backends.cuda import cpu_kernels, cpu_paths

    if path == "onednn-packed" and not cpu_paths.onednn_packing():
        pytest.skip("oneDNN cannot pack bf16 on this CPU (needs AVX-512 BW/VL/DQ)")
    if path == "c-pass" and cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    model = resolve(str(tiny_models["qwen2"]))
    monkeypatch.setenv("XQCHAT_BF16_PATH", path)
    fast = load_model(model, EngineOptions(weights="bf16", device="cpu"))
    monkeypatch.setenv("XQCHAT_BF16_PATH", "torch")
    monkeypatch.setenv("XQCHAT_INT_MM", "1")
    plain = load_model(model, EngineOptions(weights="bf16", device="cpu"))
    assert fast.paths["bf16_decode"] == path and plain.paths["bf16_decode"] == "torch"
    linears = [m for m in fast.module.modules() if hasattr(m, "prompt")]
    assert linears and all(
        m.path == path and m.packed == (path == "onednn-packed") for m in linears
    )
    assert not any(getattr(m, "packed", False) for m in plain.module.modules())
    assert not fast.notes and not plain.notes  # which path runs is shown, not noted at each load
    assert fast.weight_bytes() == plain.weight_bytes()
    ids = list(range(300, 340))
    a, b = (
        pieces(fast.new_session(), ids, [30, 1, 9]),
        pieces(plain.new_session(), ids, [30, 1, 9]),
    )
    # bf16 outputs on one side, float32 ones (C pass, float32 copies) on the other: a wrong
    # product would differ by O(1)
    np.testing.assert_allclose(a, b, atol=4e-2, rtol=0)


def test_cpu_paths_are_measured_and_pinned(monkeypatch):
    """The choice is the cheapest measured turn among what this CPU offers; a pin overrides it."""
    from xqchat.backends.cuda import cpu_paths

    monkeypatch.delenv("XQCHAT_BF16_PATH", raising=False)
    monkeypatch.delenv("XQCHAT_INT_MM", raising=False)
    chosen = cpu_paths.choose(256, 128)
    ms = chosen.ms
    assert ("onednn-packed row" in ms) == cpu_paths.onednn_packing()
    assert chosen.int_mm == (cpu_paths.int_mm_exact() and ms["int_mm"] < ms["float32 mm"])
    costs = {
        (d, p): 200 * ms[f"{d} row"] + 25 * ms[f"{d} tree"] + 4 * ms[f"{p} chunk"]
        for d, p in [("c-pass", "float32 copy"), ("c-pass", "torch"), ("torch", "float32 copy"),
                     ("torch", "torch"), ("onednn-packed", "onednn-packed")]
        if f"{d} row" in ms
    }  # fmt: skip
    cheapest = min(costs, key=costs.get)
    packed = ("onednn-packed", "onednn-packed")
    if packed in costs and costs[cheapest] > cpu_paths.STICKY * costs[packed]:
        cheapest = packed  # oneDNN's layout unless another is clearly cheaper
    assert (chosen.bf16, chosen.bf16_prompt) == cheapest
    monkeypatch.setenv("XQCHAT_BF16_PATH", "torch")
    monkeypatch.setenv("XQCHAT_INT_MM", "0")
    pinned = cpu_paths.choose(256, 128)
    assert pinned.bf16 == "torch" and not pinned.int_mm and pinned.ms is ms  # measured once


def test_tied_table_in_fp16_on_cpu_agrees_for_one_and_many_rows(tiny_models):
    model = load_model(
        resolve(str(tiny_models["qwen2"])), EngineOptions(weights="bf16", device="cpu")
    )
    assert model.module.embed.weight.dtype == torch.float16  # tied: one fp16 table, no copy
    assert model.new_session().caches[0].dtype == torch.bfloat16
    hidden = torch.randn(5, 64)
    before = model.weight_bytes()
    with torch.inference_mode():
        many = model.module.logits(hidden)  # bf16 product, through a bf16 copy made once
        ones = torch.cat([model.module.logits(hidden[i : i + 1]) for i in range(5)])  # fp16
    assert model.weight_bytes() == before + model.module.embed.weight.numel() * 2
    # the bf16 copy's product: float32 from the C pass, bf16 from oneDNN's or PyTorch's
    c_pass = model.paths["bf16_decode"] == "c-pass"
    assert many.dtype == (torch.float32 if c_pass else torch.bfloat16)
    assert ones.dtype == torch.float16
    assert torch.allclose(many.float(), ones.float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mha"])
def test_bench_baseline_is_the_same_model(tiny_models, arch):
    from xqchat.backends.cuda.reference import hf_model

    ids = list(range(500, 530))
    expected = hf_logits(
        AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32), ids
    )
    got = hf_logits(hf_model(resolve(str(tiny_models[arch])), "fp32"), ids)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_requested_without_a_gpu_is_refused(tiny_models):
    with pytest.raises(XQError, match="no CUDA GPU is visible"):
        load_model(resolve(str(tiny_models["llama"])), EngineOptions(device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_logits_match_transformers(tiny_models, arch):
    path = tiny_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(resolve(str(path)), EngineOptions(weights="fp32", device="cuda"))
    ids = list(range(900, 960))
    got = pieces(ours.new_session(), ids, [40, 1, 1, 18])
    assert np.abs(got - hf_logits(hf, ids)).max() <= 1e-3  # TF32 and fused kernels on the GPU
