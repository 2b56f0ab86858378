// Kernel tests: every actsparse kernel against a dense reference with the same mask, for every
// supported type, odd shapes, and 1, 2 and 3 threads (real threads, so sanitizers see races).
// Exit code 0 and "N passed, 0 failed" when all hold.
#include "actsparse-kernels.h"

#include "ggml-cpu.h"
#include "ggml.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

static int g_pass = 0, g_fail = 0;

static void check(bool ok, const std::string & what) {
    if (ok) {
        ++g_pass;
    } else {
        ++g_fail;
        std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    }
}

template <typename F> static void run_threads(int nth, F fn) {
    std::vector<std::thread> th;
    for (int ith = 0; ith < nth; ++ith) th.emplace_back(fn, ith, nth);
    for (auto & t : th) t.join();
}

static std::vector<uint8_t> quantize(ggml_type type, const std::vector<float> & x, int64_t nrows, int64_t ncols) {
    std::vector<uint8_t> q(ggml_row_size(type, ncols) * nrows);
    ggml_quantize_init(type);
    ggml_quantize_chunk(type, x.data(), q.data(), 0, nrows, ncols, nullptr);
    return q;
}

static std::vector<float> dequantize(ggml_type type, const std::vector<uint8_t> & q, int64_t nrows, int64_t ncols) {
    std::vector<float> x(nrows * ncols);
    const size_t rb = ggml_row_size(type, ncols);
    for (int64_t r = 0; r < nrows; ++r) {
        if (type == GGML_TYPE_F32) {
            std::memcpy(&x[r * ncols], &q[r * rb], ncols * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(&q[r * rb], &x[r * ncols], ncols);
        }
    }
    return x;
}

static std::vector<float> random_vec(std::mt19937 & rng, size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto & x : v) x = d(rng);
    return v;
}

// Input-sparse accumulate over a transposed weight: y = sum_k v_k W[idx_k, :].
static void test_axpy(ggml_type type, int64_t nrows, int64_t ncols, std::mt19937 & rng) {
    const auto w = random_vec(rng, nrows * ncols, 0.05f);
    const auto q = type == GGML_TYPE_F32 ? std::vector<uint8_t>((const uint8_t *) w.data(), (const uint8_t *) (w.data() + w.size()))
                                         : quantize(type, w, nrows, ncols);
    const auto wd = dequantize(type, q, nrows, ncols);
    const size_t rb = ggml_row_size(type, ncols);
    std::vector<int32_t> idx;
    std::vector<float> val;
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (int64_t r = 0; r < nrows; ++r) {
        if (u(rng) < 0.45f) {
            idx.push_back((int32_t) r);
            val.push_back(u(rng) * 2.0f - 1.0f);
        }
    }
    std::vector<double> ref(ncols, 0.0);
    for (size_t k = 0; k < idx.size(); ++k)
        for (int64_t c = 0; c < ncols; ++c) ref[c] += (double) val[k] * wd[idx[k] * ncols + c];
    double scale = 1e-6;
    for (double r : ref) scale = std::max(scale, std::fabs(r));

    // Where the kernel rounds its inputs to 8 bits (integer dot products), it may be off by what
    // ggml's dense product loses rounding the same input vector to Q8_0: measured here on the
    // same data, with the masked input laid out densely as a dense mat-vec would see it.
    double tol = 1e-4 * scale;
    if (actsparse_axpy_rounds_inputs(type)) {
        const int64_t padded = (nrows + 31) / 32 * 32;
        std::vector<float> x(padded, 0.0f);
        for (size_t k = 0; k < idx.size(); ++k) x[idx[k]] = val[k];
        const auto xr = dequantize(GGML_TYPE_Q8_0, quantize(GGML_TYPE_Q8_0, x, 1, padded), 1, padded);
        double dense_err = 0;
        for (int64_t c = 0; c < ncols; ++c) {
            double yr = 0;
            for (size_t k = 0; k < idx.size(); ++k) yr += (double) xr[idx[k]] * wd[idx[k] * ncols + c];
            dense_err = std::max(dense_err, std::fabs(yr - ref[c]));
        }
        tol = 3.0 * dense_err;  // measured 1.2-1.7x: one scale covers sixteen rows of unequal weight scales
    }

    const int64_t bs = ggml_blck_size(type);
    for (int nth = 1; nth <= 3; ++nth) {
        std::vector<float> y(ncols, NAN), yr(ncols, NAN);
        run_threads(nth, [&](int ith, int n) {
            const int64_t nb = ncols / bs;
            const int64_t c0 = nb * ith / n * bs, c1 = nb * (ith + 1) / n * bs;
            if (c0 < c1) actsparse_axpy_rows(type, q.data(), rb, idx.data(), val.data(), (int64_t) idx.size(), y.data(), c0, c1);
        });
        actsparse_axpy_rows_ref(type, q.data(), rb, idx.data(), val.data(), (int64_t) idx.size(), yr.data(), 0, ncols);
        double err = 0, err_ref = 0;
        for (int64_t c = 0; c < ncols; ++c) {
            err = std::max(err, std::fabs(y[c] - ref[c]));
            err_ref = std::max(err_ref, (double) std::fabs(y[c] - yr[c]));
        }
        // the reference rounds the same way, so that comparison stays tight
        check(err <= tol + 1e-6 && err_ref <= 1e-5 * scale + 1e-7,
              std::string("axpy ") + ggml_type_name(type) + " " + std::to_string(nrows) + "x" + std::to_string(ncols) +
              " threads " + std::to_string(nth) + " err " + std::to_string(err / scale) + " allowed " +
              std::to_string(tol / scale));
    }
}

