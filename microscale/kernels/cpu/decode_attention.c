/* One layer's attention step on x86-64 CPUs (AVX2, FMA, F16C): the step's new keys and values go into their
 * paged-cache slots, then each decoding sequence's one query attends to the keys and values its block table
 * points at, read in place (no gather, no padding to the longest context, no mask), so a step's attention costs
 * what its contexts hold.
 *
 * New keys/values [tokens, kv_heads, dim] (rows k_stride / v_stride elements apart) go to slot
 * slot_blocks[i] * block_size + slot_offsets[i] of the caches [blocks, block_size, kv_heads, dim]. q [n, heads,
 * dim] (rows q_stride apart), block tables int64 [n, table_stride], positions int64 [n] (the new token's
 * position: it attends to keys 0..position, the last `window` of them when window > 0), out [n, heads, dim]
 * (rows out_stride apart). Everything shares one dtype (float32, bfloat16 or float16); scores, softmax and sums
 * are float32. With `sinks` (float32 [heads]) each head's softmax denominator has one more term exp(sink): mass
 * that goes nowhere.
 *
 * One task per (sequence, KV head), a sequence's tasks on one thread where that pays; its query heads (the GQA
 * group) go in parts of up to PART heads that share each key and value row read, their accumulators in
 * registers. A task's arithmetic does not depend on n or on the thread count, so a sequence's result does not
 * depend on the batch it decodes in. Built at first use by microscale/kernels/cpu_attention.py. */

#define _GNU_SOURCE /* syscall(), in amx.h */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "simd.h"

#define PART 4     /* query heads attended together (registers: PART x 2 accumulators per pass) */
#define MAX_DIM 256

TARGET static INLINE void store8(char *p, __m256 v, int dtype) {
    if (dtype == F32) {
        _mm256_storeu_ps((float *)p, v);
    } else if (dtype == F16) {
        _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else { /* bfloat16, rounded to nearest even as torch rounds (finite sums: a cache of finite values) */
        __m256i u = _mm256_castps_si256(v);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
        _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    }
}

TARGET static INLINE float max8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 0 (scores minus their maximum): x = k ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial (relative error < 2e-7, float32's own rounding), 2^k put in the exponent bits. Below -87 the
 * result is 0 (float32 would go subnormal). */
TARGET static INLINE __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.0f);
    const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lowest);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - k ln2, ln2 split in two so that k * (its first part) is exact */
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i pow2k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2k)));
}

/* Where one sequence's keys (or values) of one KV head lie: `first` onwards, through its block table. */
typedef struct {
    const char *cache;       /* the KV head's first element in slot 0 */
    const int64_t *table;    /* the sequence's block table */
    int64_t block_size, slot_bytes, first;
} Rows;

/* Keys j.. (counted from `first`) up to `length` lie in runs of consecutive slots, one run per cache block:
 * sets *start to the row of key j, returns how many follow it at slot_bytes apart. */
static INLINE int64_t run(const Rows *r, int64_t j, int64_t length, const char **start) {
    const int64_t pos = r->first + j, offset = pos % r->block_size, left = r->block_size - offset;
    *start = r->cache + (r->table[pos / r->block_size] * r->block_size + offset) * r->slot_bytes;
    return left < length - j ? left : length - j;
}

