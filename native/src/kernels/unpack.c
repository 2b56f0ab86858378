// The unpackers of the packed 4- to 6-bit types (see unpack.h).
#include "unpack.h"

#if defined(__x86_64__) || defined(__i386__)
#include "arch/x86/unpack.h"
#endif

static inline float load_half(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);  // blocks are byte-packed
    return fp16_to_fp32(h);
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed-type unpackers assume a little-endian target"
#endif

#if !defined(ACTSPARSE_UNPACK_ARCH)
// 16 bytes of nibble pairs -> 32 values 0..15: low nibbles first, then high nibbles. Eight bytes
// at a time in a 64-bit word: compilers turn byte-wise loops of this shape into slow inserts.
static inline void split_nibbles(const uint8_t * qs, int8_t * q) {
    for (int w = 0; w < 2; ++w) {
        uint64_t x, lo, hi;
        memcpy(&x, qs + 8 * w, 8);
        lo = x & 0x0F0F0F0F0F0F0F0FULL;
        hi = (x >> 4) & 0x0F0F0F0F0F0F0F0FULL;
        memcpy(q + 8 * w, &lo, 8);
        memcpy(q + 16 + 8 * w, &hi, 8);
    }
}

// sm: the eight 6-bit scales, then the eight mins, as bytes. d[g] = dd * scale[g / 2],
// m[g] = -dmin * min[g / 2] for the 16 entries of 16 columns.
static inline void k_scales_widen(const uint32_t sm[4], float dd, float dmin, float * d, float * m) {
    uint8_t u[16];  // scales 0-7, then mins 0-7
    memcpy(u, sm, sizeof u);
    for (int g = 0; g < 16; ++g) {
        d[g] = dd * (float) u[g >> 1];
        m[g] = -dmin * (float) u[8 + (g >> 1)];
    }
}
#endif

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
    k_scales_widen(sm, dd, dmin, d, m);
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
#if defined(ACTSPARSE_F32_EPR)
    ACTSPARSE_F32_VEC s[ACTSPARSE_I8X16_VECS];
    actsparse_f32_vec_load_i8x16(s, sc);
    for (int l = 0; l < ACTSPARSE_I8X16_VECS; ++l) {
        const ACTSPARSE_F32_VEC dg = ACTSPARSE_F32_VEC_MUL(ACTSPARSE_F32_VEC_SET1(dd), s[l]);
        ACTSPARSE_F32_VEC_STORE(d + ACTSPARSE_F32_EPR * l, dg);
        ACTSPARSE_F32_VEC_STORE(m + ACTSPARSE_F32_EPR * l, ACTSPARSE_F32_VEC_MUL(ACTSPARSE_F32_VEC_SET1(-32.0f), dg));
    }
#else
    for (int g = 0; g < 16; ++g) {
        d[g] = dd * (float) sc[g];
        m[g] = -32.0f * d[g];
    }
#endif
}

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

unpack_range_fn actsparse_unpacker(enum ggml_type type) {
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
