/* Test driver for tests/backends/test_cpu_arm.py: runs shoal's matrix-vector, many-products and batched-rows
 * kernels (shoal/backends/cpu/csrc/gemv.c, arm/matmul_rows.c) on fixed pseudo-random inputs and prints, per
 * case, the output bytes in hex. Built once per ISA level (NEON, NEON + dot products, and the portable
 * reference), cross-compiled for aarch64 and run under qemu-user; the test compares the lines bit for bit.
 * Each output is also checked here against a double-precision product of the same weights, so that two
 * builds cannot agree on a wrong answer. Prints "features N" first; exits 1 on a failed check.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shoal_cpu.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static float uniform(void) { return (float)(next_u32() & 0xFFFFFF) / (float)0x1000000 * 2.0f - 1.0f; } /* [-1, 1) */

static int failures = 0;

static void print_hex(const char *name, const void *p, size_t bytes) {
    printf("%s ", name);
    for (size_t i = 0; i < bytes; i++) printf("%02x", ((const uint8_t *)p)[i]);
    printf("\n");
}

/* out [M, N] (float32 or bf16) against ref [M, N] within tol of ref's largest magnitude */
static void check(const char *name, const void *out, int bf16, const double *ref, int64_t count, double tol) {
    double top = 0, err = 0;
    for (int64_t i = 0; i < count; i++) top = fmax(top, fabs(ref[i]));
    for (int64_t i = 0; i < count; i++) err = fmax(err, fabs((double)load_value(out, i, bf16) - ref[i]));
    if (!(err <= tol * top) || top == 0) {
        fprintf(stderr, "%s: off by %g of %g (tolerance %g)\n", name, err, top, tol);
        failures++;
    }
}

/* x as the kernels read it: float32, or bf16 (stored in xb) rounded */
static void make_x(int64_t count, int bf16, float *xf, uint16_t *xb) {
    for (int64_t i = 0; i < count; i++) {
        xf[i] = uniform();
        xb[i] = float_to_bf16(xf[i]);
        if (bf16) xf[i] = bf16_to_float(xb[i]);
    }
}

static void reference(const float *x, const double *w, int64_t M, int64_t K, int64_t N, double *ref) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++) s += (double)x[m * K + k] * w[n * K + k];
            ref[m * N + n] = s;
        }
}

/* the int8 activations' error: quantized per 32 inputs to 127 steps */
static double tolerance(int bf16, int quantized) { return quantized ? 3e-2 : bf16 ? 1e-2 : 1e-5; }

enum { KIND_BF16, KIND_INT8, KIND_INT4 };

typedef struct {
    int kind;
    int64_t N, K, group;
    int scale_bf16;
    uint16_t *wb;
    int8_t *wq;
    uint8_t *w4;
    float *scale; /* int8 [N]; int4 float32 scales (or below) */
    uint16_t *scale16, *zero16;
    float *zero;
    double *dense; /* [N, K]: the weight's values */
} Weight;

