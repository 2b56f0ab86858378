// actsparse-calibrate: collects the activation statistics that CHESS/CATS thresholds are computed
// from, by running a GGUF model on calibration text in this llama.cpp build (in the manner of
// llama-imatrix: an eval callback reads the graph's named intermediate tensors).
//
// One pass over the text collects, per layer: sum |u_i| per FFN channel (u = W_up x, "ffn_up-N"),
// the histogram of |a| (a = act(W_gate x), "ffn_gate-N" through the activation), histograms of |x|
// at the input of W_q ("attn_norm-N") and of W_o ("kqv_out-N"), and for CHESS a coarse histogram of
// |a_i| per channel. The CHESS score |a_i| * E|u_i| needs E|u_i|, known only at the end: its
// histogram is then built from the per-channel ones (see score_hist_from_channels).
//
// --sparse LEVEL runs a model that carries thresholds at that level, so that each layer's statistics
// are those of the runtime, whose earlier layers are sparse. With --mean-abs-up STATS.gguf (E|u_i|
// of an earlier run) the score histogram is collected directly: the converter re-takes each
// level's quantiles that way without moving the per-channel shape of the CHESS thresholds.
//
// --column-norms NORMS.gguf makes the scores weight-aware: each input's magnitude times the norm of
// the weight column it multiplies (|a_i| E|u_i| ||W_down[:, i]||, |x_i| ||W_q[:, i]||, ...), which
// measures the output an input moves rather than its size alone (WINA, R-Sparse).
// Norms of the R-Sparse kinds (attn_k_in, attn_v_in, ffn_gate_in, ffn_up_in, ffn_down_in) add a
// histogram of those scores each, at the projection's input ("attn_norm-N", "ffn_norm-N",
// "ffn_swiglu-N" or "ffn_geglu-N").
//
// Histograms have one bin per bfloat16 value (the top 16 bits of the float), so a quantile taken
// from them is exact up to linear interpolation inside a bin of relative width 2^-7.
//
// The graph is cut after the last layer's statistics: no output layer and no logits are computed.
//
// Output: a GGUF of F64 tensors (see docs/gguf-format.md, "calibration statistics").
// Progress goes to stderr as lines "progress DONE TOTAL" for the Python front end.

#include "gguf.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"
#include "actsparse.h"
#include "actsparse-schema.h"
#include "actsparse-common.h"
#include "arg.h"
#include "common.h"

#include <cerrno>
#include <clocale>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>
#include <atomic>
#include <algorithm>