/* Asks for rows [row, row + count * stride) to be brought into the caches: `bytes` of each row. */
static INLINE void prefetch_rows(const char *row, int64_t count, int64_t stride, int64_t bytes) {
    for (int64_t i = 0; i < count; i++, row += stride)
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* The run of keys from j (see run), its row in *key; asks for the next run's key rows and this run's value rows
 * (read after the softmax) to be brought in, so the loads find them on the way. */
static INLINE int64_t next_run(const Rows *keys, const Rows *values, int64_t j, int64_t length, int64_t row_bytes,
                               const char **key) {
    const char *next, *value;
    const int64_t count = run(keys, j, length, key), stride = keys->slot_bytes;
    run(values, j, length, &value);
    if (j + count < length) {
        const int64_t following = run(keys, j + count, length, &next);
        prefetch_rows(next, following, stride, row_bytes);
    }
    prefetch_rows(value, count, stride, row_bytes);
    return count;
}

/* Scores of `heads` (a constant <= PART) query heads against keys 0..length-1 of `keys`; q already scaled, as
 * float32 [heads][dim]. Two accumulators per head halve the FMA dependency chains. Cache blocks come in table
 * order, scattered in memory, where the hardware prefetcher cannot follow: each run asks for the next run's key
 * rows and for its own value rows (read after the softmax), so the loads find them on the way. */
TARGET static INLINE void scores_part(const float *q, const Rows *keys, const Rows *values, int64_t length,
                                      int64_t dim, int heads, float *scores, int dtype, int64_t elsize) {
    const int64_t stride = keys->slot_bytes, row_bytes = dim * elsize;
    for (int64_t j = 0; j < length;) {
        const char *key;
        const int64_t count = next_run(keys, values, j, length, row_bytes, &key);
        for (int64_t i = 0; i < count; i++, j++, key += stride) {
            __m256 even[PART], odd[PART];
            for (int g = 0; g < heads; g++) even[g] = odd[g] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16) {
                const __m256 k0 = load8(key + d * elsize, dtype), k1 = load8(key + (d + 8) * elsize, dtype);
                for (int g = 0; g < heads; g++) {
                    even[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + d), k0, even[g]);
                    odd[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + d + 8), k1, odd[g]);
                }
            }
            for (int g = 0; g < heads; g++) scores[g * length + j] = sum8(_mm256_add_ps(even[g], odd[g]));
        }
    }
}

/* Softmax numerators e^(s - max) of one head's scores in place; returns their sum (plus e^(sink - max)). */
TARGET static INLINE float softmax_numerators(float *s, int64_t length, const float *sink) {
    __m256 m8 = _mm256_set1_ps(sink ? *sink : -__builtin_inff());
    int64_t j = 0;
    for (; j + 8 <= length; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    float top = max8(m8);
    for (; j < length; j++) top = s[j] > top ? s[j] : top;
    const __m256 top8 = _mm256_set1_ps(top);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= length; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top8));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    /* the tail (under 8) and the sink through one padded vector: lanes past them add e^-inf = 0 */
    float tail[8];
    const int64_t rest = length - j;
    for (int t = 0; t < 8; t++) tail[t] = t < rest ? s[j + t] - top : -__builtin_inff();
    if (sink && rest < 8) tail[rest] = *sink - top;
    const __m256 e = exp8(_mm256_loadu_ps(tail));
    _mm256_storeu_ps(tail, e);
    memcpy(s + j, tail, rest * sizeof(float));
    return sum8(_mm256_add_ps(sum, e));
}

/* out[g] = sum_j p[g][j] v_j / total[g] for `heads` (a constant <= PART) heads. A run of value rows (one cache
 * block, a few KiB) is read 16 dimensions at a time, so the accumulators stay in registers and the rows come
 * from L1 after the first slice; sums carry over between runs in acc (float32 [heads][dim]). */
TARGET static INLINE void values_part(const float *p, const float *total, const Rows *values, int64_t length,
                                      int64_t dim, int heads, float *acc, char *out, int dtype, int64_t elsize) {
    for (int64_t i = 0; i < heads * dim; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < length;) {
        const char *first_row;
        const int64_t count = run(values, j, length, &first_row);
        for (int64_t d = 0; d < dim; d += 16) {
            __m256 lo[PART], hi[PART];
            for (int g = 0; g < heads; g++) {
                lo[g] = _mm256_loadu_ps(acc + g * dim + d);
                hi[g] = _mm256_loadu_ps(acc + g * dim + d + 8);
            }
            const char *value = first_row + d * elsize;
            for (int64_t i = 0; i < count; i++, value += values->slot_bytes) {
                const __m256 v0 = load8(value, dtype), v1 = load8(value + 8 * elsize, dtype);
                for (int g = 0; g < heads; g++) {
                    const __m256 w = _mm256_set1_ps(p[g * length + j + i]);
                    lo[g] = _mm256_fmadd_ps(w, v0, lo[g]);
                    hi[g] = _mm256_fmadd_ps(w, v1, hi[g]);
                }
            }
            for (int g = 0; g < heads; g++) {
                _mm256_storeu_ps(acc + g * dim + d, lo[g]);
                _mm256_storeu_ps(acc + g * dim + d + 8, hi[g]);
            }
        }
        j += count;
    }
    for (int g = 0; g < heads; g++) {
        const __m256 inv = _mm256_set1_ps(1.0f / total[g]);
        for (int64_t d = 0; d < dim; d += 8)
            store8(out + (g * dim + d) * elsize, _mm256_mul_ps(_mm256_loadu_ps(acc + g * dim + d), inv), dtype);
    }
}

