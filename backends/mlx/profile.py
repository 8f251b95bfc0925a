"""Where a decode step's time goes on MLX. MLX has no op profiler on CPU, so this times the real
decode step, then the same step's products alone on the same weights and shapes: the layers'
matrices (float, int8, q4 or q8 alike: each module's own product) and the LM head. The rest of
the step (attention, norms, RoPE, the cache, building the graph) is what remains."""

from __future__ import annotations

import time
from collections import Counter

import mlx.core as mx

from ..base import GenerationConfig
from .session import ENGINE


def _products(module) -> list:
    """The layers' linear modules: every one has a `dense_weight` (in, out)."""
    return [
        m for layer in module.layers for _, m in layer.named_modules() if hasattr(m, "dense_weight")
    ]


def _label(linear) -> str:
    kind = type(linear).__name__
    return f"{kind} q{linear.bits} g{linear.group}" if hasattr(linear, "bits") else kind


def _timed_ms(products, repeats: int) -> float:
    """ms per repeat of `products` (thunks), all in one graph per repeat: a sync per product
    would add its own cost."""
    mx.eval([p() for p in products])
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval([p() for p in products])
    return (time.perf_counter() - start) * 1e3 / repeats


def profile_decode(model, prompt: list[int], steps: int = 32) -> dict:
    def run():
        session = model.new_session()
        session.prefill(prompt)
        start = time.perf_counter()
        for _ in session.generate(GenerationConfig(max_tokens=steps + 1)):
            pass
        step_ms = (time.perf_counter() - start) * 1e3 / steps
        module, repeats = model.module, max(1, steps // 4)
        linears = _products(module)

        # each module's own product on a zero row; dense_weight is lazy: only its shape is read
        def product(m):
            x = mx.zeros((1, 1, m.dense_weight().shape[0]), dtype=module.kv_dtype)
            return lambda: m(x)

        layers_ms = _timed_ms([product(m) for m in linears], repeats)
        hidden = mx.zeros((1, module.spec.dim), dtype=module.kv_dtype)
        head_ms = _timed_ms([lambda: module.logits(hidden)], repeats)
        kinds = ", ".join(f"{n} {label}" for label, n in Counter(map(_label, linears)).items())
        matmul_ms = layers_ms + head_ms
        head = module.embed if module.spec.tied_embeddings else module.lm_head
        return {
            "step_ms": step_ms,
            "matmul_ms": matmul_ms,
            "outside_matmul_share": max(0.0, 1 - matmul_ms / step_ms),
            "top_ops": [
                {
                    "op": f"layer products ({kinds}; timed alone)",
                    "ms_per_step": layers_ms,
                    "calls_per_step": len(linears),
                },
                {
                    "op": f"LM head ({_label(head)}; timed alone)",
                    "ms_per_step": head_ms,
                    "calls_per_step": 1,
                },
                {
                    "op": "the rest: attention, norms, RoPE, cache, graph building",
                    "ms_per_step": max(0.0, step_ms - matmul_ms),
                    "calls_per_step": 1,
                },
            ],
        }

    return ENGINE.call(run)
