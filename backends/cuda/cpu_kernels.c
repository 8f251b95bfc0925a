/* XQuant's decode passes and LLM.int8()'s product on the CPU, fused: what the Triton kernels
 * (kernels.py) do on CUDA. In eager PyTorch each step below is a separate op that reads and
 * writes every cached token's row (or the activations) again; here each row is read once.
 * Built at first use by cpu_kernels.py (-O3 -march=native; -ffp-contract=off, so `dequantize`
 * and the integer part of `int8_linear` round exactly as the torch ops do and the tests can
 * compare them bit for bit). With -fopenmp the passes split their blocks or tokens
 * over PyTorch's thread count (`threads`), in the OpenMP runtime PyTorch has loaded where it is
 * the same libgomp.so.1; without OpenMP they run on one thread. */
#include "cpu_simd.h"

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
 * block, scale and zero (fp16, as the caches hold them) have one value per column of the
 * block's `inner`-wide rows (columns = 1), or one per `inner` consecutive values. */
void dequantize(const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,
                int64_t n_blocks, int64_t n, int bits, int64_t inner, int columns, int accumulate,
                float *out, int threads) {
    int64_t packed_bytes = n * bits / 8, n_scales = columns ? inner : n / inner;
#pragma omp parallel num_threads(threads) if (n_blocks > 1)
    {
        uint8_t *code = malloc(n);
        float *s = malloc(2 * n_scales * sizeof(float)), *z = s + n_scales;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_blocks; b++) {
            unpack(codes + b * packed_bytes, n, bits, code);
            for (int64_t i = 0; i < n_scales; i++) {
                s[i] = from_half(scale[b * n_scales + i]);
                z[i] = from_half(zero[b * n_scales + i]);
            }
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
        free(code), free(s);
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
        for (int64_t r = 0; r < m; r++)
            scores[(h * m + r) * T] = dot(q + (h * m + r) * D, rotated, D) * sm_scale;
    }
}

/* Rebuilt key rows (T, width) as the caller hands them over: float32, bf16, or the int32
 * products of int8 codes, whose scales are applied as the row is read (int8.py's int8_product,
 * in its order: int32 -> float, times the column's scale, times the row's). */
enum { KEYS_FLOAT32, KEYS_BF16, KEYS_INT32 };
typedef struct {
    const void *rows;
    int kind;
    const float *row_scale, *column_scale; /* KEYS_INT32: (T) and (width) */
} key_rows;

/* Key row t as float32 in `out`. */
static inline void load_key_row(key_rows keys, int64_t t, int64_t width, float *out) {
    if (keys.kind == KEYS_INT32) {
        const int32_t *row = (const int32_t *)keys.rows + t * width;
        float row_scale = keys.row_scale[t];
        for (int64_t i = 0; i < width; i++)
            out[i] = (float)row[i] * keys.column_scale[i] * row_scale;
    } else if (keys.kind == KEYS_BF16) {
        const uint16_t *row = (const uint16_t *)keys.rows + t * width;
        for (int64_t i = 0; i < width; i++) out[i] = from_bf16(row[i]);
    } else
        memcpy(out, (const float *)keys.rows + t * width, width * sizeof(float));
}

/* Key row t (bias, k-norm, RoPE at position t) against the queries: its n_kv * m scores, written
 * `stride` apart; k is a row of scratch. */
static inline void key_scores(key_rows keys, const float *bias, const float *norm, float eps,
                              const float *cos, const float *sin, const float *q, int64_t t,
                              int64_t n_kv, int64_t m, int64_t D, float sm_scale, float *k,
                              float *scores, int64_t stride) {
    int64_t width = n_kv * D;
    load_key_row(keys, t, width, k);
    if (bias)
        for (int64_t i = 0; i < width; i++) k[i] += bias[i];
    const float *c = cos + t * D, *s = sin + t * D;
    if (D == 64)
        score_row(k, norm, eps, c, s, q, n_kv, m, 64, sm_scale, scores, stride);
    else if (D == 128)
        score_row(k, norm, eps, c, s, q, n_kv, m, 128, sm_scale, scores, stride);
    else
        score_row(k, norm, eps, c, s, q, n_kv, m, D, sm_scale, scores, stride);
}

