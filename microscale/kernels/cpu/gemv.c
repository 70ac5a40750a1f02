/* Matrix-vector products for x86-64 CPUs (AVX2, FMA, F16C) at decode batch sizes, where a product is bound by
 * reading its weight: weights of the model dtype (float32, bfloat16, float16) read at full memory speed (BLAS
 * reaches a third to a half of it for one row), and FP8 (E4M3) and MXFP4 weights decoded in registers, read at
 * their stored width (1 or ~0.53 bytes per value) where dequantising first writes and re-reads a 16-bit copy.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] for m < M, in float32 (row-major; x float32 [M, K] and y float32 [M, N] for
 * the low-bit weights, x and y of the weight's dtype for the others).
 * Each row m is accumulated the same way whatever M is (its own accumulators, the same k order), so a token's
 * result does not depend on how many share the call. Rows of w are split between `threads` OpenMP threads
 * (libgomp: the runtime torch's own CPU build loads, found by its soname).
 *
 * Built at first use by microscale/kernels/cpu_gemv.py with the machine's C compiler. */

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "simd.h"

#define MAX_ROWS 4 /* x rows per pass over the weight; callers loop over groups of MAX_ROWS */
#define MAX_OUTS 4 /* weight rows read side by side (ROWS_PER_TASK is a multiple) */

/* ---- FP8 E4M3 ----
 * A byte's sign goes to bit 15 and its exponent and mantissa to bits 13..7 of a float16, whose exponent bias
 * (15) is 8 more than E4M3's (7): the float16 is the E4M3 value times 2^-8, subnormals included (F16C
 * converts float16 subnormals exactly), so the sums are scaled by 2^8 at the end. Sign-extending the byte to 16
 * bits and shifting left by 7 puts the sign in bits 15 and 14; the mask clears bit 14. (0x7F/0xFF, E4M3's NaN,
 * would read as 1.875 * 2^8: FP8 weights are quantised with saturation and hold no NaN.) */

TARGET static inline void fp8_decode16(const uint8_t *w, __m256 *lo, __m256 *hi) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

/* Inlined with constant `rows` (of x) and `outs` (weight rows read side by side): the accumulators stay in
 * registers, and several weight rows in flight keep the memory busy where one row per 4 KiB page (K = 4096)
 * would restart the hardware prefetcher at every row. The prefetch reaches the rows `outs` further on. */
TARGET static inline __attribute__((always_inline)) void fp8_block(const float *x, const uint8_t *w, float *y,
                                                                    int64_t K, int64_t N, int rows, int outs) {
    __m256 acc[MAX_ROWS * MAX_OUTS];
    for (int i = 0; i < rows * outs; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        for (int o = 0; o < outs; o++) {
            const uint8_t *wo = w + o * K;
            /* A hint, never a fault: past the weight's end (the last block) it is simply dropped. */
            _mm_prefetch((const char *)(wo + outs * K + k), _MM_HINT_T0);
            __m256 lo, hi;
            fp8_decode16(wo + k, &lo, &hi);
            for (int m = 0; m < rows; m++) {
                acc[m * outs + o] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), acc[m * outs + o]);
                acc[m * outs + o] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), acc[m * outs + o]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int o = 0; o < outs; o++) y[m * N + o] = sum8(acc[m * outs + o]) * 256.0f;
}

