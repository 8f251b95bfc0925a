/* Group-wise quantized weights (q4, q8: backends/qweights.py) times float32 activations on the
 * CPU, llama.cpp's way: each row of x is quantized per block of 32 values to int8 (absmax / 127,
 * rounded half to even), each weight block is multiplied with it in integers (u8 x s8 dot
 * products: AVX-512 VNNI's dpbusd, AVX2's maddubs, NEON's sdot) and the integer sum is scaled by
 * the weight group's scale times the x block's. A q4 weight's min multiplies the group's float
 * sum of x, which is exact.
 *
 * Weights, (n, k) row-major: q4 codes (n, k / 2), each block of 32 values in 16 bytes as GGUF's
 * Q4_0/Q4_1 hold them (byte i: value i in the low nibble, value i + 16 in the high one), so those
 * files load as they are; q8 codes (n, k) int8 in [-127, 127]; fp16 scales (and q4 mins) per
 * group of `group` values along each row, a multiple of 32. */
#include "cpu_simd.h"

#define BLOCK 32
#define TILE 4 /* weight rows per pass over a row of x: four independent sums, x loaded once */
#define PREFETCH_TILES 4
/* A feature of x beyond this many times its row's RMS is multiplied in float, as LLM.int8 splits
 * its outliers: in a block of 32 quantized by its absmax one such value leaves the other 31 a
 * handful of levels (the default model's perplexity: +1.08% with every row through this pass). */
#define OUTLIER_RMS 6.0f

/* Per architecture: `block` (32 int8 values), `partial` (their products' sums, a few lanes),
 * `sums` (float accumulators), and how to load, multiply and total them. */
#if defined(__AVX2__)
typedef __m256i block;
typedef __m256 sums;
static inline block load_block(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline block q4_block(const uint8_t *p) { /* 16 bytes -> 32 codes, 0..15 */
    __m128i b = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}
static inline __m256i dot_us(block a, block b) { /* a unsigned, b signed */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else /* pairs into int16: at most 2 x 127 x 127 (q8) or 2 x 15 x 127 (q4), no saturation */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}
/* q4: codes are unsigned. q8: both signed, so x's sign moves onto the weight. */
static inline __m256i q4_dot(block w, block x) { return dot_us(w, x); }
static inline __m256i q8_dot(block w, block x) {
    return dot_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
}
static inline sums sums_zero(void) { return _mm256_setzero_ps(); }
static inline sums add_scaled(sums acc, __m256i dots, float s) {
#if defined(__FMA__)
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(s), acc);
#else
    return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(s)));
#endif
}
static inline float sums_total(sums v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
typedef int8x16x2_t block;
typedef float32x4_t sums;
static inline block load_block(const int8_t *p) { return (block){{vld1q_s8(p), vld1q_s8(p + 16)}}; }
static inline block q4_block(const uint8_t *p) {
    uint8x16_t b = vld1q_u8(p);
    return (block){{vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))),
                    vreinterpretq_s8_u8(vshrq_n_u8(b, 4))}};
}
static inline int32x4_t dot16(int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdupq_n_s32(0), a, b);
#else
    int16x8_t low = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    return vpadalq_s16(vpaddlq_s16(low), vmull_high_s8(a, b));
#endif
}
/* NEON multiplies signed by signed: q4's codes (0..15) and q8's alike */
static inline int32x4_t q4_dot(block w, block x) {
    return vaddq_s32(dot16(w.val[0], x.val[0]), dot16(w.val[1], x.val[1]));
}
static inline int32x4_t q8_dot(block w, block x) { return q4_dot(w, x); }
static inline sums sums_zero(void) { return vdupq_n_f32(0.0f); }
static inline sums add_scaled(sums acc, int32x4_t dots, float s) {
    return vfmaq_n_f32(acc, vcvtq_f32_s32(dots), s);
}
static inline float sums_total(sums v) { return vaddvq_f32(v); }
#else
typedef struct {
    int8_t v[BLOCK];
} block;
typedef float sums;
static inline block load_block(const int8_t *p) {
    block b;
    memcpy(b.v, p, BLOCK);
    return b;
}
static inline block q4_block(const uint8_t *p) {
    block b;
    for (int i = 0; i < BLOCK / 2; i++) b.v[i] = p[i] & 15, b.v[i + BLOCK / 2] = p[i] >> 4;
    return b;
}
static inline int32_t q4_dot(block w, block x) {
    int32_t sum = 0;
    for (int i = 0; i < BLOCK; i++) sum += w.v[i] * x.v[i];
    return sum;
}
static inline int32_t q8_dot(block w, block x) { return q4_dot(w, x); }
static inline sums sums_zero(void) { return 0.0f; }
static inline sums add_scaled(sums acc, int32_t dots, float s) { return acc + (float)dots * s; }
static inline float sums_total(sums v) { return v; }
#endif

