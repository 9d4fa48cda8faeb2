/* The batched-decode entry points (shoal_matmul_rows_*) on a CPU without ISA-specific kernels for them
 * (every architecture but x86-64 and aarch64, whose ../x86/ and ../arm/matmul_rows.c hold them): each
 * answers 3, "this build lacks the ISA extension the call needs", and the caller keeps dequantize +
 * F.linear (shoal/backends/cpu/library.py picks the folder by architecture); int4 weights take the portable
 * integer kernel of ../rows_q8.c.
 */
#include <stdint.h>

#include "../shoal_cpu.h"

int shoal_matmul_rows_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int amx,
                           int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)y, (void)amx, (void)threads;
    return 3;
}

int shoal_matmul_rows_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *w, const float *scale, int64_t N,
                           uint16_t *y, int amx, int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)scale, (void)N, (void)y, (void)amx, (void)threads;
    return 3;
}

int shoal_matmul_rows_int4(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const void *scale,
                           const void *zero, int scale_bf16, int64_t group, int64_t N, uint16_t *y, int amx,
                           int threads) {
    (void)amx; /* int8 activations and integer dot products, written for every ISA (../rows_q8.c) */
    return shoal_matmul_rows_q8_int4(x, M, K, w, scale, zero, scale_bf16, group, N, y, threads);
}

int shoal_rows_features(void) { return 0; }