/* Attention scores against keys rebuilt as rows @ W_k: keys (T, n_kv * D; float32, bf16 or
 * int32 with their scales, as key_rows takes them) get the bias (n_kv * D, or NULL), the k-norm
 * per head (weight (D), or NULL) and RoPE at their positions (cos/sin (T, D), sin's first half
 * negated, as model.py's tables); then scores (n_kv, m, T) = q (n_kv, m, D) . key * sm_scale.
 * Each key row is read once. */
void rope_scores(const void *keys, int keys_kind, const float *key_row_scale,
                 const float *key_column_scale, const float *bias, const float *norm, float eps,
                 const float *cos, const float *sin, const float *q, int64_t T, int64_t n_kv,
                 int64_t m, int64_t D, float sm_scale, float *scores, int threads) {
    int64_t width = n_kv * D;
    key_rows rebuilt = {keys, keys_kind, key_row_scale, key_column_scale};
#pragma omp parallel num_threads(threads) if (T > 1)
    {
        float *k = malloc(width * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            key_scores(rebuilt, bias, norm, eps, cos, sin, q, t, n_kv, m, D, sm_scale,
                       k, scores + t, T);
        }
        free(k);
    }
}

#define ATTEND_CHUNK 256 /* cached tokens per part: parts run on separate threads */
#define ATTEND_PARALLEL 4096 /* query rows x cached tokens from which attend_bf16 uses threads */

/* e^x for x <= 0 (softmax after its maximum), within 2.6e-7 relative over every float in
 * [-87, 0]: e^x = 2^n · e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial. Unlike libm's
 * expf it vectorizes. n is rounded by adding and taking away 1.5 · 2^23, where a float's
 * spacing is 1. */
static inline float exp_nonpositive(float x) {
    x = x > -87.0f ? x : -87.0f; /* not fmaxf: a libm call here, where this loop must vectorize */
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float e = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return e * scale;
}

/* Each of `rows` rows of n scores (ATTEND_CHUNK apart) -> e^(score - the row's maximum), with
 * that maximum (top) and the sum (total) per row. The sum runs in LANES fixed lanes, the row
 * padded with zeros to whole vectors: the same bits whatever n is, so a drafter's tree row (its
 * part longer by masked tokens, which weigh 0) sums as the same row alone does. */
static inline void exp_part(float *p, int64_t rows, int64_t n, float *top, float *total) {
    int64_t padded = (n + LANES - 1) / LANES * LANES; /* within the row's ATTEND_CHUNK slots */
    for (int64_t r = 0; r < rows; r++) {
        float *pr = p + r * ATTEND_CHUNK, best = -INFINITY;
#pragma omp simd reduction(max : best)
        for (int64_t t = 0; t < n; t++) best = pr[t] > best ? pr[t] : best;
        if (best == -INFINITY) { /* the row sees none of these tokens: weights 0, no NaN */
            memset(pr, 0, n * sizeof(float));
            top[r] = best, total[r] = 0.0f;
            continue;
        }
#pragma omp simd
        for (int64_t t = 0; t < n; t++) pr[t] = exp_nonpositive(pr[t] - best);
        for (int64_t t = n; t < padded; t++) pr[t] = 0.0f;
        lanes sum = {0}, x;
        for (int64_t t = 0; t < padded; t += LANES) {
            memcpy(&x, pr + t, sizeof x);
            sum += x;
        }
        top[r] = best, total[r] = lanes_sum(sum);
    }
}

/* Parts' weighted sums (`mixed`, W wide), maxima and sums -> the normalised rows out (n_rows, W)
 * and, unless lse is NULL, each row's log-sum-exp of its scores. Part c of row r is at
 * (r / group) * chunks * group + c * group + r % group. */