/* n halves as floats: 8 at a time where the CPU converts them (F16C), so the scales of a weight
 * row (one per 32 values) cost little beside its products. */
static inline void halves_to_floats(const uint16_t *h, int64_t n, float *out) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) out[i] = half_to_float(h[i]);
}

/* sum_i half(h[i]) * x[i]: a q4 row's mins times its groups' sums of x. */
static inline float half_dot(const uint16_t *h, const float *x, int64_t n) {
    float sum = 0.0f;
    int64_t i = 0;
#if defined(__F16C__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))),
                              _mm256_loadu_ps(x + i), acc);
    sum = sums_total(acc);
#endif
    for (; i < n; i++) sum += half_to_float(h[i]) * x[i];
    return sum;
}

/* x (m, k) -> int8 codes per block of 32 (m, k), the blocks' scales (m, k / 32) and, for q4's
 * mins, each group's float sum of x (m, k / group). */
static void quantize_blocks(const float *x, int64_t m, int64_t k, int64_t group, int8_t *codes,
                            float *scale, float *group_sum) {
    int64_t blocks = k / BLOCK;
    for (int64_t r = 0; r < m; r++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = x + r * k + b * BLOCK;
            float absmax = 0.0f, sum = 0.0f;
            /* vector lanes (-fopenmp-simd): a tree's rows are quantized per call, like a step's */
#pragma omp simd reduction(max : absmax) reduction(+ : sum)
            for (int i = 0; i < BLOCK; i++) { /* no fmaxf: a libm call per value, not inlined */
                float a = fabsf(v[i]);
                absmax = a > absmax ? a : absmax, sum += v[i];
            }
            float s = absmax / 127, divisor = s > 0.0f ? s : 1.0f; /* an all-zero block: codes 0 */
#pragma omp simd
            for (int i = 0; i < BLOCK; i++) codes[r * k + b * BLOCK + i] = (int8_t)nearbyintf(v[i] / divisor);
            scale[r * blocks + b] = s;
            if (group_sum) {
                int64_t g = r * (k / group) + b * BLOCK / group;
                group_sum[g] = (b * BLOCK % group ? group_sum[g] : 0.0f) + sum;
            }
        }
}

/* XROWS rows of x (from row r0 of xq, xs) against a tile of TILE weight rows: dots[r][t] = sum
 * over blocks of (block product) * d[t][b] * xs[r][b], where d holds each weight row's scale per
 * block. Each weight block is unpacked once for all the rows, and each (row, weight row) sum
 * runs the same operations in the same order whatever the other rows: a row's result is the
 * same alone (a decode step) and in a drafter's tree. */
#if defined(__AVX2__) && !defined(__AVX512F__)
#define XROWS 2 /* sixteen vector registers: 2 x TILE sums beside the blocks */
#define ROW_COUNTS(f, bits) switch (xrows) { case 1: f(bits, 1); break; default: f(bits, 2); }
#else
#define XROWS 4
#define ROW_COUNTS(f, bits)                                                                      \
    switch (xrows) {                                                                             \
    case 1: f(bits, 1); break;                                                                   \
    case 2: f(bits, 2); break;                                                                   \
    case 3: f(bits, 3); break;                                                                   \
    default: f(bits, 4);                                                                         \
    }
