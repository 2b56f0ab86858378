// actsparse public C API, exported from libllama (declared here, not in llama.h, so the
// llama-cpp-python binding's mirrored structs stay untouched).
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ACTSPARSE_API __attribute__((visibility("default")))

struct llama_model;
struct llama_context;

// Sparsity levels the model file carries (0 when it has no thresholds).
ACTSPARSE_API int   actsparse_model_n_levels(const struct llama_model * model);
ACTSPARSE_API float actsparse_model_level(const struct llama_model * model, int i);
ACTSPARSE_API float actsparse_model_default_level(const struct llama_model * model);

// Select the sparsity level of a context: 0 = dense, < 0 = the file's default level, otherwise
// one of the file's levels. Returns 0, or -1 with a one-line message in err.
ACTSPARSE_API int actsparse_set_sparse(struct llama_context * ctx, float level, char * err, size_t err_size);

// Whether batches of more than one token (a prompt) are sparse too; off by default: the prompt then
// runs dense, since its products are dense products of masked inputs and buy no speed, and
// single-token batches (generated tokens) are sparse. llama-perplexity and zero-shot scoring turn
// it on, so that every position of the text is scored sparse. Kept across actsparse_set_sparse.
ACTSPARSE_API void actsparse_set_sparse_prompt(struct llama_context * ctx, bool on);

// Realized sparsity during decode (single-token batches) since the level was set: JSON with
// per-layer and overall fractions of FFN channels and attention inputs skipped.
// Also the prefill phase ("prefill": {...}) and, with ACTSPARSE_CHECK_DECODE=1, "decode_check".
ACTSPARSE_API int  actsparse_stats_json(struct llama_context * ctx, char * buf, size_t size);
// Print the statistics to stderr when the context is freed (--sparse-stats).
ACTSPARSE_API void actsparse_print_stats_at_exit(struct llama_context * ctx, bool on);
// Write the statistics JSON to `path` when the context is freed (--sparse-stats-file; null: don't).
ACTSPARSE_API void actsparse_write_stats_at_exit(struct llama_context * ctx, const char * path);

// Test hook (process-wide): RECORD keeps the mask each single-token decode applied, per layer and
// kind; REPLAY makes the following batches apply those masks, in order, instead of comparing with
// the thresholds, so that decode and batched prefill can be compared with identical masks. OFF
// (the default) forgets the recording.
enum actsparse_trace_mode { ACTSPARSE_TRACE_OFF = 0, ACTSPARSE_TRACE_RECORD = 1, ACTSPARSE_TRACE_REPLAY = 2 };
ACTSPARSE_API void actsparse_mask_trace(int mode);

// The recording read back, so that another engine can apply the same masks: copies the mask of
// recorded token `index` for `layer` and `kind` (0 FFN channels, 1 q input, 2 o input) into `out`
// (1 = active, `capacity` bytes) and returns its length, or -1 when there is no such recording.
ACTSPARSE_API int64_t actsparse_mask_trace_get(int layer, int kind, int64_t index, uint8_t * out, int64_t capacity);

#ifdef __cplusplus
}
#endif
