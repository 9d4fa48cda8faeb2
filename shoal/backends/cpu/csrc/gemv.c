/* Matrix-vector kernels for the CPU backend: y[m, n] = sum_k x[m, k] * W[n, k] for a few activation
 * rows m (batch-1 and small-batch decode), with W in bf16, int8 per output channel, or int4 per group;
 * the same products for a batched decode step of more rows (shoal_matmul_rows_*) are ISA-specific and live
 * in x86/matmul_rows.c and arm/matmul_rows.c (generic/matmul_rows.c elsewhere).
 *
 * Decode reads every weight once per step, so these kernels are built to stream W at the memory's
 * speed: each thread takes a contiguous range of output rows and reads each weight row exactly once,
 * multiplying it against every activation row (which stay in cache).
 *
 *   bf16 weights: float32 dot products (or, with AVX512-BF16 and bf16 activations, bf16 pair products);
 *                 the activations are used as given.
 *   int8 / int4:  with bf16 activations, as llama.cpp does, the activations are quantized to int8 with
 *                 one scale per block of 32 and the weights are multiplied in integers (vpdpbusd with
 *                 AVX512-VNNI, vpmaddubsw elsewhere: exact either way); the partial sums are then scaled
 *                 in float32. float32 activations are used as given, the weights widened to float32.
 *
 * Every dot product is written once against the 16 lanes of lanes.h, which each ISA (AVX-512, AVX2,
 * portable C) implements with the same operations lane for lane: every level shoal/backends/cpu/isa.py
 * builds gives the portable code's bits (the one exception, bf16 pair products, says so below). Built at
 * first use by shoal/backends/cpu/build.py and linked into the process's OpenMP runtime (torch's own).
 *
 * Layouts (row-major, contiguous):
 *   x      [M, K], float32 (act_bf16 = 0) or bf16 (act_bf16 = 1); y [M, N] in the same dtype
 *   bf16   W uint16 [N, K]
 *   int8   W int8 [N, K], scale float32 [N]:  w = q * scale                      (K % 16 == 0)
 *   int4   W uint8 [N, K / 2], per block of 128 inputs 64 bytes, byte i holding input i in its low
 *          nibble and input 64 + i in its high one; scale and zero [N, K / group] in float32 or bf16
 *          (scale_bf16): w = (u - 8) * scale + zero       (K % 128 == 0, group a power of two >= 32)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "act_quant.h"
#include "kernel_common.h"
#include "lanes.h"
#include "shoal_cpu.h"

#define MAX_ROWS 8   /* activation rows per call; the Python side uses a matmul above this */
#define ROW_BLOCK 4  /* activation rows multiplied per pass over a weight row */
#ifndef PREFETCH
/* bytes ahead in the weight stream: against 2048, 4096 read the 0.5B Llama's int8 weights (and its output
 * head) 4% faster and its bf16 ones 2% in an ad-hoc timing (2 threads, medians of 5); 8192 no better.
 * On Intel CPUs the build sets 16384 (build.py: tuning_flags, measured on an AMX Xeon). */
#define PREFETCH 4096
#endif
#ifndef X4_AHEAD
/* dot_int4_x4: weight rows ahead whose bytes it asks for (4: the next pass; 8 and 16 were no faster, ad hoc) */
#define X4_AHEAD 4
#endif



/* ---- bf16 weights ---------------------------------------------------------------------------- */

/* One bf16 weight row against rows [0, mb) of xf (float32) or xb (bf16 activations): dots[m]. */
INLINE void dot_bf16_impl(const uint16_t *w, const float *xf, const uint16_t *xb, int64_t K, const int mb,
                          float *dots) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    /* bf16 pairs, 32 products per instruction, float32 sums: the one path whose bits are the hardware's
     * (vdpbf16ps flushes denormals and rounds its pairs as it does), not the portable code's */
    if (xb && K % 32 == 0) {
        __m512 acc[ROW_BLOCK][2];
        for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k) + PREFETCH + 64, _MM_HINT_T0);
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
            for (int m = 0; m < mb; m++) {
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xb + m * K + k));
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32));
            }
        }
        for (; k < K; k += 32) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
            for (int m = 0; m < mb; m++)
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(xb + m * K + k));
        }
        for (int m = 0; m < mb; m++) dots[m] = f16_sum((F16){_mm512_add_ps(acc[m][0], acc[m][1])});
        return;
    }
