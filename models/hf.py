"""A model as transformers would describe it: the config for a ModelSpec, and a folder in HF
layout holding our dequantised weights (for baselines that only read HF folders, like mlx-lm)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import XQError
from .registry import ModelFiles
from .spec import ModelSpec
from .weights import open_checkpoint


def hf_config(spec: ModelSpec):
    from transformers import AutoConfig

    if spec.rope.type != "default" or spec.rope.freq_divisors is not None:
        raise XQError("the baselines support only plain RoPE")
    if spec.arch not in ("llama", "mistral", "qwen2", "qwen3") or spec.windows:
        raise XQError(f"the baselines support only the Llama family without windows ({spec.arch})")
    return AutoConfig.for_model(
        spec.arch,
        hidden_size=spec.dim,
        intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        rms_norm_eps=spec.norm_eps,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_context,
        tie_word_embeddings=spec.tied_embeddings,
        attention_bias=spec.qkv_bias,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope.theta},
    )


def save_hf_folder(files: ModelFiles, tokenizer, folder: Path) -> Path:
    """config.json + model.safetensors (fp32) + tokenizer files, from any checkpoint we read."""
    import numpy as np
    from safetensors.numpy import save_file

    checkpoint = open_checkpoint(files)
    config = hf_config(checkpoint.spec).to_dict()
    config["rope_theta"] = checkpoint.spec.rope.theta  # readers of the older config style
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        name: np.ascontiguousarray(array, dtype=np.float32) for name, array in checkpoint.tensors()
    }
    save_file(tensors, folder / "model.safetensors")
    tokenizer.hf.save_pretrained(folder)
    return folder