namespace {

constexpr int N_BINS = 1 << 15;  // sign-less bfloat16 bit patterns
constexpr int64_t LOGITS_BUDGET = 128ll << 20;  // bytes of logits per decode (the chunk size follows)

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

// The calibrator's own options; the rest (-m, -f, -o, -c, -t, -ub, --sparse, ...) are llama.cpp's
// common ones, in common_params.
struct options {
    int         n_tokens   = 65536;
    int         window     = 512;   // -c
    int         n_threads  = 2;     // -t
    bool        chess      = true;
    std::string source;         // name and sha256 of the text, recorded so saved statistics
    std::string source_sha256;  // can be reused by a later conversion without re-reading it
    std::set<int> dump_layers;
    int         dump_tokens = 0;
    float       sparse = 0.0f;        // the level the model runs at (0: dense)
    std::string mean_abs_up_file;     // E|u_i| from these statistics: the scores collected directly
    std::string column_norms_file;    // ||W[:, i]||: the scores weighted by the weight column each input reads
};

enum class node_kind { none, up, gate, q_in, o_in, ffn_in, down_in };

// A histogram of |x_i| ||W[:, i]|| at the input of one projection (an R-Sparse kind).
struct input_hist {
    std::string kind;  // its name in ACTSPARSE_KINDS
    node_kind node;
    std::vector<float> norm;
    std::vector<double> hist;
};

struct layer_stats {
    std::vector<double> sum_abs_up;         // [n_ff]
    std::vector<double> hist_act;           // |a|
    std::vector<double> hist_score;         // |a| * m
    std::vector<double> hist_q_in;          // |x| entering W_q
    std::vector<double> hist_o_in;          // |x| entering W_o
    std::vector<uint32_t> channel_hist;     // [n_ff][CHANNEL_BINS] of |a_i| (CHESS, one pass)
    std::vector<double> mean_abs_up;        // m_i, given by --mean-abs-up
    // --column-norms: ||W_down[:, i]||, ||W_q[:, i]||, ||W_o[:, i]|| (empty: unweighted scores)
    std::vector<float> norm_ffn, norm_q_in, norm_o_in;
    std::vector<double> score_scale;        // m_i (times norm_ffn_i): the CHESS score's factor on |a_i|
    std::vector<float>  dump_gate, dump_act, dump_up, dump_q_in, dump_o_in;  // raw rows (tests, the low-rank search)
    std::vector<float>  dump_ffn_in, dump_down_in;  // the FFN's input and W_down's (R-Sparse's nodes)
    std::vector<input_hist> inputs;  // the R-Sparse kinds' weighted score histograms
    int64_t n_ff = 0, n_q_in = 0, n_o_in = 0, n_ffn_in = 0;
    int64_t n_tok_up = 0, n_tok_act = 0;
};

// What the pass collects: everything from the dense model, or (--mean-abs-up) everything but E|u_i|.
enum class pass_kind { dense, given_mean_abs_up };

struct collector {
    activation act = activation::silu;
    activation_op act_op;
    pass_kind pass = pass_kind::dense;
    std::vector<layer_stats> layers;
    const options * opt = nullptr;
    std::vector<float> buf;
    std::string error;
    int last_layer_seen = 0;  // kinds of the last layer seen in this batch (a bit each)
};

inline int bf16_bin(float v) {
    uint32_t bits;
    v = std::fabs(v);
    std::memcpy(&bits, &v, sizeof bits);
    return (int) (bits >> 16) & (N_BINS - 1);
}

inline double bf16_edge(int bin) {  // lower edge of a bf16 bin
    const uint32_t bits = (uint32_t) bin << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// Per-channel histograms of |a_i|: 8 bins per octave (the float's exponent and top 3 mantissa
// bits) from 2^-20 to 2^12. Smaller values share bin 0, larger ones the last bin.
constexpr int CHANNEL_FIRST = (127 - 20) << 3;
constexpr int CHANNEL_BINS = 32 << 3;

// The fine (bf16) bins a channel bin covers: [first, end).
inline int channel_bin_first_fine(int bin) { return bin == 0 ? 0 : (bin + CHANNEL_FIRST) << 4; }
inline int channel_bin_end_fine(int bin) {
    return bin == CHANNEL_BINS - 1 ? 0x7F80 : (bin + 1 + CHANNEL_FIRST) << 4;  // 0x7F80: +inf
}

// Adds `count` values spread uniformly over [lo, hi) to a bf16 histogram.
void spread(std::vector<double> & hist, double lo, double hi, double count) {
    if (!(hi > lo)) { hist[bf16_bin((float) lo)] += count; return; }
    const double per_unit = count / (hi - lo);
    for (int f = bf16_bin((float) lo); f < N_BINS - 1; ++f) {
        const double e0 = bf16_edge(f), e1 = bf16_edge(f + 1);
        const double overlap = std::min(hi, e1) - std::max(lo, e0);
        if (overlap > 0) hist[f] += overlap * per_unit;
        if (e1 >= hi) break;
    }
}

// The histogram of the scores |a_i| * m_i, from the per-channel histograms of |a_i|. Inside a
// channel bin, the channel's values are taken to be distributed as the whole layer's are (the fine
// histogram of |a|): the activation shapes every channel alike (SiLU piles |a| up near 0.278, its
// minimum), which a uniform density inside a coarse bin would miss. Each fine bin's share is then
// spread uniformly over its range times m_i.
void score_hist_from_channels(const std::vector<uint32_t> & channel_hist, const std::vector<double> & m,
                              const std::vector<double> & act_hist, std::vector<double> & score) {
    struct share { int fine; double weight; };
    std::vector<std::vector<share>> shares(CHANNEL_BINS);
    for (int b = 0; b < CHANNEL_BINS; ++b) {
        double total = 0.0;
        for (int f = channel_bin_first_fine(b); f < channel_bin_end_fine(b); ++f) total += act_hist[f];
        for (int f = channel_bin_first_fine(b); f < channel_bin_end_fine(b); ++f)
            if (act_hist[f] > 0) shares[b].push_back({ f, act_hist[f] / total });
    }
    score.assign(N_BINS, 0.0);
    for (size_t i = 0; i < m.size(); ++i) {
        const uint32_t * h = channel_hist.data() + i * CHANNEL_BINS;
        for (int b = 0; b < CHANNEL_BINS; ++b) {
            if (!h[b]) continue;
            for (const share & sh : shares[b])
                spread(score, bf16_edge(sh.fine) * m[i], bf16_edge(sh.fine + 1) * m[i], h[b] * sh.weight);
        }
    }
}

// Runs fn(begin, end) over [0, n) split among n_threads threads (the collector's work on a batch's
// activations while ggml's own threads wait between graph parts).
template <typename F> void parallel_for(int n_threads, int64_t n, F && fn, int64_t min_per_thread = 64) {
    n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, n / min_per_thread));
    if (n_threads == 1) { fn((int64_t) 0, n); return; }
    std::vector<std::thread> workers;
    for (int t = 1; t < n_threads; ++t) workers.emplace_back(fn, n * t / n_threads, n * (t + 1) / n_threads);
    fn((int64_t) 0, n / n_threads);
    for (auto & w : workers) w.join();
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

node_kind classify(const char * name, int & il) {
    if (parse_name(name, "ffn_up", il))    return node_kind::up;
    if (parse_name(name, "ffn_gate", il))  return node_kind::gate;
    if (parse_name(name, "attn_norm", il)) return node_kind::q_in;
    if (parse_name(name, "kqv_out", il))   return node_kind::o_in;
    if (parse_name(name, "ffn_norm", il))  return node_kind::ffn_in;
    if (parse_name(name, "ffn_swiglu", il) || parse_name(name, "ffn_geglu", il)) return node_kind::down_in;
    return node_kind::none;
}

// The nodes the R-Sparse kinds' histograms read, beyond those every pass reads (a bit each).
int g_input_nodes = 0;

bool wanted(pass_kind pass, node_kind kind) {
    if (kind == node_kind::ffn_in || kind == node_kind::down_in) return (g_input_nodes >> (int) kind) & 1;
    return kind != node_kind::none && (pass == pass_kind::dense || kind != node_kind::up);
}

int kind_bit(node_kind kind) { return 1 << (int) kind; }

int wanted_bits(pass_kind pass) {
    int bits = 0;
    for (node_kind k : { node_kind::up, node_kind::gate, node_kind::q_in, node_kind::o_in, node_kind::ffn_in, node_kind::down_in })
        if (wanted(pass, k)) bits |= kind_bit(k);
    return bits;
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

// The histogram of |x_i| * w_i over rows of ne0 inputs (w empty: of |x_i|).
void add_weighted_hist(std::vector<double> & hist, const float * x, int64_t ne0, int64_t nrows,
                       const std::vector<float> & w) {
    if (w.empty()) { add_hist(hist, x, ne0 * nrows); return; }
    if (hist.empty()) hist.assign(N_BINS, 0.0);
    for (int64_t r = 0; r < nrows; ++r)
        for (int64_t i = 0; i < ne0; ++i) hist[bf16_bin(x[r * ne0 + i] * w[i])] += 1.0;
}

// Channels are visited in blocks, so that a block's histograms stay in cache over the rows.
constexpr int64_t CHANNEL_BLOCK = 64;

// The channel bin of a value from its fine (bf16) bin: the same bits, 4 fewer mantissa bits.
inline int channel_bin_of_fine(int fine) {
    const int b = (fine >> 4) - CHANNEL_FIRST;
    return b < 0 ? 0 : (b >= CHANNEL_BINS ? CHANNEL_BINS - 1 : b);
}

enum class gate_mode { act, per_channel, scores };

// Channels [i0, i1) of every row, in blocks whose histograms stay in cache over the rows.
template <gate_mode mode>
void gate_block(layer_stats & L, const float * a, int64_t ne0, int64_t nrows, int64_t i0, int64_t i1,
                uint32_t * act, uint32_t * score) {
    for (int64_t j0 = i0; j0 < i1; j0 += CHANNEL_BLOCK) {
        const int64_t j1 = std::min(i1, j0 + CHANNEL_BLOCK);
        for (int64_t r = 0; r < nrows; ++r) {
            const float * row = a + r * ne0;
            for (int64_t i = j0; i < j1; ++i) {
                const int fine = bf16_bin(row[i]);
                ++act[fine];
                if (mode == gate_mode::per_channel) {
                    ++L.channel_hist[(size_t) i * CHANNEL_BINS + channel_bin_of_fine(fine)];
                } else if (mode == gate_mode::scores) {
                    ++score[bf16_bin(row[i] * (float) L.score_scale[i])];
                }
            }
        }
    }
}

void add_gate_stats(collector & c, layer_stats & L, const float * a, int64_t ne0, int64_t nrows) {
    const gate_mode mode = !c.opt->chess ? gate_mode::act
                         : c.pass == pass_kind::dense ? gate_mode::per_channel : gate_mode::scores;
    if (mode == gate_mode::per_channel && L.channel_hist.empty()) L.channel_hist.assign((size_t) ne0 * CHANNEL_BINS, 0);
    if (L.hist_act.empty()) L.hist_act.assign(N_BINS, 0.0);
    if (mode == gate_mode::scores && L.hist_score.empty()) L.hist_score.assign(N_BINS, 0.0);
    const int64_t n_blocks = (ne0 + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
    const int n_threads = c.opt->n_threads;
    // per-thread counts (a batch holds fewer than 2^32 values), added into the layer's at the end
    std::vector<std::vector<uint32_t>> act_part(n_threads), score_part(n_threads);
    std::atomic<int> next_part{0};
    parallel_for(n_threads, n_blocks, [&](int64_t b0, int64_t b1) {
        const int part = next_part++;
        act_part[part].assign(N_BINS, 0);
        if (mode == gate_mode::scores) score_part[part].assign(N_BINS, 0);
        const int64_t i0 = b0 * CHANNEL_BLOCK, i1 = std::min(ne0, b1 * CHANNEL_BLOCK);
        uint32_t * act = act_part[part].data();
        uint32_t * score = score_part[part].data();
        switch (mode) {
            case gate_mode::act:         gate_block<gate_mode::act>(L, a, ne0, nrows, i0, i1, act, score); break;
            case gate_mode::per_channel: gate_block<gate_mode::per_channel>(L, a, ne0, nrows, i0, i1, act, score); break;
            case gate_mode::scores:      gate_block<gate_mode::scores>(L, a, ne0, nrows, i0, i1, act, score); break;
        }
    });
    for (int p = 0; p < next_part; ++p)
        for (int k = 0; k < N_BINS; ++k) {
            L.hist_act[k] += act_part[p][k];
            if (mode == gate_mode::scores) L.hist_score[k] += score_part[p][k];
        }
    L.n_tok_act += nrows;
}

void add_up_stats(collector & c, layer_stats & L, const float * u, int64_t ne0, int64_t nrows) {
    if (L.n_ff == 0) { L.n_ff = ne0; L.sum_abs_up.assign(ne0, 0.0); }
    parallel_for(c.opt->n_threads, ne0, [&](int64_t i0, int64_t i1) {
        for (int64_t r = 0; r < nrows; ++r)
            for (int64_t i = i0; i < i1; ++i) L.sum_abs_up[i] += std::fabs(u[r * ne0 + i]);
    });
    L.n_tok_up += nrows;
}

bool on_node(ggml_tensor * t, bool ask, void * user_data) {
    auto * c = (collector *) user_data;
    int il = -1;
    const node_kind kind = classify(t->name, il);
    if (ask) {
        return t->type == GGML_TYPE_F32 && wanted(c->pass, kind);
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
        if (c->pass != pass_kind::dense || !c->opt->dump_layers.count(il)) return;
        const int64_t have = (int64_t) dst.size() / ne0;
        const int64_t take = std::min<int64_t>(nrows, c->opt->dump_tokens - have);
        if (take > 0) dst.insert(dst.end(), x, x + take * ne0);
    };

    switch (kind) {
        case node_kind::up:
            if (L.n_ff != 0 && L.n_ff != ne0) { c->error = "inconsistent ffn_up width"; return false; }
            add_up_stats(*c, L, x, ne0, nrows);
            dump(L.dump_up);
            break;
        case node_kind::gate: {
            std::vector<float> & a = c->buf;
            dump(L.dump_gate);  // the pre-activation, before it is overwritten
            c->act_op.apply(c->act, a.data(), ne0, nrows, c->opt->n_threads);
            if (c->pass == pass_kind::given_mean_abs_up && c->opt->chess && (int64_t) L.mean_abs_up.size() != ne0) {
                c->error = "ffn_gate/ffn_up width mismatch";
                return false;
            }
            add_gate_stats(*c, L, a.data(), ne0, nrows);
            dump(L.dump_act);
        } break;
        case node_kind::q_in:
            L.n_q_in = ne0;
            if (!L.norm_q_in.empty() && (int64_t) L.norm_q_in.size() != ne0) { c->error = "attn_q column norms width mismatch"; return false; }
            add_weighted_hist(L.hist_q_in, x, ne0, nrows, L.norm_q_in);
            dump(L.dump_q_in);
            break;
        case node_kind::o_in:
            L.n_o_in = ne0;
            if (!L.norm_o_in.empty() && (int64_t) L.norm_o_in.size() != ne0) { c->error = "attn_output column norms width mismatch"; return false; }
            add_weighted_hist(L.hist_o_in, x, ne0, nrows, L.norm_o_in);
            dump(L.dump_o_in);
            break;
        case node_kind::ffn_in:
            L.n_ffn_in = ne0;
            dump(L.dump_ffn_in);
            break;
        case node_kind::down_in:
            dump(L.dump_down_in);
            break;
        default: break;
    }
    for (input_hist & h : L.inputs) {
        if (h.node != kind) continue;
        if ((int64_t) h.norm.size() != ne0) { c->error = h.kind + " column norms width mismatch"; return false; }
        add_weighted_hist(h.hist, x, ne0, nrows, h.norm);
    }
    // the rest of the graph (the output layer and its logits) computes nothing the statistics use
    if (il == (int) c->layers.size() - 1) {
        c->last_layer_seen |= kind_bit(kind);
        if (c->last_layer_seen == wanted_bits(c->pass)) return false;
    }
    return true;
}

[[noreturn]] void fail(const std::string & msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(2);
}

void print_usage(int, char ** argv) {
    std::printf(
        "\nusage: %s -m MODEL.gguf -f TEXT -o STATS.gguf [--calib-tokens N] [-c WINDOW] [-t N] [options]\n\n"
        "Runs MODEL on calibration text and writes the activation statistics that CHESS and CATS\n"
        "thresholds are computed from (normally called by convert_with_thresholds.py). Windows of -c\n"
        "tokens (default 512), each from an empty cache, are spread evenly over the text.\n\n",
        argv[0]);
}

options g_opt;  // filled by the parser's handlers (plain function pointers)

int parse_count(const std::string & flag, const std::string & v) {
    char * end = nullptr;
    errno = 0;
    const long x = std::strtol(v.c_str(), &end, 10);
    if (errno || end == v.c_str() || *end || x < 0 || x > (1L << 30)) {
        throw std::invalid_argument("invalid value for " + flag + ": " + v);
    }
    return (int) x;
}

std::vector<common_arg> calibrator_args() {
    std::vector<common_arg> args;
    args.emplace_back(common_arg({ "--calib-tokens" }, "N", "calibration tokens (default 65536)",
        [](common_params &, const std::string & v) { g_opt.n_tokens = parse_count("--calib-tokens", v); }));
    args.emplace_back(common_arg({ "--cats-only" }, "no CHESS scores (CATS needs only |a|)",
        [](common_params &) { g_opt.chess = false; }));
    args.emplace_back(common_arg({ "--mean-abs-up" }, "PATH",
        "take E|u_i| from these statistics and collect the CHESS scores directly",
        [](common_params &, const std::string & v) { g_opt.mean_abs_up_file = v; }));
    args.emplace_back(common_arg({ "--column-norms" }, "PATH",
        "weight-aware scores: each input's magnitude times the norm of the weight column it reads, from the "
        "blk.N.KIND_col_norm tensors of PATH (written by convert_with_thresholds.py; KIND as ACTSPARSE_KINDS names it)",
        [](common_params &, const std::string & v) { g_opt.column_norms_file = v; }));
    args.emplace_back(common_arg({ "--source" }, "NAME", "name of the calibration text, stored in the statistics",
        [](common_params &, const std::string & v) { g_opt.source = v; }));
    args.emplace_back(common_arg({ "--source-sha256" }, "HEX", "its sha256, stored in the statistics",
        [](common_params &, const std::string & v) { g_opt.source_sha256 = v; }));
    args.emplace_back(common_arg({ "--dump-layers" }, "L,...", "also store raw activations of these layers (tests)",
        [](common_params &, const std::string & v) {
            std::stringstream ss(v);
            std::string item;
            while (std::getline(ss, item, ',')) g_opt.dump_layers.insert(parse_count("--dump-layers", item));
        }));
    args.emplace_back(common_arg({ "--dump-tokens" }, "N", "tokens to store per dumped layer (default 0)",
        [](common_params &, const std::string & v) { g_opt.dump_tokens = parse_count("--dump-tokens", v); }));
    return args;
}

// ffn_up in plain rows, as the sparse runtime loads it: the statistics see its products. Set after
// parsing (a dense --sparse 0 turns it off), before the list's terminator.
void require_plain_up_rows(common_params & params) {
    auto & ovs = params.kv_overrides;
    ovs.erase(std::remove_if(ovs.begin(), ovs.end(),
                             [](const llama_model_kv_override & o) {
                                 return o.key[0] == 0 || std::strcmp(o.key, ACTSPARSE_KEY_PLAIN_UP_ROWS) == 0;
                             }),
              ovs.end());
    llama_model_kv_override o = {};
    std::snprintf(o.key, sizeof o.key, "%s", ACTSPARSE_KEY_PLAIN_UP_ROWS);
    o.tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
    o.val_bool = true;
    ovs.push_back(o);
    ovs.emplace_back();
    ovs.back().key[0] = 0;
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
    fail(std::string("unsupported architecture '") + arch + "': no separate gate, up and down projection");
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
        bytes += (L.dump_gate.size() + L.dump_act.size() + L.dump_up.size() + L.dump_q_in.size() + L.dump_o_in.size() +
                  L.dump_ffn_in.size() + L.dump_down_in.size()) * sizeof(float) + 2 * 1024;
        bytes += (L.norm_ffn.size() + L.norm_q_in.size() + L.norm_o_in.size()) * sizeof(float) + 3 * 1024;
        for (const input_hist & h : L.inputs) bytes += N_BINS * sizeof(double) + h.norm.size() * sizeof(float) + 2 * 1024;
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
    gguf_set_val_bool(g, "actsparse.stats.column_norms", !o.column_norms_file.empty());
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
        if (!L.norm_ffn.empty())   add_f32(g, ctx, p + "ffn_col_norm", L.norm_ffn, (int64_t) L.norm_ffn.size());
        if (!L.norm_q_in.empty())  add_f32(g, ctx, p + "attn_q_in_col_norm", L.norm_q_in, (int64_t) L.norm_q_in.size());
        if (!L.norm_o_in.empty())  add_f32(g, ctx, p + "attn_o_in_col_norm", L.norm_o_in, (int64_t) L.norm_o_in.size());
        for (const input_hist & h : L.inputs) {
            if (!h.hist.empty()) add_f64(g, ctx, p + h.kind + "_hist", h.hist, N_BINS);
            add_f32(g, ctx, p + h.kind + "_col_norm", h.norm, (int64_t) h.norm.size());
        }
        if (!L.dump_gate.empty())  add_f32(g, ctx, p + "dump.ffn_gate", L.dump_gate, L.n_ff);
        if (!L.dump_act.empty())   add_f32(g, ctx, p + "dump.ffn_act", L.dump_act, L.n_ff);
        if (!L.dump_up.empty())    add_f32(g, ctx, p + "dump.ffn_up", L.dump_up, L.n_ff);
        if (!L.dump_q_in.empty())  add_f32(g, ctx, p + "dump.attn_q_in", L.dump_q_in, L.n_q_in);
        if (!L.dump_o_in.empty())  add_f32(g, ctx, p + "dump.attn_o_in", L.dump_o_in, L.n_o_in);
        if (!L.dump_ffn_in.empty()) add_f32(g, ctx, p + "dump.ffn_in", L.dump_ffn_in, L.n_ffn_in);
        if (!L.dump_down_in.empty()) add_f32(g, ctx, p + "dump.ffn_down_in", L.dump_down_in, L.n_ff);
    }
    const std::string tmp = path + ".tmp";
    if (!gguf_write_to_file(g, tmp.c_str(), false)) {
        std::remove(tmp.c_str());
        fail("cannot write " + path);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail("cannot rename " + tmp + " to " + path);
    }
    gguf_free(g);
    ggml_free(ctx);
}

// E|u_i| per layer from a statistics GGUF written by an earlier run.
void load_mean_abs_up(const std::string & path, std::vector<layer_stats> & layers) {
    ggml_context * data = nullptr;
    gguf_init_params gp = { false, &data };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) fail("cannot read statistics " + path);
    for (size_t il = 0; il < layers.size(); ++il) {
        const std::string name = "blk." + std::to_string(il) + ".ffn_up_mean_abs";
        const ggml_tensor * t = ggml_get_tensor(data, name.c_str());
        if (!t || t->type != GGML_TYPE_F64) fail(path + ": tensor '" + name + "' is missing or not F64");
        layer_stats & L = layers[il];
        L.n_ff = t->ne[0];
        L.mean_abs_up.assign((const double *) t->data, (const double *) t->data + t->ne[0]);
        L.sum_abs_up = L.mean_abs_up;
        L.n_tok_up = 1;
    }
    gguf_free(g);
    ggml_free(data);
}

// The weight column norms per layer and kind, from a GGUF of F32 vectors (--column-norms).
void load_column_norms(const std::string & path, std::vector<layer_stats> & layers) {
    ggml_context * data = nullptr;
    gguf_init_params gp = { false, &data };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) fail("cannot read column norms " + path);
    int found = 0;
    // the R-Sparse kinds, each at the node that is its projection's input
    const std::pair<int, node_kind> input_kinds[] = {
        { ACTSPARSE_KIND_K, node_kind::q_in },         { ACTSPARSE_KIND_V, node_kind::q_in },
        { ACTSPARSE_KIND_GATE_IN, node_kind::ffn_in }, { ACTSPARSE_KIND_UP_IN, node_kind::ffn_in },
        { ACTSPARSE_KIND_DOWN_IN, node_kind::down_in },
    };
    for (size_t il = 0; il < layers.size(); ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        layer_stats & L = layers[il];
        auto norms = [&](const std::string & kind, std::vector<float> & dst) {
            const std::string name = p + kind + "_col_norm";
            const ggml_tensor * t = ggml_get_tensor(data, name.c_str());
            if (!t) return false;
            if (t->type != GGML_TYPE_F32 || ggml_nrows(t) != 1) fail(path + ": tensor '" + name + "' is not an F32 vector");
            const float * v = (const float *) t->data;
            for (int64_t i = 0; i < t->ne[0]; ++i) {
                if (!std::isfinite(v[i]) || v[i] < 0) fail(path + ": tensor '" + name + "' has a negative or non-finite norm");
            }
            dst.assign(v, v + t->ne[0]);
            ++found;
            return true;
        };
        norms("ffn", L.norm_ffn);
        norms("attn_q_in", L.norm_q_in);
        norms("attn_o_in", L.norm_o_in);
        for (auto [k, node] : input_kinds) {
            input_hist h{ ACTSPARSE_KINDS[k].name, node, {}, {} };
            if (!norms(h.kind, h.norm)) continue;
            g_input_nodes |= 1 << (int) node;
            L.inputs.push_back(std::move(h));
        }
    }
    if (!found) fail(path + " holds no blk.N.*_col_norm tensors");
    gguf_free(g);
    ggml_free(data);
}

