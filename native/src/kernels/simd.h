// A small vector layer for the kernels' float loops, in the manner of ggml's GGML_F32_VEC_*
// (ggml-cpu/simd-mappings.h): a loop written once against these macros runs on AVX-512, AVX2 + FMA
// and AArch64 NEON, and a scalar tail (or the scalar reference) covers the rest. Where none of
// these is available ACTSPARSE_F32_EPR is undefined and the kernels run their scalar code.
// Code these cannot express (the integer dot products, the AVX-512 compressing select, byte
// shuffles) lives under arch/, by ISA.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// ACTSPARSE_F32_EPR           floats per vector
// ACTSPARSE_F32_VEC           the float vector; ACTSPARSE_I32_VEC the int32 vector of as many lanes
// ACTSPARSE_F32_VEC_FMA(a, b, c)  a + b * c, fused (ggml's argument order)
// ACTSPARSE_F32_VEC_DIV_OR(num, den, alt)  num / den, or alt where den == 0
// ACTSPARSE_F32_VEC_TO_I32    round to nearest, ties to even
// ACTSPARSE_F32_VEC_LOAD_F16  EPR halves, ACTSPARSE_F32_VEC_LOAD_BF16 EPR bf16 values, widened
// ACTSPARSE_F32_MASK          a lane mask: ACTSPARSE_F32_VEC_GT(a, b) (false for NaN),
//                             ACTSPARSE_F32_MASK_BITS (bit l = lane l), ACTSPARSE_F32_MASK_COUNT
//                             (lanes set), ACTSPARSE_F32_VEC_KEEP(x, m) (x where m, else +0)
// actsparse_f32_vec_load_i8x16  16 int8 values -> ACTSPARSE_I8X16_VECS float vectors
// actsparse_i32_vec_store_i8    EPR int32 lanes (each in [-128, 127]) -> EPR bytes
#if defined(__AVX512F__)
#define ACTSPARSE_F32_EPR 16
#define ACTSPARSE_F32_VEC __m512
#define ACTSPARSE_I32_VEC __m512i
#define ACTSPARSE_F32_VEC_ZERO() _mm512_setzero_ps()
#define ACTSPARSE_F32_VEC_SET1 _mm512_set1_ps
#define ACTSPARSE_F32_VEC_LOAD _mm512_loadu_ps
#define ACTSPARSE_F32_VEC_STORE _mm512_storeu_ps
#define ACTSPARSE_F32_VEC_ADD _mm512_add_ps
#define ACTSPARSE_F32_VEC_MUL _mm512_mul_ps
#define ACTSPARSE_F32_VEC_FMA(a, b, c) _mm512_fmadd_ps(b, c, a)
#define ACTSPARSE_F32_VEC_MAX _mm512_max_ps
#define ACTSPARSE_F32_VEC_ABS _mm512_abs_ps
#define ACTSPARSE_F32_VEC_DIV_OR(num, den, alt) \
    _mm512_mask_div_ps(alt, _mm512_cmp_ps_mask(den, _mm512_setzero_ps(), _CMP_NEQ_OQ), num, den)
#define ACTSPARSE_F32_VEC_TO_I32 _mm512_cvtps_epi32
#define ACTSPARSE_I32_VEC_TO_F32 _mm512_cvtepi32_ps
#define ACTSPARSE_F32_VEC_LOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (p)))
#define ACTSPARSE_F32_VEC_LOAD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *) (p))), 16))
#define ACTSPARSE_F32_MASK __mmask16
#define ACTSPARSE_F32_VEC_GT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)
#define ACTSPARSE_F32_MASK_BITS(m) ((unsigned) (m))
#define ACTSPARSE_F32_MASK_COUNT(m) __builtin_popcount((unsigned) (m))
#define ACTSPARSE_F32_VEC_KEEP(x, m) _mm512_maskz_mov_ps(m, x)
#define ACTSPARSE_I8X16_VECS 1

static inline void actsparse_f32_vec_load_i8x16(__m512 v[1], const int8_t * p) {
    v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) p)));
}

static inline void actsparse_i32_vec_store_i8(int8_t * dst, __m512i c) {
    _mm_storeu_si128((__m128i *) dst, _mm512_cvtsepi32_epi8(c));
}

#elif defined(__AVX2__) && defined(__FMA__)
#define ACTSPARSE_F32_EPR 8
#define ACTSPARSE_F32_VEC __m256
#define ACTSPARSE_I32_VEC __m256i
#define ACTSPARSE_F32_VEC_ZERO() _mm256_setzero_ps()
#define ACTSPARSE_F32_VEC_SET1 _mm256_set1_ps
#define ACTSPARSE_F32_VEC_LOAD _mm256_loadu_ps
#define ACTSPARSE_F32_VEC_STORE _mm256_storeu_ps
#define ACTSPARSE_F32_VEC_ADD _mm256_add_ps
#define ACTSPARSE_F32_VEC_MUL _mm256_mul_ps
#define ACTSPARSE_F32_VEC_FMA(a, b, c) _mm256_fmadd_ps(b, c, a)
#define ACTSPARSE_F32_VEC_MAX _mm256_max_ps
#define ACTSPARSE_F32_VEC_ABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define ACTSPARSE_F32_VEC_DIV_OR(num, den, alt) \
    _mm256_blendv_ps(_mm256_div_ps(num, den), alt, _mm256_cmp_ps(den, _mm256_setzero_ps(), _CMP_EQ_OQ))
