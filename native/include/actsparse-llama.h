// Hooks that the patched llama.cpp (patches/) calls into. Keep the patches to calls of these.
#pragma once

#include <cstdint>
#include <string>

struct ggml_context;
struct ggml_tensor;
struct gguf_context;
struct llama_context;
struct llama_model;
struct actsparse_context;

// For a transposed copy ("blk.N.ffn_down_t.weight", "blk.N.attn_q_t.weight",
// "blk.N.attn_output_t.weight") the name of the weight it was transposed from; "" otherwise.
std::string actsparse_transposed_source(const std::string & name);

// Model load: validates the sparsity tensors and keys (throws std::runtime_error naming the
// tensor when they are malformed) and gives the model its sparsity (llama_model::actsparse).
void actsparse_model_loaded(llama_model & model, const gguf_context * meta);
void actsparse_model_freed(llama_model * model);
// Frees the context's sparsity state (llama_context::get_actsparse), printing or writing its
// statistics first where --sparse-stats / --sparse-stats-file asked for them.
void actsparse_context_freed(llama_context * ctx);

// Graph building. Each returns nullptr when the layer has no thresholds or the context is dense,
// and the caller then builds the dense graph as before. n_tokens is the ubatch's token count: the
// decode kernels run only for single-token batches, not for a wider batch whose last layer keeps
// one output row. build_ffn gets the layer index from llm_graph_context::build_ffn; build_mm finds
// q and o by their weight, since build_lora_mm has no layer index.
ggml_tensor * actsparse_build_ffn(ggml_context * ctx0, ggml_tensor * cur, ggml_tensor * up, ggml_tensor * gate,
                                  ggml_tensor * down, bool plain_gated, int64_t n_tokens, int il,
                                  actsparse_context * state);
ggml_tensor * actsparse_build_mm(ggml_context * ctx0, ggml_tensor * w, ggml_tensor * cur, int64_t n_tokens,
                                 actsparse_context * state);