static void merge_parts(int64_t n_rows, int64_t group, int64_t chunks, int64_t W,
                        const float *mixed, const float *top, const float *total, float *out,
                        float *lse) {
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t first = (r / group) * chunks * group + r % group;
        float best = -INFINITY, sum = 0.0f, *y = out + r * W;
        for (int64_t c = 0; c < chunks; c++) best = fmaxf(best, top[first + c * group]);
        for (int64_t i = 0; i < W; i++) y[i] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) {
            int64_t at = first + c * group;
            float scale = exp_nonpositive(top[at] - best);
            sum += total[at] * scale;
            for (int64_t i = 0; i < W; i++) y[i] += mixed[at * W + i] * scale;
        }
        for (int64_t i = 0; i < W; i++) y[i] /= sum;
        if (lse) lse[r] = best + logf(sum);
    }
}

/* weighted_sum's tile: TILE_ROWS x TILE_VECTORS vectors of sums, held in registers, enough
 * independent additions to hide their latency. Rows are padded to whole tiles: 3 fits the
 * 3 x 3 and 9 x 1 query rows of the default model's GQA and MHA forms. */
#define TILE_ROWS 3
#define TILE_VECTORS 4
#define TILE_COLUMNS (TILE_VECTORS * LANES)

/* LANES values from `values` (float32, or bf16 when `bf16`) at index `at`, as float32. */
static inline lanes load_lanes(const void *values, int bf16, int64_t at) {
    lanes x;
    if (bf16) {
        typedef uint16_t halves __attribute__((vector_size(LANES * sizeof(uint16_t))));
        typedef uint32_t words __attribute__((vector_size(LANES * sizeof(uint32_t))));
        halves h;
        memcpy(&h, (const uint16_t *)values + at, sizeof h);
        words w = __builtin_convertvector(h, words) << 16;
        memcpy(&x, &w, sizeof x);
    } else
        memcpy(&x, (const float *)values + at, sizeof x);
    return x;
}

static inline float load_one(const void *values, int bf16, int64_t at) {
    return bf16 ? from_bf16(((const uint16_t *)values)[at]) : ((const float *)values)[at];
}

/* out (rows, W) = p (rows, n; rows ATTEND_CHUNK apart, zero-padded to whole tiles of rows) ·
 * values (n, W; float32, or bf16 when `bf16`). A tile of sums stays in registers while the
 * tokens stream past: each value is loaded once per tile and each sum stored once. */
static void weighted_sum(const float *p, int64_t rows, int64_t n, const void *values, int bf16,
                         int64_t W, float *out) {
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const float *pr = p + r0 * ATTEND_CHUNK;
        int64_t j = 0;
        for (; j + TILE_COLUMNS <= W; j += TILE_COLUMNS) {
            lanes acc[TILE_ROWS][TILE_VECTORS] = {{{0}}};
            for (int64_t t = 0; t < n; t++)
                for (int i = 0; i < TILE_VECTORS; i++) {
                    lanes v = load_lanes(values, bf16, t * W + j + i * LANES);
                    for (int r = 0; r < TILE_ROWS; r++)
                        acc[r][i] = fma_lanes(splat(pr[r * ATTEND_CHUNK + t]), v, acc[r][i]);
                }
            for (int r = 0; r < TILE_ROWS && r0 + r < rows; r++)
                memcpy(out + (r0 + r) * W + j, acc[r], sizeof acc[r]);
        }
        for (; j < W; j++) /* the columns left over */
            for (int64_t r = r0; r < rows && r < r0 + TILE_ROWS; r++) {
                float sum = 0.0f;
                for (int64_t t = 0; t < n; t++)
                    sum += p[r * ATTEND_CHUNK + t] * load_one(values, bf16, t * W + j);
                out[r * W + j] = sum;
            }
    }
}

#define KEY_TILE LANES /* keys a tree's rows score at once: one vector */

/* Scores of `rows` query rows (D wide) against n bf16 keys, written ATTEND_CHUNK apart. The keys
 * go KEY_TILE at a time into a transposed float32 tile `kt` (D, KEY_TILE), so each query value
 * multiplies a vector of keys: no sum across a vector's lanes per score (a decode step's query
 * heads, 300 tokens: 27 us where a dot product per score took 35), and the rows of a drafter's
 * tree share the tile. */
