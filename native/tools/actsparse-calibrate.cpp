// actsparse-calibrate: collects the activation statistics that CHESS/CATS thresholds are computed
// from, by running a GGUF model on calibration text in this llama.cpp build (in the manner of
// llama-imatrix: an eval callback reads the graph's named intermediate tensors).
//
// Pass 1 (always):  per layer, sum |u_i| per FFN channel (u = W_up x, "ffn_up-N"),
//                   histogram of |a| (a = act(W_gate x), "ffn_gate-N" through the activation),
//                   histograms of |x| at the input of W_q ("attn_norm-N") and of W_o ("kqv_out-N").
// Pass 2 (--chess): per layer, histogram of the CHESS score |a_i| * E|u_i| over the same tokens.
//
// --sparse LEVEL runs a model that carries thresholds at that level, so that each layer's statistics
// are those of the runtime, whose earlier layers are sparse. With --mean-abs-up STATS.gguf (E|u_i|
// of an earlier run) a single pass collects everything but E|u_i|: the converter re-takes each
// level's quantiles that way without moving the per-channel shape of the CHESS thresholds.
//
// Histograms have one bin per bfloat16 value (the top 16 bits of the float), so a quantile taken
// from them is exact up to linear interpolation inside a bin of relative width 2^-7.
//
// Output: a GGUF of F64 tensors (see docs/gguf-format.md, "calibration statistics").
// Progress goes to stderr as lines "progress PASS DONE TOTAL" for the Python front end.

#include "gguf.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"
#include "actsparse.h"
#include "actsparse-schema.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int N_BINS = 1 << 15;  // sign-less bfloat16 bit patterns

enum class activation { silu, gelu };

// The gate's activation computed by ggml's own CPU op (ggml_silu / ggml_gelu), the node the sparse
// runtime thresholds: ggml's GELU reads an fp16 table and its SiLU a vectorised exp, so a formula
// of our own would differ from what the runtime compares with the thresholds.
struct activation_op {
    ggml_context * ctx = nullptr;
    size_t capacity = 0;

    ~activation_op() {
        if (ctx) ggml_free(ctx);
    }

    void apply(activation a, float * x, int64_t ne0, int64_t nrows, int n_threads) {
        const size_t data = 2 * (size_t) (ne0 * nrows) * sizeof(float);
        const size_t need = data + 8 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20);
        if (need > capacity) {
            if (ctx) ggml_free(ctx);
            ctx = ggml_init({ need, nullptr, false });
            capacity = need;
        } else {
            ggml_reset(ctx);
        }
        ggml_tensor * in = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, nrows);
        std::memcpy(in->data, x, ggml_nbytes(in));
        ggml_tensor * out = a == activation::gelu ? ggml_gelu(ctx, in) : ggml_silu(ctx, in);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        std::memcpy(x, out->data, ggml_nbytes(out));
    }
};

struct options {
    std::string model;
    std::string text_file;
    std::string out_file;
    int         n_tokens   = 65536;
    int         window     = 512;
    int         n_threads  = 2;
    bool        chess      = true;
    std::string source;         // name and sha256 of the text, recorded so saved statistics
    std::string source_sha256;  // can be reused by a later conversion without re-reading it
    std::set<int> dump_layers;
    int         dump_tokens = 0;
    float       sparse = 0.0f;        // run at this sparsity level of the model's thresholds (0: dense)
    std::string mean_abs_up_file;     // E|u_i| from these statistics instead of a first pass
};

struct layer_stats {
    std::vector<double> sum_abs_up;         // [n_ff]
    std::vector<double> hist_act;           // |a|
    std::vector<double> hist_score;         // |a| * m
    std::vector<double> hist_q_in;          // |x| entering W_q
    std::vector<double> hist_o_in;          // |x| entering W_o
    std::vector<double> mean_abs_up;        // m_i, fixed after pass 1 (or given)
    std::vector<float>  dump_gate, dump_act, dump_up, dump_q_in, dump_o_in;  // raw rows for tests
    int64_t n_ff = 0, n_q_in = 0, n_o_in = 0;
    int64_t n_tok_up = 0, n_tok_act = 0;
};

