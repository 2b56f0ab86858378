// Tensor names of the actsparse GGUF schema (native/include/actsparse-schema.h).
#include "actsparse-llama.h"
#include "actsparse-schema.h"

#include <string>

// "blk.%d." patterns without their "blk.%d." prefix
static std::string layer_suffix(const char * pattern) {
    return std::string(pattern).substr(std::string("blk.%d").size());
}

std::string actsparse_transposed_source(const std::string & name) {
    if (name.rfind("blk.", 0) != 0) {
        return "";
    }
    for (const actsparse_kind_info & kind : ACTSPARSE_KINDS) {
        const std::string suffix = layer_suffix(kind.copy);
        if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            return name.substr(0, name.size() - suffix.size()) + layer_suffix(kind.weight);
        }
    }
    return "";
}
