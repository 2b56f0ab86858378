// Graph building: the sparse FFN and attention-input products (actsparse_build_ffn,
// actsparse_build_mm), from the ops in actsparse-ops.cpp.
#include "actsparse-runtime.h"
#include "actsparse-llama.h"

#include "ggml-backend.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace actsparse_detail;

// ---- nodes ------------------------------------------------------------------------------------

// The input-sparse product over a transposed copy, from a list or from the input itself.
static ggml_tensor * sparse_product(ggml_context * ctx0, ggml_tensor * wt, ggml_tensor * list_or_x,
                                    ggml_tensor * thr, op_params * p) {
    ggml_tensor * srcs[] = { wt, list_or_x, thr };
    ggml_tensor * rows = ggml_custom_4d(ctx0, GGML_TYPE_F32, wt->ne[0], AXPY_ROW_GROUPS, 1, 1, srcs, thr ? 3 : 2,
                                        op_axpy, GGML_N_TASKS_MAX, p);
    return ggml_view_1d(ctx0, rows, wt->ne[0], 0);
}

// ACTSPARSE_CHECK_DECODE=1: every sparse decode product is also computed densely from the same
// masked input, and the largest relative difference is kept in the statistics (tests use it).
static bool check_decode() {
    static const bool on = std::getenv("ACTSPARSE_CHECK_DECODE") != nullptr;
    return on;
}

static ggml_tensor * with_check(ggml_context * ctx0, ggml_tensor * sparse, ggml_tensor * dense, op_params * p) {
    ggml_tensor * srcs[] = { sparse, dense };
    return ggml_custom_4d(ctx0, GGML_TYPE_F32, sparse->ne[0], 1, 1, 1, srcs, 2, op_check, GGML_N_TASKS_MAX, p);
}

static ggml_tensor * masked(ggml_context * ctx0, ggml_tensor * x, ggml_tensor * thr, op_params * p) {
    ggml_tensor * srcs[] = { x, thr };
    return ggml_custom_4d(ctx0, GGML_TYPE_F32, x->ne[0], x->ne[1], x->ne[2], x->ne[3], srcs, 2, op_mask,
                          GGML_N_TASKS_MAX, p);
}

// ---- graph building ---------------------------------------------------------------------------

enum decode_kernels { DECODE_KERNELS_AUTO, DECODE_KERNELS_ALL, DECODE_KERNELS_NONE };

// ACTSPARSE_DECODE_KERNELS: "auto" (default), "all" (every sparse product through the input-sparse
// kernels; the kernel tests use it) or "none" (decode computed like prefill, dense products of
// masked inputs: the reference the kernels are compared with).
static decode_kernels decode_kernels_mode() {
    static const decode_kernels mode = [] {
        const char * v = std::getenv("ACTSPARSE_DECODE_KERNELS");
        if (!v || !*v || std::strcmp(v, "auto") == 0) return DECODE_KERNELS_AUTO;
        if (std::strcmp(v, "all") == 0) return DECODE_KERNELS_ALL;
        if (std::strcmp(v, "none") == 0) return DECODE_KERNELS_NONE;
        std::fprintf(stderr, "actsparse: ACTSPARSE_DECODE_KERNELS=%s is not auto, all or none; using auto\n", v);
        return DECODE_KERNELS_AUTO;
    }();
    return mode;
}

static bool decode_kernels_enabled() {
    return decode_kernels_mode() != DECODE_KERNELS_NONE;
}

// An input-sparse product reads (1 - s) of the transposed copy where the dense one reads the whole
// original. The copy can be a wider type (Q8_0 beside Q4 originals) and its float accumulate
// costs more per byte than ggml's integer mat-vec, so in "auto" the kernel runs only where it
// reads at most SPARSE_BYTES_MARGIN of the original's bytes at the layer's target sparsity;
// elsewhere the original multiplies the masked input (the same function, computed densely).
// python/actsparse/benchmark.py applies the same rule to the bytes-per-token ceiling.
static constexpr double SPARSE_BYTES_MARGIN = ACTSPARSE_SPARSE_BYTES_MARGIN;

static bool sparse_kernel_pays(const ggml_tensor * w, const ggml_tensor * wt, const sparse_layer * sl, op_kind kind,
                               const actsparse_context * st) {
    if (decode_kernels_mode() == DECODE_KERNELS_ALL) return true;
    const double s = sl->target[kind][st->level];
    return (1.0 - s) * (double) ggml_nbytes(wt) <= SPARSE_BYTES_MARGIN * (double) ggml_nbytes(w);
}

// The sparse layer at `index` (into model->layers) and its op parameters, where it has `kind`.
static bool layer_ops(actsparse_context * st, int index, op_kind kind, phase ph, op_params *& p,
                      const sparse_layer *& sl) {
    if (index < 0) return false;
    sl = &st->model->layers[index];
    p = st->by_layer_kind[ph].at({ index, kind });
    return sl->thresh[kind] != nullptr;
}

