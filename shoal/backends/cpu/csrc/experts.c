/* A MoE layer's experts for one token in one call (the decode steps of DeepSeek-style models): every chosen
 * expert's gate_up, SiLU, down and the weighted sum, and the shared experts, in one call from Python,
 * where torch would make a dozen; and a batch's routed experts grouped by expert (shoal_moe_tokens, below) (shoal/backends/cpu/experts.py's TokenExperts, chosen through
 * Ops.token_experts). Each weight is a ShoalWeight (shoal_cpu.h); each product is the kernel a layer's
 * own matmul would run for one row (gemv.c), so the sums are the bits of the expert-by-expert path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "shoal_cpu.h"

typedef ShoalWeight DecodeLinear;

#define GEMV_ROWS 8 /* gemv.c's matrix-vector kernels take up to this many rows; the batched ones more */

/* Whether the batched kernels multiply on AMX tiles: set once from Python (cpu_gemv.rows_use_amx()),
 * which also asked the kernel for the tiles' permission. */
static int rows_amx = 0;

void shoal_experts_use_amx(int amx) { rows_amx = amx; }

/* MKL's cblas_sgemm_compute as torch's library exports it, for WEIGHT_F32_PACKED weights: set once from
 * Python (cpu_packed_f32.compute_address()), which makes the same call for the same weights layer by
 * layer. NULL: float32 packed weights are refused. */
typedef void (*SgemmCompute)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                             const void *b, int ldb, float beta, float *c, int ldc);
static SgemmCompute sgemm_compute = NULL;

void shoal_experts_use_sgemm(void *compute) { sgemm_compute = (SgemmCompute)compute; }

/* y [rows, l->n] = x [rows, l->k] times the weight: gemv.c's kernels, GEMV_ROWS rows per call */
static int gemv_rows(const DecodeLinear *l, const void *x, int64_t rows, void *y, int bf16, int threads) {
    const size_t esize = bf16 ? 2 : 4;
    int code = 0;
    for (int64_t r0 = 0; r0 < rows && !code; r0 += GEMV_ROWS) {
        const int64_t r = rows - r0 < GEMV_ROWS ? rows - r0 : GEMV_ROWS;
        const void *xr = (const char *)x + (size_t)(r0 * l->k) * esize;
        void *yr = (char *)y + (size_t)(r0 * l->n) * esize;
        switch (l->kind) {
        case WEIGHT_BF16: code = shoal_gemv_bf16(xr, bf16, r, l->k, l->weight, l->n, yr, threads); break;
        case WEIGHT_INT8: code = shoal_gemv_int8(xr, bf16, r, l->k, l->weight, l->scale, l->n, yr, threads); break;
        case WEIGHT_INT4:
            code = shoal_gemv_int4(xr, bf16, r, l->k, l->weight, l->scale, l->zero, (int)l->scale_bf16, l->group, l->n,
                                   yr, threads);
            break;
        default: return 1;
        }
    }
    return code;
}

static int linear(const DecodeLinear *l, const void *x, int64_t rows, void *y, int bf16, int threads) {
    int code = 3;
    if (l->kind == WEIGHT_F32_PACKED) { /* any row count; MKL splits it over torch's threads */
        if (bf16 || !sgemm_compute || rows > INT32_MAX) return 1;
        enum { ROW_MAJOR = 101, NO_TRANS = 111, PACKED = 151 };
        sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, (int)rows, (int)l->n, (int)l->k, x, (int)l->k, l->weight, (int)l->k,
                      0.0f, y, (int)l->n);
        code = 0;
    } else if (rows > GEMV_ROWS && bf16) { /* a batched step: bf16 activations only (cpu_gemv.rows_kernel_takes) */
        switch (l->kind) {
        case WEIGHT_BF16: code = shoal_matmul_rows_bf16(x, rows, l->k, l->weight, l->n, y, rows_amx, threads); break;
        case WEIGHT_INT8:
            code = shoal_matmul_rows_int8(x, rows, l->k, l->weight, l->scale, l->n, y, rows_amx, threads);
            break;
        case WEIGHT_INT4:
            code = shoal_matmul_rows_int4(x, rows, l->k, l->weight, l->scale, l->zero, (int)l->scale_bf16, l->group,
                                          l->n, y, rows_amx, threads);
            break;
        default: return 1;
        }
    }
    /* few rows, or a CPU without the batched kernels (code 3: no AVX512-BF16): the matrix-vector kernels */
    if (code == 3) code = gemv_rows(l, x, rows, y, bf16, threads);
    if (code || !l->bias) return code;
    for (int64_t r = 0; r < rows; r++) /* y + bias, rounded as torch's add rounds */
        for (int64_t i = 0; i < l->n; i++) store_value(y, r * l->n + i, load_value(y, r * l->n + i, bf16) + load_value(l->bias, i, bf16), bf16);
    return 0;
}