struct collector {
    activation act = activation::silu;
    activation_op act_op;
    int pass = 1;
    std::vector<layer_stats> layers;
    const options * opt = nullptr;
    std::vector<float> buf;
    std::string error;
};

inline int bf16_bin(float v) {
    uint32_t bits;
    v = std::fabs(v);
    std::memcpy(&bits, &v, sizeof bits);
    return (int) (bits >> 16) & (N_BINS - 1);
}

bool parse_name(const char * name, const char * prefix, int & il) {
    const size_t n = std::strlen(prefix);
    if (std::strncmp(name, prefix, n) != 0 || name[n] != '-') {
        return false;
    }
    char * end = nullptr;
    const long v = std::strtol(name + n + 1, &end, 10);
    if (end == name + n + 1 || *end != '\0') {
        return false;
    }
    il = (int) v;
    return true;
}

enum class node_kind { none, up, gate, q_in, o_in };

node_kind classify(const char * name, int & il) {
    if (parse_name(name, "ffn_up", il))    return node_kind::up;
    if (parse_name(name, "ffn_gate", il))  return node_kind::gate;
    if (parse_name(name, "attn_norm", il)) return node_kind::q_in;
    if (parse_name(name, "kqv_out", il))   return node_kind::o_in;
    return node_kind::none;
}

// Copies a node's output to host floats (rows of ne[0]) and returns the row count.
int64_t fetch_rows(ggml_tensor * t, std::vector<float> & buf) {
    const int64_t ne0 = t->ne[0];
    const int64_t nrows = ggml_nrows(t);
    buf.resize((size_t) (ne0 * nrows));
    if (ggml_is_contiguous(t)) {
        ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
        return nrows;
    }
    // non-contiguous views: gather row by row (rows themselves are contiguous for these nodes)
    int64_t r = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < t->ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < t->ne[1]; ++i1, ++r) {
                const size_t off = i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
                ggml_backend_tensor_get(t, buf.data() + r * ne0, off, ne0 * sizeof(float));
            }
    return nrows;
}

void add_hist(std::vector<double> & hist, const float * x, int64_t n) {
    if (hist.empty()) hist.assign(N_BINS, 0.0);
    for (int64_t i = 0; i < n; ++i) hist[bf16_bin(x[i])] += 1.0;
}

