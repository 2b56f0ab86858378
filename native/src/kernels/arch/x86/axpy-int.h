// The integer accumulate's tile on x86 (included by axpy-int.c): AVX2, or AVX-512BW with VNNI's
// dpbusd where available (else maddubs + madd), INT_TILE_GROUPS column groups per call. Included
// after INT_ROWS and INT_GROUPS.
#pragma once

#include "../../simd.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT_TILE_GROUPS 4  // one group per 128-bit lane
typedef __m512i int_tile_vec;
#define IV_LOAD(p) _mm512_loadu_si512((const void *) (p))
#define IV_UNPACKLO8 _mm512_unpacklo_epi8
#define IV_UNPACKHI8 _mm512_unpackhi_epi8
#define IV_UNPACKLO16 _mm512_unpacklo_epi16
#define IV_UNPACKHI16 _mm512_unpackhi_epi16
#define IV_ZERO _mm512_setzero_si512
// group L's four coefficient bytes in every element of lane L
#define IV_COEF(cp) _mm512_permutexvar_epi32(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), \
                                             _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *) (cp))))
#if defined(__AVX512VNNI__)
#define IV_DOT4(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#else
#define IV_DOT4(acc, u, s) _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)))
#endif
#else
#define INT_TILE_GROUPS 2
typedef __m256i int_tile_vec;
#define IV_LOAD(p) _mm256_loadu_si256((const __m256i *) (p))
#define IV_UNPACKLO8 _mm256_unpacklo_epi8
#define IV_UNPACKHI8 _mm256_unpackhi_epi8
#define IV_UNPACKLO16 _mm256_unpacklo_epi16
#define IV_UNPACKHI16 _mm256_unpackhi_epi16
#define IV_ZERO _mm256_setzero_si256
#define IV_COEF(cp) _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *) (cp))), \
                                                _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0))
#define IV_DOT4(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

// INT_TILE_GROUPS column groups (one per 128-bit lane) of a pass's rows. Four rows' bytes are
// interleaved so that each 32-bit element holds one column of the four rows, the operand the
// 4-way dot products sum; acc[j] lane L then holds columns 16 L + 4 j .. 16 L + 4 j + 3.
static inline void int_tile(float * y, const uint8_t * const q[INT_ROWS], int64_t g, uint32_t (*coef)[INT_GROUPS],
                            const float * scale, const float * offset) {
    const int64_t col = 16 * g;
    int_tile_vec acc[4] = { IV_ZERO(), IV_ZERO(), IV_ZERO(), IV_ZERO() };
    for (int p = 0; p < INT_ROWS / 4; ++p) {
        const int_tile_vec r0 = IV_LOAD(q[4 * p] + col), r1 = IV_LOAD(q[4 * p + 1] + col);
        const int_tile_vec r2 = IV_LOAD(q[4 * p + 2] + col), r3 = IV_LOAD(q[4 * p + 3] + col);
        const int_tile_vec t0 = IV_UNPACKLO8(r0, r1), t1 = IV_UNPACKHI8(r0, r1);
        const int_tile_vec t2 = IV_UNPACKLO8(r2, r3), t3 = IV_UNPACKHI8(r2, r3);
        const int_tile_vec cp = IV_COEF(coef[p] + g);
        acc[0] = IV_DOT4(acc[0], IV_UNPACKLO16(t0, t2), cp);
        acc[1] = IV_DOT4(acc[1], IV_UNPACKHI16(t0, t2), cp);
        acc[2] = IV_DOT4(acc[2], IV_UNPACKLO16(t1, t3), cp);
        acc[3] = IV_DOT4(acc[3], IV_UNPACKHI16(t1, t3), cp);
    }
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // transpose the 4 x 4 lanes: group L's sixteen columns in order
    const __m512i a01lo = _mm512_shuffle_i32x4(acc[0], acc[1], 0x44), a23lo = _mm512_shuffle_i32x4(acc[2], acc[3], 0x44);
    const __m512i a01hi = _mm512_shuffle_i32x4(acc[0], acc[1], 0xEE), a23hi = _mm512_shuffle_i32x4(acc[2], acc[3], 0xEE);
    const __m512i grp[4] = {
        _mm512_shuffle_i32x4(a01lo, a23lo, 0x88), _mm512_shuffle_i32x4(a01lo, a23lo, 0xDD),
        _mm512_shuffle_i32x4(a01hi, a23hi, 0x88), _mm512_shuffle_i32x4(a01hi, a23hi, 0xDD),
    };
    for (int l = 0; l < 4; ++l) {
        float * yl = y + 16 * l;
        const __m512 base = _mm512_add_ps(_mm512_loadu_ps(yl), _mm512_set1_ps(offset[l]));
        _mm512_storeu_ps(yl, _mm512_fmadd_ps(_mm512_set1_ps(scale[l]), _mm512_cvtepi32_ps(grp[l]), base));
    }
#else
    // lane L of acc[0], acc[1] is columns 0-7 of group L, of acc[2], acc[3] columns 8-15
    const __m256i grp[2][2] = {
        { _mm256_permute2x128_si256(acc[0], acc[1], 0x20), _mm256_permute2x128_si256(acc[2], acc[3], 0x20) },
        { _mm256_permute2x128_si256(acc[0], acc[1], 0x31), _mm256_permute2x128_si256(acc[2], acc[3], 0x31) },
    };
    for (int l = 0; l < 2; ++l) {
        const __m256 sv = _mm256_set1_ps(scale[l]), ov = _mm256_set1_ps(offset[l]);
        float * yl = y + 16 * l;
        const __m256i lo = grp[l][0], hi = grp[l][1];
        _mm256_storeu_ps(yl, _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(lo), _mm256_add_ps(_mm256_loadu_ps(yl), ov)));
        _mm256_storeu_ps(yl + 8, _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(hi), _mm256_add_ps(_mm256_loadu_ps(yl + 8), ov)));
    }
#endif
}
