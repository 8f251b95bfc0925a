"""Where a decode step's time goes on MLX. MLX has no op profiler on CPU, so this times the real
decode step, then the same step's matmuls alone on the same weights and shapes."""

from __future__ import annotations

import time

import mlx.core as mx

from ..base import GenerationConfig
from .layers import Embedding, Linear
from .session import ENGINE


def _matmul_ms(module, repeats: int) -> tuple[float, int]:
    mats = [m.weight for _, m in module.named_modules() if isinstance(m, (Linear, Embedding))]
    if not module.spec.tied_embeddings:
        mats = [w for w in mats if w is not module.embed.weight]  # the table is only gathered
    inputs = [mx.zeros((1, w.shape[0]), dtype=w.dtype) for w in mats]
    mx.eval(inputs)
    start = time.perf_counter()
    for _ in range(repeats):  # one graph per repeat: a sync per matmul would add its own cost
        mx.eval([x @ w for x, w in zip(inputs, mats, strict=True)])
    return (time.perf_counter() - start) * 1e3 / repeats, len(mats)


def profile_decode(model, prompt: list[int], steps: int = 32) -> dict:
    def run():
        session = model.new_session()
        session.prefill(prompt)
        start = time.perf_counter()
        for _ in session.generate(GenerationConfig(max_tokens=steps + 1)):
            pass
        step_ms = (time.perf_counter() - start) * 1e3 / steps
        matmul_ms, calls = _matmul_ms(model.module, max(1, steps // 4))
        return {
            "step_ms": step_ms,
            "matmul_ms": matmul_ms,
            "outside_matmul_share": max(0.0, 1 - matmul_ms / step_ms),
            "top_ops": [
                {
                    "op": "matmul (x @ W, timed alone)",
                    "ms_per_step": matmul_ms,
                    "calls_per_step": calls,
                }
            ],
        }

    return ENGINE.call(run)