static Weight make_weight(int kind, int64_t N, int64_t K, int64_t group, int scale_bf16) {
    Weight w = {kind, N, K, group, scale_bf16, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    w.dense = malloc(sizeof(double) * N * K);
    if (kind == KIND_BF16) {
        w.wb = malloc(2 * N * K);
        for (int64_t i = 0; i < N * K; i++) w.wb[i] = float_to_bf16(uniform() * 0.1f), w.dense[i] = bf16_to_float(w.wb[i]);
    } else if (kind == KIND_INT8) {
        w.wq = malloc(N * K), w.scale = malloc(4 * N);
        for (int64_t n = 0; n < N; n++) w.scale[n] = 0.001f + 0.001f * (uniform() + 1);
        for (int64_t i = 0; i < N * K; i++) {
            w.wq[i] = (int8_t)(next_u32() & 0xFF); /* the full range, -128 included */
            w.dense[i] = (double)w.wq[i] * w.scale[i / K];
        }
    } else {
        const int64_t G = N * (K / group);
        w.w4 = malloc(N * K / 2), w.scale = malloc(4 * G), w.zero = malloc(4 * G);
        w.scale16 = malloc(2 * G), w.zero16 = malloc(2 * G);
        for (int64_t i = 0; i < G; i++) {
            w.scale16[i] = float_to_bf16(0.01f + 0.005f * uniform()), w.zero16[i] = float_to_bf16(0.02f * uniform());
            w.scale[i] = scale_bf16 ? bf16_to_float(w.scale16[i]) : 0.01f + 0.005f * uniform();
            w.zero[i] = scale_bf16 ? bf16_to_float(w.zero16[i]) : 0.02f * uniform();
        }
        for (int64_t i = 0; i < N * K / 2; i++) w.w4[i] = (uint8_t)next_u32();
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++) {
                const uint8_t b = w.w4[n * (K / 2) + k / 128 * 64 + k % 64];
                const int u = k % 128 < 64 ? b & 0x0F : b >> 4;
                const int64_t gi = n * (K / group) + k / group;
                w.dense[n * K + k] = (double)((float)(u - 8) * w.scale[gi] + w.zero[gi]);
            }
    }
    return w;
}

static const void *scales(const Weight *w) { return w->scale_bf16 ? (const void *)w->scale16 : (const void *)w->scale; }
static const void *zeros(const Weight *w) { return w->scale_bf16 ? (const void *)w->zero16 : (const void *)w->zero; }

static int gemv(const Weight *w, const void *x, int bf16, int64_t M, void *y) {
    if (w->kind == KIND_BF16) return shoal_gemv_bf16(x, bf16, M, w->K, w->wb, w->N, y, 2);
    if (w->kind == KIND_INT8) return shoal_gemv_int8(x, bf16, M, w->K, w->wq, w->scale, w->N, y, 2);
    return shoal_gemv_int4(x, bf16, M, w->K, w->w4, scales(w), zeros(w), w->scale_bf16, w->group, w->N, y, 2);
}

static int rows(const Weight *w, const uint16_t *x, int64_t M, uint16_t *y) {
    if (w->kind == KIND_BF16) return shoal_matmul_rows_bf16(x, M, w->K, w->wb, w->N, y, 0, 2);
    if (w->kind == KIND_INT8) return shoal_matmul_rows_int8(x, M, w->K, w->wq, w->scale, w->N, y, 0, 2);
    return shoal_matmul_rows_int4(x, M, w->K, w->w4, scales(w), zeros(w), w->scale_bf16, w->group, w->N, y, 0, 2);
}

static ShoalWeight descriptor(const Weight *w) {
    ShoalWeight d = {w->kind, NULL, NULL, NULL, w->scale_bf16, w->group, NULL, w->N, w->K};
    d.weight = w->kind == KIND_BF16 ? (const void *)w->wb : w->kind == KIND_INT8 ? (const void *)w->wq : (const void *)w->w4;
    d.scale = w->kind == KIND_INT8 ? (const void *)w->scale : w->kind == KIND_INT4 ? scales(w) : NULL;
    d.zero = w->kind == KIND_INT4 ? zeros(w) : NULL;
    return d;
}

static void free_weight(Weight *w) {
    free(w->wb), free(w->wq), free(w->w4), free(w->scale), free(w->zero), free(w->scale16), free(w->zero16);
    free(w->dense);
}

static const char *KIND_NAMES[] = {"bf16", "int8", "int4"};

