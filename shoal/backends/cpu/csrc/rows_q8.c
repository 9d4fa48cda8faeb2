/* Batched decode with integer dot products: y [M, N] = x [M, K] W^T for a decode step of 9 to 64 bf16
 * activation rows against int4 weights (gemv.c's layout), on a CPU without AMX. There the multiplies, not
 * the weight reads, set a step's pace, and an 8-bit integer dot product (vpdpbusd: 64 products an
 * instruction) does twice the work of a bf16 one (vdpbf16ps: 32), so the activations are quantized to int8
 * per block of 32 inputs, as gemv.c's matrix-vector kernels and llama.cpp's Q8_0 do, and multiplied in
 * integers against the weights' nibbles.
 *
 * The lanes (lanes.h) hold 16 activation rows, not 16 inputs: each weight quad (4 consecutive inputs of
 * one weight row) is broadcast to every lane and multiplied against those 4 inputs of 16 rows, so one
 * integer sum per block of 32 inputs needs no reduction across lanes, and each block's activation scales
 * (one per row) are a vector. The activations are laid out that way once per call (Q8Lanes); the weights
 * are read in place, 8 rows a pass, once per lane group of 16 activation rows (from cache after the first),
 * their nibbles widened to bytes in L1.
 *
 * Per output (row m, weight row n), with q the activation codes, d their block scales, u the nibbles and
 * s, z the group's scale and zero:
 *     y = sum_groups [ s * sum_blocks d * (sum_block u q) + (z - 8 s) * xsum ]
 * xsum the group's activation sum as the codes give it (act_quant.h: group_sums): the zero term of
 * w = (u - 8) s + z. Every level of lanes.h gives the portable code's bits (tests/backends/gemv_bits.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "act_quant.h"
#include "kernel_common.h"
#include "lanes.h"
#include "shoal_cpu.h"

#define LANES 16
#define CHUNK 8 /* weight rows per pass, each with its own chain of integer sums */
#define VBLOCK 8 /* lane groups (of 16 activation rows) per sweep over the weight: 128 rows, 128 K bytes of codes */

/* The quantized activations with activation rows across the lanes, rows past M zero. */
typedef struct {
    int64_t M, K, V, B, G; /* V lane groups of 16 rows, B blocks of 32 inputs, G weight groups */
    int8_t *codes;         /* [V][K / 4][64]: byte 4 l + j of quad kq = row 16 v + l, input 4 kq + j */
    float *scale;          /* [V][B][16]: block b's scale of row 16 v + l */
    float *xsum;           /* [V][G][16]: group g's sum of row 16 v + l */
} Q8Lanes;

/* Row m of the activations (x bf16 [M, K]) into its lanes of a (zeros for a row past M); scratch: K floats,
 * K bytes, K / 4 + G floats. Rows of one lane group share cache lines: one thread should do all 16. */
static void q8_lanes_row(const uint16_t *x, Q8Lanes *a, int64_t m, int64_t group, float *scratch) {
    const int64_t K = a->K, B = a->B, G = a->G, v = m / LANES, l = m % LANES;
    float *xf = scratch, *lane_scale = xf + K, *sums = lane_scale + K / 4;
    int8_t *xq = (int8_t *)(sums + G);
    if (m < a->M) {
        for (int64_t k = 0; k < K; k++) xf[k] = bf16_to_float(x[m * K + k]);
        quantize_row(xf, K, xq, lane_scale);
        const QuantizedRows qm = {xq, lane_scale};
        group_sums(xf, &qm, K, group, sums);
    } else {
        memset(xq, 0, (size_t)K), memset(lane_scale, 0, (size_t)K), memset(sums, 0, (size_t)G * 4);
    }
    for (int64_t kq = 0; kq < K / 4; kq++) memcpy(a->codes + (v * (K / 4) + kq) * 64 + 4 * l, xq + 4 * kq, 4);
    for (int64_t b = 0; b < B; b++) a->scale[(v * B + b) * LANES + l] = lane_scale[b * (QBLOCK / 4)];
    for (int64_t g = 0; g < G; g++) a->xsum[(v * G + g) * LANES + l] = sums[g];
}

/* One 128-input block of an int4 weight row (64 bytes: input i in byte i's low nibble, 64 + i in its high
 * one) as 128 bytes in input order. */
INLINE void int4_block_bytes(const uint8_t *p, uint8_t *u) {
#if defined(__AVX512BW__)
    const __m512i b = _mm512_loadu_si512(p), low = _mm512_set1_epi8(0x0F);
    _mm512_storeu_si512(u, _mm512_and_si512(b, low));
    _mm512_storeu_si512(u + 64, _mm512_and_si512(_mm512_srli_epi16(b, 4), low));
#elif defined(__AVX2__)
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; h++) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        _mm256_storeu_si256((__m256i *)(u + 32 * h), _mm256_and_si256(b, low));
        _mm256_storeu_si256((__m256i *)(u + 64 + 32 * h), _mm256_and_si256(_mm256_srli_epi16(b, 4), low));
    }
#else
    for (int i = 0; i < 64; i++) u[i] = p[i] & 0x0F, u[64 + i] = p[i] >> 4;
#endif
}

/* Weight rows [n0, n0 + nb) against lane group v (activation rows 16 v .. 16 v + 15): out[16 j + l] = the
 * output of activation row 16 v + l and weight row n0 + j. nb is a constant where it is called, so the
 * accumulators stay in registers and the nb integer chains interleave (8 rows: as fast as the dot products
 * go in an ad-hoc loop on a Zen 4; 4 rows x 2 lane groups, sharing each broadcast, ran at 0.7 of that). */