/* `heads` (constant) query heads of one sequence and KV head; scores: scratch of heads * length floats. */
TARGET static INLINE void attend_part(const char *q, const Rows *keys, const Rows *values, int64_t length,
                                      int64_t dim, int heads, float scale, const float *sinks, float *scores,
                                      char *out, int dtype, int64_t elsize) {
    float qs[PART * MAX_DIM], acc[PART * MAX_DIM], total[PART];
    for (int g = 0; g < heads; g++)
        for (int64_t d = 0; d < dim; d += 8)
            _mm256_storeu_ps(qs + g * dim + d, _mm256_mul_ps(load8(q + (g * dim + d) * elsize, dtype),
                                                             _mm256_set1_ps(scale)));
    scores_part(qs, keys, values, length, dim, heads, scores, dtype, elsize);
    for (int g = 0; g < heads; g++)
        total[g] = softmax_numerators(scores + g * length, length, sinks ? sinks + g : NULL);
    values_part(scores, total, values, length, dim, heads, acc, out, dtype, elsize);
}

/* One (sequence, KV head) task: its GQA group in parts of up to PART heads. */
TARGET static INLINE void task(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,
                               const int64_t *tables, int64_t table_stride, const int64_t *positions, char *out,
                               int64_t out_stride, int64_t heads, int64_t kv_heads, int64_t dim,
                               int64_t block_size, float scale, int64_t window, const float *sinks, int64_t t,
                               float *scores, int dtype, int64_t elsize) {
    const int64_t s = t / kv_heads, h = t % kv_heads, group = heads / kv_heads;
    const int64_t last = positions[s];
    const int64_t first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    const int64_t slot_bytes = kv_heads * dim * elsize;
    const Rows keys = {k_cache + h * dim * elsize, tables + s * table_stride, block_size, slot_bytes, first};
    const Rows values = {v_cache + h * dim * elsize, tables + s * table_stride, block_size, slot_bytes, first};
    for (int64_t g = 0; g < group; g += PART) {
        const int64_t head = h * group + g;
        const char *qh = q + (s * q_stride + head * dim) * elsize;
        char *oh = out + (s * out_stride + head * dim) * elsize;
        const float *sh = sinks ? sinks + head : NULL;
        const int64_t length = last - first + 1;
        switch (group - g < PART ? group - g : PART) {
            case 1: attend_part(qh, &keys, &values, length, dim, 1, scale, sh, scores, oh, dtype, elsize); break;
            case 2: attend_part(qh, &keys, &values, length, dim, 2, scale, sh, scores, oh, dtype, elsize); break;
            case 3: attend_part(qh, &keys, &values, length, dim, 3, scale, sh, scores, oh, dtype, elsize); break;
            default: attend_part(qh, &keys, &values, length, dim, 4, scale, sh, scores, oh, dtype, elsize); break;
        }
    }
}

/* ---- bfloat16 caches on AMX: the scores of a whole GQA group (up to 16 heads) per tile product ----
 * 16 key rows of a cache block by 32 of their dimensions load straight from the cache as a tile (rows
 * slot_bytes apart) and multiply the group's queries, packed once per task as B tiles: one tile of 16 keys x 16
 * heads of float32 scores per 32 dimensions' product, where the vector path spends a horizontal sum per key and
 * head. The products of bfloat16 values are exact and summed in float32, then scaled. Keys past a run's last
 * full tile (the sequence's newest block) take AVX512-BF16 dot products; values stay on the vector path. */

