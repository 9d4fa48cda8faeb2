/* The small per-layer operations of CPU decode, fused: RMSNorm (with the residual add before it),
 * SiLU-and-multiply, and one-query attention over the KV cache (rotary, cache write and attention in
 * one call).
 *
 * At batch-1 decode each of these works on a few thousand values, so through aten they cost their
 * dispatch (a few microseconds per operator, several operators each) rather than their arithmetic;
 * here each is one call. They round where the torch code they replace rounds (every intermediate
 * that torch stores in the model's dtype is rounded to it here too), so results match that code up to
 * float summation order and the exp() approximation.
 *
 * Compiled at first use by shoal/backends/cpu/fused.py (-O3 -march=native -fopenmp -ffp-contract=off,
 * the last so that a*b - c*d rounds as torch's separate multiply and subtract do), loaded by ctypes.
 *
 * dtype codes: 0 float32, 1 bfloat16. Tensors are row-major; strides are in elements.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "shoal_cpu.h"

/* exp(x) for x <= 0 (softmax after subtracting the max) and for SiLU: Cephes' expf polynomial, about
 * 1 ulp, written so the compiler vectorizes a loop of it. */
INLINE float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

/* Each of `rows` rows of scores [rows, keys] replaced by its softmax (float32, max subtracted). */
static void softmax_rows(float *scores, int64_t rows, int64_t keys) {
    for (int64_t h = 0; h < rows; h++) {
        float *sc = scores + h * keys;
        float best = -INFINITY;
        for (int64_t j = 0; j < keys; j++) best = sc[j] > best ? sc[j] : best;
        float total = 0.0f;
        for (int64_t j = 0; j < keys; j++) {
            float e = exp_approx(sc[j] - best);
            sc[j] = e;
            total += e;
        }
        const float inv = keys > 0 ? 1.0f / total : 0.0f;
        for (int64_t j = 0; j < keys; j++) sc[j] *= inv;
    }
}

/* ---- RMSNorm ------------------------------------------------------------------------------------
 * With residual (not NULL): s = x + residual, rounded to the dtype and stored to res_out; else s = x.
 * out = weight * dtype(s * rsqrt(mean(s^2) + eps)), the normalisation in float32 (as RMSNorm does). */
INLINE void rms_norm_span(const void *x, const void *residual, void *res_out, const void *weight, void *out,
                          int64_t base, int64_t out_base, int64_t n, float eps, float *buf, const int bf16) {
    for (int64_t i = 0; i < n; i++) {
        float v = load_value(x, base + i, bf16);
        if (residual) v = round_value(v + load_value(residual, base + i, bf16), bf16);
        buf[i] = v;
    }
    if (residual)
        for (int64_t i = 0; i < n; i++) store_value(res_out, base + i, buf[i], bf16);
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += buf[i + l] * buf[i + l];
    float sum = 0.0f;
    for (; i < n; i++) sum += buf[i] * buf[i];
    for (int l = 0; l < 16; l++) sum += acc[l];
    const float r = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t j = 0; j < n; j++)
        store_value(out, out_base + j, load_value(weight, j, bf16) * round_value(buf[j] * r, bf16), bf16);
}

INLINE void rms_norm_row(const void *x, const void *residual, void *res_out, const void *weight, void *out,
                         int64_t base, int64_t n, float eps, float *buf, const int bf16) {
    rms_norm_span(x, residual, res_out, weight, out, base, base, n, eps, buf, bf16);
}

int shoal_rms_norm(const void *x, const void *residual, void *res_out, const void *weight, void *out, int64_t rows,
                   int64_t n, float eps, int dtype, int nthreads) {
    if (n <= 0 || rows < 0 || (dtype != 0 && dtype != 1)) return 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && rows * n >= 65536)
    {
        float *buf = (float *)malloc((size_t)n * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            if (!buf) continue;
            if (dtype == 1)
                rms_norm_row(x, residual, res_out, weight, out, row * n, n, eps, buf, 1);
            else
                rms_norm_row(x, residual, res_out, weight, out, row * n, n, eps, buf, 0);
        }
        free(buf);
    }
    return 0;
}

/* ---- SiLU and multiply ----------------------------------------------------------------------------
 * x [rows, 2 * inter] (gate, then up) -> out [rows, inter] = dtype(silu(gate)) * up. */
INLINE void silu_mul_row(const void *restrict x, void *restrict out, int64_t in, int64_t o, int64_t inter,
                         const int bf16) {
    for (int64_t i = 0; i < inter; i++) {
        float g = load_value(x, in + i, bf16);
        float s = round_value(g / (1.0f + exp_approx(-g)), bf16);
        store_value(out, o + i, s * load_value(x, in + inter + i, bf16), bf16);
    }
}

/* out [rows, heads * dim] (contiguous) = RMSNorm over each head's dim values of x's rows, row r at
 * x + r * x_stride with its heads side by side (a slice of a merged q / k / v projection's output):
 * per-head query and key norms (Qwen3's), rounded as RMSNorm rounds. */
