// Hooks that the patched llama.cpp common library (arguments, context setup) calls into.
#pragma once

#include <functional>
#include <vector>

struct common_arg;
struct common_params;
struct llama_context;

// Registers --sparse [LEVEL], --sparse-prompt, --sparse-stats and the tool's own options
// (actsparse_add_tool_args) for --help and the parser; `example` (a llama_example) sets the
// tool's default for --sparse-prompt in `params`.
void actsparse_add_common_args(const std::function<void(common_arg)> & add_opt, common_params & params, int example);

// Options of one of our tools, parsed by llama.cpp's common parser with the rest; call before
// common_params_parse.
void actsparse_add_tool_args(std::vector<common_arg> args);

// Parses "--sparse" at argv[i] with its optional LEVEL; returns how many extra arguments it took.
int actsparse_parse_sparse_arg(int argc, char ** argv, int i, common_params & params);

// Applies --sparse/--sparse-stats to a new context; false (after logging why) if it cannot.
bool actsparse_common_init(llama_context * ctx, const common_params & params);
