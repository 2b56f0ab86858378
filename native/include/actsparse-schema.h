// The sparse GGUF schema (docs/gguf-format.md) for C and C++: the contract between the converter
// and the runtime. python/actsparse/schema.py is the same contract for Python, and
// tests/test_schema.py checks that the two agree: change both in one commit.
#pragma once

#define ACTSPARSE_FORMAT_VERSION 1

#define ACTSPARSE_KEY_FORMAT_VERSION "actsparse.format_version"
#define ACTSPARSE_KEY_METHOD "actsparse.method"
#define ACTSPARSE_KEY_LEVELS "actsparse.levels"
#define ACTSPARSE_KEY_DEFAULT_LEVEL "actsparse.default_level"
#define ACTSPARSE_KEY_ATTN "actsparse.attn"
#define ACTSPARSE_KEY_ACTIVATION "actsparse.activation"
#define ACTSPARSE_KEY_UP_STATISTIC "actsparse.up_statistic"
#define ACTSPARSE_KEY_TRANSPOSED_TYPE "actsparse.transposed_type"
#define ACTSPARSE_KEY_WEIGHTED_SCORES "actsparse.weighted_scores"
#define ACTSPARSE_KEY_CALIB_SOURCE "actsparse.calibration.source"
#define ACTSPARSE_KEY_CALIB_SHA256 "actsparse.calibration.sha256"
#define ACTSPARSE_KEY_CALIB_TOKENS "actsparse.calibration.tokens"
#define ACTSPARSE_KEY_CALIB_WINDOW "actsparse.calibration.window"
#define ACTSPARSE_KEY_CALIB_SPARSE_AWARE_TOKENS "actsparse.calibration.sparse_aware_tokens"
#define ACTSPARSE_KEY_TOOL "actsparse.tool"
// Optional, f32 array [levels][n_layer][kinds]: the sparsity each layer's kind targets at each level
// (--allocate). Absent: every layer and kind targets the level itself.
#define ACTSPARSE_KEY_ALLOCATION "actsparse.allocation"
// Optional, f32 array [levels]: the KL budget (--sparsity kld:X) each level was found for, 0 where
// none. The runtime does not read it.
#define ACTSPARSE_KEY_LEVEL_BUDGETS "actsparse.level_budgets"
// Optional, f32 array [2]: the measured KL cost of q8_0 and of same-type copies (--transposed-type
// auto chose the file's copy type by them). The runtime does not read it.
#define ACTSPARSE_KEY_TRANSPOSED_TYPE_KLD "actsparse.transposed_type_kld"
// Not in files: a kv override at model load (bool). True keeps ffn_up of the layers with thresholds
// out of the CPU backend's repacked buffers, since sparse decode reads its single rows; --sparse
// LEVEL > 0 sets it, and without it ffn_up loads repacked as llama.cpp loads it.
#define ACTSPARSE_KEY_PLAIN_UP_ROWS "actsparse.plain_up_rows"

// Two levels are the same level when they differ by less than this.
#define ACTSPARSE_LEVEL_TOLERANCE 1e-4

// The copy-cost rule: decode reads a transposed copy only where (1 - target) of its bytes is at
// most this share of the original's bytes, target being the layer's allocated sparsity at the level;
// elsewhere it multiplies the original by the masked input.
#define ACTSPARSE_SPARSE_BYTES_MARGIN 0.8

// Per-layer tensor names, printf patterns of the layer index. llama.cpp's tensor table takes the
// names without ".weight" (ACTSPARSE_TENSOR_*), the files carry the copies with it.
#define ACTSPARSE_TENSOR_FFN_ACT_THRESH "blk.%d.ffn_act_thresh"
#define ACTSPARSE_TENSOR_ATTN_Q_IN_THRESH "blk.%d.attn_q_in_thresh"
#define ACTSPARSE_TENSOR_ATTN_O_IN_THRESH "blk.%d.attn_o_in_thresh"
#define ACTSPARSE_TENSOR_FFN_DOWN_T "blk.%d.ffn_down_t"
#define ACTSPARSE_TENSOR_ATTN_Q_T "blk.%d.attn_q_t"
#define ACTSPARSE_TENSOR_ATTN_OUTPUT_T "blk.%d.attn_output_t"
// R-Sparse (actsparse.method "r-sparse"): the input of every other projection
#define ACTSPARSE_TENSOR_ATTN_K_IN_THRESH "blk.%d.attn_k_in_thresh"
#define ACTSPARSE_TENSOR_ATTN_V_IN_THRESH "blk.%d.attn_v_in_thresh"
#define ACTSPARSE_TENSOR_FFN_GATE_IN_THRESH "blk.%d.ffn_gate_in_thresh"
#define ACTSPARSE_TENSOR_FFN_UP_IN_THRESH "blk.%d.ffn_up_in_thresh"
#define ACTSPARSE_TENSOR_FFN_DOWN_IN_THRESH "blk.%d.ffn_down_in_thresh"
#define ACTSPARSE_TENSOR_ATTN_K_T "blk.%d.attn_k_t"
#define ACTSPARSE_TENSOR_ATTN_V_T "blk.%d.attn_v_t"
#define ACTSPARSE_TENSOR_FFN_GATE_T "blk.%d.ffn_gate_t"
#define ACTSPARSE_TENSOR_FFN_UP_T "blk.%d.ffn_up_t"

