/* Batched-decode products for x86-64 (shoal_matmul_rows_*): y [M, N] = x [M, K] W^T for a decode step
 * of more rows than gemv.c's matrix-vector kernels take (9 to 128), with W in bf16, int8 or int4 as gemv.c
 * lays them out. Each weight tile is turned into bf16 in cache and multiplied on AMX tiles, or with
 * AVX512-BF16 dot products where the CPU has no AMX; without AVX512-BF16 (an AVX2 CPU, or a build capped
 * below avx512) every entry point answers 3 and the caller keeps dequantize + F.linear.
 *
 * ISA-specific by nature: the portable kernels live in ../gemv.c, and an ARM port (NEON / SVE) of these
 * entry points goes beside this folder, as ../generic/ holds their fallback for every other CPU.
 */
#define _GNU_SOURCE /* syscall(), to ask Linux for the AMX tile state */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "../kernel_common.h"
#include "../shoal_cpu.h"

/* ---- many activation rows: batched decode ---------------------------------------------------- */

/* y [M, N] = x [M, K] W^T for bf16 activations and more rows than the kernels above take: a decode step
 * of 9 to ~128 sequences (cpu_gemv.ROWS_MAX). There the multiplies, not the weight reads, set the pace,
 * and the pure-torch route for quantized weights (the whole weight dequantized to a bf16 [N, K] tensor in
 * memory on every call, then a matmul reading it back) spends about a third of its time on that
 * dequantization alone (0.5B Llama, int4, 32 rows, ad hoc). Here each thread takes tiles of TILE_N weight rows, writes a tile as bf16 into
 * its own buffer, which stays in the core's cache (exactly the values that dequantization would
 * write), and multiplies it against all M rows:
 *   with AMX (tdpbf16ps), the tile is the A operand and the activations, packed once per call into
 *     B tiles (16 rows each, input pairs interleaved), give 16 x 16 float32 sums per tile register;
 *   otherwise with AVX512-BF16 (vdpbf16ps), 4 weight rows against 4 activation rows per pass.
 * bf16 weights with K a multiple of 32 skip the buffer on the AMX path: the tiles load from the weight
 * itself (rows_tile_amx_bf16; 1.1-1.4x faster than through the buffer over [32000, 512] and [5632, 1024]
 * weights at 16-64 rows in an ad-hoc timing, the same sums).
 * Either way each product of two bf16 values is exact and the sums are float32, as in a bf16 matmul,
 * and each output is rounded to bf16 once:
 *   bf16  y = bf16(sum)
 *   int8  y = bf16(bf16(sum) * scale[n])   (the scale applied to the output, as shoal's int8 fallback does;
 *                                           int8 values are exact in bf16)
 *   int4  y = bf16(sum), W as shoal_dequant_int4 writes it: bf16((u - 8) * scale + zero), multiply then add
 * Without AVX512-BF16 these return 3 and shoal_kernel_features() says so: the callers keep the matmul.
 * int4 weights without AMX go to ../rows_q8.c instead (int8 activations, integer dot products, any ISA). */


#define TILE_N 32 /* weight rows turned into bf16 and multiplied together: two AMX tiles' rows */
#define KCHUNK 32 /* inputs per AMX tile row (64 bytes of bf16); K is padded with zeros to a multiple */
#define AMX_M 16  /* activation rows per B tile */
#define KSEG 256  /* inputs of a weight tile turned into bf16 at a time on the AMX path */

enum { ROWS_BF16 = 0, ROWS_INT8 = 1, ROWS_INT4 = 2 };

typedef struct {
    int kind;            /* ROWS_* */
    const void *w;       /* layouts at the top of this file */
    const float *scale;  /* int8: [N] */
    Int4Groups g;        /* int4 */
    int64_t N, K, Kp;    /* Kp: K rounded up to KCHUNK (the zeros past K multiply zeros) */
} RowsWeight;

