// Integer accumulate of the packed types (x86 with AVX2 or AVX-512, aarch64 with dotprod).
//
// The float loop (axpy-float.c) converts every weight to float for one multiply-add each: about
// 28 G weights/s on two cores, which makes a 4-bit copy slower to read than the dense integer mat-vec
// it replaces. Here the products run in 4-way byte dot-product instructions (VNNI's dpbusd, or
// maddubs + madd), sixteen rows per pass. For each 16-column group g the coefficients
// s_kg = v_k * d_kg of the pass's rows are rounded to int8 against one scale S_g = max_k |s_kg| / 127,
// and y gets S_g * sum_k c_kg * q_kc + o_g once per pass. The offsets use the same rounded
// coefficients (o_g = sum_k v^_kg * m_kg with v^_kg = c_kg * S_g / d_kg), so the rounding acts like
// rounding the inputs v_k to 8 bits, as ggml's dense dot products round theirs, and not on the
// offset-shifted q. Unpacked q are unsigned and below 64 (IQ4_NL's code book is not: it keeps the
// float loop), so maddubs's 16-bit pair sums cannot saturate. On aarch64 with the dot-product
// extension (Raspberry Pi 5), sdot takes the same operands.

#include "internal.h"
#include "unpack.h"

bool actsparse_axpy_int_type(enum ggml_type type) {
#if defined(ACTSPARSE_INT_ACCUMULATE)
    return type != GGML_TYPE_IQ4_NL && actsparse_unpacker(type) != NULL;
#else
    (void) type;
    return false;
#endif
}

#if defined(ACTSPARSE_INT_ACCUMULATE)
#define INT_ROWS 16                    // rows per pass, whose coefficients share one scale per group
#define INT_GROUPS (UNPACK_CHUNK / 16) // column groups per chunk

// One pass's int8 coefficients, scales and offsets for groups [0, ngroups), vectorised across
// groups: d[k][g], m[k][g] are row k's unpacked scales and offsets (ngroups rounded up to
// ACTSPARSE_F32_EPR, the padding zero). coef[p][g] holds rows 4p .. 4p+3 of group g as four bytes, the operand
// layout of the 4-way dot products.
static void int_coefficients(float (*d)[INT_GROUPS], float (*m)[INT_GROUPS], const float * v, int64_t ngroups,
                             uint32_t (*coef)[INT_GROUPS], float * scale, float * offset) {
    for (int64_t g = 0; g < ngroups; g += ACTSPARSE_F32_EPR) {
        ACTSPARSE_F32_VEC mx = ACTSPARSE_F32_VEC_ZERO();
        for (int k = 0; k < INT_ROWS; ++k) {
            const ACTSPARSE_F32_VEC s = ACTSPARSE_F32_VEC_MUL(ACTSPARSE_F32_VEC_SET1(v[k]), ACTSPARSE_F32_VEC_LOAD(d[k] + g));
            mx = ACTSPARSE_F32_VEC_MAX(mx, ACTSPARSE_F32_VEC_ABS(s));
        }
        const ACTSPARSE_F32_VEC sc = ACTSPARSE_F32_VEC_MUL(mx, ACTSPARSE_F32_VEC_SET1(1.0f / 127.0f));
        const ACTSPARSE_F32_VEC inv =
            ACTSPARSE_F32_VEC_DIV_OR(ACTSPARSE_F32_VEC_SET1(127.0f), mx, ACTSPARSE_F32_VEC_ZERO());
        ACTSPARSE_F32_VEC off = ACTSPARSE_F32_VEC_ZERO();
        for (int p = 0; p < INT_ROWS / 4; ++p) {
            int8_t b[4][ACTSPARSE_F32_EPR];
            for (int i = 0; i < 4; ++i) {
                const int k = 4 * p + i;
                const ACTSPARSE_F32_VEC vk = ACTSPARSE_F32_VEC_SET1(v[k]), dk = ACTSPARSE_F32_VEC_LOAD(d[k] + g);
                const ACTSPARSE_I32_VEC c =
                    ACTSPARSE_F32_VEC_TO_I32(ACTSPARSE_F32_VEC_MUL(ACTSPARSE_F32_VEC_MUL(vk, dk), inv));
                actsparse_i32_vec_store_i8(b[i], c);
                // the rounded input; a zero scale has none, so its row's offset takes v_k itself
                const ACTSPARSE_F32_VEC vr =
                    ACTSPARSE_F32_VEC_DIV_OR(ACTSPARSE_F32_VEC_MUL(ACTSPARSE_I32_VEC_TO_F32(c), sc), dk, vk);
                off = ACTSPARSE_F32_VEC_FMA(off, vr, ACTSPARSE_F32_VEC_LOAD(m[k] + g));
            }
            for (int l = 0; l < ACTSPARSE_F32_EPR; ++l) {
                coef[p][g + l] = (uint32_t) (uint8_t) b[0][l] | (uint32_t) (uint8_t) b[1][l] << 8 |
                                 (uint32_t) (uint8_t) b[2][l] << 16 | (uint32_t) (uint8_t) b[3][l] << 24;
            }
        }
        ACTSPARSE_F32_VEC_STORE(scale + g, sc);
        ACTSPARSE_F32_VEC_STORE(offset + g, off);
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
#include "arch/x86/axpy-int.h"
#else
#include "arch/arm/axpy-int.h"
#endif

// Rows of a packed type over columns [c0, c1), INT_ROWS rows per pass (a short last pass repeats
// a row with weight 0); `reference` runs the scalar groups only.
void actsparse_axpy_rows_int(enum ggml_type type, const char * w, size_t rb, const int32_t * idx,
                             const float * val, int64_t n, float * y, int64_t c0, int64_t c1, bool reference) {
    const unpack_range_fn unpack = actsparse_unpacker(type);
    const int64_t bs = ggml_blck_size(type);
    const size_t ts = ggml_type_size(type);
    _Alignas(64) uint8_t q[INT_ROWS][UNPACK_CHUNK];
    _Alignas(64) float d[INT_ROWS][INT_GROUPS], m[INT_ROWS][INT_GROUPS];
    _Alignas(64) uint32_t coef[INT_ROWS / 4][INT_GROUPS];
    _Alignas(64) float scale[INT_GROUPS], offset[INT_GROUPS];
    const uint8_t * const qr[INT_ROWS] = { q[0], q[1], q[2],  q[3],  q[4],  q[5],  q[6],  q[7],
                                           q[8], q[9], q[10], q[11], q[12], q[13], q[14], q[15] };
    memset(y + c0, 0, (size_t) (c1 - c0) * sizeof(float));
    const int64_t rows_ahead = actsparse_prefetch_rows((size_t) ((c1 - c0) / bs) * ts);
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
            const int64_t padded = (ngroups + ACTSPARSE_F32_EPR - 1) / ACTSPARSE_F32_EPR * ACTSPARSE_F32_EPR;
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