ggml_tensor * actsparse_build_ffn(ggml_context * ctx0, ggml_tensor * cur, ggml_tensor * up, ggml_tensor * gate,
                                  ggml_tensor * down, bool plain_gated, int64_t n_tokens, int il,
                                  actsparse_context * st) {
    op_params * p = nullptr;
    const sparse_layer * sl = nullptr;
    const phase ph = n_tokens == 1 ? PHASE_DECODE : PHASE_PREFILL;
    if (!st || st->level < 0 || (ph == PHASE_PREFILL && !st->sparse_prompt)) return nullptr;
    if (il < 0 || il >= (int) st->model->layer_index.size()) return nullptr;
    const int index = st->model->layer_index[il];
    // only the layer's own FFN (an architecture may build other FFNs, e.g. shared experts, at the same il)
    const auto own = st->model->by_weight.find(down);
    if (own == st->model->by_weight.end() || own->second.il != index || own->second.kind != KIND_FFN) return nullptr;
    if (!plain_gated || !up || !gate || !layer_ops(st, index, KIND_FFN, ph, p, sl)) return nullptr;
    ggml_tensor * thr = sl->thresh[KIND_FFN];
    // a = act(W_gate x) with ggml's vectorised op (the same formulas the thresholds were measured on)
    ggml_tensor * g = ggml_mul_mat(ctx0, gate, cur);
    // llama.cpp's names for these nodes, so that eval callbacks (actsparse-calibrate --sparse) find them
    ggml_format_name(g, "ffn_gate-%d", sl->il);
    g = st->model->act == ACTSPARSE_ACT_GELU ? ggml_gelu(ctx0, g) : ggml_silu(ctx0, g);
    const int64_t n_ff = g->ne[0];
    const bool decode = ph == PHASE_DECODE && ggml_nrows(cur) == 1 && decode_kernels_enabled();
    if (decode && plain_cpu_weight(up) && plain_cpu_weight(sl->weight_t[KIND_FFN])) {
        ggml_tensor * wt = sl->weight_t[KIND_FFN];
        const bool down_sparse = sparse_kernel_pays(down, wt, sl, KIND_FFN, st);
        gathered_weight(st->model, up);
        if (down_sparse) gathered_weight(st->model, wt);
        ggml_tensor * srcs_sel[] = { g, thr, up, cur };
        ggml_tensor * list = ggml_custom_4d(ctx0, GGML_TYPE_F32, SEL_HEADER + (down_sparse ? 2 : 3) * n_ff, 1, 1, 1,
                                            srcs_sel, 4, op_select_up, GGML_N_TASKS_MAX, p);
        if (!down_sparse) {
            // the original multiplies the masked product, which the list carries densely at its end
            return ggml_mul_mat(ctx0, down, ggml_view_1d(ctx0, list, n_ff, (SEL_HEADER + 2 * n_ff) * sizeof(float)));
        }
        ggml_tensor * y = sparse_product(ctx0, wt, list, nullptr, p);
        if (check_decode()) {
            // the dense reference reads W_down^T back from the copy, so only the kernels differ
            ggml_tensor * a = masked(ctx0, g, thr, p);
            ggml_tensor * hd = ggml_mul(ctx0, a, ggml_mul_mat(ctx0, up, cur));
            y = with_check(ctx0, y, ggml_mul_mat(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, ggml_cast(ctx0, wt, GGML_TYPE_F32))), hd), p);
        }
        return y;
    }
    ggml_tensor * u = ggml_mul_mat(ctx0, up, cur);
    ggml_format_name(u, "ffn_up-%d", sl->il);
    return ggml_mul_mat(ctx0, down, ggml_mul(ctx0, masked(ctx0, g, thr, p), u));
}

ggml_tensor * actsparse_build_mm(ggml_context * ctx0, ggml_tensor * w, ggml_tensor * cur, int64_t n_tokens,
                                 actsparse_context * st) {
    op_params * p = nullptr;
    const sparse_layer * sl = nullptr;
    const phase ph = n_tokens == 1 ? PHASE_DECODE : PHASE_PREFILL;
    if (!st || st->level < 0 || (ph == PHASE_PREFILL && !st->sparse_prompt)) return nullptr;
    const auto it = st->model->by_weight.find(w);
    if (it == st->model->by_weight.end() || it->second.kind == KIND_FFN) return nullptr;
    const op_kind kind = it->second.kind;
    if (!layer_ops(st, it->second.il, kind, ph, p, sl) || !ggml_is_contiguous(cur)) return nullptr;
    ggml_tensor * thr = sl->thresh[kind];
    ggml_tensor * wt = sl->weight_t[kind];
    if (ph == PHASE_DECODE && ggml_nrows(cur) == 1 && decode_kernels_enabled() && plain_cpu_weight(wt) && sparse_kernel_pays(w, wt, sl, kind, st)) {
        gathered_weight(st->model, wt);
        ggml_tensor * y = sparse_product(ctx0, wt, cur, thr, p);
        if (check_decode()) {
            ggml_tensor * wd = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_cast(ctx0, wt, GGML_TYPE_F32)));
            y = with_check(ctx0, y, ggml_mul_mat(ctx0, wd, masked(ctx0, cur, thr, p)), p);
        }
        return y;
    }
    return ggml_mul_mat(ctx0, w, masked(ctx0, cur, thr, p));
}
