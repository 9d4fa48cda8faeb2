/* Sixteen float32 lanes (F16) and sixteen int32 lanes (I16): the unit every dot product of gemv.c
 * accumulates in, written once per ISA with the same operation in every lane:
 *
 *     AVX-512    one 512-bit register
 *     AVX2       two 256-bit registers, lanes 0-7 and 8-15
 *     NEON       four 128-bit registers (aarch64), lanes 0-3, 4-7, 8-11, 12-15; int8 dot products with
 *                vdotq_s32 where the CPU has them (armv8.2-a+dotprod), else widening multiplies
 *     portable   sixteen floats in a struct, for every other CPU (and the reference of the two above)
 *
 * A kernel written against these operations gives the same bits on every ISA level: each lane sees the
 * same multiplies and adds in the same order (fma is one rounding everywhere: the portable code calls
 * fmaf), the integer dot products are exact, and the 16 lanes are summed by one tree (f16_sum). So the
 * portable build is the reference every vector build is checked against, bit for bit
 * (tests/backends/test_cpu_gemv_isa.py; the NEON builds, cross-compiled and run under qemu-user, by
 * tests/backends/test_cpu_arm.py), and a new ISA is one more block of this file.
 *
 * The integer dot products take 64 bytes and give 16 lanes, lane l the sum of the four products of
 * bytes 4l .. 4l + 3 (as vpdpbusd lays them out). */
#ifndef SHOAL_LANES_H
#define SHOAL_LANES_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernel_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define SHOAL_LANES_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define SHOAL_LANES_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON) /* not at the portable level: it builds with +nosimd */
#define SHOAL_LANES_NEON 1
#include <arm_neon.h>
#endif

#if defined(SHOAL_LANES_AVX512) || defined(SHOAL_LANES_AVX2)
#include <immintrin.h>
#define SHOAL_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define SHOAL_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)
#endif

/* ---- AVX-512 ----------------------------------------------------------------------------------- */
#if defined(SHOAL_LANES_AVX512)
#define SHOAL_LANES_NAME "avx512"
typedef struct { __m512 v; } F16;
typedef struct { __m512i v; } I16;

INLINE F16 f16_zero(void) { return (F16){_mm512_setzero_ps()}; }
INLINE F16 f16_set1(float a) { return (F16){_mm512_set1_ps(a)}; }
/* lanes 0-7 a, lanes 8-15 b */
INLINE F16 f16_set2(float a, float b) { return (F16){_mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1)}; }
INLINE F16 f16_load(const float *p) { return (F16){_mm512_loadu_ps(p)}; }
/* the first n (1..16) lanes from p, the others 0 */
INLINE F16 f16_load_n(const float *p, int n) { return (F16){_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p)}; }
INLINE F16 f16_from_bf16(const uint16_t *p) {
    return (F16){_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16))};
}
INLINE F16 f16_from_bf16_n(const uint16_t *p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return (F16){_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
INLINE F16 f16_from_i8(const int8_t *p) {
    return (F16){_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)))};
}
/* the 16 bytes at p as floats 0..15: their low nibbles (lo) and their high ones (hi) */
INLINE void f16_from_u4(const uint8_t *p, F16 *lo, F16 *hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    lo->v = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
    hi->v = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
INLINE F16 f16_add(F16 a, F16 b) { return (F16){_mm512_add_ps(a.v, b.v)}; }
INLINE F16 f16_mul(F16 a, F16 b) { return (F16){_mm512_mul_ps(a.v, b.v)}; }
INLINE F16 f16_fma(F16 a, F16 b, F16 c) { return (F16){_mm512_fmadd_ps(a.v, b.v, c.v)}; }
INLINE F16 f16_from_i16(I16 a) { return (F16){_mm512_cvtepi32_ps(a.v)}; }
INLINE void f16_store(float *p, F16 a) { _mm512_storeu_ps(p, a.v); }
INLINE I16 i16_zero(void) { return (I16){_mm512_setzero_si512()}; }
/* acc + per lane l: sum_j u[j] x[4 l + j], u the 4 bytes at u4 (each 0..15, the same for every lane), x 64
 * int8 */
INLINE I16 i16_dot_u4_bcast(I16 acc, const uint8_t *u4, const int8_t *x) {
    int32_t word;
    memcpy(&word, u4, 4);
    const __m512i u = _mm512_set1_epi32(word), xv = _mm512_loadu_si512(x);
#ifdef __AVX512VNNI__
    return (I16){_mm512_dpbusd_epi32(acc.v, u, xv)};
#else
    return (I16){_mm512_add_epi32(acc.v, _mm512_madd_epi16(_mm512_maddubs_epi16(u, xv), _mm512_set1_epi16(1)))};
#endif
}

/* per 4 bytes: sum a[i] b[i], a and b int8 with a in [-127, 127] */
INLINE I16 i16_dot_s8s8(const int8_t *a, const int8_t *b) {
    const __m512i av = _mm512_loadu_si512(a), bv = _mm512_loadu_si512(b);
#ifdef __AVX512VNNI__
    /* vpdpbusd wants its first operand unsigned: sum (a + 128) b - sum 128 b */
    const __m512i c128 = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_xor_si512(av, c128), bv);
    return (I16){_mm512_sub_epi32(d, _mm512_dpbusd_epi32(zero, c128, bv))};
#else
    /* |b| (unsigned) times a with b's sign: pairs of products stay within int16 (|a| <= 127) */
    const __m512i ub = _mm512_abs_epi8(bv);
    const __mmask64 neg = _mm512_movepi8_mask(bv);
    const __m512i sa = _mm512_mask_sub_epi8(av, neg, _mm512_setzero_si512(), av);
    return (I16){_mm512_madd_epi16(_mm512_maddubs_epi16(ub, sa), _mm512_set1_epi16(1))};
#endif
}
/* per 4 bytes: sum u[i] b[i], u the low (high = 0) or high nibbles of the 64 bytes at p, b int8 */
INLINE I16 i16_dot_u4s8(const uint8_t *p, int high, const int8_t *b) {
    __m512i u = _mm512_loadu_si512(p);
    if (high) u = _mm512_srli_epi16(u, 4);
    u = _mm512_and_si512(u, _mm512_set1_epi8(0x0F));
    const __m512i bv = _mm512_loadu_si512(b);
#ifdef __AVX512VNNI__
    return (I16){_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, bv)};