INLINE void int4_lanes(const Q8Lanes *a, const uint8_t *w, const Int4Groups *g, int64_t n0, int64_t v, const int nb,
                       float *out) {
    const int64_t K = a->K, B = a->B, G = a->G, per_group = g->group / QBLOCK;
    const int8_t *codes = a->codes + v * (K / 4) * 64;
    F16 acc[CHUNK], gacc[CHUNK];
    uint8_t u[CHUNK][128];
    for (int j = 0; j < nb; j++) acc[j] = f16_zero(), gacc[j] = f16_zero();
    for (int64_t c = 0; c < K / 128; c++) {
        for (int j = 0; j < nb; j++) {
            const uint8_t *row = w + (n0 + j) * (K / 2) + 64 * c;
            SHOAL_PREFETCH(row + CHUNK * (K / 2)); /* the same block of the next pass's rows */
            int4_block_bytes(row, u[j]);
        }
        for (int bb = 0; bb < 4; bb++) {
            const int64_t b = 4 * c + bb;
            I16 dot[CHUNK];
            for (int j = 0; j < nb; j++) dot[j] = i16_zero();
            for (int qq = 0; qq < QBLOCK / 4; qq++) {
                const int8_t *x = codes + (b * (QBLOCK / 4) + qq) * 64;
#pragma GCC unroll 8
                for (int j = 0; j < nb; j++) dot[j] = i16_dot_u4_bcast(dot[j], u[j] + QBLOCK * bb + 4 * qq, x);
            }
            const F16 d = f16_load(a->scale + (v * B + b) * LANES);
            for (int j = 0; j < nb; j++) gacc[j] = f16_fma(f16_from_i16(dot[j]), d, gacc[j]);
            if ((b + 1) % per_group == 0) { /* the group's end: its scale, and its zero term */
                const int64_t gi = b / per_group;
                const F16 xsum = f16_load(a->xsum + (v * G + gi) * LANES);
                for (int j = 0; j < nb; j++) {
                    const float s = load_value(g->scale, (n0 + j) * G + gi, g->scale_bf16);
                    const float z = load_value(g->zero, (n0 + j) * G + gi, g->scale_bf16);
                    acc[j] = f16_fma(gacc[j], f16_set1(s), acc[j]);
                    acc[j] = f16_fma(f16_set1(fmaf(-8.0f, s, z)), xsum, acc[j]);
                    gacc[j] = f16_zero();
                }
            }
        }
    }
    for (int j = 0; j < nb; j++) f16_store(out + j * LANES, acc[j]);
}

/* out [nb][16] (int4_lanes) into y [M, N] as bf16: rounded in one loop (it vectorizes), then placed */
static void store_lanes(const float *out, int64_t M, int64_t N, int64_t n0, int64_t v, int nb, uint16_t *y) {
    uint16_t rounded[CHUNK * LANES];
    for (int i = 0; i < nb * LANES; i++) rounded[i] = float_to_bf16(out[i]);
    for (int l = 0; l < LANES && v * LANES + l < M; l++) {
        uint16_t *row = y + (v * LANES + l) * N + n0;
        for (int j = 0; j < nb; j++) row[j] = rounded[j * LANES + l];
    }
}

int shoal_matmul_rows_q8_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                              const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int threads) {
    const int shift = group_shift(group);
    if (M < 1 || N < 1 || shift < 5 || K % group || K % 128) return 1;
    const int64_t V = (M + LANES - 1) / LANES, G = K / group;
    Q8Lanes a = {M, K, V, K / QBLOCK, G, NULL, NULL, NULL};
    a.codes = (int8_t *)alloc((size_t)(V * K * LANES));
    a.scale = (float *)alloc((size_t)(V * a.B * LANES) * 4);
    a.xsum = (float *)alloc((size_t)(V * G * LANES) * 4);
    if (!a.codes || !a.scale || !a.xsum) { /* nothing written: out of memory */
        free(a.codes), free(a.scale), free(a.xsum);
        return 2;
    }
    int failed = 0;
    const Int4Groups g = {scale, zero, scale_bf16, group, shift};
    const int64_t chunks = (N + CHUNK - 1) / CHUNK;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)alloc((size_t)(K + K / 4 + G) * 4 + (size_t)K);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static, LANES)
        for (int64_t m = 0; m < V * LANES; m++)
            if (scratch) q8_lanes_row(x, &a, m, group, scratch);
        free(scratch);
        /* a block of lane groups at a time, so that the weight rows of a pass meet activations held in L2 (a
         * prefill chunk of thousands of rows re-read from memory for every pass ran at a third of the speed) */
        for (int64_t v0 = 0; v0 < V; v0 += VBLOCK)
#pragma omp for schedule(static)
        for (int64_t t = 0; t < chunks; t++) {
            if (failed) continue;
            float out[CHUNK * LANES];
            const int64_t n0 = t * CHUNK;
            for (int64_t v = v0; v < V && v < v0 + VBLOCK; v++) {
                if (n0 + CHUNK <= N) {
                    int4_lanes(&a, w, &g, n0, v, CHUNK, out);
                    store_lanes(out, M, N, n0, v, CHUNK, y);
                } else {
                    for (int64_t n = n0; n < N; n++) {
                        int4_lanes(&a, w, &g, n, v, 1, out);
                        store_lanes(out, M, N, n, v, 1, y);
                    }
                }
            }
        }
    }
    free(a.codes), free(a.scale), free(a.xsum);
    return failed ? 2 : 0;
}
