"""Our forward pass against transformers on the same weights (fp32, max abs diff <= 1e-4)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from xqchat.backends.base import EngineOptions, load_model
from xqchat.models import resolve

ARCHS = ["llama", "llama3", "mha", "mistral", "qwen2", "qwen3"]
TOL = 1e-4


def incremental_logits(model, ids, splits):
    """Logits for every position, fed as a prefill then pieces of the given sizes (1 = decode)."""
    session = model.new_session()
    out, start = [], 0
    with torch.inference_mode():
        for size in splits:
            hidden = model.module(
                torch.tensor([ids[start : start + size]], device=model.device), session.caches
            )
            out.append(model.module.logits(hidden)[0])
            start += size
    return torch.cat(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_logits_match_transformers(tiny_models, arch):
    path = tiny_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(resolve(str(path)), EngineOptions(weights="fp32", device="cpu"))
    ids = torch.randint(0, 49152, (1, 90), generator=torch.Generator().manual_seed(7))[0].tolist()
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    # prefill 40, five single-token decodes, a 20-token append, then 25 more in one piece
    got = incremental_logits(ours, ids, [40, 1, 1, 1, 1, 1, 20, 25])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_spec_features_are_exercised(tiny_models):
    specs = {
        a: load_model(resolve(str(tiny_models[a])), EngineOptions(weights="fp32")).spec
        for a in ARCHS
    }
    assert specs["qwen2"].qkv_bias and not specs["llama"].qkv_bias
    assert specs["qwen3"].qk_norm and specs["qwen3"].head_dim == 32
    assert specs["llama3"].rope.type == "llama3"
    assert specs["mha"].n_kv_heads == specs["mha"].n_heads
    assert specs["qwen2"].tied_embeddings and not specs["qwen3"].tied_embeddings


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_fp32, hf_default):
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 7018, 411, 2038, 4753, 19]
    ids += list(range(1000, 1024))
    with torch.inference_mode():
        expected = hf_default(torch.tensor([ids])).logits[0]
    got = incremental_logits(default_fp32, ids, [len(ids) - 16] + [1] * 16)  # prefill, 16 decodes
    assert (got - expected).abs().max().item() <= TOL


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
    a, b = incremental_logits(packed, ids, [30, 1, 9]), incremental_logits(plain, ids, [30, 1, 9])
    assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mha"])
def test_bench_baseline_is_the_same_model(tiny_models, arch):
    from xqchat.backends.cuda.reference import hf_model

    ids = torch.tensor([list(range(500, 530))])
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)(
            ids
        ).logits
        got = hf_model(resolve(str(tiny_models[arch])), "fp32")(ids).logits
    assert (got - expected).abs().max().item() <= TOL


def test_tied_table_in_fp16_on_cpu_agrees_for_one_and_many_rows(tiny_models):
    model = load_model(
        resolve(str(tiny_models["qwen2"])), EngineOptions(weights="bf16", device="cpu")
    )
    assert model.module.embed.weight.dtype == torch.float16  # tied: one fp16 table, no copy
    session = model.new_session()
    assert session.caches[0].dtype == torch.bfloat16
    hidden = torch.randn(5, 64)
    with torch.inference_mode():
        many = model.module.logits(hidden)  # bf16 product
        ones = torch.cat(
            [model.module.logits(hidden[i : i + 1]) for i in range(5)]
        )  # fp16 products
    assert many.dtype == torch.bfloat16 and ones.dtype == torch.float16
    assert torch.allclose(many.float(), ones.float(), atol=3e-2, rtol=0)


@pytest.mark.parametrize("weights, tol", [("fp16", 2e-2), ("bf16", 6e-2)])
def test_half_precision_weights_stay_close_to_fp32(tiny_models, weights, tol):
    path = resolve(str(tiny_models["llama3"]))
    ids = list(range(700, 760))
    exact = incremental_logits(load_model(path, EngineOptions(weights="fp32")), ids, [50, 1, 9])
    half = incremental_logits(load_model(path, EngineOptions(weights=weights)), ids, [50, 1, 9])
    assert (half.float() - exact).abs().max().item() <= tol * exact.abs().max().item()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_requested_without_a_gpu_is_refused(tiny_models):
    from xqchat.models import XQError

    with pytest.raises(XQError, match="no CUDA GPU is visible"):
        load_model(resolve(str(tiny_models["llama"])), EngineOptions(device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_logits_match_transformers(tiny_models, arch):
    path = tiny_models[arch]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(resolve(str(path)), EngineOptions(weights="fp32", device="cuda"))
    ids = list(range(900, 960))
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    got = incremental_logits(ours, ids, [40, 1, 1, 18]).cpu()
    assert (got - expected).abs().max().item() <= 1e-3  # TF32 and fused kernels on the GPU
