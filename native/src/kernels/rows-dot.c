// Gathered dot products: the selected rows of a weight times one input, through ggml's vec_dot.
#include "internal.h"

void actsparse_rows_dot(enum ggml_type type, const void * w, size_t row_bytes, int64_t n_per_row,
                        const int32_t * idx, const float * val, const void * x_vd, float * out,
                        int64_t k0, int64_t k1) {
    const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu(type);
    // Rows are gathered by index, which the hardware prefetcher cannot follow: prefetch the row
    // a few kilobytes of reads ahead, enough to cover the memory latency.
    const int64_t ahead = actsparse_prefetch_rows(row_bytes);
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
