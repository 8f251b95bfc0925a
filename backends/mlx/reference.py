"""mlx-lm on the very weights xqchat loaded: the baseline `bench speed --compare mlx-lm` runs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from xqchat.models.errors import XQError
from xqchat.models.hf import save_hf_folder
from xqchat.models.registry import ModelFiles

from .model import DTYPES
from .session import ENGINE


def mlx_lm_speed(
    files: ModelFiles, tokenizer, dtype: str, prompts: list[list[int]], new_tokens: int
) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of mlx-lm's generate_step, greedy, exactly `new_tokens`."""
    return ENGINE.call(_mlx_lm_speed, files, tokenizer, dtype, prompts, new_tokens)


def _mlx_lm_speed(files, tokenizer, dtype, prompts, new_tokens):
    try:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import generate_step
    except ImportError:
        raise XQError("--compare mlx-lm needs mlx-lm: pip install mlx-lm") from None
    with tempfile.TemporaryDirectory(prefix="xqchat-mlx-lm-") as folder:
        model, _ = mlx_lm.load(str(save_hf_folder(files, tokenizer, Path(folder))))
    model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    prefill_tokens = prefill_s = decode_s = 0.0
    for ids in prompts:
        start = time.perf_counter()
        steps = generate_step(mx.array(ids), model, max_tokens=new_tokens)
        next(steps)
        first = time.perf_counter()
        for _ in steps:
            pass
        prefill_tokens += len(ids)
        prefill_s += first - start
        decode_s += time.perf_counter() - first
    return prefill_tokens / prefill_s, len(prompts) * (new_tokens - 1) / decode_s
