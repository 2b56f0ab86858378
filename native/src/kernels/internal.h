// What the kernel files share: the Q8_0 block, scalar conversions, the FFN activations, the
// prefetch distance and the accumulate paths that actsparse_axpy_rows (axpy.c) chooses between.
#pragma once

#include "actsparse-kernels.h"
#include "simd.h"

#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

// not exported from the CPU backend's library
#define ACTSPARSE_INTERNAL __attribute__((visibility("hidden")))

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

// static inline: the exported wrapper (common.c) cannot be inlined into the loops (interposition)
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

// Rows gathered by index, which the hardware prefetcher cannot follow, are prefetched this many
// rows of row_bytes ahead: ACTSPARSE_PREFETCH_BYTES (default 8192) of reads, 2 to 64 rows.
ACTSPARSE_INTERNAL int64_t actsparse_prefetch_rows(size_t row_bytes);

#define UNPACK_CHUNK 1024  // columns unpacked per row and pass: the pass's rows stay in L1

// The accumulate paths over rows idx[0:n) of a transposed weight with row stride rb, each setting
// y[c0:c1) to sum_k val[k] * W[idx[k], c0:c1).
// Float accumulate (axpy-float.c): Q8_0 four rows at a time where SIMD is available.
ACTSPARSE_INTERNAL void actsparse_axpy_rows_q8_0(const char * w, size_t rb, const int32_t * idx, const float * val,
                                                 int64_t n, float * y, int64_t c0, int64_t c1);
// Float accumulate, one row at a time, of any type (`reference`: the scalar loops only).
ACTSPARSE_INTERNAL void actsparse_axpy_rows_each(enum ggml_type type, const char * w, size_t rb, const int32_t * idx,
                                                 const float * val, int64_t n, float * y, int64_t c0, int64_t c1,
                                                 bool reference);
// Float accumulate of a packed type with an unpacker (unpack.h), four rows per pass.
ACTSPARSE_INTERNAL void actsparse_axpy_rows_unpacked(enum ggml_type type, const char * w, size_t rb,
                                                     const int32_t * idx, const float * val, int64_t n, float * y,
                                                     int64_t c0, int64_t c1);
// Integer accumulate (axpy-int.c) of the types for which actsparse_axpy_int_type holds, on x86
// with AVX2 or AVX-512 and aarch64 with the dot-product extension (`reference`: the scalar groups).
#if (defined(__AVX2__) && defined(__FMA__)) || \
    (defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
#define ACTSPARSE_INT_ACCUMULATE 1
#endif
ACTSPARSE_INTERNAL bool actsparse_axpy_int_type(enum ggml_type type);
#if defined(ACTSPARSE_INT_ACCUMULATE)
ACTSPARSE_INTERNAL void actsparse_axpy_rows_int(enum ggml_type type, const char * w, size_t rb, const int32_t * idx,
                                                const float * val, int64_t n, float * y, int64_t c0, int64_t c1,
                                                bool reference);
#endif