INLINE uint16_t rows_output(const RowsWeight *rw, int64_t n, float sum) {
    return rw->kind == ROWS_INT8 ? float_to_bf16(bf16_to_float(float_to_bf16(sum)) * rw->scale[n]) : float_to_bf16(sum);
}

/* While a tile's weight rows are read, the next tile's (the same thread's next, under a static schedule)
 * are asked into L2: in an ad-hoc timing over more weights than the caches hold this read int8 and bf16
 * weights 10-15% faster than prefetching 2 KB ahead into L1 as the kernels above do. */
#define ROWS_AHEAD(row_bytes) (TILE_N * (row_bytes))
#define ROWS_PREFETCH(p) _mm_prefetch((p), _MM_HINT_T1)

#ifdef SHOAL_ROWS
/* The 16 bf16 values (u - 8) * scale + zero for u = 0..15 of one int4 group, in the low half of a vector
 * that _mm512_permutexvar_epi16 then indexes with the nibbles: one lookup gives 32 weights. */
INLINE __m512i int4_table(const float *scale, const float *zero) {
    const __m512 u = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(u, _mm512_set1_ps(*scale)), _mm512_set1_ps(*zero));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));
}

/* count (<= 16) bf16 values from p as float32 into out */
INLINE void bf16_to_float16(const uint16_t *p, int64_t count, float *out) {
    const __mmask16 lanes = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    _mm512_storeu_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16)));
}

/* Inputs [k0, k0 + len) of weight row n as bf16 into dst[0, len), zeros past K. k0 is a multiple of
 * KSEG (so of 128, the int4 block) and len of KCHUNK. */
static void rows_weight_part(const RowsWeight *rw, int64_t n, int64_t k0, int64_t len, uint16_t *dst) {
    const int64_t K = rw->K, end = k0 + len < K ? k0 + len : K;
    int64_t k = k0;
    if (rw->kind == ROWS_BF16) {
        const uint16_t *src = (const uint16_t *)rw->w + n * K;
        const int64_t ahead = ROWS_AHEAD(K * 2);
        for (; k + 32 <= end; k += 32) {
            ROWS_PREFETCH((const char *)(src + k) + ahead);
            _mm512_storeu_si512(dst + k - k0, _mm512_loadu_si512(src + k));
        }
        for (; k < end; k++) dst[k - k0] = src[k];
    } else if (rw->kind == ROWS_INT8) {
        const int8_t *src = (const int8_t *)rw->w + n * K;
        const int64_t ahead = ROWS_AHEAD(K);
        for (; k + 32 <= end; k += 32) {
            ROWS_PREFETCH((const char *)(src + k) + ahead);
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + k))));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + k + 16))));
            _mm512_storeu_si512(dst + k - k0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)); /* exact: |q| <= 128 */
        }
        for (; k < end; k++) dst[k - k0] = float_to_bf16((float)src[k]);
    } else {
        const Int4Groups *g = &rw->g;
        const uint8_t *src = (const uint8_t *)rw->w + n * (K / 2);
        const int gs = g->group_shift;
        const int64_t G = K >> gs, r = n * G;
        const __m512i low = _mm512_set1_epi16(0x0F);
        const int64_t ahead = ROWS_AHEAD(K / 2);
        /* The row's scales and zeros as float32: as given, or bf16 ones converted 16 groups at a time into
         * sf / zf (from group `first` on), so that a table takes its two broadcasts straight from memory. */
        float sbuf[16], zbuf[16];
        const float *sf = (const float *)g->scale + r, *zf = (const float *)g->zero + r;
        int64_t first = 0;
        if (g->scale_bf16) sf = sbuf, zf = zbuf, first = -16;
        for (; k < end; k += 128) {
            const uint8_t *b = src + k / 2;
            uint16_t *d = dst + k - k0;
            ROWS_PREFETCH((const char *)b + ahead);
            const int64_t gi = k >> gs; /* this block's first group, in the row */
            if (g->scale_bf16 && gi + 4 > first + 16) { /* the next 16 groups (a block spans up to 4) */
                first = gi;
                bf16_to_float16((const uint16_t *)g->scale + r + gi, G - gi, sbuf);
                bf16_to_float16((const uint16_t *)g->zero + r + gi, G - gi, zbuf);
            }
            const float *s = sf + (g->scale_bf16 ? gi - first : gi), *z = zf + (g->scale_bf16 ? gi - first : gi);
            /* tables for inputs k + [0, 32), [32, 64), [64, 96), [96, 128): groups are 32 or more */
            __m512i t[4];
            t[0] = int4_table(s, z);
            if (gs == 5) {
                for (int i = 1; i < 4; i++) t[i] = int4_table(s + i, z + i);
            } else if (gs == 6) {
                t[1] = t[0];
                t[2] = t[3] = int4_table(s + 1, z + 1);
            } else {
                t[1] = t[2] = t[3] = t[0];
            }
            for (int j = 0; j < 2; j++) { /* bytes 32 j .. 32 j + 31: inputs 32 j + i (low nibble), 64 + 32 j + i */
                const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 32 * j)));
                _mm512_storeu_si512(d + 32 * j, _mm512_permutexvar_epi16(_mm512_and_si512(u, low), t[j]));
                _mm512_storeu_si512(d + 64 + 32 * j, _mm512_permutexvar_epi16(_mm512_srli_epi16(u, 4), t[2 + j]));
            }
        }
    }
    if (k < k0 + len) memset(dst + (k - k0), 0, (size_t)(k0 + len - k) * 2);
}

