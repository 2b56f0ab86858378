// Where sparse decode's gathered weights live. Decode reads single rows of ffn_up and of the
// transposed copies in an order the text decides; on 4 KiB pages nearly every such row costs a TLB
// miss and a page walk, so those tensors are moved into one anonymous region on 2 MiB pages
// (MADV_HUGEPAGE), and their old pages are given back. An FFN channel's up row and its copy row are
// read together, so they are bundled, one after the other, into one contiguous read. Everything
// else stays where llama.cpp put it.
#include "actsparse-runtime.h"

#include "ggml-backend.h"
#include "llama-model.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace actsparse_detail;

static constexpr size_t HUGE_PAGE = 2u << 20;
static constexpr size_t ROW_ALIGN = 64;

static size_t align_up(size_t n, size_t a) {
    return (n + a - 1) / a * a;
}

bool actsparse_detail::plain_cpu_weight(const ggml_tensor * w) {
    // weights in the CPU backend's extra buffers ("CPU_REPACK", ...) are not in ggml's row layout
    if (!w || !w->buffer) return false;
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer));
    return std::strcmp(name, "CPU") == 0 || std::strcmp(name, "CPU_Mapped") == 0;
}

// ACTSPARSE_HUGE_PAGES=0 leaves the weights where they were loaded (to measure what this buys).
static bool huge_pages_wanted() {
    const char * v = std::getenv("ACTSPARSE_HUGE_PAGES");
    return !v || std::strcmp(v, "0") != 0;
}

gathered_region::~gathered_region() {
    if (base) munmap(base, size);
}

// The whole pages inside [p, p + n) are no longer read: drop them from this process (a file
// mapping re-reads them from the file, an anonymous buffer would read zeros, and nothing reads them).
static void release_pages(void * p, size_t n) {
    const size_t page = (size_t) sysconf(_SC_PAGESIZE);
    const uintptr_t b = align_up((uintptr_t) p, page), e = ((uintptr_t) p + n) / page * page;
    if (e > b) madvise((void *) b, e - b, MADV_DONTNEED);
}

// A 2 MiB-aligned anonymous region of `size` bytes that asks for huge pages, or null.
static void * huge_page_region(size_t size) {
    void * raw = mmap(nullptr, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t b = align_up((uintptr_t) raw, HUGE_PAGE);
    const uintptr_t r = (uintptr_t) raw;
    if (b > r) munmap(raw, b - r);
    if (r + HUGE_PAGE > b) munmap((void *) (b + size), r + HUGE_PAGE - b);
#ifdef MADV_HUGEPAGE
    madvise((void *) b, size, MADV_HUGEPAGE);
#endif
    return (void *) b;
}

// ACTSPARSE_BUNDLE=0 keeps ffn_up and the down copy apart (to measure what bundling buys).
static bool bundle_wanted() {
    const char * v = std::getenv("ACTSPARSE_BUNDLE");
    return !v || std::strcmp(v, "0") != 0;
}

namespace {

// A tensor to move: alone, or as the second half of a bundle whose first half is `up`.
struct placement {
    ggml_tensor * t;
    ggml_tensor * down_t = nullptr;  // bundled after t's rows: each channel's up row, then its copy row
    size_t stride = 0;               // bytes per bundled row
    size_t bytes() const { return stride ? stride * (size_t) t->ne[1] : ggml_nbytes(t); }
};

}  // namespace

// Bundled rows keep ffn_up a valid ggml tensor with a row stride: dense products read it through
// nb[1], and llamafile's sgemm counts that stride in blocks, so it is a whole number of them.
static size_t bundle_stride(const ggml_tensor * up, const ggml_tensor * down_t) {
    const size_t block = ggml_type_size(up->type);
    return align_up(ggml_row_size(up->type, up->ne[0]) + ggml_row_size(down_t->type, down_t->ne[0]), block);
}

void actsparse_detail::place_gathered_weights(const sparse_model * sm, const llama_model & model) {
    std::call_once(sm->placed, [&] {
        if (!huge_pages_wanted()) return;
        std::vector<placement> moves;
        for (const sparse_layer & sl : sm->layers) {
            ggml_tensor * up = model.layers[sl.il].ffn_up;
            ggml_tensor * down_t = sl.weight_t[KIND_FFN];
            const bool gathered_up = sl.thresh[KIND_FFN] && plain_cpu_weight(up) && ggml_is_contiguous(up);
            if (gathered_up && plain_cpu_weight(down_t) && bundle_wanted() && up->ne[1] == down_t->ne[1] &&
                ggml_is_contiguous(down_t)) {
                moves.push_back({ up, down_t, bundle_stride(up, down_t) });
            } else {
                if (gathered_up) moves.push_back({ up });
                if (plain_cpu_weight(down_t)) moves.push_back({ down_t });
            }
            for (ggml_tensor * wt : { sl.weight_t[KIND_Q], sl.weight_t[KIND_O] }) {
                if (plain_cpu_weight(wt)) moves.push_back({ wt });
            }
        }
        size_t total = 0;
        for (const placement & m : moves) total += align_up(m.bytes(), ROW_ALIGN);
        if (total == 0) return;
        total = align_up(total, HUGE_PAGE);
        char * base = (char *) huge_page_region(total);
        if (!base) return;  // no memory for the move: the weights stay where they are
        sm->gathered.base = base;
        sm->gathered.size = total;
        size_t off = 0;
        for (const placement & m : moves) {
            char * dst = base + off;
            if (!m.down_t) {
                std::memcpy(dst, m.t->data, ggml_nbytes(m.t));
                release_pages(m.t->data, ggml_nbytes(m.t));
                m.t->data = dst;
            } else {
                const size_t up_row = m.t->nb[1], down_row = m.down_t->nb[1];
                for (int64_t i = 0; i < m.t->ne[1]; ++i) {
                    std::memcpy(dst + i * m.stride, (const char *) m.t->data + i * up_row, up_row);
                    std::memcpy(dst + i * m.stride + up_row, (const char *) m.down_t->data + i * down_row, down_row);
                }
                release_pages(m.t->data, ggml_nbytes(m.t));
                release_pages(m.down_t->data, ggml_nbytes(m.down_t));
                m.t->data = dst;
                m.down_t->data = dst + up_row;
                for (ggml_tensor * t : { m.t, m.down_t }) {
                    t->nb[1] = m.stride;
                    for (int d = 2; d < GGML_MAX_DIMS; ++d) t->nb[d] = t->nb[d - 1] * t->ne[d - 1];
                }
            }
            off += align_up(m.bytes(), ROW_ALIGN);
        }
    });
}