static inline __attribute__((always_inline)) void tile_scores(const float *q, int64_t rows,
                                                              const uint16_t *k, int64_t n,
                                                              const int64_t D, float sm_scale,
                                                              float *kt, float *p) {
    for (int64_t t0 = 0; t0 < n; t0 += KEY_TILE) {
        int64_t width = n - t0 < KEY_TILE ? n - t0 : KEY_TILE;
        /* along the keys within each dimension: the loads gather, the stores are whole vectors
         * (along the dimensions, the scalar stores cost most of a decode step's attention) */
        if (width == KEY_TILE)
            for (int64_t d = 0; d < D; d++)
                for (int64_t j = 0; j < KEY_TILE; j++) kt[d * KEY_TILE + j] = from_bf16(k[(t0 + j) * D + d]);
        else
            for (int64_t d = 0; d < D; d++)
                for (int64_t j = 0; j < KEY_TILE; j++)
                    kt[d * KEY_TILE + j] = j < width ? from_bf16(k[(t0 + j) * D + d]) : 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            lanes acc[8] = {{0}}; /* eight independent chains: enough to keep both FMA units busy */
            for (int64_t d = 0; d < D; d += 8)
                for (int i = 0; i < 8; i++) {
                    lanes key;
                    memcpy(&key, kt + (d + i) * KEY_TILE, sizeof key);
                    acc[i] = fma_lanes(splat(q[r * D + d + i]), key, acc[i]);
                }
            lanes scores = (((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                            ((acc[4] + acc[5]) + (acc[6] + acc[7]))) * sm_scale;
            memcpy(p + r * ATTEND_CHUNK + t0, &scores, sizeof scores); /* within the row's room */
        }
    }
}

/* One part of attend_bf16: n cached tokens of one K/V head against its n_rep query heads' m new
 * rows each (rows r = rep * m + i), D a constant where inlined. The last rows of the cache are
 * the new rows' own: the part's token t is new row j = t - newest when t >= newest, seen by row i
 * where mask[i * m + j] (mask NULL: all). */
static inline __attribute__((always_inline)) void attend_part(
    const float *q, int64_t m, const uint8_t *mask, int64_t newest, const uint16_t *k,
    const uint16_t *v, int64_t n, int64_t n_rep, int64_t D, float sm_scale, float *scratch,
    float *p, float *top, float *total, float *o) {
    int64_t rows = n_rep * m;
    /* A decode step and a drafter's tree score alike, so a row's scores are the same bits alone
     * and among others: the q4/q8 pass quantizes what attention gives, and a last-bit difference
     * on a rounding edge there changed greedy speculation's tokens. */
    if (D % 8) /* heads of odd widths: each score one dot product */
        for (int64_t t = 0; t < n; t++) {
            for (int64_t i = 0; i < D; i++) scratch[i] = from_bf16(k[t * D + i]);
            for (int64_t r = 0; r < rows; r++)
                p[r * ATTEND_CHUNK + t] = dot(q + r * D, scratch, D) * sm_scale;
        }
    else
        tile_scores(q, rows, k, n, D, sm_scale, scratch, p);
    if (mask)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t t = newest > 0 ? newest : 0; t < n; t++)
                if (!mask[(r % m) * m + t - newest]) p[r * ATTEND_CHUNK + t] = -INFINITY;
    exp_part(p, rows, n, top, total);
    weighted_sum(p, rows, n, v, 1, D, o);
}

/* Attention of the newest m rows (a decode step, or a drafter's tree) on an
 * exact bf16 K/V cache: out (H, m, D) = softmax(q · Kᵀ · sm_scale) · V, q float32 (H, m, D),
 * keys and values (H_kv, stride, D) bf16 with the first T rows cached, the last m of them the
 * new rows' own. Every new row sees the T - m rows before them, and of the newest m those its
 * mask row allows (mask (m, m) bytes, or NULL: all). The cache is read once, as bf16, instead of
 * copied to float32 for PyTorch's attention; the H / H_kv query heads of a group share each read.
 * Parts of ATTEND_CHUNK tokens keep their own maxima and sums and are merged at the end. */
