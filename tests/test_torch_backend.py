"""What only the PyTorch backend does: oneDNN packing, the fp16 tied table, the transformers
baseline of `bench speed --compare hf`, and CUDA."""

import numpy as np
import pytest
import torch
from test_conformance import ARCHS, TOL, hf_logits, pieces
from transformers import AutoModelForCausalLM

from xqchat.backends.base import EngineOptions, load_model
from xqchat.models import XQError, resolve


def test_packed_bf16_matches_plain_bf16(tiny_models, monkeypatch):
    path = resolve(str(tiny_models["qwen2"]))
    packed = load_model(path, EngineOptions(weights="bf16", device="cpu"))
    monkeypatch.setenv("XQCHAT_NO_ONEDNN_PACK", "1")
    plain = load_model(path, EngineOptions(weights="bf16", device="cpu"))
    assert any(getattr(m, "packed", False) for m in packed.module.modules())
    assert not any(getattr(m, "packed", False) for m in plain.module.modules())
    assert plain.notes and "unavailable" in plain.notes[0]
    assert packed.weight_bytes() == plain.weight_bytes()
    ids = list(range(300, 340))
    a, b = (
        pieces(packed.new_session(), ids, [30, 1, 9]),
        pieces(plain.new_session(), ids, [30, 1, 9]),
    )
    np.testing.assert_allclose(a, b, atol=2e-2, rtol=0)


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
    assert many.dtype == torch.bfloat16 and ones.dtype == torch.float16
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
