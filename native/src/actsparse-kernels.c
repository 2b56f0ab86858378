// actsparse CPU kernels (see actsparse-kernels.h).
#include "actsparse-kernels.h"

#include "ggml-cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define QK8_0 32
typedef struct {
    uint16_t d;  // ggml_half
    int8_t   qs[QK8_0];
} block_q8_0_t;
_Static_assert(sizeof(block_q8_0_t) == 34, "block_q8_0 layout");

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    __fp16 t;
    memcpy(&t, &h, sizeof t);
    return (float) t;
#else
    return ggml_fp16_to_fp32(h);
#endif
}

// static inline: the exported wrapper below cannot be inlined into the loops (interposition)
static inline float apply_act(enum actsparse_act act, float x) {
    switch (act) {
        case ACTSPARSE_ACT_SILU: return x / (1.0f + expf(-x));
        case ACTSPARSE_ACT_GELU: {
            const float c = 0.7978845608028654f;  // sqrt(2/pi)
            return 0.5f * x * (1.0f + tanhf(c * x * (1.0f + 0.044715f * x * x)));
        }
        default: return x;
    }
}

float actsparse_apply_act(enum actsparse_act act, float x) {
    return apply_act(act, x);
}

const char * actsparse_kernels_simd(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return "avx512+vnni";  // the packed accumulate's dot products are VNNI's
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__ARM_NEON) && defined(__aarch64__)
    // ggml's vec_dot (rows_dot) uses these when the CPU backend is built with them
#if defined(__ARM_FEATURE_DOTPROD)
    return "neon+dotprod";
#else
    return "neon";
#endif
#else
    return "scalar";
#endif
}

int64_t actsparse_act_mask(const float * x, float * y, const float * t, bool scalar_t, enum actsparse_act act,
                           int64_t i0, int64_t i1) {
    int64_t zeros = 0;
    if (act == ACTSPARSE_ACT_NONE) {
#if defined(__ARM_NEON) && defined(__aarch64__)
        // Explicit, so that the mask does not hinge on each compiler's cost model for the counting
        // loop below. A true compare is all ones: subtracting it counts the kept lanes.
        const float32x4_t ts = vld1q_dup_f32(t);
        uint32x4_t kept0 = vdupq_n_u32(0), kept1 = vdupq_n_u32(0);
        const int64_t start = i0;
        for (; i0 + 8 <= i1; i0 += 8) {
            const float32x4_t x0 = vld1q_f32(x + i0), x1 = vld1q_f32(x + i0 + 4);
            const uint32x4_t k0 = vcgtq_f32(vabsq_f32(x0), scalar_t ? ts : vld1q_f32(t + i0));
            const uint32x4_t k1 = vcgtq_f32(vabsq_f32(x1), scalar_t ? ts : vld1q_f32(t + i0 + 4));
            vst1q_f32(y + i0, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x0), k0)));
            vst1q_f32(y + i0 + 4, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x1), k1)));
            kept0 = vsubq_u32(kept0, k0);
            kept1 = vsubq_u32(kept1, k1);
        }
        zeros = (i0 - start) - (int64_t) (vaddlvq_u32(kept0) + vaddlvq_u32(kept1));
#endif
        // the common case (the graph has applied the activation): a loop the compiler vectorises
        for (int64_t i = i0; i < i1; ++i) {
            const bool keep = fabsf(x[i]) > (scalar_t ? t[0] : t[i]);
            y[i] = keep ? x[i] : 0.0f;
            zeros += !keep;
        }
        return zeros;
    }
    for (int64_t i = i0; i < i1; ++i) {
        const float a = apply_act(act, x[i]);
        const float ti = scalar_t ? t[0] : t[i];
        const bool keep = fabsf(a) > ti;
        y[i] = keep ? a : 0.0f;
        zeros += !keep;
    }
    return zeros;
}

int64_t actsparse_select(const float * x, const float * t, bool scalar_t, enum actsparse_act act, int64_t n,
                         int32_t * idx, float * val) {
    int64_t k = 0;
    int64_t i = 0;
#if defined(__ARM_NEON) && defined(__aarch64__)
    if (act == ACTSPARSE_ACT_NONE) {
        // At useful sparsity most groups of four have no active entry, and one compare rejects
        // them. Active lanes are appended without branches: idx[k] is written for every lane and
        // kept only by advancing k, which stays <= i + l, so the writes stay inside the n entries.
        const float32x4_t ts = vld1q_dup_f32(t);
        for (; i + 4 <= n; i += 4) {
            const float32x4_t xv = vld1q_f32(x + i);
            const uint32x4_t keep = vcgtq_f32(vabsq_f32(xv), scalar_t ? ts : vld1q_f32(t + i));
            if (vmaxvq_u32(keep) == 0) continue;
            uint32_t m[4];
            vst1q_u32(m, keep);
            for (int l = 0; l < 4; ++l) {
                idx[k] = (int32_t) (i + l);
                val[k] = x[i + l];
                k += m[l] & 1;
            }
        }
    }
#elif defined(__AVX512F__)
    if (act == ACTSPARSE_ACT_NONE) {
        // Compress in registers and store whole vectors (a compressing store is slow on some
        // cores); the 16 writes at k <= i stay inside the n entries.
        const __m512 ts = _mm512_set1_ps(t[0]);
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 sign = _mm512_set1_ps(-0.0f);
        for (; i + 16 <= n; i += 16) {
            const __m512 xv = _mm512_loadu_ps(x + i);
            const __m512 ax = _mm512_andnot_ps(sign, xv);
            const __mmask16 keep = _mm512_cmp_ps_mask(ax, scalar_t ? ts : _mm512_loadu_ps(t + i), _CMP_GT_OQ);
            if (!keep) continue;
            const __m512i iv = _mm512_add_epi32(_mm512_set1_epi32((int32_t) i), lanes);
            _mm512_storeu_si512((void *) (idx + k), _mm512_maskz_compress_epi32(keep, iv));
            _mm512_storeu_ps(val + k, _mm512_maskz_compress_ps(keep, xv));
            k += __builtin_popcount((unsigned) keep);
        }
    }
#elif defined(__AVX2__)
    if (act == ACTSPARSE_ACT_NONE) {
        // One compare rejects a group of eight with no active entry; the rest are appended without
        // branches, as on NEON.
        const __m256 ts = _mm256_set1_ps(t[0]);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (; i + 8 <= n; i += 8) {
            const __m256 ax = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
            const int keep = _mm256_movemask_ps(_mm256_cmp_ps(ax, scalar_t ? ts : _mm256_loadu_ps(t + i), _CMP_GT_OQ));
            if (!keep) continue;
            for (int l = 0; l < 8; ++l) {
                idx[k] = (int32_t) (i + l);
                val[k] = x[i + l];
                k += (keep >> l) & 1;
            }
        }
    }
#endif
    for (; i < n; ++i) {
        const float a = apply_act(act, x[i]);
        if (fabsf(a) > (scalar_t ? t[0] : t[i])) {
            idx[k] = (int32_t) i;
            val[k] = a;
            ++k;
        }
    }
    return k;
}