int shoal_head_rms_norm(const void *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t dim, const void *weight,
                        float eps, void *out, int dtype, int nthreads) {
    if (dim <= 0 || heads <= 0 || rows < 0 || x_stride < heads * dim || (dtype != 0 && dtype != 1)) return 1;
    float *buf = (float *)malloc((size_t)dim * sizeof(float));
    if (!buf) return 2;
    (void)nthreads; /* a few heads of a few rows: one thread */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            if (dtype == 1)
                rms_norm_span(x, NULL, NULL, weight, out, r * x_stride + h * dim, (r * heads + h) * dim, dim, eps, buf, 1);
            else
                rms_norm_span(x, NULL, NULL, weight, out, r * x_stride + h * dim, (r * heads + h) * dim, dim, eps, buf, 0);
        }
    free(buf);
    return 0;
}

int shoal_silu_mul(const void *x, void *out, int64_t rows, int64_t inter, int dtype, int nthreads) {
    if (inter <= 0 || rows < 0 || (dtype != 0 && dtype != 1)) return 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows * inter >= 65536)
    for (int64_t row = 0; row < rows; row++) {
        if (dtype == 1)
            silu_mul_row(x, out, row * 2 * inter, row * inter, inter, 1);
        else
            silu_mul_row(x, out, row * 2 * inter, row * inter, inter, 0);
    }
    return 0;
}

/* out [rows, n] = a [rows, n] + b, b [rows, n] or (b_rows 1) [n] broadcast over the rows: the decoder's
 * residual add and a bias, each sum rounded to the dtype as torch's add rounds it. out may be a. */
int shoal_add(const void *a, const void *b, void *out, int64_t rows, int64_t n, int64_t b_rows, int dtype,
              int nthreads) {
    if (rows < 0 || n < 0 || (b_rows != 1 && b_rows != rows) || (dtype != 0 && dtype != 1)) return 1;
    const int bf16 = dtype == 1;
    const int64_t b_stride = b_rows == 1 ? 0 : n;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++)
            store_value(out, r * n + i, load_value(a, r * n + i, bf16) + load_value(b, r * b_stride + i, bf16), bf16);
    return 0;
}

/* ---- one-query attention over the cache ------------------------------------------------------------
 * For each sequence s (one new token each, at positions[s]):
 *   q = q_ptr[s * q_stride ...] [heads, dim], k = k_ptr[s * k_stride ...] [kv_heads, dim], v likewise;
 *   with cos / sin tables (float32 [*, dim / 2], not NULL) q and k are rotated (Llama's halves pairing)
 *   in float32 and rounded to the dtype; k and v are written to cache slot slot_mapping[s] of the pools
 *   ([slots, kv_heads, dim]); then each head attends over its sequence's keys: context_slots[s *
 *   ctx_stride + j] for j < context_lens[s] (and j <= position), from position - window + 1 with a
 *   sliding window (window > 0). Scores, softmax and the weighted sum run in float32; out [s, heads *
 *   dim] is rounded to the dtype. Grouped-query attention: head h reads kv head h / (heads / kv_heads). */
INLINE void rotate(const void *src, int64_t off, int64_t dim, const float *cos, const float *sin, float *dst,
                   const int bf16) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = load_value(src, off + i, bf16), x2 = load_value(src, off + half + i, bf16);
        dst[i] = round_value(x1 * cos[i] - x2 * sin[i], bf16);
        dst[half + i] = round_value(x2 * cos[i] + x1 * sin[i], bf16);
    }
}

/* sum_i q[i] * k[i] over dim values, k in the dtype */
INLINE float dot(const float *q, const void *k, int64_t dim, const int bf16) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= dim; i += 16) {
        __m512 kv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)k + i))), 16))
                         : _mm512_loadu_ps((const float *)k + i);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < dim; i++) sum += q[i] * load_value(k, i, bf16);
    return sum;
}

/* acc[i] += p * v[i] over dim values, v in the dtype */
INLINE void axpy(float *acc, float p, const void *v, int64_t dim, const int bf16) {
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= dim; i += 16) {
        __m512 vv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)v + i))), 16))
                         : _mm512_loadu_ps((const float *)v + i);
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, vv, _mm512_loadu_ps(acc + i)));
    }
#endif
    for (; i < dim; i++) acc[i] += p * load_value(v, i, bf16);
}

/* Rows this far ahead are asked for early: a lone core reaches a fraction of the memory's bandwidth
 * on a cold cache unless many lines are in flight. */
#define PREFETCH 4

