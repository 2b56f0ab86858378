// actsparse-bench-reads: the time one decode step spends reading its weights, with no arithmetic.
//
// `actsparse bench` writes a plan of one decode step's weight reads, in the order decode reads
// them: whole matrices streamed, and matrices of which only the active rows are read, with each
// row's measured probability of being active. This tool lays out buffers of those sizes, on huge
// pages as the runtime does, draws each token's active rows from those probabilities, and times the
// reads alone on as many threads as decode uses, split as decode splits them (gathered rows in one
// half per thread, a streamed matrix in one slice per thread), with no barrier between matrices.
// Decode reads the same bytes and also computes, so it cannot take less time: the result is the
// memory bound on its speed. The best of several prefetch distances is kept for the same reason.

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct options {
    std::string plan;
    int threads = 2;
    int tokens = 16;
    int repeats = 3;
    bool huge_pages = true;
};

struct segment {
    size_t row_bytes = 0;   // whole matrix when streamed
    int64_t rows = 1;
    std::vector<float> p;   // gathered: each row's probability of being read; empty: streamed
    size_t offset = 0;      // in the region
};

void print_usage() {
    std::printf(
        "usage: actsparse-bench-reads PLAN [options]\n"
        "\n"
        "Times the weight reads of one decode step with no arithmetic: the memory bound on decode.\n"
        "PLAN has one line per weight, in decode order:\n"
        "  stream BYTES                      a matrix read whole\n"
        "  gather ROW_BYTES ROWS P_0 .. P_n  a matrix of which row i is read with probability P_i\n"
        "A barrier follows each matrix, as ggml has one after each op.\n"
        "Prints one JSON object: seconds per token (median and minimum) and bytes per token, and the\n"
        "mean seconds and bytes per token of the streamed and of the gathered matrices apart.\n"
        "\n"
        "options:\n"
        "  -t, --threads N   threads (default 2)\n"
        "  -n, --tokens N    tokens per pass, each with its own active rows (default 16)\n"
        "  -r, --repeats N   passes; the best prefetch distance's median token is reported (default 3)\n"
        "  --small-pages     gathered rows on 4 KiB pages instead of 2 MiB ones (streamed matrices stay\n"
        "                    on 2 MiB pages: the bound stays optimistic about the reads decode streams)\n"
        "  -h, --help        this help\n");
}

[[noreturn]] void die(const std::string & msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(1);
}

int parse_int(const std::string & flag, const char * v, int lo) {
    char * end = nullptr;
    const long x = v ? std::strtol(v, &end, 10) : 0;
    if (!v || *end || x < lo) die(flag + " needs an integer >= " + std::to_string(lo));
    return (int) x;
}

options parse(int argc, char ** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const char * v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (a == "-h" || a == "--help") { print_usage(); std::exit(0); }
        else if (a == "-t" || a == "--threads") { o.threads = parse_int(a, v, 1); ++i; }
        else if (a == "-n" || a == "--tokens") { o.tokens = parse_int(a, v, 1); ++i; }
        else if (a == "-r" || a == "--repeats") { o.repeats = parse_int(a, v, 1); ++i; }
        else if (a == "--small-pages") { o.huge_pages = false; }
        else if (!a.empty() && a[0] == '-') { die("unknown argument: " + a + " (see --help)"); }
        else if (o.plan.empty()) { o.plan = a; }
        else { die("more than one plan given: " + a); }
    }
    if (o.plan.empty()) die("no plan given (see --help)");
    return o;
}