void attend_bf16(const float *q, int64_t m, const uint8_t *mask, const uint16_t *keys,
                 const uint16_t *values, int64_t T, int64_t stride, int64_t n_heads, int64_t n_kv,
                 int64_t D, float sm_scale, float *out, int threads) {
    int64_t n_rep = n_heads / n_kv, rows = n_rep * m, chunks = (T + ATTEND_CHUNK - 1) / ATTEND_CHUNK;
    int64_t parts = n_kv * chunks, padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    float *top = malloc(parts * rows * sizeof(float)), *total = malloc(parts * rows * sizeof(float));
    float *mixed = malloc(parts * rows * D * sizeof(float)); /* (n_kv, chunks, rows, D) */
    /* threads only where the work outweighs waking them (~10 us): a decode step of 9 query heads
     * on 300 tokens took 53 us on two threads, 45 on one */
#pragma omp parallel num_threads(threads) if (parts > 1 && n_heads * m * T >= ATTEND_PARALLEL)
    {
        /* a key row, or a tree's transposed tile of keys; the scores, padded to whole tiles */
        float *scratch = malloc(D * KEY_TILE * sizeof(float));
        float *p = calloc(padded * ATTEND_CHUNK, sizeof(float));
#pragma omp for schedule(static)
        for (int64_t part = 0; part < parts; part++) {
            int64_t h = part / chunks, first = (part % chunks) * ATTEND_CHUNK;
            int64_t n = T - first < ATTEND_CHUNK ? T - first : ATTEND_CHUNK, newest = T - m - first;
            const uint16_t *k = keys + (h * stride + first) * D, *v = values + (h * stride + first) * D;
            const float *qh = q + h * rows * D;
            float *mx = top + part * rows, *l = total + part * rows, *o = mixed + part * rows * D;
            if (D == 64)
                attend_part(qh, m, mask, newest, k, v, n, n_rep, 64, sm_scale, scratch, p, mx, l, o);
            else if (D == 128)
                attend_part(qh, m, mask, newest, k, v, n, n_rep, 128, sm_scale, scratch, p, mx, l, o);
            else
                attend_part(qh, m, mask, newest, k, v, n, n_rep, D, sm_scale, scratch, p, mx, l, o);
        }
        free(scratch), free(p);
    }
    merge_parts(n_heads * m, rows, chunks, D, mixed, top, total, out, NULL);
    free(top), free(total), free(mixed);
}

/* XQuant's decode attention, fused: one token's queries q (n_kv, m, D) against keys
 * (T, n_kv * D) rebuilt from the cache, as rope_scores scores them; the softmax; its weighted
 * sum of the cached rows `values` (T, W) that every head shares (X, or the V latent; float32);
 * and that sum projected by its head's block of the value projection, value_heads (n_kv, W, D)
 * -> out (n_kv * m, D), and each row's log-sum-exp (lse), by which the caller merges spans.
 * Keys as key_rows takes them. Each row is read once; parts of ATTEND_CHUNK tokens run on the
 * threads and are merged at the end. */
void rope_attend(const void *keys, int keys_kind, const float *key_row_scale,
                 const float *key_column_scale, const float *bias, const float *norm, float eps,
                 const float *cos, const float *sin, const float *q, const float *values,
                 int64_t T, int64_t n_kv, int64_t m, int64_t D, int64_t W, const float *value_heads,
                 float sm_scale, float *out, float *lse, int threads) {
    int64_t rows = n_kv * m, chunks = (T + ATTEND_CHUNK - 1) / ATTEND_CHUNK;
    key_rows rebuilt = {keys, keys_kind, key_row_scale, key_column_scale};
    int64_t padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    float *top = malloc(chunks * rows * sizeof(float)), *total = malloc(chunks * rows * sizeof(float));
    float *mixed = malloc(chunks * rows * W * sizeof(float)); /* (chunks, rows, W) */
#pragma omp parallel num_threads(threads) if (chunks > 1)
    {
        float *k = malloc(n_kv * D * sizeof(float));
        float *p = calloc(padded * ATTEND_CHUNK, sizeof(float)); /* scores, whole tiles of rows */
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t first = c * ATTEND_CHUNK, n = T - first < ATTEND_CHUNK ? T - first : ATTEND_CHUNK;
            for (int64_t t = 0; t < n; t++)
                key_scores(rebuilt, bias, norm, eps, cos, sin, q, first + t, n_kv, m, D,
                           sm_scale, k, p + t, ATTEND_CHUNK);
            exp_part(p, rows, n, top + c * rows, total + c * rows);
            weighted_sum(p, rows, n, values + first * W, 0, W, mixed + c * rows * W);
        }
        free(k), free(p);
    }
    float *merged = malloc(rows * W * sizeof(float));
    merge_parts(rows, rows, chunks, W, mixed, top, total, merged, lse);
    for (int64_t r = 0; r < rows; r++) { /* a few rows: the projection costs next to nothing */
        const float *heads = value_heads + (r / m) * W * D, *x = merged + r * W;
        float *y = out + r * D;
        for (int64_t d = 0; d < D; d++) y[d] = 0.0f;
        for (int64_t w = 0; w < W; w++)
            for (int64_t d = 0; d < D; d++) y[d] += x[w] * heads[w * D + d];
    }
    free(top), free(total), free(mixed), free(merged);
}

