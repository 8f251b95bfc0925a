/* XQuant's decode passes on the CPU, fused: what the Triton kernel (kernels.py) does on CUDA.
 * In eager PyTorch each step below is a separate op that reads and writes every cached token's
 * row again; here each row is read once. Built at first use by cpu_kernels.py (-O3
 * -march=native; -ffp-contract=off, so `dequantize` rounds exactly as the torch ops do and the
 * tests can compare them bit for bit). With -fopenmp the passes split their blocks or tokens
 * over PyTorch's thread count (`threads`), in the OpenMP runtime PyTorch has loaded where it is
 * the same libgomp.so.1; without OpenMP they run on one thread. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One block's n codes from its bit planes (backends/cuda/quant.py: byte i holds code i of each
 * of the 8/bits consecutive segments; 3 bits: a 2-bit plane of the low bits, then a 1-bit plane
 * of the high bits). */
static void unpack(const uint8_t *packed, int64_t n, int bits, uint8_t *code) {
    if (bits == 8) {
        memcpy(code, packed, n);
        return;
    }
    int low = bits == 3 ? 2 : bits;
    int64_t width = n * low / 8;
    uint8_t mask = (1 << low) - 1;
    for (int j = 0; j < 8 / low; j++)
        for (int64_t i = 0; i < width; i++)
            code[j * width + i] = (packed[i] >> (low * j)) & mask;
    if (bits == 3) {
        const uint8_t *high = packed + width;
        for (int j = 0; j < 8; j++)
            for (int64_t i = 0; i < n / 8; i++)
                code[j * (n / 8) + i] |= ((high[i] >> j) & 1) << 2;
    }
}

/* `n_blocks` packed blocks of n values each -> float32 values code * scale + zero, written to
 * `out` (accumulate = 0) or added to it (accumulate = 1: XQuant-CL's layer differences). Per
 * block, scale and zero (float32) hold one value per column of the block's `inner`-wide rows
 * (columns = 1), or one per `inner` consecutive values. */
void dequantize(const uint8_t *codes, const float *scale, const float *zero, int64_t n_blocks,
                int64_t n, int bits, int64_t inner, int columns, int accumulate, float *out,
                int threads) {
    int64_t packed_bytes = n * bits / 8, n_scales = columns ? inner : n / inner;
#pragma omp parallel num_threads(threads) if (n_blocks > 1)
    {
        uint8_t *code = malloc(n);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_blocks; b++) {
            unpack(codes + b * packed_bytes, n, bits, code);
            const float *s = scale + b * n_scales, *z = zero + b * n_scales;
            for (int64_t start = 0; start < n; start += inner) {
                const uint8_t *c = code + start;
                float *o = out + b * n + start;
                if (columns && accumulate)
                    for (int64_t i = 0; i < inner; i++) o[i] += c[i] * s[i] + z[i];
                else if (columns)
                    for (int64_t i = 0; i < inner; i++) o[i] = c[i] * s[i] + z[i];
                else {
                    float sg = s[start / inner], zg = z[start / inner];
                    if (accumulate)
                        for (int64_t i = 0; i < inner; i++) o[i] += c[i] * sg + zg;
                    else
                        for (int64_t i = 0; i < inner; i++) o[i] = c[i] * sg + zg;
                }
            }
        }
        free(code);
    }
}

/* One key row (n_kv heads of D values, already float32) -> its scores against the heads' m
 * queries each: the k-norm per head, RoPE, the scaled products. D is a constant where it is
 * inlined, so these short loops vectorize without remainders. */
static inline void score_row(float *restrict k, const float *restrict norm, float eps,
                             const float *restrict c, const float *restrict s,
                             const float *restrict q, int64_t n_kv, int64_t m, const int64_t D,
                             float sm_scale, float *restrict scores, int64_t T) {
    const int64_t half = D / 2;
    float rotated[D];
    for (int64_t h = 0; h < n_kv; h++) {
        float *kh = k + h * D;
        if (norm) {
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < D; i++) squares += kh[i] * kh[i];
            float inverse = 1.0f / sqrtf(squares / D + eps);
            for (int64_t i = 0; i < D; i++) kh[i] = kh[i] * inverse * norm[i];
        }
        for (int64_t i = 0; i < half; i++) {
            rotated[i] = kh[i] * c[i] + kh[i + half] * s[i];
            rotated[i + half] = kh[i + half] * c[i + half] + kh[i] * s[i + half];
        }
        for (int64_t r = 0; r < m; r++) {
            const float *qr = q + (h * m + r) * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < D; i++) dot += qr[i] * rotated[i];
            scores[(h * m + r) * T] = dot * sm_scale;
        }
    }
}

/* Attention scores against keys rebuilt as rows @ W_k: keys (T, n_kv * D), bf16 (keys_bf16) or
 * float32, get the bias (n_kv * D, or NULL), the k-norm per head (weight (D), or NULL) and RoPE
 * at their positions (cos/sin (T, D), sin's first half negated, as model.py's tables); then
 * scores (n_kv, m, T) = q (n_kv, m, D) . key * sm_scale. Each key row is read once. */
void rope_scores(const void *keys, int keys_bf16, const float *bias, const float *norm, float eps,
                 const float *cos, const float *sin, const float *q, int64_t T, int64_t n_kv,
                 int64_t m, int64_t D, float sm_scale, float *scores, int threads) {
    int64_t width = n_kv * D;
#pragma omp parallel num_threads(threads) if (T > 1)
    {
        float *k = malloc(width * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (keys_bf16) {
                const uint16_t *row = (const uint16_t *)keys + t * width;
                for (int64_t i = 0; i < width; i++) k[i] = from_bf16(row[i]);
            } else
                memcpy(k, (const float *)keys + t * width, width * sizeof(float));
            if (bias)
                for (int64_t i = 0; i < width; i++) k[i] += bias[i];
            const float *c = cos + t * D, *s = sin + t * D;
            if (D == 64)
                score_row(k, norm, eps, c, s, q, n_kv, m, 64, sm_scale, scores + t, T);
            else if (D == 128)
                score_row(k, norm, eps, c, s, q, n_kv, m, 128, sm_scale, scores + t, T);
            else
                score_row(k, norm, eps, c, s, q, n_kv, m, D, sm_scale, scores + t, T);
        }
        free(k);
    }
}