/* The group's queries q [group, dim] (bfloat16) as B tiles: qp[(c * 16 + r) * 16 + g] = the pair q[g, 32 c + 2 r
 * ..], zero for g >= group. */
static void pack_queries(const uint32_t *q, uint32_t *qp, int64_t group, int64_t dim) {
    for (int64_t c = 0; c < dim / TILE_K; c++)
        for (int r = 0; r < TILE; r++)
            for (int g = 0; g < TILE; g++) qp[(c * TILE + r) * TILE + g] = g < group ? q[g * dim / 2 + c * TILE + r] : 0;
}

AMX static void scores_amx(const uint16_t *q, const uint32_t *qp, const Rows *keys, const Rows *values,
                           int64_t length, int64_t dim, int64_t group, float scale, float *scores) {
    const int64_t stride = keys->slot_bytes, row_bytes = dim * 2;
    float tile[TILE * TILE] __attribute__((aligned(64)));
    for (int64_t j = 0; j < length;) {
        const char *key;
        const int64_t count = next_run(keys, values, j, length, row_bytes, &key);
        int64_t i = 0;
        for (; i + TILE <= count; i += TILE) {
            _tile_zero(0);
            for (int64_t c = 0; c < dim / TILE_K; c++) {
                _tile_loadd(1, key + i * stride + c * 64, stride);
                _tile_loadd(2, qp + c * TILE * TILE, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, tile, 64);
            for (int64_t g = 0; g < group; g++)
                for (int t = 0; t < TILE; t++) scores[g * length + j + i + t] = tile[t * TILE + g] * scale;
        }
        for (; i < count; i++) {
            const char *row = key + i * stride;
            for (int64_t g = 0; g < group; g++) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t d = 0; d < dim; d += TILE_K)
                    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(row + d * 2),
                                           (__m512bh)_mm512_loadu_si512(q + g * dim + d));
                scores[g * length + j + i] = _mm512_reduce_add_ps(sum) * scale;
            }
        }
        j += count;
    }
}

/* The task's GQA group (bfloat16) in parts of up to 16 heads: scores on AMX, then softmax and values as on the
 * vector path (in parts of PART heads). */
AMX static void task_bf16_amx(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,
                              const int64_t *tables, int64_t table_stride, const int64_t *positions, char *out,
                              int64_t out_stride, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                              float scale, int64_t window, const float *sinks, int64_t t, float *scores) {
    const int64_t s = t / kv_heads, h = t % kv_heads, group = heads / kv_heads;
    const int64_t last = positions[s], first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    const int64_t length = last - first + 1, slot_bytes = kv_heads * dim * 2;
    const Rows keys = {k_cache + h * dim * 2, tables + s * table_stride, block_size, slot_bytes, first};
    const Rows values = {v_cache + h * dim * 2, tables + s * table_stride, block_size, slot_bytes, first};
    uint32_t qp[MAX_DIM / TILE_K * TILE * TILE] __attribute__((aligned(64)));
    float acc[PART * MAX_DIM], total[TILE];
    for (int64_t g0 = 0; g0 < group; g0 += TILE) {
        const int64_t size = group - g0 < TILE ? group - g0 : TILE, head = h * group + g0;
        const uint16_t *qh = (const uint16_t *)(q + (s * q_stride + head * dim) * 2);
        pack_queries((const uint32_t *)qh, qp, size, dim);
        scores_amx(qh, qp, &keys, &values, length, dim, size, scale, scores);
        for (int64_t g = 0; g < size; g++)
            total[g] = softmax_numerators(scores + g * length, length, sinks ? sinks + head + g : NULL);
        for (int64_t g = 0; g < size; g += PART) {
            const float *p = scores + g * length;
            char *o = out + (s * out_stride + (head + g) * dim) * 2;
            switch (size - g < PART ? size - g : PART) {
                case 1: values_part(p, total + g, &values, length, dim, 1, acc, o, BF16, 2); break;
                case 2: values_part(p, total + g, &values, length, dim, 2, acc, o, BF16, 2); break;
                case 3: values_part(p, total + g, &values, length, dim, 3, acc, o, BF16, 2); break;
                default: values_part(p, total + g, &values, length, dim, 4, acc, o, BF16, 2); break;
            }
        }
    }
}

