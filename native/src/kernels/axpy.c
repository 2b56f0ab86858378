// actsparse_axpy_rows: the input-sparse product over a transposed weight, by type: Q8_0 four rows
// at a time, the packed types in integer dot products (axpy-int.c) or unpacked to float
// (axpy-float.c), every other type one row at a time.
#include "internal.h"
#include "unpack.h"

bool actsparse_axpy_rounds_inputs(enum ggml_type type) {
    return actsparse_axpy_int_type(type);
}

static void axpy_rows(enum ggml_type type, const void * w, size_t row_bytes, const int32_t * idx,
                      const float * val, int64_t n, float * y, int64_t c0, int64_t c1, bool reference) {
    if (type == GGML_TYPE_Q8_0 && !reference) {
        actsparse_axpy_rows_q8_0((const char *) w, row_bytes, idx, val, n, y, c0, c1);
        return;
    }
#if defined(ACTSPARSE_INT_ACCUMULATE)
    if (actsparse_axpy_int_type(type)) {
        actsparse_axpy_rows_int(type, (const char *) w, row_bytes, idx, val, n, y, c0, c1, reference);
        return;
    }
#endif
    if (!reference && actsparse_unpacker(type)) {
        actsparse_axpy_rows_unpacked(type, (const char *) w, row_bytes, idx, val, n, y, c0, c1);
    } else {
        actsparse_axpy_rows_each(type, (const char *) w, row_bytes, idx, val, n, y, c0, c1, reference);
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