bool on_node(ggml_tensor * t, bool ask, void * user_data) {
    auto * c = (collector *) user_data;
    int il = -1;
    const node_kind kind = classify(t->name, il);
    if (ask) {
        if (kind == node_kind::none || t->type != GGML_TYPE_F32) return false;
        if (c->pass == 2) return kind == node_kind::gate;
        if (c->pass == 3) return kind != node_kind::up;
        return true;
    }
    if (kind == node_kind::none || il < 0 || il >= (int) c->layers.size() || !c->error.empty()) {
        return true;
    }
    layer_stats & L = c->layers[il];
    const int64_t ne0 = t->ne[0];
    const int64_t nrows = fetch_rows(t, c->buf);
    const float * x = c->buf.data();
    for (int64_t i = 0; i < ne0 * nrows; ++i) {
        if (!std::isfinite(x[i])) {
            c->error = std::string("non-finite activation (NaN or inf) in ") + t->name +
                       ": the model's weights are damaged or overflow";
            return false;
        }
    }

    auto dump = [&](std::vector<float> & dst) {
        if (c->pass != 1 || !c->opt->dump_layers.count(il)) return;
        const int64_t have = (int64_t) dst.size() / ne0;
        const int64_t take = std::min<int64_t>(nrows, c->opt->dump_tokens - have);
        if (take > 0) dst.insert(dst.end(), x, x + take * ne0);
    };

    switch (kind) {
        case node_kind::up: {
            if (L.n_ff == 0) { L.n_ff = ne0; L.sum_abs_up.assign(ne0, 0.0); }
            if (L.n_ff != ne0) { c->error = "inconsistent ffn_up width"; return false; }
            for (int64_t r = 0; r < nrows; ++r)
                for (int64_t i = 0; i < ne0; ++i) L.sum_abs_up[i] += std::fabs(x[r * ne0 + i]);
            L.n_tok_up += nrows;
            dump(L.dump_up);
        } break;
        case node_kind::gate: {
            std::vector<float> & a = c->buf;
            dump(L.dump_gate);  // the pre-activation, before it is overwritten
            c->act_op.apply(c->act, a.data(), ne0, nrows, c->opt->n_threads);
            if (c->pass != 2) {
                add_hist(L.hist_act, a.data(), ne0 * nrows);
                L.n_tok_act += nrows;
                dump(L.dump_act);
            }
            if (c->pass != 1) {
                if ((int64_t) L.mean_abs_up.size() != ne0) { c->error = "ffn_gate/ffn_up width mismatch"; return false; }
                if (L.hist_score.empty()) L.hist_score.assign(N_BINS, 0.0);
                for (int64_t r = 0; r < nrows; ++r)
                    for (int64_t i = 0; i < ne0; ++i)
                        L.hist_score[bf16_bin(a[r * ne0 + i] * (float) L.mean_abs_up[i])] += 1.0;
            }
        } break;
        case node_kind::q_in:
            L.n_q_in = ne0;
            add_hist(L.hist_q_in, x, ne0 * nrows);
            dump(L.dump_q_in);
            break;
        case node_kind::o_in:
            L.n_o_in = ne0;
            add_hist(L.hist_o_in, x, ne0 * nrows);
            dump(L.dump_o_in);
            break;
        default: break;
    }
    return true;
}

[[noreturn]] void die(const std::string & msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(2);
}

void print_usage() {
    std::printf(
        "usage: actsparse-calibrate -m MODEL.gguf -f TEXT -o STATS.gguf [options]\n\n"
        "Runs MODEL on calibration text and writes the activation statistics that CHESS and CATS\n"
        "thresholds are computed from (normally called by convert_with_thresholds.py).\n\n"
        "  -m, --model PATH        GGUF model\n"
        "  -f, --file PATH         calibration text (UTF-8)\n"
        "  -o, --output PATH       statistics GGUF to write\n"
        "  -n, --tokens N          calibration tokens (default 65536)\n"
        "  -c, --window N          tokens per window, each evaluated from an empty cache (default 512)\n"
        "  -t, --threads N         threads (default 2)\n"
        "      --cats-only         skip the second pass (CHESS scores)\n"
        "      --sparse LEVEL      run at this sparsity level of MODEL's thresholds\n"
        "      --mean-abs-up PATH  take E|u_i| from these statistics; one pass collects the rest\n"
        "      --source NAME       name of the calibration text, stored in the statistics\n"
        "      --source-sha256 HEX its sha256, stored in the statistics\n"
        "      --dump-layers L,..  also store raw activations of these layers (for tests)\n"
        "      --dump-tokens N     tokens to store per dumped layer (default 0)\n"
        "  -h, --help              this help\n");
}

int parse_int(const char * flag, const char * v) {
    char * end = nullptr;
    errno = 0;
    const long x = std::strtol(v, &end, 10);
    if (errno || end == v || *end || x < 0 || x > (1L << 30)) die(std::string("invalid value for ") + flag + ": " + v);
    return (int) x;
}