std::vector<segment> read_plan(const std::string & path) {
    std::ifstream in(path);
    if (!in) die("cannot read the plan " + path);
    std::vector<segment> plan;
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
        std::istringstream ls(line);
        std::string what;
        if (!(ls >> what) || what[0] == '#') continue;
        segment s;
        bool ok = false;
        if (what == "stream") {
            ok = (bool) (ls >> s.row_bytes) && s.row_bytes > 0;
        } else if (what == "gather") {
            ok = (bool) (ls >> s.row_bytes >> s.rows) && s.row_bytes > 0 && s.rows > 0;
            s.p.resize(ok ? s.rows : 0);
            for (float & p : s.p) ok = ok && (bool) (ls >> p) && p >= 0.0f && p <= 1.0f;
        }
        if (!ok) die(path + ":" + std::to_string(n) + ": expected 'stream BYTES' or 'gather ROW_BYTES ROWS P...'");
        plan.push_back(std::move(s));
    }
    if (plan.empty()) die(path + " has no reads");
    return plan;
}

char * region(size_t bytes, bool huge) {
    constexpr size_t HUGE_PAGE = 2u << 20;
    void * raw = mmap(nullptr, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) die("cannot map " + std::to_string(bytes >> 20) + " MiB");
    char * base = (char *) (((uintptr_t) raw + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
#ifdef MADV_HUGEPAGE
    if (huge) madvise(base, bytes, MADV_HUGEPAGE);
#endif
    std::memset(base, 1, bytes);  // fault every page in before timing
    return base;
}

typedef uint64_t vec64 __attribute__((vector_size(16)));

inline vec64 load(const char * p) {
    vec64 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

vec64 read_bytes(const char * p, size_t n) {
    vec64 a = {}, b = {};
    size_t o = 0;
    for (; o + 64 <= n; o += 64) {
        a ^= load(p + o) ^ load(p + o + 16);
        b ^= load(p + o + 32) ^ load(p + o + 48);
    }
    for (; o + 16 <= n; o += 16) a ^= load(p + o);
    uint64_t tail = 0;
    for (; o < n; ++o) tail ^= (uint64_t) (unsigned char) p[o];
    a[0] ^= tail;
    return a ^ b;
}

// Segment s of one token on thread ith of nth. `active` holds each gathered segment's rows.
vec64 read_segment(const segment & seg, const std::vector<int32_t> & idx, const char * const bases[2], int ith,
                   int nth, size_t prefetch_bytes) {
    const char * w = bases[seg.p.empty() ? 0 : 1] + seg.offset;
    if (seg.p.empty()) {
        const size_t lines = seg.row_bytes / 64;
        const size_t b = lines * ith / nth * 64, e = ith == nth - 1 ? seg.row_bytes : lines * (ith + 1) / nth * 64;
        return read_bytes(w + b, e - b);
    }
    vec64 h = {};
    const int64_t k = (int64_t) idx.size(), k0 = k * ith / nth, k1 = k * (ith + 1) / nth;
    const int64_t ahead = prefetch_bytes ? std::max<int64_t>(1, (int64_t) (prefetch_bytes / seg.row_bytes)) : 0;
    for (int64_t j = k0; j < k1; ++j) {
        if (ahead && j + ahead < k1) {
            const char * next = w + (size_t) idx[j + ahead] * seg.row_bytes;
            for (size_t o = 0; o < seg.row_bytes; o += 64) __builtin_prefetch(next + o, 0, 0);
        }
        h ^= read_bytes(w + (size_t) idx[j] * seg.row_bytes, seg.row_bytes);
    }
    return h;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

int main(int argc, char ** argv) {
    const options o = parse(argc, argv);
    std::vector<segment> plan = read_plan(o.plan);
    // streamed matrices in one region, gathered ones in another (segment.offset counts from its region)
    size_t totals[2] = { 0, 0 };
    for (segment & s : plan) {
        size_t & total = totals[s.p.empty() ? 0 : 1];
        s.offset = total;
        total += (s.row_bytes * s.rows + 4095) / 4096 * 4096;
    }
    const char * bases[2] = { region(std::max<size_t>(totals[0], 4096), true),
                              region(std::max<size_t>(totals[1], 4096), o.huge_pages) };

    // every token's active rows, drawn before timing
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<std::vector<std::vector<int32_t>>> tokens(o.tokens, std::vector<std::vector<int32_t>>(plan.size()));
    double stream_bytes = 0.0, gather_bytes = 0.0;
    for (auto & token : tokens) {
        for (size_t s = 0; s < plan.size(); ++s) {
            if (plan[s].p.empty()) {
                stream_bytes += (double) plan[s].row_bytes;
                continue;
            }
            for (int64_t i = 0; i < plan[s].rows; ++i) {
                if (u(rng) < plan[s].p[i]) token[s].push_back((int32_t) i);
            }
            gather_bytes += (double) token[s].size() * plan[s].row_bytes;
        }
    }
    stream_bytes /= o.tokens;
    gather_bytes /= o.tokens;
    const double bytes = stream_bytes + gather_bytes;

    // persistent threads, a spinning barrier between tokens: thread 0 times each token
    std::vector<vec64> sink(o.threads);
    std::atomic<int> arrived{0}, generation{0};
    auto barrier = [&]() {
        const int g = generation.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == o.threads - 1) {
            arrived.store(0, std::memory_order_relaxed);
            generation.store(g + 1, std::memory_order_release);
        } else {
            while (generation.load(std::memory_order_acquire) == g) {}
        }
    };
    // a barrier after each matrix, as ggml has after each op; thread 0 times each token, split into
    // its streamed and its gathered matrices (the ratio of their rates is the price of gathering)
    struct pass_times {
        std::vector<double> token;
        double stream = 0.0, gather = 0.0;
    };
    pass_times best;
    double best_median = 1e30;
    size_t best_prefetch = 0;
    for (size_t prefetch : { (size_t) 0, (size_t) 4096, (size_t) 8192, (size_t) 16384 }) {
        pass_times pass;
        auto work = [&](int ith) {
            for (int r = 0; r < o.repeats + 1; ++r) {  // the first pass warms up
                for (const auto & token : tokens) {
                    barrier();
                    const auto t0 = std::chrono::steady_clock::now();
                    auto mark = t0;
                    for (size_t s = 0; s < plan.size(); ++s) {
                        sink[ith] ^= read_segment(plan[s], token[s], bases, ith, o.threads, prefetch);
                        barrier();
                        if (ith == 0 && r > 0) {
                            const auto now = std::chrono::steady_clock::now();
                            (plan[s].p.empty() ? pass.stream : pass.gather) += std::chrono::duration<double>(now - mark).count();
                            mark = now;
                        }
                    }
                    if (ith == 0 && r > 0) pass.token.push_back(std::chrono::duration<double>(mark - t0).count());
                }
            }
        };
        std::vector<std::thread> pool;
        for (int i = 1; i < o.threads; ++i) pool.emplace_back(work, i);
        work(0);
        for (auto & t : pool) t.join();
        const double m = median(pass.token);
        if (m < best_median) {
            best_median = m;
            best_prefetch = prefetch;
            best = pass;
        }
    }
    const double timed = (double) best.token.size();
    const double best_min = *std::min_element(best.token.begin(), best.token.end());
    uint64_t keep = 0;
    for (const vec64 & v : sink) keep ^= v[0];
    std::printf("{\"threads\": %d, \"tokens\": %d, \"huge_pages\": %s, \"seconds_per_token\": %.9f, "
                "\"min_seconds_per_token\": %.9f, \"bytes_per_token\": %.0f, \"stream_seconds_per_token\": %.9f, "
                "\"stream_bytes_per_token\": %.0f, \"gather_seconds_per_token\": %.9f, "
                "\"gather_bytes_per_token\": %.0f, \"prefetch_bytes\": %zu, \"gbs\": %.3f, \"checksum\": %llu}\n",
                o.threads, o.tokens, o.huge_pages ? "true" : "false", best_median, best_min, bytes,
                best.stream / timed, stream_bytes, best.gather / timed, gather_bytes, best_prefetch,
                bytes / best_median / 1e9, (unsigned long long) (keep & 1));
    return 0;
}
