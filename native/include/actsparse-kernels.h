// actsparse CPU kernels: plain C with SIMD paths beside a scalar reference. Every function works
// on a caller-chosen range so that ggml's worker threads (ith/nth) split the work.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ACTSPARSE_KERNEL_API __attribute__((visibility("default")))

enum actsparse_act { ACTSPARSE_ACT_NONE = 0, ACTSPARSE_ACT_SILU = 1, ACTSPARSE_ACT_GELU = 2 };

// The FFN activations exactly as ggml's CPU ops compute them (the thresholds were measured on these).
ACTSPARSE_KERNEL_API float actsparse_apply_act(enum actsparse_act act, float x);

// The SIMD path the kernels were compiled for: "avx512+vnni", "avx512", "avx2", "neon", "neon+dotprod" or
// "scalar".
ACTSPARSE_KERNEL_API const char * actsparse_kernels_simd(void);

// y[i] = a(x[i]) where |a(x[i])| > t_i, else 0, for i in [i0, i1); t_i = t[i], or t[0] when
// scalar_t. Returns how many were zeroed.
ACTSPARSE_KERNEL_API int64_t actsparse_act_mask(const float * x, float * y, const float * t, bool scalar_t, enum actsparse_act act,
                           int64_t i0, int64_t i1);

// The active entries of a(x) (|a(x_i)| > t_i) as a compact list: indices ascending, values.
ACTSPARSE_KERNEL_API int64_t actsparse_select(const float * x, const float * t, bool scalar_t, enum actsparse_act act, int64_t n,
                         int32_t * idx, float * val);

// out[k] = val[k] * dot(W[idx[k]], x) for k in [k0, k1): the selected rows of a weight, with x
// already converted to the type's vec_dot_type (x_vd).
ACTSPARSE_KERNEL_API void actsparse_rows_dot(enum ggml_type type, const void * w, size_t row_bytes, int64_t n_per_row,
                        const int32_t * idx, const float * val, const void * x_vd, float * out,
                        int64_t k0, int64_t k1);

// y[c] = sum_k val[k] * W[idx[k], c] for columns c in [c0, c1) (c0, c1 multiples of the type's
// block size, or c1 = the row length): an input-sparse product over a transposed weight.
ACTSPARSE_KERNEL_API void actsparse_axpy_rows(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                         const float * val, int64_t n, float * y, int64_t c0, int64_t c1);

// Whether actsparse_axpy_rows rounds val to 8 bits (per 16 rows and 16 columns, as ggml's dense dot
// products round their inputs) for this type: packed types on x86 with AVX2 or AVX-512 and on
// aarch64 with the dot-product extension, which accumulate in integer dot-product instructions.
// Its reference then rounds the same way.
ACTSPARSE_KERNEL_API bool actsparse_axpy_rounds_inputs(enum ggml_type type);

// Scalar reference of actsparse_axpy_rows (tests compare the SIMD paths with it).
ACTSPARSE_KERNEL_API void actsparse_axpy_rows_ref(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                             const float * val, int64_t n, float * y, int64_t c0, int64_t c1);

#ifdef __cplusplus
}
#endif