options parse_args(int argc, char ** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) die("missing value for " + a);
            return argv[++i];
        };
        if (a == "-h" || a == "--help") { print_usage(); std::exit(0); }
        else if (a == "-m" || a == "--model") o.model = next();
        else if (a == "-f" || a == "--file") o.text_file = next();
        else if (a == "-o" || a == "--output") o.out_file = next();
        else if (a == "-n" || a == "--tokens") o.n_tokens = parse_int(a.c_str(), next());
        else if (a == "-c" || a == "--window") o.window = parse_int(a.c_str(), next());
        else if (a == "-t" || a == "--threads") o.n_threads = parse_int(a.c_str(), next());
        else if (a == "--cats-only") o.chess = false;
        else if (a == "--mean-abs-up") o.mean_abs_up_file = next();
        else if (a == "--sparse") {
            const char * v = next();
            char * end = nullptr;
            o.sparse = std::strtof(v, &end);
            if (end == v || *end || !(o.sparse > 0.0f && o.sparse < 1.0f)) die(std::string("invalid --sparse level: ") + v);
        }
        else if (a == "--source") o.source = next();
        else if (a == "--source-sha256") o.source_sha256 = next();
        else if (a == "--dump-tokens") o.dump_tokens = parse_int(a.c_str(), next());
        else if (a == "--dump-layers") {
            std::stringstream ss(next());
            std::string item;
            while (std::getline(ss, item, ',')) o.dump_layers.insert(parse_int("--dump-layers", item.c_str()));
        } else die("unknown argument: " + a + " (see --help)");
    }
    if (o.model.empty() || o.text_file.empty() || o.out_file.empty()) die("-m, -f and -o are required (see --help)");
    if (o.window < 2) die("--window must be at least 2");
    if (o.n_threads < 1) die("--threads must be at least 1");
    return o;
}

std::string read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read calibration text " + path);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// The gate's activation of the model's architecture, from the schema's table.
activation activation_for(const llama_model * model) {
    char arch[128] = {0};
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof arch);
    for (const actsparse_arch_activation & a : ACTSPARSE_ARCH_ACTIVATION) {
        if (std::strcmp(a.arch, arch) == 0) {
            return std::strcmp(a.activation, "gelu") == 0 ? activation::gelu : activation::silu;
        }
    }
    die(std::string("unsupported architecture '") + arch + "': no separate gate, up and down projection");
}

void add_f64(gguf_context * g, ggml_context * ctx, const std::string & name, const std::vector<double> & v,
             int64_t ne0, int64_t ne1 = 1) {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F64, ne0, ne1);
    ggml_set_name(t, name.c_str());
    std::memcpy(t->data, v.data(), v.size() * sizeof(double));
    gguf_add_tensor(g, t);
}

void add_f32(gguf_context * g, ggml_context * ctx, const std::string & name, const std::vector<float> & v,
             int64_t ne0) {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, (int64_t) v.size() / ne0);
    ggml_set_name(t, name.c_str());
    std::memcpy(t->data, v.data(), v.size() * sizeof(float));
    gguf_add_tensor(g, t);
}