#endif
    if (K % 16 == 0) { /* 32 lanes: inputs k + [0, 16) in the first accumulator, k + [16, 32) in the second */
        F16 acc[ROW_BLOCK][2];
        for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = f16_zero();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            SHOAL_PREFETCH((const char *)(w + k) + PREFETCH);
            const F16 w0 = f16_from_bf16(w + k), w1 = f16_from_bf16(w + k + 16);
            for (int m = 0; m < mb; m++) {
                acc[m][0] = f16_fma(w0, f16_load(xf + m * K + k), acc[m][0]);
                acc[m][1] = f16_fma(w1, f16_load(xf + m * K + k + 16), acc[m][1]);
            }
        }
        if (k < K) {
            const F16 w0 = f16_from_bf16(w + k);
            for (int m = 0; m < mb; m++) acc[m][0] = f16_fma(w0, f16_load(xf + m * K + k), acc[m][0]);
        }
        for (int m = 0; m < mb; m++) dots[m] = f16_sum(f16_add(acc[m][0], acc[m][1]));
        return;
    }
    for (int m = 0; m < mb; m++) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; k++) s += bf16_to_float(w[k]) * xf[m * K + k];
        dots[m] = s;
    }
}

static void dot_bf16(const uint16_t *w, const float *xf, const uint16_t *xb, int64_t K, int mb, float *dots) {
    switch (mb) { /* constant row counts, so the accumulators live in registers */
    case 1: dot_bf16_impl(w, xf, xb, K, 1, dots); break;
    case 2: dot_bf16_impl(w, xf, xb, K, 2, dots); break;
    case 3: dot_bf16_impl(w, xf, xb, K, 3, dots); break;
    default: dot_bf16_impl(w, xf, xb, K, 4, dots); break;
    }
}

int shoal_gemv_bf16(const void *x, int act_bf16, int64_t M, int64_t K, const uint16_t *w, int64_t N, void *y,
                    int threads) {
    if (M < 1 || M > MAX_ROWS) return 1;
    float *xf = activations(x, act_bf16, M, K);
    if (!xf) return 2;
    const uint16_t *xb = act_bf16 ? (const uint16_t *)x : NULL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int mb = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dots[ROW_BLOCK];
            dot_bf16(w + (size_t)n * (size_t)K, xf + m0 * K, xb ? xb + m0 * K : NULL, K, mb, dots);
            for (int m = 0; m < mb; m++) store_value(y, (m0 + m) * N + n, dots[m], act_bf16);
        }
    }
    free(xf);
    return 0;
}

/* ---- int8 weights, one scale per output row -------------------------------------------------- */

INLINE void dot_int8_impl(const int8_t *w, const float *xf, const QuantizedRows *q, int64_t K, const int mb,
                          float *dots) {
    F16 acc[ROW_BLOCK];
    for (int m = 0; m < mb; m++) acc[m] = f16_zero();
    if (q->xq) { /* per 64 inputs: 16 exact integer sums of 4 products, each times its block's scale */
        for (int64_t k = 0; k < K; k += 64) {
            SHOAL_PREFETCH((const char *)(w + k) + PREFETCH);
            for (int m = 0; m < mb; m++) {
                const I16 d = i16_dot_s8s8(q->xq + m * K + k, w + k);
                acc[m] = f16_fma(f16_from_i16(d), f16_load(q->lane_scale + m * (K / 4) + k / 4), acc[m]);
            }
        }
    } else {
        for (int64_t k = 0; k < K; k += 16) {
            const F16 wv = f16_from_i8(w + k);
            for (int m = 0; m < mb; m++) acc[m] = f16_fma(wv, f16_load(xf + m * K + k), acc[m]);
        }
    }
    for (int m = 0; m < mb; m++) dots[m] = f16_sum(acc[m]);
}

static void dot_int8(const int8_t *w, const float *xf, const QuantizedRows *q, int64_t K, int mb, float *dots) {
    switch (mb) {
    case 1: dot_int8_impl(w, xf, q, K, 1, dots); break;
    case 2: dot_int8_impl(w, xf, q, K, 2, dots); break;
    case 3: dot_int8_impl(w, xf, q, K, 3, dots); break;
    default: dot_int8_impl(w, xf, q, K, 4, dots); break;
    }
}