/* out [rows, down.n] = down(dtype(silu(gate)) * up) of gate_up(x): the gated MLP (GatedMLP.forward). */
static int gated_mlp(const DecodeLinear *gate_up, const DecodeLinear *down, const void *x, int64_t rows, void *out,
                     int bf16, int threads) {
    const size_t esize = bf16 ? 2 : 4;
    const int64_t inter = down->k;
    if (gate_up->n != 2 * inter) return 1;
    char *gu = malloc((size_t)(rows * 2 * inter) * esize), *act = malloc((size_t)(rows * inter) * esize);
    int code = (!gu || !act) ? 2 : 0;
    code = code ? code : linear(gate_up, x, rows, gu, bf16, threads);
    code = code ? code : shoal_silu_mul(gu, act, rows, inter, bf16, threads);
    code = code ? code : linear(down, act, rows, out, bf16, threads);
    free(gu), free(act);
    return code;
}

/* order[0, count) = the indices of expert_ids sorted by expert id (insertion sort: the batched path's order);
 * 1 for a count past 64 or an id outside [0, num_experts) */
static int expert_order(const int64_t *expert_ids, int64_t count, int64_t num_experts, int64_t *order) {
    if (count < 0 || count > 64) return 1;
    for (int64_t i = 0; i < count; i++) {
        if (expert_ids[i] < 0 || expert_ids[i] >= num_experts) return 1;
        int64_t j = i;
        for (; j > 0 && expert_ids[order[j - 1]] > expert_ids[i]; j--) order[j] = order[j - 1];
        order[j] = i;
    }
    return 0;
}

/* ---- a lone token's routed experts ---------------------------------------------------------------
 * out [1, hidden] = sum over the token's `count` chosen experts, in expert order, of
 * dtype(weight * down(silu(gate) * up)), each term rounded to the dtype and added in the dtype: what
 * shoal.layers.moe.one_token computes one torch call at a time. gate_up and down hold every expert's
 * weight descriptor (indexed by expert id). */
static int token_experts(const DecodeLinear *gate_up, const DecodeLinear *down, int64_t num_experts, int64_t count,
                         const int64_t *expert_ids, const float *weights, const void *x, int64_t hidden,
                         int64_t inter, void *out, int bf16, int threads) {
    const size_t esize = bf16 ? 2 : 4;
    int64_t order[64];
    if (expert_order(expert_ids, count, num_experts, order)) return 1;
    char *gu = malloc((size_t)(2 * inter) * esize), *act = malloc((size_t)inter * esize);
    char *y = malloc((size_t)hidden * esize);
    int code = (!gu || !act || !y) ? 2 : 0;
    if (!code && count == 0) memset(out, 0, (size_t)hidden * esize);
    for (int64_t c = 0; c < count && !code; c++) {
        const int64_t i = order[c], e = expert_ids[i];
        code = linear(&gate_up[e], x, 1, gu, bf16, threads);
        code = code ? code : shoal_silu_mul(gu, act, 1, inter, bf16, threads);
        code = code ? code : linear(&down[e], act, 1, y, bf16, threads);
        if (code) break;
        const float w = weights[i];
        for (int64_t h = 0; h < hidden; h++) {
            const float term = round_value(load_value(y, h, bf16) * w, bf16);
            store_value(out, h, c ? load_value(out, h, bf16) + term : term, bf16);
        }
    }
    free(gu), free(act), free(y);
    return code;
}

/* shoal_moe_token's output (below) in three parallel regions (shoal_gemv_many): every gate_up, SiLU, every
 * down; 1 where shoal_gemv_many does not take the weights. */
