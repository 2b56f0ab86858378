// Tensor names of the actsparse GGUF schema (docs/gguf-format.md).
#include "actsparse-llama.h"

#include <cstring>

std::string actsparse_transposed_source(const std::string & name) {
    static const char * const kinds[] = { "ffn_down", "attn_q", "attn_output" };
    if (name.rfind("blk.", 0) != 0) {
        return "";
    }
    for (const char * kind : kinds) {
        const std::string suffix = std::string(".") + kind + "_t.weight";
        if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            return name.substr(0, name.size() - suffix.size()) + "." + kind + ".weight";
        }
    }
    return "";
}