int shoal_gemv_int8(const void *x, int act_bf16, int64_t M, int64_t K, const int8_t *w, const float *scale,
                    int64_t N, void *y, int threads) {
    if (M < 1 || M > MAX_ROWS || K % 16) return 1;
    float *xf = activations(x, act_bf16, M, K);
    if (!xf) return 2;
    QuantizedRows q = {NULL, NULL};
    /* bf16 activations are quantized (speed); float32 ones are multiplied as given (exact). */
    if (act_bf16 && K % 64 == 0 && quantize_rows(xf, M, K, &q)) {
        free(xf);
        return 2;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int mb = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dots[ROW_BLOCK];
            const QuantizedRows qm = rows_from(&q, m0, K);
            dot_int8(w + (size_t)n * (size_t)K, xf + m0 * K, &qm, K, mb, dots);
            for (int m = 0; m < mb; m++) store_value(y, (m0 + m) * N + n, dots[m] * scale[n], act_bf16);
        }
    }
    free(q.xq);
    free(q.lane_scale);
    free(xf);
    return 0;
}

/* ---- int4 weights, a scale and a zero per group ---------------------------------------------- */

/* t[m] = lanes whose sum is sum_g (zero - 8 * scale)[g] * xsum[m, g], for one weight row. */
INLINE void zero_terms(const Int4Groups *g, int64_t r, const float *xsum, int64_t G, const int mb, const int sb,
                       F16 *t) {
    for (int m = 0; m < mb; m++) t[m] = f16_zero();
    for (int64_t gi = 0; gi < G; gi += 16) {
        const int n = G - gi >= 16 ? 16 : (int)(G - gi);
        F16 sv, zv;
        if (sb) {
            sv = f16_from_bf16_n((const uint16_t *)g->scale + r + gi, n);
            zv = f16_from_bf16_n((const uint16_t *)g->zero + r + gi, n);
        } else {
            sv = f16_load_n((const float *)g->scale + r + gi, n);
            zv = f16_load_n((const float *)g->zero + r + gi, n);
        }
        const F16 offset = f16_fma(f16_set1(-8.0f), sv, zv);
        for (int m = 0; m < mb; m++) t[m] = f16_fma(offset, f16_load_n(xsum + m * G + gi, n), t[m]);
    }
}

/* s[h] = the scales of inputs k + 64 h + [0, 64) of weight row r (its scales at row offset r), one per lane
 * as the lanes of an integer dot product cover the inputs (4 each). */
INLINE void int4_block_scales(const Int4Groups *g, int64_t r, int64_t k, const int sb, const int g32, F16 *s) {
    const int gs = g->group_shift;
#ifdef SHOAL_LANES_AVX512
    if (sb) {
        /* bf16 scales of groups >= 64: the block's one or two scales in one 32-bit broadcast; bf16 -> float32
         * is then a shift (or a mask) per half, instead of a scalar load, shift and broadcast */
        __m512i scale_bits;
        if (!g32) {
            const uint16_t *sp = (const uint16_t *)g->scale + r + (k >> gs);
            uint32_t word = sp[0];
            if (gs == 6) word |= (uint32_t)sp[1] << 16; /* group 64: one scale per half */
            else word |= word << 16;                    /* larger: both halves in one group */
            scale_bits = _mm512_set1_epi32((int)word);
        } else { /* group 32: the block's four scales, 16 bits each, in every 64-bit lane */
            uint64_t four;
            memcpy(&four, (const uint16_t *)g->scale + r + k / 32, 8);
            scale_bits = _mm512_set1_epi64((long long)four);
        }
        for (int h = 0; h < 2; h++) {
            if (!g32) {
                s[h].v = _mm512_castsi512_ps(h ? _mm512_and_si512(scale_bits, _mm512_set1_epi32((int)0xFFFF0000u))
                                               : _mm512_slli_epi32(scale_bits, 16));
            } else {
                /* lanes 0-7 take scale 2h, lanes 8-15 scale 2h + 1, each in the upper 16 bits of its lane
                 * (the lower 16 zeroed): bf16 as float32 */
                const __m512i pick = h ? _mm512_set_epi16(7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0,
                                                          6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0)
                                       : _mm512_set_epi16(5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0,
                                                          4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
                s[h].v = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16((__mmask32)0xAAAAAAAAu, pick, scale_bits));
            }
        }
        return;
    }
#endif
    for (int h = 0; h < 2; h++) {
        const int64_t k0 = k + 64 * h;
        s[h] = g32 ? f16_set2(load_value(g->scale, r + k0 / 32, sb), load_value(g->scale, r + k0 / 32 + 1, sb))
                   : f16_set1(load_value(g->scale, r + (k0 >> gs), sb));
    }
}

/* Per 128 inputs of quantized activations, for activation rows m < mb (row m's codes at xq + m ldx, its lane
 * scales at ls + m ldx / 4): for each 64-input half h, 16 exact integer sums of 4 products, times their
 * activation block's scale, times their weight group's scale, added to acc[m][h]. The weight group's scales
 * are read once for all rows, and the rows' loop is unrolled so the accumulators stay in registers. */
