// actsparse-bench-kernels: throughput of the decode kernels on this machine, by weight type.
//
// Sparse decode reads only the active rows of ffn_up (a gathered dot per row) and of each
// transposed copy (an accumulate per row). Whether that reaches the bytes-per-token ceiling depends
// on whether these loops are bound by memory or by arithmetic, which differs between machines and
// types. This tool times them on a random matrix of a chosen shape, on as many threads as decode
// uses, each thread taking its share of the active rows the way the runtime splits them, over
// enough copies of the matrix that they come from memory rather than cache. It reports GB/s of
// weight bytes read and G weights/s, medians of the repeats; and, as their bound, what the memory
// system gives the same reads with no arithmetic: the active rows alone (gathered, prefetched as
// the kernels do) and every row (streamed, as dense decode reads).

#include "actsparse-kernels.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

struct options {
    int64_t rows = 8960;  // a transposed ffn_down of a 1.5B model: n_ff rows of n_embd
    int64_t cols = 1536;
    double sparsity = 0.5;
    int threads = 2;
    int repeats = 5;
    int64_t min_bytes = 512ll << 20;  // matrices cycled through, to read from memory
    std::vector<ggml_type> types;
    bool json = false;
};

void print_usage() {
    std::printf(
        "usage: actsparse-bench-kernels [options]\n"
        "\n"
        "Times the sparse decode kernels by weight type: the accumulate over active rows of a\n"
        "transposed copy (ffn_down, attn_q, attn_output) and the gathered dot over active rows of\n"
        "ffn_up. Reports weight bytes read per second and weights per second (medians), and the\n"
        "bandwidth of the same reads with no arithmetic: the active rows alone, and every row.\n"
        "\n"
        "options:\n"
        "  --rows N          rows of the matrix (default 8960)\n"
        "  --cols N          columns, a multiple of 256 (default 1536)\n"
        "  -s, --sparsity S  fraction of rows skipped, in [0, 1) (default 0.5)\n"
        "  -t, --threads N   threads (default 2)\n"
        "  -r, --repeats N   repeats, the median is reported (default 5)\n"
        "  --mem MB          weights cycled through per pass, so that they come from memory (default 512)\n"
        "  --types LIST      comma-separated ggml type names (default q8_0,q4_0,q5_0,q4_K,q5_K,q6_K,f16)\n"
        "  --json            one JSON object instead of the table\n"
        "  -h, --help        this help\n");
}

[[noreturn]] void die(const std::string & msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    std::exit(1);
}

ggml_type type_by_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n && name == n && ggml_get_type_traits((ggml_type) t)->blck_size > 0) return (ggml_type) t;
    }
    die("unknown type '" + name + "'");
}

int64_t parse_int(const std::string & flag, const char * v, int64_t lo) {
    char * end = nullptr;
    const long long x = v ? std::strtoll(v, &end, 10) : 0;
    if (!v || *end || x < lo) die(flag + " needs an integer >= " + std::to_string(lo));
    return x;
}

options parse(int argc, char ** argv) {
    options o;
    std::string types = "q8_0,q4_0,q5_0,q4_K,q5_K,q6_K,f16";
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const char * v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (a == "-h" || a == "--help") { print_usage(); std::exit(0); }
        else if (a == "--rows") { o.rows = parse_int(a, v, 1); ++i; }
        else if (a == "--cols") { o.cols = parse_int(a, v, 256); ++i; }
        else if (a == "-t" || a == "--threads") { o.threads = (int) parse_int(a, v, 1); ++i; }
        else if (a == "-r" || a == "--repeats") { o.repeats = (int) parse_int(a, v, 1); ++i; }
        else if (a == "--mem") { o.min_bytes = parse_int(a, v, 1) << 20; ++i; }
        else if (a == "-s" || a == "--sparsity") {
            char * end = nullptr;
            o.sparsity = v ? std::strtod(v, &end) : -1.0;
            if (!v || *end || !(o.sparsity >= 0.0 && o.sparsity < 1.0)) die("--sparsity needs a value in [0, 1)");
            ++i;
        } else if (a == "--types") {
            if (!v) die("--types needs a list");
            types = v;
            ++i;
        } else if (a == "--json") {
            o.json = true;
        } else {
            die("unknown argument: " + a + " (see --help)");
        }
    }
    if (o.cols % 256) die("--cols must be a multiple of 256");
    for (size_t p = 0; p <= types.size();) {
        const size_t q = std::min(types.find(',', p), types.size());
        if (q > p) o.types.push_back(type_by_name(types.substr(p, q - p)));
        p = q + 1;
    }
    if (o.types.empty()) die("--types is empty");
    return o;
}

