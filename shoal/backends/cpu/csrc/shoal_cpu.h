/* shoal's CPU kernels: the structs they share and every exported function, declared once.
 *
 * Each .c file here includes this header; shoal/backends/cpu/library.py types the same functions for
 * ctypes, and its WeightDescriptor mirrors ShoalWeight field for field.
 * dtype codes: 0 float32, 1 bfloat16. Tensors are row-major; strides are in elements. Every function
 * returns 0, 1 for arguments it rejects, 2 when out of memory, 3 when this CPU or build lacks an ISA
 * extension the call needs.
 */
#ifndef SHOAL_CPU_H
#define SHOAL_CPU_H

#include <stdint.h>

#include "bf16.h"

enum { WEIGHT_BF16 = 0, WEIGHT_INT8 = 1, WEIGHT_INT4 = 2, WEIGHT_F32_PACKED = 3 };

/* One linear layer's weight, as its Python module holds it (layouts in gemv.c). */
typedef struct {
    int64_t kind;              /* WEIGHT_* */
    const void *weight;        /* bf16 [N, K]; int8 [N, K]; int4 kernel layout [N, K / 2]; float32 packed by
                                * MKL (cpu/packed_f32.py) */
    const void *scale;         /* int8: float32 [N]; int4: [N, K / group] */
    const void *zero;          /* int4: like scale */
    int64_t scale_bf16, group; /* int4 */
    const void *bias;          /* NULL, or [N] in the activations' dtype */
    int64_t n, k;
} ShoalWeight;

/* ---- gemv.c: matrix-vector products (up to 8 rows); x86/ or arm/matmul_rows.c (generic/ elsewhere):
 * batched-decode products (more rows) ---- */
int shoal_gemv_bf16(const void *x, int act_bf16, int64_t M, int64_t K, const uint16_t *w, int64_t N, void *y,
                    int threads);
int shoal_gemv_int8(const void *x, int act_bf16, int64_t M, int64_t K, const int8_t *w, const float *scale,
                    int64_t N, void *y, int threads);
int shoal_gemv_int4(const void *x, int act_bf16, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                    const void *zero, int scale_bf16, int64_t group, int64_t N, void *y, int threads);
int shoal_gemv_many(const ShoalWeight *const *weights, const void *const *xs, void *const *ys, int64_t count,
                    int act_bf16, int threads);
int shoal_stream_read(const void *p, int64_t nbytes, uint64_t *out, int threads);
int shoal_dequant_int4(const uint8_t *w, const void *scale, const void *zero, int scale_bf16, int64_t group,
                       int64_t N, int64_t K, void *out, int out_bf16, int threads);
int shoal_matmul_rows_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int amx,
                           int threads);
int shoal_matmul_rows_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
                           uint16_t *y, int amx, int threads);
int shoal_matmul_rows_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                           const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int amx,
                           int threads);
/* rows_q8.c: the same product as shoal_matmul_rows_int4 with the activations quantized to int8 per block of
 * 32 (integer dot products, every ISA) */
int shoal_matmul_rows_q8_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                              const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int threads);
int shoal_kernel_features(void);
int shoal_rows_features(void); /* x86/, arm/ or generic/matmul_rows.c: the matmul_rows kernels' feature bits */

/* ---- fused.c: the small per-layer operations of decode ---- */
int shoal_rms_norm(const void *x, const void *residual, void *res_out, const void *weight, void *out, int64_t rows,
                   int64_t n, float eps, int dtype, int nthreads);
int shoal_head_rms_norm(const void *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t dim, const void *weight,
                        float eps, void *out, int dtype, int nthreads);
int shoal_silu_mul(const void *x, void *out, int64_t rows, int64_t inter, int dtype, int nthreads);
int shoal_add(const void *a, const void *b, void *out, int64_t rows, int64_t n, int64_t b_rows, int dtype,
              int nthreads);
int shoal_decode_attention(const void *q_ptr, int64_t q_stride, const void *k_ptr, int64_t k_stride,
                           const void *v_ptr, int64_t v_stride, int64_t seqs, int64_t heads, int64_t kv_heads,
                           int64_t dim, const int64_t *positions, const float *cos_table, const float *sin_table,
                           void *k_pool, void *v_pool, const int64_t *slot_mapping, const int64_t *context_slots,
                           int64_t ctx_stride, const int64_t *context_lens, int64_t window, float scale, void *out,
                           int dtype, int nthreads);
int shoal_mla_decode_attention(const void *q_ptr, int64_t q_stride, const void *kv_ptr, int64_t kv_stride,
                               const void *norm_w, float eps, const void *w_kvb, int64_t seqs, int64_t heads,
                               int64_t nope, int64_t rope, int64_t rank, int64_t vdim, const int64_t *positions,
                               const float *cos_table, const float *sin_table, int interleaved, void *pool,
                               const int64_t *slot_mapping, const int64_t *context_slots, int64_t ctx_stride,
                               const int64_t *context_lens, float scale, void *out, int dtype, int nthreads);
int shoal_argmax_rows(const void *x, int64_t rows, int64_t cols, int dtype, int64_t *out, int nthreads);
int shoal_moe_route(const void *x, int act_bf16, int64_t tokens, int64_t hidden, const float *w, int64_t experts,
                    int sigmoid, const float *bias, int64_t top_k, int norm, float scaling, int64_t groups,
                    int64_t topk_groups, int group_mode, float *weights, int64_t *ids, int64_t *load, int nthreads);


/* ---- experts.c: a token's MoE experts in one call; a batch's, grouped by expert ---- */
void shoal_experts_use_amx(int amx);
void shoal_experts_use_sgemm(void *compute);
int shoal_moe_token(const ShoalWeight *gate_up, const ShoalWeight *down, int64_t num_experts, int64_t count,
                    const int64_t *expert_ids, const float *weights, const ShoalWeight *shared_gate_up,
                    const ShoalWeight *shared_down, const void *x, int64_t hidden, int64_t inter, void *out,
                    int dtype, int threads);

/* A batch of tokens' routed experts, grouped by expert: each chosen expert runs once over all of its rows. */
int shoal_moe_tokens(const ShoalWeight *gate_up, const ShoalWeight *down, int64_t num_experts, int64_t tokens,
                     int64_t top_k, const int64_t *expert_ids, const float *weights, const void *x, int64_t hidden,
                     int64_t inter, void *out, int dtype, int threads);

/* ---- replay.c: a recorded list of the calls above, run in one call ---- */
int shoal_replay(const int64_t *ops, int64_t count);

#endif
