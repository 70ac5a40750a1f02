/* One prefill chunk's attention on Intel AMX (bfloat16, Sapphire Rapids and later), flash-style: the chunk's
 * queries, positions context_start .. context_start + query_len - 1 of one sequence, attend causally to its keys
 * 0 .. context_start + query_len - 1, read through its block table from the paged caches [blocks, block_size,
 * kv_heads, dim] (the chunk's own keys already written there). Scores and the softmax are float32, done 32 keys
 * at a time with a running maximum, so no score matrix is ever held; the probabilities enter the value product
 * rounded to bfloat16, as in torch's own CPU flash attention.
 *
 * torch's SDPA on these CPUs reaches 100-300 GFLOP/s at prefill sizes, less at small head sizes, and takes a
 * mask (or a gathered copy of the cache) whenever the chunk follows cached tokens. Here the tile products do the
 * arithmetic, and everything is transposed so that the softmax needs no horizontal reductions: scores come as
 * s^T = k q^T (16 keys by 16 queries a tile, the keys loaded straight from their cache blocks), so a vector holds
 * one key's scores for 16 queries and a query's maximum and sum are lane-wise; the sums come as out^T = v^T p^T,
 * v^T packed once per chunk and KV head and shared by the GQA group's query heads.
 *
 * q [query_len, heads, dim] (rows q_stride elements apart), out likewise (out_stride). With window > 0 a query
 * sees its last `window` keys only; with sinks (float32 [heads]) each head's softmax denominator has one more
 * term exp(sink). Tasks are (query head, 32 queries); each one's arithmetic is fixed, whatever the thread count.
 * dim is a multiple of 32 up to 256 and block_size a multiple of 16 (checked by the caller). Built at first use by
 * microscale/kernels/cpu_attention.py. */

#define _GNU_SOURCE /* syscall(), in amx.h */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"

#define ROWS 32 /* queries per task: two tile rows */
#define KEYS 32 /* keys per step: two score tiles wide, one value product deep */
#define MAX_DIM 256

/* A query's running maximum moves only when a block's scores pass it by more than this (e^8 ~ 3000, nowhere near
 * float32's or bfloat16's range): the probabilities are then e^(s - m) <= e^8 and the sums so far seldom need
 * rescaling, so they can stay where the tile products add to them. */
#define MAX_LEAD 8.0f

/* e^x in float32 for x up to MAX_LEAD (scores less a running maximum that may trail them by that much), 16
 * lanes: x = k ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7), 2^k
 * put in the exponent bits; below -87 (and at -inf) the result is 0. */
AMX static inline __m512 exp16(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.0f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lowest);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x); /* ln2 in two parts: k * the first is exact */
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i pow2k = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(~underflow, p, _mm512_castsi512_ps(pow2k));
}

/* One KV head's keys (or values) in the paged cache: the row of position pos. */
typedef struct {
    const char *cache;    /* the KV head's first element in slot 0 */
    const int64_t *table; /* the sequence's block table */
    int64_t block_size, slot_bytes;
} Paged;

static inline const uint16_t *row_at(const Paged *p, int64_t pos) {
    return (const uint16_t *)(p->cache +
                              (p->table[pos / p->block_size] * p->block_size + pos % p->block_size) * p->slot_bytes);
}

/* Values 0..length-1 transposed, vt[d * padded + j] = v[j][d], zero from length to padded; KEYS keys at a time,
 * so that each written line is filled whole while the rows it reads stay in L1. */
static void pack_values(const Paged *values, int64_t length, int64_t padded, int64_t dim, uint16_t *vt) {
    static const uint16_t zeros[MAX_DIM];
    for (int64_t k0 = 0; k0 < padded; k0 += KEYS) {
        const uint16_t *rows[KEYS];
        for (int j = 0; j < KEYS; j++) rows[j] = k0 + j < length ? row_at(values, k0 + j) : zeros;
        for (int64_t d = 0; d < dim; d++)
            for (int j = 0; j < KEYS; j++) vt[d * padded + k0 + j] = rows[j][d];
    }
}

/* Queries q0 .. q0 + rows - 1 of one head as B tiles of q^T, 16 queries each (zero past rows): qp[((c * 2 + half)
 * * 16 + r) * 16 + n] = the pair q[q0 + 16 half + n][32 c + 2 r ..]. */
static void pack_queries(const char *q, int64_t q_stride, int64_t head, int64_t q0, int rows, int64_t dim,
                         uint32_t *qp) {
    for (int i = 0; i < ROWS; i++) {
        const uint32_t *row = (const uint32_t *)(q + ((q0 + i) * q_stride + head * dim) * 2);
        const int half = i / TILE, n = i % TILE;
        for (int64_t c = 0; c < dim / TILE_K; c++)
            for (int r = 0; r < TILE; r++) qp[((c * 2 + half) * TILE + r) * TILE + n] = i < rows ? row[c * TILE + r] : 0;
    }
}

