/* The small operations around a decode step's products, each one C call on the few rows of a
 * decode step or a drafter's tree: as PyTorch ops each is several kernels (RMSNorm nine, RoPE
 * and the cache write eleven), and at one row their dispatch, not their arithmetic, is what
 * costs (the default model: about a third of a decode step outside the matrix products). Float32
 * in and out; the build keeps -ffp-contract=off, so each product is rounded as PyTorch's ops
 * round it. */
#include "cpu_simd.h"

/* y (m, k) = x / sqrt(mean(x²) + eps) · weight: RMSNorm, as F.rms_norm computes it in float32
 * (the sum of squares in another order, so the last bit may differ). */
void rms_norm(const float *x, int64_t m, int64_t k, const float *weight, float eps, float *y) {
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * k;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < k; i++) squares += row[i] * row[i];
        float scale = 1.0f / sqrtf(squares / (float)k + eps);
#pragma omp simd
        for (int64_t i = 0; i < k; i++) y[r * k + i] = row[i] * scale * weight[i];
    }
}

/* One head's row rotated, as cache.py's rotate does it: x · cos + roll(x, D/2) · sin, with
 * sin's first half negated (Rope.table); the second product fused with the sum, as PyTorch's
 * addcmul_ fuses it. */
static inline void rotate_row(const float *x, const float *cos, const float *sin, int64_t D,
                              float *out) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = fmaf(x[i + half], sin[i], x[i] * cos[i]);
    for (int64_t i = half; i < D; i++) out[i] = fmaf(x[i - half], sin[i], x[i] * cos[i]);
}

static inline uint16_t to_bf16(float f) { /* rounded to nearest even, as PyTorch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)(u >> 16 | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* The m new rows of a decode step or tree into an exact bf16 K/V cache, with RoPE: queries q
 * (m, n_heads, D) rotated into q_out (n_heads, m, D), the layout attend_bf16 reads; keys k and
 * values v (m, n_kv, D), rows k_stride and v_stride floats apart, the keys rotated, stored as
 * bf16 at rows offset .. offset + m of keys and values (n_kv, capacity, D). cos and sin (m, D):
 * each new row's own position. */
void rope_append_bf16(const float *q, int64_t m, int64_t n_heads, const float *k, int64_t k_stride,
                      const float *v, int64_t v_stride, int64_t n_kv, int64_t D, const float *cos,
                      const float *sin, float *q_out, uint16_t *keys, uint16_t *values,
                      int64_t offset, int64_t capacity) {
    float rotated[D];
    for (int64_t t = 0; t < m; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < n_heads; h++)
            rotate_row(q + (t * n_heads + h) * D, c, s, D, q_out + (h * m + t) * D);
        for (int64_t h = 0; h < n_kv; h++) {
            uint16_t *key = keys + (h * capacity + offset + t) * D;
            uint16_t *value = values + (h * capacity + offset + t) * D;
            rotate_row(k + t * k_stride + h * D, c, s, D, rotated);
            for (int64_t i = 0; i < D; i++) key[i] = to_bf16(rotated[i]);
            for (int64_t i = 0; i < D; i++) value[i] = to_bf16(v[t * v_stride + h * D + i]);
        }
    }
}