static int moe_token_at_once(const DecodeLinear *gate_up, const DecodeLinear *down, int64_t num_experts, int64_t count,
                             const int64_t *expert_ids, const float *weights, const DecodeLinear *shared_gate_up,
                             const DecodeLinear *shared_down, const void *x, int64_t hidden, int64_t inter, void *out,
                             int bf16, int threads) {
    const size_t esize = bf16 ? 2 : 4;
    int64_t order[64];
    if (expert_order(expert_ids, count, num_experts, order)) return 1;
    const int shared = shared_gate_up != NULL;
    const int64_t jobs = count + shared, shared_inter = shared ? shared_down->k : 0;
    if (jobs == 0) {
        memset(out, 0, (size_t)hidden * esize);
        return 0;
    }
    if (shared && shared_gate_up->n != 2 * shared_inter) return 1;
    for (int64_t c = 0; c < count; c++)
        if (gate_up[expert_ids[c]].n != 2 * inter || down[expert_ids[c]].k != inter) return 1;
    /* rows: the routed experts in order, then the shared ones */
    char *gu = malloc((size_t)(count * 2 * inter + 2 * shared_inter) * esize);
    char *act = malloc((size_t)(count * inter + shared_inter) * esize);
    char *y = malloc((size_t)(jobs * hidden) * esize);
    int code = (!gu || !act || !y) ? 2 : 0;
    const DecodeLinear *w[65];
    const void *in[65];
    void *res[65];
    for (int64_t c = 0; c < jobs && !code; c++) {
        w[c] = c < count ? &gate_up[expert_ids[order[c]]] : shared_gate_up;
        in[c] = x;
        res[c] = gu + (size_t)(c * 2 * inter) * esize;
    }
    code = code ? code : shoal_gemv_many(w, in, res, jobs, bf16, threads);
    if (!code && count) code = shoal_silu_mul(gu, act, count, inter, bf16, threads);
    if (!code && shared)
        code = shoal_silu_mul(gu + (size_t)(count * 2 * inter) * esize, act + (size_t)(count * inter) * esize, 1,
                              shared_inter, bf16, threads);
    for (int64_t c = 0; c < jobs && !code; c++) {
        w[c] = c < count ? &down[expert_ids[order[c]]] : shared_down;
        in[c] = act + (size_t)(c * inter) * esize;
        res[c] = y + (size_t)(c * hidden) * esize;
    }
    code = code ? code : shoal_gemv_many(w, in, res, jobs, bf16, threads);
    if (!code) { /* the weighted sum in expert order, each term and each add rounded; then the shared output */
        for (int64_t h = 0; h < hidden; h++) {
            float sum = 0.0f;
            for (int64_t c = 0; c < count; c++) {
                const float term = round_value(load_value(y, c * hidden + h, bf16) * weights[order[c]], bf16);
                sum = c ? round_value(sum + term, bf16) : term;
            }
            if (shared) sum = round_value((count ? sum : 0.0f) + load_value(y, count * hidden + h, bf16), bf16);
            store_value(out, h, sum, bf16);
        }
    }
    free(gu), free(act), free(y);
    return code;
}

/* A MoE layer's output for one token: its routed experts (token_experts above), plus the shared experts'
 * gated MLP (shared_gate_up NULL: none), added in the dtype as MoE.forward adds them. */
int shoal_moe_token(const DecodeLinear *gate_up, const DecodeLinear *down, int64_t num_experts, int64_t count,
                    const int64_t *expert_ids, const float *weights, const DecodeLinear *shared_gate_up,
                    const DecodeLinear *shared_down, const void *x, int64_t hidden, int64_t inter, void *out,
                    int dtype, int threads) {
    const int bf16 = dtype == 1;
    int code = moe_token_at_once(gate_up, down, num_experts, count, expert_ids, weights, shared_gate_up, shared_down,
                                 x, hidden, inter, out, bf16, threads);
    if (code != 1) return code;
    /* what shoal_gemv_many does not take (a weight with a bias, say): one expert at a time */
    code = token_experts(gate_up, down, num_experts, count, expert_ids, weights, x, hidden, inter, out, bf16,
                             threads);
    if (code || !shared_gate_up) return code;
    char *shared = malloc((size_t)hidden * (bf16 ? 2 : 4));
    if (!shared) return 2;
    code = gated_mlp(shared_gate_up, shared_down, x, 1, shared, bf16, threads);
    for (int64_t h = 0; h < hidden && !code; h++) store_value(out, h, load_value(out, h, bf16) + load_value(shared, h, bf16), bf16);
    free(shared);
    return code;
}