#define ACTSPARSE_F32_VEC_TO_I32 _mm256_cvtps_epi32
#define ACTSPARSE_I32_VEC_TO_F32 _mm256_cvtepi32_ps
#if defined(__F16C__)
#define ACTSPARSE_F32_VEC_LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (p)))
#endif
#define ACTSPARSE_F32_VEC_LOAD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) (p))), 16))
#define ACTSPARSE_F32_MASK __m256
#define ACTSPARSE_F32_VEC_GT(a, b) _mm256_cmp_ps(a, b, _CMP_GT_OQ)
#define ACTSPARSE_F32_MASK_BITS(m) ((unsigned) _mm256_movemask_ps(m))
#define ACTSPARSE_F32_MASK_COUNT(m) __builtin_popcount((unsigned) _mm256_movemask_ps(m))
#define ACTSPARSE_F32_VEC_KEEP(x, m) _mm256_and_ps(x, m)
#define ACTSPARSE_I8X16_VECS 2

static inline void actsparse_f32_vec_load_i8x16(__m256 v[2], const int8_t * p) {
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p)));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (p + 8))));
}

static inline void actsparse_i32_vec_store_i8(int8_t * dst, __m256i c) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64((__m128i *) dst, _mm_packs_epi16(w, w));
}

#elif defined(__ARM_NEON) && defined(__aarch64__)
#define ACTSPARSE_F32_EPR 4
#define ACTSPARSE_F32_VEC float32x4_t
#define ACTSPARSE_I32_VEC int32x4_t
#define ACTSPARSE_F32_VEC_ZERO() vdupq_n_f32(0.0f)
#define ACTSPARSE_F32_VEC_SET1 vdupq_n_f32
#define ACTSPARSE_F32_VEC_LOAD vld1q_f32
#define ACTSPARSE_F32_VEC_STORE vst1q_f32
#define ACTSPARSE_F32_VEC_ADD vaddq_f32
#define ACTSPARSE_F32_VEC_MUL vmulq_f32
#define ACTSPARSE_F32_VEC_FMA(a, b, c) vfmaq_f32(a, b, c)
#define ACTSPARSE_F32_VEC_MAX vmaxq_f32
#define ACTSPARSE_F32_VEC_ABS vabsq_f32
#define ACTSPARSE_F32_VEC_DIV_OR(num, den, alt) vbslq_f32(vceqzq_f32(den), alt, vdivq_f32(num, den))
#define ACTSPARSE_F32_VEC_TO_I32 vcvtnq_s32_f32  // to nearest, ties to even, as x86's cvtps
#define ACTSPARSE_I32_VEC_TO_F32 vcvtq_f32_s32
// fcvtl is base AArch64: no +fp16 needed for the widening
#define ACTSPARSE_F32_VEC_LOAD_F16(p) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (p))))
// bf16 is the upper half of an f32, so the widening shift is the exact conversion
#define ACTSPARSE_F32_VEC_LOAD_BF16(p) vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *) (p)), 16))
#define ACTSPARSE_F32_MASK uint32x4_t
#define ACTSPARSE_F32_VEC_GT vcgtq_f32
#define ACTSPARSE_F32_MASK_BITS(m) vaddvq_u32(vandq_u32(m, (uint32x4_t) { 1, 2, 4, 8 }))
#define ACTSPARSE_F32_MASK_COUNT(m) ((int) vaddvq_u32(vshrq_n_u32(m, 31)))
#define ACTSPARSE_F32_VEC_KEEP(x, m) vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x), m))
#define ACTSPARSE_I8X16_VECS 4

static inline void actsparse_f32_vec_load_i8x16(float32x4_t v[4], const int8_t * p) {
    const int8x16_t qv = vld1q_s8(p);
    const int16x8_t q0 = vmovl_s8(vget_low_s8(qv)), q1 = vmovl_high_s8(qv);
    v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q0)));
    v[1] = vcvtq_f32_s32(vmovl_high_s16(q0));
    v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q1)));
    v[3] = vcvtq_f32_s32(vmovl_high_s16(q1));
}

static inline void actsparse_i32_vec_store_i8(int8_t * dst, int32x4_t c) {
    const int16x4_t h = vqmovn_s32(c);
    int8_t b[8];
    vst1_s8(b, vqmovn_s16(vcombine_s16(h, h)));
    memcpy(dst, b, 4);
}
#endif
