// actsparse runtime inside libllama: validates a model's sparsity tensors and keys at load and
// gives the model its sparse layers (llama_model::actsparse); the model's levels. The rest of the
// runtime: actsparse-context.cpp (a context's level and statistics), actsparse-trace.cpp,
// actsparse-ops.cpp and actsparse-graph.cpp (see actsparse-runtime.h).
#include "actsparse-runtime.h"
#include "actsparse-llama.h"

#include "ggml-backend.h"
#include "gguf.h"
#include "llama-model.h"

#include <cmath>
#include <cstdio>
#include <stdexcept>

using namespace actsparse_detail;

// ---- model load -------------------------------------------------------------------------------

int actsparse_detail::level_index(const sparse_model * sm, float level) {
    int idx = -1;
    for (size_t i = 0; i < sm->levels.size(); ++i) {
        if (std::fabs(sm->levels[i] - level) < ACTSPARSE_LEVEL_TOLERANCE) idx = (int) i;
    }
    return idx;
}

static std::string tensor_err(const ggml_tensor * t, const std::string & what) {
    return std::string("actsparse: tensor '") + t->name + "' " + what;
}

static void check_thresholds(const ggml_tensor * t, int64_t channels, size_t n_levels) {
    if (t->type != GGML_TYPE_F32) throw std::runtime_error(tensor_err(t, "must be F32"));
    if ((t->ne[0] != 1 && t->ne[0] != channels) || t->ne[1] != (int64_t) n_levels || t->ne[2] != 1) {
        throw std::runtime_error(tensor_err(t, "has shape [" + std::to_string(t->ne[0]) + ", " +
                                 std::to_string(t->ne[1]) + "], expected [1 or " + std::to_string(channels) +
                                 ", " + std::to_string(n_levels) + "]"));
    }
    std::vector<float> v(ggml_nelements(t));
    ggml_backend_tensor_get(t, v.data(), 0, ggml_nbytes(t));
    for (float x : v) {
        if (std::isnan(x) || x < 0.0f || std::isinf(x)) {
            throw std::runtime_error(tensor_err(t, "holds a NaN, infinite or negative threshold"));
        }
    }
}

static void check_transposed(const ggml_tensor * t, const ggml_tensor * orig, int il, op_kind kind) {
    if (!t) {
        char name[128];
        std::snprintf(name, sizeof name, ACTSPARSE_KINDS[kind].copy, il);
        throw std::runtime_error(std::string("actsparse: transposed copy '") + name + "' is missing");
    }
    if (!orig || t->ne[0] != orig->ne[1] || t->ne[1] != orig->ne[0]) {
        throw std::runtime_error(tensor_err(t, "is not the transpose of its original's shape"));
    }
}

static std::vector<float> read_levels(const gguf_context * meta) {
    std::vector<float> levels;
    const int64_t k = gguf_find_key(meta, ACTSPARSE_KEY_LEVELS);
    if (k < 0 || gguf_get_kv_type(meta, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, k) != GGUF_TYPE_FLOAT32) {
        throw std::runtime_error("actsparse: key '" ACTSPARSE_KEY_LEVELS "' is missing or not an array of f32");
    }
    const float * data = (const float *) gguf_get_arr_data(meta, k);
    levels.assign(data, data + gguf_get_arr_n(meta, k));
    for (size_t i = 0; i < levels.size(); ++i) {
        if (!(levels[i] > 0.0f && levels[i] < 1.0f) || (i > 0 && levels[i] <= levels[i - 1])) {
            throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_LEVELS "' must be increasing values in (0, 1)");
        }
    }
    if (levels.empty()) throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_LEVELS "' is empty");
    return levels;
}

// Each layer and kind's target sparsity per level: the allocation the converter chose, or the level.
static void read_targets(const gguf_context * meta, sparse_model * sm, size_t n_layer) {
    const size_t n_levels = sm->levels.size(), n = n_levels * n_layer * N_KINDS;
    const int64_t k = gguf_find_key(meta, ACTSPARSE_KEY_ALLOCATION);
    const float * a = nullptr;
    if (k >= 0) {
        if (gguf_get_kv_type(meta, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, k) != GGUF_TYPE_FLOAT32 ||
            gguf_get_arr_n(meta, k) != n) {
            throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_ALLOCATION "' must be " + std::to_string(n) +
                                     " f32 values (levels x layers x kinds)");
        }
        a = (const float *) gguf_get_arr_data(meta, k);
        for (size_t i = 0; i < n; ++i) {
            if (!(a[i] >= 0.0f && a[i] < 1.0f)) {
                throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_ALLOCATION "' holds a value outside [0, 1)");
            }
        }
    }
    for (sparse_layer & sl : sm->layers) {
        for (int kind = 0; kind < N_KINDS; ++kind) {
            sl.target[kind].resize(n_levels);
            for (size_t lv = 0; lv < n_levels; ++lv) {
                sl.target[kind][lv] = a ? a[(lv * n_layer + sl.il) * N_KINDS + kind] : sm->levels[lv];
            }
        }
    }
}