INLINE void int4_block(const uint8_t *wb, const Int4Groups *g, int64_t r, const int8_t *xq, const float *ls,
                       int64_t ldx, int64_t k, const int mb, const int sb, const int g32, F16 (*acc)[2]) {
    F16 s[2];
    int4_block_scales(g, r, k, sb, g32, s);
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
        for (int h = 0; h < 2; h++) {
            const I16 d = i16_dot_u4s8(wb, h, xq + m * ldx + k + 64 * h);
            acc[m][h] = f16_fma(f16_mul(f16_from_i16(d), f16_load(ls + m * (ldx / 4) + (k + 64 * h) / 4)), s[h],
                                acc[m][h]);
        }
}

/* Per 128 inputs of float32 activations, rows m < mb (row m's block at xm + m ldx), as given: the 64 weight
 * bytes' nibbles widened to floats once (each byte's low one an input of the first 64-input half, its high
 * one of the second) and multiplied against each row's activations 16 at a time; each group's sum (one per
 * half for groups of 64 or more, which never straddle the halves; two for groups of 32) times its scale,
 * added to acc[m][h]. */
INLINE void int4_block_f32(const uint8_t *wb, const Int4Groups *g, int64_t r, const float *xm, int64_t ldx,
                           int64_t k, const int mb, const int sb, const int g32, F16 (*acc)[2]) {
    const int gs = g->group_shift;
    F16 u[2][4]; /* [half][16-input chunk] */
    for (int c = 0; c < 4; c++) f16_from_u4(wb + 16 * c, &u[0][c], &u[1][c]);
    F16 sa[2], sc[2]; /* per half: the scale of its first 32 inputs, and of its second (groups of 32) */
    for (int h = 0; h < 2; h++) {
        const int64_t k0 = k + 64 * h;
        sa[h] = f16_set1(load_value(g->scale, r + (k0 >> gs), sb));
        sc[h] = g32 ? f16_set1(load_value(g->scale, r + k0 / 32 + 1, sb)) : sa[h];
    }
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
        for (int h = 0; h < 2; h++) {
            const float *x = xm + m * ldx + 64 * h;
            const F16 pa = f16_fma(u[h][1], f16_load(x + 16), f16_mul(u[h][0], f16_load(x)));
            const F16 pc = f16_fma(u[h][3], f16_load(x + 48), f16_mul(u[h][2], f16_load(x + 32)));
            if (g32) acc[m][h] = f16_fma(pc, sc[h], f16_fma(pa, sa[h], acc[m][h]));
            else acc[m][h] = f16_fma(f16_add(pa, pc), sa[h], acc[m][h]);
        }
}

/* int4_block or int4_block_f32, chosen by the constant q8 (whether the activations are quantized, q->xq): xm is
 * the float32 activations at the block's first input, read only when they are not. */
INLINE void int4_block_rows(const uint8_t *wb, const Int4Groups *g, int64_t r, const float *xm, const QuantizedRows *q,
                            int64_t ldx, int64_t k, const int mb, const int sb, const int g32, const int q8,
                            F16 (*acc)[2]) {
    if (q8) int4_block(wb, g, r, q->xq, q->lane_scale, ldx, k, mb, sb, g32, acc);
    else int4_block_f32(wb, g, r, xm, ldx, k, mb, sb, g32, acc);
}

/* Four consecutive int4 weight rows (from w, row_bytes apart; their scales at row offsets r + j G)
 * against one activation row (quantized where q->xq is set, else the float32 xf as given): dots[j], each
 * the bits dot_int4_impl gives for it with mb = 1
 * (the same operations in the same order), but one pass shares the activation's loads among the four,
 * reduces them together, and keeps four independent streams of work in flight. Batch-1 decode's rows
 * are short (a 1024-input row is 8 blocks), so the per-row reduction and call overhead counted: about
 * a fifth of the single-row kernel's time in an ad-hoc perf profile. */