/* rows_weight_part for row n0 + r of a tile; zeros for a row past N. */
INLINE void rows_tile_row(const RowsWeight *rw, int64_t n0, int r, int64_t k0, int64_t len, uint16_t *dst) {
    if (n0 + r < rw->N)
        rows_weight_part(rw, n0 + r, k0, len, dst);
    else
        memset(dst, 0, (size_t)len * 2);
}

/* sums[m] = [dot(x row m, tile row j)] for j < 4, m < mb: the tile's rows at stride Kp, x's at xs. */
INLINE void rows_dot_4x4(const uint16_t *tile, int64_t Kp, const uint16_t *x, int64_t xs, const int mb, __m128 *sums) {
    __m512 acc[4][4];
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 32) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(tile + k), w1 = (__m512bh)_mm512_loadu_si512(tile + Kp + k);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(tile + 2 * Kp + k), w3 = (__m512bh)_mm512_loadu_si512(tile + 3 * Kp + k);
        for (int m = 0; m < mb; m++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xv, w2);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xv, w3);
        }
    }
    for (int m = 0; m < mb; m++) sums[m] = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
}

/* One weight tile (bf16 [TILE_N, Kp]) against every activation row with vdpbf16ps; x [M, Kp] at row stride xs. */
static void rows_tile_dp(const RowsWeight *rw, const uint16_t *tile, int64_t n0, const uint16_t *x, int64_t xs,
                         int64_t M, uint16_t *y) {
    const int64_t Kp = rw->Kp, N = rw->N;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = (int)(M - m0 < 4 ? M - m0 : 4);
        for (int j0 = 0; j0 < TILE_N && n0 + j0 < N; j0 += 4) {
            __m128 sums[4];
            const uint16_t *t4 = tile + j0 * Kp, *xm = x + m0 * xs;
            switch (mb) { /* constant row counts, so the accumulators live in registers */
            case 1: rows_dot_4x4(t4, Kp, xm, xs, 1, sums); break;
            case 2: rows_dot_4x4(t4, Kp, xm, xs, 2, sums); break;
            case 3: rows_dot_4x4(t4, Kp, xm, xs, 3, sums); break;
            default: rows_dot_4x4(t4, Kp, xm, xs, 4, sums); break;
            }
            for (int m = 0; m < mb; m++) {
                float s[4];
                _mm_storeu_ps(s, sums[m]);
                for (int j = 0; j < 4 && n0 + j0 + j < N; j++)
                    y[(m0 + m) * N + n0 + j0 + j] = rows_output(rw, n0 + j0 + j, s[j]);
            }
        }
    }
}