// ACTSPARSE_PREFETCH_BYTES (default 8192) sets the distance, for tuning on other machines.
static int64_t prefetch_bytes(void) {
    static int64_t bytes = -1;
    if (bytes < 0) {
        const char * v = getenv("ACTSPARSE_PREFETCH_BYTES");
        bytes = v && atoll(v) > 0 ? atoll(v) : 8192;
    }
    return bytes;
}

static int64_t prefetch_rows(size_t row_bytes) {
    const int64_t rows = prefetch_bytes() / (int64_t) row_bytes;
    return rows < 2 ? 2 : rows > 64 ? 64 : rows;
}

void actsparse_rows_dot(enum ggml_type type, const void * w, size_t row_bytes, int64_t n_per_row,
                        const int32_t * idx, const float * val, const void * x_vd, float * out,
                        int64_t k0, int64_t k1) {
    const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu(type);
    // Rows are gathered by index, which the hardware prefetcher cannot follow: prefetch the row
    // a few kilobytes of reads ahead, enough to cover the memory latency.
    const int64_t ahead = prefetch_rows(row_bytes);
    for (int64_t k = k0; k < k1; ++k) {
        if (k + ahead < k1) {
            const char * next = (const char *) w + (size_t) idx[k + ahead] * row_bytes;
            for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
        }
        float s = 0.0f;
        tt->vec_dot((int) n_per_row, &s, 0, (const char *) w + (size_t) idx[k] * row_bytes, 0, x_vd, 0, 1);
        out[k] = val[k] * s;
    }
}

// ---- input-sparse accumulate over a transposed weight -----------------------------------------

static void axpy_f32_ref(const float * w, float v, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) y[c] += v * w[c];
}

static void axpy_q8_0_ref(const block_q8_0_t * b, float v, float * y, int64_t n) {
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const float s = v * fp16_to_fp32(b[j].d);
        for (int l = 0; l < QK8_0; ++l) y[j * QK8_0 + l] += s * (float) b[j].qs[l];
    }
}

static void axpy_q8_0(const block_q8_0_t * b, float v, float * y, int64_t n) {
#if defined(__AVX512F__)
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const __m512 s = _mm512_set1_ps(v * fp16_to_fp32(b[j].d));
        const __m128i q0 = _mm_loadu_si128((const __m128i *) b[j].qs);
        const __m128i q1 = _mm_loadu_si128((const __m128i *) (b[j].qs + 16));
        float * yj = y + j * QK8_0;
        _mm512_storeu_ps(yj, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_loadu_ps(yj)));
        _mm512_storeu_ps(yj + 16,
                         _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), _mm512_loadu_ps(yj + 16)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const __m256 s = _mm256_set1_ps(v * fp16_to_fp32(b[j].d));
        float * yj = y + j * QK8_0;
        for (int l = 0; l < QK8_0; l += 8) {
            const __m128i q = _mm_loadl_epi64((const __m128i *) (b[j].qs + l));
            const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            _mm256_storeu_ps(yj + l, _mm256_fmadd_ps(s, qf, _mm256_loadu_ps(yj + l)));
        }
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const float32x4_t s = vdupq_n_f32(v * fp16_to_fp32(b[j].d));
        float * yj = y + j * QK8_0;
        for (int l = 0; l < QK8_0; l += 8) {
            const int16x8_t q16 = vmovl_s8(vld1_s8(b[j].qs + l));
            const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(q16)));
            const float32x4_t hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(q16)));
            vst1q_f32(yj + l, vfmaq_f32(vld1q_f32(yj + l), s, lo));
            vst1q_f32(yj + l + 4, vfmaq_f32(vld1q_f32(yj + l + 4), s, hi));
        }
    }
#else
    axpy_q8_0_ref(b, v, y, n);
#endif
}

static void axpy_f16(const ggml_fp16_t * w, float v, float * y, int64_t n) {
    int64_t c = 0;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    const __m256 s = _mm256_set1_ps(v);
    for (; c + 8 <= n; c += 8) {
        const __m256 wf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (w + c)));
        _mm256_storeu_ps(y + c, _mm256_fmadd_ps(s, wf, _mm256_loadu_ps(y + c)));
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    // fcvtl is base AArch64: no +fp16 needed for the widening
    const float32x4_t s = vdupq_n_f32(v);
    for (; c + 8 <= n; c += 8) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *) (w + c)));
        vst1q_f32(y + c, vfmaq_f32(vld1q_f32(y + c), s, vcvt_f32_f16(vget_low_f16(h))));
        vst1q_f32(y + c + 4, vfmaq_f32(vld1q_f32(y + c + 4), s, vcvt_high_f32_f16(h)));
    }
#endif
    for (; c < n; ++c) y[c] += v * fp16_to_fp32(w[c]);
}

static void axpy_bf16_ref(const ggml_bf16_t * w, float v, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) y[c] += v * ggml_bf16_to_fp32(w[c]);
}

static void axpy_bf16(const ggml_bf16_t * w, float v, float * y, int64_t n) {
#if defined(__ARM_NEON) && defined(__aarch64__)
    // bf16 is the upper half of an f32, so the widening shift is the exact conversion
    const float32x4_t s = vdupq_n_f32(v);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const uint16x8_t b = vld1q_u16((const uint16_t *) (w + c));
        const float32x4_t lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16));
        const float32x4_t hi = vreinterpretq_f32_u32(vshll_high_n_u16(b, 16));
        vst1q_f32(y + c, vfmaq_f32(vld1q_f32(y + c), s, lo));
        vst1q_f32(y + c + 4, vfmaq_f32(vld1q_f32(y + c + 4), s, hi));
    }
    axpy_bf16_ref(w + c, v, y + c, n - c);
