// The runtime's custom ops (ggml_custom_4d callbacks): the dense mask, the decode selection with
// its up-projection rows, the input-sparse accumulate, and the decode check.
#include "actsparse-runtime.h"
#include "actsparse-kernels.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace actsparse_detail;

// ---- mask -------------------------------------------------------------------------------------

static const float * thresholds_row(const ggml_tensor * thr, int level) {
    return (const float *) ((const char *) thr->data + (size_t) level * thr->nb[1]);
}

// The ops receive activations already computed by the graph (ggml's silu/gelu), so they only
// compare magnitudes with the thresholds.

// Dense-shape op: y = x with sub-threshold entries zeroed, any number of rows (prefill and
// the reference decode path). Rows are split across threads, or a single row's channels.
void actsparse_detail::op_mask(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const op_params * p = (const op_params *) userdata;
    const ggml_tensor * x = dst->src[0];
    const ggml_tensor * thr = dst->src[1];
    const int64_t n = x->ne[0];
    const int64_t nrows = ggml_nrows(x);
    const float * t = thresholds_row(thr, p->state->level);
    const bool scalar = thr->ne[0] == 1;
    int64_t zeros = 0;
    if (g_trace_mode != ACTSPARSE_TRACE_OFF) {
        if (ith != 0) return;
        counters & c = p->state->stats[p->ph][p->model->layers[p->il].il][p->kind];
        c.zero += (uint64_t) traced_mask(p, x, dst, t, scalar);
        c.total += (uint64_t) (nrows * n);
        return;
    }
    if (nrows == 1) {
        const int64_t i0 = n * ith / nth, i1 = n * (ith + 1) / nth;
        zeros = actsparse_act_mask((const float *) x->data, (float *) dst->data, t, scalar, ACTSPARSE_ACT_NONE, i0, i1);
        counters & c = p->state->stats[p->ph][p->model->layers[p->il].il][p->kind];
        c.zero += (uint64_t) zeros;
        c.total += (uint64_t) (i1 - i0);
        return;
    }
    const int64_t r0 = nrows * ith / nth, r1 = nrows * (ith + 1) / nth;
    for (int64_t r = r0; r < r1; ++r) {
        const float * xr = (const float *) ((const char *) x->data + r * x->nb[1]);
        float * yr = (float *) ((char *) dst->data + r * dst->nb[1]);
        zeros += actsparse_act_mask(xr, yr, t, scalar, ACTSPARSE_ACT_NONE, 0, n);
    }
    counters & c = p->state->stats[p->ph][p->model->layers[p->il].il][p->kind];
    c.zero += (uint64_t) zeros;
    c.total += (uint64_t) ((r1 - r0) * n);
}

// ---- decode: the active inputs of one token ---------------------------------------------------
// Every thread of a decode op computes the whole selection itself (a SIMD compare over a few
// thousand floats) instead of one thread computing it for the rest: the ops that use it then
// need no barrier to share it. Thread 0 alone counts it and records it for the mask trace.

struct selection {
    int64_t k = 0;  // active entries
    std::vector<int32_t> idx;
    std::vector<float> val;
};

static const selection & select_active(const op_params * p, const ggml_tensor * x, const ggml_tensor * thr, int ith) {
    thread_local selection sel;
    const int64_t n = x->ne[0];
    sel.idx.resize(n);
    sel.val.resize(n);
    sel.k = actsparse_select((const float *) x->data, thresholds_row(thr, p->state->level), thr->ne[0] == 1,
                             ACTSPARSE_ACT_NONE, n, sel.idx.data(), sel.val.data());
    if (ith == 0) {
        if (g_trace_mode == ACTSPARSE_TRACE_RECORD) {
            std::vector<uint8_t> active(n);
            for (int64_t i = 0; i < sel.k; ++i) active[sel.idx[i]] = 1;
            trace_record(p, std::move(active));
        }
        const int il = p->model->layers[p->il].il;
        counters & c = p->state->stats[PHASE_DECODE][il][p->kind];
        c.zero += (uint64_t) (n - sel.k);
        c.total += (uint64_t) n;
        std::vector<uint32_t> & tokens = p->state->active_tokens[p->kind][il];
        tokens.resize(n);
        for (int64_t i = 0; i < sel.k; ++i) tokens[sel.idx[i]]++;
    }
    return sel;
}

// The FFN's active channels with their products, as one float tensor:
//   [count, idx[n], h[n]] (+ [dense h[n]] where the down product stays dense)
// h_k = a_k * (W_up[idx_k] . x); count and idx are int32 bits. Each thread computes an equal share
// of the active rows; with the dense copy it also writes the channels between its rows, zeros
// included, so that the threads cover the vector without overlapping.
static int64_t selected_count(const ggml_tensor * sel) {
    return ((const int32_t *) sel->data)[0];
}