/* One weight through every entry point that takes it. */
static void run_weight(Weight *w, int quantizes) {
    const int64_t N = w->N, K = w->K, MAXM = 12;
    float *xf = malloc(4 * MAXM * K);
    uint16_t *xb = malloc(2 * MAXM * K);
    double *ref = malloc(sizeof(double) * MAXM * N);
    float *y = malloc(4 * MAXM * N);
    char name[128];
    const int64_t ms[] = {1, 3, 5};
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (int i = 0; i < 3; i++) {
            const int64_t M = ms[i];
            make_x(M * K, bf16, xf, xb);
            memset(y, 0, 4 * MAXM * N);
            snprintf(name, sizeof name, "gemv_%s_K%ld_g%ld_sb%d_%s_M%ld", KIND_NAMES[w->kind], (long)K, (long)w->group,
                     w->scale_bf16, bf16 ? "bf16" : "f32", (long)M);
            if (gemv(w, bf16 ? (const void *)xb : (const void *)xf, bf16, M, y)) {
                fprintf(stderr, "%s: refused\n", name);
                failures++;
                continue;
            }
            print_hex(name, y, (size_t)(M * N) * (bf16 ? 2 : 4));
            reference(xf, w->dense, M, K, N, ref);
            const int q = quantizes && bf16 && w->kind != KIND_BF16 && K % 64 == 0;
            check(name, y, bf16, ref, M * N, tolerance(bf16, q));
        }
    /* batched rows (bf16 activations): K % 16 for bf16 / int8 as the Python side asks */
    make_x(MAXM * K, 1, xf, xb);
    snprintf(name, sizeof name, "rows_%s_K%ld_g%ld_sb%d_M%ld", KIND_NAMES[w->kind], (long)K, (long)w->group,
             w->scale_bf16, (long)MAXM);
    if (rows(w, xb, MAXM, (uint16_t *)y)) {
        fprintf(stderr, "%s: refused\n", name);
        failures++;
    } else {
        print_hex(name, y, (size_t)(MAXM * N) * 2);
        reference(xf, w->dense, MAXM, K, N, ref);
        check(name, y, 1, ref, MAXM * N, 1e-2);
    }
    free(xf), free(xb), free(ref), free(y);
}

/* A MoE token's products: three weights of each kind sharing one activation, in one shoal_gemv_many call. */
static void run_many(int quantizes) {
    const int64_t K = 256, N = 29;
    Weight w[3] = {make_weight(KIND_BF16, N, K, 0, 0), make_weight(KIND_INT8, N, K, 0, 0),
                   make_weight(KIND_INT4, N, K, 64, 1)};
    ShoalWeight d[3];
    const ShoalWeight *dp[3];
    float xf[256];
    uint16_t xb[256], y[3][29];
    double ref[29];
    const void *xs[3] = {xb, xb, xb};
    void *ys[3] = {y[0], y[1], y[2]};
    for (int j = 0; j < 3; j++) d[j] = descriptor(&w[j]), dp[j] = &d[j];
    make_x(K, 1, xf, xb);
    if (shoal_gemv_many(dp, xs, ys, 3, 1, 2)) {
        fprintf(stderr, "gemv_many: refused\n");
        failures++;
    } else {
        print_hex("gemv_many", y, sizeof y);
        for (int j = 0; j < 3; j++) {
            reference(xf, w[j].dense, 1, K, N, ref);
            check("gemv_many", y[j], 1, ref, N, tolerance(1, quantizes && j));
        }
    }
    for (int j = 0; j < 3; j++) free_weight(&w[j]);
}

int main(void) {
    const int features = shoal_kernel_features(), quantizes = features & 1;
    printf("features %d\n", features);
    /* K 48 and 1040: tails past the unrolled loops (and 48 % 64: int8 without quantized activations) */
    const int64_t dense_k[] = {48, 256, 1040};
    for (int kind = KIND_BF16; kind <= KIND_INT8; kind++)
        for (int i = 0; i < 3; i++) {
            Weight w = make_weight(kind, 37, dense_k[i], 0, 0);
            run_weight(&w, quantizes);
            free_weight(&w);
        }
    const int64_t groups[] = {32, 64, 128};
    for (int i = 0; i < 3; i++)
        for (int sb = 0; sb < 2; sb++) {
            Weight w = make_weight(KIND_INT4, 37, 384, groups[i], sb);
            run_weight(&w, quantizes);
            free_weight(&w);
        }
    run_many(quantizes);
    return failures ? 1 : 0;
}