/* x (rows, k) -> int8 codes, x / scale rounded half to even, and each row's scale, its absmax
 * (at least 1e-12) / 127: int8.py's quantize_rows in one pass over each row. */
void quantize_rows(const float *x, int64_t rows, int64_t k, int8_t *codes, float *scale,
                   int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 64)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * k;
        float absmax = 0.0f;
#pragma omp simd reduction(max : absmax)
        for (int64_t i = 0; i < k; i++) {
            float a = fabsf(xr[i]);
            absmax = a > absmax ? a : absmax;
        }
        float s = (absmax > 1e-12f ? absmax : 1e-12f) / 127;
        for (int64_t i = 0; i < k; i++) codes[r * k + i] = (int8_t)nearbyintf(xr[i] / s);
        scale[r] = s;
    }
}

#define INT8_ROWS 16 /* int8_linear's most rows of x: cpu_kernels.py INT8_ROWS */

/* dots[r] = sum_i codes[r * k + i] * w[i] for rows r < m, and *sum = sum_i w[i]. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
/* `rows` (1 to 4, a constant where inlined, so the accumulators stay in registers) rows at once:
 * each 64 bytes of the weight row are loaded once into the u8 x s8 dot product instruction
 * (VNNI); the row sum comes from the same instruction against ones. */
static inline __attribute__((always_inline)) void dot_tile(const uint8_t *codes, int64_t k,
                                                           const int8_t *w, int rows,
                                                           int32_t *dots, int32_t *sum) {
    __m512i acc[4] = {0}, total = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
    for (int64_t i = 0; i < k; i += 64) {
        __mmask64 in = k - i >= 64 ? ~0ULL : _bzhi_u64(~0ULL, k - i);
        __m512i wv = _mm512_maskz_loadu_epi8(in, w + i);
        if (sum) total = _mm512_dpbusd_epi32(total, ones, wv);
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_maskz_loadu_epi8(in, codes + r * k + i),
                                         wv);
    }
    for (int r = 0; r < rows; r++) dots[r] = _mm512_reduce_add_epi32(acc[r]);
    if (sum) *sum = _mm512_reduce_add_epi32(total);
}

static void dot_rows(const uint8_t *codes, int64_t m, int64_t k, const int8_t *w, int32_t *dots,
                     int32_t *sum) {
    for (int64_t r = 0; r < m; r += 4) {
        int32_t *first = r == 0 ? sum : NULL;
        switch (m - r) {
            case 1: dot_tile(codes + r * k, k, w, 1, dots + r, first); break;
            case 2: dot_tile(codes + r * k, k, w, 2, dots + r, first); break;
            case 3: dot_tile(codes + r * k, k, w, 3, dots + r, first); break;
            default: dot_tile(codes + r * k, k, w, 4, dots + r, first);
        }
    }
}
#elif defined(__AVX2__)
/* AVX2 has no u8 x s8 dot product into int32, only pairs into saturating int16 (maddubs): the
 * offset codes (up to 255) times a weight (up to 127), twice, would overflow it. So x's codes go
 * back to signed, their magnitude is the unsigned operand and their sign moves onto the weight
 * (at most 2 x 127 x 127, which fits), as llama.cpp's AVX2 dot products do; the offset is added
 * back through the row sum so callers see the same dots as the VNNI path's. */