INLINE void dot_int4_x4_impl(const uint8_t *w, int64_t row_bytes, const Int4Groups *g, int64_t r, int64_t G,
                             const float *xf, const QuantizedRows *q, const float *xsum, int64_t K, const int sb,
                             const int g32, const int q8, float *dots) {
    F16 acc[4][2];
    for (int j = 0; j < 4; j++) {
        zero_terms(g, r + j * G, xsum, G, 1, sb, &acc[j][1]);
        acc[j][0] = f16_zero();
    }
    /* The four rows' accumulators must stay in registers: the row loop is unrolled (left to itself, gcc 12
     * kept a loop over j with acc[j] in memory, a store and a reload per FMA: 0.6x the speed on a Zen 5). */
    for (int64_t k = 0; k < K; k += 128) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const uint8_t *wj = w + j * row_bytes + k / 2;
            SHOAL_PREFETCH((const char *)wj + X4_AHEAD * row_bytes); /* X4_AHEAD rows on */
            int4_block_rows(wj, g, r + j * G, xf + k, q, K, k, 1, sb, g32, q8, &acc[j]);
        }
    }
    f16_sum4(f16_add(acc[0][0], acc[0][1]), f16_add(acc[1][0], acc[1][1]), f16_add(acc[2][0], acc[2][1]),
             f16_add(acc[3][0], acc[3][1]), dots);
}

static void dot_int4_x4(const uint8_t *w, int64_t row_bytes, const Int4Groups *g, int64_t r, int64_t G,
                        const float *xf, const QuantizedRows *q, const float *xsum, int64_t K, float *dots) {
    switch ((q->xq ? 4 : 0) + (g->scale_bf16 ? 2 : 0) + (g->group == 32 ? 1 : 0)) {
    case 0: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 0, 0, 0, dots); break;
    case 1: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 0, 1, 0, dots); break;
    case 2: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 1, 0, 0, dots); break;
    case 3: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 1, 1, 0, dots); break;
    case 4: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 0, 0, 1, dots); break;
    case 5: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 0, 1, 1, dots); break;
    case 6: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 1, 0, 1, dots); break;
    default: dot_int4_x4_impl(w, row_bytes, g, r, G, xf, q, xsum, K, 1, 1, 1, dots); break;
    }
}

/* One int4 weight row (its scales and zeros at row offset `r`) against rows [0, mb); xsum [M, K / group]
 * holds each group's sum of the activations, for the (zero - 8 * scale) term. */
INLINE void dot_int4_impl(const uint8_t *w, const Int4Groups *g, int64_t r, const float *xf, const QuantizedRows *q,
                          const float *xsum, int64_t K, const int mb, const int sb, const int g32, const int q8,
                          float *dots) {
    const int64_t G = K >> g->group_shift;
    F16 t[ROW_BLOCK]; /* the zero terms */
    zero_terms(g, r, xsum, G, mb, sb, t);
    F16 acc[ROW_BLOCK][2]; /* one per half, so consecutive FMAs do not wait on each other; the zero terms
                            * start the second: one reduction per row */
    for (int m = 0; m < mb; m++) acc[m][0] = f16_zero(), acc[m][1] = t[m];
    /* The weight rows of a thread are one stream: ask for the bytes PREFETCH ahead now, so that the loads
     * overlap this compute-heavy loop (the hardware prefetcher alone leaves the 0.5B Llama's int4 decode
     * at ~9 GB/s in an ad-hoc timing). */
    for (int64_t k = 0; k < K; k += 128) {
        SHOAL_PREFETCH((const char *)(w + k / 2) + PREFETCH);
        int4_block_rows(w + k / 2, g, r, xf + k, q, K, k, mb, sb, g32, q8, acc);
    }
    for (int m = 0; m < mb; m++) dots[m] = f16_sum(f16_add(acc[m][0], acc[m][1]));
}

/* Dispatch on the constants the inner loop branches on: rows, quantized activations, bf16 scales, group 32. */
#define DOT_INT4_CASE(MB, Q8, SB, G32) \
    case (MB) * 8 + (Q8) * 4 + (SB) * 2 + (G32): dot_int4_impl(w, g, r, xf, q, xsum, K, MB, SB, G32, Q8, dots); break;
#define DOT_INT4_KINDS(MB, Q8) \
    DOT_INT4_CASE(MB, Q8, 0, 0) DOT_INT4_CASE(MB, Q8, 0, 1) DOT_INT4_CASE(MB, Q8, 1, 0) DOT_INT4_CASE(MB, Q8, 1, 1)
#define DOT_INT4_ROWS(MB) DOT_INT4_KINDS(MB, 0) DOT_INT4_KINDS(MB, 1)

static void dot_int4(const uint8_t *w, const Int4Groups *g, int64_t r, const float *xf, const QuantizedRows *q,
                     const float *xsum, int64_t K, int mb, float *dots) {
    switch (mb * 8 + (q->xq ? 4 : 0) + (g->scale_bf16 ? 2 : 0) + (g->group == 32 ? 1 : 0)) {
        DOT_INT4_ROWS(1)
        DOT_INT4_ROWS(2)
        DOT_INT4_ROWS(3)
        DOT_INT4_ROWS(4)
    }
}

