/* Batched-decode products for aarch64 (shoal_matmul_rows_*): y [M, N] = x [M, K] W^T in bf16 for a decode
 * step of more rows than gemv.c's matrix-vector kernels take, with W in bf16, int8 or int4 as gemv.c lays
 * them out. Each thread takes tiles of TILE_N weight rows, turns a tile into float32 in its own buffer
 * (which stays in cache: the weight is read from memory once per step for all M rows) and multiplies it
 * against every activation row in ../lanes.h's 16 lanes (NEON registers where built with them).
 *
 * The tile holds exactly the values shoal_dequant_int4 writes as bf16 (int4), the int8 codes, or the bf16
 * weights; every product of two bf16 values is exact in float32, and each output is rounded once, as
 * x86/matmul_rows.c rounds it:
 *   bf16  y = bf16(sum)      int8  y = bf16(bf16(sum) * scale[n])      int4  y = bf16(sum)
 * The sums are lanes.h's (lane l: inputs k = l mod 16, fused multiply-adds in increasing k; then f16_sum),
 * so the NEON build and the portable one (the +nosimd level, where
 * shoal_rows_features() reports no kernels and the caller keeps dequantize + F.linear, but the entry points
 * still compute: they are the reference tests/backends/test_cpu_arm.py checks NEON against) give the same
 * bits. No BF16 (bfdot / bfmmla) or SME path yet: those CPUs take this NEON code.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "../kernel_common.h"
#include "../lanes.h"
#include "../shoal_cpu.h"

#define TILE_N 4 /* weight rows converted together: 4 x K float32 stays in L2 up to K ~ 16k */

enum { ROWS_BF16 = 0, ROWS_INT8 = 1, ROWS_INT4 = 2 };

typedef struct {
    int kind;           /* ROWS_* */
    const void *w;      /* gemv.c's layouts */
    const float *scale; /* int8: [N] */
    Int4Groups g;       /* int4 */
    int64_t N, K;
} RowsWeight;

/* The nibble of input i (0..127) of a 128-input int4 block: byte i's low nibble, or byte i - 64's high one. */
INLINE int int4_nibble(const uint8_t *block, int i) { return i < 64 ? block[i] & 0x0F : block[i - 64] >> 4; }

/* Weight row n as float32 into dst [K]: the bf16 value, the int8 code, or bf16((u - 8) * scale + zero). */
static void rows_weight_row(const RowsWeight *rw, int64_t n, float *dst) {
    const int64_t K = rw->K;
    if (rw->kind == ROWS_BF16) {
        const uint16_t *src = (const uint16_t *)rw->w + n * K;
        for (int64_t k = 0; k < K; k++) dst[k] = bf16_to_float(src[k]);
    } else if (rw->kind == ROWS_INT8) {
        const int8_t *src = (const int8_t *)rw->w + n * K;
        for (int64_t k = 0; k < K; k++) dst[k] = (float)src[k];
    } else {
        const Int4Groups *g = &rw->g;
        const uint8_t *src = (const uint8_t *)rw->w + n * (K / 2);
        const int64_t r = n * (K >> g->group_shift);
        for (int64_t k = 0; k < K; k += 128)
            for (int i = 0; i < 128; i += 32) { /* groups are 32 or more: one scale per 32 inputs */
                const int64_t gi = r + ((k + i) >> g->group_shift);
                const float s = load_value(g->scale, gi, g->scale_bf16), z = load_value(g->zero, gi, g->scale_bf16);
                for (int j = i; j < i + 32; j++)
                    dst[k + j] = bf16_to_float(float_to_bf16((float)(int4_nibble(src + k / 2, j) - 8) * s + z));
            }
    }
}

/* dot(w, x) over K inputs in lanes.h's order */
INLINE float rows_dot(const float *w, const float *x, int64_t K) {
    F16 acc = f16_zero();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) acc = f16_fma(f16_load(w + k), f16_load(x + k), acc);
    if (k < K) acc = f16_fma(f16_load_n(w + k, (int)(K - k)), f16_load_n(x + k, (int)(K - k)), acc);
    return f16_sum(acc);
}

INLINE uint16_t rows_output(const RowsWeight *rw, int64_t n, float sum) {
    return rw->kind == ROWS_INT8 ? float_to_bf16(bf16_to_float(float_to_bf16(sum)) * rw->scale[n]) : float_to_bf16(sum);
}

static int rows_matmul(const RowsWeight *rw, const uint16_t *x, int64_t M, uint16_t *y, int threads) {
    const int64_t K = rw->K, N = rw->N, tiles = (N + TILE_N - 1) / TILE_N;
    if (M < 1 || K < 1 || N < 1) return 1;
    float *xf = (float *)alloc((size_t)(M * K) * 4); /* the activations as float32, once */
    if (!xf) return 2;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
        float *tile = (float *)alloc((size_t)(TILE_N * K) * 4);
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (!tile) continue;
            const int64_t n0 = t * TILE_N, rows = N - n0 < TILE_N ? N - n0 : TILE_N;
            for (int64_t j = 0; j < rows; j++) rows_weight_row(rw, n0 + j, tile + j * K);
            for (int64_t m = 0; m < M; m++)
                for (int64_t j = 0; j < rows; j++)
                    y[m * N + n0 + j] = rows_output(rw, n0 + j, rows_dot(tile + j * K, xf + m * K, K));
        }
        free(tile);
    }
    free(xf);
    return failed ? 2 : 0;
}

/* amx is accepted for the shared signature and ignored: there are no tiles here. */
int shoal_matmul_rows_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int amx,
                           int threads) {
    (void)amx;
    const RowsWeight rw = {ROWS_BF16, w, NULL, {0}, N, K};
    return rows_matmul(&rw, x, M, y, threads);
}

int shoal_matmul_rows_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
                           uint16_t *y, int amx, int threads) {
    (void)amx;
    const RowsWeight rw = {ROWS_INT8, w, scale, {0}, N, K};
    return rows_matmul(&rw, x, M, y, threads);
}

int shoal_matmul_rows_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                           const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int amx,
                           int threads) {
    (void)amx;
    const int shift = group_shift(group);
    if (shift < 5 || K % group || K % 128) return 1;
    const RowsWeight rw = {ROWS_INT4, w, NULL, {scale, zero, scale_bf16, group, shift}, N, K};
    return rows_matmul(&rw, x, M, y, threads);
}

/* The features bits these kernels give this build (shoal_kernel_features): 4 = built with NEON. */
int shoal_rows_features(void) {
#ifdef SHOAL_LANES_NEON
    return 4;
#else
    return 0;
#endif
}