/* ---- a batch of tokens' routed experts, grouped by expert ------------------------------------------
 * out [tokens, hidden] = for each token, the sum over its top_k chosen experts, in expert order, of
 * dtype(weight * down(silu(gate) * up)), each term rounded to the dtype and added in the dtype: what
 * shoal.layers.moe.weighted_expert_sum's grouped path computes (zeros, then one index_add_ per expert in
 * expert order). Each expert's rows are gathered and multiplied at once — the kernel the layer's own
 * matmul runs for that many rows (linear above) — so every expert's weights are read once per step.
 * expert_ids / weights [tokens, top_k]; choices are taken in (token, slot) order within an expert, as the
 * grouped path's stable sort takes them. 1 for an id outside [0, num_experts), 2 out of memory. */
int shoal_moe_tokens(const DecodeLinear *gate_up, const DecodeLinear *down, int64_t num_experts, int64_t tokens,
                     int64_t top_k, const int64_t *expert_ids, const float *weights, const void *x, int64_t hidden,
                     int64_t inter, void *out, int dtype, int threads) {
    const int bf16 = dtype == 1;
    const size_t esize = bf16 ? 2 : 4;
    const int64_t choices = tokens * top_k;
    if (tokens < 0 || top_k < 0 || num_experts <= 0) return 1;
    for (int64_t i = 0; i < choices; i++)
        if (expert_ids[i] < 0 || expert_ids[i] >= num_experts) return 1;
    int64_t *start = calloc((size_t)num_experts + 1, sizeof(int64_t)), *order = malloc((size_t)(choices + 1) * sizeof(int64_t));
    char *seen = calloc((size_t)tokens + 1, 1);
    int64_t most = 0;
    int code = (!start || !order || !seen) ? 2 : 0;
    if (!code) { /* a counting sort by expert, stable */
        for (int64_t i = 0; i < choices; i++) start[expert_ids[i] + 1]++;
        for (int64_t e = 0; e < num_experts; e++) {
            most = start[e + 1] > most ? start[e + 1] : most;
            start[e + 1] += start[e];
        }
        int64_t *fill = calloc((size_t)num_experts, sizeof(int64_t));
        if (!fill) code = 2;
        for (int64_t i = 0; i < choices && !code; i++) order[start[expert_ids[i]] + fill[expert_ids[i]]++] = i;
        free(fill);
    }
    char *rows = NULL, *gu = NULL, *act = NULL, *y = NULL;
    if (!code && most) {
        rows = malloc((size_t)(most * hidden) * esize), gu = malloc((size_t)(most * 2 * inter) * esize);
        act = malloc((size_t)(most * inter) * esize), y = malloc((size_t)(most * hidden) * esize);
        if (!rows || !gu || !act || !y) code = 2;
    }
    for (int64_t e = 0; e < num_experts && !code; e++) {
        const int64_t first = start[e], r = start[e + 1] - first;
        if (!r) continue;
        for (int64_t j = 0; j < r; j++)
            memcpy(rows + (size_t)(j * hidden) * esize, (const char *)x + (size_t)((order[first + j] / top_k) * hidden) * esize,
                   (size_t)hidden * esize);
        code = linear(&gate_up[e], rows, r, gu, bf16, threads);
        code = code ? code : shoal_silu_mul(gu, act, r, inter, bf16, threads);
        code = code ? code : linear(&down[e], act, r, y, bf16, threads);
        for (int64_t j = 0; j < r && !code; j++) {
            const int64_t i = order[first + j], t = i / top_k;
            const float w = weights[i];
            for (int64_t h = 0; h < hidden; h++) {
                const float term = round_value(load_value(y, j * hidden + h, bf16) * w, bf16);
                store_value(out, t * hidden + h, seen[t] ? load_value(out, t * hidden + h, bf16) + term : term, bf16);
            }
            seen[t] = 1;
        }
    }
    for (int64_t t = 0; t < tokens && !code; t++)
        if (!seen[t]) memset((char *)out + (size_t)(t * hidden) * esize, 0, (size_t)hidden * esize);
    free(start), free(order), free(seen), free(rows), free(gu), free(act), free(y);
    return code;
}