#else
    axpy_bf16_ref(w, v, y, n);
#endif
}

// Any other type: dequantize the row's column range with ggml's reference routine, then accumulate.
static void axpy_generic(enum ggml_type type, const void * row, float v, float * y, int64_t c0, int64_t c1) {
    const int64_t bs = ggml_blck_size(type);
    const size_t  ts = ggml_type_size(type);
    float tmp[1024];
    for (int64_t c = c0; c < c1; c += 1024) {
        const int64_t m = (c1 - c) < 1024 ? (c1 - c) : 1024;
        ggml_get_type_traits(type)->to_float((const char *) row + (size_t) (c / bs) * ts, tmp, m);
        axpy_f32_ref(tmp, v, y + c, m);
    }
}

static void axpy_range(enum ggml_type type, const void * row, float v, float * y, int64_t c0, int64_t c1,
                       bool reference) {
    switch (type) {
        case GGML_TYPE_F32: axpy_f32_ref((const float *) row + c0, v, y + c0, c1 - c0); break;
        case GGML_TYPE_F16:
            if (reference) {
                for (int64_t c = c0; c < c1; ++c) y[c] += v * ggml_fp16_to_fp32(((const ggml_fp16_t *) row)[c]);
            } else {
                axpy_f16((const ggml_fp16_t *) row + c0, v, y + c0, c1 - c0);
            }
            break;
        case GGML_TYPE_BF16:
            (reference ? axpy_bf16_ref : axpy_bf16)((const ggml_bf16_t *) row + c0, v, y + c0, c1 - c0);
            break;
        case GGML_TYPE_Q8_0:
            (reference ? axpy_q8_0_ref : axpy_q8_0)((const block_q8_0_t *) row + c0 / QK8_0, v, y + c0, c1 - c0);
            break;
        default: axpy_generic(type, row, v, y, c0, c1); break;
    }
}

#if defined(__ARM_NEON) && defined(__aarch64__)
// a[0:4] (16 floats) += s * q[0:16], the int8 values widened to float.
static inline void neon_fma_int8x16(float32x4_t a[4], float32x4_t s, const int8_t * q) {
    const int8x16_t qv = vld1q_s8(q);
    const int16x8_t q0 = vmovl_s8(vget_low_s8(qv)), q1 = vmovl_high_s8(qv);
    a[0] = vfmaq_f32(a[0], s, vcvtq_f32_s32(vmovl_s16(vget_low_s16(q0))));
    a[1] = vfmaq_f32(a[1], s, vcvtq_f32_s32(vmovl_high_s16(q0)));
    a[2] = vfmaq_f32(a[2], s, vcvtq_f32_s32(vmovl_s16(vget_low_s16(q1))));
    a[3] = vfmaq_f32(a[3], s, vcvtq_f32_s32(vmovl_high_s16(q1)));
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || (defined(__ARM_NEON) && defined(__aarch64__))
#define ACTSPARSE_Q8_0_FOUR_ROWS 1
// yj[0:32] += sum_i s[i] * q_i[0:32]: one Q8_0 block of four rows, the 32 outputs held in
// registers across the rows.
static inline void q8_0_block_four_rows(float * yj, const block_q8_0_t * const b[4], const float s[4]) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_loadu_ps(yj), a1 = _mm512_loadu_ps(yj + 16);
    for (int i = 0; i < 4; ++i) {
        const __m512 si = _mm512_set1_ps(s[i]);
        a0 = _mm512_fmadd_ps(si, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) b[i]->qs))), a0);
        a1 = _mm512_fmadd_ps(si, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (b[i]->qs + 16)))), a1);
    }
    _mm512_storeu_ps(yj, a0);
    _mm512_storeu_ps(yj + 16, a1);
#elif defined(__AVX2__)
    __m256 a[4];
    for (int l = 0; l < 4; ++l) a[l] = _mm256_loadu_ps(yj + 8 * l);
    for (int i = 0; i < 4; ++i) {
        const __m256 si = _mm256_set1_ps(s[i]);
        for (int l = 0; l < 4; ++l) {
            const __m128i q = _mm_loadl_epi64((const __m128i *) (b[i]->qs + 8 * l));
            a[l] = _mm256_fmadd_ps(si, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), a[l]);
        }
    }
    for (int l = 0; l < 4; ++l) _mm256_storeu_ps(yj + 8 * l, a[l]);
#else
    float32x4_t a[8];
    for (int l = 0; l < 8; ++l) a[l] = vld1q_f32(yj + 4 * l);
    for (int i = 0; i < 4; ++i) {
        const float32x4_t si = vdupq_n_f32(s[i]);
        neon_fma_int8x16(a, si, b[i]->qs);
        neon_fma_int8x16(a + 4, si, b[i]->qs + 16);
    }
    for (int l = 0; l < 8; ++l) vst1q_f32(yj + 4 * l, a[l]);
#endif
}
#endif

// Q8_0 over many rows: four rows at a time (where SIMD is available) stream through the thread's
// column range, so each y block is loaded and stored once per four rows and every row is read
// contiguously.
static void axpy_rows_q8_0(const char * w, size_t rb, const int32_t * idx, const float * val, int64_t n,
                           float * y, int64_t c0, int64_t c1) {
    const int64_t j0 = c0 / QK8_0;
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    int64_t k = 0;
#if defined(ACTSPARSE_Q8_0_FOUR_ROWS)
    const int64_t j1 = c1 / QK8_0;
    // rows are gathered by index: prefetch the group of four a few kilobytes of reads ahead
    const int64_t rows_ahead = prefetch_rows((size_t) (j1 - j0) * sizeof(block_q8_0_t));
    const int64_t ahead = rows_ahead < 4 ? 4 : rows_ahead / 4 * 4;
    for (; k + 4 <= n; k += 4) {
        const block_q8_0_t * r[4];
        const block_q8_0_t * next[4];
        for (int i = 0; i < 4; ++i) {
            r[i] = (const block_q8_0_t *) (w + (size_t) idx[k + i] * rb);
            next[i] = (const block_q8_0_t *) (w + (size_t) idx[k + ahead + i < n ? k + ahead + i : k + i] * rb);
        }
        for (int64_t j = j0; j < j1; ++j) {
            const block_q8_0_t * const b[4] = { r[0] + j, r[1] + j, r[2] + j, r[3] + j };
            float s[4];
            for (int i = 0; i < 4; ++i) {
                __builtin_prefetch(next[i] + j);
                s[i] = val[k + i] * fp16_to_fp32(b[i]->d);
            }
            q8_0_block_four_rows(y + j * QK8_0, b, s);
        }
    }
#endif
    for (; k < n; ++k) {
        axpy_q8_0((const block_q8_0_t *) (w + (size_t) idx[k] * rb) + j0, val[k], y + c0, c1 - c0);
    }
}

