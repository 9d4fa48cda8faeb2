/* A whole decode step of a Llama-family decoder stack in one call from Python: for the sequences of a
 * step with one new token each, every layer's norms, projections, attention over the KV cache and MLP.
 *
 * Batch-1 decode on a CPU is a stream of weight reads broken up by small operations. Run from Python,
 * each of those operations costs microseconds of interpreter and dispatch while the memory idles; in
 * one call a 0.5B Llama's step is 1.4-1.5x faster (BENCHMARKS.md, benchmarks/decode_overhead.py with
 * SHOAL_CPU_DECODE=1 and 0). Here the layers are a loop over descriptors that Python fills once at the
 * first decode step (shoal/backends/cpu/decode.py); each operation is the same kernel Python would
 * call (csrc/gemv.c, csrc/fused.c, linked into this library): the matrix-vector kernels up to 8 rows, the
 * batched ones above, under the same conditions as the layers use them, so the results are bit for
 * bit the same.
 *
 * Per layer, with `res` the residual stream [rows, hidden]:
 *   h    = rms_norm(res)                 (the first layer; later ones add the previous MLP's output first)
 *   qkv  = h Wqkv^T (+ b)                 attention over the cache (rotary, cache write folded in)
 *   res += attn Wo^T (+ b);  h = rms_norm(res)
 *   mlp  = silu(gate) * up of h Wgu^T (+ b), then down (+ b)
 * and after the last layer out = rms_norm(res + mlp).
 *
 * shoal_moe_token does the same for a MoE layer's experts of one token (batch-1 decode of DeepSeek-style
 * models): every chosen expert's gate_up, SiLU, down and weighted sum, and the shared experts, in one
 * call; shoal_mla_attention_half the attention half of a DeepSeek layer (the router stays in torch).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "shoal_cpu.h"

typedef ShoalWeight DecodeLinear; /* shoal_cpu.h */

/* Must match cpu/decode.py's ctypes structures field for field. */
typedef struct {
    const void *input_norm, *post_attention_norm; /* [hidden], the activations' dtype */
    DecodeLinear qkv, o, gate_up, down;
    void *k_pool, *v_pool; /* [slots, kv_heads, head_dim] */
} DecodeLayer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    int64_t dtype; /* 0 float32, 1 bf16 activations */
    const void *final_norm;
} DecodeModel;

/* This step's sequences: one new token each (as cpu_ops.DecodeAttention describes them). */
typedef struct {
    int64_t rows;
    const int64_t *positions, *slot_mapping, *context_slots, *context_lens;
    int64_t ctx_stride, window;
    const float *cos, *sin;
} DecodeStep;

#define GEMV_ROWS 8 /* csrc/gemv.c's matrix-vector kernels take up to this many rows; the batched ones more */

/* Whether the batched kernels multiply on AMX tiles: set once from Python (cpu_gemv.rows_use_amx()),
 * which also asked the kernel for the tiles' permission. */
static int rows_amx = 0;

void shoal_decode_use_amx(int amx) { rows_amx = amx; }

/* MKL's cblas_sgemm_compute as torch's library exports it, for WEIGHT_F32_PACKED weights: set once from
 * Python (cpu_packed_f32.compute_address()), which makes the same call for the same weights layer by
 * layer. NULL: float32 packed weights are refused. */
typedef void (*SgemmCompute)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                             const void *b, int ldb, float beta, float *c, int ldc);
static SgemmCompute sgemm_compute = NULL;

void shoal_decode_use_sgemm(void *compute) { sgemm_compute = (SgemmCompute)compute; }

static int linear(const DecodeLinear *l, const void *x, int64_t rows, void *y, int bf16, int threads) {
    int code;
    if (l->kind == WEIGHT_F32_PACKED) { /* any row count; MKL splits it over torch's threads */
        if (bf16 || !sgemm_compute || rows > INT32_MAX) return 1;
        enum { ROW_MAJOR = 101, NO_TRANS = 111, PACKED = 151 };
        sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, (int)rows, (int)l->n, (int)l->k, x, (int)l->k, l->weight, (int)l->k,
                      0.0f, y, (int)l->n);
        code = 0;
    } else if (rows > GEMV_ROWS) { /* a batched step: bf16 activations only (cpu_gemv.rows_kernel_takes) */
        if (!bf16) return 1;
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
    } else switch (l->kind) {
    case WEIGHT_BF16: code = shoal_gemv_bf16(x, bf16, rows, l->k, l->weight, l->n, y, threads); break;
    case WEIGHT_INT8: code = shoal_gemv_int8(x, bf16, rows, l->k, l->weight, l->scale, l->n, y, threads); break;
    case WEIGHT_INT4:
        code = shoal_gemv_int4(x, bf16, rows, l->k, l->weight, l->scale, l->zero, (int)l->scale_bf16, l->group, l->n,
                               y, threads);
        break;
    default: return 1;
    }
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