/* One per dtype, each with its loads and stores inlined to one form. */
#define TASK_FOR(NAME, DTYPE, ELSIZE)                                                                            \
    TARGET static void NAME(const char *q, int64_t q_stride, const char *k_cache, const char *v_cache,        \
                            const int64_t *tables, int64_t table_stride, const int64_t *positions, char *out,  \
                            int64_t out_stride, int64_t heads, int64_t kv_heads, int64_t dim,                 \
                            int64_t block_size, float scale, int64_t window, const float *sinks, int64_t t,    \
                            float *scores) {                                                                 \
        task(q, q_stride, k_cache, v_cache, tables, table_stride, positions, out, out_stride, heads, kv_heads,  \
             dim, block_size, scale, window, sinks, t, scores, DTYPE, ELSIZE);                                \
    }
TASK_FOR(task_f32, F32, 4)
TASK_FOR(task_bf16, BF16, 2)
TASK_FOR(task_f16, F16, 2)

/* dim a multiple of 16 and at most MAX_DIM, heads a multiple of kv_heads: checked by the caller. Returns 0, or
 * -1 when the scores' scratch cannot be allocated (nothing attended then). */
int microscale_cpu_attention_step(const char *k_new, int64_t k_stride, const char *v_new, int64_t v_stride,
                                   const int64_t *slot_blocks, const int64_t *slot_offsets, int64_t tokens,
                                   const char *q, int64_t q_stride, char *k_cache, char *v_cache,
                                   const int64_t *tables, int64_t table_stride, const int64_t *positions,
                                   char *out, int64_t out_stride, int64_t n, int64_t heads, int64_t kv_heads,
                                   int64_t dim, int64_t block_size, float scale, int64_t window,
                                   const float *sinks, int dtype, int amx, int threads) {
    const int64_t elsize = dtype == F32 ? 4 : 2, slot_bytes = kv_heads * dim * elsize;
    for (int64_t i = 0; i < tokens; i++) {
        const int64_t slot = slot_blocks[i] * block_size + slot_offsets[i];
        memcpy(k_cache + slot * slot_bytes, k_new + i * k_stride * elsize, slot_bytes);
        memcpy(v_cache + slot * slot_bytes, v_new + i * v_stride * elsize, slot_bytes);
    }
    const int use_amx = amx && dtype == BF16 && dim % TILE_K == 0;
    const int64_t per_part = use_amx ? TILE : PART;
    const int64_t part = heads / kv_heads < per_part ? heads / kv_heads : per_part;
    int64_t longest = 0;
    for (int64_t s = 0; s < n; s++) longest = positions[s] + 1 > longest ? positions[s] + 1 : longest;
    /* With sequences enough to share out and slots of at most 1 KiB, a sequence's KV heads go to one thread: it
     * then reads its blocks whole, in order (1.1-1.2x the speed at 2-3 KV heads of 32-64 dimensions; at 8 KV
     * heads of 128, 2 KiB slots, 0.94x). Otherwise tasks are shared out by KV head (batch 1 too). */
    const int64_t together = n >= 4 * threads && slot_bytes <= 1024 ? kv_heads : 1, tasks = n * kv_heads;
    /* Both threads from a few hundred keys on: below that the work is done before a second thread would start. */
    const int parallel = threads > 1 && tasks > together && n * longest * kv_heads * dim >= (1 << 12);
    float *scratch = malloc(sizeof(float) * (parallel ? threads : 1) * part * longest);
    if (scratch == NULL) return -1;
#pragma omp parallel num_threads(threads) if (parallel)
    {
        float *scores = scratch + omp_get_thread_num() * part * longest;
        if (use_amx) configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t first = 0; first < tasks; first += together)
            for (int64_t t = first; t < first + together; t++)
                (use_amx ? task_bf16_amx : dtype == F32 ? task_f32 : dtype == BF16 ? task_bf16 : task_f16)(
                    q, q_stride, k_cache, v_cache, tables, table_stride, positions, out, out_stride, heads, kv_heads,
                    dim, block_size, scale, window, sinks, t, scores);
        if (use_amx) release_tiles();
    }
    free(scratch);
    return 0;
}
