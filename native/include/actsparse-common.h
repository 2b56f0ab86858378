// Hooks that the patched llama.cpp common library (arguments, context setup) calls into.
#pragma once

#include <functional>

struct common_arg;
struct common_params;
struct llama_context;

// Registers --sparse [LEVEL] and --sparse-stats for --help and the parser.
void actsparse_add_common_args(const std::function<void(common_arg)> & add_opt);

// Parses "--sparse" at argv[i] with its optional LEVEL; returns how many extra arguments it took.
int actsparse_parse_sparse_arg(int argc, char ** argv, int i, common_params & params);

// Applies --sparse/--sparse-stats to a new context; false (after logging why) if it cannot.
bool actsparse_common_init(llama_context * ctx, const common_params & params);