int shoal_gated_mlp(const DecodeLinear *gate_up, const DecodeLinear *down, const void *x, int64_t rows, void *out,
                    int dtype, int threads) {
    return gated_mlp(gate_up, down, x, rows, out, dtype == 1, threads);
}

/* Step buffers start on a cache line, as torch's tensors do: MKL's sgemm may take another path (and
 * round differently) for other alignments, and the layer-by-layer path multiplies torch tensors. */
static void *buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* x [rows, hidden] (the embeddings; overwritten: it becomes the residual stream) -> out [rows, hidden],
 * the final norm's output. Returns 0, 1 for arguments the kernels reject, 2 when out of memory. */
int shoal_llama_decode(const DecodeModel *m, const DecodeLayer *layers, const DecodeStep *s, void *x, void *out,
                       int threads) {
    const int bf16 = m->dtype == 1;
    const size_t esize = bf16 ? 2 : 4;
    const int64_t rows = s->rows, hidden = m->hidden, dim = m->head_dim;
    const int64_t q_width = m->heads * dim, kv_width = m->kv_heads * dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    const size_t widest = (size_t)(qkv_width > 2 * m->intermediate ? qkv_width : 2 * m->intermediate);
    char *h = buffer((size_t)rows * hidden * esize), *proj = buffer((size_t)rows * hidden * esize);
    char *wide = buffer((size_t)rows * widest * esize);
    char *narrow = buffer((size_t)rows * (size_t)(q_width > m->intermediate ? q_width : m->intermediate) * esize);
    int code = (!h || !proj || !wide || !narrow) ? 2 : 0;
    for (int64_t i = 0; i < m->layers && !code; i++) {
        const DecodeLayer *l = &layers[i];
        /* h = norm(res), adding the previous layer's MLP output (in proj) to the stream first */
        code = shoal_rms_norm(i ? proj : x, i ? x : NULL, i ? x : NULL, l->input_norm, h, rows, hidden, m->eps,
                              bf16, threads);
        code = code ? code : linear(&l->qkv, h, rows, wide, bf16, threads);
        code = code ? code : shoal_decode_attention(
            wide, qkv_width, wide + (size_t)q_width * esize, qkv_width, wide + (size_t)(q_width + kv_width) * esize,
            qkv_width, rows, m->heads, m->kv_heads, dim, s->positions, s->cos, s->sin, l->k_pool, l->v_pool,
            s->slot_mapping, s->context_slots, s->ctx_stride, s->context_lens, s->window, m->scale, narrow, bf16,
            threads);
        code = code ? code : linear(&l->o, narrow, rows, proj, bf16, threads);
        code = code ? code : shoal_rms_norm(proj, x, x, l->post_attention_norm, h, rows, hidden, m->eps, bf16, threads);
        code = code ? code : linear(&l->gate_up, h, rows, wide, bf16, threads);
        code = code ? code : shoal_silu_mul(wide, narrow, rows, m->intermediate, bf16, threads);
        code = code ? code : linear(&l->down, narrow, rows, proj, bf16, threads);
    }
    if (!code) code = shoal_rms_norm(proj, x, x, m->final_norm, out, rows, hidden, m->eps, bf16, threads);
    free(h), free(proj), free(wide), free(narrow);
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

/* ---- DeepSeek: the attention half of a decoder layer (Multi-head Latent Attention) ----------------
 * With `res` the residual stream [rows, hidden] and `mlp` the previous layer's MLP output (NULL for the
 * first layer):
 *   a  = rms_norm(res (+ mlp))            q = q_proj(a), or q_b_proj(rms_norm(q_a_proj(a))) with q_lora
 *   kv = kv_a_proj_with_mqa(a)            attn = MLA decode attention (csrc/fused.c: latent norm, rotary,
 *                                          cache write, absorption, attention)
 *   res += o_proj(attn);  h = rms_norm(res)
 * as DeepseekDecoderLayer runs it up to its MLP; Python routes the experts between this call and the
 * MLP's (the router stays torch's, so its choices are the layer-by-layer ones). */
typedef struct {
    const void *input_norm, *post_attention_norm, *q_a_norm, *kv_a_norm, *kv_b; /* q_a_norm NULL: no q_lora */
    DecodeLinear q, q_a, q_b, kv_a, o;                                           /* q unused with q_lora */
    void *pool;                                                                  /* [slots, rank + rope] */
} MlaLayer;

typedef struct {
    int64_t hidden, heads, nope, rope, rank, v_dim, q_lora_rank, interleaved;
    float eps, scale;
    int64_t dtype;
} MlaModel;

int shoal_mla_attention_half(const MlaModel *m, const MlaLayer *l, const DecodeStep *s, void *res, const void *mlp,
                             void *h, int threads) {
    const int bf16 = m->dtype == 1;
    const size_t esize = bf16 ? 2 : 4;
    const int64_t rows = s->rows, q_width = m->heads * (m->nope + m->rope), kv_width = m->rank + m->rope;
    char *a = malloc((size_t)(rows * m->hidden) * esize), *q = malloc((size_t)(rows * q_width) * esize);
    char *kv = malloc((size_t)(rows * kv_width) * esize), *attn = malloc((size_t)(rows * m->heads * m->v_dim) * esize);
    char *qa = m->q_lora_rank ? malloc((size_t)(rows * m->q_lora_rank) * esize) : NULL;
    char *o = malloc((size_t)(rows * m->hidden) * esize);
    int code = (!a || !q || !kv || !attn || !o || (m->q_lora_rank && !qa)) ? 2 : 0;
    code = code ? code : shoal_rms_norm(mlp ? mlp : res, mlp ? res : NULL, mlp ? res : NULL, l->input_norm, a, rows,
                                        m->hidden, m->eps, bf16, threads);
    if (!code && m->q_lora_rank) {
        code = linear(&l->q_a, a, rows, qa, bf16, threads);
        code = code ? code : shoal_rms_norm(qa, NULL, NULL, l->q_a_norm, qa, rows, m->q_lora_rank, m->eps, bf16, threads);
        code = code ? code : linear(&l->q_b, qa, rows, q, bf16, threads);
    } else if (!code) {
        code = linear(&l->q, a, rows, q, bf16, threads);
    }
    code = code ? code : linear(&l->kv_a, a, rows, kv, bf16, threads);
    code = code ? code : shoal_mla_decode_attention(
        q, q_width, kv, kv_width, l->kv_a_norm, m->eps, l->kv_b, rows, m->heads, m->nope, m->rope, m->rank, m->v_dim,
        s->positions, s->cos, s->sin, (int)m->interleaved, l->pool, s->slot_mapping, s->context_slots, s->ctx_stride,
        s->context_lens, m->scale, attn, bf16, threads);
    code = code ? code : linear(&l->o, attn, rows, o, bf16, threads);
    code = code ? code : shoal_rms_norm(o, res, res, l->post_attention_norm, h, rows, m->hidden, m->eps, bf16, threads);
    free(a), free(q), free(kv), free(attn), free(qa), free(o);
    return code;
}

/* ---- DeepSeek: a lone token's whole decode step in one call ----------------------------------------
 * Per layer the attention half above, then its MLP: a dense gated MLP, or the router (csrc/fused.c's
 * shoal_moe_route, which is what shoal.layers.moe.Router runs on the CPU) and the token's experts with
 * the shared ones (shoal_moe_token); the next layer's attention half adds the MLP's output to the
 * stream, and after the last layer out = rms_norm(res + mlp). The same calls in the same order as the
 * per-layer path (cpu_decode.DeepseekDecode), so the same bits, without returning to Python between
 * them. Must match cpu/decode.py's DeepseekMlp field for field. */
typedef struct {
    int64_t moe;                                /* 0: dense (gate_up, down); 1: MoE */
    DecodeLinear gate_up, down;                 /* dense */
    const DecodeLinear *expert_gate_up, *expert_down; /* MoE: [num_experts] each */
    int64_t num_experts, inter;
    const DecodeLinear *shared_gate_up, *shared_down; /* NULL: no shared experts */
    const float *router; /* float32 [num_experts, hidden] */
    const float *router_bias; /* NULL, or DeepSeek-V3's correction [num_experts] */
    int64_t top_k, sigmoid, norm;
    float scaling;
    int64_t *load; /* [num_experts] choices counted, or NULL */
} DeepseekMlp;


int shoal_deepseek_decode(const MlaModel *m, const MlaLayer *layers, const DeepseekMlp *mlps, int64_t count,
                          const DecodeStep *s, void *res, const void *final_norm, void *out, int threads) {
    const int bf16 = m->dtype == 1;
    const size_t esize = bf16 ? 2 : 4;
    if (s->rows != 1) return 1;
    char *h = malloc((size_t)m->hidden * esize), *mlp = malloc((size_t)m->hidden * esize);
    int code = (!h || !mlp) ? 2 : 0;
    for (int64_t i = 0; i < count && !code; i++) {
        const DeepseekMlp *p = &mlps[i];
        code = shoal_mla_attention_half(m, &layers[i], s, res, i ? mlp : NULL, h, threads);
        if (code) break;
        if (!p->moe) {
            code = gated_mlp(&p->gate_up, &p->down, h, 1, mlp, bf16, threads);
            continue;
        }
        float weights[64];
        int64_t ids[64];
        if (p->top_k > 64) {
            code = 1;
            break;
        }
        code = shoal_moe_route(h, bf16, 1, m->hidden, p->router, p->num_experts, (int)p->sigmoid, p->router_bias,
                               p->top_k, (int)p->norm, p->scaling, weights, ids, p->load, threads);
        code = code ? code : shoal_moe_token(p->expert_gate_up, p->expert_down, p->num_experts, p->top_k, ids, weights,
                                             p->shared_gate_up, p->shared_down, h, m->hidden, p->inter, mlp,
                                             (int)m->dtype, threads);
    }
    if (!code) code = shoal_rms_norm(mlp, res, res, final_norm, out, 1, m->hidden, m->eps, bf16, threads);
    free(h), free(mlp);
    return code;
}
