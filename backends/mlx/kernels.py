"""Custom Metal kernels for the MLX backend. Each kernel has a plain-mx reference, used wherever
Metal is absent (mlx[cpu] on Linux) and by the tests; the public function picks one.

Off a Mac the kernels cannot run, so their call contract (output shapes and dtypes for given
inputs) is checked by tracing them with mx.export_function; tests marked `metal` run them.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

METAL = mx.metal.is_available()

# SwiGLU over the fused gate/up projection: out = silu(gate) * up in one pass over memory,
# instead of a split, a silu and a multiply. One thread per output element.
_SWIGLU = mx.fast.metal_kernel(
    name="xqchat_swiglu",
    input_names=["gate_up"],
    output_names=["out"],
    source="""
        uint i = thread_position_in_grid.x;
        uint row = i / H;
        uint col = i % H;
        float g = float(gate_up[row * 2 * H + col]);
        float u = float(gate_up[row * 2 * H + H + col]);
        out[i] = T(g / (1.0f + metal::exp(-g)) * u);
    """,
)


def swiglu_reference(gate_up: mx.array) -> mx.array:
    gate, up = mx.split(gate_up, 2, axis=-1)
    return nn.silu(gate) * up


def swiglu_metal(gate_up: mx.array) -> mx.array:
    """gate_up (..., 2H) -> (..., H), same dtype."""
    hidden = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], hidden)
    count = math.prod(shape)
    return _SWIGLU(
        inputs=[gate_up],
        template=[("T", gate_up.dtype), ("H", hidden)],
        grid=(count, 1, 1),
        threadgroup=(min(256, count), 1, 1),
        output_shapes=[shape],
        output_dtypes=[gate_up.dtype],
    )[0]


def swiglu(gate_up: mx.array) -> mx.array:
    return swiglu_metal(gate_up) if METAL else swiglu_reference(gate_up)