TARGET static void fp8_rows(const float *x, const uint8_t *w, float *y, int64_t rows, int64_t K, int64_t N,
                            int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + MAX_OUTS <= n1; n += MAX_OUTS) {
        const uint8_t *wn = w + n * K;
        switch (rows) {
            case 1: fp8_block(x, wn, y + n, K, N, 1, MAX_OUTS); break;
            case 2: fp8_block(x, wn, y + n, K, N, 2, MAX_OUTS); break;
            case 3: fp8_block(x, wn, y + n, K, N, 3, 2); fp8_block(x, wn + 2 * K, y + n + 2, K, N, 3, 2); break;
            default: fp8_block(x, wn, y + n, K, N, 4, 2); fp8_block(x, wn + 2 * K, y + n + 2, K, N, 4, 2); break;
        }
    }
    for (; n < n1; n++) {
        const uint8_t *wn = w + n * K;
        switch (rows) {
            case 1: fp8_block(x, wn, y + n, K, N, 1, 1); break;
            case 2: fp8_block(x, wn, y + n, K, N, 2, 1); break;
            case 3: fp8_block(x, wn, y + n, K, N, 3, 1); break;
            default: fp8_block(x, wn, y + n, K, N, 4, 1); break;
        }
    }
}

/* ---- MXFP4 ----
 * Per output row, K / 32 blocks of 16 bytes (two E2M1 codes per byte, the even element in the low nibble) and
 * one E8M0 scale byte each. A code becomes twice its value as an int8 through one byte shuffle (E2M1 values
 * times 2 are the integers 0, 1, 2, 3, 4, 6, 8, 12), and the block's scale 2^(s - 127) / 2 multiplies the block's
 * partial sums. x arrives with each block's even elements first, then its odd ones (mxfp4_split_even_odd), so
 * low nibbles meet the first 16 and high nibbles the last 16 without shuffling the codes. */

static float e8m0_half[256]; /* 2^(s - 127) / 2; NaN for s = 0xFF (the spec's NaN scale) */

static void init_e8m0_half(void) {
    for (int s = 0; s < 255; s++) e8m0_half[s] = ldexpf(1.0f, s - 128);
    e8m0_half[255] = NAN;
}

TARGET static inline void mxfp4_decode32(const uint8_t *w, __m256 v[4]) {
    const __m128i twice = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)w);
    __m128i lo = _mm_shuffle_epi8(twice, _mm_and_si128(b, nibble));
    __m128i hi = _mm_shuffle_epi8(twice, _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
}

/* As fp8_block: `rows` of x against `outs` weight rows side by side. */
TARGET static inline __attribute__((always_inline)) void mxfp4_block(const float *x, const uint8_t *blocks,
                                                                      const uint8_t *scales, float *y, int64_t K,
                                                                      int64_t N, int rows, int outs) {
    __m256 acc[MAX_ROWS * MAX_OUTS];
    for (int i = 0; i < rows * outs; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        for (int o = 0; o < outs; o++) {
            const uint8_t *bo = blocks + o * (K / 2);
            _mm_prefetch((const char *)(bo + outs * (K / 2) + g * 16), _MM_HINT_T0);
            __m256 v[4];
            mxfp4_decode32(bo + g * 16, v);
            const __m256 scale = _mm256_set1_ps(e8m0_half[scales[o * (K / 32) + g]]);
            for (int m = 0; m < rows; m++) {
                const float *xg = x + m * K + g * 32;
                __m256 part = _mm256_mul_ps(v[0], _mm256_loadu_ps(xg));
                part = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xg + 8), part);
                part = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xg + 16), part);
                part = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xg + 24), part);
                acc[m * outs + o] = _mm256_fmadd_ps(part, scale, acc[m * outs + o]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int o = 0; o < outs; o++) y[m * N + o] = sum8(acc[m * outs + o]);
}

