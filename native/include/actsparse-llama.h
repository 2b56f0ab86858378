// Hooks that the patched llama.cpp (patches/) calls into. Keep the patches to calls of these.
#pragma once

#include <string>

// For a transposed copy ("blk.N.ffn_down_t.weight", "blk.N.attn_q_t.weight",
// "blk.N.attn_output_t.weight") the name of the weight it was transposed from; "" otherwise.
std::string actsparse_transposed_source(const std::string & name);
