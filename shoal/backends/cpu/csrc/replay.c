/* Runs a recorded list of kernel calls in one call from Python: the CPU backend's counterpart of a CUDA
 * graph's replay (shoal/backends/cpu/capture.py records the list during one eager decode step).
 *
 * It knows kernels, never models: each entry is one call of a function declared in shoal_cpu.h with the
 * arguments that call had, so a replayed step computes exactly what the eager step computed (the same
 * kernels with the same arguments, in the same order: the same bits). Python rewrites the few arguments
 * that change from step to step (the step's positions, cache slots and context) before each replay.
 *
 * Layout of `ops`: for each call, its kind (OP_* below, mirrored in capture.py), its argument count, then
 * its arguments as int64: pointers and integers as they are, float arguments as the bits of a float32 in
 * the low 32 bits. Returns 0, or the failing call's index * 256 + its code (so never 0 on failure).
 */
#include <stdint.h>
#include <string.h>

#include "shoal_cpu.h"

enum {
    OP_RMS_NORM = 1,
    OP_SILU_MUL = 2,
    OP_ADD = 3,
    OP_DECODE_ATTENTION = 4,
    OP_MLA_ATTENTION = 5,
    OP_MOE_ROUTE = 6,
    OP_GEMV_BF16 = 7,
    OP_GEMV_INT8 = 8,
    OP_GEMV_INT4 = 9,
    OP_ROWS_BF16 = 10,
    OP_ROWS_INT8 = 11,
    OP_ROWS_INT4 = 12,
    OP_MOE_TOKEN = 13,
    OP_SGEMM_PACKED = 14,
    OP_HEAD_RMS_NORM = 15,
    OP_MOE_TOKENS = 16,
};

/* MKL's cblas_sgemm_compute, as torch's library exports it (its address is the call's first argument). */
typedef void (*SgemmCompute)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                             const void *b, int ldb, float beta, float *c, int ldc);

#define P(i) ((void *)(intptr_t)a[i])
#define I(i) (a[i])
#define INT(i) ((int)a[i])

static float F(const int64_t *a, int i) {
    const uint32_t bits = (uint32_t)a[i];
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int run(int64_t kind, int64_t nargs, const int64_t *a) {
    switch (kind) {
    case OP_RMS_NORM:
        if (nargs != 10) return 1;
        return shoal_rms_norm(P(0), P(1), P(2), P(3), P(4), I(5), I(6), F(a, 7), INT(8), INT(9));
    case OP_HEAD_RMS_NORM:
        if (nargs != 10) return 1;
        return shoal_head_rms_norm(P(0), I(1), I(2), I(3), I(4), P(5), F(a, 6), P(7), INT(8), INT(9));
    case OP_SILU_MUL:
        if (nargs != 6) return 1;
        return shoal_silu_mul(P(0), P(1), I(2), I(3), INT(4), INT(5));
    case OP_ADD:
        if (nargs != 8) return 1;
        return shoal_add(P(0), P(1), P(2), I(3), I(4), I(5), INT(6), INT(7));
    case OP_DECODE_ATTENTION:
        if (nargs != 24) return 1;
        return shoal_decode_attention(P(0), I(1), P(2), I(3), P(4), I(5), I(6), I(7), I(8), I(9), P(10), P(11), P(12),
                                      P(13), P(14), P(15), P(16), I(17), P(18), I(19), F(a, 20), P(21), INT(22),
                                      INT(23));
    case OP_MLA_ATTENTION:
        if (nargs != 26) return 1;
        return shoal_mla_decode_attention(P(0), I(1), P(2), I(3), P(4), F(a, 5), P(6), I(7), I(8), I(9), I(10), I(11),
                                          I(12), P(13), P(14), P(15), INT(16), P(17), P(18), P(19), I(20), P(21),
                                          F(a, 22), P(23), INT(24), INT(25));
    case OP_MOE_ROUTE:
        if (nargs != 18) return 1;
        return shoal_moe_route(P(0), INT(1), I(2), I(3), P(4), I(5), INT(6), P(7), I(8), INT(9), F(a, 10), I(11),
                               I(12), INT(13), P(14), P(15), P(16), INT(17));
    case OP_GEMV_BF16:
        if (nargs != 8) return 1;
        return shoal_gemv_bf16(P(0), INT(1), I(2), I(3), P(4), I(5), P(6), INT(7));
    case OP_GEMV_INT8:
        if (nargs != 9) return 1;
        return shoal_gemv_int8(P(0), INT(1), I(2), I(3), P(4), P(5), I(6), P(7), INT(8));
    case OP_GEMV_INT4:
        if (nargs != 12) return 1;
        return shoal_gemv_int4(P(0), INT(1), I(2), I(3), P(4), P(5), P(6), INT(7), I(8), I(9), P(10), INT(11));
    case OP_ROWS_BF16:
        if (nargs != 8) return 1;
        return shoal_matmul_rows_bf16(P(0), I(1), I(2), P(3), I(4), P(5), INT(6), INT(7));
    case OP_ROWS_INT8:
        if (nargs != 9) return 1;
        return shoal_matmul_rows_int8(P(0), I(1), I(2), P(3), P(4), I(5), P(6), INT(7), INT(8));
    case OP_ROWS_INT4:
        if (nargs != 12) return 1;
        return shoal_matmul_rows_int4(P(0), I(1), I(2), P(3), P(4), P(5), INT(6), I(7), I(8), P(9), INT(10),
                                      INT(11));
    case OP_MOE_TOKEN:
        if (nargs != 14) return 1;
        return shoal_moe_token(P(0), P(1), I(2), I(3), P(4), P(5), P(6), P(7), P(8), I(9), I(10), P(11), INT(12),
                               INT(13));
    case OP_MOE_TOKENS:
        if (nargs != 13) return 1;
        return shoal_moe_tokens(P(0), P(1), I(2), I(3), I(4), P(5), P(6), P(7), I(8), I(9), P(10), INT(11), INT(12));
    case OP_SGEMM_PACKED: {
        if (nargs != 14 || !a[0]) return 1;
        const SgemmCompute compute = (SgemmCompute)P(0);
        compute(INT(1), INT(2), INT(3), INT(4), INT(5), INT(6), P(7), INT(8), P(9), INT(10), F(a, 11), P(12),
                INT(13));
        return 0;
    }
    default:
        return 1;
    }
}

int shoal_replay(const int64_t *ops, int64_t count) {
    int64_t at = 0;
    for (int64_t i = 0; i < count; i++) {
        const int64_t kind = ops[at], nargs = ops[at + 1];
        const int code = run(kind, nargs, ops + at + 2);
        if (code) return (int)(i * 256 + (code & 255 ? code & 255 : 1));
        at += 2 + nargs;
    }
    return 0;
}
