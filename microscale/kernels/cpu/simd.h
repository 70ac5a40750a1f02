/* What the CPU kernels (the .c files beside it) share: the instruction set they are compiled for, set per
 * function (AVX2, FMA, F16C: x86-64 since 2013; callers check microscale_cpu_supported first), and 8-wide float32
 * loads from the dtypes they read. Built by microscale/kernels/cpu_build.py, which hashes this header with each
 * source. */

#ifndef MICROSCALE_CPU_SIMD_H
#define MICROSCALE_CPU_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE __attribute__((always_inline)) inline

enum { F32 = 0, BF16 = 1, F16 = 2 }; /* the dtype codes of kernels/cpu_gemv.py and kernels/cpu_attention.py */

int microscale_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* Eight values of `dtype` at p as float32 (bfloat16: the high half of a float32; float16: F16C). */
TARGET static INLINE __m256 load8(const void *p, int dtype) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dtype == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

TARGET static INLINE float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
