/* Matrix-vector kernels for the CPU backend: y[m, n] = sum_k x[m, k] * W[n, k] for a few activation
 * rows m (batch-1 and small-batch decode), with W in bf16, int8 per output channel, or int4 per group.
 *
 * Decode reads every weight once per step, so these kernels are built to stream W at the memory's
 * speed: each thread takes a contiguous range of output rows, reads each weight row exactly once, and
 * multiplies it against every activation row (held as float32 in cache). Weights are widened to
 * float32 in registers; activations are never quantized, so the result is the weight-only product
 * that the pure-torch fallback computes, up to float summation order.
 *
 * Compiled at first use by shoal/backends/cpu_gemv.py with `-O3 -march=native -fopenmp` and linked
 * into the process's OpenMP runtime (torch's own), loaded through ctypes. With AVX-512 the inner
 * loops are hand-vectorized; elsewhere the plain loops below are left to the compiler.
 *
 * Layouts (row-major, contiguous):
 *   x      [M, K], float32 (act_bf16 = 0) or bf16 (act_bf16 = 1); y [M, N] in the same dtype
 *   bf16   W uint16 [N, K]
 *   int8   W int8 [N, K], scale float32 [N]:                 w = q * scale
 *   int4   W uint8 [N, K / 2], per block of 32 inputs 16 bytes, byte i holding input i in its low
 *          nibble and input i + 16 in its high one; scale, offset float32 [N, K / group]:
 *          w = u * scale + offset   (shoal's canonical (u - 8) * scale + zero, with offset = zero - 8 scale)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_ROWS 8   /* activation rows per call; the Python side falls back to a matmul above this */
#define ROW_BLOCK 4  /* activation rows multiplied per pass over a weight row */

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* x as float32 [M, K]: converted once per call (M * K is tiny next to the weight). */
static float *activations(const void *x, int act_bf16, int64_t M, int64_t K) {
    float *xf = (float *)aligned_alloc(64, ((size_t)(M * K * 4) + 63) / 64 * 64);
    if (!xf) return NULL;
    if (act_bf16) {
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(xb[i]);
    } else {
        memcpy(xf, x, (size_t)(M * K * 4));
    }
    return xf;
}

static inline void store(void *y, int act_bf16, int64_t index, float value) {
    if (act_bf16)
        ((uint16_t *)y)[index] = float_to_bf16(value);
    else
        ((float *)y)[index] = value;
}

#ifdef __AVX512F__
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#endif

#define INLINE static inline __attribute__((always_inline))

/* One weight row (bf16 or int8, selected by `int8`) against rows [0, mb) of xf: dots[m]. Always
 * inlined with constant `mb` and `int8` (see dot_row), so the accumulators live in registers. */
INLINE void dot_row_impl(const void *wrow, const int int8, const float *xf, int64_t K, const int mb, float *dots) {
#ifdef __AVX512F__
    if (K % 16 == 0) {
        __m512 acc[ROW_BLOCK][2];
        for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int64_t k = 0;
        /* Two accumulators per row so consecutive FMAs do not wait on each other. */
        for (; k + 32 <= K; k += 32) {
            __m512 w0 = int8 ? load_int8x16((const int8_t *)wrow + k) : load_bf16x16((const uint16_t *)wrow + k);
            __m512 w1 = int8 ? load_int8x16((const int8_t *)wrow + k + 16)
                             : load_bf16x16((const uint16_t *)wrow + k + 16);
            for (int m = 0; m < mb; m++) {
                acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * K + k), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * K + k + 16), acc[m][1]);
            }
        }
        for (; k < K; k += 16) {
            __m512 w0 = int8 ? load_int8x16((const int8_t *)wrow + k) : load_bf16x16((const uint16_t *)wrow + k);
            for (int m = 0; m < mb; m++) acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * K + k), acc[m][0]);
        }
        for (int m = 0; m < mb; m++) dots[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
        return;
    }
#endif
    for (int m = 0; m < mb; m++) {
        const float *xm = xf + m * K;
        float s = 0.0f;
        if (int8) {
            const int8_t *w = (const int8_t *)wrow;
            for (int64_t k = 0; k < K; k++) s += (float)w[k] * xm[k];
        } else {
            const uint16_t *w = (const uint16_t *)wrow;
            for (int64_t k = 0; k < K; k++) s += bf16_to_float(w[k]) * xm[k];
        }
        dots[m] = s;
    }
}

static void dot_row(const void *wrow, int int8, const float *xf, int64_t K, int mb, float *dots) {
    if (int8) {
        switch (mb) {
        case 1: dot_row_impl(wrow, 1, xf, K, 1, dots); break;
        case 2: dot_row_impl(wrow, 1, xf, K, 2, dots); break;
        case 3: dot_row_impl(wrow, 1, xf, K, 3, dots); break;
        default: dot_row_impl(wrow, 1, xf, K, 4, dots); break;
        }
    } else {
        switch (mb) {
        case 1: dot_row_impl(wrow, 0, xf, K, 1, dots); break;
        case 2: dot_row_impl(wrow, 0, xf, K, 2, dots); break;
        case 3: dot_row_impl(wrow, 0, xf, K, 3, dots); break;
        default: dot_row_impl(wrow, 0, xf, K, 4, dots); break;
        }
    }
}