/* The queries (lanes) that see key `key`: key <= query, and query - window < key with a window. */
AMX static inline __mmask16 seen_by(__m512i query, int64_t key, int64_t window) {
    __mmask16 seen = _mm512_cmp_epi32_mask(query, _mm512_set1_epi32((int)key), _MM_CMPINT_GE);
    if (window > 0) seen &= _mm512_cmp_epi32_mask(query, _mm512_set1_epi32((int)(key + window)), _MM_CMPINT_LT);
    return seen;
}

/* Row k of a block's scores st (key k0 + k, 16 queries) scaled, -inf where the query does not see the key
 * (unless the whole block is seen). */
AMX static inline __m512 scaled_scores(const float *st, int k, int whole, __m512i query, int64_t k0, int64_t window,
                                       __m512 scale) {
    const __m512 s = _mm512_loadu_ps(st + k * ROWS);
    if (whole) return _mm512_mul_ps(s, scale);
    return _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen_by(query, k0 + k, window), s, scale);
}

/* The online softmax of one block of KEYS keys for 16 queries, positions first_query + lane: scores st [KEYS]
 * rows (row stride ROWS floats) of 16 unscaled scores, one row per key k0 + k. Moves the queries' maxima m and
 * denominators l on and writes the probabilities as a B tile of p^T: pt[r * 16 + n] = the bfloat16 pair p[n][2 r
 * ..]. Returns the lanes whose maximum moved; *rescale is what their earlier sums must be multiplied by. Key k0 +
 * k is seen by a query when it is at most the query's position and, with a window, within its last `window`. */
AMX static __mmask16 softmax_block(const float *st, int64_t first_query, int64_t k0, int64_t window, float scale,
                                   float *m, float *l, uint32_t *pt, __m512 *rescale) {
    const __m512i query = _mm512_add_epi32(_mm512_set1_epi32((int)first_query),
                                           _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    /* every key of the block seen by every query: no masks */
    const int whole = k0 + KEYS - 1 <= first_query && (window <= 0 || k0 + window > first_query + TILE - 1);
    const __m512 scale16 = _mm512_set1_ps(scale);
    const __m512 old_max = _mm512_loadu_ps(m);
    __m512 top = old_max;
    for (int k = 0; k < KEYS; k++) top = _mm512_max_ps(top, scaled_scores(st, k, whole, query, k0, window, scale16));
    const __mmask16 moved = _mm512_cmp_ps_mask(top, _mm512_add_ps(old_max, _mm512_set1_ps(MAX_LEAD)), _CMP_GT_OQ);
    const __m512 new_max = _mm512_mask_blend_ps(moved, old_max, top);
    /* a query that has seen nothing yet (a window's first block can hide all its keys) adds nothing */
    const __m512 base = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(new_max, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ),
                                             new_max, _mm512_setzero_ps());
    *rescale = exp16(_mm512_sub_ps(old_max, base));
    __m512 sum = _mm512_setzero_ps();
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int r = 0; r < TILE; r++) {
        const __m512 even = exp16(_mm512_sub_ps(scaled_scores(st, 2 * r, whole, query, k0, window, scale16), base));
        const __m512 odd = exp16(_mm512_sub_ps(scaled_scores(st, 2 * r + 1, whole, query, k0, window, scale16), base));
        sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
        _mm512_storeu_si512(pt + r * TILE,
                            _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
    }
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), *rescale, sum));
    _mm512_storeu_ps(m, new_max);
    return moved;
}

/* One task: query head `head`, the chunk's queries q0 .. q0 + rows - 1, over keys read from `keys` (this KV
 * head in the cache) and vt (its values, transposed). */
