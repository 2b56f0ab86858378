// Float accumulate over a transposed weight: y += v * W[row] with every weight converted to
// float, for F32, F16, BF16 and Q8_0 rows, any other type through ggml's dequantization, and the
// packed types through their unpackers (four rows per pass) where the integer accumulate
// (axpy-int.c) is not available.
#include "internal.h"
#include "unpack.h"

// ---- one row at a time ------------------------------------------------------------------------

static void axpy_f32_ref(const float * w, float v, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) y[c] += v * w[c];
}

#if defined(ACTSPARSE_F32_EPR)
// y[c] += v * w[c] over whole vectors from c on, w widened to float by LOAD; c is left where the
// scalar tail starts.
#define AXPY_VECTORS(LOAD, w, v, y, n, c)                                                         \
    do {                                                                                          \
        const ACTSPARSE_F32_VEC s_ = ACTSPARSE_F32_VEC_SET1(v);                                   \
        for (; (c) + ACTSPARSE_F32_EPR <= (n); (c) += ACTSPARSE_F32_EPR) {                        \
            const ACTSPARSE_F32_VEC y_ = ACTSPARSE_F32_VEC_LOAD((y) + (c));                       \
            ACTSPARSE_F32_VEC_STORE((y) + (c), ACTSPARSE_F32_VEC_FMA(y_, s_, LOAD((w) + (c))));   \
        }                                                                                         \
    } while (0)
#endif

static void axpy_f32(const float * w, float v, float * y, int64_t n) {
    int64_t c = 0;
#if defined(ACTSPARSE_F32_EPR)
    AXPY_VECTORS(ACTSPARSE_F32_VEC_LOAD, w, v, y, n, c);
#endif
    axpy_f32_ref(w + c, v, y + c, n - c);
}

static void axpy_f16_ref(const ggml_fp16_t * w, float v, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) y[c] += v * ggml_fp16_to_fp32(w[c]);
}

static void axpy_f16(const ggml_fp16_t * w, float v, float * y, int64_t n) {
    int64_t c = 0;
#if defined(ACTSPARSE_F32_VEC_LOAD_F16)
    AXPY_VECTORS(ACTSPARSE_F32_VEC_LOAD_F16, w, v, y, n, c);
#endif
    for (; c < n; ++c) y[c] += v * fp16_to_fp32(w[c]);
}

static void axpy_bf16_ref(const ggml_bf16_t * w, float v, float * y, int64_t n) {
    for (int64_t c = 0; c < n; ++c) y[c] += v * ggml_bf16_to_fp32(w[c]);
}

static void axpy_bf16(const ggml_bf16_t * w, float v, float * y, int64_t n) {
    int64_t c = 0;
#if defined(ACTSPARSE_F32_EPR)
    AXPY_VECTORS(ACTSPARSE_F32_VEC_LOAD_BF16, w, v, y, n, c);
#endif
    axpy_bf16_ref(w + c, v, y + c, n - c);
}

static void axpy_q8_0_ref(const block_q8_0_t * b, float v, float * y, int64_t n) {
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const float s = v * fp16_to_fp32(b[j].d);
        for (int l = 0; l < QK8_0; ++l) y[j * QK8_0 + l] += s * (float) b[j].qs[l];
    }
}