INLINE void prefetch(const char *p, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

/* Heads [h0, h1) of one sequence (kv heads [h0 / group, h1 / group)): reads each cached key and value
 * row once, in slot order (whole rows stream from memory far better than one head's 128 bytes per row
 * at a 2 KB stride, which is what a head-by-head loop reads when the cache has left the CPU's caches). */
INLINE void attend_heads(const void *q_ptr, int64_t qoff, int64_t h0, int64_t h1, int64_t group, int64_t dim,
                         const float *cos, const float *sin, const void *k_pool, const void *v_pool,
                         const int64_t *slots, int64_t first, int64_t n, int64_t row, float scale, float *q,
                         float *acc, float *scores, void *out, int64_t ooff, const int bf16) {
    const size_t esize = bf16 ? 2 : 4;
    const int64_t nh = h1 - h0, keys = n - first;
    for (int64_t h = 0; h < nh; h++) {
        float *qh = q + h * dim;
        if (cos) {
            rotate(q_ptr, qoff + (h0 + h) * dim, dim, cos, sin, qh, bf16);
        } else {
            for (int64_t i = 0; i < dim; i++) qh[i] = load_value(q_ptr, qoff + (h0 + h) * dim + i, bf16);
        }
        for (int64_t i = 0; i < dim; i++) qh[i] *= scale;
    }
    const size_t span = (size_t)((h1 - 1) / group - h0 / group + 1) * dim * esize; /* bytes of a row these heads read */
    const size_t start = (size_t)((h0 / group) * dim) * esize;
    for (int64_t j = 0; j < keys; j++) {
        const char *krow = (const char *)k_pool + (size_t)(slots[first + j] * row) * esize;
        if (j + PREFETCH < keys) prefetch((const char *)k_pool + (size_t)(slots[first + j + PREFETCH] * row) * esize + start, span);
        else if (j + PREFETCH - keys < keys)
            prefetch((const char *)v_pool + (size_t)(slots[first + j + PREFETCH - keys] * row) * esize + start, span);
        for (int64_t h = 0; h < nh; h++)
            scores[h * keys + j] = dot(q + h * dim, krow + (size_t)(((h0 + h) / group) * dim) * esize, dim, bf16);
    }
    softmax_rows(scores, nh, keys);
    for (int64_t i = 0; i < nh * dim; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < keys; j++) {
        const char *vrow = (const char *)v_pool + (size_t)(slots[first + j] * row) * esize;
        if (j + PREFETCH < keys) prefetch((const char *)v_pool + (size_t)(slots[first + j + PREFETCH] * row) * esize + start, span);
        for (int64_t h = 0; h < nh; h++)
            axpy(acc + h * dim, scores[h * keys + j], vrow + (size_t)(((h0 + h) / group) * dim) * esize, dim, bf16);
    }
    for (int64_t i = 0; i < nh * dim; i++) store_value(out, ooff + h0 * dim + i, acc[i], bf16);
}

int shoal_decode_attention(const void *q_ptr, int64_t q_stride, const void *k_ptr, int64_t k_stride,
                           const void *v_ptr, int64_t v_stride, int64_t seqs, int64_t heads, int64_t kv_heads,
                           int64_t dim, const int64_t *positions, const float *cos_table, const float *sin_table,
                           void *k_pool, void *v_pool, const int64_t *slot_mapping, const int64_t *context_slots,
                           int64_t ctx_stride, const int64_t *context_lens, int64_t window, float scale, void *out,
                           int dtype, int nthreads) {
    const int bf16 = dtype == 1;
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || dim <= 0 || dim % 2 || (dtype != 0 && dtype != 1))
        return 1;
    const int64_t group = heads / kv_heads, half = dim / 2, row = kv_heads * dim;
    const size_t esize = bf16 ? 2 : 4;
    int64_t longest = 0;
    /* 1. this step's keys (rotated) and values into the cache */
    for (int64_t s = 0; s < seqs; s++) {
        const int64_t slot = slot_mapping[s];
        char *kdst = (char *)k_pool + (size_t)(slot * row) * esize;
        char *vdst = (char *)v_pool + (size_t)(slot * row) * esize;
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t koff = s * k_stride + g * dim;
            if (cos_table) {
                float rot[dim];
                const float *c = cos_table + positions[s] * half, *sn = sin_table + positions[s] * half;
                if (bf16) {
                    rotate(k_ptr, koff, dim, c, sn, rot, 1);
                    for (int64_t i = 0; i < dim; i++) store_value(kdst, g * dim + i, rot[i], 1);
                } else {
                    rotate(k_ptr, koff, dim, c, sn, (float *)kdst + g * dim, 0);
                }
            } else {
                memcpy(kdst + (size_t)(g * dim) * esize, (const char *)k_ptr + (size_t)koff * esize, (size_t)dim * esize);
            }
            memcpy(vdst + (size_t)(g * dim) * esize, (const char *)v_ptr + (size_t)(s * v_stride + g * dim) * esize,
                   (size_t)dim * esize);
        }
        if (context_lens[s] > longest) longest = context_lens[s];
    }
    /* 2. attention: work items are (sequence, chunk of kv heads); one chunk per sequence unless threads
     * would otherwise idle, so that each item reads whole rows of as many heads as possible. Threads
     * pay off from ~1024 (head, key) pairs: the cache rows come from memory (the layer's matmuls evict
     * them), so even one sequence of 16 heads x 150 keys decodes faster split over 2 cores (ad-hoc timing:
     * a 0.5B int4 Llama's decode step 45-48 -> 35 ms, 2 threads). */
    int64_t chunks = 1;
    if (nthreads > 1 && seqs < nthreads && seqs * heads * longest >= 1024) {
        chunks = (nthreads + seqs - 1) / seqs;
        if (chunks > kv_heads) chunks = kv_heads;
    }
    const int64_t per_chunk = (kv_heads + chunks - 1) / chunks;
    const int64_t items = seqs * chunks;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1 && seqs * heads * longest >= 1024)
    {
        const int64_t nh = per_chunk * group;
        float *scores = (float *)malloc((size_t)(nh * (longest > 0 ? longest : 1)) * sizeof(float));
        float *q = (float *)malloc((size_t)(nh * dim * 2) * sizeof(float));
        if (!scores || !q) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!scores || !q) continue;
            const int64_t s = item / chunks, chunk = item % chunks;
            const int64_t g0 = chunk * per_chunk, g1 = g0 + per_chunk < kv_heads ? g0 + per_chunk : kv_heads;
            if (g0 >= g1) continue;
            const int64_t pos = positions[s];
            const int64_t n = context_lens[s] < pos + 1 ? context_lens[s] : pos + 1;
            const int64_t first = window > 0 && pos + 1 - window > 0 ? pos + 1 - window : 0;
            const float *c = cos_table ? cos_table + pos * half : NULL, *sn = sin_table ? sin_table + pos * half : NULL;
            const int64_t *slots = context_slots + s * ctx_stride;
            if (bf16)
                attend_heads(q_ptr, s * q_stride, g0 * group, g1 * group, group, dim, c, sn, k_pool, v_pool, slots,
                             first, n, row, scale, q, q + nh * dim, scores, out, s * heads * dim, 1);
            else
                attend_heads(q_ptr, s * q_stride, g0 * group, g1 * group, group, dim, c, sn, k_pool, v_pool, slots,
                             first, n, row, scale, q, q + nh * dim, scores, out, s * heads * dim, 0);
        }
        free(scores);
        free(q);
    }
    return failed ? 2 : 0;
}