#else
    return (I16){_mm512_madd_epi16(_mm512_maddubs_epi16(u, bv), _mm512_set1_epi16(1))};
#endif
}

/* [sum of a, sum of b, sum of c, sum of d], each in f16_sum's order: kernel_common.h's reduce4 */
INLINE void f16_sum4(F16 a, F16 b, F16 c, F16 d, float *out) { _mm_storeu_ps(out, reduce4(a.v, b.v, c.v, d.v)); }

/* ---- AVX2 -------------------------------------------------------------------------------------- */
#elif defined(SHOAL_LANES_AVX2)
#define SHOAL_LANES_NAME "avx2"
typedef struct { __m256 lo, hi; } F16;
typedef struct { __m256i lo, hi; } I16;

INLINE F16 f16_zero(void) { return (F16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
INLINE F16 f16_set1(float a) { return (F16){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
INLINE F16 f16_set2(float a, float b) { return (F16){_mm256_set1_ps(a), _mm256_set1_ps(b)}; }
INLINE F16 f16_load(const float *p) { return (F16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
INLINE F16 f16_load_n(const float *p, int n) {
    float buf[16] = {0};
    memcpy(buf, p, (size_t)n * 4);
    return f16_load(buf);
}
INLINE __m256 bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
INLINE F16 f16_from_bf16(const uint16_t *p) {
    return (F16){bf16x8(_mm_loadu_si128((const __m128i *)p)), bf16x8(_mm_loadu_si128((const __m128i *)(p + 8)))};
}
INLINE F16 f16_from_bf16_n(const uint16_t *p, int n) {
    uint16_t buf[16] = {0};
    memcpy(buf, p, (size_t)n * 2);
    return f16_from_bf16(buf);
}
INLINE F16 f16_from_i8(const int8_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return (F16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
INLINE void f16_from_u4(const uint8_t *p, F16 *lo, F16 *hi) {
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    const __m256i low = _mm256_set1_epi32(0x0F);
    lo->lo = _mm256_cvtepi32_ps(_mm256_and_si256(a, low)), lo->hi = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
    hi->lo = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), hi->hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
INLINE F16 f16_add(F16 a, F16 b) { return (F16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
INLINE F16 f16_mul(F16 a, F16 b) { return (F16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
INLINE F16 f16_fma(F16 a, F16 b, F16 c) { return (F16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
INLINE F16 f16_from_i16(I16 a) { return (F16){_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
INLINE void f16_store(float *p, F16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
INLINE I16 i16_zero(void) { return (I16){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
INLINE I16 i16_dot_u4_bcast(I16 acc, const uint8_t *u4, const int8_t *x) {
    int32_t word;
    memcpy(&word, u4, 4);
    const __m256i u = _mm256_set1_epi32(word), one = _mm256_set1_epi16(1); /* pairs <= 2 * 15 * 128: int16 */
    return (I16){_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)x)), one)),
                 _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(x + 32))), one))};
}

/* 32 bytes: per 4, sum a[i] b[i] (|a| <= 127): |b| unsigned times a with b's sign, pairs within int16 */
INLINE __m256i dot_s8s8_x8(__m256i a, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(b), _mm256_sign_epi8(a, b)), _mm256_set1_epi16(1));
}
INLINE I16 i16_dot_s8s8(const int8_t *a, const int8_t *b) {
    return (I16){dot_s8s8_x8(_mm256_loadu_si256((const __m256i *)a), _mm256_loadu_si256((const __m256i *)b)),
                 dot_s8s8_x8(_mm256_loadu_si256((const __m256i *)(a + 32)), _mm256_loadu_si256((const __m256i *)(b + 32)))};
}
INLINE __m256i dot_u4s8_x8(__m256i u, int high, __m256i b) {
    if (high) u = _mm256_srli_epi16(u, 4);
    u = _mm256_and_si256(u, _mm256_set1_epi8(0x0F));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, b), _mm256_set1_epi16(1));
}
INLINE I16 i16_dot_u4s8(const uint8_t *p, int high, const int8_t *b) {
    return (I16){dot_u4s8_x8(_mm256_loadu_si256((const __m256i *)p), high, _mm256_loadu_si256((const __m256i *)b)),
                 dot_u4s8_x8(_mm256_loadu_si256((const __m256i *)(p + 32)), high, _mm256_loadu_si256((const __m256i *)(b + 32)))};
}

/* per 128-bit lane [q_a, q_b, q_c, q_d], q the lane's (x0 + x2) + (x1 + x3) */
INLINE __m256 quad_sums(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}
INLINE void f16_sum4(F16 a, F16 b, F16 c, F16 d, float *out) {
    /* quads 0, 1 in lo; 2, 3 in hi: (q0 + q2) + (q1 + q3) */
    const __m256 h = _mm256_add_ps(quad_sums(a.lo, b.lo, c.lo, d.lo), quad_sums(a.hi, b.hi, c.hi, d.hi));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

/* ---- NEON (aarch64) ---------------------------------------------------------------------------- */
#elif defined(SHOAL_LANES_NEON)
#ifdef __ARM_FEATURE_DOTPROD
#define SHOAL_LANES_NAME "neon-dotprod"
#else
#define SHOAL_LANES_NAME "neon"
#endif
typedef struct { float32x4_t v[4]; } F16;
typedef struct { int32x4_t v[4]; } I16;

INLINE F16 f16_zero(void) { const float32x4_t z = vdupq_n_f32(0.0f); return (F16){{z, z, z, z}}; }
INLINE F16 f16_set1(float a) { const float32x4_t v = vdupq_n_f32(a); return (F16){{v, v, v, v}}; }
INLINE F16 f16_set2(float a, float b) {
    const float32x4_t va = vdupq_n_f32(a), vb = vdupq_n_f32(b);
    return (F16){{va, va, vb, vb}};
}
INLINE F16 f16_load(const float *p) { return (F16){{vld1q_f32(p), vld1q_f32(p + 4), vld1q_f32(p + 8), vld1q_f32(p + 12)}}; }
INLINE F16 f16_load_n(const float *p, int n) {
    float buf[16] = {0};
    memcpy(buf, p, (size_t)n * 4);
    return f16_load(buf);
}
/* bf16 -> float32: the 16 bits moved up */
INLINE float32x4_t bf16x4(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
INLINE F16 f16_from_bf16(const uint16_t *p) {
    const uint16x8_t a = vld1q_u16(p), b = vld1q_u16(p + 8);
    return (F16){{bf16x4(vget_low_u16(a)), bf16x4(vget_high_u16(a)), bf16x4(vget_low_u16(b)), bf16x4(vget_high_u16(b))}};
}
INLINE F16 f16_from_bf16_n(const uint16_t *p, int n) {
    uint16_t buf[16] = {0};
    memcpy(buf, p, (size_t)n * 2);
    return f16_from_bf16(buf);
}
INLINE F16 f16_from_i8(const int8_t *p) {
    const int8x16_t b = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
    return (F16){{vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
                  vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)))}};
}
INLINE void f16_from_u4(const uint8_t *p, F16 *lo, F16 *hi) {
    const uint8x16_t bytes = vld1q_u8(p);
    const uint8x16_t u[2] = {vandq_u8(bytes, vdupq_n_u8(0x0F)), vshrq_n_u8(bytes, 4)};
    F16 *out[2] = {lo, hi};
    for (int h = 0; h < 2; h++) {
        const uint16x8_t a = vmovl_u8(vget_low_u8(u[h])), b = vmovl_u8(vget_high_u8(u[h]));
        out[h]->v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))), out[h]->v[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(a)));
        out[h]->v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(b))), out[h]->v[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(b)));
    }
}
INLINE F16 f16_add(F16 a, F16 b) { for (int j = 0; j < 4; j++) a.v[j] = vaddq_f32(a.v[j], b.v[j]); return a; }
INLINE F16 f16_mul(F16 a, F16 b) { for (int j = 0; j < 4; j++) a.v[j] = vmulq_f32(a.v[j], b.v[j]); return a; }
/* c + a b, one rounding: as fmaf */
INLINE F16 f16_fma(F16 a, F16 b, F16 c) { for (int j = 0; j < 4; j++) c.v[j] = vfmaq_f32(c.v[j], a.v[j], b.v[j]); return c; }
INLINE F16 f16_from_i16(I16 a) {
    F16 r;
    for (int j = 0; j < 4; j++) r.v[j] = vcvtq_f32_s32(a.v[j]);
    return r;
}
INLINE void f16_store(float *p, F16 a) { for (int j = 0; j < 4; j++) vst1q_f32(p + 4 * j, a.v[j]); }
INLINE I16 i16_zero(void) { const int32x4_t z = vdupq_n_s32(0); return (I16){{z, z, z, z}}; }

