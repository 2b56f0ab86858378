// The integer accumulate's tile on aarch64 with the dot-product extension (included by
// axpy-int.c after INT_ROWS and INT_GROUPS): one column group per call, in sdot.
#pragma once

#include "../../simd.h"

#define INT_TILE_GROUPS 1

// One column group of a pass's rows with sdot: zips interleave four rows' bytes so that each
// 32-bit element holds one column of the four rows; acc[j] holds columns 4 j .. 4 j + 3.
static inline void int_tile(float * y, const uint8_t * const q[INT_ROWS], int64_t g, uint32_t (*coef)[INT_GROUPS],
                            const float * scale, const float * offset) {
    const int64_t col = 16 * g;
    int32x4_t acc[4] = { vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0) };
    for (int p = 0; p < INT_ROWS / 4; ++p) {
        const uint8x16_t r0 = vld1q_u8(q[4 * p] + col), r1 = vld1q_u8(q[4 * p + 1] + col);
        const uint8x16_t r2 = vld1q_u8(q[4 * p + 2] + col), r3 = vld1q_u8(q[4 * p + 3] + col);
        const uint16x8_t t0 = vreinterpretq_u16_u8(vzip1q_u8(r0, r1)), t1 = vreinterpretq_u16_u8(vzip2q_u8(r0, r1));
        const uint16x8_t t2 = vreinterpretq_u16_u8(vzip1q_u8(r2, r3)), t3 = vreinterpretq_u16_u8(vzip2q_u8(r2, r3));
        const int8x16_t cp = vreinterpretq_s8_u32(vdupq_n_u32(coef[p][g]));  // rows 4p .. 4p+3
        acc[0] = vdotq_s32(acc[0], vreinterpretq_s8_u16(vzip1q_u16(t0, t2)), cp);
        acc[1] = vdotq_s32(acc[1], vreinterpretq_s8_u16(vzip2q_u16(t0, t2)), cp);
        acc[2] = vdotq_s32(acc[2], vreinterpretq_s8_u16(vzip1q_u16(t1, t3)), cp);
        acc[3] = vdotq_s32(acc[3], vreinterpretq_s8_u16(vzip2q_u16(t1, t3)), cp);
    }
    const float32x4_t sv = vdupq_n_f32(scale[0]), ov = vdupq_n_f32(offset[0]);
    for (int j = 0; j < 4; ++j) {
        vst1q_f32(y + 4 * j, vfmaq_f32(vaddq_f32(vld1q_f32(y + 4 * j), ov), sv, vcvtq_f32_s32(acc[j])));
    }
}