int shoal_gemv_int4(const void *x, int act_bf16, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                    const void *zero, int scale_bf16, int64_t group, int64_t N, void *y, int threads) {
    const int shift = group_shift(group);
    if (M < 1 || M > MAX_ROWS || shift < 5 || K % group || K % 128) return 1;
    float *xf = activations(x, act_bf16, M, K);
    if (!xf) return 2;
    const int64_t G = K / group;
    float *xsum = (float *)alloc((size_t)(M * G) * 4);
    QuantizedRows q = {NULL, NULL};
    int failed = !xsum || (act_bf16 && quantize_rows(xf, M, K, &q));
    if (failed) {
        free(xsum), free(q.xq), free(q.lane_scale), free(xf);
        return 2;
    }
    for (int64_t m = 0; m < M; m++) {
        const QuantizedRows qm = rows_from(&q, m, K);
        group_sums(xf + m * K, &qm, K, group, xsum + m * G);
    }
    const Int4Groups groups = {scale, zero, scale_bf16, group, shift};
    if (M == 1) { /* batch-1 decode: four weight rows at a time (the same bits as one at a time) */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n += 4) {
            float dots[4];
            if (n + 4 <= N) {
                dot_int4_x4(w + (size_t)n * (size_t)(K / 2), K / 2, &groups, n * G, G, xf, &q, xsum, K, dots);
                for (int j = 0; j < 4; j++) store_value(y, n + j, dots[j], act_bf16);
            } else {
                for (int64_t r = n; r < N; r++) {
                    dot_int4(w + (size_t)r * (size_t)(K / 2), &groups, r * G, xf, &q, xsum, K, 1, dots);
                    store_value(y, r, dots[0], act_bf16);
                }
            }
        }
        free(xsum), free(q.xq), free(q.lane_scale), free(xf);
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int mb = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dots[ROW_BLOCK];
            const QuantizedRows qm = rows_from(&q, m0, K);
            dot_int4(w + (size_t)n * (size_t)(K / 2), &groups, n * G, xf + m0 * K, &qm, xsum + m0 * G, K, mb, dots);
            for (int m = 0; m < mb; m++) store_value(y, (m0 + m) * N + n, dots[m], act_bf16);
        }
    }
    free(xsum), free(q.xq), free(q.lane_scale), free(xf);
    return 0;
}

/* ---- several matrix-vector products in one parallel region ------------------------------------
 * A MoE layer decoding one token multiplies its activation by 6-8 small expert weights (gate_up), then
 * each expert's own activation by its down weight: a dozen calls of the kernels above, each paying its
 * fork and join of the threads and its own preparation of the same activation. Here `count` products
 * y_j = x_j W_j^T (one activation row each) share one parallel region: each thread takes an equal share
 * of the weight bytes of all of them, and every activation is converted (and quantized) once however
 * many products read it. Each output is computed exactly as shoal_gemv_<kind> computes it for that row
 * alone (the same dot product, scale and rounding): the same bits. */

typedef ShoalWeight GemvWeight; /* shoal_cpu.h: one weight, as a layer describes it */

/* One activation row as the dot products read it. */
typedef struct {
    const void *x;      /* as given (the key for sharing) */
    int64_t k;
    float *xf;          /* float32 copy */
    QuantizedRows q;    /* int8 codes (NULL where not quantized) */
    float *xsum;        /* int4: group sums, per product (groups may differ) */
} GemvInput;

static int64_t gemv_row_bytes(const GemvWeight *w) {
    if (w->kind == 0) return 2 * w->k;
    if (w->kind == 1) return w->k + 4;
    return w->k / 2 + 2 * (w->k / w->group) * (w->scale_bf16 ? 2 : 4);
}

/* y_j [n_j] = x_j [k_j] W_j^T for j < count, activations and outputs in one dtype (act_bf16). Returns 1 for
 * what the single-product kernels reject (and a weight with a bias), 2 when out of memory. */
