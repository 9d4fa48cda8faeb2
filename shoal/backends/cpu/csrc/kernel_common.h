/* What gemv.c and the ISA-specific batched kernels (x86/) share: the ISA macros of this build, the
 * allocator, the AVX-512 lane reductions and the int4 group descriptor. Each helper is defined here once. */
#ifndef SHOAL_KERNEL_COMMON_H
#define SHOAL_KERNEL_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bf16.h"

/* ISA paths this build takes, from the compiler's target (-march, capped by shoal/backends/cpu/isa.py) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SHOAL_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SHOAL_ROWS 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define SHOAL_AMX 1
#endif
#endif

static inline void *alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

#ifdef __AVX512F__
/* [sum of a, sum of b, sum of c, sum of d]: each sum's order of adds does not depend on the other three */
INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* per 128-bit lane: [a, b, c, d] partial sums */
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* The sum of a's lanes in reduce4's order, so that a dot product reduced alone or four at a time has the
 * same bits. */
INLINE float reduce_lanes(__m512 a) { return _mm_cvtss_f32(reduce4(a, a, a, a)); }
#endif

/* log2(group) for a power of two from 32 up, else -1 */
static inline int group_shift(int64_t group) {
    for (int shift = 5; shift < 31; shift++)
        if (group == ((int64_t)1 << shift)) return shift;
    return -1;
}

typedef struct {
    const void *scale, *zero;
    int scale_bf16;
    int64_t group;
    int group_shift; /* group = 1 << group_shift: the inner loops shift, never divide */
} Int4Groups;

#endif
