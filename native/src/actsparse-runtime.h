// The actsparse runtime's shared state (internal to native/src/actsparse-*.cpp): a model's
// sparsity (actsparse_model, held by llama_model), a context's level and statistics
// (actsparse_context, held by llama_context), the custom ops' parameters, and the functions the
// runtime's files call in one another.
//   actsparse-runtime.cpp  model load: validation and the model's sparse layers; the model's levels
//   actsparse-context.cpp  a context's level (actsparse_set_sparse) and its statistics
//   actsparse-trace.cpp    the mask trace (tests)
//   actsparse-ops.cpp      the custom ops: mask, select + up rows, accumulate, check
//   actsparse-graph.cpp    graph building: actsparse_build_ffn, actsparse_build_mm
//   actsparse-layout.cpp   where decode's gathered weights live (huge pages)
#pragma once

#include "actsparse.h"
#include "actsparse-kernels.h"
#include "actsparse-schema.h"

#include "ggml.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

struct actsparse_context;
struct llama_model;

namespace actsparse_detail {

typedef actsparse_kind op_kind;
constexpr op_kind KIND_FFN = ACTSPARSE_KIND_FFN, KIND_Q = ACTSPARSE_KIND_Q, KIND_O = ACTSPARSE_KIND_O;
constexpr int N_KINDS = ACTSPARSE_N_KINDS;
enum phase { PHASE_DECODE = 0, PHASE_PREFILL = 1, N_PHASES = 2 };

struct sparse_layer {
    int il = -1;
    ggml_tensor * thresh[N_KINDS] = {};   // ffn_act_thresh, attn_q_in_thresh, attn_o_in_thresh
    ggml_tensor * weight_t[N_KINDS] = {}; // ffn_down_t, attn_q_t, attn_output_t
    std::vector<float> target[N_KINDS];   // per level: the sparsity the thresholds aim at
};

// The anonymous region that decode's gathered weights move into (actsparse-layout.cpp): each
// candidate's place in it until the tensor has moved.
struct gathered_region {
    void * base = nullptr;
    size_t size = 0;
    std::mutex mutex;
    std::unordered_map<const ggml_tensor *, char *> slots;  // the tensors not moved yet
    ~gathered_region();
};

struct weight_ref {
    int il;  // index into actsparse_model::layers
    op_kind kind;
};

}  // namespace actsparse_detail

// A model's sparsity, held by the model (llama_model::actsparse) and read-only after load, so
// graph building reads it without a lock.
struct actsparse_model {
    std::vector<float> levels;
    float default_level = 0.0f;
    actsparse_act act = ACTSPARSE_ACT_SILU;
    std::vector<actsparse_detail::sparse_layer> layers;
    std::vector<int> layer_index;  // model layer -> index into layers, -1 where it has no thresholds
    // The products whose input is sparse, found by weight: build_lora_mm, where attention's q and o
    // products are built, knows no layer index.
    std::unordered_map<const ggml_tensor *, actsparse_detail::weight_ref> by_weight;
    // Reserved once, by the first context set to a sparse level (reserve_gathered_region).
    mutable std::once_flag placed;
    mutable actsparse_detail::gathered_region gathered;
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

// A context's sparsity, held by the context (llama_context::get_actsparse), freed with it.
struct actsparse_context {
    const actsparse_model * model = nullptr;
    int level = -1;  // index into model->levels; -1: dense
    // Whether batches of more than one token (the prompt) are sparse too. Off, they run dense:
    // their products are dense products of masked inputs, so sparsity there buys no speed.
    bool sparse_prompt = false;
    bool print_at_exit = false;
    std::string stats_file;  // statistics JSON written here when the context is freed
    // Zeroed inputs per phase, per layer, per kind. Decode (one-token ubatches) is what the
    // sparse kernels skip; prefill is counted apart so evaluations over batched text can report
    // the sparsity they measured under.
    std::vector<std::unique_ptr<actsparse_detail::counters[]>> stats[actsparse_detail::N_PHASES];
    // Decode, per kind, per model layer, per input channel: the tokens it was active in (thread 0
    // of each op counts; written to --sparse-stats-file, where actsparse bench reads how often each
    // gathered row is read).
    std::vector<std::vector<uint32_t>> active_tokens[ACTSPARSE_N_KINDS];
    std::deque<actsparse_detail::op_params> params;  // stable addresses for op userdata
    std::map<std::pair<int, int>, actsparse_detail::op_params *> by_layer_kind[actsparse_detail::N_PHASES];
    std::atomic<uint64_t> checked{0};
    std::atomic<uint32_t> check_max_rel_err_bits{0};  // float bits: max |kernel - dense| / max |dense|
};

namespace actsparse_detail {

// ---- actsparse-runtime.cpp

// The model's sparsity, or null.
const sparse_model * find_model(const llama_model * model);

// The index of `level` among the model's levels (the last within ACTSPARSE_LEVEL_TOLERANCE), or -1.
int level_index(const sparse_model * sm, float level);

// ---- actsparse-layout.cpp

// Whether a weight is in ggml's plain row layout in host memory (not a repacked CPU buffer).
bool plain_cpu_weight(const ggml_tensor * w);

// Reserves huge-page address space for the weights sparse decode gathers rows from (plain ffn_up
// of sparse layers, the transposed copies), once per model; called when a context is set sparse.
void reserve_gathered_region(const sparse_model * sm, const llama_model & model);
// Moves `t` into its reserved place, the first time a decode graph reads rows of it (graph
// building; a context computing from the old place meanwhile would read released pages).
void gathered_weight(const sparse_model * sm, ggml_tensor * t);

// ---- actsparse-trace.cpp

extern std::atomic<int> g_trace_mode;  // ACTSPARSE_TRACE_OFF, _RECORD or _REPLAY

// Appends a decode token's mask of the op's layer and kind to the recording.
void trace_record(const op_params * p, std::vector<uint8_t> && active);

// op_mask while tracing: the whole tensor on thread 0, recording single rows or replaying.
// Returns how many were zeroed.
int64_t traced_mask(const op_params * p, const ggml_tensor * x, ggml_tensor * dst, const float * t, bool scalar);

// ---- actsparse-ops.cpp: ggml_custom_4d callbacks; userdata is the op_params

// The list op_select_up writes: [count, idx[n], h[n]] (+ [dense h[n]]), count and idx as int32 bits.
constexpr int64_t SEL_HEADER = 1;
// Rows of op_axpy's output: its partial sums, added into row 0 by the last thread.
constexpr int AXPY_ROW_GROUPS = 2;

void op_mask(ggml_tensor * dst, int ith, int nth, void * userdata);
void op_select_up(ggml_tensor * dst, int ith, int nth, void * userdata);
void op_axpy(ggml_tensor * dst, int ith, int nth, void * userdata);
void op_check(ggml_tensor * dst, int ith, int nth, void * userdata);

}  // namespace actsparse_detail