#ifdef SHOAL_AMX
/* Linux hands out the AMX tile state only on request, once per process; -1 = refused (or an old kernel). */
static int amx_permitted(void) {
    static int state = 0;
    if (state == 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    }
    return state > 0;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* tiles 0..3: float32 sums [16 weight rows, 16 activation rows]; 4, 5: weights [16 rows, 32 inputs in bf16];
 * 6, 7: packed activations [16 input pairs, 16 rows x 2 bf16]. */
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* 16 x 16 transpose of 32-bit elements: r[i] holds row i, afterwards column i. */
INLINE void transpose16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4 i + e], 128-bit lane L: rows 4 i .. 4 i + 3 of column 4 L + e */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int e = 0; e < 4; e++) {
        const __m512i ab02 = _mm512_shuffle_i32x4(r[e], r[4 + e], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i ab13 = _mm512_shuffle_i32x4(r[e], r[4 + e], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512i cd02 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i cd13 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], _MM_SHUFFLE(3, 1, 3, 1));
        t[e] = _mm512_shuffle_i32x4(ab02, cd02, _MM_SHUFFLE(2, 0, 2, 0));
        t[8 + e] = _mm512_shuffle_i32x4(ab02, cd02, _MM_SHUFFLE(3, 1, 3, 1));
        t[4 + e] = _mm512_shuffle_i32x4(ab13, cd13, _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + e] = _mm512_shuffle_i32x4(ab13, cd13, _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Block b = mb * (Kp / KCHUNK) + kc of the packed activations: rows [16 mb, 16 mb + 16) and inputs
 * [32 kc, 32 kc + 32) of x as a B tile, word 2 c + i of row p = x[16 mb + c, 32 kc + 2 p + i]; zeros
 * past M and K. */
static void amx_pack_block(const uint16_t *x, int64_t M, int64_t K, int64_t b, int64_t chunks, uint16_t *xp) {
    const int64_t mb = b / chunks, k0 = (b % chunks) * KCHUNK;
    const __mmask32 valid = K - k0 >= KCHUNK ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k0)) - 1);
    __m512i r[16];
    for (int c = 0; c < 16; c++) {
        const int64_t m = mb * AMX_M + c;
        r[c] = m < M ? _mm512_maskz_loadu_epi16(valid, x + m * K + k0) : _mm512_setzero_si512();
    }
    transpose16x16(r);
    for (int p = 0; p < 16; p++) _mm512_storeu_si512(xp + b * 512 + p * 32, r[p]);
}

/* The sums of one accumulator tile (16 weight rows from n0, 16 activation rows from m0) into y: transposed,
 * so that each vector holds 16 outputs of one activation row. */
static void amx_output(const RowsWeight *rw, const float *sums, int64_t n0, int64_t m0, int64_t M, uint16_t *y) {
    const int64_t N = rw->N;
    if (n0 >= N) return;
    const __mmask16 cols = N - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
    const __m512 scale = rw->kind == ROWS_INT8 ? _mm512_maskz_loadu_ps(cols, rw->scale + n0) : _mm512_setzero_ps();
    __m512i v[16];
    for (int r = 0; r < 16; r++) v[r] = _mm512_load_si512(sums + r * 16);
    transpose16x16(v);
    for (int c = 0; c < 16 && m0 + c < M; c++) {
        __m256bh out = _mm512_cvtneps_pbh(_mm512_castsi512_ps(v[c]));
        if (rw->kind == ROWS_INT8) { /* bf16(bf16(sum) * scale) */
            const __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)out), 16));
            out = _mm512_cvtneps_pbh(_mm512_mul_ps(rounded, scale));
        }
        _mm256_mask_storeu_epi16(y + (m0 + c) * N + n0, cols, (__m256i)out);
    }
}

