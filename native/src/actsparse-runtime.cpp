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
    const size_t n_levels = sm->levels.size();
    const int64_t k = gguf_find_key(meta, ACTSPARSE_KEY_ALLOCATION);
    const float * a = nullptr;
    size_t n_kinds = N_KINDS;  // the allocation's kinds: all, or the legacy first three
    if (k >= 0) {
        const size_t n = gguf_get_kv_type(meta, k) == GGUF_TYPE_ARRAY ? gguf_get_arr_n(meta, k) : 0;
        if (n == n_levels * n_layer * ACTSPARSE_LEGACY_ALLOCATION_KINDS) n_kinds = ACTSPARSE_LEGACY_ALLOCATION_KINDS;
        if (gguf_get_kv_type(meta, k) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, k) != GGUF_TYPE_FLOAT32 ||
            n != n_levels * n_layer * n_kinds) {
            throw std::runtime_error("actsparse: '" ACTSPARSE_KEY_ALLOCATION "' must be " +
                                     std::to_string(n_levels * n_layer * N_KINDS) + " f32 values (levels x layers x kinds)");
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
                sl.target[kind][lv] = !a ? sm->levels[lv]
                                    : kind < (int) n_kinds ? a[(lv * n_layer + sl.il) * n_kinds + kind] : 0.0f;
            }
        }
    }
}

// Where each kind's tensors are in llama_layer, in ACTSPARSE_KINDS order: its thresholds, its
// transposed copy and the product whose input it sparsifies (thresholds have one value per input of
// that product, or one in all).
struct kind_members {
    ggml_tensor * llama_layer::*thresh;
    ggml_tensor * llama_layer::*copy;
    ggml_tensor * llama_layer::*weight;
};

static const kind_members KIND_MEMBERS[N_KINDS] = {
    { &llama_layer::ffn_act_thresh, &llama_layer::ffn_down_t, &llama_layer::ffn_down },
    { &llama_layer::attn_q_in_thresh, &llama_layer::attn_q_t, &llama_layer::wq },
    { &llama_layer::attn_o_in_thresh, &llama_layer::attn_output_t, &llama_layer::wo },
    { &llama_layer::attn_k_in_thresh, &llama_layer::attn_k_t, &llama_layer::wk },
    { &llama_layer::attn_v_in_thresh, &llama_layer::attn_v_t, &llama_layer::wv },
    { &llama_layer::ffn_gate_in_thresh, &llama_layer::ffn_gate_t, &llama_layer::ffn_gate },
    { &llama_layer::ffn_up_in_thresh, &llama_layer::ffn_up_t, &llama_layer::ffn_up },
    { &llama_layer::ffn_down_in_thresh, &llama_layer::ffn_down_t, &llama_layer::ffn_down },
};

static bool has_thresholds(const llama_layer & L) {
    for (const kind_members & m : KIND_MEMBERS) {
        if (L.*m.thresh) return true;
    }
    return false;
}

void actsparse_model_loaded(llama_model & model, const gguf_context * meta) {
    bool any = false;
    for (const auto & L : model.layers) any |= has_thresholds(L);
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
        if (!has_thresholds(L)) continue;
        sparse_layer sl;
        sl.il = (int) il;
        for (int k = 0; k < N_KINDS; ++k) {
            ggml_tensor * thr = L.*KIND_MEMBERS[k].thresh;
            if (!thr) continue;
            const ggml_tensor * w = L.*KIND_MEMBERS[k].weight;
            check_thresholds(thr, w ? w->ne[0] : -1, sm->levels.size());
            check_transposed(L.*KIND_MEMBERS[k].copy, w, sl.il, (op_kind) k);
            sl.thresh[k] = thr;
            sl.weight_t[k] = L.*KIND_MEMBERS[k].copy;
        }
        if (sl.thresh[KIND_FFN] && sl.thresh[ACTSPARSE_KIND_DOWN_IN]) {
            throw std::runtime_error(tensor_err(sl.thresh[KIND_FFN], "and ffn_down_in_thresh both sparsify ffn_down"));
        }
        sm->layers.push_back(sl);
    }
    read_targets(meta, sm.get(), model.layers.size());

    sm->layer_index.assign(model.layers.size(), -1);
    for (size_t i = 0; i < sm->layers.size(); ++i) {
        const auto & sl = sm->layers[i];
        sm->layer_index[sl.il] = (int) i;
        for (int k = 0; k < N_KINDS; ++k) {
            if (sl.thresh[k]) sm->by_weight[model.layers[sl.il].*KIND_MEMBERS[k].weight] = { (int) i, (op_kind) k };
        }
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