struct timing {
    double accumulate_s = 0.0;  // medians over the repeats, seconds per pass over all matrices
    double gather_s = 0.0;
    double read_active_s = 0.0;  // the active rows read with no arithmetic
    double read_all_s = 0.0;     // every row read in order, bytes scaled to the active rows'
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Runs fn(ith) on every thread and returns the wall time.
template <typename F> double on_threads(int n, F fn) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int i = 1; i < n; ++i) pool.emplace_back(fn, i);
    fn(0);
    for (auto & t : pool) t.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// XOR of rows idx[k0 .. k1) of each matrix, 8 bytes at a time, prefetching rows about 8 KB ahead
// as the kernels do (a gathered row is invisible to the hardware prefetchers).
uint64_t read_rows(const uint8_t * w, size_t mat_bytes, int64_t n_mats, size_t row_bytes, const int32_t * idx,
                   int64_t k0, int64_t k1) {
    const int64_t ahead = std::max<int64_t>(2, 8192 / (int64_t) row_bytes);
    uint64_t h = 0;
    for (int64_t m = 0; m < n_mats; ++m) {
        const uint8_t * mat = w + m * mat_bytes;
        for (int64_t k = k0; k < k1; ++k) {
            if (k + ahead < k1) {
                const uint8_t * next = mat + (size_t) idx[k + ahead] * row_bytes;
                for (size_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(next + o, 0, 2);
            }
            const uint8_t * row = mat + (size_t) idx[k] * row_bytes;
            for (size_t o = 0; o + 8 <= row_bytes; o += 8) {
                uint64_t x;
                std::memcpy(&x, row + o, 8);
                h ^= x;
            }
        }
    }
    return h;
}

timing bench_type(const options & o, ggml_type type, const std::vector<int32_t> & idx, const std::vector<float> & val,
                  int64_t & n_mats, size_t & row_bytes) {
    row_bytes = ggml_row_size(type, o.cols);
    const size_t mat_bytes = row_bytes * o.rows;
    n_mats = std::max<int64_t>(1, (o.min_bytes + (int64_t) mat_bytes - 1) / (int64_t) mat_bytes);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 0.05f);
    std::vector<float> f(o.rows * o.cols);
    for (auto & x : f) x = nd(rng);
    std::vector<uint8_t> one(mat_bytes);
    ggml_quantize_init(type);
    ggml_quantize_chunk(type, f.data(), one.data(), 0, o.rows, o.cols, nullptr);
    std::vector<uint8_t> w(mat_bytes * n_mats);
    for (int64_t m = 0; m < n_mats; ++m) std::copy(one.begin(), one.end(), w.begin() + m * mat_bytes);

    const int64_t k = (int64_t) idx.size();
    const ggml_type vdt = ggml_get_type_traits_cpu(type)->vec_dot_type;
    std::vector<float> x(o.cols);
    for (auto & v : x) v = nd(rng);
    std::vector<uint8_t> xq(ggml_row_size(vdt, o.cols));
    if (vdt == GGML_TYPE_F32) {
        std::copy((const uint8_t *) x.data(), (const uint8_t *) (x.data() + o.cols), xq.begin());
    } else {
        ggml_get_type_traits_cpu(vdt)->from_float(x.data(), xq.data(), o.cols);
    }
    std::vector<std::vector<float>> y(o.threads, std::vector<float>(o.cols));
    std::vector<float> out(k);
    std::vector<int32_t> every(o.rows);
    for (int64_t i = 0; i < o.rows; ++i) every[i] = (int32_t) i;
    std::vector<uint64_t> sink(o.threads);
    std::vector<double> acc, gat, rda, rdl;
    for (int r = 0; r < o.repeats + 1; ++r) {  // the first pass warms up
        const double ta = on_threads(o.threads, [&](int ith) {
            const int64_t k0 = k * ith / o.threads, k1 = k * (ith + 1) / o.threads;
            for (int64_t m = 0; m < n_mats; ++m) {
                actsparse_axpy_rows(type, w.data() + m * mat_bytes, row_bytes, idx.data() + k0, val.data() + k0,
                                    k1 - k0, y[ith].data(), 0, o.cols);
            }
        });
        const double tg = on_threads(o.threads, [&](int ith) {
            const int64_t k0 = k * ith / o.threads, k1 = k * (ith + 1) / o.threads;
            for (int64_t m = 0; m < n_mats; ++m) {
                actsparse_rows_dot(type, w.data() + m * mat_bytes, row_bytes, o.cols, idx.data(), val.data(),
                                   xq.data(), out.data(), k0, k1);
            }
        });
        const double tr = on_threads(o.threads, [&](int ith) {
            sink[ith] ^= read_rows(w.data(), mat_bytes, n_mats, row_bytes, idx.data(), k * ith / o.threads,
                                   k * (ith + 1) / o.threads);
        });
        const double tl = on_threads(o.threads, [&](int ith) {
            sink[ith] ^= read_rows(w.data(), mat_bytes, n_mats, row_bytes, every.data(), o.rows * ith / o.threads,
                                   o.rows * (ith + 1) / o.threads);
        });
        if (r > 0) {
            acc.push_back(ta);
            gat.push_back(tg);
            rda.push_back(tr);
            rdl.push_back(tl * (double) k / (double) o.rows);  // per active row's bytes
        }
    }
    if (std::count(sink.begin(), sink.end(), 42u) > (long) o.threads) std::printf(" ");  // keeps the reads
    return { median(acc), median(gat), median(rda), median(rdl) };
}

}  // namespace

