/* A whole decode step of a Llama-family decoder stack in one call from Python: for a few sequences
 * with one new token each, every layer's norms, projections, attention over the KV cache and MLP.
 *
 * Batch-1 decode on a CPU is a stream of weight reads broken up by small operations. Run from Python,
 * each of those operations costs a few microseconds of interpreter and dispatch, and the Python objects
 * it touches have been evicted from the caches by the weight stream in between, so the time between
 * two matrix-vector kernels (memory idle) added up to about a fifth of a 0.5B model's step (ad-hoc
 * cProfile of a bf16 step). Here the layers are a loop over descriptors that Python fills once at the
 * first decode step (shoal/backends/cpu_decode.py); each operation is the same kernel Python would
 * call (cpu_gemv.c, cpu_ops.c, linked into this library), so the results are bit for bit the same.
 *
 * Per layer, with `res` the residual stream [rows, hidden]:
 *   h    = rms_norm(res)                 (the first layer; later ones add the previous MLP's output first)
 *   qkv  = h Wqkv^T (+ b)                 attention over the cache (rotary, cache write folded in)
 *   res += attn Wo^T (+ b);  h = rms_norm(res)
 *   mlp  = silu(gate) * up of h Wgu^T (+ b), then down (+ b)
 * and after the last layer out = rms_norm(res + mlp).
 *
 * shoal_token_experts does the same for a MoE layer's routed experts of one token (batch-1 decode of
 * DeepSeek-style models): every chosen expert's gate_up, SiLU, down and weighted sum in one call.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cpu_gemv.c */
int shoal_gemv_bf16(const void *x, int act_bf16, int64_t M, int64_t K, const uint16_t *w, int64_t N, void *y,
                    int threads);
int shoal_gemv_int8(const void *x, int act_bf16, int64_t M, int64_t K, const int8_t *w, const float *scale,
                    int64_t N, void *y, int threads);
int shoal_gemv_int4(const void *x, int act_bf16, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                    const void *zero, int scale_bf16, int64_t group, int64_t N, void *y, int threads);
/* cpu_ops.c */
int shoal_rms_norm(const void *x, const void *residual, void *res_out, const void *weight, void *out, int64_t rows,
                   int64_t n, float eps, int dtype, int nthreads);
int shoal_silu_mul(const void *x, void *out, int64_t rows, int64_t inter, int dtype, int nthreads);
int shoal_decode_attention(const void *q_ptr, int64_t q_stride, const void *k_ptr, int64_t k_stride,
                           const void *v_ptr, int64_t v_stride, int64_t seqs, int64_t heads, int64_t kv_heads,
                           int64_t dim, const int64_t *positions, const float *cos_table, const float *sin_table,
                           void *k_pool, void *v_pool, const int64_t *slot_mapping, const int64_t *context_slots,
                           int64_t ctx_stride, const int64_t *context_lens, int64_t window, float scale, void *out,
                           int dtype, int nthreads);

enum { WEIGHT_BF16 = 0, WEIGHT_INT8 = 1, WEIGHT_INT4 = 2 };

/* One linear layer's weight, as its Python module holds it (layouts in cpu_gemv.c). */
typedef struct {
    int64_t kind;              /* WEIGHT_* */
    const void *weight;        /* bf16 [N, K]; int8 [N, K]; int4 kernel layout [N, K / 2] */
    const void *scale;         /* int8: float32 [N]; int4: [N, K / group] */
    const void *zero;          /* int4: like scale */
    int64_t scale_bf16, group; /* int4 */
    const void *bias;          /* NULL, or [N] in the activations' dtype */
    int64_t n, k;
} DecodeLinear;

/* Must match cpu_decode.py's ctypes structures field for field. */
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

/* Values in the activations' dtype, read as float32 and written rounded to nearest even (as torch rounds). */
static float round_to(float v, int bf16) {
    if (!bf16) return v;
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        u = (u | 0x400000u) & 0xffff0000u;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        u &= 0xffff0000u;
    }
    memcpy(&v, &u, 4);
    return v;
}

static float get(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void set(void *p, int64_t i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    v = round_to(v, 1);
    memcpy(&u, &v, 4);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

static int linear(const DecodeLinear *l, const void *x, int64_t rows, void *y, int bf16, int threads) {
    int code;
    switch (l->kind) {
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
        for (int64_t i = 0; i < l->n; i++) set(y, r * l->n + i, get(y, r * l->n + i, bf16) + get(l->bias, i, bf16), bf16);
    return 0;
}

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
    char *h = malloc((size_t)rows * hidden * esize), *proj = malloc((size_t)rows * hidden * esize);
    char *wide = malloc((size_t)rows * widest * esize);
    char *narrow = malloc((size_t)rows * (size_t)(q_width > m->intermediate ? q_width : m->intermediate) * esize);
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

/* ---- a lone token's routed experts ---------------------------------------------------------------
 * out [1, hidden] = sum over the token's `count` chosen experts, in expert order, of
 * dtype(weight * down(silu(gate) * up)), each term rounded to the dtype and added in the dtype: what
 * shoal.layers.moe.one_token computes one torch call at a time. gate_up and down hold every expert's
 * weight descriptor (indexed by expert id). */
int shoal_token_experts(const DecodeLinear *gate_up, const DecodeLinear *down, int64_t num_experts, int64_t count,
                        const int64_t *expert_ids, const float *weights, const void *x, int64_t hidden,
                        int64_t inter, void *out, int dtype, int threads) {
    const int bf16 = dtype == 1;
    const size_t esize = bf16 ? 2 : 4;
    if (count < 0 || count > 64) return 1;
    int64_t order[64];
    for (int64_t i = 0; i < count; i++) { /* insertion sort by expert id: the batched path's order */
        if (expert_ids[i] < 0 || expert_ids[i] >= num_experts) return 1;
        int64_t j = i;
        for (; j > 0 && expert_ids[order[j - 1]] > expert_ids[i]; j--) order[j] = order[j - 1];
        order[j] = i;
    }
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
            const float term = round_to(get(y, h, bf16) * w, bf16);
            set(out, h, c ? get(out, h, bf16) + term : term, bf16);
        }
    }
    free(gu), free(act), free(y);
    return code;
}
