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


def geglu(gate_up: mx.array) -> mx.array:
    """Gemma's GeGLU over the fused gate/up projection: gelu (tanh approximation)(gate) * up."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return nn.gelu_approx(gate) * up


# Decode scores with RoPE applied to each key as it is read: q (H, D) rotated, keys (H_kv, S, D)
# before RoPE (as XQuant rebuilds them) -> scores (H, S). No rotated copy of K is written. One
# thread per (head, token); key t sits at position first + t (a span of a longer cache), and its
# angle is that position times inv_freq, as in mx.fast.rope.
_ROPE_SCORES = mx.fast.metal_kernel(
    name="xqchat_rope_scores",
    input_names=["q", "keys", "inv_freq", "scale", "first"],
    output_names=["scores"],
    source="""
        uint t = thread_position_in_grid.x;
        uint h = thread_position_in_grid.y;
        if (t >= S) return;
        uint half_dim = D / 2;
        const device T* k = keys + ((h / N_REP) * S + t) * D;
        const device float* qh = q + h * D;
        float acc = 0.0f;
        for (uint d = 0; d < half_dim; ++d) {
            float angle = float(first[0] + t) * inv_freq[d];
            float c = metal::cos(angle), s = metal::sin(angle);
            float k1 = float(k[d]), k2 = float(k[d + half_dim]);
            acc += qh[d] * (k1 * c - k2 * s) + qh[d + half_dim] * (k2 * c + k1 * s);
        }
        scores[h * S + t] = acc * scale[0];
    """,
)


# LLM.int8 (backends/mlx/int8.py): out[m, n] = int32(Σ_k q[m, k]·w[k, n]) · rs[m] · cs[n]
# + cs[n] · Σ_k x[m, k]·w[k, n] over row m's outliers k (outlier[m, k]: each row's own, so a row
# gives the same bits alone and in a drafter's tree), where q = rint(x / rs) on the others.
# Quantizing X inside the kernel keeps the whole layer lazy (no host sync to learn which values
# are outliers). One thread per output element, its sums in k's order; neighbouring threads read
# neighbouring bytes of the (in, out) weight.
_INT8_MATMUL = mx.fast.metal_kernel(
    name="xqchat_int8_matmul",
    input_names=["x", "outlier", "row_scale", "w", "col_scale"],
    output_names=["out"],
    source="""
        uint n = thread_position_in_grid.x;
        uint m = thread_position_in_grid.y;
        float rs = row_scale[m];
        int acc = 0;
        float outliers = 0.0f;
        for (uint k = 0; k < K; k++) {
            float x_mk = float(x[m * K + k]);
            int w_kn = int(w[k * N + n]);
            if (outlier[m * K + k]) {
                outliers += x_mk * float(w_kn);
            } else {
                acc += int(metal::rint(x_mk / rs)) * w_kn;
            }
        }
        out[m * N + n] = T((float(acc) * rs + outliers) * col_scale[n]);
    """,
)


def rope_scores_reference(q, keys, inv_freq, scale: float, first: int = 0):
    positions = mx.arange(first, first + keys.shape[1], dtype=mx.float32)
    angle = positions[:, None] * inv_freq[None]
    cos, sin = mx.cos(angle), mx.sin(angle)
    k1, k2 = mx.split(keys.astype(mx.float32), 2, axis=-1)
    rotated = mx.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)
    n_rep = q.shape[0] // keys.shape[0]
    grouped = q.astype(mx.float32).reshape(keys.shape[0], n_rep, -1)
    return (grouped @ rotated.swapaxes(1, 2)).reshape(q.shape[0], -1) * scale


def rope_scores_metal(q, keys, inv_freq, scale: float, first: int = 0):
    """q (H, D), keys (H_kv, S, D) at positions first.., inv_freq (D/2,) -> scores (H, S)
    float32."""
    heads, (kv_heads, length, dim) = q.shape[0], keys.shape
    scale, first = mx.array([scale], dtype=mx.float32), mx.array([first], dtype=mx.uint32)
    return _ROPE_SCORES(
        inputs=[q.astype(mx.float32), keys, inv_freq, scale, first],
        template=[("T", keys.dtype), ("S", length), ("D", dim), ("N_REP", heads // kv_heads)],
        grid=(length, heads, 1),
        threadgroup=(min(256, length), 1, 1),
        output_shapes=[(heads, length)],
        output_dtypes=[mx.float32],
    )[0]


def rope_scores(q, keys, inv_freq, scale: float, first: int = 0) -> mx.array:
    return (rope_scores_metal if METAL else rope_scores_reference)(q, keys, inv_freq, scale, first)


def merge_partials(parts) -> mx.array:
    """Per-span (weighted rows (H_kv, R, W), score maxima (H_kv, R, 1), weight sums (H_kv, R, 1))
    -> the softmax-normalised rows over all spans (mirror of backends/cuda/kernels.py)."""
    out, top, total = (mx.stack(p) for p in zip(*parts, strict=True))
    weight = mx.exp(top - mx.max(top, axis=0, keepdims=True))
    return (out * weight).sum(0) / (total * weight).sum(0)


def int8_quantize_reference(x: mx.array, threshold: float):
    """x (M, K) -> (each row's outliers (M, K) bool, the regular part's codes as float (M, K),
    row scales (M, 1)). Codes are integers in [-127, 127]."""
    x = x.astype(mx.float32)
    outlier = mx.abs(x) > threshold
    regular = mx.where(outlier, 0.0, x)
    row_scale = mx.maximum(mx.max(mx.abs(regular), axis=-1, keepdims=True), 1e-12) / 127
    return outlier, mx.round(regular / row_scale), row_scale


EXACT_K = 1024  # 1024 · 127² < 2^24: float32 sums of this many int8 products are exact


def int8_matmul_reference(x, w, col_scale, threshold: float) -> mx.array:
    """What `int8_matmul_metal` computes, in plain mx. mx.matmul refuses integer types, so the
    int8 weights are cast to float32 a slice of EXACT_K rows at a time (they stay int8 in memory)
    and the int32 sum is assembled from exact partial products."""
    outlier, codes, row_scale = int8_quantize_reference(x, threshold)
    x_outlier = mx.where(outlier, x.astype(mx.float32), 0.0)
    m = x.shape[0]
    acc = mx.zeros((m, w.shape[1]), dtype=mx.int32)
    outliers = mx.zeros((m, w.shape[1]), dtype=mx.float32)
    for k in range(0, w.shape[0], EXACT_K):
        w_slice = w[k : k + EXACT_K].astype(mx.float32)
        both = mx.concatenate([codes[:, k : k + EXACT_K], x_outlier[:, k : k + EXACT_K]]) @ w_slice
        acc = acc + both[:m].astype(mx.int32)
        outliers = outliers + both[m:]
    return ((acc.astype(mx.float32) * row_scale + outliers) * col_scale).astype(x.dtype)


def int8_matmul_metal(x, w, col_scale, threshold: float) -> mx.array:
    """x (M, K) float, w (K, N) int8, col_scale (N,) float32 -> (M, N) in x's dtype."""
    outlier = mx.abs(x) > threshold
    regular = mx.where(outlier, 0.0, x.astype(mx.float32))
    row_scale = mx.maximum(mx.max(mx.abs(regular), axis=-1), 1e-12) / 127
    (m, k), n = x.shape, w.shape[1]
    return _INT8_MATMUL(
        inputs=[x, outlier, row_scale, w, col_scale],
        template=[("T", x.dtype), ("K", k), ("N", n)],
        grid=(n, m, 1),
        threadgroup=(min(256, n), 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x.dtype],
    )[0]


def int8_matmul(x, w, col_scale, threshold: float) -> mx.array:
    if METAL:
        return int8_matmul_metal(x, w, col_scale, threshold)
    return int8_matmul_reference(x, w, col_scale, threshold)