// ---- packed 4- to 6-bit types: unpack to int8, accumulate four rows at a time -----------------
//
// A block of these types holds w[c] = d[c / 16] * q[c] + m[c / 16] with small integers q and one
// scale (and offset) per 16 or 32 columns. The unpackers write q as int8 and d, m as float per
// 16-column group, a whole column range per call: plain fixed-length loops that compilers
// vectorise for every ISA. The accumulate then runs one FMA loop for all types, four rows per
// pass over the outputs.

static inline float load_half(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);  // blocks are byte-packed
    return fp16_to_fp32(h);
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed-type unpackers assume a little-endian target"
#endif

// 16 bytes of nibble pairs -> 32 values 0..15: low nibbles first, then high nibbles. Eight bytes
// at a time in a 64-bit word: compilers turn byte-wise loops of this shape into slow inserts.
static inline void split_nibbles(const uint8_t * qs, int8_t * q) {
#if defined(__AVX2__)
    const __m128i x = _mm_loadu_si128((const __m128i *) qs), low4 = _mm_set1_epi8(0x0F);
    _mm_storeu_si128((__m128i *) q, _mm_and_si128(x, low4));
    _mm_storeu_si128((__m128i *) (q + 16), _mm_and_si128(_mm_srli_epi16(x, 4), low4));
#else
    for (int w = 0; w < 2; ++w) {
        uint64_t x, lo, hi;
        memcpy(&x, qs + 8 * w, 8);
        lo = x & 0x0F0F0F0F0F0F0F0FULL;
        hi = (x >> 4) & 0x0F0F0F0F0F0F0F0FULL;
        memcpy(q + 8 * w, &lo, 8);
        memcpy(q + 16 + 8 * w, &hi, 8);
    }
#endif
}

// Bits 0..7 of b -> bit 4 of bytes 0..7 of a 64-bit word.
static inline uint64_t spread_bits_to_16s(uint32_t b) {
    uint64_t t = b & 0xFFu;
    t = (t | (t << 28)) & 0x0000000F0000000FULL;
    t = (t | (t << 14)) & 0x0003000300030003ULL;
    t = (t | (t << 7)) & 0x0101010101010101ULL;
    return t << 4;
}

static inline void set_group_scales(float * d, float * m, int ngroups, float dv, float mv) {
    for (int g = 0; g < ngroups; ++g) {
        d[g] = dv;
        m[g] = mv;
    }
}

static inline void unpack_q4_0(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    split_nibbles(b + 2, q);  // w = d * (q - 8): the -8 goes into the offset
    const float dd = load_half(b);
    set_group_scales(d, m, 2, dd, -8.0f * dd);
}

static inline void unpack_q4_1(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    split_nibbles(b + 4, q);
    set_group_scales(d, m, 2, load_half(b), load_half(b + 2));
}

// Q5_0 / Q5_1: the fifth bit of value l is bit l of a 32-bit word.
static inline void unpack_5bit(const uint8_t * qh_bytes, const uint8_t * qs, int8_t * q) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, sizeof qh);
    split_nibbles(qs, q);
    for (int w = 0; w < 4; ++w) {
        uint64_t x;
        memcpy(&x, q + 8 * w, 8);
        x |= spread_bits_to_16s(qh >> (8 * w));
        memcpy(q + 8 * w, &x, 8);
    }
}

static inline void unpack_q5_0(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    unpack_5bit(b + 2, b + 6, q);  // w = d * (q - 16): the -16 goes into the offset
    const float dd = load_half(b);
    set_group_scales(d, m, 2, dd, -16.0f * dd);
}

static inline void unpack_q5_1(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    unpack_5bit(b + 4, b + 8, q);
    set_group_scales(d, m, 2, load_half(b), load_half(b + 2));
}

static inline void unpack_iq4_nl(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    // the non-linear 4-bit code book of IQ4_NL (ggml's format definition)
    static const int8_t values[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };
    const uint8_t * qs = b + 2;
    for (int l = 0; l < 16; ++l) q[l] = values[qs[l] & 0x0F];
    for (int l = 0; l < 16; ++l) q[l + 16] = values[qs[l] >> 4];
    set_group_scales(d, m, 2, load_half(b), 0.0f);
}

// Q4_K / Q5_K: eight 32-value groups with 6-bit scales and mins packed into 12 bytes;
// w = d * sc * q - dmin * mn.
// The twelve scale bytes: bytes 0-3 hold scales 0-3 in their low six bits, bytes 4-7 mins 0-3;
// scales and mins 4-7 take their low four bits from the nibbles of bytes 8-11 and their top two
// from the top bits of bytes 0-3 and 4-7. Four at a time in 32-bit words.
static inline void k_scales(const uint8_t * b, float * d, float * m) {
    const float dd = load_half(b);
    const float dmin = load_half(b + 2);
    uint32_t w[3], sm[4];
    memcpy(w, b + 4, sizeof w);
    sm[0] = w[0] & 0x3F3F3F3Fu;
    sm[1] = (w[2] & 0x0F0F0F0Fu) | ((w[0] >> 2) & 0x30303030u);
    sm[2] = w[1] & 0x3F3F3F3Fu;
    sm[3] = ((w[2] >> 4) & 0x0F0F0F0Fu) | ((w[1] >> 2) & 0x30303030u);
#if defined(__AVX2__)
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
#else
    uint8_t u[16];  // scales 0-7, then mins 0-7
    memcpy(u, sm, sizeof u);
    for (int g = 0; g < 16; ++g) {
        d[g] = dd * (float) u[g >> 1];
        m[g] = -dmin * (float) u[8 + (g >> 1)];
    }
#endif
}

