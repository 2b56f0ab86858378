// actsparse runtime inside libllama: validates and registers a model's sparsity tensors, holds
// each context's level and statistics, and builds the sparse FFN / attention-input graphs.
#include "actsparse.h"
#include "actsparse-kernels.h"
#include "actsparse-llama.h"
#include "actsparse-schema.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"
#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <stdexcept>
#include <string>
#include <vector>

namespace actsparse_detail {

typedef actsparse_kind op_kind;
constexpr op_kind KIND_FFN = ACTSPARSE_KIND_FFN, KIND_Q = ACTSPARSE_KIND_Q, KIND_O = ACTSPARSE_KIND_O;
constexpr int N_KINDS = ACTSPARSE_N_KINDS;
enum phase { PHASE_DECODE = 0, PHASE_PREFILL = 1, N_PHASES = 2 };

struct sparse_layer {
    int il = -1;
    ggml_tensor * thresh[N_KINDS] = {};   // ffn_act_thresh, attn_q_in_thresh, attn_o_in_thresh
    ggml_tensor * weight_t[N_KINDS] = {}; // ffn_down_t, attn_q_t, attn_output_t
};

struct weight_ref {
    int il;  // index into actsparse_model::layers
    op_kind kind;
};

}  // namespace actsparse_detail

using namespace actsparse_detail;

// A model's sparsity, held by the model (llama_model::actsparse) and read-only after load, so
// graph building reads it without a lock.
struct actsparse_model {
    std::vector<float> levels;
    float default_level = 0.0f;
    actsparse_act act = ACTSPARSE_ACT_SILU;
    std::vector<sparse_layer> layers;
    std::vector<int> layer_index;  // model layer -> index into layers, -1 where it has no thresholds
    // The products whose input is sparse, found by weight: build_lora_mm, where attention's q and o
    // products are built, knows no layer index.
    std::unordered_map<const ggml_tensor *, weight_ref> by_weight;
};

namespace actsparse_detail {

typedef actsparse_model sparse_model;

struct counters {
    std::atomic<uint64_t> zero{0}, total{0};
};

struct op_params {
    const sparse_model * model = nullptr;
    actsparse_context * state = nullptr;
    int il = 0;
    op_kind kind = KIND_FFN;
    phase ph = PHASE_DECODE;  // which statistics the op counts into
    std::atomic<int> arrived{0};  // op_axpy's threads done with their partial sums
};

}  // namespace actsparse_detail

using namespace actsparse_detail;

// A context's sparsity, held by the context (llama_context::get_actsparse), freed with it.
struct actsparse_context {
    const sparse_model * model = nullptr;
    int level = -1;  // index into model->levels; -1: dense
    bool print_at_exit = false;
    std::string stats_file;  // statistics JSON written here when the context is freed
    // Zeroed inputs per phase, per layer, per kind. Decode (one-token ubatches) is what the
    // sparse kernels skip; prefill is counted apart so evaluations over batched text can report
    // the sparsity they measured under.
    std::vector<std::unique_ptr<counters[]>> stats[N_PHASES];
    std::deque<op_params> params;                    // stable addresses for op userdata
    std::map<std::pair<int, int>, op_params *> by_layer_kind[N_PHASES];
    std::atomic<uint64_t> checked{0};
    std::atomic<uint32_t> check_max_rel_err_bits{0};  // float bits: max |kernel - dense| / max |dense|
};

// ---- model load -------------------------------------------------------------------------------

