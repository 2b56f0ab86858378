// --sparse [LEVEL] and --sparse-stats for every tool built on llama.cpp's common library.
#include "actsparse-common.h"

#include "actsparse.h"
#include "actsparse-schema.h"
#include "arg.h"
#include "common.h"
#include "log.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

// llama.cpp's logger prints from a worker thread and is never destroyed, so a tool that fails
// early (a model refused at load) can exit before the reason is printed. Drain it at exit.
static void drain_log_at_exit() {
    common_log_pause(common_log_main());
}

// --sparse LEVEL > 0: the model loads with ffn_up of the sparse layers in plain rows, which sparse
// decode reads one by one (a kv override the loader reads); dense runs load it repacked.
static void set_plain_up_rows(common_params & params, bool on) {
    auto & ovs = params.kv_overrides;
    ovs.erase(std::remove_if(ovs.begin(), ovs.end(),
                             [](const llama_model_kv_override & o) { return std::strcmp(o.key, ACTSPARSE_KEY_PLAIN_UP_ROWS) == 0; }),
              ovs.end());
    if (!on) return;
    llama_model_kv_override o = {};
    std::snprintf(o.key, sizeof o.key, "%s", ACTSPARSE_KEY_PLAIN_UP_ROWS);
    o.tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
    o.val_bool = true;
    ovs.push_back(o);
}

static std::vector<common_arg> & tool_args() {
    static std::vector<common_arg> args;
    return args;
}

void actsparse_add_tool_args(std::vector<common_arg> args) {
    tool_args() = std::move(args);
}

void actsparse_add_common_args(const std::function<void(common_arg)> & add_opt, common_params & params, int example) {
    static const bool drain_registered = std::atexit(drain_log_at_exit) == 0;
    (void) drain_registered;
    for (const common_arg & a : tool_args()) {
        add_opt(a);
    }
    add_opt(common_arg({ "--sparse" }, "[LEVEL]",
                       "activation sparsity (actsparse): run a model converted by convert_with_thresholds.py "
                       "with the thresholds of LEVEL (default: the file's default level); 0 = dense",
                       [](common_params & params, const std::string & value) {
                           // normally handled by actsparse_parse_sparse_arg (the value is optional)
                           params.sparse = true;
                           params.sparse_level = std::stof(value);
                           set_plain_up_rows(params, params.sparse_level != 0.0f);
                       }));
    // Tools that score text (perplexity, statistics over batches) sparsify every position, so that
    // their metrics describe the level; generating tools sparsify the generated tokens only.
    params.sparse_prompt = example == LLAMA_EXAMPLE_PERPLEXITY || example == LLAMA_EXAMPLE_IMATRIX;
    add_opt(common_arg({ "--sparse-prompt" },
                       std::string("apply --sparse to the prompt too (batches of several tokens); otherwise the prompt "
                                   "runs dense, which costs no speed since sparse batches are masked dense products "
                                   "(default: ") + (params.sparse_prompt ? "on in this tool)" : "off in this tool)"),
                       [](common_params & params) { params.sparse_prompt = true; }));
    add_opt(common_arg({ "--no-sparse-prompt" }, "run the prompt dense and only generated tokens sparse",
                       [](common_params & params) { params.sparse_prompt = false; }));
    add_opt(common_arg({ "--sparse-stats" },
                       "print the realized sparsity during decode (per layer and overall) at exit",
                       [](common_params & params) { params.sparse_stats = true; }));
    add_opt(common_arg({ "--sparse-stats-file" }, "PATH",
                       "write the realized sparsity (decode and prefill, per layer and overall) as JSON to PATH at exit",
                       [](common_params & params, const std::string & value) { params.sparse_stats_file = value; }));
}

int actsparse_parse_sparse_arg(int argc, char ** argv, int i, common_params & params) {
    params.sparse = true;
    params.sparse_level = -1.0f;
    set_plain_up_rows(params, true);
    if (i + 1 >= argc) {
        return 0;
    }
    const char * next = argv[i + 1];
    char * end = nullptr;
    const float v = std::strtof(next, &end);
    if (end == next || *end != '\0') {
        return 0;  // not a number: the next argument is another option or a positional one
    }
    if (!std::isfinite(v) || v < 0.0f || v >= 1.0f) {
        throw std::invalid_argument(std::string("error: --sparse level must be in [0, 1), got ") + next);
    }
    params.sparse_level = v;
    set_plain_up_rows(params, v > 0.0f);
    return 1;
}

bool actsparse_common_init(llama_context * ctx, const common_params & params) {
    if (!params.sparse) {
        return true;
    }
    char err[512];
    actsparse_set_sparse_prompt(ctx, params.sparse_prompt);
    if (actsparse_set_sparse(ctx, params.sparse_level, err, sizeof err) != 0) {
        LOG_ERR("error: --sparse: %s\n", err);
        return false;
    }
    actsparse_print_stats_at_exit(ctx, params.sparse_stats);
    actsparse_write_stats_at_exit(ctx, params.sparse_stats_file.empty() ? nullptr : params.sparse_stats_file.c_str());
    return true;
}