static inline void unpack_q4_k(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    k_scales(b, d, m);
    const uint8_t * qs = b + 16;
    for (int p = 0; p < 4; ++p) {  // each 32 bytes: low nibbles are group 2p, high nibbles 2p + 1
        for (int l = 0; l < 32; ++l) {
            q[64 * p + l] = (int8_t) (qs[32 * p + l] & 0x0F);
            q[64 * p + 32 + l] = (int8_t) (qs[32 * p + l] >> 4);
        }
    }
}

static inline void unpack_q5_k(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    k_scales(b, d, m);
    const uint8_t * qh = b + 16;
    const uint8_t * qs = b + 48;
    for (int p = 0; p < 4; ++p) {  // group g takes its fifth bit from bit g of qh[l]
        for (int l = 0; l < 32; ++l) {
            q[64 * p + l] = (int8_t) ((qs[32 * p + l] & 0x0F) | (((qh[l] >> (2 * p)) & 1) << 4));
            q[64 * p + 32 + l] = (int8_t) ((qs[32 * p + l] >> 4) | (((qh[l] >> (2 * p + 1)) & 1) << 4));
        }
    }
}

// Q6_K: 16 groups of 16 with int8 scales; low 4 bits in ql, high 2 bits in qh, offset 32 (kept in
// the group offset, so q stays unsigned like every other type's but IQ4_NL's).
static inline void unpack_q6_k(const uint8_t * restrict b, int8_t * restrict q, float * d, float * m) {
    const uint8_t * ql = b;
    const uint8_t * qh = b + 128;
    const int8_t * sc = (const int8_t *) (b + 192);
    const float dd = load_half(b + 208);
    for (int h = 0; h < 2; ++h) {
        const uint8_t * l4 = ql + 64 * h;
        const uint8_t * h2 = qh + 32 * h;
        int8_t * qq = q + 128 * h;
        for (int l = 0; l < 32; ++l) {
            qq[l] = (int8_t) ((l4[l] & 0x0F) | ((h2[l] & 3) << 4));
            qq[l + 32] = (int8_t) ((l4[l + 32] & 0x0F) | (((h2[l] >> 2) & 3) << 4));
            qq[l + 64] = (int8_t) ((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4));
            qq[l + 96] = (int8_t) ((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4));
        }
    }
#if defined(__AVX512F__)
    const __m512 dg = _mm512_mul_ps(_mm512_set1_ps(dd), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) sc))));
    _mm512_storeu_ps(d, dg);
    _mm512_storeu_ps(m, _mm512_mul_ps(_mm512_set1_ps(-32.0f), dg));
#elif defined(__AVX2__)
    for (int h = 0; h < 2; ++h) {
        const __m256 dg = _mm256_mul_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (sc + 8 * h)))));
        _mm256_storeu_ps(d + 8 * h, dg);
        _mm256_storeu_ps(m + 8 * h, _mm256_mul_ps(_mm256_set1_ps(-32.0f), dg));
    }
#else
    for (int g = 0; g < 16; ++g) {
        d[g] = dd * (float) sc[g];
        m[g] = -32.0f * d[g];
    }
#endif
}

// Unpack nblocks consecutive blocks: q gets block_size values per block, d and m one per 16.
typedef void (*unpack_range_fn)(const uint8_t * blocks, int64_t nblocks, int8_t * q, float * d, float * m);

#define UNPACK_RANGE(name, block_fn, type_size, block_size)                                                \
    static void name(const uint8_t * b, int64_t nblocks, int8_t * q, float * d, float * m) {             \
        for (int64_t i = 0; i < nblocks; ++i) {                                                        \
            block_fn(b + i * (type_size), q + i * (block_size), d + i * ((block_size) / 16),            \
                     m + i * ((block_size) / 16));                                                      \
        }                                                                                              \
    }
UNPACK_RANGE(unpack_range_q4_0, unpack_q4_0, 18, 32)
UNPACK_RANGE(unpack_range_q4_1, unpack_q4_1, 20, 32)
UNPACK_RANGE(unpack_range_q5_0, unpack_q5_0, 22, 32)
UNPACK_RANGE(unpack_range_q5_1, unpack_q5_1, 24, 32)
UNPACK_RANGE(unpack_range_iq4_nl, unpack_iq4_nl, 18, 32)
UNPACK_RANGE(unpack_range_q4_k, unpack_q4_k, 144, 256)
UNPACK_RANGE(unpack_range_q5_k, unpack_q5_k, 176, 256)
UNPACK_RANGE(unpack_range_q6_k, unpack_q6_k, 210, 256)

static unpack_range_fn unpacker(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q4_0: return unpack_range_q4_0;
        case GGML_TYPE_Q4_1: return unpack_range_q4_1;
        case GGML_TYPE_Q5_0: return unpack_range_q5_0;
        case GGML_TYPE_Q5_1: return unpack_range_q5_1;
        case GGML_TYPE_IQ4_NL: return unpack_range_iq4_nl;
        case GGML_TYPE_Q4_K: return unpack_range_q4_k;
        case GGML_TYPE_Q5_K: return unpack_range_q5_k;
        case GGML_TYPE_Q6_K: return unpack_range_q6_k;
        default: return NULL;
    }
}

// y[0:16] += sum_i s[i] * q_i[0:16] + o: sixteen outputs held in registers across four rows.
static inline void int8_16_four_rows(float * y, const int8_t * const q[4], const float s[4], float o) {
#if defined(__AVX512F__)
    __m512 a = _mm512_add_ps(_mm512_loadu_ps(y), _mm512_set1_ps(o));
    for (int i = 0; i < 4; ++i) {
        const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) q[i])));
        a = _mm512_fmadd_ps(_mm512_set1_ps(s[i]), qf, a);
    }
    _mm512_storeu_ps(y, a);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 ov = _mm256_set1_ps(o);
    __m256 a0 = _mm256_add_ps(_mm256_loadu_ps(y), ov), a1 = _mm256_add_ps(_mm256_loadu_ps(y + 8), ov);
    for (int i = 0; i < 4; ++i) {
        const __m256 si = _mm256_set1_ps(s[i]);
        a0 = _mm256_fmadd_ps(si, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) q[i]))), a0);
        a1 = _mm256_fmadd_ps(si, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (q[i] + 8)))), a1);
    }
    _mm256_storeu_ps(y, a0);
    _mm256_storeu_ps(y + 8, a1);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const float32x4_t ov = vdupq_n_f32(o);
    float32x4_t a[4];
    for (int l = 0; l < 4; ++l) a[l] = vaddq_f32(vld1q_f32(y + 4 * l), ov);
    for (int i = 0; i < 4; ++i) neon_fma_int8x16(a, vdupq_n_f32(s[i]), q[i]);
    for (int l = 0; l < 4; ++l) vst1q_f32(y + 4 * l, a[l]);