// The index of `level` among the model's levels (the last within ACTSPARSE_LEVEL_TOLERANCE), or -1.
static int level_index(const sparse_model * sm, float level) {
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

// ---- contexts ---------------------------------------------------------------------------------

static const sparse_model * find_model(const llama_model * model) {
    return model ? model->actsparse : nullptr;
}

static actsparse_context * context_state(const llama_context * ctx) {
    return ctx->get_actsparse();
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

static std::string levels_text(const sparse_model * sm) {
    std::string s;
    char buf[32];
    for (float l : sm->levels) {
        std::snprintf(buf, sizeof buf, "%s%g", s.empty() ? "" : ", ", l);
        s += buf;
    }
    return s;
}

extern "C" int actsparse_set_sparse(llama_context * ctx, float level, char * err, size_t err_size) {
    auto fail = [&](const std::string & msg) {
        if (err && err_size) std::snprintf(err, err_size, "%s", msg.c_str());
        return -1;
    };
    const sparse_model * sm = find_model(llama_get_model(ctx));
    actsparse_context * old = context_state(ctx);
    if (level == 0.0f) {
        if (old) {
            old->level = -1;  // dense; what it counted stays readable
            ctx->set_actsparse(old);
        }
        return 0;
    }
    if (!sm) {
        return fail("the model has no sparsity thresholds; create them with python/convert_with_thresholds.py");
    }
    if (std::isnan(level)) return fail("sparsity level is NaN");
    if (level < 0.0f) level = sm->default_level;
    const int idx = level_index(sm, level);
    if (idx < 0) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%g", level);
        return fail(std::string("sparsity level ") + buf + " is not in the model; available: " + levels_text(sm));
    }
    auto st = std::make_unique<actsparse_context>();
    st->model = sm;
    st->level = idx;
    if (old) {
        st->print_at_exit = old->print_at_exit;
        st->stats_file = old->stats_file;
    }
    const size_t n_layer = llama_model_n_layer(llama_get_model(ctx));
    for (auto & phase_stats : st->stats) {
        for (size_t il = 0; il < n_layer; ++il) phase_stats.emplace_back(new counters[N_KINDS]);
    }
    for (size_t i = 0; i < sm->layers.size(); ++i) {
        for (int k = 0; k < N_KINDS; ++k) {
            for (int ph = 0; ph < N_PHASES; ++ph) {
                op_params & p = st->params.emplace_back();
                p.model = sm;
                p.state = st.get();
                p.il = (int) i;
                p.kind = (op_kind) k;
                p.ph = (phase) ph;
                st->by_layer_kind[ph][{ (int) i, k }] = &p;
            }
        }
    }
    ctx->set_actsparse(st.release());
    delete old;  // the graph that used it is not reused (set_actsparse defeats reuse)
    return 0;
}

static int fraction_cell(char * buf, size_t size, double part, double total) {
    return total > 0 ? std::snprintf(buf, size, "  %9.3f", part / total) : std::snprintf(buf, size, "  %9s", "-");
}

static bool phase_counted(const actsparse_context & st, int ph) {
    for (const auto & layer : st.stats[ph]) {
        for (int k = 0; k < N_KINDS; ++k) {
            if (layer[k].total > 0) return true;
        }
    }
    return false;
}

static std::string stats_table(const actsparse_context & st, int ph) {
    std::string out = std::string("actsparse: realized sparsity during ") + (ph == PHASE_DECODE ? "decode" : "prefill") +
                      (ph == PHASE_DECODE ? " (fraction of inputs skipped)\n" : " (fraction of inputs zeroed by the mask)\n");
    out += "  layer      ffn  attn_q_in  attn_o_in\n";
    double tz[N_KINDS] = {}, tt[N_KINDS] = {};
    char line[128];
    for (size_t il = 0; il < st.stats[ph].size(); ++il) {
        int n = std::snprintf(line, sizeof line, "  %5zu", il);
        for (int k = 0; k < N_KINDS; ++k) {
            const double z = st.stats[ph][il][k].zero, t = st.stats[ph][il][k].total;
            tz[k] += z;
            tt[k] += t;
            n += fraction_cell(line + n, sizeof line - n, z, t);
        }
        out += line;
        out += "\n";
    }
    int n = std::snprintf(line, sizeof line, "  %5s", "all");
    for (int k = 0; k < N_KINDS; ++k) n += fraction_cell(line + n, sizeof line - n, tz[k], tt[k]);
    out += line;
    out += "\n";
    return out;
}

static std::string ratio_json(double zero, double total) {
    return total > 0 ? std::to_string(zero / total) : "null";
}

// {"layers": [{"layer": i, "ffn": f, ...}], "overall": {...}} for one phase.
static std::string stats_json_members(const actsparse_context * st, int ph) {
    std::string js = "\"layers\": [";
    double tz[N_KINDS] = {}, tt[N_KINDS] = {};
    if (st) {
        for (size_t il = 0; il < st->stats[ph].size(); ++il) {
            js += il ? ", {" : "{";
            js += "\"layer\": " + std::to_string(il);
            for (int k = 0; k < N_KINDS; ++k) {
                const double z = st->stats[ph][il][k].zero, t = st->stats[ph][il][k].total;
                tz[k] += z;
                tt[k] += t;
                js += std::string(", \"") + ACTSPARSE_KINDS[k].name + "\": " + ratio_json(z, t);
            }
            js += "}";
        }
    }
    js += "], \"overall\": {";
    for (int k = 0; k < N_KINDS; ++k) js += std::string(k ? ", \"" : "\"") + ACTSPARSE_KINDS[k].name + "\": " + ratio_json(tz[k], tt[k]);
    return js + "}";
}

static void write_stats_file(const actsparse_context & st);

void actsparse_context_freed(llama_context * ctx) {
    std::unique_ptr<actsparse_context> st(context_state(ctx));
    if (!st) return;
    ctx->set_actsparse(nullptr);
    if (st->print_at_exit) {
        // Decode always (the flag's promise); prefill only where batches ran under the mask.
        std::string out = stats_table(*st, PHASE_DECODE);
        if (phase_counted(*st, PHASE_PREFILL)) out += stats_table(*st, PHASE_PREFILL);
        std::fputs(out.c_str(), stderr);
    }
    if (!st->stats_file.empty()) write_stats_file(*st);
}

extern "C" void actsparse_print_stats_at_exit(llama_context * ctx, bool on) {
    actsparse_context * st = context_state(ctx);
    if (st) st->print_at_exit = on;
}

static std::string stats_json(const actsparse_context * st) {
    std::string js = "{" + stats_json_members(st, PHASE_DECODE);
    js += ", \"prefill\": {" + stats_json_members(st, PHASE_PREFILL) + "}";
    if (st && st->checked > 0) {
        uint32_t bits = st->check_max_rel_err_bits.load();
        float rel;
        std::memcpy(&rel, &bits, sizeof rel);
        js += ", \"decode_check\": {\"products\": " + std::to_string(st->checked.load()) +
              ", \"max_rel_err\": " + std::to_string(rel) + "}";
    }
    return js + "}";
}

extern "C" int actsparse_stats_json(llama_context * ctx, char * buf, size_t size) {
    const std::string js = stats_json(context_state(ctx));
    if (buf && size) std::snprintf(buf, size, "%s", js.c_str());
    return (int) js.size();
}

extern "C" void actsparse_write_stats_at_exit(llama_context * ctx, const char * path) {
    actsparse_context * st = context_state(ctx);
    if (st) st->stats_file = path ? path : "";
}

// Written beside the destination and renamed, so a reader never sees half a file.
static void write_stats_file(const actsparse_context & st) {
    const std::string tmp = st.stats_file + ".tmp";
    const std::string js = stats_json(&st) + "\n";
    FILE * f = std::fopen(tmp.c_str(), "w");
    bool ok = f != nullptr;
    if (f) {
        ok = std::fwrite(js.data(), 1, js.size(), f) == js.size();
        ok = std::fclose(f) == 0 && ok;
    }
    if (!(ok && std::rename(tmp.c_str(), st.stats_file.c_str()) == 0)) {
        std::remove(tmp.c_str());
        std::fprintf(stderr, "actsparse: cannot write the statistics to %s\n", st.stats_file.c_str());
    }
}

// ---- mask trace (tests) -----------------------------------------------------------------------
// The thresholds make the function discontinuous: an input next to its threshold flips with the
// rounding of the product that computed it, and a one-row product rounds differently from an n-row
// one. To compare decode with batched prefill as functions, a test records the mask every decode
// token used and replays those masks in one batch over the same tokens (actsparse_mask_trace).
// While tracing, the mask ops run on one thread so that the per-layer cursors advance in order.

namespace actsparse_detail {

struct mask_trace {
    std::mutex mutex;
    std::map<std::pair<int, int>, std::vector<std::vector<uint8_t>>> masks;  // (layer, kind) -> per token
    std::map<std::pair<int, int>, size_t> cursor;
};

std::atomic<int> g_trace_mode{ACTSPARSE_TRACE_OFF};
mask_trace g_trace;

}  // namespace actsparse_detail

extern "C" void actsparse_mask_trace(int mode) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    if (mode == ACTSPARSE_TRACE_REPLAY) {
        g_trace.cursor.clear();
    } else {
        g_trace.masks.clear();
        g_trace.cursor.clear();
    }
    g_trace_mode = mode;
}