// The kinds of sparse input, numbered as the statistics, the mask trace and the Python side number them.
enum actsparse_kind {
    ACTSPARSE_KIND_FFN = 0,  // CHESS/CATS: FFN channels by act(gate)
    ACTSPARSE_KIND_Q = 1,
    ACTSPARSE_KIND_O = 2,
    ACTSPARSE_KIND_K = 3,  // R-Sparse from here on
    ACTSPARSE_KIND_V = 4,
    ACTSPARSE_KIND_GATE_IN = 5,
    ACTSPARSE_KIND_UP_IN = 6,
    ACTSPARSE_KIND_DOWN_IN = 7,
    ACTSPARSE_N_KINDS = 8
};
// Files written before the R-Sparse kinds carry an allocation over the first three kinds alone.
#define ACTSPARSE_LEGACY_ALLOCATION_KINDS 3

struct actsparse_kind_info {
    const char * name;    // as --sparse-stats and the statistics JSON name it
    const char * thresh;  // threshold tensor
    const char * weight;  // the product whose input is sparsified
    const char * copy;    // that product's transposed copy
};

static const struct actsparse_kind_info ACTSPARSE_KINDS[ACTSPARSE_N_KINDS] = {
    { "ffn", ACTSPARSE_TENSOR_FFN_ACT_THRESH, "blk.%d.ffn_down.weight", ACTSPARSE_TENSOR_FFN_DOWN_T ".weight" },
    { "attn_q_in", ACTSPARSE_TENSOR_ATTN_Q_IN_THRESH, "blk.%d.attn_q.weight", ACTSPARSE_TENSOR_ATTN_Q_T ".weight" },
    { "attn_o_in", ACTSPARSE_TENSOR_ATTN_O_IN_THRESH, "blk.%d.attn_output.weight", ACTSPARSE_TENSOR_ATTN_OUTPUT_T ".weight" },
    { "attn_k_in", ACTSPARSE_TENSOR_ATTN_K_IN_THRESH, "blk.%d.attn_k.weight", ACTSPARSE_TENSOR_ATTN_K_T ".weight" },
    { "attn_v_in", ACTSPARSE_TENSOR_ATTN_V_IN_THRESH, "blk.%d.attn_v.weight", ACTSPARSE_TENSOR_ATTN_V_T ".weight" },
    { "ffn_gate_in", ACTSPARSE_TENSOR_FFN_GATE_IN_THRESH, "blk.%d.ffn_gate.weight", ACTSPARSE_TENSOR_FFN_GATE_T ".weight" },
    { "ffn_up_in", ACTSPARSE_TENSOR_FFN_UP_IN_THRESH, "blk.%d.ffn_up.weight", ACTSPARSE_TENSOR_FFN_UP_T ".weight" },
    { "ffn_down_in", ACTSPARSE_TENSOR_FFN_DOWN_IN_THRESH, "blk.%d.ffn_down.weight", ACTSPARSE_TENSOR_FFN_DOWN_T ".weight" },
};

// Architectures whose llama.cpp graph has a separate gate, up and down projection, with the
// gate's activation (the converter writes it as ACTSPARSE_KEY_ACTIVATION).
struct actsparse_arch_activation {
    const char * arch;
    const char * activation;
};

static const struct actsparse_arch_activation ACTSPARSE_ARCH_ACTIVATION[] = {
    { "llama", "silu" },   { "mistral3", "silu" }, { "qwen2", "silu" }, { "qwen3", "silu" },
    { "granite", "silu" }, { "olmo2", "silu" },    { "phi3", "silu" },  { "gemma", "gelu" },
    { "gemma2", "gelu" },  { "gemma3", "gelu" },
};
