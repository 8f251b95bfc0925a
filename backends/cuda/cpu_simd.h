/* What every C pass shares: the vector width, vector helpers and half-float reading. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* Floats in a vector: one register of the widest kind the build has (AVX-512 16, AVX2 8, NEON 4;
 * 8 elsewhere, which compilers split into what the CPU has). A vector wider than the registers
 * makes GCC move every lane through memory (seen on AVX2 with 16: 2.5x slower attention). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__ARM_NEON) && !defined(__AVX2__)
#define LANES 4
#else
#define LANES 8
#endif
typedef float lanes __attribute__((vector_size(LANES * sizeof(float))));

/* The sum of a vector's lanes, as a tree of additions, not a chain of LANES of them. */
static inline __attribute__((always_inline)) float lanes_sum(lanes v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return vaddvq_f32((float32x4_t)v);
#else
    float sum = 0.0f;
    for (int i = 0; i < LANES; i++) sum += v[i];
    return sum;
#endif
}

/* x in every lane (not {} + x, which costs an addition: -0.0 + 0.0 is not -0.0) */
static inline __attribute__((always_inline)) lanes splat(float x) {
    lanes v;
    for (int i = 0; i < LANES; i++) v[i] = x;
    return v;
}

/* a * b + c, fused where the CPU has the instruction (the build keeps -ffp-contract=off for the
 * passes that must round as the torch ops do) */
static inline __attribute__((always_inline)) lanes fma_lanes(lanes a, lanes b, lanes c) {
#if defined(__AVX512F__)
    return (lanes)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
    return (lanes)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return (lanes)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
    return a * b + c;
#endif
}

/* sum_i a[i] * b[i] for i < n: whole vectors when n allows (the head widths do). */
static inline float dot(const float *a, const float *b, int64_t n) {
    if (n % LANES) {
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
        return sum;
    }
    lanes sum = {0}, x, y;
    for (int64_t i = 0; i < n; i += LANES) {
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        sum += x * y;
    }
    return lanes_sum(sum);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* An IEEE half (the caches' scales and zero points) as a float: exact. */
static inline float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    uint32_t u = sign | (exponent == 31 ? 0x7f800000 | mantissa << 13
                                        : (exponent + 112) << 23 | mantissa << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* from_half where the CPU converts halves itself (x86's F16C, every arm64): the group-quantized
 * weights read one scale per 32 values, so the portable bit juggling would cost as much as the
 * products. */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    return from_half(h);
#endif
}