int shoal_gemv_many(const GemvWeight *const *weights, const void *const *xs, void *const *ys, int64_t count,
                    int act_bf16, int threads) {
    if (count < 1) return 0;
    for (int64_t j = 0; j < count; j++) {
        const GemvWeight *w = weights[j];
        if (w->bias || w->n < 1 || w->k < 1 || w->kind < 0 || w->kind > 2) return 1;
        if (w->kind == 1 && w->k % 16) return 1;
        if (w->kind == 2 && (group_shift(w->group) < 5 || w->k % w->group || w->k % 128)) return 1;
    }
    GemvInput *in = (GemvInput *)calloc((size_t)count, sizeof(GemvInput));
    int64_t *owner = (int64_t *)malloc((size_t)count * sizeof(int64_t)); /* the product whose input j reads */
    int code = (!in || !owner) ? 2 : 0;
    for (int64_t j = 0; j < count && !code; j++) {
        const GemvWeight *w = weights[j];
        owner[j] = j;
        for (int64_t i = 0; i < j; i++)
            if (owner[i] == i && in[i].x == xs[j] && in[i].k == w->k) {
                owner[j] = i;
                break;
            }
        in[j].x = xs[j], in[j].k = w->k;
        GemvInput *src = &in[owner[j]];
        if (owner[j] == j) {
            src->xf = activations(xs[j], act_bf16, 1, w->k);
            if (!src->xf) code = 2;
        }
        /* as shoal_gemv_int8 / _int4 decide: bf16 activations quantized for int8 (K % 64 == 0) and int4 */
        if (!code && act_bf16 && w->kind != 0 && w->k % 64 == 0 && !src->q.xq && quantize_rows(src->xf, 1, w->k, &src->q))
            code = 2;
        if (!code && w->kind == 2) { /* group sums as shoal_gemv_int4 computes them */
            const int64_t G = w->k / w->group;
            in[j].xsum = (float *)alloc((size_t)G * 4);
            if (!in[j].xsum) {
                code = 2;
                break;
            }
            group_sums(src->xf, &src->q, w->k, w->group, in[j].xsum);
        }
    }
    int64_t total = 0;
    for (int64_t j = 0; j < count; j++) total += weights[j]->n * gemv_row_bytes(weights[j]);
    if (!code) {
#pragma omp parallel num_threads(threads)
        {
            /* this thread's rows: those whose first byte falls in its equal share of all the bytes */
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
            int64_t start = 0; /* bytes before product j */
            for (int64_t j = 0; j < count; j++) {
                const GemvWeight *w = weights[j];
                const int64_t per = gemv_row_bytes(w), K = w->k, n_end = w->n;
                int64_t r0 = lo > start ? (lo - start + per - 1) / per : 0;
                int64_t r1 = hi > start ? (hi - start + per - 1) / per : 0;
                start += n_end * per;
                if (r1 > n_end) r1 = n_end;
                const GemvInput *src = &in[owner[j]];
                const uint16_t *xb = act_bf16 ? (const uint16_t *)xs[j] : NULL;
                const Int4Groups groups = {w->scale, w->zero, (int)w->scale_bf16, w->group, group_shift(w->group)};
                int64_t r = r0;
                if (w->kind == 2) /* four rows at a time where they fit (the same bits) */
                    for (float dots[4]; r + 4 <= r1; r += 4) {
                        dot_int4_x4((const uint8_t *)w->weight + (size_t)r * (size_t)(K / 2), K / 2, &groups,
                                    r * (K >> groups.group_shift), K >> groups.group_shift, src->xf, &src->q,
                                    in[j].xsum, K, dots);
                        for (int i = 0; i < 4; i++) store_value(ys[j], r + i, dots[i], act_bf16);
                    }
                for (; r < r1; r++) {
                    float dot;
                    if (w->kind == 0) {
                        dot_bf16((const uint16_t *)w->weight + (size_t)r * (size_t)K, src->xf, xb, K, 1, &dot);
                    } else if (w->kind == 1) {
                        dot_int8((const int8_t *)w->weight + (size_t)r * (size_t)K, src->xf, &src->q, K, 1, &dot);
                        dot *= ((const float *)w->scale)[r];
                    } else {
                        dot_int4((const uint8_t *)w->weight + (size_t)r * (size_t)(K / 2), &groups, r * (K >> groups.group_shift),
                                 src->xf, &src->q, in[j].xsum, K, 1, &dot);
                    }
                    store_value(ys[j], r, dot, act_bf16);
                }
            }
        }
    }
    if (in)
        for (int64_t j = 0; j < count; j++) {
            free(in[j].xsum);
            if (owner && owner[j] == j) free(in[j].xf), free(in[j].q.xq), free(in[j].q.lane_scale);
        }
    free(in), free(owner);
    return code;
}

/* The int4 weight above as bf16 (out_bf16) or float32 [N, K], for prefill, where a matmul on the CPU's
 * matrix units wins. */