/* ---- one-query Multi-head Latent Attention (DeepSeek) over the latent cache -----------------------
 * For each sequence s (one new token each, at positions[s]):
 *   kv = kv_ptr[s * kv_stride ...] [rank + rope]: the kv_a projection, latent then the shared rotary key;
 *   the latent is RMS-normed (norm_w, eps, as RMSNorm) and the key rotated (cos / sin float32 [*, rope /
 *   2]; interleaved: DeepSeek's pairs (2i, 2i + 1), stored de-interleaved as RotaryEmbedding returns
 *   them; else Llama's halves), each rounded to the dtype, and written to pool slot slot_mapping[s]
 *   ([slots, rank + rope]);
 *   q = q_ptr[s * q_stride ...] [heads, nope + rope]; per head the weight-absorbed query
 *   q_lat = dtype(q_nope W_UK) [rank] (w_kvb [heads, nope + vdim, rank]: W_UK its first nope rows, W_UV
 *   the rest) and its rotated rope part attend over the context's cached rows (context_slots, as in
 *   shoal_decode_attention): score = scale * (q_lat . latent + q_rope . k_rope), softmax in float32,
 *   o = dtype(sum p latent) [rank], out[s, h * vdim ...] = dtype(W_UV o).
 * Threads split each sequence's heads; every cached row is read once per chunk of heads. */
INLINE void rotate_pairs(const void *src, int64_t off, int64_t dim, const float *cos, const float *sin, float *dst,
                         int interleaved, const int bf16) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = interleaved ? load_value(src, off + 2 * i, bf16) : load_value(src, off + i, bf16);
        float x2 = interleaved ? load_value(src, off + 2 * i + 1, bf16) : load_value(src, off + half + i, bf16);
        dst[i] = round_value(x1 * cos[i] - x2 * sin[i], bf16);
        dst[half + i] = round_value(x2 * cos[i] + x1 * sin[i], bf16);
    }
}

/* ---- several heads at a time (MLA decode) ------------------------------------------------------
 * One sequence's heads all read the same cached rows: the loops below go over a row (or a chunk of
 * it) once for up to HEADS_AT_ONCE heads, each with its own accumulator in a register, instead of once
 * per head with one accumulator, whose dependency chain (and a reduction per head and key) set the pace.
 * The callers pass HEADS_AT_ONCE as a literal where they can: with a count known only at run time the
 * compiler keeps the accumulators on the stack. The 0.5B DeepSeek-shaped model's MLA decode attention
 * (16 heads, 192 keys, bf16, 2 threads) went from 141 to 87 us a call in an ad-hoc side-by-side timing,
 * with the same outputs. */
#define HEADS_AT_ONCE 8

#ifdef __AVX512F__
/* 16 values (the lanes of mask) from p as float32 */
INLINE __m512 load16(const void *p, int64_t i, __mmask16 mask, const int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                      _mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i)), 16))
                : _mm512_maskz_loadu_ps(mask, (const float *)p + i);
}

INLINE __mmask16 lanes_left(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* out[h * out_stride] = dot(q + h * q_stride, k, n) for h < hb (hb <= HEADS_AT_ONCE), k in the dtype */
INLINE void dots_heads(const float *q, int64_t q_stride, const void *k, int64_t n, const int hb, const int bf16,
                       float *out, int64_t out_stride) {
    __m512 acc[HEADS_AT_ONCE];
    for (int h = 0; h < hb; h++) acc[h] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes_left(n - i);
        const __m512 kv = load16(k, i, m, bf16);
        for (int h = 0; h < hb; h++) acc[h] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + h * q_stride + i), kv, acc[h]);
    }
    for (int h = 0; h < hb; h++) out[h * out_stride] = _mm512_reduce_add_ps(acc[h]);
}