extern "C" int64_t actsparse_mask_trace_get(int layer, int kind, int64_t index, uint8_t * out, int64_t capacity) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    const auto it = g_trace.masks.find({ layer, kind });
    if (it == g_trace.masks.end() || index < 0 || index >= (int64_t) it->second.size()) return -1;
    const std::vector<uint8_t> & mask = it->second[(size_t) index];
    if (out) std::memcpy(out, mask.data(), (size_t) std::min<int64_t>(capacity, (int64_t) mask.size()));
    return (int64_t) mask.size();
}

static void trace_record(const op_params * p, std::vector<uint8_t> && active) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    g_trace.masks[{ p->model->layers[p->il].il, p->kind }].push_back(std::move(active));
}

// The next recorded mask of this layer and kind, or null when the recording has none left.
static const std::vector<uint8_t> * trace_next(const op_params * p, int64_t n) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    const std::pair<int, int> key{ p->model->layers[p->il].il, p->kind };
    const auto & list = g_trace.masks[key];
    size_t & at = g_trace.cursor[key];
    if (at >= list.size() || (int64_t) list[at].size() != n) return nullptr;
    return &list[at++];
}

// op_mask while tracing: the whole tensor on thread 0, recording single rows or replaying.
static int64_t traced_mask(const op_params * p, const ggml_tensor * x, ggml_tensor * dst, const float * t,
                           bool scalar) {
    const int64_t n = x->ne[0];
    int64_t zeros = 0;
    for (int64_t r = 0; r < ggml_nrows(x); ++r) {
        const float * xr = (const float *) ((const char *) x->data + r * x->nb[1]);
        float * yr = (float *) ((char *) dst->data + r * dst->nb[1]);
        const std::vector<uint8_t> * replay = g_trace_mode == ACTSPARSE_TRACE_REPLAY ? trace_next(p, n) : nullptr;
        if (replay) {
            for (int64_t i = 0; i < n; ++i) {
                yr[i] = (*replay)[i] ? xr[i] : 0.0f;
                zeros += !(*replay)[i];
            }
            continue;
        }
        zeros += actsparse_act_mask(xr, yr, t, scalar, ACTSPARSE_ACT_NONE, 0, n);
        if (g_trace_mode == ACTSPARSE_TRACE_RECORD && ggml_nrows(x) == 1) {
            std::vector<uint8_t> active(n);
            for (int64_t i = 0; i < n; ++i) active[i] = yr[i] != 0.0f;
            trace_record(p, std::move(active));
        }
    }
    return zeros;
}