static void dot_rows(const uint8_t *codes, int64_t m, int64_t k, const int8_t *w, int32_t *dots,
                     int32_t *sum) {
    const __m256i offset = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    int32_t total = 0;
    for (int64_t i = 0; i < k; i++) total += w[i];
    *sum = total;
    int64_t whole = k & ~(int64_t)31;
    for (int64_t r = 0; r < m; r++) {
        const uint8_t *c = codes + r * k;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t i = 0; i < whole; i += 32) {
            __m256i x = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c + i)), offset);
            __m256i y = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w + i)), x);
            __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), y);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        }
        __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
        half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0xb1));
        int32_t dot = _mm_cvtsi128_si32(half);
        for (int64_t i = whole; i < k; i++) dot += ((int32_t)c[i] - 128) * w[i];
        dots[r] = dot + 128 * total;
    }
}
#else
static void dot_rows(const uint8_t *codes, int64_t m, int64_t k, const int8_t *w, int32_t *dots,
                     int32_t *sum) {
    int32_t total = 0;
    for (int64_t i = 0; i < k; i++) total += w[i];
    *sum = total;
    for (int64_t r = 0; r < m; r++) {
        int32_t dot = 0;
        for (int64_t i = 0; i < k; i++) dot += (int32_t)codes[r * k + i] * w[i];
        dots[r] = dot;
    }
}
#endif

/* sum_c x[c] * (w[columns[c]] * scale) for c < n, in LANES fixed lanes: the same bits for the
 * same n values wherever they lie, so a row's outlier part does not depend on the rows beside it
 * (a vectorized loop may peel by address and move values between lanes). */
static float outlier_dot(const float *x, const int64_t *columns, int64_t n, const int8_t *w,
                         float scale) {
    lanes sum = {0};
    for (int64_t c = 0; c < n; c += LANES) {
        lanes xv = {0}, wv = {0};
        for (int64_t l = 0; l < LANES && c + l < n; l++)
            xv[l] = x[c + l], wv[l] = w[columns[c + l]] * scale; /* the dequantised weight */
        sum += xv * wv;
    }
    return lanes_sum(sum);
}

/* LLM.int8() y (m, n) = x (m, k) · Wᵀ + bias for int8 W (n, k) with float32 scales per output
 * channel (int8.py's Int8Linear, in one pass), m <= INT8_ROWS; x, y and bias (or NULL) are
 * float32, the CPU's activations with int8 weights. Each row's values with |x| > threshold go
 * through float against the dequantised weights; its others are quantized per row
 * (absmax / 127, rounded half to even) and multiplied in integers. The split is each row's own,
 * not the union of the rows' outlier columns (LLM.int8's batch form): a row then gives the same
 * bits alone (a decode step) and in a drafter's tree, which greedy speculation needs to stay
 * lossless. The codes are stored offset by 128 as uint8, the operand of the CPU's u8 x s8 dot
 * product, and the offset is taken back out through the weight row's sum.
 * The outputs are split over the threads; each weight row is read once for all m rows of x,
 * which is what decode and a drafter's tree want. */
void int8_linear(const float *x, int64_t m, int64_t k, float threshold,
                 const int8_t *weight, const float *scale, const float *bias, int64_t n, float *y,
                 int threads) {
    float row_scale[INT8_ROWS];
    int64_t first[INT8_ROWS + 1] = {0}; /* row r's outliers: entries first[r] .. first[r + 1] */
    uint8_t *codes = malloc(m * k);
    int64_t *columns = malloc(m * k * sizeof(int64_t));
    float *outliers = malloc(m * k * sizeof(float));
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float absmax = 0.0f;
        int64_t count = first[r];
        for (int64_t i = 0; i < k; i++)
            if (fabsf(xr[i]) > threshold)
                columns[count] = i, outliers[count++] = xr[i];
            else
                absmax = fmaxf(absmax, fabsf(xr[i]));
        first[r + 1] = count;
        float s = fmaxf(absmax, 1e-12f) / 127;
        for (int64_t i = 0; i < k; i++)
            codes[r * k + i] = fabsf(xr[i]) > threshold ? 128 : (uint8_t)((int)nearbyintf(xr[i] / s) + 128);
        row_scale[r] = s;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *w = weight + j * k;
        int32_t dots[INT8_ROWS], sum;
        dot_rows(codes, m, k, w, dots, &sum);
        for (int64_t r = 0; r < m; r++) {
            /* the torch ops' order: int32 -> float, times the column scale, times the row's */
            float out = (float)(dots[r] - 128 * sum) * scale[j] * row_scale[r];
            if (first[r + 1] > first[r])
                out += outlier_dot(outliers + first[r], columns + first[r], first[r + 1] - first[r],
                                   w, scale[j]);
            y[r * n + j] = bias ? out + bias[j] : out;
        }
    }
    free(codes), free(columns), free(outliers);
}