void write_stats(const collector & c, const options & o, int64_t n_tokens_done, int n_windows, const std::string & path) {
    size_t bytes = 1 << 20;
    for (const auto & L : c.layers) {
        bytes += (L.sum_abs_up.size() + 4 * (size_t) N_BINS) * sizeof(double) + 1024;
        bytes += (L.dump_gate.size() + L.dump_act.size() + L.dump_up.size() + L.dump_q_in.size() + L.dump_o_in.size()) * sizeof(float) + 1024;
    }
    ggml_init_params ip = { bytes, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    gguf_context * g = gguf_init_empty();
    gguf_set_val_u32(g, "actsparse.stats.version", 1);
    gguf_set_val_str(g, "actsparse.stats.activation", c.act == activation::silu ? "silu" : "gelu");
    gguf_set_val_u64(g, "actsparse.stats.tokens", (uint64_t) n_tokens_done);
    gguf_set_val_u32(g, "actsparse.stats.windows", (uint32_t) n_windows);
    gguf_set_val_u32(g, "actsparse.stats.window", (uint32_t) o.window);
    gguf_set_val_u32(g, "actsparse.stats.n_layer", (uint32_t) c.layers.size());
    gguf_set_val_bool(g, "actsparse.stats.has_scores", o.chess);
    gguf_set_val_str(g, "actsparse.stats.source", o.source.c_str());
    gguf_set_val_str(g, "actsparse.stats.source_sha256", o.source_sha256.c_str());
    gguf_set_val_f32(g, "actsparse.stats.sparse_level", o.sparse);
    for (size_t il = 0; il < c.layers.size(); ++il) {
        const layer_stats & L = c.layers[il];
        const std::string p = "blk." + std::to_string(il) + ".";
        if (L.n_ff > 0) {
            std::vector<double> m(L.sum_abs_up.size());
            for (size_t i = 0; i < m.size(); ++i) m[i] = L.sum_abs_up[i] / (double) std::max<int64_t>(1, L.n_tok_up);
            add_f64(g, ctx, p + "ffn_up_mean_abs", o.mean_abs_up_file.empty() ? m : L.mean_abs_up, L.n_ff);
        }
        if (!L.hist_act.empty())   add_f64(g, ctx, p + "ffn_act_hist", L.hist_act, N_BINS);
        if (!L.hist_score.empty()) add_f64(g, ctx, p + "ffn_score_hist", L.hist_score, N_BINS);
        if (!L.hist_q_in.empty())  add_f64(g, ctx, p + "attn_q_in_hist", L.hist_q_in, N_BINS);
        if (!L.hist_o_in.empty())  add_f64(g, ctx, p + "attn_o_in_hist", L.hist_o_in, N_BINS);
        if (!L.dump_gate.empty())  add_f32(g, ctx, p + "dump.ffn_gate", L.dump_gate, L.n_ff);
        if (!L.dump_act.empty())   add_f32(g, ctx, p + "dump.ffn_act", L.dump_act, L.n_ff);
        if (!L.dump_up.empty())    add_f32(g, ctx, p + "dump.ffn_up", L.dump_up, L.n_ff);
        if (!L.dump_q_in.empty())  add_f32(g, ctx, p + "dump.attn_q_in", L.dump_q_in, L.n_q_in);
        if (!L.dump_o_in.empty())  add_f32(g, ctx, p + "dump.attn_o_in", L.dump_o_in, L.n_o_in);
    }
    const std::string tmp = path + ".tmp";
    if (!gguf_write_to_file(g, tmp.c_str(), false)) {
        std::remove(tmp.c_str());
        die("cannot write " + path);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        die("cannot rename " + tmp + " to " + path);
    }
    gguf_free(g);
    ggml_free(ctx);
}

// E|u_i| per layer from a statistics GGUF written by an earlier run.
void load_mean_abs_up(const std::string & path, std::vector<layer_stats> & layers) {
    ggml_context * data = nullptr;
    gguf_init_params gp = { false, &data };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) die("cannot read statistics " + path);
    for (size_t il = 0; il < layers.size(); ++il) {
        const std::string name = "blk." + std::to_string(il) + ".ffn_up_mean_abs";
        const ggml_tensor * t = ggml_get_tensor(data, name.c_str());
        if (!t || t->type != GGML_TYPE_F64) die(path + ": tensor '" + name + "' is missing or not F64");
        layer_stats & L = layers[il];
        L.n_ff = t->ne[0];
        L.mean_abs_up.assign((const double *) t->data, (const double *) t->data + t->ne[0]);
        L.sum_abs_up = L.mean_abs_up;
        L.n_tok_up = 1;
    }
    gguf_free(g);
    ggml_free(data);
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char ** argv) {
    const options o = parse_args(argc, argv);
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    // ffn_up in plain rows, as the sparse runtime loads it: the statistics see its products
    llama_model_kv_override overrides[2] = {};
    std::snprintf(overrides[0].key, sizeof overrides[0].key, "%s", ACTSPARSE_KEY_PLAIN_UP_ROWS);
    overrides[0].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
    overrides[0].val_bool = true;
    mp.kv_overrides = overrides;
    llama_model * model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!model) die("cannot load model " + o.model);
    const llama_vocab * vocab = llama_model_get_vocab(model);

    const std::string text = read_file(o.text_file);
    std::vector<llama_token> tokens(text.size() + 16);
    int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), false, false);
    if (n < 0) die("tokenization failed");
    tokens.resize(n);

    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const int per_window = o.window - (add_bos ? 1 : 0);
    const int64_t n_available = (int64_t) tokens.size() / per_window;
    const int n_windows = (int) std::min<int64_t>(n_available, (o.n_tokens + o.window - 1) / o.window);
    if (n_windows < 1) {
        die("calibration text has " + std::to_string(tokens.size()) + " tokens, shorter than one window of " +
            std::to_string(o.window));
    }

    collector c;
    c.opt = &o;
    c.act = activation_for(model);
    c.layers.resize(llama_model_n_layer(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = o.window;
    cp.n_batch = o.window;
    cp.n_ubatch = o.window;
    cp.n_threads = o.n_threads;
    cp.n_threads_batch = o.n_threads;
    cp.cb_eval = on_node;
    cp.cb_eval_user_data = &c;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create a context");
    if (o.sparse > 0.0f) {
        char err[512] = {0};
        if (actsparse_set_sparse(ctx, o.sparse, err, sizeof err) != 0) die(err);
    }

    // pass numbers: 1 = E|u|, |a| and attention inputs; 2 = CHESS scores; 3 = both of those but E|u|
    std::vector<int> passes = { 1 };
    if (!o.mean_abs_up_file.empty()) {
        load_mean_abs_up(o.mean_abs_up_file, c.layers);
        passes = { 3 };
    } else if (o.chess) {
        passes = { 1, 2 };
    }
    int64_t total_tokens = (int64_t) n_windows * o.window;
    std::vector<llama_token> win(o.window);
    llama_batch batch = llama_batch_init(o.window, 0, 1);
    for (size_t ip = 0; ip < passes.size(); ++ip) {
        const int pass = passes[ip];
        c.pass = pass;
        if (pass == 2) {
            for (auto & L : c.layers) {
                L.mean_abs_up.resize(L.sum_abs_up.size());
                for (size_t i = 0; i < L.sum_abs_up.size(); ++i)
                    L.mean_abs_up[i] = L.sum_abs_up[i] / (double) std::max<int64_t>(1, L.n_tok_up);
            }
        }
        for (int w = 0; w < n_windows; ++w) {
            int k = 0;
            if (add_bos) win[k++] = llama_vocab_bos(vocab);
            // windows spread evenly over the whole text, not its first n_tokens: a corpus (or a
            // user's file) ordered by source or topic is then sampled across all of them
            const int64_t slot = (int64_t) w * n_available / n_windows;
            std::memcpy(win.data() + k, tokens.data() + (size_t) slot * per_window, per_window * sizeof(llama_token));
            // every position requests its logits: otherwise llama.cpp computes the last layer's FFN
            // for the final token only, and that layer's statistics would miss the others
            batch.n_tokens = o.window;
            for (int i = 0; i < o.window; ++i) {
                batch.token[i] = win[i];
                batch.pos[i] = i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = 0;
                batch.logits[i] = 1;
            }
            llama_memory_clear(llama_get_memory(ctx), true);
            const int rc = llama_decode(ctx, batch);
            if (!c.error.empty()) die(c.error);  // the callback's reason beats decode's status
            if (rc != 0) die("llama_decode failed (" + std::to_string(rc) + ")");
            std::fprintf(stderr, "progress %d %lld %lld\n", (int) ip + 1, (long long) (w + 1) * o.window,
                         (long long) total_tokens);
            std::fflush(stderr);
        }
    }
    for (size_t il = 0; il < c.layers.size(); ++il) {
        if (c.layers[il].n_ff == 0 || c.layers[il].n_tok_act == 0) {
            die("layer " + std::to_string(il) + " has no ffn_up/ffn_gate activations (not a gated FFN?)");
        }
    }
    write_stats(c, o, total_tokens, n_windows, o.out_file);

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