// ---- ops --------------------------------------------------------------------------------------

static const float * thresholds_row(const ggml_tensor * thr, int level) {
    return (const float *) ((const char *) thr->data + (size_t) level * thr->nb[1]);
}

// The ops receive activations already computed by the graph (ggml's silu/gelu), so they only
// compare magnitudes with the thresholds.

// Dense-shape op: y = x with sub-threshold entries zeroed, any number of rows (prefill and
// the reference decode path). Rows are split across threads, or a single row's channels.
static void op_mask(ggml_tensor * dst, int ith, int nth, void * userdata) {
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

// ---- decode: the active inputs of one token ----------------------------------------------------
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
        counters & c = p->state->stats[PHASE_DECODE][p->model->layers[p->il].il][p->kind];
        c.zero += (uint64_t) (n - sel.k);
        c.total += (uint64_t) n;
    }
    return sel;
}

// The FFN's active channels with their products, as one float tensor:
//   [count, idx[n], h[n]] (+ [dense h[n]] where the down product stays dense)
// h_k = a_k * (W_up[idx_k] . x); count and idx are int32 bits. Each thread computes an equal share
// of the active rows; with the dense copy it also writes the channels between its rows, zeros
// included, so that the threads cover the vector without overlapping.
static constexpr int64_t SEL_HEADER = 1;

