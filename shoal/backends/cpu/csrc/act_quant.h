/* Activations as gemv.c's and rows_q8.c's integer dot products read them: bf16 or float32 rows as float32,
 * quantized to int8 per block of 32 inputs (as llama.cpp's Q8_0), and their per-group sums for the int4
 * zero terms. Shared by both files, defined once here. */
#ifndef SHOAL_ACT_QUANT_H
#define SHOAL_ACT_QUANT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "kernel_common.h"

#define QBLOCK 32    /* inputs per activation scale when activations are quantized */

/* x as float32 [M, K]. */
static inline float *activations(const void *x, int act_bf16, int64_t M, int64_t K) {
    float *xf = (float *)alloc((size_t)(M * K) * 4);
    if (!xf) return NULL;
    if (act_bf16) {
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(xb[i]);
    } else {
        memcpy(xf, x, (size_t)(M * K * 4));
    }
    return xf;
}

/* Activations quantized per block of 32: xq int8 [M, K], and each block's scale repeated for the 8
 * int32 lanes of a vpdpbusd result that cover it: lane_scale float32 [M, K / 4]. */
typedef struct {
    int8_t *xq;
    float *lane_scale;
} QuantizedRows;

/* The quantized activations from row m0 on (NULL pointers where the activations are not quantized). */
static inline QuantizedRows rows_from(const QuantizedRows *q, int64_t m0, int64_t K) {
    QuantizedRows rows = {q->xq ? q->xq + m0 * K : NULL, q->xq ? q->lane_scale + m0 * (K / 4) : NULL};
    return rows;
}

/* One row of K inputs (K % 32 == 0) into its codes and lane scales. */
static inline void quantize_row(const float *xf, int64_t K, int8_t *xq, float *lane_scale) {
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        const float *xs = xf + b * QBLOCK;
        int8_t *qs = xq + b * QBLOCK;
        float *lanes = lane_scale + b * (QBLOCK / 4);
#ifdef __AVX512F__
        const __m512 x0 = _mm512_loadu_ps(xs), x1 = _mm512_loadu_ps(xs + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* cvtps rounds to nearest even (the default rounding mode), as lrintf does */
        _mm_storeu_si128((__m128i *)qs, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x0, inv))));
        _mm_storeu_si128((__m128i *)(qs + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x1, inv))));
        _mm256_storeu_ps(lanes, _mm256_set1_ps(amax / 127.0f));
#else
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(xs[i]));
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < QBLOCK; i++) qs[i] = (int8_t)lrintf(xs[i] * inv);
        for (int i = 0; i < QBLOCK / 4; i++) lanes[i] = d;
#endif
    }
}

static inline int quantize_rows(const float *xf, int64_t M, int64_t K, QuantizedRows *q) {
    q->xq = (int8_t *)alloc((size_t)(M * K));
    q->lane_scale = (float *)alloc((size_t)(M * K / 4) * 4);
    if (!q->xq || !q->lane_scale) return 2;
    for (int64_t m = 0; m < M; m++) quantize_row(xf + m * K, K, q->xq + m * K, q->lane_scale + m * (K / 4));
    return 0;
}

/* xsum[g] = the sum of one activation row's inputs in group g, as the dot products see them (quantized
 * where they are: per block of 32, its scale times the sum of its codes), so that the zero term cancels the
 * scale term's offset exactly as in w = (u - 8) * scale + zero. */
static inline void group_sums(const float *xf, const QuantizedRows *q, int64_t K, int64_t group, float *xsum) {
    for (int64_t gi = 0; gi < K / group; gi++) {
        float s = 0.0f;
        if (q->xq) {
            for (int64_t b = gi * group / QBLOCK; b < (gi + 1) * group / QBLOCK; b++) {
                int codes = 0;
                for (int i = 0; i < QBLOCK; i++) codes += q->xq[b * QBLOCK + i];
                s += (float)codes * q->lane_scale[b * (QBLOCK / 4)];
            }
        } else {
            for (int64_t k = gi * group; k < (gi + 1) * group; k++) s += xf[k];
        }
        xsum[gi] = s;
    }
}

#endif