// The factor on |a_i| of the CHESS score: m_i, times ||W_down[:, i]|| with --column-norms.
void set_score_scale(layer_stats & L) {
    L.score_scale = L.mean_abs_up;
    if (L.norm_ffn.empty()) return;
    if (L.norm_ffn.size() != L.score_scale.size()) fail("ffn_down column norms do not match the FFN width");
    for (size_t i = 0; i < L.score_scale.size(); ++i) L.score_scale[i] *= L.norm_ffn[i];
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    common_params params;
    params.n_ctx = g_opt.window;
    params.n_ubatch = -1;  // unset: chosen below from the vocabulary size
    params.cpuparams.n_threads = g_opt.n_threads;
    params.cpuparams_batch.n_threads = g_opt.n_threads;
    params.out_file.clear();
    params.warmup = false;
    params.escape = false;
    // read, not mapped: the CPU backend repacks most weights into buffers of its own, and a mapping
    // would keep the file's pages resident beside them (Qwen2.5-1.5B Q4_K_M: 2.18 GB against 1.57 GB)
    params.load_mode = LLAMA_LOAD_MODE_NONE;
    common_init();
    actsparse_add_tool_args(calibrator_args());
    try {
        if (!common_params_parse(argc, argv, params, LLAMA_EXAMPLE_IMATRIX, print_usage)) return 2;
    } catch (const std::exception & e) {
        fail(e.what());
    }
    llama_log_set(quiet_log, nullptr);
    params.sparse_prompt = true;  // the statistics are of batches: every position runs at the level
    options & o = g_opt;
    o.window = params.n_ctx;
    o.n_threads = params.cpuparams.n_threads;
    if (params.model.path.empty() || params.prompt_file.empty() || params.out_file.empty()) {
        fail("-m, -f and -o are required (see --help)");
    }
    if (o.window < 2) fail("-c (the window) must be at least 2");
    if (params.prompt.empty()) fail("calibration text " + params.prompt_file + " is empty");
    require_plain_up_rows(params);

    collector c;
    c.opt = &o;
    params.cb_eval = on_node;
    params.cb_eval_user_data = &c;
    // Each window is decoded in chunks from one cache: every position of a chunk is an output
    // (otherwise llama.cpp computes the last layer's FFN for the final token only), so a chunk's
    // logits buffer is n_vocab x chunk floats. The callback cuts the graph before it is filled.
    int chunk = params.n_ubatch;
    if (chunk <= 0) {
        llama_model_params mp = llama_model_default_params();
        mp.vocab_only = true;
        llama_model * vocab_model = llama_model_load_from_file(params.model.path.c_str(), mp);
        if (!vocab_model) fail("cannot load model " + params.model.path);
        const int64_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(vocab_model));
        llama_model_free(vocab_model);
        chunk = (int) std::max<int64_t>(32, std::min<int64_t>(o.window, (LOGITS_BUDGET / (4 * n_vocab)) / 32 * 32));
    }
    chunk = std::min(chunk, o.window);
    params.n_batch = params.n_ubatch = chunk;

    auto init = common_init_from_params(params);
    llama_model * model = init->model();
    llama_context * ctx = init->context();
    if (!model) fail("cannot load model " + params.model.path);
    if (!ctx) fail("cannot create a context");
    if (params.sparse) {
        o.sparse = params.sparse_level < 0 ? actsparse_model_default_level(model) : params.sparse_level;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    const std::string & text = params.prompt;
    std::vector<llama_token> tokens(text.size() + 16);
    int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(), false, false);
    if (n < 0) fail("tokenization failed");
    tokens.resize(n);

    const bool add_bos = llama_vocab_get_add_bos(vocab);
    const int per_window = o.window - (add_bos ? 1 : 0);
    const int64_t n_available = (int64_t) tokens.size() / per_window;
    const int n_windows = (int) std::min<int64_t>(n_available, (o.n_tokens + o.window - 1) / o.window);
    if (n_windows < 1) {
        fail("calibration text has " + std::to_string(tokens.size()) + " tokens, shorter than one window of " +
            std::to_string(o.window));
    }

    c.act = activation_for(model);
    c.layers.resize(llama_model_n_layer(model));
    if (!o.column_norms_file.empty()) load_column_norms(o.column_norms_file, c.layers);
    if (!o.mean_abs_up_file.empty()) {
        load_mean_abs_up(o.mean_abs_up_file, c.layers);
        for (layer_stats & L : c.layers) set_score_scale(L);
        c.pass = pass_kind::given_mean_abs_up;
    }
    const int64_t total_tokens = (int64_t) n_windows * o.window;
    std::vector<llama_token> win(o.window);
    llama_batch batch = llama_batch_init(chunk, 0, 1);
    for (int w = 0; w < n_windows; ++w) {
        int k = 0;
        if (add_bos) win[k++] = llama_vocab_bos(vocab);
        // windows spread evenly over the whole text, not its first n_tokens: a corpus (or a
        // user's file) ordered by source or topic is then sampled across all of them
        const int64_t slot = (int64_t) w * n_available / n_windows;
        std::memcpy(win.data() + k, tokens.data() + (size_t) slot * per_window, per_window * sizeof(llama_token));
        llama_memory_clear(llama_get_memory(ctx), true);
        for (int p0 = 0; p0 < o.window; p0 += chunk) {
            batch.n_tokens = std::min(chunk, o.window - p0);
            for (int i = 0; i < batch.n_tokens; ++i) {
                batch.token[i] = win[p0 + i];
                batch.pos[i] = p0 + i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = 0;
                batch.logits[i] = 1;
            }
            c.last_layer_seen = 0;
            const int rc = llama_decode(ctx, batch);
            if (!c.error.empty()) fail(c.error);  // the callback's reason beats decode's status
            if (rc != 0) fail("llama_decode failed (" + std::to_string(rc) + ")");
        }
        std::fprintf(stderr, "progress %lld %lld\n", (long long) (w + 1) * o.window, (long long) total_tokens);
        std::fflush(stderr);
    }
    if (c.pass == pass_kind::dense && o.chess) {
        parallel_for(o.n_threads, (int64_t) c.layers.size(), [&](int64_t l0, int64_t l1) {
            for (int64_t il = l0; il < l1; ++il) {
                layer_stats & L = c.layers[il];
                L.mean_abs_up.resize(L.sum_abs_up.size());
                for (size_t i = 0; i < L.sum_abs_up.size(); ++i)
                    L.mean_abs_up[i] = L.sum_abs_up[i] / (double) std::max<int64_t>(1, L.n_tok_up);
                set_score_scale(L);
                if (!L.channel_hist.empty()) score_hist_from_channels(L.channel_hist, L.score_scale, L.hist_act, L.hist_score);
            }
        }, 1);
    }
    for (size_t il = 0; il < c.layers.size(); ++il) {
        if (c.layers[il].n_ff == 0 || c.layers[il].n_tok_act == 0) {
            fail("layer " + std::to_string(il) + " has no ffn_up/ffn_gate activations (not a gated FFN?)");
        }
    }
    write_stats(c, o, total_tokens, n_windows, params.out_file);

    llama_batch_free(batch);
    return 0;
}
