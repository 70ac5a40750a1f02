/* bfloat16 matrix products on Intel AMX (Sapphire Rapids and later): y = x w^T + bias for x [M, K], w [N, K]
 * and y [M, N] of bfloat16, float32 sums, each output rounded once to bfloat16 (nearest even).
 *
 * oneDNN repacks the whole weight into its blocked layout on every call it is not given a packed copy of, which
 * costs more than the product at decode sizes (9 to a few hundred rows). Here the weight needs no packing: it is
 * the A operand of the tile product, 16 of its rows by 32 of its columns loaded straight from [N, K] with the
 * row stride K, and x, the small operand, is packed once per call into B tiles (pairs of k per 32-bit column, as
 * TDPBF16PS reads them). The tile result is then y transposed (16 weight rows by 16 x rows), transposed back in
 * registers as it is stored.
 *
 * Each output is its own sum over k in the same order whatever M, the other rows or the thread count are, so a
 * token's result does not depend on its batch. Pairs of 16-row weight blocks are split between `threads` OpenMP
 * threads (libgomp, as torch's own CPU build). N must be a multiple of 16 and K of 32 (the caller checks).
 *
 * Built at first use by microscale/kernels/cpu_amx.py with the machine's C compiler. */

#define _GNU_SOURCE /* syscall() */
#include <stdlib.h>

#include "amx.h"

#define PARALLEL_BYTES (64 << 10) /* less weight than this is read before the threads would wake */

/* x [M, K] as B tiles: for each block of 16 x rows (zero past M) and each 32 columns of k, 16 tile rows (pairs of
 * k) of 16 32-bit pairs (one per x row): xp[((mb * chunks + c) * 16 + r) * 16 + m] = the pair x[16 mb + m, 32 c +
 * 2 r ..]. */
static void pack_x(const uint32_t *x, uint32_t *xp, int64_t M, int64_t K) {
    const int64_t chunks = K / TILE_K, pairs = K / 2, blocks = (M + TILE - 1) / TILE;
    for (int64_t mb = 0; mb < blocks; mb++)
        for (int64_t c = 0; c < chunks; c++) {
            uint32_t *tile = xp + (mb * chunks + c) * TILE * TILE;
            for (int m = 0; m < TILE; m++) {
                const int64_t row = mb * TILE + m;
                for (int r = 0; r < TILE; r++) tile[r * TILE + m] = row < M ? x[row * pairs + c * TILE + r] : 0;
            }
        }
}

/* A 16 x 16 float32 result tile t[n][m] (n: weight rows n0.., m: x rows m0..) stored as y[m0 + m, n0 + n] for m
 * < rows, plus the bias, rounded to bfloat16: the tile is transposed in registers (three rounds of shuffles). */
AMX static void store_transposed(const float *t, const uint16_t *bias, uint16_t *y, int64_t N, int64_t n0,
                                 int rows) {
    __m512 r[16], a[16], b[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(t + i * TILE);
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    /* b[4k + q], 128-bit lane L: column 4L + q of t, rows 4k..4k+3 */
    for (int k = 0; k < 16; k += 4) {
        const __m512d a0 = _mm512_castps_pd(a[k]), a1 = _mm512_castps_pd(a[k + 1]);
        const __m512d a2 = _mm512_castps_pd(a[k + 2]), a3 = _mm512_castps_pd(a[k + 3]);
        b[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        b[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        b[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        b[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    const __m512 bias_f = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                     _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0))), 16))
                               : _mm512_setzero_ps();
    for (int q = 0; q < 4; q++) {
        const __m512 c0 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0x44), c1 = _mm512_shuffle_f32x4(b[q], b[4 + q], 0xEE);
        const __m512 c2 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0x44);
        const __m512 c3 = _mm512_shuffle_f32x4(b[8 + q], b[12 + q], 0xEE);
        const __m512 column[4] = {_mm512_shuffle_f32x4(c0, c2, 0x88), _mm512_shuffle_f32x4(c0, c2, 0xDD),
                                  _mm512_shuffle_f32x4(c1, c3, 0x88), _mm512_shuffle_f32x4(c1, c3, 0xDD)};
        for (int l = 0; l < 4; l++) {
            const int m = 4 * l + q;
            if (m < rows) {
                const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(column[l], bias_f));
                _mm256_storeu_si256((__m256i *)(y + m * N + n0), (__m256i)v);
            }
        }
    }
}

/* Results for weight rows [n0, n0 + 16 * nblocks) (nblocks 1 or 2) and x rows [16 mb, 16 mb + 16 * mblocks)
 * (mblocks 1 or 2): tile products over all of k, then stored. The tile numbers are constants (the instructions
 * encode them), hence the spelled-out cases. */
AMX static void block(const uint16_t *w, const uint32_t *xp, const uint16_t *bias, uint16_t *y, float *scratch,
                      int64_t M, int64_t N, int64_t K, int64_t n0, int nblocks, int64_t mb, int mblocks) {
    const int64_t chunks = K / TILE_K, stride = K * 2;
    const uint32_t *x0 = xp + mb * chunks * TILE * TILE, *x1 = x0 + chunks * TILE * TILE;
    const uint16_t *w0 = w + n0 * K, *w1 = w0 + TILE * K;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; c++) {
        _tile_loadd(4, w0 + c * TILE_K, stride);
        _tile_loadd(6, x0 + c * TILE * TILE, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (mblocks == 2) {
            _tile_loadd(7, x1 + c * TILE * TILE, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (nblocks == 2) {
            _tile_loadd(5, w1 + c * TILE_K, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (mblocks == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    for (int j = 0; j < nblocks; j++)
        for (int i = 0; i < mblocks; i++) {
            float *t = scratch + (j * 2 + i) * TILE * TILE;
            switch (j * 2 + i) {
                case 0: _tile_stored(0, t, 64); break;
                case 1: _tile_stored(1, t, 64); break;
                case 2: _tile_stored(2, t, 64); break;
                default: _tile_stored(3, t, 64); break;
            }
            const int64_t m0 = (mb + i) * TILE;
            const int rows = M - m0 < TILE ? (int)(M - m0) : TILE;
            store_transposed(t, bias, y + m0 * N, N, n0 + j * TILE, rows);
        }
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N], all bfloat16; N a multiple of 16, K of 32. Returns 0, or -1
 * when out of memory. */
AMX int microscale_amx_bf16_matmul(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                                   int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t mblocks = (M + TILE - 1) / TILE, pairs = (N / TILE + 1) / 2;
    uint32_t *xp = aligned_alloc(64, mblocks * K / 2 * TILE * sizeof(uint32_t));
    if (xp == NULL) return -1;
    pack_x((const uint32_t *)x, xp, M, K);
#pragma omp parallel num_threads(threads) if (N * K * 2 >= PARALLEL_BYTES)
    {
        float scratch[4 * TILE * TILE] __attribute__((aligned(64)));
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t n0 = p * 2 * TILE;
            const int nblocks = n0 + 2 * TILE <= N ? 2 : 1;
            for (int64_t mb = 0; mb < mblocks; mb += 2)
                block(w, xp, bias, y, scratch, M, N, K, n0, nblocks, mb, mblocks - mb >= 2 ? 2 : 1);
        }
        release_tiles();
    }
    free(xp);
    return 0;
}
