// The mask trace (tests): records the masks of decode tokens and replays them in a batch.
#include "actsparse-runtime.h"
#include "actsparse-kernels.h"

#include <algorithm>
#include <cstring>
#include <mutex>

using namespace actsparse_detail;

// ---- mask trace (tests) -----------------------------------------------------------------------
// The thresholds make the function discontinuous: an input next to its threshold flips with the
// rounding of the product that computed it, and a one-row product rounds differently from an n-row
// one. To compare decode with batched prefill as functions, a test records the mask every decode
// token used and replays those masks in one batch over the same tokens (actsparse_mask_trace).
// While tracing, the mask ops run on one thread so that the per-layer cursors advance in order.

namespace {

struct mask_trace {
    std::mutex mutex;
    std::map<std::pair<int, int>, std::vector<std::vector<uint8_t>>> masks;  // (layer, kind) -> per token
    std::map<std::pair<int, int>, size_t> cursor;
};

mask_trace g_trace;

}  // namespace

std::atomic<int> actsparse_detail::g_trace_mode{ACTSPARSE_TRACE_OFF};

extern "C" void actsparse_mask_trace(int mode) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    if (mode == ACTSPARSE_TRACE_REPLAY) {
        g_trace.cursor.clear();
    } else {
        g_trace.masks.clear();
        g_trace.cursor.clear();
    }
    g_trace_mode = mode;
}

extern "C" int64_t actsparse_mask_trace_get(int layer, int kind, int64_t index, uint8_t * out, int64_t capacity) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    const auto it = g_trace.masks.find({ layer, kind });
    if (it == g_trace.masks.end() || index < 0 || index >= (int64_t) it->second.size()) return -1;
    const std::vector<uint8_t> & mask = it->second[(size_t) index];
    if (out) std::memcpy(out, mask.data(), (size_t) std::min<int64_t>(capacity, (int64_t) mask.size()));
    return (int64_t) mask.size();
}

void actsparse_detail::trace_record(const op_params * p, std::vector<uint8_t> && active) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    g_trace.masks[{ p->model->layers[p->il].il, p->kind }].push_back(std::move(active));
}

// The next recorded mask of this layer and kind, or null when the recording has none left.
static const std::vector<uint8_t> * trace_next(const op_params * p, int64_t n) {
    std::lock_guard<std::mutex> lock(g_trace.mutex);
    const std::pair<int, int> key{ p->model->layers[p->il].il, p->kind };
    const auto & list = g_trace.masks[key];
    size_t & at = g_trace.cursor[key];
    if (at >= list.size() || (int64_t) list[at].size() != n) return nullptr;
    return &list[at++];
}

// op_mask while tracing: the whole tensor on thread 0, recording single rows or replaying.
int64_t actsparse_detail::traced_mask(const op_params * p, const ggml_tensor * x, ggml_tensor * dst, const float * t,
                                      bool scalar) {
    const int64_t n = x->ne[0];
    int64_t zeros = 0;
    for (int64_t r = 0; r < ggml_nrows(x); ++r) {
        const float * xr = (const float *) ((const char *) x->data + r * x->nb[1]);
        float * yr = (float *) ((char *) dst->data + r * dst->nb[1]);
        const std::vector<uint8_t> * replay = g_trace_mode == ACTSPARSE_TRACE_REPLAY ? trace_next(p, n) : nullptr;
        if (replay) {
            for (int64_t i = 0; i < n; ++i) {
                yr[i] = (*replay)[i] ? xr[i] : 0.0f;
                zeros += !(*replay)[i];
            }
            continue;
        }
        zeros += actsparse_act_mask(xr, yr, t, scalar, ACTSPARSE_ACT_NONE, 0, n);
        if (g_trace_mode == ACTSPARSE_TRACE_RECORD && ggml_nrows(x) == 1) {
            std::vector<uint8_t> active(n);
            for (int64_t i = 0; i < n; ++i) active[i] = yr[i] != 0.0f;
            trace_record(p, std::move(active));
        }
    }
    return zeros;
}
