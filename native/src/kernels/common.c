// The kernels' exported helpers (the activation, the SIMD path compiled for) and the prefetch
// distance the gathering kernels share.
#include "internal.h"

#include <stdlib.h>

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

// ACTSPARSE_PREFETCH_BYTES (default 8192) sets the distance, for tuning on other machines.
static int64_t prefetch_bytes(void) {
    static int64_t bytes = -1;
    if (bytes < 0) {
        const char * v = getenv("ACTSPARSE_PREFETCH_BYTES");
        bytes = v && atoll(v) > 0 ? atoll(v) : 8192;
    }
    return bytes;
}

int64_t actsparse_prefetch_rows(size_t row_bytes) {
    const int64_t rows = prefetch_bytes() / (int64_t) row_bytes;
    return rows < 2 ? 2 : rows > 64 ? 64 : rows;
}