/* acc[h * acc_stride + c ..] = sum over keys j of p[h * p_stride + j] * row_j[c ..] for the 16 columns
 * from c, h < hb: row_j = base + slots[j] * row (elements, in the dtype) */
INLINE void weighted_rows_heads(const float *p, int64_t p_stride, const void *base, const int64_t *slots,
                                int64_t keys, int64_t row, int64_t c, __mmask16 m, const int hb, const int bf16,
                                float *acc, int64_t acc_stride) {
    __m512 a[HEADS_AT_ONCE];
    for (int h = 0; h < hb; h++) a[h] = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j++) {
        const __m512 v = load16(base, slots[j] * row + c, m, bf16);
        for (int h = 0; h < hb; h++) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * p_stride + j]), v, a[h]);
    }
    for (int h = 0; h < hb; h++) _mm512_mask_storeu_ps(acc + h * acc_stride + c, m, a[h]);
}

/* out[v] = dot(x, w + v * n) for v < vb (<= HEADS_AT_ONCE): rows of w in the dtype against float32 x [n] */
INLINE void dots_rows(const float *x, const void *w, int64_t n, const int vb, const int bf16, float *out) {
    __m512 acc[HEADS_AT_ONCE];
    for (int v = 0; v < vb; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes_left(n - i);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
        for (int v = 0; v < vb; v++) acc[v] = _mm512_fmadd_ps(xv, load16(w, v * n + i, m, bf16), acc[v]);
    }
    for (int v = 0; v < vb; v++) out[v] = _mm512_reduce_add_ps(acc[v]);
}

/* y[c ..] = sum over d < nd of x[d] * w[d * n + c ..] for the HEADS_AT_ONCE chunks of 16 from c (fewer at the
 * end of n), in d order as axpy adds them */
INLINE void weighted_sum_chunks(const float *x, int64_t nd, const void *w, int64_t n, int64_t c, const int cb,
                                const int bf16, float *y) {
    __m512 a[HEADS_AT_ONCE];
    __mmask16 m[HEADS_AT_ONCE];
    for (int i = 0; i < cb; i++) a[i] = _mm512_setzero_ps(), m[i] = lanes_left(n - c - 16 * i);
    for (int64_t d = 0; d < nd; d++) {
        const __m512 xd = _mm512_set1_ps(x[d]);
        for (int i = 0; i < cb; i++) a[i] = _mm512_fmadd_ps(xd, load16(w, d * n + c + 16 * i, m[i], bf16), a[i]);
    }
    for (int i = 0; i < cb; i++) _mm512_mask_storeu_ps(y + c + 16 * i, m[i], a[i]);
}

INLINE void weighted_sum_rows(const float *x, int64_t nd, const void *w, int64_t n, int64_t c, const int bf16, float *y) {
    const int64_t left = (n - c + 15) / 16;
    if (left >= HEADS_AT_ONCE) /* a constant count: the accumulators stay in registers */
        weighted_sum_chunks(x, nd, w, n, c, HEADS_AT_ONCE, bf16, y);
    else
        weighted_sum_chunks(x, nd, w, n, c, (int)left, bf16, y);
}
#endif

