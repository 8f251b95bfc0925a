"""HF transformers on the very weights xqchat loaded: the baseline `bench speed --compare hf` runs."""

from __future__ import annotations

import time

import torch

from xqchat.models.hf import hf_config
from xqchat.models.registry import ModelFiles
from xqchat.models.weights import open_checkpoint

from .model import DTYPES


def hf_model(files: ModelFiles, dtype: str):
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(files)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(checkpoint.spec), dtype=DTYPES[dtype])
    state = {name: torch.tensor(array, dtype=DTYPES[dtype]) for name, array in checkpoint.tensors()}
    if checkpoint.spec.tied_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffers were on meta
    return model.eval()


@torch.inference_mode()
def hf_speed(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of `generate`, greedy, exactly `new_tokens` per prompt."""
    prefill_tokens = prefill_s = decode_tokens = decode_s = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        kw = dict(do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - start
        prefill_tokens += len(ids)
        prefill_s += first
        decode_tokens += new_tokens - 1
        decode_s += total - first
    return prefill_tokens / prefill_s, decode_tokens / decode_s
