// A context's sparsity: its level (actsparse_set_sparse), the statistics its ops count, and their
// table, JSON and file.
#include "actsparse-runtime.h"
#include "actsparse-llama.h"

#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

using namespace actsparse_detail;

// ---- level ------------------------------------------------------------------------------------

static actsparse_context * context_state(const llama_context * ctx) {
    return ctx->get_actsparse();
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
    reserve_gathered_region(sm, *llama_get_model(ctx));
    auto st = std::make_unique<actsparse_context>();
    st->model = sm;
    st->level = idx;
    if (old) {
        st->print_at_exit = old->print_at_exit;
        st->stats_file = old->stats_file;
        st->sparse_prompt = old->sparse_prompt;
    }
    const size_t n_layer = llama_model_n_layer(llama_get_model(ctx));
    for (auto & phase_stats : st->stats) {
        for (size_t il = 0; il < n_layer; ++il) phase_stats.emplace_back(new counters[N_KINDS]);
    }
    for (auto & per_layer : st->active_tokens) per_layer.resize(n_layer);
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

extern "C" void actsparse_set_sparse_prompt(llama_context * ctx, bool on) {
    actsparse_context * st = context_state(ctx);
    if (!st) {
        const sparse_model * sm = find_model(llama_get_model(ctx));
        if (!sm) return;  // nothing is ever sparse
        st = new actsparse_context();  // dense until a level is set, which keeps the setting
        st->model = sm;
    }
    st->sparse_prompt = on;
    ctx->set_actsparse(st);  // prompt graphs change: no reuse of one built before
}

// ---- statistics -------------------------------------------------------------------------------

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
    // a column per kind the file carries
    bool shown[N_KINDS] = {};
    for (const sparse_layer & sl : st.model->layers) {
        for (int k = 0; k < N_KINDS; ++k) shown[k] |= sl.thresh[k] != nullptr;
    }
    char line[256];
    int n = std::snprintf(line, sizeof line, "  layer");
    for (int k = 0; k < N_KINDS; ++k) {
        if (shown[k]) n += std::snprintf(line + n, sizeof line - n, "  %9s", ACTSPARSE_KINDS[k].name);
    }
    out += line;
    out += "\n";
    double tz[N_KINDS] = {}, tt[N_KINDS] = {};
    for (size_t il = 0; il < st.stats[ph].size(); ++il) {
        n = std::snprintf(line, sizeof line, "  %5zu", il);
        for (int k = 0; k < N_KINDS; ++k) {
            if (!shown[k]) continue;
            const double z = st.stats[ph][il][k].zero, t = st.stats[ph][il][k].total;
            tz[k] += z;
            tt[k] += t;
            n += fraction_cell(line + n, sizeof line - n, z, t);
        }
        out += line;
        out += "\n";
    }
    n = std::snprintf(line, sizeof line, "  %5s", "all");
    for (int k = 0; k < N_KINDS; ++k) {
        if (shown[k]) n += fraction_cell(line + n, sizeof line - n, tz[k], tt[k]);
    }
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

// "decode_tokens": n, "decode_channels": {"ffn": [[tokens each channel of layer 0 was active in,
// ...], ...], ...}
static std::string channels_json(const actsparse_context & st) {
    uint64_t tokens = 0;  // every sparse op of a decode step counts the same tokens
    for (size_t il = 0; il < st.stats[PHASE_DECODE].size(); ++il) {
        for (int k = 0; k < N_KINDS; ++k) {
            const size_t n = st.active_tokens[k][il].size();
            if (n) tokens = std::max<uint64_t>(tokens, st.stats[PHASE_DECODE][il][k].total / n);
        }
    }
    std::string js = "\"decode_tokens\": " + std::to_string(tokens) + ", \"decode_channels\": {";
    for (int k = 0; k < N_KINDS; ++k) {
        js += std::string(k ? "], \"" : "\"") + ACTSPARSE_KINDS[k].name + "\": [";
        for (size_t il = 0; il < st.active_tokens[k].size(); ++il) {
            js += il ? ", [" : "[";
            const auto & tokens = st.active_tokens[k][il];
            for (size_t i = 0; i < tokens.size(); ++i) js += (i ? "," : "") + std::to_string(tokens[i]);
            js += "]";
        }
    }
    return js + "]}";
}

static std::string stats_json(const actsparse_context * st, bool with_channels = false) {
    std::string js = "{" + stats_json_members(st, PHASE_DECODE);
    if (st && with_channels) js += ", " + channels_json(*st);
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
    const std::string js = stats_json(&st, true) + "\n";
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
