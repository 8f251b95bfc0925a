"""Where a decode step's time goes: matmuls versus everything else (elementwise kernels,
attention, Python), measured with torch.profiler over real decode steps."""

from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile

from ..base import GenerationConfig

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "mkldnn::_linear_pointwise"}
MATMUL_OPS |= {
    "xqchat::bf16_linear",
    "xqchat::int8_linear",
    "xqchat::q_linear",
}  # the C passes (cpu_kernels.py)


def profile_decode(model, prompt: list[int], steps: int = 32) -> dict:
    session = model.new_session()
    session.prefill(prompt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in session.generate(GenerationConfig(max_tokens=steps + 1)):
            pass
        wall = time.perf_counter() - start
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    matmul_us = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS)
    step_ms = wall * 1e3 / steps
    matmul_ms = matmul_us / 1e3 / steps
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "step_ms": step_ms,  # under the profiler, which adds a little per op
        "matmul_ms": matmul_ms,
        "outside_matmul_share": 1 - matmul_ms / step_ms,
        "top_ops": [
            {
                "op": e.key,
                "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
    }