#define LINEAR_ROWS 16 /* bf16_linear's most rows of x: cpu_kernels.py LINEAR_ROWS */
#define LINEAR_TILE 4  /* rows of x multiplied per pass over a weight row, sums in registers */
#define ACROSS 8       /* weight rows per pass of a decode step's one row of x */

/* `rows` (1 to LINEAR_TILE, a constant where inlined) dots of x's rows with one bf16 weight row,
 * k a multiple of LANES: each weight vector is widened to float32 once for all the rows. */
static inline __attribute__((always_inline)) void bf16_dots(const float *x, int64_t k,
                                                            const uint16_t *w, int rows,
                                                            float *dots) {
    lanes acc[LINEAR_TILE] = {{0}};
    for (int64_t i = 0; i < k; i += LANES) {
        lanes wv = load_lanes(w, 1, i), xv;
        for (int r = 0; r < rows; r++) {
            memcpy(&xv, x + r * k + i, sizeof xv);
            acc[r] = fma_lanes(xv, wv, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) dots[r] = lanes_sum(acc[r]);
}

/* The dots of one row of x with ACROSS weight rows: a decode step's shape, where one row of sums
 * would make a chain of dependent additions; eight are independent. */
static inline void bf16_dots_across(const float *x, int64_t k, const uint16_t *w, float *out) {
    lanes acc[ACROSS] = {{0}}, xv;
    for (int64_t i = 0; i < k; i += LANES) {
        memcpy(&xv, x + i, sizeof xv);
        for (int j = 0; j < ACROSS; j++)
            acc[j] = fma_lanes(xv, load_lanes(w + j * k, 1, i), acc[j]);
    }
    for (int j = 0; j < ACROSS; j++) out[j] = lanes_sum(acc[j]);
}

/* y (m, n) = x (m, k) · Wᵀ + bias for bf16 W (n, k), x, y and bias (or NULL) float32,
 * m <= LINEAR_ROWS, k a multiple of LANES: the product of decode and a drafter's tree on a CPU
 * where oneDNN cannot hold bf16 weights packed (no AVX-512 BW/VL/DQ). Outputs are split over the
 * threads in tiles of ACROSS weight rows, each read once for all m rows of x. */
void bf16_linear(const float *x, int64_t m, int64_t k, const uint16_t *weight, const float *bias,
                 int64_t n, float *y, int threads) {
    int64_t tiles = (n + ACROSS - 1) / ACROSS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t j0 = t * ACROSS;
        if (m == 1 && j0 + ACROSS <= n) {
            float dots[ACROSS];
            bf16_dots_across(x, k, weight + j0 * k, dots);
            for (int j = 0; j < ACROSS; j++) y[j0 + j] = bias ? dots[j] + bias[j0 + j] : dots[j];
            continue;
        }
        for (int64_t j = j0; j < n && j < j0 + ACROSS; j++) {
            const uint16_t *w = weight + j * k;
            float dots[LINEAR_ROWS];
            for (int64_t r = 0; r < m; r += LINEAR_TILE) {
                switch (m - r) {
                    case 1: bf16_dots(x + r * k, k, w, 1, dots + r); break;
                    case 2: bf16_dots(x + r * k, k, w, 2, dots + r); break;
                    case 3: bf16_dots(x + r * k, k, w, 3, dots + r); break;
                    default: bf16_dots(x + r * k, k, w, LINEAR_TILE, dots + r);
                }
            }
            for (int64_t r = 0; r < m; r++) y[r * n + j] = bias ? dots[r] + bias[j] : dots[r];
        }
    }
}
