// AVX-512's compressing select (included by select.c): the active entries of x over whole groups of
// sixteen; returns where the scalar tail starts, with *k the entries appended.
#pragma once

#include "../../simd.h"

#if defined(__AVX512F__)
#define ACTSPARSE_SELECT_ARCH 1

static inline int64_t select_arch(const float * x, const float * t, bool scalar_t, int64_t n, int32_t * idx,
                                  float * val, int64_t * k_out) {
    // Compress in registers and store whole vectors (a compressing store is slow on some cores);
    // the 16 writes at k <= i stay inside the n entries.
    const __m512 ts = _mm512_set1_ps(t[0]);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t i = 0, k = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        const __mmask16 keep = ACTSPARSE_F32_VEC_GT(ACTSPARSE_F32_VEC_ABS(xv), scalar_t ? ts : _mm512_loadu_ps(t + i));
        if (!keep) continue;
        const __m512i iv = _mm512_add_epi32(_mm512_set1_epi32((int32_t) i), lanes);
        _mm512_storeu_si512((void *) (idx + k), _mm512_maskz_compress_epi32(keep, iv));
        _mm512_storeu_ps(val + k, _mm512_maskz_compress_ps(keep, xv));
        k += __builtin_popcount((unsigned) keep);
    }
    *k_out = k;
    return i;
}
#endif