static int64_t selected_count(const ggml_tensor * sel) {
    return ((const int32_t *) sel->data)[0];
}

static void op_select_up(ggml_tensor * dst, int ith, int nth, void * userdata) {
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
static constexpr int AXPY_ROW_GROUPS = 2;

static void op_axpy(ggml_tensor * dst, int ith, int nth, void * userdata) {
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

static void op_check(ggml_tensor * dst, int ith, int nth, void * userdata) {
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

static bool plain_cpu_weight(const ggml_tensor * w) {
    // weights in the CPU backend's extra buffers ("CPU_REPACK", ...) are not in ggml's row layout
    if (!w || !w->buffer) return false;
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer));
    return std::strcmp(name, "CPU") == 0 || std::strcmp(name, "CPU_Mapped") == 0;
}

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
// reads at most SPARSE_BYTES_MARGIN of the original's bytes at the level's target sparsity;
// elsewhere the original multiplies the masked input (the same function, computed densely).
// python/actsparse/benchmark.py applies the same rule to the bytes-per-token ceiling.
static constexpr double SPARSE_BYTES_MARGIN = ACTSPARSE_SPARSE_BYTES_MARGIN;

static bool sparse_kernel_pays(const ggml_tensor * w, const ggml_tensor * wt, const actsparse_context * st) {
    if (decode_kernels_mode() == DECODE_KERNELS_ALL) return true;
    const double s = st->model->levels[st->level];
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
    if (!st || st->level < 0 || il < 0 || il >= (int) st->model->layer_index.size()) return nullptr;
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
        const bool down_sparse = sparse_kernel_pays(down, wt, st);
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
    if (!st || st->level < 0) return nullptr;
    const auto it = st->model->by_weight.find(w);
    if (it == st->model->by_weight.end() || it->second.kind == KIND_FFN) return nullptr;
    const op_kind kind = it->second.kind;
    const phase ph = n_tokens == 1 ? PHASE_DECODE : PHASE_PREFILL;
    if (!layer_ops(st, it->second.il, kind, ph, p, sl) || !ggml_is_contiguous(cur)) return nullptr;
    ggml_tensor * thr = sl->thresh[kind];
    ggml_tensor * wt = sl->weight_t[kind];
    if (ph == PHASE_DECODE && ggml_nrows(cur) == 1 && decode_kernels_enabled() && plain_cpu_weight(wt) && sparse_kernel_pays(w, wt, st)) {
        ggml_tensor * y = sparse_product(ctx0, wt, cur, thr, p);
        if (check_decode()) {
            ggml_tensor * wd = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_cast(ctx0, wt, GGML_TYPE_F32)));
            y = with_check(ctx0, y, ggml_mul_mat(ctx0, wd, masked(ctx0, cur, thr, p)), p);
        }
        return y;
    }
    return ggml_mul_mat(ctx0, w, masked(ctx0, cur, thr, p));
}