#else
    for (int c = 0; c < 16; ++c) {
        float acc = y[c] + o;
        for (int i = 0; i < 4; ++i) acc += s[i] * (float) q[i][c];
        y[c] = acc;
    }
#endif
}

// The same for 32 outputs, where a type's scales cover 32 columns.
static inline void int8_32_four_rows(float * y, const int8_t * const q[4], const float s[4], float o) {
#if defined(__AVX512F__)
    const __m512 ov = _mm512_set1_ps(o);
    __m512 a0 = _mm512_add_ps(_mm512_loadu_ps(y), ov), a1 = _mm512_add_ps(_mm512_loadu_ps(y + 16), ov);
    for (int i = 0; i < 4; ++i) {
        const __m512 si = _mm512_set1_ps(s[i]);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) q[i])));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (q[i] + 16))));
        a0 = _mm512_fmadd_ps(si, q0, a0);
        a1 = _mm512_fmadd_ps(si, q1, a1);
    }
    _mm512_storeu_ps(y, a0);
    _mm512_storeu_ps(y + 16, a1);
#else
    const int8_t * const q1[4] = { q[0] + 16, q[1] + 16, q[2] + 16, q[3] + 16 };
    int8_16_four_rows(y, q, s, o);
    int8_16_four_rows(y + 16, q1, s, o);
#endif
}

#define UNPACK_CHUNK 1024  // columns unpacked per row and pass: four rows stay in L1

// Rows of a packed type over columns [c0, c1): four rows per pass (a short last group repeats a
// row with weight 0), each row's chunk unpacked once, then accumulated 16 columns at a time.
static void axpy_rows_unpacked(enum ggml_type type, unpack_range_fn unpack, const char * w, size_t rb,
                               const int32_t * idx, const float * val, int64_t n, float * y, int64_t c0,
                               int64_t c1) {
    const int64_t bs = ggml_blck_size(type);
    const size_t ts = ggml_type_size(type);
    int8_t q[4][UNPACK_CHUNK];
    float d[4][UNPACK_CHUNK / 16], m[4][UNPACK_CHUNK / 16];
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    const int64_t rows_ahead = prefetch_rows((size_t) ((c1 - c0) / bs) * ts);
    const int64_t ahead = rows_ahead < 4 ? 4 : rows_ahead / 4 * 4;
    for (int64_t k = 0; k < n; k += 4) {
        const uint8_t * r[4];
        float v[4];
        for (int i = 0; i < 4; ++i) {
            r[i] = (const uint8_t *) w + (size_t) idx[k + i < n ? k + i : k] * rb;
            v[i] = k + i < n ? val[k + i] : 0.0f;
        }
        for (int64_t c = c0; c < c1; c += UNPACK_CHUNK) {
            const int64_t len = c1 - c < UNPACK_CHUNK ? c1 - c : UNPACK_CHUNK;
            const size_t off = (size_t) (c / bs) * ts;
            for (int i = 0; i < 4; ++i) {
                if (k + ahead + i < n) {
                    // rows are gathered by index: prefetch this chunk a few kilobytes of reads ahead
                    const uint8_t * nx = (const uint8_t *) w + (size_t) idx[k + ahead + i] * rb + off;
                    for (size_t o = 0; o < (size_t) (len / bs) * ts; o += 64) __builtin_prefetch(nx + o);
                }
                unpack(r[i] + off, len / bs, q[i], d[i], m[i]);
                for (int64_t g = 0; g < len / 16; ++g) {
                    d[i][g] *= v[i];
                    m[i][g] *= v[i];
                }
            }
            // a group is 16 columns with Q6_K's scales, else 32 (two equal 16-column entries)
            const int64_t gs = type == GGML_TYPE_Q6_K ? 16 : 32;
            for (int64_t g = 0; g < len / gs; ++g) {
                const int64_t e = g * gs / 16;  // the group's scale entry
                const int8_t * const qg[4] = { q[0] + gs * g, q[1] + gs * g, q[2] + gs * g, q[3] + gs * g };
                const float sg[4] = { d[0][e], d[1][e], d[2][e], d[3][e] };
                const float o = m[0][e] + m[1][e] + m[2][e] + m[3][e];
                if (gs == 32) {
                    int8_32_four_rows(y + c + gs * g, qg, sg, o);
                } else {
                    int8_16_four_rows(y + c + gs * g, qg, sg, o);
                }
            }
        }
    }
}

// ---- packed types, integer accumulate (x86 with AVX2 or AVX-512, aarch64 with dotprod) ------
//
// The float loop above converts every weight to float for one multiply-add each: about 28 G
// weights/s on two cores, which makes a 4-bit copy slower to read than the dense integer mat-vec
// it replaces. Here the products run in 4-way byte dot-product instructions (VNNI's dpbusd, or
// maddubs + madd), sixteen rows per pass. For each 16-column group g the coefficients
// s_kg = v_k * d_kg of the pass's rows are rounded to int8 against one scale S_g = max_k |s_kg| / 127,
// and y gets S_g * sum_k c_kg * q_kc + o_g once per pass. The offsets use the same rounded
// coefficients (o_g = sum_k v^_kg * m_kg with v^_kg = c_kg * S_g / d_kg), so the rounding acts like
// rounding the inputs v_k to 8 bits, as ggml's dense dot products round theirs, and not on the
// offset-shifted q. Unpacked q are unsigned and below 64 (IQ4_NL's code book is not: it keeps the
// float loop), so maddubs's 16-bit pair sums cannot saturate. On aarch64 with the dot-product
// extension (Raspberry Pi 5), sdot takes the same operands.