/* 16 bytes: per 4, sum a[i] b[i]. With dot products one vdotq_s32; else the 16 products widened to int16
 * (|a b| <= 128 * 128 fits) and added in pairs twice: the same exact sums. */
INLINE int32x4_t dot_s8x16(int8x16_t a, int8x16_t b) {
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(vdupq_n_s32(0), a, b);
#else
    const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    const int32x4_t hi = vpaddlq_s16(vmull_s8(vget_high_s8(a), vget_high_s8(b)));
    return vpaddq_s32(lo, hi);
#endif
}
INLINE I16 i16_dot_s8s8(const int8_t *a, const int8_t *b) {
    I16 r;
    for (int j = 0; j < 4; j++) r.v[j] = dot_s8x16(vld1q_s8(a + 16 * j), vld1q_s8(b + 16 * j));
    return r;
}
INLINE I16 i16_dot_u4s8(const uint8_t *p, int high, const int8_t *b) {
    I16 r;
    for (int j = 0; j < 4; j++) {
        const uint8x16_t bytes = vld1q_u8(p + 16 * j);
        const uint8x16_t u = high ? vshrq_n_u8(bytes, 4) : vandq_u8(bytes, vdupq_n_u8(0x0F));
        r.v[j] = dot_s8x16(vreinterpretq_s8_u8(u), vld1q_s8(b + 16 * j)); /* nibbles 0..15: exact as int8 */
    }
    return r;
}
INLINE I16 i16_dot_u4_bcast(I16 acc, const uint8_t *u4, const int8_t *x) {
    uint32_t word;
    memcpy(&word, u4, 4);
    const int8x16_t u = vreinterpretq_s8_u32(vdupq_n_u32(word)); /* 0..15: exact as int8 */
    for (int j = 0; j < 4; j++) acc.v[j] = vaddq_s32(acc.v[j], dot_s8x16(u, vld1q_s8(x + 16 * j)));
    return acc;
}

