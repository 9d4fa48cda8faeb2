/* The batched-decode entry points (shoal_matmul_rows_*) on a CPU without ISA-specific kernels for them
 * (every architecture but x86-64 and aarch64, whose ../x86/ and ../arm/matmul_rows.c hold them): each
 * answers 3, "this build lacks the ISA extension the call needs", and the caller keeps dequantize +
 * F.linear, as an x86 CPU without AVX512-BF16 does (shoal/backends/cpu/library.py picks the folder by
 * architecture).
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
    (void)x, (void)M, (void)K, (void)w, (void)scale, (void)zero, (void)scale_bf16, (void)group, (void)N, (void)y;
    (void)amx, (void)threads;
    return 3;
}

int shoal_rows_features(void) { return 0; }