AMX static void task(const char *q, int64_t q_stride, const Paged *keys, const uint16_t *vt, int64_t padded,
                     int64_t length, int64_t head, int64_t q0, int rows, int64_t context_start, int64_t dim,
                     float scale, int64_t window, const float *sinks, char *out, int64_t out_stride) {
    const int64_t chunks = dim / TILE_K;
    uint32_t qp[MAX_DIM / TILE_K * 2 * TILE * TILE] __attribute__((aligned(64)));
    uint32_t pt[2 * TILE * TILE] __attribute__((aligned(64)));
    float st[KEYS * ROWS] __attribute__((aligned(64)));
    float acc[MAX_DIM * ROWS] __attribute__((aligned(64))); /* out^T: acc[d * ROWS + i] */
    float m[ROWS] __attribute__((aligned(64))), l[ROWS] __attribute__((aligned(64)));
    pack_queries(q, q_stride, head, q0, rows, dim, qp);
    memset(pt, 0, sizeof(pt)); /* a single half of queries leaves the second tile as it is */
    for (int i = 0; i < ROWS; i++) {
        m[i] = sinks ? sinks[head] : -INFINITY; /* a sink is one more key every query sees, valued 0 */
        l[i] = sinks ? 1.0f : 0.0f;
    }
    memset(acc, 0, sizeof(float) * dim * ROWS);
    const int halves = rows > TILE ? 2 : 1;
    const int64_t first_query = context_start + q0, last_key = first_query + rows - 1;
    const int64_t first_key = window > 0 && first_query + 1 > window ? first_query + 1 - window : 0;
    for (int64_t k0 = first_key / KEYS * KEYS; k0 <= last_key; k0 += KEYS) {
        /* s^T = k q^T: tiles 0-3 = (keys 0-15, 16-31 of the block) x (queries 0-15, 16-31); keys past the
         * sequence's last block are zero tiles (the keys past `length` in its last block are masked) */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const char *k_lo = (const char *)row_at(keys, k0);
        const char *k_hi = k0 + TILE < length ? (const char *)row_at(keys, k0 + TILE) : NULL;
        for (int64_t c = 0; c < chunks; c++) {
            _tile_loadd(4, k_lo + c * 64, keys->slot_bytes);
            if (k_hi) _tile_loadd(5, k_hi + c * 64, keys->slot_bytes);
            else _tile_zero(5);
            _tile_loadd(6, qp + (c * 2) * TILE * TILE, 64);
            _tile_loadd(7, qp + (c * 2 + 1) * TILE * TILE, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, st, ROWS * 4);
        _tile_stored(1, st + TILE, ROWS * 4);
        _tile_stored(2, st + TILE * ROWS, ROWS * 4);
        _tile_stored(3, st + TILE * ROWS + TILE, ROWS * 4);
        for (int h = 0; h < halves; h++) {
            __m512 rescale;
            if (softmax_block(st + h * TILE, first_query + h * TILE, k0, window, scale, m + h * TILE, l + h * TILE,
                              pt + h * TILE * TILE, &rescale))
                for (int64_t d = 0; d < dim; d++) {
                    float *a = acc + d * ROWS + h * TILE;
                    _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), rescale));
                }
        }
        /* out^T += v^T p^T, 16 dimensions at a time */
        _tile_loadd(6, pt, 64);
        _tile_loadd(7, pt + TILE * TILE, 64);
        for (int64_t d = 0; d < dim; d += TILE) {
            _tile_loadd(0, acc + d * ROWS, ROWS * 4);
            _tile_loadd(1, acc + d * ROWS + TILE, ROWS * 4);
            _tile_loadd(4, vt + d * padded + k0, padded * 2);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_stored(0, acc + d * ROWS, ROWS * 4);
            _tile_stored(1, acc + d * ROWS + TILE, ROWS * 4);
        }
    }
    for (int i = 0; i < rows; i++) {
        const float inv = 1.0f / l[i];
        uint16_t *o = (uint16_t *)(out + ((q0 + i) * out_stride + head * dim) * 2);
        for (int64_t d = 0; d < dim; d += TILE) {
            const __m512i column = _mm512_add_epi32(_mm512_set1_epi32((int)(d * ROWS + i)),
                                                    _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8,
                                                                                        7, 6, 5, 4, 3, 2, 1, 0),
                                                                       _mm512_set1_epi32(ROWS)));
            const __m512 sums = _mm512_i32gather_ps(column, acc, 4);
            _mm256_storeu_si256((__m256i *)(o + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sums,
                                                                                              _mm512_set1_ps(inv))));
        }
    }
}

/* Returns 0, or -1 when the transposed values cannot be allocated (nothing attended then). */
AMX int microscale_cpu_prefill_attention(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,
                                         const int64_t *table, int64_t context_start, int64_t query_len,
                                         char *out, int64_t out_stride, int64_t heads, int64_t kv_heads,
                                         int64_t dim, int64_t block_size, float scale, int64_t window,
                                         const float *sinks, int threads) {
    const int64_t length = context_start + query_len, padded = (length + KEYS - 1) / KEYS * KEYS;
    const int64_t group = heads / kv_heads, blocks = (query_len + ROWS - 1) / ROWS, slot_bytes = kv_heads * dim * 2;
    uint16_t *vt = aligned_alloc(64, kv_heads * dim * padded * sizeof(uint16_t));
    if (vt == NULL) return -1;
    const int parallel = threads > 1 && query_len * length * heads * dim >= (1 << 16);
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < kv_heads; h++) {
            const Paged values = {v_cache + h * dim * 2, table, block_size, slot_bytes};
            pack_values(&values, length, padded, dim, vt + h * dim * padded);
        }
        configure_tiles();
        /* the latest queries first: they see the most keys, so the tasks left at the end are the shortest */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < blocks * heads; t++) {
            const int64_t block = blocks - 1 - t / heads, head = t % heads, h = head / group, q0 = block * ROWS;
            const int rows = query_len - q0 < ROWS ? (int)(query_len - q0) : ROWS;
            const Paged keys = {k_cache + h * dim * 2, table, block_size, slot_bytes};
            task(q, q_stride, &keys, vt + h * dim * padded, padded, length, head, q0, rows, context_start, dim,
                 scale, window, sinks, out, out_stride);
        }
        release_tiles();
    }
    free(vt);
    return 0;
}