/* One chunk of 32 inputs: weight rows a0 and a1 (16 each, row stride a_stride bytes) times the packed
 * activation blocks b0 (and b1 where `two`) into accumulators 0-1 (and 2-3). */
INLINE void amx_chunk(const uint16_t *a0, const uint16_t *a1, int64_t a_stride, const uint16_t *b0, const uint16_t *b1,
                      int two) {
    _tile_loadd(4, a0, a_stride);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a1, a_stride);
    _tile_dpbf16ps(1, 5, 6);
    if (two) {
        _tile_loadd(7, b1, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* Weight rows [n0, n0 + 32) against every activation row with tdpbf16ps, 2 x 2 tiles at a time: A tiles 4
 * and 5 hold weight rows [0, 16) and [16, 32) of 32 inputs, B tiles 6 and 7 two blocks of 16 activation
 * rows, accumulators 0..3 the four products (so each tile loaded feeds two multiplies). Up to 32
 * activation rows the sums stay in the tile registers across all of K; past that each pair of blocks
 * (a pass) keeps them in `sums` between segments.
 * The weights are turned into bf16 KSEG inputs (a segment) at a time, into one of two TILE_N x KSEG
 * buffers that stay in L1: while the tile unit multiplies one segment, the core fills the other with
 * the next, a few rows after each multiply, so that the two overlap instead of taking turns. */
static void rows_tile_amx(const RowsWeight *rw, uint16_t *buffers, int64_t n0, const uint16_t *xp, int64_t M,
                          float *sums) {
    const int64_t Kp = rw->Kp, chunks = Kp / KCHUNK, mblocks = (M + AMX_M - 1) / AMX_M, passes = (mblocks + 1) / 2;
    const int64_t segments = (Kp + KSEG - 1) / KSEG;
    for (int r = 0; r < TILE_N; r++) rows_tile_row(rw, n0, r, 0, Kp < KSEG ? Kp : KSEG, buffers + r * KSEG);
    for (int64_t s = 0; s < segments; s++) {
        const int64_t k0 = s * KSEG, len = Kp - k0 < KSEG ? Kp - k0 : KSEG;
        const int64_t next_len = s + 1 < segments ? (Kp - k0 - KSEG < KSEG ? Kp - k0 - KSEG : KSEG) : 0;
        const uint16_t *a0 = buffers + (s & 1) * TILE_N * KSEG, *a1 = a0 + 16 * KSEG;
        uint16_t *next = buffers + ((s + 1) & 1) * TILE_N * KSEG;
        const int64_t steps = passes * (len / KCHUNK);
        int64_t step = 0;
        int filled = 0; /* rows of the next segment written so far */
        for (int64_t p = 0; p < passes; p++) {
            const int two = 2 * p + 1 < mblocks; /* a second block of activation rows in this pass */
            float *cs = sums + p * 1024;
            if (k0 == 0) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
            } else if (passes > 1) {
                _tile_loadd(0, cs, 64);
                _tile_loadd(1, cs + 256, 64);
                _tile_loadd(2, cs + 512, 64);
                _tile_loadd(3, cs + 768, 64);
            }
            const uint16_t *b0 = xp + 2 * p * chunks * 512, *b1 = b0 + chunks * 512;
            for (int64_t c = 0, kc = k0 / KCHUNK; c < len / KCHUNK; c++, kc++) {
                amx_chunk(a0 + c * KCHUNK, a1 + c * KCHUNK, KSEG * 2, b0 + kc * 512, b1 + kc * 512, two);
                if (next_len) /* the next segment's rows, spread evenly over this segment's multiplies */
                    for (const int upto = (int)(++step * TILE_N / steps); filled < upto; filled++)
                        rows_tile_row(rw, n0, filled, k0 + KSEG, next_len, next + filled * KSEG);
            }
            if (passes > 1 || s + 1 == segments) {
                _tile_stored(0, cs, 64);
                _tile_stored(1, cs + 256, 64);
                _tile_stored(2, cs + 512, 64);
                _tile_stored(3, cs + 768, 64);
            }
        }
    }
}

/* rows_tile_amx, then its sums into y */
/* rows_tile_amx for a whole tile of bf16 weights with K a multiple of KCHUNK: nothing to convert, so the
 * A tiles load straight from the weight (row stride K), pass by pass, and the next tile's rows are asked
 * into L2 meanwhile. The same multiplies in the same order: the same sums. */
static void rows_tile_amx_bf16(const RowsWeight *rw, int64_t n0, const uint16_t *xp, int64_t M, float *sums) {
    const int64_t K = rw->K, chunks = K / KCHUNK, mblocks = (M + AMX_M - 1) / AMX_M, passes = (mblocks + 1) / 2;
    const uint16_t *a0 = (const uint16_t *)rw->w + n0 * K, *a1 = a0 + 16 * K;
    const char *next = (const char *)(a0 + TILE_N * K); /* the next tile: TILE_N rows, K * 2 bytes each */
    const int64_t lines = TILE_N * K * 2 / 64, per_chunk = (lines + chunks - 1) / chunks;
    for (int64_t p = 0; p < passes; p++) {
        const int two = 2 * p + 1 < mblocks;
        const uint16_t *b0 = xp + 2 * p * chunks * 512, *b1 = b0 + chunks * 512;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < chunks; c++) {
            if (p == 0 && n0 + 2 * TILE_N <= rw->N) /* the next tile's lines, spread over this one's chunks */
                for (int64_t i = c * per_chunk; i < (c + 1) * per_chunk && i < lines; i++) ROWS_PREFETCH(next + i * 64);
            amx_chunk(a0 + c * KCHUNK, a1 + c * KCHUNK, K * 2, b0 + c * 512, b1 + c * 512, two);
        }
        float *cs = sums + p * 1024;
        _tile_stored(0, cs, 64);
        _tile_stored(1, cs + 256, 64);
        _tile_stored(2, cs + 512, 64);
        _tile_stored(3, cs + 768, 64);
    }
}