int shoal_dequant_int4(const uint8_t *w, const void *scale, const void *zero, int scale_bf16, int64_t group,
                       int64_t N, int64_t K, void *out, int out_bf16, int threads) {
    const int shift = group_shift(group);
    if (shift < 5 || K % group || K % 128) return 1;
    const int64_t G = K / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wrow = w + (size_t)n * (size_t)(K / 2);
        const int64_t row = n * K;
        for (int64_t k = 0; k < K; k += 128) {
            const uint8_t *b = wrow + k / 2;
            for (int i = 0; i < 128; i += 32) { /* groups are 32 or more: one scale per 32 inputs */
                const int64_t gi = n * G + ((k + i) >> shift);
                const float s = load_value(scale, gi, scale_bf16), z = load_value(zero, gi, scale_bf16);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
                for (int j = i; j < i + 32; j += 16) {
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(b + (j < 64 ? j : j - 64)));
                    if (j >= 64) bytes = _mm_srli_epi16(bytes, 4);
                    bytes = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
                    const __m512 u = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), _mm512_set1_ps(8.0f));
                    /* multiply, then add: rounded as torch's separate operations round */
                    const __m512 v = _mm512_add_ps(_mm512_mul_ps(u, _mm512_set1_ps(s)), _mm512_set1_ps(z));
                    if (out_bf16)
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + row + k + j), (__m256i)_mm512_cvtneps_pbh(v));
                    else
                        _mm512_storeu_ps((float *)out + row + k + j, v);
                }
                continue;
#endif
                for (int j = i; j < i + 32; j++) {
                    const int u = j < 64 ? b[j] & 0x0F : b[j - 64] >> 4;
                    store_value(out, row + k + j, (float)(u - 8) * s + z, out_bf16);
                }
            }
        }
    }
    return 0;
}

/* ---- the reference the kernels are measured against (shoal doctor) ------------------------------ */

/* Reads nbytes at p (nbytes % 256 == 0) once, as the kernels read weights: each thread one contiguous share,
 * four 64-byte lines a step into four independent vector accumulators, prefetched PREFETCH ahead; *out = the
 * xor of every 64-bit word, so that no read can be left out. A stream read with nothing else to do: torch's
 * reductions (sum, dot) and a scalar loop reached less than the bf16 matrix-vector kernel on an AMX Xeon's
 * memory (25-30 GB/s against 32.7, 2.4 GB read, ad hoc), so they could not serve as the kernels' ceiling. */
typedef uint64_t StreamLine __attribute__((vector_size(64), aligned(8)));

int shoal_stream_read(const void *p, int64_t nbytes, uint64_t *out, int threads) {
    if (nbytes % 256) return 1;
    const char *bytes = (const char *)p;
    const int64_t steps = nbytes / 256;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        StreamLine acc[4] = {{0}, {0}, {0}, {0}};
#pragma omp for schedule(static)
        for (int64_t step = 0; step < steps; step++) {
            const char *at = bytes + 256 * step;
            for (int j = 0; j < 4; j++) {
                SHOAL_PREFETCH(at + 64 * j + PREFETCH);
                StreamLine line;
                memcpy(&line, at + 64 * j, 64);
                acc[j] ^= line;
            }
        }
        const StreamLine all = (acc[0] ^ acc[1]) ^ (acc[2] ^ acc[3]);
        for (int i = 0; i < 8; i++) total ^= all[i];
    }
    *out = total;
    return 0;
}

/* What this build uses: 1 = bf16 activations quantized to int8 for int8 / int4 weights (on every ISA),
 * 2 = bf16 pair products, 4 = the shoal_matmul_rows_* kernels (AVX512-BF16, or NEON), 8 = AMX for them
 * (built in, and granted by the OS), 16 = the dot products' lanes are AVX-512 registers, 32 = AVX2
 * registers, 64 = NEON registers, 128 = with NEON's int8 dot products (without 16, 32 or 64 they are the
 * portable C loops), 256 = shoal_matmul_rows_int4 multiplies with rows_q8.c's integer kernel where AMX is not
 * used, vectorized (x86; arm/ keeps its NEON bf16 kernel). */
int shoal_kernel_features(void) {
    int features = 1;
    features |= shoal_rows_features(); /* 4 and 8, from the batched kernels of this ISA */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    features |= 2;
#endif
#if defined(SHOAL_LANES_AVX512)
    features |= 16 | 256;
#elif defined(SHOAL_LANES_AVX2)
    features |= 32 | 256;
#elif defined(SHOAL_LANES_NEON)
    features |= 64;
#ifdef __ARM_FEATURE_DOTPROD
    features |= 128;
#endif
#endif
    return features;
}