int main(int argc, char ** argv) {
    const options o = parse(argc, argv);
    ggml_cpu_init();
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<int32_t> idx;
    std::vector<float> val;
    for (int64_t i = 0; i < o.rows; ++i) {
        if (u(rng) >= o.sparsity) {
            idx.push_back((int32_t) i);
            val.push_back(u(rng) * 2.0f - 1.0f);
        }
    }
    if (!o.json) {
        std::printf("simd %s, %d threads, %lld x %lld, sparsity %.2f (%zu active rows)\n", actsparse_kernels_simd(),
                    o.threads, (long long) o.rows, (long long) o.cols, o.sparsity, idx.size());
        std::printf("%-8s %12s %12s %12s %12s %12s %12s\n", "type", "accum GB/s", "accum Gw/s", "gather GB/s",
                    "gather Gw/s", "read GB/s", "stream GB/s");
    } else {
        std::printf("{\"simd\": \"%s\", \"threads\": %d, \"rows\": %lld, \"cols\": %lld, \"sparsity\": %g, \"types\": [",
                    actsparse_kernels_simd(), o.threads, (long long) o.rows, (long long) o.cols, o.sparsity);
    }
    for (size_t i = 0; i < o.types.size(); ++i) {
        int64_t n_mats = 0;
        size_t row_bytes = 0;
        const timing t = bench_type(o, o.types[i], idx, val, n_mats, row_bytes);
        const double bytes = (double) idx.size() * row_bytes * n_mats;
        const double weights = (double) idx.size() * o.cols * n_mats;
        const char * name = ggml_type_name(o.types[i]);
        if (o.json) {
            std::printf("%s{\"type\": \"%s\", \"accumulate_gbs\": %.6g, \"accumulate_gweights\": %.6g, "
                        "\"gather_gbs\": %.6g, \"gather_gweights\": %.6g, \"read_active_gbs\": %.6g, "
                        "\"read_all_gbs\": %.6g}",
                        i ? ", " : "", name, bytes / t.accumulate_s / 1e9, weights / t.accumulate_s / 1e9,
                        bytes / t.gather_s / 1e9, weights / t.gather_s / 1e9, bytes / t.read_active_s / 1e9,
                        bytes / t.read_all_s / 1e9);
        } else {
            std::printf("%-8s %12.1f %12.1f %12.1f %12.1f %12.1f %12.1f\n", name, bytes / t.accumulate_s / 1e9,
                        weights / t.accumulate_s / 1e9, bytes / t.gather_s / 1e9, weights / t.gather_s / 1e9,
                        bytes / t.read_active_s / 1e9, bytes / t.read_all_s / 1e9);
        }
        std::fflush(stdout);
    }
    if (o.json) std::printf("]}\n");
    return 0;
}