static int gemv_dense(const void *x, int act_bf16, int64_t M, int64_t K, const void *w, int int8,
                      const float *scale, int64_t N, void *y, int threads) {
    if (M < 1 || M > MAX_ROWS) return 1;
    float *xf = activations(x, act_bf16, M, K);
    if (!xf) return 2;
    const size_t row_bytes = (size_t)K * (int8 ? 1 : 2);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const void *wrow = (const char *)w + (size_t)n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int mb = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dots[ROW_BLOCK];
            dot_row(wrow, int8, xf + m0 * K, K, mb, dots);
            for (int m = 0; m < mb; m++) store(y, act_bf16, (m0 + m) * N + n, int8 ? dots[m] * scale[n] : dots[m]);
        }
    }
    free(xf);
    return 0;
}

int shoal_gemv_bf16(const void *x, int act_bf16, int64_t M, int64_t K, const uint16_t *w, int64_t N, void *y,
                    int threads) {
    return gemv_dense(x, act_bf16, M, K, w, 0, NULL, N, y, threads);
}

int shoal_gemv_int8(const void *x, int act_bf16, int64_t M, int64_t K, const int8_t *w, const float *scale,
                    int64_t N, void *y, int threads) {
    return gemv_dense(x, act_bf16, M, K, w, 1, scale, N, y, threads);
}

/* ---- int4 -------------------------------------------------------------------------------------- */

/* One int4 weight row against rows [0, mb) of xf, group sums of x in xsum [M, G]. */
INLINE void dot_row_int4_impl(const uint8_t *wrow, const float *scale, const float *offset, const float *xf,
                              const float *xsum, int64_t K, int64_t group, const int mb, float *dots) {
    const int64_t G = K / group;
#ifdef __AVX512F__
    __m512 acc[ROW_BLOCK];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < G; g++) {
        __m512 part[ROW_BLOCK][2];
        for (int m = 0; m < mb; m++) part[m][0] = part[m][1] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(wrow + k / 2));
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low_mask)));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low_mask)));
            for (int m = 0; m < mb; m++) {
                part[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * K + k), part[m][0]);
                part[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * K + k + 16), part[m][1]);
            }
        }
        __m512 s = _mm512_set1_ps(scale[g]);
        for (int m = 0; m < mb; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(part[m][0], part[m][1]), s, acc[m]);
    }
    for (int m = 0; m < mb; m++) {
        float d = _mm512_reduce_add_ps(acc[m]);
        for (int64_t g = 0; g < G; g++) d += offset[g] * xsum[m * G + g];
        dots[m] = d;
    }
#else
    for (int m = 0; m < mb; m++) {
        const float *xm = xf + m * K;
        float d = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float part = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                const uint8_t *b = wrow + k / 2;
                for (int i = 0; i < 16; i++) part += (float)(b[i] & 0x0F) * xm[k + i] + (float)(b[i] >> 4) * xm[k + 16 + i];
            }
            d += part * scale[g] + offset[g] * xsum[m * G + g];
        }
        dots[m] = d;
    }
#endif
}

static void dot_row_int4(const uint8_t *wrow, const float *scale, const float *offset, const float *xf,
                         const float *xsum, int64_t K, int64_t group, int mb, float *dots) {
    switch (mb) {
    case 1: dot_row_int4_impl(wrow, scale, offset, xf, xsum, K, group, 1, dots); break;
    case 2: dot_row_int4_impl(wrow, scale, offset, xf, xsum, K, group, 2, dots); break;
    case 3: dot_row_int4_impl(wrow, scale, offset, xf, xsum, K, group, 3, dots); break;
    default: dot_row_int4_impl(wrow, scale, offset, xf, xsum, K, group, 4, dots); break;
    }
}

int shoal_gemv_int4(const void *x, int act_bf16, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                    const float *offset, int64_t group, int64_t N, void *y, int threads) {
    if (M < 1 || M > MAX_ROWS || group % 32 || K % group) return 1;
    float *xf = activations(x, act_bf16, M, K);
    if (!xf) return 2;
    const int64_t G = K / group;
    float *sums = (float *)malloc((size_t)(M * G) * sizeof(float));
    if (!sums) {
        free(xf);
        return 2;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += xf[m * K + k];
            sums[m * G + g] = s;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wrow = w + (size_t)n * (size_t)(K / 2);
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            int mb = (int)(M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK);
            float dots[ROW_BLOCK];
            dot_row_int4(wrow, scale + n * G, offset + n * G, xf + m0 * K, sums + m0 * G, K, group, mb, dots);
            for (int m = 0; m < mb; m++) store(y, act_bf16, (m0 + m) * N + n, dots[m]);
        }
    }
    free(sums);
    free(xf);
    return 0;
}

/* The int4 weight above as bf16 [N, K], for prefill, where a matmul on the CPU's matrix units wins. */
int shoal_dequant_int4_bf16(const uint8_t *w, const float *scale, const float *offset, int64_t group, int64_t N,
                            int64_t K, uint16_t *out, int threads) {
    if (group % 32 || K % group) return 1;
    const int64_t G = K / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wrow = w + (size_t)n * (size_t)(K / 2);
        uint16_t *orow = out + (size_t)n * (size_t)K;
        for (int64_t k = 0; k < K; k += 32) {
            const int64_t g = k / group;
            const float s = scale[n * G + g], o = offset[n * G + g];
            const uint8_t *b = wrow + k / 2;
            for (int i = 0; i < 16; i++) {
                orow[k + i] = float_to_bf16((float)(b[i] & 0x0F) * s + o);
                orow[k + 16 + i] = float_to_bf16((float)(b[i] >> 4) * s + o);
            }
        }
    }
    return 0;
}