static void rows_tile_amx_out(const RowsWeight *rw, uint16_t *buffers, int64_t n0, const uint16_t *xp, int64_t M,
                              float *sums, uint16_t *y) {
    const int64_t mblocks = (M + AMX_M - 1) / AMX_M, passes = (mblocks + 1) / 2;
    if (rw->kind == ROWS_BF16 && rw->Kp == rw->K && n0 + TILE_N <= rw->N)
        rows_tile_amx_bf16(rw, n0, xp, M, sums);
    else
        rows_tile_amx(rw, buffers, n0, xp, M, sums);
    for (int64_t p = 0; p < passes; p++) /* accumulator q: weight rows n0 + 16 (q & 1), block 2 p + (q >> 1) */
        for (int q = 0; q < (2 * p + 1 < mblocks ? 4 : 2); q++)
            amx_output(rw, sums + p * 1024 + q * 256, n0 + 16 * (q & 1), (2 * p + (q >> 1)) * AMX_M, M, y);
}
#endif /* SHOAL_AMX */

static int rows_run(const RowsWeight *rw, const uint16_t *x, int64_t M, uint16_t *y, int amx, int threads) {
    const int64_t K = rw->K, Kp = rw->Kp, N = rw->N, tiles = (N + TILE_N - 1) / TILE_N;
#ifdef SHOAL_AMX
    amx = amx && amx_permitted();
#else
    amx = 0;
#endif
    /* The activations as the multiply reads them: AMX B tiles, or rows padded to Kp where K is not. */
    const int64_t chunks = Kp / KCHUNK, blocks = (M + AMX_M - 1) / AMX_M * chunks;
    uint16_t *xs = NULL;
    if (amx || Kp != K) {
        xs = (uint16_t *)alloc((size_t)(amx ? blocks * 512 : M * Kp) * 2);
        if (!xs) return 2;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        if (xs && !amx) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {
                memcpy(xs + m * Kp, x + m * K, (size_t)K * 2);
                memset(xs + m * Kp + K, 0, (size_t)(Kp - K) * 2);
            }
        }
#ifdef SHOAL_AMX
        if (amx) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) amx_pack_block(x, M, K, b, chunks, xs);
            amx_configure();
        }
