// Where sparse decode's gathered weights live. Decode reads single rows of ffn_up and of the
// transposed copies in an order the text decides; on 4 KiB pages nearly every such row costs a TLB
// miss and a page walk, so those tensors are moved into one anonymous region on 2 MiB pages
// (MADV_HUGEPAGE), and their old pages are given back. A tensor moves when a decode graph first
// reads rows of it, so a context that only runs prefill, or a level whose products read the
// originals, keeps the copies unread and not resident. Everything else stays where llama.cpp put it.
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

void actsparse_detail::reserve_gathered_region(const sparse_model * sm, const llama_model & model) {
    std::call_once(sm->placed, [&] {
        if (!huge_pages_wanted()) return;
        // kind by kind: a level moves all tensors of a kind or none, and the moved ones then fill
        // whole huge pages instead of each touching one of its own
        std::vector<ggml_tensor *> candidates;
        for (const sparse_layer & sl : sm->layers) {
            ggml_tensor * up = model.layers[sl.il].ffn_up;
            if (sl.thresh[KIND_FFN] && plain_cpu_weight(up)) candidates.push_back(up);
        }
        for (int k = 0; k < N_KINDS; ++k) {
            for (const sparse_layer & sl : sm->layers) {
                if (plain_cpu_weight(sl.weight_t[k])) candidates.push_back(sl.weight_t[k]);
            }
        }
        size_t total = 0;
        for (const ggml_tensor * t : candidates) total += align_up(ggml_nbytes(t), ROW_ALIGN);
        if (total == 0) return;
        total = align_up(total, HUGE_PAGE);
        char * base = (char *) huge_page_region(total);  // address space only, until a tensor moves in
        if (!base) return;  // the weights stay where they are
        gathered_region & r = sm->gathered;
        r.base = base;
        r.size = total;
        size_t off = 0;
        for (const ggml_tensor * t : candidates) {
            r.slots[t] = base + off;
            off += align_up(ggml_nbytes(t), ROW_ALIGN);
        }
    });
}

void actsparse_detail::gathered_weight(const sparse_model * sm, ggml_tensor * t) {
    gathered_region & r = sm->gathered;
    std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.slots.find(t);
    if (it == r.slots.end()) return;  // moved already, or never a candidate
    const size_t n = ggml_nbytes(t);
    std::memcpy(it->second, t->data, n);
    release_pages(t->data, n);
    t->data = it->second;
    r.slots.erase(it);
}