void actsparse_detail::op_select_up(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const op_params * p = (const op_params *) userdata;
    const ggml_tensor * a = dst->src[0];
    const ggml_tensor * w = dst->src[2];
    const ggml_tensor * x = dst->src[3];
    const int64_t n = a->ne[0];
    const bool with_dense = dst->ne[0] == SEL_HEADER + 3 * n;
    const selection & sel = select_active(p, a, dst->src[1], ith);
    const int64_t k = sel.k;
    int32_t * out_idx = (int32_t *) dst->data + SEL_HEADER;
    float * out_h = (float *) dst->data + SEL_HEADER + n;
    if (ith == 0) ((int32_t *) dst->data)[0] = (int32_t) k;
    const int64_t k0 = k * ith / nth, k1 = k * (ith + 1) / nth;
    if (k0 < k1) {
        const ggml_type vdt = ggml_get_type_traits_cpu(w->type)->vec_dot_type;
        thread_local std::vector<char> xq;
        xq.resize(ggml_row_size(vdt, x->ne[0]));
        if (vdt == GGML_TYPE_F32) {
            std::memcpy(xq.data(), x->data, x->ne[0] * sizeof(float));
        } else {
            ggml_get_type_traits_cpu(vdt)->from_float((const float *) x->data, xq.data(), x->ne[0]);
        }
        actsparse_rows_dot(w->type, w->data, w->nb[1], w->ne[0], sel.idx.data(), sel.val.data(), xq.data(), out_h,
                           k0, k1);
        std::memcpy(out_idx + k0, sel.idx.data() + k0, (size_t) (k1 - k0) * sizeof(int32_t));
    }
    if (with_dense) {
        float * dense = out_h + n;
        const int64_t c0 = ith == 0 ? 0 : (k0 < k ? sel.idx[k0] : n);
        const int64_t c1 = ith == nth - 1 ? n : (k1 < k ? sel.idx[k1] : n);
        if (c0 < c1) std::memset(dense + c0, 0, (size_t) (c1 - c0) * sizeof(float));
        for (int64_t j = k0; j < k1; ++j) dense[sel.idx[j]] = out_h[j];
    }
}

// y = sum over the active inputs of v_k W_t[idx_k, :], an input-sparse product over a transposed
// copy. The active rows are split into AXPY_ROW_GROUPS halves, each summed into its own row of dst;
// gathered rows are bound by memory latency, which one thread streaming whole rows hides better
// than two threads reading half rows each. With more threads, a half's columns are split further
// in whole blocks. The last thread to finish adds the halves into row 0, saving a graph node.
// The list comes from op_select_up (src[1]), or is selected here from the input x (src[1]) and
// its thresholds (src[2]).
void actsparse_detail::op_axpy(ggml_tensor * dst, int ith, int nth, void * userdata) {
    op_params * p = (op_params *) userdata;
    const ggml_tensor * wt = dst->src[0];
    const int64_t ncols = wt->ne[0];
    const int32_t * idx;
    const float * v;
    int64_t k;
    if (dst->src[2]) {
        const selection & sel = select_active(p, dst->src[1], dst->src[2], ith);
        idx = sel.idx.data();
        v = sel.val.data();
        k = sel.k;
    } else {
        const ggml_tensor * list = dst->src[1];
        const int64_t n = (list->ne[0] - SEL_HEADER) / 2;  // (a dense copy, if any, follows)
        idx = (const int32_t *) list->data + SEL_HEADER;
        v = (const float *) list->data + SEL_HEADER + n;
        k = selected_count(list);
    }
    float * rows = (float *) dst->data;
    if (nth == 1) {
        actsparse_axpy_rows(wt->type, wt->data, wt->nb[1], idx, v, k, rows, 0, ncols);
        return;
    }
    const int64_t bs = ggml_blck_size(wt->type);
    const int64_t nblocks = ncols / bs;
    const int g = ith % AXPY_ROW_GROUPS;                               // this thread's half of the rows
    const int gi = ith / AXPY_ROW_GROUPS;                              // its place among that half's threads
    const int gn = (nth - g + AXPY_ROW_GROUPS - 1) / AXPY_ROW_GROUPS;  // threads on that half
    const int64_t k0 = k * g / AXPY_ROW_GROUPS, k1 = k * (g + 1) / AXPY_ROW_GROUPS;
    const int64_t c0 = nblocks * gi / gn * bs, c1 = nblocks * (gi + 1) / gn * bs;
    if (c0 < c1) actsparse_axpy_rows(wt->type, wt->data, wt->nb[1], idx + k0, v + k0, k1 - k0, rows + g * ncols, c0, c1);
    if (p->arrived.fetch_add(1, std::memory_order_acq_rel) == nth - 1) {
        for (int r = 1; r < AXPY_ROW_GROUPS; ++r) {
            for (int64_t c = 0; c < ncols; ++c) rows[c] += rows[r * ncols + c];
        }
        p->arrived.store(0, std::memory_order_relaxed);  // the next graph runs after a barrier
    }
}

// ---- decode check -----------------------------------------------------------------------------

// ACTSPARSE_CHECK_DECODE: src[0] the sparse product, src[1] the dense one of the same masked
// input; keeps the largest relative difference in the statistics and passes the sparse one on.
void actsparse_detail::op_check(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) nth;
    if (ith != 0) return;
    const op_params * p = (const op_params *) userdata;
    const float * k = (const float *) dst->src[0]->data;
    const float * d = (const float *) dst->src[1]->data;
    double diff = 0.0, scale = 1e-30;
    for (int64_t i = 0; i < dst->ne[0]; ++i) {
        diff = std::max(diff, (double) std::fabs(k[i] - d[i]));
        scale = std::max(scale, (double) std::fabs(d[i]));
    }
    const float rel = (float) (diff / scale);
    uint32_t bits;
    std::memcpy(&bits, &rel, sizeof bits);
    uint32_t cur = p->state->check_max_rel_err_bits.load();
    while (bits > cur && !p->state->check_max_rel_err_bits.compare_exchange_weak(cur, bits)) {}
    p->state->checked++;
    std::memcpy(dst->data, k, ggml_nbytes(dst));
}