INLINE void mla_heads(const void *q_ptr, int64_t qoff, int64_t h0, int64_t h1, int64_t nope, int64_t rope,
                      int64_t rank, int64_t vdim, const float *cos, const float *sin, int interleaved,
                      const void *w_kvb, const void *pool, const int64_t *slots, int64_t first, int64_t n,
                      float scale, float *q, float *acc, float *scores, void *out, int64_t ooff, const int bf16) {
    const size_t esize = bf16 ? 2 : 4;
    const int64_t nh = h1 - h0, keys = n - first, row = rank + rope, qdim = nope + rope;
    /* absorbed queries: q[h] = [dtype(q_nope W_UK) * scale, dtype(rot(q_rope)) * scale] */
    for (int64_t h = 0; h < nh; h++) {
        float *qh = q + h * row;
        const int64_t qh_off = qoff + (h0 + h) * qdim;
        const char *wuk = (const char *)w_kvb + (size_t)((h0 + h) * (nope + vdim) * rank) * esize;
#ifdef __AVX512F__
        float qn[nope > 0 ? nope : 1];
        for (int64_t d = 0; d < nope; d++) qn[d] = load_value(q_ptr, qh_off + d, bf16);
        for (int64_t c = 0; c < rank; c += 16 * HEADS_AT_ONCE) weighted_sum_rows(qn, nope, wuk, rank, c, bf16, qh);
#else
        for (int64_t r = 0; r < rank; r++) qh[r] = 0.0f;
        for (int64_t d = 0; d < nope; d++) {
            if (d + 2 < nope) prefetch(wuk + (size_t)((d + 2) * rank) * esize, (size_t)rank * esize);
            axpy(qh, load_value(q_ptr, qh_off + d, bf16), wuk + (size_t)(d * rank) * esize, rank, bf16);
        }
#endif
        for (int64_t r = 0; r < rank; r++) qh[r] = round_value(qh[r], bf16) * scale;
        rotate_pairs(q_ptr, qh_off + nope, rope, cos, sin, qh + rank, interleaved, bf16);
        for (int64_t i = 0; i < rope; i++) qh[rank + i] *= scale;
    }
    for (int64_t j = 0; j < keys; j++) {
        const char *krow = (const char *)pool + (size_t)(slots[first + j] * row) * esize;
        if (j + PREFETCH < keys) prefetch((const char *)pool + (size_t)(slots[first + j + PREFETCH] * row) * esize, (size_t)row * esize);
#ifdef __AVX512F__
        for (int64_t hb0 = 0; hb0 < nh; hb0 += HEADS_AT_ONCE) {
            const int hb = (int)(nh - hb0 < HEADS_AT_ONCE ? nh - hb0 : HEADS_AT_ONCE);
            if (hb == HEADS_AT_ONCE) /* a constant count: the accumulators stay in registers */
                dots_heads(q + hb0 * row, row, krow, row, HEADS_AT_ONCE, bf16, scores + hb0 * keys + j, keys);
            else
                dots_heads(q + hb0 * row, row, krow, row, hb, bf16, scores + hb0 * keys + j, keys);
        }
#else
        for (int64_t h = 0; h < nh; h++) scores[h * keys + j] = dot(q + h * row, krow, row, bf16);
#endif
    }
    softmax_rows(scores, nh, keys);
#ifdef __AVX512F__
    /* column chunk by column chunk, every key's latent row weighted into registers for several heads */
    for (int64_t hb0 = 0; hb0 < nh; hb0 += HEADS_AT_ONCE) {
        const int hb = (int)(nh - hb0 < HEADS_AT_ONCE ? nh - hb0 : HEADS_AT_ONCE);
        for (int64_t c = 0; c < rank; c += 16)
            if (hb == HEADS_AT_ONCE)
                weighted_rows_heads(scores + hb0 * keys, keys, pool, slots + first, keys, row, c, lanes_left(rank - c),
                                    HEADS_AT_ONCE, bf16, acc + hb0 * rank, rank);
            else
                weighted_rows_heads(scores + hb0 * keys, keys, pool, slots + first, keys, row, c, lanes_left(rank - c),
                                    hb, bf16, acc + hb0 * rank, rank);
    }
#else
    for (int64_t i = 0; i < nh * rank; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < keys; j++) {
        const char *vrow = (const char *)pool + (size_t)(slots[first + j] * row) * esize;
        for (int64_t h = 0; h < nh; h++) axpy(acc + h * rank, scores[h * keys + j], vrow, rank, bf16);
    }
#endif
    for (int64_t h = 0; h < nh; h++) {
        float *o = acc + h * rank;
        for (int64_t r = 0; r < rank; r++) o[r] = round_value(o[r], bf16);
        const char *wuv = (const char *)w_kvb + (size_t)(((h0 + h) * (nope + vdim) + nope) * rank) * esize;
#ifdef __AVX512F__
        for (int64_t v0 = 0; v0 < vdim; v0 += HEADS_AT_ONCE) {
            const int vb = (int)(vdim - v0 < HEADS_AT_ONCE ? vdim - v0 : HEADS_AT_ONCE);
            float d[HEADS_AT_ONCE];
            if (v0 + HEADS_AT_ONCE < vdim) prefetch(wuv + (size_t)((v0 + HEADS_AT_ONCE) * rank) * esize, (size_t)(HEADS_AT_ONCE * rank) * esize);
            if (vb == HEADS_AT_ONCE)
                dots_rows(o, wuv + (size_t)(v0 * rank) * esize, rank, HEADS_AT_ONCE, bf16, d);
            else
                dots_rows(o, wuv + (size_t)(v0 * rank) * esize, rank, vb, bf16, d);
            for (int v = 0; v < vb; v++) store_value(out, ooff + (h0 + h) * vdim + v0 + v, d[v], bf16);
        }
#else
        for (int64_t v = 0; v < vdim; v++) {
            if (v + 2 < vdim) prefetch(wuv + (size_t)((v + 2) * rank) * esize, (size_t)rank * esize);
            store_value(out, ooff + (h0 + h) * vdim + v, dot(o, wuv + (size_t)(v * rank) * esize, rank, bf16), bf16);
        }
#endif
    }
}