#endif
        /* AMX: two segment buffers; dot products: the whole tile */
        uint16_t *tile = (uint16_t *)alloc((size_t)(TILE_N * (amx ? 2 * KSEG : Kp)) * 2);
        float *sums = (float *)alloc((size_t)((M + 31) / 32 * 1024) * 4); /* AMX: 4 accumulators per 32 rows */
        if (!tile || !sums) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (!tile || !sums) continue;
#ifdef SHOAL_AMX
            if (amx) {
                rows_tile_amx_out(rw, tile, t * TILE_N, xs, M, sums, y);
                continue;
            }
#endif
            for (int r = 0; r < TILE_N; r++) rows_tile_row(rw, t * TILE_N, r, 0, Kp, tile + r * Kp);
            rows_tile_dp(rw, tile, t * TILE_N, xs ? xs : x, Kp, M, y);
        }
#ifdef SHOAL_AMX
        if (amx) _tile_release();
#endif
        free(tile);
        free(sums);
    }
    free(xs);
    return failed ? 2 : 0;
}
#endif /* SHOAL_ROWS */

static int rows_matmul(RowsWeight *rw, const uint16_t *x, int64_t M, uint16_t *y, int amx, int threads) {
    if (M < 1 || rw->K < 1 || rw->N < 1) return 1;
    rw->Kp = (rw->K + KCHUNK - 1) / KCHUNK * KCHUNK;
#ifdef SHOAL_ROWS
    return rows_run(rw, x, M, y, amx, threads);
#else
    (void)x, (void)y, (void)amx, (void)threads;
    return 3;
#endif
}

/* bf16 x [M, K] times a bf16 weight [N, K]: bf16 y [M, N]. amx = 0 keeps to vdpbf16ps even where AMX is there. */
int shoal_matmul_rows_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int amx,
                           int threads) {
    RowsWeight rw = {ROWS_BF16, w, NULL, {0}, N, K, 0};
    return rows_matmul(&rw, x, M, y, amx, threads);
}

int shoal_matmul_rows_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
                           uint16_t *y, int amx, int threads) {
    RowsWeight rw = {ROWS_INT8, w, scale, {0}, N, K, 0};
    return rows_matmul(&rw, x, M, y, amx, threads);
}

int shoal_matmul_rows_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                           const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int amx,
                           int threads) {
    const int shift = group_shift(group);
    if (shift < 5 || K % group || K % 128) return 1;
#ifdef SHOAL_AMX
    if (amx && amx_permitted()) {
        RowsWeight rw = {ROWS_INT4, w, NULL, {scale, zero, scale_bf16, group, shift}, N, K, 0};
        return rows_matmul(&rw, x, M, y, amx, threads);
    }
#endif
    /* without AMX: int8 activations and integer dot products (../rows_q8.c), on every ISA level */
    (void)amx;
    return shoal_matmul_rows_q8_int4(x, M, K, w, scale, zero, scale_bf16, group, N, y, threads);
}

/* The features bits these kernels give this build (shoal_kernel_features): 4 = built (AVX512-BF16),
 * 8 = AMX for them (built in, and granted by the OS). */
int shoal_rows_features(void) {
    int features = 0;
#ifdef SHOAL_ROWS
    features |= 4;
#endif
#ifdef SHOAL_AMX
    if (amx_permitted()) features |= 8;
#endif
    return features;
}
