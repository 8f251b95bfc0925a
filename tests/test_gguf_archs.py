"""GGUF files of the architectures beyond Llama, written here with gguf's writer in llama.cpp's
conventions (its tensor names, Phi-3's fused tensors and LongRoPE factor tables, Gemma's norms
stored as 1 + w, SmolLM3's Q/K rows permuted as for Llama), read back: the same logits as
transformers on the safetensors checkpoint they came from."""

import numpy as np
import pytest
import torch
from conftest import TINY, longrope
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Phi3Config, SmolLM3Config

from xqchat.backends.base import EngineOptions, load_model
from xqchat.models import resolve

NAMES = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "input_layernorm": "attn_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "qkv_proj": "attn_qkv",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "gate_up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm",
}


def gguf_name(arch: str, hf: str) -> str:
    parts = hf.split(".")
    if hf == "lm_head.weight":
        return "output.weight"
    if parts[1] != "layers":
        return f"{NAMES[parts[1]]}.weight"
    module = parts[-2]
    if module == "post_attention_layernorm":  # Gemma's follows attention; Llama's precedes the FFN
        module_name = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        module_name = NAMES[module]
    return f"blk.{parts[2]}.{module_name}.{parts[-1]}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's converter, for Llama's RoPE
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(model, arch: str, path) -> None:
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters
    tensors = {}
    if arch == "gemma3":
        rope = rope["full_attention"]
        w.add_sliding_window(cfg.sliding_window)
        w.add_uint32("gemma3.attention.sliding_window_pattern", 2)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(rotary)
        w.add_rope_scaling_attn_factors(model.model.rotary_emb.attention_scaling)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for kind in ("short", "long"):
            tensors[f"rope_factors_{kind}.weight"] = np.array(rope[f"{kind}_factor"], np.float32)
    w.add_rope_freq_base(rope["rope_theta"])
    for hf, t in model.state_dict().items():
        if "rotary_emb" in hf or (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        a = t.float().numpy()
        name = gguf_name(arch, hf)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1  # llama.cpp's converter stores Gemma's norm as the factor it applies
        if arch == "smollm3" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            a = permute(a, heads)
        tensors[name] = a
    for name, a in tensors.items():
        w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CONFIGS = {
    # SmolLM3's GGUF has no key for its RoPE-less layers: llama.cpp takes every fourth
    "smollm3": lambda: SmolLM3Config(**{**TINY, "num_hidden_layers": 4}, pad_token_id=0),
    "phi3": lambda: Phi3Config(
        **TINY,
        original_max_position_embeddings=128,
        partial_rotary_factor=0.5,
        rope_parameters={**longrope(8), "partial_rotary_factor": 0.5},
    ),
    # llama.cpp scales Gemma 3's queries by its head dimension (as every size but 27B does)
    "gemma3": lambda: Gemma3TextConfig(
        **TINY,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        },
    ),
}


def gguf_pair(arch, backend, tmp_path):
    """A seeded tiny transformers model of `arch` and ours from its GGUF."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32).eval()
    with torch.no_grad():
        center = 0.0 if arch == "gemma3" else 1.0  # Gemma's norms scale by 1 + w
        for name, p in model.named_parameters():
            p.copy_(
                center + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p)
            )
    path = tmp_path / f"{arch}.gguf"
    write_gguf(model, arch, path)
    return model, load_model(resolve(str(path)), EngineOptions(backend=backend, weights="fp32"))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_gguf_round_trip_gives_transformers_logits(arch, backend, tmp_path):
    model, ours = gguf_pair(arch, backend, tmp_path)
    ids = list(range(500, 560))
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    session = ours.new_session()
    got = np.concatenate([session.logits(ids[:40]), *(session.logits([t]) for t in ids[40:])])
    assert np.abs(got - expected).max() <= 1e-4


def test_a_phi3_gguf_switches_to_its_long_factors(backend, tmp_path):
    """rope_factors_long: past the original length (128) as transformers, which switches when a
    forward's last position passes it (fed here in the same pieces through its cache)."""
    from test_conformance import ACROSS, hf_pieces, pieces

    model, ours = gguf_pair("phi3", backend, tmp_path)
    assert ours.spec.max_context == 256 and not ours.spec.notes
    ids = list(range(500, 500 + sum(ACROSS)))
    got = pieces(ours.new_session(), ids, ACROSS)
    assert np.abs(got - hf_pieces(model, ids, ACROSS)).max() <= 1e-4