TARGET static void mxfp4_rows(const float *x, const uint8_t *blocks, const uint8_t *scales, float *y,
                              int64_t rows, int64_t K, int64_t N, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + MAX_OUTS <= n1; n += MAX_OUTS) {
        const uint8_t *bn = blocks + n * (K / 2), *sn = scales + n * (K / 32);
        switch (rows) {
            case 1: mxfp4_block(x, bn, sn, y + n, K, N, 1, MAX_OUTS); break;
            case 2: mxfp4_block(x, bn, sn, y + n, K, N, 2, MAX_OUTS); break;
            case 3:
                mxfp4_block(x, bn, sn, y + n, K, N, 3, 2);
                mxfp4_block(x, bn + K, sn + K / 16, y + n + 2, K, N, 3, 2);
                break;
            default:
                mxfp4_block(x, bn, sn, y + n, K, N, 4, 2);
                mxfp4_block(x, bn + K, sn + K / 16, y + n + 2, K, N, 4, 2);
                break;
        }
    }
    for (; n < n1; n++) {
        const uint8_t *bn = blocks + n * (K / 2), *sn = scales + n * (K / 32);
        switch (rows) {
            case 1: mxfp4_block(x, bn, sn, y + n, K, N, 1, 1); break;
            case 2: mxfp4_block(x, bn, sn, y + n, K, N, 2, 1); break;
            case 3: mxfp4_block(x, bn, sn, y + n, K, N, 3, 1); break;
            default: mxfp4_block(x, bn, sn, y + n, K, N, 4, 1); break;
        }
    }
}

/* ---- weights of the model dtype ----
 * x is converted to float32 once per call; each weight row is read as stored (bfloat16: the high half of a
 * float32; float16: F16C), and the float32 sum (plus bias) is rounded to the dtype once. */