#if (defined(__AVX2__) && defined(__FMA__)) || \
    (defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
#define ACTSPARSE_INT_ACCUMULATE 1
#endif

static bool int_accumulate_type(enum ggml_type type) {
#if defined(ACTSPARSE_INT_ACCUMULATE)
    return type != GGML_TYPE_IQ4_NL && unpacker(type) != NULL;
#else
    (void) type;
    return false;
#endif
}

bool actsparse_axpy_rounds_inputs(enum ggml_type type) {
    return int_accumulate_type(type);
}

#if defined(ACTSPARSE_INT_ACCUMULATE)
#define INT_ROWS 16                    // rows per pass, whose coefficients share one scale per group
#define INT_GROUPS (UNPACK_CHUNK / 16) // column groups per chunk

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT_VEC 16  // groups per vector in the coefficient step, and lanes per float vector
typedef __m512 fvec;
typedef __m512i ivec;
#define FV_LOAD _mm512_loadu_ps
#define FV_STORE _mm512_storeu_ps
#define FV_SET1 _mm512_set1_ps
#define FV_MUL _mm512_mul_ps
#define FV_FMA _mm512_fmadd_ps
#define FV_MAX _mm512_max_ps
#define FV_ABS(x) _mm512_abs_ps(x)
#define FV_ZERO _mm512_setzero_ps
#define FV_TO_I32 _mm512_cvtps_epi32
#define I32_TO_FV _mm512_cvtepi32_ps
#define FV_RATIO_OR(num, den, alt)                                                                  \
    _mm512_mask_div_ps(alt, _mm512_cmp_ps_mask(den, _mm512_setzero_ps(), _CMP_NEQ_OQ), num, den)
#elif defined(__AVX2__)
#define INT_VEC 8
typedef __m256 fvec;
typedef __m256i ivec;
#define FV_LOAD _mm256_loadu_ps
#define FV_STORE _mm256_storeu_ps
#define FV_SET1 _mm256_set1_ps
#define FV_MUL _mm256_mul_ps
#define FV_FMA _mm256_fmadd_ps
#define FV_MAX _mm256_max_ps
#define FV_ABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define FV_ZERO _mm256_setzero_ps
#define FV_TO_I32 _mm256_cvtps_epi32
#define I32_TO_FV _mm256_cvtepi32_ps
#define FV_RATIO_OR(num, den, alt)                                                                  \
    _mm256_blendv_ps(_mm256_div_ps(num, den), alt, _mm256_cmp_ps(den, _mm256_setzero_ps(), _CMP_EQ_OQ))
#else
#define INT_VEC 4
typedef float32x4_t fvec;
typedef int32x4_t ivec;
#define FV_LOAD vld1q_f32
#define FV_STORE vst1q_f32
#define FV_SET1 vdupq_n_f32
#define FV_MUL vmulq_f32
#define FV_FMA(a, b, c) vfmaq_f32(c, a, b)
#define FV_MAX vmaxq_f32
#define FV_ABS vabsq_f32
#define FV_ZERO() vdupq_n_f32(0.0f)
#define FV_TO_I32 vcvtnq_s32_f32  // to nearest, ties to even, as x86's cvtps
#define I32_TO_FV vcvtq_f32_s32
#define FV_RATIO_OR(num, den, alt) vbslq_f32(vceqzq_f32(den), alt, vdivq_f32(num, den))
#endif

// INT_VEC int32 lanes (each in [-127, 127]) -> INT_VEC bytes.
static inline void store_i8(int8_t * dst, ivec c) {
#if INT_VEC == 16
    _mm_storeu_si128((__m128i *) dst, _mm512_cvtsepi32_epi8(c));
#elif INT_VEC == 8
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64((__m128i *) dst, _mm_packs_epi16(w, w));
#else
    const int16x4_t h = vqmovn_s32(c);
    int8_t b[8];
    vst1_s8(b, vqmovn_s16(vcombine_s16(h, h)));
    memcpy(dst, b, INT_VEC);
#endif
}

// One pass's int8 coefficients, scales and offsets for groups [0, ngroups), vectorised across
// groups: d[k][g], m[k][g] are row k's unpacked scales and offsets (ngroups rounded up to INT_VEC,
// the padding zero). coef[p][g] holds rows 4p .. 4p+3 of group g as four bytes, the operand
// layout of the 4-way dot products.
static void int_coefficients(float (*d)[INT_GROUPS], float (*m)[INT_GROUPS], const float * v, int64_t ngroups,
                             uint32_t (*coef)[INT_GROUPS], float * scale, float * offset) {
    for (int64_t g = 0; g < ngroups; g += INT_VEC) {
        fvec mx = FV_ZERO();
        for (int k = 0; k < INT_ROWS; ++k) mx = FV_MAX(mx, FV_ABS(FV_MUL(FV_SET1(v[k]), FV_LOAD(d[k] + g))));
        const fvec sc = FV_MUL(mx, FV_SET1(1.0f / 127.0f));
        const fvec inv = FV_RATIO_OR(FV_SET1(127.0f), mx, FV_ZERO());
        fvec off = FV_ZERO();
        for (int p = 0; p < INT_ROWS / 4; ++p) {
            int8_t b[4][INT_VEC];
            for (int i = 0; i < 4; ++i) {
                const int k = 4 * p + i;
                const fvec vk = FV_SET1(v[k]), dk = FV_LOAD(d[k] + g);
                const ivec c = FV_TO_I32(FV_MUL(FV_MUL(vk, dk), inv));
                store_i8(b[i], c);
                // the rounded input; a zero scale has none, so its row's offset takes v_k itself
                const fvec vr = FV_RATIO_OR(FV_MUL(I32_TO_FV(c), sc), dk, vk);
                off = FV_FMA(vr, FV_LOAD(m[k] + g), off);
            }
            for (int l = 0; l < INT_VEC; ++l) {
                coef[p][g + l] = (uint32_t) (uint8_t) b[0][l] | (uint32_t) (uint8_t) b[1][l] << 8 |
                                 (uint32_t) (uint8_t) b[2][l] << 16 | (uint32_t) (uint8_t) b[3][l] << 24;
            }
        }
        FV_STORE(scale + g, sc);
        FV_STORE(offset + g, off);
    }
}

// y[0:16] += scale * sum_k c_k * q[k][col:col+16] + offset: one column group, scalar (the
// reference, and the SIMD paths' remainder).
static void int_group_scalar(float * y, const uint8_t * const q[INT_ROWS], int64_t col, uint32_t (*coef)[INT_GROUPS],
                             int64_t g, float scale, float offset) {
    for (int c = 0; c < 16; ++c) {
        int32_t acc = 0;
        for (int k = 0; k < INT_ROWS; ++k) {
            const int8_t ck = (int8_t) (uint8_t) (coef[k / 4][g] >> (8 * (k % 4)));
            acc += (int32_t) ck * (int32_t) q[k][col + c];
        }
        y[c] = fmaf(scale, (float) acc, y[c] + offset);
    }
}

#if defined(__AVX2__)
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define INT_TILE_GROUPS 4  // one group per 128-bit lane
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
    ivec acc[4] = { IV_ZERO(), IV_ZERO(), IV_ZERO(), IV_ZERO() };
    for (int p = 0; p < INT_ROWS / 4; ++p) {
        const ivec r0 = IV_LOAD(q[4 * p] + col), r1 = IV_LOAD(q[4 * p + 1] + col);
        const ivec r2 = IV_LOAD(q[4 * p + 2] + col), r3 = IV_LOAD(q[4 * p + 3] + col);
        const ivec t0 = IV_UNPACKLO8(r0, r1), t1 = IV_UNPACKHI8(r0, r1);
        const ivec t2 = IV_UNPACKLO8(r2, r3), t3 = IV_UNPACKHI8(r2, r3);
        const ivec cp = IV_COEF(coef[p] + g);
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
#else
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
#endif

// Rows of a packed type over columns [c0, c1), INT_ROWS rows per pass (a short last pass repeats
// a row with weight 0); `reference` runs the scalar groups only.
static void axpy_rows_int(enum ggml_type type, unpack_range_fn unpack, const char * w, size_t rb,
                          const int32_t * idx, const float * val, int64_t n, float * y, int64_t c0, int64_t c1,
                          bool reference) {
    const int64_t bs = ggml_blck_size(type);
    const size_t ts = ggml_type_size(type);
    _Alignas(64) uint8_t q[INT_ROWS][UNPACK_CHUNK];
    _Alignas(64) float d[INT_ROWS][INT_GROUPS], m[INT_ROWS][INT_GROUPS];
    _Alignas(64) uint32_t coef[INT_ROWS / 4][INT_GROUPS];
    _Alignas(64) float scale[INT_GROUPS], offset[INT_GROUPS];
    const uint8_t * const qr[INT_ROWS] = { q[0], q[1], q[2],  q[3],  q[4],  q[5],  q[6],  q[7],
                                           q[8], q[9], q[10], q[11], q[12], q[13], q[14], q[15] };
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    const int64_t rows_ahead = prefetch_rows((size_t) ((c1 - c0) / bs) * ts);
    const int64_t ahead = rows_ahead < INT_ROWS ? INT_ROWS : rows_ahead / INT_ROWS * INT_ROWS;
    for (int64_t k = 0; k < n; k += INT_ROWS) {
        const uint8_t * r[INT_ROWS];
        float v[INT_ROWS];
        for (int i = 0; i < INT_ROWS; ++i) {
            r[i] = (const uint8_t *) w + (size_t) idx[k + i < n ? k + i : k] * rb;
            v[i] = k + i < n ? val[k + i] : 0.0f;
        }
        for (int64_t c = c0; c < c1; c += UNPACK_CHUNK) {
            const int64_t len = c1 - c < UNPACK_CHUNK ? c1 - c : UNPACK_CHUNK;
            const int64_t ngroups = len / 16;
            const int64_t padded = (ngroups + INT_VEC - 1) / INT_VEC * INT_VEC;
            const size_t off = (size_t) (c / bs) * ts;
            for (int i = 0; i < INT_ROWS; ++i) {
                if (k + ahead + i < n) {
                    // rows are gathered by index: prefetch this chunk a few kilobytes of reads ahead,
                    // into L2 (measured faster than into L1 here, which stalls on its miss buffers)
                    const uint8_t * nx = (const uint8_t *) w + (size_t) idx[k + ahead + i] * rb + off;
                    for (size_t o = 0; o < (size_t) (len / bs) * ts; o += 64) __builtin_prefetch(nx + o, 0, 2);
                }
                unpack(r[i] + off, len / bs, (int8_t *) q[i], d[i], m[i]);
                for (int64_t e = ngroups; e < padded; ++e) d[i][e] = m[i][e] = 0.0f;
            }
            int_coefficients(d, m, v, ngroups, coef, scale, offset);
            int64_t g = 0;
            if (!reference) {
                for (; g + INT_TILE_GROUPS <= ngroups; g += INT_TILE_GROUPS) {
                    int_tile(y + c + 16 * g, qr, g, coef, scale + g, offset + g);
                }
            }
            for (; g < ngroups; ++g) int_group_scalar(y + c + 16 * g, qr, 16 * g, coef, g, scale[g], offset[g]);
        }
    }
}
#endif  // ACTSPARSE_INT_ACCUMULATE

static void axpy_rows(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                      const float * val, int64_t n, float * y, int64_t c0, int64_t c1, bool reference) {
    if (type == GGML_TYPE_Q8_0 && !reference) {
        axpy_rows_q8_0((const char *) w, row_bytes, idx, val, n, y, c0, c1);
        return;
    }
#if defined(ACTSPARSE_INT_ACCUMULATE)
    if (int_accumulate_type(type)) {
        axpy_rows_int(type, unpacker(type), (const char *) w, row_bytes, idx, val, n, y, c0, c1, reference);
        return;
    }
#endif
    const unpack_range_fn unpack = reference ? NULL : unpacker(type);
    if (unpack) {
        axpy_rows_unpacked(type, unpack, (const char *) w, row_bytes, idx, val, n, y, c0, c1);
        return;
    }
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    for (int64_t k = 0; k < n; ++k) {
        axpy_range(type, (const char *) w + (size_t) idx[k] * row_bytes, val[k], y, c0, c1, reference);
    }
}

void actsparse_axpy_rows(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                         const float * val, int64_t n, float * y, int64_t c0, int64_t c1) {
    axpy_rows(type, w, row_bytes, idx, val, n, y, c0, c1, false);
}

void actsparse_axpy_rows_ref(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                             const float * val, int64_t n, float * y, int64_t c0, int64_t c1) {
    axpy_rows(type, w, row_bytes, idx, val, n, y, c0, c1, true);
}