// Selected rows of a weight times x, against ggml's dense mat-vec (the same vec_dot, so equal).
static void test_rows_dot(ggml_type type, int64_t nrows, int64_t ncols, std::mt19937 & rng) {
    const auto w = random_vec(rng, nrows * ncols, 0.05f);
    const auto x = random_vec(rng, ncols);
    ggml_init_params ip = { 64 * 1024 * 1024, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * W = ggml_new_tensor_2d(ctx, type, ncols, nrows);
    if (type == GGML_TYPE_F32) {
        std::memcpy(W->data, w.data(), w.size() * sizeof(float));
    } else {
        const auto q = quantize(type, w, nrows, ncols);
        std::memcpy(W->data, q.data(), q.size());
    }
    ggml_tensor * X = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, ncols);
    std::memcpy(X->data, x.data(), x.size() * sizeof(float));
    ggml_tensor * Y = ggml_mul_mat(ctx, W, X);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, Y);
    ggml_graph_compute_with_ctx(ctx, gf, 1);
    const float * dense = (const float *) Y->data;

    const ggml_type vdt = ggml_get_type_traits_cpu(type)->vec_dot_type;
    std::vector<uint8_t> xq(ggml_row_size(vdt, ncols));
    if (vdt == GGML_TYPE_F32) std::memcpy(xq.data(), x.data(), ncols * sizeof(float));
    else ggml_get_type_traits_cpu(vdt)->from_float(x.data(), xq.data(), ncols);

    std::vector<int32_t> idx;
    std::vector<float> val;
    for (int64_t r = 0; r < nrows; r += 1 + (r % 3)) {
        idx.push_back((int32_t) r);
        val.push_back(0.5f + (float) (r % 7));
    }
    for (int nth = 1; nth <= 3; ++nth) {
        std::vector<float> out(idx.size(), NAN);
        run_threads(nth, [&](int ith, int n) {
            const int64_t k = (int64_t) idx.size();
            actsparse_rows_dot(type, W->data, W->nb[1], ncols, idx.data(), val.data(), xq.data(), out.data(),
                               k * ith / n, k * (ith + 1) / n);
        });
        double err = 0, scale = 1e-6;
        for (size_t k = 0; k < idx.size(); ++k) {
            const double ref = (double) val[k] * dense[idx[k]];
            err = std::max(err, std::fabs(out[k] - ref));
            scale = std::max(scale, std::fabs(ref));
        }
        check(err <= 1e-5 * scale, std::string("rows_dot ") + ggml_type_name(type) + " " + std::to_string(nrows) +
              "x" + std::to_string(ncols) + " threads " + std::to_string(nth));
    }
    ggml_free(ctx);
}