int shoal_mla_decode_attention(const void *q_ptr, int64_t q_stride, const void *kv_ptr, int64_t kv_stride,
                               const void *norm_w, float eps, const void *w_kvb, int64_t seqs, int64_t heads,
                               int64_t nope, int64_t rope, int64_t rank, int64_t vdim, const int64_t *positions,
                               const float *cos_table, const float *sin_table, int interleaved, void *pool,
                               const int64_t *slot_mapping, const int64_t *context_slots, int64_t ctx_stride,
                               const int64_t *context_lens, float scale, void *out, int dtype, int nthreads) {
    const int bf16 = dtype == 1;
    if (heads <= 0 || rank <= 0 || rope <= 0 || rope % 2 || nope < 0 || vdim <= 0 || (dtype != 0 && dtype != 1))
        return 1;
    const int64_t row = rank + rope, half = rope / 2;
    const size_t esize = bf16 ? 2 : 4;
    int64_t longest = 0;
    /* 1. this step's normed latent and rotated key into the cache (RMSNorm as rms_norm_row rounds it) */
    for (int64_t s = 0; s < seqs; s++) {
        char *dst = (char *)pool + (size_t)(slot_mapping[s] * row) * esize;
        const int64_t off = s * kv_stride;
        float acc16[16] = {0}, sum = 0.0f;
        int64_t i = 0;
        for (; i + 16 <= rank; i += 16)
            for (int l = 0; l < 16; l++) {
                float v = load_value(kv_ptr, off + i + l, bf16);
                acc16[l] += v * v;
            }
        for (; i < rank; i++) {
            float v = load_value(kv_ptr, off + i, bf16);
            sum += v * v;
        }
        for (int l = 0; l < 16; l++) sum += acc16[l];
        const float r = 1.0f / sqrtf(sum / (float)rank + eps);
        for (int64_t j = 0; j < rank; j++)
            store_value(dst, j, load_value(norm_w, j, bf16) * round_value(load_value(kv_ptr, off + j, bf16) * r, bf16), bf16);
        float rot[rope];
        rotate_pairs(kv_ptr, off + rank, rope, cos_table + positions[s] * half, sin_table + positions[s] * half, rot,
                     interleaved, bf16);
        for (int64_t j = 0; j < rope; j++) store_value(dst, rank + j, rot[j], bf16);
        if (context_lens[s] > longest) longest = context_lens[s];
    }
    /* 2. attention: work items are (sequence, chunk of heads), chunks only where threads would idle */
    int64_t chunks = 1;
    if (nthreads > 1 && seqs < nthreads) {
        chunks = (nthreads + seqs - 1) / seqs;
        if (chunks > heads) chunks = heads;
    }
    const int64_t per_chunk = (heads + chunks - 1) / chunks;
    const int64_t items = seqs * chunks;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        float *scores = (float *)malloc((size_t)(per_chunk * (longest > 0 ? longest : 1)) * sizeof(float));
        float *q = (float *)malloc((size_t)(per_chunk * (row + rank)) * sizeof(float));
        if (!scores || !q) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            if (!scores || !q) continue;
            const int64_t s = item / chunks, chunk = item % chunks;
            const int64_t h0 = chunk * per_chunk, h1 = h0 + per_chunk < heads ? h0 + per_chunk : heads;
            if (h0 >= h1) continue;
            const int64_t pos = positions[s];
            const int64_t n = context_lens[s] < pos + 1 ? context_lens[s] : pos + 1;
            const float *c = cos_table + pos * half, *sn = sin_table + pos * half;
            const int64_t *slots = context_slots + s * ctx_stride;
            if (bf16)
                mla_heads(q_ptr, s * q_stride, h0, h1, nope, rope, rank, vdim, c, sn, interleaved, w_kvb, pool, slots,
                          0, n, scale, q, q + per_chunk * row, scores, out, s * heads * vdim, 1);
            else
                mla_heads(q_ptr, s * q_stride, h0, h1, nope, rope, rank, vdim, c, sn, interleaved, w_kvb, pool, slots,
                          0, n, scale, q, q + per_chunk * row, scores, out, s * heads * vdim, 0);
        }
        free(scores);
        free(q);
    }
    return failed ? 2 : 0;
}

/* ---- greedy sampling: the index of each row's largest value ------------------------------------
 * out[r] = the first index of the maximum of row r of x [rows, cols] (float32 or bf16), as torch's
 * max(dim=-1).indices gives it; a row holding NaN gives its first NaN, which torch ranks above every
 * number. Two passes over each row (cached): the maximum, then its first index. */
static int64_t argmax_row(const void *x, int64_t r, int64_t cols, const int bf16) {
    const int64_t base = r * cols;
    float best = -INFINITY;
    int nan = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 vbest = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    for (; i + 16 <= cols; i += 16) {
        const __m512 v = load16(x, base + i, 0xFFFF, bf16);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vbest = _mm512_max_ps(vbest, v);
    }
    nan = unordered != 0;
    best = _mm512_reduce_max_ps(vbest);
#endif
    for (; i < cols; i++) {
        const float v = load_value(x, base + i, bf16);
        if (v != v) nan = 1;
        else if (v > best) best = v;
    }
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 vb = _mm512_set1_ps(best);
    for (; j + 16 <= cols; j += 16) {
        const __m512 v = load16(x, base + j, 0xFFFF, bf16);
        const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, vb, _CMP_EQ_OQ);
        if (hit) return j + __builtin_ctz((unsigned)hit);
    }
#endif
    for (; j < cols; j++) {
        const float v = load_value(x, base + j, bf16);
        if (nan ? v != v : v == best) return j;
    }
    return 0; /* every value -inf: the first */
}

int shoal_argmax_rows(const void *x, int64_t rows, int64_t cols, int dtype, int64_t *out, int nthreads) {
    if (rows < 0 || cols < 1 || (dtype != 0 && dtype != 1)) return 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && rows * cols >= (1 << 18))
    for (int64_t r = 0; r < rows; r++) out[r] = dtype == 1 ? argmax_row(x, r, cols, 1) : argmax_row(x, r, cols, 0);
    return 0;
}