/* the portable tree below, on the stored lanes: (x0 + x2) + (x1 + x3) per quad, then (q0 + q2) + (q1 + q3) */
INLINE float quad_sum(const float *x) { return (x[0] + x[2]) + (x[1] + x[3]); }
INLINE void f16_sum4(F16 a, F16 b, F16 c, F16 d, float *out) {
    const F16 *v[4] = {&a, &b, &c, &d};
    for (int j = 0; j < 4; j++) {
        float l[16];
        for (int q = 0; q < 4; q++) vst1q_f32(l + 4 * q, v[j]->v[q]);
        out[j] = (quad_sum(l) + quad_sum(l + 8)) + (quad_sum(l + 4) + quad_sum(l + 12));
    }
}

/* ---- portable C: the reference ----------------------------------------------------------------- */
#else
#define SHOAL_LANES_NAME "portable"
typedef struct { float l[16]; } F16;
typedef struct { int32_t l[16]; } I16;

INLINE F16 f16_zero(void) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = 0.0f; return r; }
INLINE F16 f16_set1(float a) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = a; return r; }
INLINE F16 f16_set2(float a, float b) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = i < 8 ? a : b; return r; }
INLINE F16 f16_load(const float *p) { F16 r; memcpy(r.l, p, 64); return r; }
INLINE F16 f16_load_n(const float *p, int n) { F16 r = f16_zero(); memcpy(r.l, p, (size_t)n * 4); return r; }
INLINE F16 f16_from_bf16(const uint16_t *p) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = bf16_to_float(p[i]); return r; }
INLINE F16 f16_from_bf16_n(const uint16_t *p, int n) {
    F16 r = f16_zero();
    for (int i = 0; i < n; i++) r.l[i] = bf16_to_float(p[i]);
    return r;
}
INLINE F16 f16_from_i8(const int8_t *p) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = (float)p[i]; return r; }
INLINE void f16_from_u4(const uint8_t *p, F16 *lo, F16 *hi) {
    for (int i = 0; i < 16; i++) lo->l[i] = (float)(p[i] & 0x0F), hi->l[i] = (float)(p[i] >> 4);
}
INLINE F16 f16_add(F16 a, F16 b) { for (int i = 0; i < 16; i++) a.l[i] += b.l[i]; return a; }
INLINE F16 f16_mul(F16 a, F16 b) { for (int i = 0; i < 16; i++) a.l[i] *= b.l[i]; return a; }
INLINE F16 f16_fma(F16 a, F16 b, F16 c) { for (int i = 0; i < 16; i++) c.l[i] = fmaf(a.l[i], b.l[i], c.l[i]); return c; }
INLINE F16 f16_from_i16(I16 a) { F16 r; for (int i = 0; i < 16; i++) r.l[i] = (float)a.l[i]; return r; }
INLINE void f16_store(float *p, F16 a) { memcpy(p, a.l, 64); }
INLINE I16 i16_zero(void) { I16 r; for (int i = 0; i < 16; i++) r.l[i] = 0; return r; }
INLINE I16 i16_dot_u4_bcast(I16 acc, const uint8_t *u4, const int8_t *x) {
    for (int i = 0; i < 16; i++)
        acc.l[i] += u4[0] * x[4 * i] + u4[1] * x[4 * i + 1] + u4[2] * x[4 * i + 2] + u4[3] * x[4 * i + 3];
    return acc;
}
INLINE I16 i16_dot_s8s8(const int8_t *a, const int8_t *b) {
    I16 r;
    for (int i = 0; i < 16; i++)
        r.l[i] = a[4 * i] * b[4 * i] + a[4 * i + 1] * b[4 * i + 1] + a[4 * i + 2] * b[4 * i + 2] + a[4 * i + 3] * b[4 * i + 3];
    return r;
}
INLINE I16 i16_dot_u4s8(const uint8_t *p, int high, const int8_t *b) {
    I16 r;
    for (int i = 0; i < 16; i++) {
        int32_t s = 0;
        for (int j = 4 * i; j < 4 * i + 4; j++) s += (high ? p[j] >> 4 : p[j] & 0x0F) * b[j];
        r.l[i] = s;
    }
    return r;
}
INLINE float quad_sum(const float *x) { return (x[0] + x[2]) + (x[1] + x[3]); }
INLINE void f16_sum4(F16 a, F16 b, F16 c, F16 d, float *out) {
    const F16 *v[4] = {&a, &b, &c, &d};
    for (int j = 0; j < 4; j++) {
        const float *l = v[j]->l;
        out[j] = (quad_sum(l) + quad_sum(l + 8)) + (quad_sum(l + 4) + quad_sum(l + 12));
    }
}
#endif

/* The sum of a's 16 lanes: per quad of lanes q = (x0 + x2) + (x1 + x3), then (q0 + q2) + (q1 + q3). */
INLINE float f16_sum(F16 a) {
    float out[4];
    f16_sum4(a, a, a, a, out);
    return out[0];
}

#endif