TARGET static inline float load1(const void *p, int64_t i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

TARGET static inline void store1(void *p, int64_t i, float v, int dtype) {
    if (dtype == F32) {
        ((float *)p)[i] = v;
    } else if (dtype == F16) {
        ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else { /* bfloat16, rounded to nearest even as torch rounds; NaN stays a quiet NaN */
        uint32_t u;
        __builtin_memcpy(&u, &v, 4);
        ((uint16_t *)p)[i] = (v != v) ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
}

/* As fp8_block, for weights of `dtype` (its bytes per value: `size`); sums into float32 out[m * N + o]. */
TARGET static inline __attribute__((always_inline)) void dense_block(const float *x, const char *w, float *y,
                                                                      int64_t K, int64_t N, int rows, int outs,
                                                                      int dtype, int64_t size) {
    __m256 acc[MAX_ROWS * MAX_OUTS];
    for (int i = 0; i < rows * outs; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        for (int o = 0; o < outs; o++) {
            const char *wo = w + (o * K + k) * size;
            _mm_prefetch(wo + outs * K * size, _MM_HINT_T0);
            const __m256 lo = load8(wo, dtype), hi = load8(wo + 8 * size, dtype);
            for (int m = 0; m < rows; m++) {
                acc[m * outs + o] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), acc[m * outs + o]);
                acc[m * outs + o] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), acc[m * outs + o]);
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int o = 0; o < outs; o++) y[m * N + o] = sum8(acc[m * outs + o]);
}

#define DENSE_ROWS(NAME, DTYPE, SIZE)                                                                              \
    TARGET static void NAME(const float *x, const char *w, float *y, int64_t rows, int64_t K, int64_t N,          \
                            int64_t n0, int64_t n1) {                                                             \
        int64_t n = n0;                                                                                           \
        for (; n + MAX_OUTS <= n1; n += MAX_OUTS) {                                                              \
            const char *wn = w + n * K * SIZE;                                                                    \
            switch (rows) {                                                                                       \
                case 1: dense_block(x, wn, y + n, K, N, 1, MAX_OUTS, DTYPE, SIZE); break;                         \
                case 2: dense_block(x, wn, y + n, K, N, 2, MAX_OUTS, DTYPE, SIZE); break;                         \
                case 3:                                                                                           \
                    dense_block(x, wn, y + n, K, N, 3, 2, DTYPE, SIZE);                                           \
                    dense_block(x, wn + 2 * K * SIZE, y + n + 2, K, N, 3, 2, DTYPE, SIZE);                        \
                    break;                                                                                        \
                default:                                                                                          \
                    dense_block(x, wn, y + n, K, N, 4, 2, DTYPE, SIZE);                                           \
                    dense_block(x, wn + 2 * K * SIZE, y + n + 2, K, N, 4, 2, DTYPE, SIZE);                        \
                    break;                                                                                        \
            }                                                                                                     \
        }                                                                                                         \
        for (; n < n1; n++) {                                                                                     \
            const char *wn = w + n * K * SIZE;                                                                    \
            switch (rows) {                                                                                       \
                case 1: dense_block(x, wn, y + n, K, N, 1, 1, DTYPE, SIZE); break;                                \
                case 2: dense_block(x, wn, y + n, K, N, 2, 1, DTYPE, SIZE); break;                                \
                case 3: dense_block(x, wn, y + n, K, N, 3, 1, DTYPE, SIZE); break;                                \
                default: dense_block(x, wn, y + n, K, N, 4, 1, DTYPE, SIZE); break;                               \
            }                                                                                                     \
        }                                                                                                         \
    }
DENSE_ROWS(f32_rows, F32, 4)
DENSE_ROWS(bf16_rows, BF16, 2)
DENSE_ROWS(f16_rows, F16, 2)

/* ---- entry points (K a multiple of 32 for the low-bit weights, of 16 for the others: checked by the caller) */

enum { FP8 = 16, MXFP4 = 17 }; /* the weight kinds besides the dtypes above */

#define ROWS_PER_TASK 16 /* output rows per OpenMP task: a few KiB of weight each, many tasks per thread */
#define PARALLEL_BYTES (64 << 10) /* less weight than this is read before the threads would wake */

/* x rows in groups of MAX_ROWS, each group one pass over the weight, its rows split between the threads. */
static void gemv(int kind, const float *x, const void *w, const uint8_t *scales, float *y, int64_t M, int64_t N,
                 int64_t K, int threads) {
    const int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int64_t bytes = kind == F32 ? N * K * 4 : kind == FP8 ? N * K : kind == MXFP4 ? N * K / 2 : N * K * 2;
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const float *xm = x + m0 * K;
        float *ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads) if (bytes >= PARALLEL_BYTES)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
            switch (kind) {
                case FP8: fp8_rows(xm, w, ym, rows, K, N, n0, n1); break;
                case MXFP4: mxfp4_rows(xm, w, scales, ym, rows, K, N, n0, n1); break;
                case F32: f32_rows(xm, w, ym, rows, K, N, n0, n1); break;
                case BF16: bf16_rows(xm, w, ym, rows, K, N, n0, n1); break;
                default: f16_rows(xm, w, ym, rows, K, N, n0, n1); break;
            }
        }
    }
}

void microscale_fp8_gemv(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K,
                         int threads) {
    gemv(FP8, x, w, NULL, y, M, N, K, threads);
}

void microscale_mxfp4_gemv(const float *x, const uint8_t *blocks, const uint8_t *scales, float *y, int64_t M,
                           int64_t N, int64_t K, int threads) {
    if (e8m0_half[128] == 0.0f) init_e8m0_half(); /* idempotent: a race writes the same values */
    gemv(MXFP4, x, blocks, scales, y, M, N, K, threads);
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N], all of `dtype`; returns 0, or -1 when out of memory. */
TARGET int microscale_dense_gemv(const void *x, const void *w, const void *bias, void *y, int64_t M, int64_t N,
                                 int64_t K, int dtype, int threads) {
    float *buffer = malloc(sizeof(float) * (M * K + M * N));
    if (buffer == NULL) return -1;
    float *xf = buffer, *yf = buffer + M * K;
    for (int64_t i = 0; i < M * K; i++) xf[i] = load1(x, i, dtype);
    gemv(dtype, xf, w, NULL, yf, M, N, K, threads);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++)
            store1(y, m * N + n, yf[m * N + n] + (bias ? load1(bias, n, dtype) : 0.0f), dtype);
    free(buffer);
    return 0;
}
