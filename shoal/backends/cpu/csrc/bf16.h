/* bf16 <-> float32, once for every kernel file: values in the activations' dtype are read as float32 and
 * written rounded to nearest even, as torch rounds. */
#ifndef SHOAL_BF16_H
#define SHOAL_BF16_H

#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch does; NaN stays NaN. Branch-free, so loops of it vectorize. */
INLINE uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40 : rounded);
}

/* Element i of p, a bf16 (bf16 != 0) or float32 array, as float32. */
INLINE float load_value(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Element i of p, a bf16 or float32 array, set to v (rounded for bf16). */
INLINE void store_value(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* v rounded to the dtype and back (bf16: what torch keeps after an op in bf16). */
INLINE float round_value(float v, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

#endif
