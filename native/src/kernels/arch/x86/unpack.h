// The unpackers' byte shuffles on x86 (included by unpack.c).
#pragma once

#include "../../simd.h"

#if defined(__AVX2__)
#define ACTSPARSE_UNPACK_ARCH 1

// 16 bytes of nibble pairs -> 32 values 0..15: low nibbles first, then high nibbles.
static inline void split_nibbles(const uint8_t * qs, int8_t * q) {
    const __m128i x = _mm_loadu_si128((const __m128i *) qs), low4 = _mm_set1_epi8(0x0F);
    _mm_storeu_si128((__m128i *) q, _mm_and_si128(x, low4));
    _mm_storeu_si128((__m128i *) (q + 16), _mm_and_si128(_mm_srli_epi16(x, 4), low4));
}

// sm: the eight 6-bit scales, then the eight mins, as bytes. d[g] = dd * scale[g / 2],
// m[g] = -dmin * min[g / 2] for the 16 entries of 16 columns.
static inline void k_scales_widen(const uint32_t sm[4], float dd, float dmin, float * d, float * m) {
    // each byte twice (two 16-column entries per 32-column group), widened to float
    const __m128i u = _mm_loadu_si128((const __m128i *) sm);
    const __m128i su = _mm_shuffle_epi8(u, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m128i mu = _mm_shuffle_epi8(u, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15));
#if defined(__AVX512F__)
    _mm512_storeu_ps(d, _mm512_mul_ps(_mm512_set1_ps(dd), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(su))));
    _mm512_storeu_ps(m, _mm512_mul_ps(_mm512_set1_ps(-dmin), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mu))));
#else
    const __m256 dv = _mm256_set1_ps(dd), mv = _mm256_set1_ps(-dmin);
    _mm256_storeu_ps(d, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(su))));
    _mm256_storeu_ps(d + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(su, 8)))));
    _mm256_storeu_ps(m, _mm256_mul_ps(mv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mu))));
    _mm256_storeu_ps(m + 8, _mm256_mul_ps(mv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mu, 8)))));
#endif
}
#endif