static void axpy_q8_0(const block_q8_0_t * b, float v, float * y, int64_t n) {
#if defined(ACTSPARSE_F32_EPR)
    for (int64_t j = 0; j < n / QK8_0; ++j) {
        const ACTSPARSE_F32_VEC s = ACTSPARSE_F32_VEC_SET1(v * fp16_to_fp32(b[j].d));
        float * yj = y + j * QK8_0;
        for (int h = 0; h < QK8_0; h += 16) {
            ACTSPARSE_F32_VEC q[ACTSPARSE_I8X16_VECS];
            actsparse_f32_vec_load_i8x16(q, b[j].qs + h);
            for (int l = 0; l < ACTSPARSE_I8X16_VECS; ++l) {
                float * yl = yj + h + ACTSPARSE_F32_EPR * l;
                ACTSPARSE_F32_VEC_STORE(yl, ACTSPARSE_F32_VEC_FMA(ACTSPARSE_F32_VEC_LOAD(yl), s, q[l]));
            }
        }
    }
#else
    axpy_q8_0_ref(b, v, y, n);
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
        case GGML_TYPE_F32:
            (reference ? axpy_f32_ref : axpy_f32)((const float *) row + c0, v, y + c0, c1 - c0);
            break;
        case GGML_TYPE_F16:
            (reference ? axpy_f16_ref : axpy_f16)((const ggml_fp16_t *) row + c0, v, y + c0, c1 - c0);
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

void actsparse_axpy_rows_each(enum ggml_type type, const char * w, size_t rb, const int32_t * idx,
                              const float * val, int64_t n, float * y, int64_t c0, int64_t c1, bool reference) {
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    for (int64_t k = 0; k < n; ++k) axpy_range(type, w + (size_t) idx[k] * rb, val[k], y, c0, c1, reference);
}

// ---- four rows at a time ----------------------------------------------------------------------

// y[0:n] += o + sum_i s[i] * q_i[0:n] for n = 16 or 32: the n outputs held in registers across
// the four rows (one Q8_0 block of four rows, or one scale group of four unpacked rows).
static inline void four_rows_i8(float * y, const int8_t * const q[4], const float s[4], float o, int n) {
#if defined(ACTSPARSE_F32_EPR)
    ACTSPARSE_F32_VEC a[32 / ACTSPARSE_F32_EPR];
    const ACTSPARSE_F32_VEC ov = ACTSPARSE_F32_VEC_SET1(o);
    for (int l = 0; l < n / ACTSPARSE_F32_EPR; ++l) {
        a[l] = ACTSPARSE_F32_VEC_ADD(ACTSPARSE_F32_VEC_LOAD(y + ACTSPARSE_F32_EPR * l), ov);
    }
    for (int i = 0; i < 4; ++i) {
        const ACTSPARSE_F32_VEC si = ACTSPARSE_F32_VEC_SET1(s[i]);
        for (int h = 0; h < n; h += 16) {
            ACTSPARSE_F32_VEC qf[ACTSPARSE_I8X16_VECS];
            actsparse_f32_vec_load_i8x16(qf, q[i] + h);
            ACTSPARSE_F32_VEC * ah = a + h / ACTSPARSE_F32_EPR;
            for (int l = 0; l < ACTSPARSE_I8X16_VECS; ++l) ah[l] = ACTSPARSE_F32_VEC_FMA(ah[l], si, qf[l]);
        }
    }
    for (int l = 0; l < n / ACTSPARSE_F32_EPR; ++l) ACTSPARSE_F32_VEC_STORE(y + ACTSPARSE_F32_EPR * l, a[l]);
#else
    for (int c = 0; c < n; ++c) {
        float acc = y[c] + o;
        for (int i = 0; i < 4; ++i) acc += s[i] * (float) q[i][c];
        y[c] = acc;
    }
#endif
}

// Q8_0 over many rows: four rows at a time (where SIMD is available) stream through the thread's
// column range, so each y block is loaded and stored once per four rows and every row is read
// contiguously.
void actsparse_axpy_rows_q8_0(const char * w, size_t rb, const int32_t * idx, const float * val, int64_t n,
                              float * y, int64_t c0, int64_t c1) {
    const int64_t j0 = c0 / QK8_0;
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    int64_t k = 0;
#if defined(ACTSPARSE_F32_EPR)
    const int64_t j1 = c1 / QK8_0;
    // rows are gathered by index: prefetch the group of four a few kilobytes of reads ahead
    const int64_t rows_ahead = actsparse_prefetch_rows((size_t) (j1 - j0) * sizeof(block_q8_0_t));
    const int64_t ahead = rows_ahead < 4 ? 4 : rows_ahead / 4 * 4;
    for (; k + 4 <= n; k += 4) {
        const block_q8_0_t * r[4];
        const block_q8_0_t * next[4];
        for (int i = 0; i < 4; ++i) {
            r[i] = (const block_q8_0_t *) (w + (size_t) idx[k + i] * rb);
            next[i] = (const block_q8_0_t *) (w + (size_t) idx[k + ahead + i < n ? k + ahead + i : k + i] * rb);
        }
        for (int64_t j = j0; j < j1; ++j) {
            const int8_t * const q[4] = { r[0][j].qs, r[1][j].qs, r[2][j].qs, r[3][j].qs };
            float s[4];
            for (int i = 0; i < 4; ++i) {
                __builtin_prefetch(next[i] + j);
                s[i] = val[k + i] * fp16_to_fp32(r[i][j].d);
            }
            // y is never -0 (it starts at +0 and sums round to nearest), so adding o = 0 keeps it
            four_rows_i8(y + j * QK8_0, q, s, 0.0f, QK8_0);
        }
    }
#endif
    for (; k < n; ++k) {
        axpy_q8_0((const block_q8_0_t *) (w + (size_t) idx[k] * rb) + j0, val[k], y + c0, c1 - c0);
    }
}

// Rows of a packed type over columns [c0, c1): four rows per pass (a short last group repeats a
// row with weight 0), each row's chunk unpacked once, then accumulated 16 or 32 columns at a time.
void actsparse_axpy_rows_unpacked(enum ggml_type type, const char * w, size_t rb, const int32_t * idx,
                                  const float * val, int64_t n, float * y, int64_t c0, int64_t c1) {
    const unpack_range_fn unpack = actsparse_unpacker(type);
    const int64_t bs = ggml_blck_size(type);
    const size_t ts = ggml_type_size(type);
    int8_t q[4][UNPACK_CHUNK];
    float d[4][UNPACK_CHUNK / 16], m[4][UNPACK_CHUNK / 16];
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    const int64_t rows_ahead = actsparse_prefetch_rows((size_t) ((c1 - c0) / bs) * ts);
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
                    four_rows_i8(y + c + gs * g, qg, sg, o, 32);
                } else {
                    four_rows_i8(y + c + gs * g, qg, sg, o, 16);
                }
            }
        }
    }
}