#endif
static inline __attribute__((always_inline)) void tile_dots(const void *const *w, int bits,
                                                            const float *const *d, int xrows,
                                                            const int8_t *xq, const float *xs,
                                                            int64_t blocks, int64_t ahead,
                                                            float dots[][TILE]) {
    sums acc[XROWS][TILE];
    for (int r = 0; r < xrows; r++)
        for (int t = 0; t < TILE; t++) acc[r][t] = sums_zero();
    for (int64_t b = 0; b < blocks; b++) {
        block x[XROWS];
        for (int r = 0; r < xrows; r++) x[r] = load_block(xq + (r * blocks + b) * BLOCK);
        for (int t = 0; t < TILE; t++) {
            __builtin_prefetch((const uint8_t *)w[t] + b * 4 * bits + ahead);
            block wb = bits == 4 ? q4_block((const uint8_t *)w[t] + b * 16)
                                 : load_block((const int8_t *)w[t] + b * 32);
            for (int r = 0; r < xrows; r++) {
                float s = d[t][b] * xs[r * blocks + b];
                acc[r][t] = add_scaled(acc[r][t], bits == 4 ? q4_dot(wb, x[r]) : q8_dot(wb, x[r]), s);
            }
        }
    }
    for (int r = 0; r < xrows; r++)
        for (int t = 0; t < TILE; t++) dots[r][t] = sums_total(acc[r][t]);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* AVX-512 VNNI: two blocks per 512-bit product, half the instructions of a block at a time
 * (the default model's products: 2.2x the time of reading their weights before). x is laid out
 * once per call as the weight's bytes are: a q4 pair's 32 bytes widen to its low nibbles (both
 * blocks' values 0..15) then its high ones (values 16..31); a q8 pair is its 64 values in order.
 * Lane j of the product sums values 4j..4j+3 of that layout, so each lane belongs to one block:
 * q4's lanes alternate blocks every 4, q8's every 8. q8's codes are made unsigned (+128, for
 * dpbusd's u8 x s8), and 128 times x's lane sums start each product negated. */
#define PAIRS 1
typedef struct {
    int8_t *x;     /* (m, blocks * 32) in the weight's layout */
    float *scale;  /* (m, pairs, 16): each lane's x block scale */
    int32_t *base; /* (m, pairs, 16): q8's -128 * lane sums of x; zeros for q4 */
    __m512i lane_block; /* which of the pair's two blocks each lane belongs to */
} pair_input;

static pair_input pair_layout(const int8_t *xq, const float *xs, int64_t m, int64_t k, int bits) {
    int64_t blocks = k / BLOCK, pairs = blocks / 2;
    pair_input in = {malloc(m * k), malloc(m * pairs * 16 * sizeof(float)),
                     calloc(m * pairs * 16, sizeof(int32_t))};
    int lane_block[16];
    for (int j = 0; j < 16; j++) lane_block[j] = bits == 4 ? (j / 4) % 2 : j / 8;
    in.lane_block = _mm512_loadu_si512(lane_block);
    for (int64_t r = 0; r < m; r++)
        for (int64_t p = 0; p < pairs; p++) {
            const int8_t *a = xq + r * k + p * 64, *b = a + 32;
            int8_t *out = in.x + r * k + p * 64;
            if (bits == 4) {
                memcpy(out, a, 16), memcpy(out + 16, b, 16);
                memcpy(out + 32, a + 16, 16), memcpy(out + 48, b + 16, 16);
            } else
                memcpy(out, a, 64);
            for (int j = 0; j < 16; j++) {
                in.scale[(r * pairs + p) * 16 + j] = xs[r * blocks + 2 * p + lane_block[j]];
                if (bits == 8)
                    in.base[(r * pairs + p) * 16 + j] =
                        -128 * (out[4 * j] + out[4 * j + 1] + out[4 * j + 2] + out[4 * j + 3]);
            }
        }
    return in;
}

/* pair_input's rows r0 to r0 + xrows against a tile of TILE weight rows, as tile_dots. */
static inline __attribute__((always_inline)) void pair_dots(const void *const *w, int bits,
                                                            const float *const *d, int xrows,
                                                            const pair_input *in, int64_t r0,
                                                            int64_t blocks, int64_t ahead,
                                                            float dots[][TILE]) {
    int64_t pairs = blocks / 2;
    const int8_t *x = in->x + r0 * blocks * BLOCK;
    const float *xs = in->scale + r0 * pairs * 16;
    const int32_t *base = in->base + r0 * pairs * 16;
    const __m512i low = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    /* per 16-bit element: shift the low 256 bits by 0 (low nibbles), the high by 4 */
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512 acc[XROWS][TILE];
    for (int r = 0; r < xrows; r++)
        for (int t = 0; t < TILE; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        for (int t = 0; t < TILE; t++) {
            __builtin_prefetch((const uint8_t *)w[t] + p * 8 * bits + ahead);
            __m512i codes;
            if (bits == 4) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)((const uint8_t *)w[t] + p * 32));
                codes = _mm512_inserti64x4(_mm512_castsi256_si512(packed), packed, 1);
                codes = _mm512_and_si512(_mm512_srlv_epi16(codes, shifts), low);
            } else
                codes = _mm512_xor_si512(_mm512_loadu_si512((const int8_t *)w[t] + p * 64), flip);
            __m128 pair_scale = _mm_castpd_ps(_mm_load_sd((const double *)(d[t] + 2 * p)));
            __m512 scale = _mm512_permutexvar_ps(in->lane_block, _mm512_castps128_ps512(pair_scale));
            for (int r = 0; r < xrows; r++) {
                int64_t at = r * pairs + p;
                __m512i products = _mm512_dpbusd_epi32(_mm512_loadu_si512(base + at * 16), codes,
                                                       _mm512_loadu_si512(x + at * 64));
                __m512 both = _mm512_mul_ps(scale, _mm512_loadu_ps(xs + at * 16));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(products), both, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < xrows; r++)
        for (int t = 0; t < TILE; t++) dots[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}
#endif

/* y (m, n) = x (m, k) · Wᵀ + bias for a q4 (bits 4, with mins) or q8 (bits 8, mins NULL)
 * weight; x, y and bias (or NULL) float32. Outputs are split over the threads in tiles of TILE
 * weight rows, each tile read once and unpacked once per XROWS rows of x. */
void q_linear(const float *x, int64_t m, int64_t k, int bits, const void *codes,
              const uint16_t *scale, const uint16_t *min, int64_t group, const float *bias,
              int64_t n, float *y, int threads) {
    int64_t blocks = k / BLOCK, groups = k / group, row_bytes = bits == 4 ? k / 2 : k;
    int8_t *xq = malloc(m * k);
    float *xs = malloc(m * blocks * sizeof(float));
    float *xsum = min ? malloc(m * groups * sizeof(float)) : NULL;
    /* each row's outliers, taken out of that row before it is quantized, multiplied in float;
     * the weights of any row's outlier columns are read once per tile. A row's other values stay
     * in its quantized part whatever the other rows hold, so a row gives the same result alone
     * (a decode step) as in a drafter's tree: speculation stays lossless. */
    int64_t *columns = malloc(k * sizeof(int64_t)), n_columns = 0;
    uint8_t *outlier = calloc(m * k, 1), *any = calloc(k, 1);
    for (int64_t r = 0; r < m; r++) {
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < k; i++) squares += x[r * k + i] * x[r * k + i];
        float limit = OUTLIER_RMS * sqrtf(squares / k);
#pragma omp simd
        for (int64_t i = 0; i < k; i++) {
            outlier[r * k + i] = fabsf(x[r * k + i]) > limit;
            any[i] |= outlier[r * k + i];
        }
    }
    for (int64_t i = 0; i < k; i++)
        if (any[i]) columns[n_columns++] = i;
    float *kept = NULL, *outliers = malloc((m * n_columns + 1) * sizeof(float));
    if (n_columns) {
        kept = malloc(m * k * sizeof(float));
        memcpy(kept, x, m * k * sizeof(float));
        for (int64_t r = 0; r < m; r++)
            for (int64_t c = 0; c < n_columns; c++) {
                int64_t i = r * k + columns[c];
                outliers[r * n_columns + c] = outlier[i] ? x[i] : 0.0f;
                if (outlier[i]) kept[i] = 0.0f;
            }
    }
    quantize_blocks(kept ? kept : x, m, k, group, xq, xs, xsum);
#ifdef PAIRS
    int pairs = blocks % 2 == 0; /* else one block at a time */
    pair_input in = pairs ? pair_layout(xq, xs, m, k, bits) : (pair_input){0};
#endif
    int64_t tiles = (n + TILE - 1) / TILE;
    /* a tile's rows are read a block of each at a time, and a short row (the default model's:
     * 288 bytes) ends before the CPU's prefetcher has learnt the four streams: the rows of the
     * tile PREFETCH_TILES on are fetched as these are read */
    int64_t ahead = PREFETCH_TILES * TILE * row_bytes;
#pragma omp parallel num_threads(threads)
    {
        float *d_all = malloc(TILE * blocks * sizeof(float)), *d[TILE];
        float *w_out = malloc((TILE * n_columns + 1) * sizeof(float)); /* outlier weights */
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; tile++) {
            int64_t j0 = tile * TILE;
            int rows = n - j0 < TILE ? (int)(n - j0) : TILE;
            const void *w[TILE];
            for (int t = 0; t < rows; t++) {
                w[t] = (const uint8_t *)codes + (j0 + t) * row_bytes;
                d[t] = d_all + t * blocks;
                halves_to_floats(scale + (j0 + t) * groups, groups, d[t]);
                for (int64_t c = 0; c < n_columns; c++) { /* the weights of outlier columns */
                    int64_t i = columns[c], g = (j0 + t) * groups + i / group;
                    const uint8_t *row = w[t];
                    int code = bits == 8 ? (int8_t)row[i]
                                         : (row[i / BLOCK * 16 + i % 16] >> (i % BLOCK < 16 ? 0 : 4)) & 15;
                    w_out[t * n_columns + c] = code * d[t][i / group] + (min ? half_to_float(min[g]) : 0.0f);
                }
                for (int64_t b = blocks - 1; group > BLOCK && b >= 0; b--) /* one per block */
                    d[t][b] = d[t][b * BLOCK / group];
            }
            for (int t = rows; t < TILE; t++) /* a last, partial tile: its rows again, unused */
                w[t] = w[0], d[t] = d[0];
            const float *const *ds = (const float *const *)d;
            for (int64_t r0 = 0; r0 < m; r0 += XROWS) {
                int xrows = m - r0 < XROWS ? (int)(m - r0) : XROWS;
                float dots[XROWS][TILE];
                /* constant bits and row counts: no branch in the loops, the sums in registers */
#define PAIR(bits, xrows) pair_dots(w, bits, ds, xrows, &in, r0, blocks, ahead, dots)
#define BLOCKS(bits, xrows) tile_dots(w, bits, ds, xrows, xq + r0 * k, xs + r0 * blocks, blocks, ahead, dots)
#ifdef PAIRS
                if (pairs && bits == 4) ROW_COUNTS(PAIR, 4)
                else if (pairs) ROW_COUNTS(PAIR, 8)
                else
#endif
                if (bits == 4) ROW_COUNTS(BLOCKS, 4)
                else ROW_COUNTS(BLOCKS, 8)
                for (int r = 0; r < xrows; r++)
                    for (int t = 0; t < rows; t++) {
                        int64_t i = r0 + r, j = j0 + t;
                        float out = dots[r][t];
                        if (min) out += half_dot(min + j * groups, xsum + i * groups, groups);
                        for (int64_t c = 0; c < n_columns; c++)
                            out += outliers[i * n_columns + c] * w_out[t * n_columns + c];
                        y[i * n + j] = bias ? out + bias[j] : out;
                    }
            }
        }
        free(d_all), free(w_out);
    }
    free(xq), free(xs), free(xsum), free(columns), free(outlier), free(any), free(kept), free(outliers);
#ifdef PAIRS
    free(in.x), free(in.scale), free(in.base);
#endif
}

/* One block's 32 values, codes * s + z, into `out`: float32, or bf16 rounded to nearest even
 * (the prompt's products then run in bf16 where the CPU multiplies bf16 fast). Plain loops over
 * whole blocks, which the compiler vectorizes. */
static inline void block_values(const uint8_t *c, int bits, float s, float z, int bf16, void *out) {
    float v[BLOCK];
    if (bits == 4)
        for (int i = 0; i < BLOCK / 2; i++) v[i] = (c[i] & 15) * s + z, v[i + 16] = (c[i] >> 4) * s + z;
    else
        for (int i = 0; i < BLOCK; i++) v[i] = (int8_t)c[i] * s;
    if (!bf16) {
        memcpy(out, v, sizeof v);
        return;
    }
    uint16_t *o = out;
    for (int i = 0; i < BLOCK; i++) {
        uint32_t u;
        memcpy(&u, &v[i], 4);
        o[i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}

/* The values of weight rows [first, first + rows), float32 or bf16 (rows, k): the prompt's
 * chunks multiply them with the CPU's fast matrix product, a slice of rows at a time. */
void q_dequantize(const void *codes, int bits, const uint16_t *scale, const uint16_t *min,
                  int64_t group, int64_t k, int64_t first, int64_t rows, int bf16, void *out,
                  int threads) {
    int64_t groups = k / group, row_bytes = bits == 4 ? k / 2 : k, size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        int64_t j = first + r;
        const uint8_t *c = (const uint8_t *)codes + j * row_bytes;
        for (int64_t g = 0; g < groups; g++) {
            float s = half_to_float(scale[j * groups + g]);
            float z = min ? half_to_float(min[j * groups + g]) : 0.0f;
            for (int64_t b = g * group / BLOCK; b < (g + 1) * group / BLOCK; b++)
                block_values(c + b * BLOCK * bits / 8, bits, s, z, bf16,
                             (char *)out + (r * k + b * BLOCK) * size);
        }
    }
}