// tscale 10: about 87% of entries inactive, so the SIMD select also skips whole groups
static void test_mask_and_select(std::mt19937 & rng, float tscale) {
    const std::string ts = " tscale " + std::to_string((int) tscale);
    for (int act = 0; act < 3; ++act) {
        const int64_t n = 1537;
        const auto x = random_vec(rng, n, 2.0f);
        const auto t = random_vec(rng, n, tscale);
        std::vector<float> ta(n);
        for (int64_t i = 0; i < n; ++i) ta[i] = std::fabs(t[i]);
        for (int scalar = 0; scalar < 2; ++scalar) {
            for (int nth = 1; nth <= 3; ++nth) {
                std::vector<float> y(n, NAN);
                std::vector<int64_t> zeros(nth);
                run_threads(nth, [&](int ith, int m) {
                    zeros[ith] = actsparse_act_mask(x.data(), y.data(), ta.data(), scalar, (actsparse_act) act,
                                                    n * ith / m, n * (ith + 1) / m);
                });
                int64_t z = 0, zref = 0;
                bool ok = true;
                for (int ith = 0; ith < nth; ++ith) z += zeros[ith];
                for (int64_t i = 0; i < n; ++i) {
                    const float a = actsparse_apply_act((actsparse_act) act, x[i]);
                    const float ti = scalar ? ta[0] : ta[i];
                    const float want = std::fabs(a) > ti ? a : 0.0f;
                    zref += !(std::fabs(a) > ti);
                    ok &= y[i] == want;
                }
                check(ok && z == zref, "act_mask act " + std::to_string(act) + " scalar " + std::to_string(scalar) +
                      " threads " + std::to_string(nth) + ts);
            }
            std::vector<int32_t> idx(n);
            std::vector<float> val(n);
            const int64_t k = actsparse_select(x.data(), ta.data(), scalar, (actsparse_act) act, n, idx.data(), val.data());
            bool ok = true;
            int64_t j = 0;
            for (int64_t i = 0; i < n; ++i) {
                const float a = actsparse_apply_act((actsparse_act) act, x[i]);
                if (std::fabs(a) > (scalar ? ta[0] : ta[i])) {
                    ok &= j < k && idx[j] == i && val[j] == a;
                    ++j;
                }
            }
            check(ok && j == k, "select act " + std::to_string(act) + " scalar " + std::to_string(scalar) + ts);
        }
    }
}

int main() {
    ggml_cpu_init();
    std::printf("kernels: %s\n", actsparse_kernels_simd());
    std::mt19937 rng(42);
    test_mask_and_select(rng, 0.3f);
    test_mask_and_select(rng, 10.0f);
    const ggml_type block32[] = { GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1,
                                  GGML_TYPE_IQ4_NL };
    const ggml_type block256[] = { GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K };
    const ggml_type floats[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 };
    for (ggml_type t : floats) {
        test_axpy(t, 37, 3 * 7 * 11, rng);
        test_axpy(t, 129, 576, rng);
        test_rows_dot(t, 37, 96, rng);
        test_rows_dot(t, 131, 576, rng);
    }
    for (ggml_type t : block32) {
        test_axpy(t, 37, 96, rng);
        test_axpy(t, 131, 576, rng);
        test_rows_dot(t, 37, 96, rng);
        test_rows_dot(t, 131, 576, rng);
    }
    for (ggml_type t : block256) {
        test_axpy(t, 37, 256, rng);
        test_axpy(t, 67, 1536, rng);
        test_rows_dot(t, 37, 256, rng);
        test_rows_dot(t, 67, 1536, rng);
    }
    std::printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
