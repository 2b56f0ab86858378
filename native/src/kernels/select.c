// Selection by threshold: the dense mask (actsparse_act_mask) and the compact list of active
// entries (actsparse_select).
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include "arch/x86/select.h"
#endif

int64_t actsparse_act_mask(const float * x, float * y, const float * t, bool scalar_t, enum actsparse_act act,
                           int64_t i0, int64_t i1) {
    int64_t zeros = 0;
    if (act == ACTSPARSE_ACT_NONE) {
        // the common case (the graph has applied the activation)
#if defined(ACTSPARSE_F32_EPR)
        // Explicit, so that the mask does not hinge on each compiler's cost model for the counting
        // loop below.
        const ACTSPARSE_F32_VEC ts = ACTSPARSE_F32_VEC_SET1(t[0]);
        for (; i0 + ACTSPARSE_F32_EPR <= i1; i0 += ACTSPARSE_F32_EPR) {
            const ACTSPARSE_F32_VEC xv = ACTSPARSE_F32_VEC_LOAD(x + i0);
            const ACTSPARSE_F32_MASK keep =
                ACTSPARSE_F32_VEC_GT(ACTSPARSE_F32_VEC_ABS(xv), scalar_t ? ts : ACTSPARSE_F32_VEC_LOAD(t + i0));
            ACTSPARSE_F32_VEC_STORE(y + i0, ACTSPARSE_F32_VEC_KEEP(xv, keep));
            zeros += ACTSPARSE_F32_EPR - ACTSPARSE_F32_MASK_COUNT(keep);
        }
#endif
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
    if (act == ACTSPARSE_ACT_NONE) {
#if defined(ACTSPARSE_SELECT_ARCH)
        i = select_arch(x, t, scalar_t, n, idx, val, &k);
#elif defined(ACTSPARSE_F32_EPR)
        // At useful sparsity most groups have no active entry, and one compare rejects them.
        // Active lanes are appended without branches: idx[k] is written for every lane and kept
        // only by advancing k, which stays <= i + l, so the writes stay inside the n entries.
        const ACTSPARSE_F32_VEC ts = ACTSPARSE_F32_VEC_SET1(t[0]);
        for (; i + ACTSPARSE_F32_EPR <= n; i += ACTSPARSE_F32_EPR) {
            const ACTSPARSE_F32_VEC ax = ACTSPARSE_F32_VEC_ABS(ACTSPARSE_F32_VEC_LOAD(x + i));
            const unsigned keep =
                ACTSPARSE_F32_MASK_BITS(ACTSPARSE_F32_VEC_GT(ax, scalar_t ? ts : ACTSPARSE_F32_VEC_LOAD(t + i)));
            if (!keep) continue;
            for (int l = 0; l < ACTSPARSE_F32_EPR; ++l) {
                idx[k] = (int32_t) (i + l);
                val[k] = x[i + l];
                k += (keep >> l) & 1;
            }
        }
#endif
    }
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