void actsparse_model_loaded(llama_model & model, const gguf_context * meta) {
    bool any = false;
    for (const auto & L : model.layers) any |= L.ffn_act_thresh || L.attn_q_in_thresh || L.attn_o_in_thresh;
    const bool has_keys = gguf_find_key(meta, ACTSPARSE_KEY_FORMAT_VERSION) >= 0;
    if (!any && !has_keys) return;
    if (!any) throw std::runtime_error("actsparse: file has actsparse keys but no threshold tensors");

    auto sm = std::make_unique<sparse_model>();
    sm->levels = read_levels(meta);
    const int64_t kd = gguf_find_key(meta, ACTSPARSE_KEY_DEFAULT_LEVEL);
    sm->default_level = kd >= 0 ? gguf_get_val_f32(meta, kd) : sm->levels[sm->levels.size() / 2];
    if (level_index(sm.get(), sm->default_level) < 0) {
        throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_DEFAULT_LEVEL "' is not one of '" ACTSPARSE_KEY_LEVELS "'");
    }
    const int64_t ka = gguf_find_key(meta, ACTSPARSE_KEY_ACTIVATION);
    const std::string act = ka >= 0 ? gguf_get_val_str(meta, ka) : "silu";
    if (act == "silu") sm->act = ACTSPARSE_ACT_SILU;
    else if (act == "gelu") sm->act = ACTSPARSE_ACT_GELU;
    else throw std::runtime_error("actsparse: unknown '" ACTSPARSE_KEY_ACTIVATION "' " + act);

    for (size_t il = 0; il < model.layers.size(); ++il) {
        const auto & L = model.layers[il];
        if (!L.ffn_act_thresh && !L.attn_q_in_thresh && !L.attn_o_in_thresh) continue;
        sparse_layer sl;
        sl.il = (int) il;
        if (L.ffn_act_thresh) {
            check_thresholds(L.ffn_act_thresh, L.ffn_gate ? L.ffn_gate->ne[1] : -1, sm->levels.size());
            check_transposed(L.ffn_down_t, L.ffn_down, sl.il, KIND_FFN);
            sl.thresh[KIND_FFN] = L.ffn_act_thresh;
            sl.weight_t[KIND_FFN] = L.ffn_down_t;
        }
        if (L.attn_q_in_thresh) {
            check_thresholds(L.attn_q_in_thresh, L.wq ? L.wq->ne[0] : -1, sm->levels.size());
            check_transposed(L.attn_q_t, L.wq, sl.il, KIND_Q);
            sl.thresh[KIND_Q] = L.attn_q_in_thresh;
            sl.weight_t[KIND_Q] = L.attn_q_t;
        }
        if (L.attn_o_in_thresh) {
            check_thresholds(L.attn_o_in_thresh, L.wo ? L.wo->ne[0] : -1, sm->levels.size());
            check_transposed(L.attn_output_t, L.wo, sl.il, KIND_O);
            sl.thresh[KIND_O] = L.attn_o_in_thresh;
            sl.weight_t[KIND_O] = L.attn_output_t;
        }
        sm->layers.push_back(sl);
    }
    read_targets(meta, sm.get(), model.layers.size());

    sm->layer_index.assign(model.layers.size(), -1);
    for (size_t i = 0; i < sm->layers.size(); ++i) {
        const auto & sl = sm->layers[i];
        const auto & L = model.layers[sl.il];
        sm->layer_index[sl.il] = (int) i;
        if (sl.thresh[KIND_FFN]) sm->by_weight[L.ffn_down] = { (int) i, KIND_FFN };
        if (sl.thresh[KIND_Q])   sm->by_weight[L.wq]       = { (int) i, KIND_Q };
        if (sl.thresh[KIND_O])   sm->by_weight[L.wo]       = { (int) i, KIND_O };
    }
    delete model.actsparse;
    model.actsparse = sm.release();
}

void actsparse_model_freed(llama_model * model) {
    delete model->actsparse;
    model->actsparse = nullptr;
}

// ---- the model's levels -----------------------------------------------------------------------

const sparse_model * actsparse_detail::find_model(const llama_model * model) {
    return model ? model->actsparse : nullptr;
}

extern "C" int actsparse_model_n_levels(const llama_model * model) {
    const sparse_model * sm = find_model(model);
    return sm ? (int) sm->levels.size() : 0;
}

extern "C" float actsparse_model_level(const llama_model * model, int i) {
    const sparse_model * sm = find_model(model);
    return sm && i >= 0 && i < (int) sm->levels.size() ? sm->levels[i] : -1.0f;
}

extern "C" float actsparse_model_default_level(const llama_model * model) {
    const sparse_model * sm = find_model(model);
    return sm ? sm->default_level : -1.0f;
}