/* ---- a MoE router (DeepSeek's, without expert groups) --------------------------------------------
 * For each token t of x [tokens, hidden] (float32, or bf16 read as float32): logits = x W^T (W float32
 * [experts, hidden]); scores = softmax(logits) or sigmoid(logits); the top_k experts by score (+ bias,
 * DeepSeek-V3's correction, for choosing only; ties to the lower id); their scores as weights, divided by
 * their sum + 1e-20 when norm is set (and top_k > 1), times scaling: what shoal.layers.moe.Router
 * computes in torch, in float32, up to summation order. ids_out / weights_out [tokens, top_k] in
 * descending order of choice; counts [experts] (may be NULL) counts the choices. */
int shoal_moe_route(const void *x, int act_bf16, int64_t tokens, int64_t hidden, const float *w, int64_t experts,
                    int sigmoid, const float *bias, int64_t top_k, int norm, float scaling, int64_t groups,
                    int64_t topk_groups, int group_mode, float *weights_out, int64_t *ids_out, int64_t *counts,
                    int nthreads) {
    if (tokens < 0 || hidden < 1 || experts < 1 || experts > 1024 || top_k < 1 || top_k > experts) return 1;
    if (group_mode && (groups < 1 || groups > 64 || experts % groups || topk_groups < 1 || topk_groups > groups))
        return 1;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tokens * experts * hidden >= (1 << 20))
    for (int64_t t = 0; t < tokens; t++) {
        float scores[1024], choice[1024];
        for (int64_t e = 0; e < experts; e++) {
            const float *we = w + e * hidden;
            float s = 0.0f;
            int64_t i = 0;
#ifdef __AVX512F__
            __m512 acc = _mm512_setzero_ps();
            for (; i + 16 <= hidden; i += 16) {
                const __m512 xv = load16(x, t * hidden + i, 0xFFFF, act_bf16);
                acc = _mm512_fmadd_ps(xv, _mm512_loadu_ps(we + i), acc);
            }
            s = _mm512_reduce_add_ps(acc);
#endif
            for (; i < hidden; i++) s += load_value(x, t * hidden + i, act_bf16) * we[i];
            scores[e] = s;
        }
        if (sigmoid) {
            for (int64_t e = 0; e < experts; e++) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
        } else {
            float best = scores[0], sum = 0.0f;
            for (int64_t e = 1; e < experts; e++) best = scores[e] > best ? scores[e] : best;
            for (int64_t e = 0; e < experts; e++) sum += (scores[e] = expf(scores[e] - best));
            for (int64_t e = 0; e < experts; e++) scores[e] /= sum;
        }
        for (int64_t e = 0; e < experts; e++) choice[e] = bias ? scores[e] + bias[e] : scores[e];
        if (group_mode) { /* only the experts of the best topk_groups groups stay choosable */
            const int64_t per = experts / groups;
            float group_score[64];
            for (int64_t g = 0; g < groups; g++) {
                const float *c = choice + g * per;
                if (group_mode == 1) { /* V2 group_limited_greedy: the group's best expert */
                    float best = c[0];
                    for (int64_t e = 1; e < per; e++) best = c[e] > best ? c[e] : best;
                    group_score[g] = best;
                } else { /* V3 noaux_tc: the sum of the group's two best */
                    int64_t first = 0;
                    for (int64_t e = 1; e < per; e++) first = c[e] > c[first] ? e : first;
                    int64_t second = first == 0 ? (per > 1 ? 1 : 0) : 0;
                    for (int64_t e = 0; e < per; e++) second = e != first && c[e] > c[second] ? e : second;
                    group_score[g] = per > 1 ? c[first] + c[second] : c[first];
                }
            }
            unsigned char kept[64] = {0};
            for (int64_t k = 0; k < topk_groups; k++) {
                int64_t pick = -1;
                for (int64_t g = 0; g < groups; g++)
                    if (!kept[g] && (pick < 0 || group_score[g] > group_score[pick])) pick = g;
                kept[pick] = 1;
            }
            const float fill = group_mode == 1 ? 0.0f : -INFINITY;
            for (int64_t e = 0; e < experts; e++)
                if (!kept[e / per]) choice[e] = fill;
        }
        unsigned char taken[1024] = {0};
        float total = 0.0f;
        for (int64_t k = 0; k < top_k; k++) {
            int64_t pick = -1;
            for (int64_t e = 0; e < experts; e++) /* NaN never wins: a router with NaN scores is broken anyway */
                if (!taken[e] && choice[e] == choice[e] && (pick < 0 || choice[e] > choice[pick])) pick = e;
            if (pick < 0) {
#pragma omp atomic write
                failed = 1;
                break;
            }
            taken[pick] = 1;
            ids_out[t * top_k + k] = pick;
            weights_out[t * top_k + k] = scores[pick];
            total += scores[pick];
        }
        for (int64_t k = 0; k < top_k; k++) {
            float v = weights_out[t * top_k + k];
            if (norm && top_k > 1) v = v / (total + 1e-20f);
            weights_out[t * top_k + k] = v * scaling;
        }
    }
    if (failed) return 1;
    if (counts)
        for (int64_t i = 0; i < tokens * top_k; i++) counts[ids_out[i]]++;
    return 0;
}
