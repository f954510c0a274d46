// GPU tests: every CUDA kernel against the CPU backend on the same inputs (cpu_reference.cpp
// computes the CPU side with the library's own ops and autograd), host<->device copies, the
// caching allocator and the device random numbers. Without a CUDA device the program says so
// and exits with 77, which CTest reports as "skipped" (SKIP_RETURN_CODE), never as passed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <mixmoe/backend/cuda/cuda.cuh>
#include <mixmoe/ops/matmul.hpp>

#include "cpu_reference.hpp"

using namespace mixmoe;
using mixmoe_cuda_test::Vec;

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("  FAILED: %s\n", what.c_str());
  }
}

/// max |got - want| / (1 + max |want|) <= tol.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tol, const std::string& what) {
  if (got.size() != want.size()) {
    expect(false, what + ": " + std::to_string(got.size()) + " values, expected " + std::to_string(want.size()));
    return;
  }
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    err = std::fmax(err, std::fabs(static_cast<double>(got[i]) - want[i]));
    scale = std::fmax(scale, std::fabs(static_cast<double>(want[i])));
  }
  const double rel = err / (1.0 + scale);
  ++checks;
  if (!(rel <= tol)) {
    ++failures;
    std::printf("  FAILED: %s: relative error %.3g > %.3g\n", what.c_str(), rel, tol);
  }
}

Vec random_vec(std::size_t n, Generator& gen, double scale = 1.0) {
  Vec v(n);
  for (auto& x : v) x = static_cast<float>(gen.normal(0.0, scale));
  return v;
}

Tensor<float, Cuda> dev(const Vec& v, const Shape& s) { return Tensor<float, Cuda>::from(v, s); }

void test_copies() {
  Generator g1(7), g2(7);
  const auto h = Tensor<float>::randn({5, 6}, g1);
  const auto d = Tensor<float, Cuda>::randn({5, 6}, g2);
  expect(d.to_vector() == h.to_vector(), "randn from the same generator state is the same on Cpu and Cuda");
  expect(to_device<Cpu>(to_device<Cuda>(h)).to_vector() == h.to_vector(), "host -> device -> host round trip");
  expect(d.transpose(0, 1).contiguous().to_vector() == h.transpose(0, 1).contiguous().to_vector(),
         "transpose().contiguous() on the device");
  expect(d.slice(1, 2, 5).clone().to_vector() == h.slice(1, 2, 5).clone().to_vector(), "clone of a sliced view");
  expect(d[3][4].item() == h(3, 4), "item() of a one-element view");
  auto dz = Tensor<float, Cuda>::zeros({5, 6});
  auto hz = Tensor<float>::zeros({5, 6});
  dz.slice(1, 1, 3).fill_(2.5f);
  hz.slice(1, 1, 3).fill_(2.5f);
  expect(dz.to_vector() == hz.to_vector(), "fill_ of a strided view");
  dz.transpose(0, 1).slice(0, 0, 2).copy_from(d.transpose(0, 1).slice(0, 3, 5));
  hz.transpose(0, 1).slice(0, 0, 2).copy_from(h.transpose(0, 1).slice(0, 3, 5));
  expect(dz.to_vector() == hz.to_vector(), "copy_from between strided views");
  const auto dd = d.to<double>().to_vector();
  const auto hd = h.to<double>().to_vector();
  expect(dd == hd, "to<double>() on the device");
  expect(Tensor<std::int32_t, Cuda>::arange(9).to_vector() == Tensor<std::int32_t>::arange(9).to_vector(), "arange");
}

void test_allocator() {
  auto& a = mixmoe::cuda::CachingDeviceAllocator::instance();
  { auto t = Tensor<float, Cuda>::empty({1000, 3}); }
  const AllocatorStats s0 = a.stats();
  { auto t = Tensor<float, Cuda>::empty({1000, 3}); }
  const AllocatorStats s1 = a.stats();
  expect(s1.system_allocs == s0.system_allocs, "a freed block of the same size class is reused (no cudaMalloc)");
  expect(s1.cache_hits == s0.cache_hits + 1, "the reuse is counted as a cache hit");
  a.empty_cache();
  expect(a.stats().bytes_cached == 0, "empty_cache returns every cached block");
}

void test_random() {
  const auto a = mixmoe::cuda::randn<float>({1 << 20}, 42).to_vector();
  const auto b = mixmoe::cuda::randn<float>({1 << 20}, 42).to_vector();
  expect(a == b, "device randn is deterministic for a seed");
  const auto tail = mixmoe::cuda::randn<float>({1000}, 42, 5).to_vector();
  expect(std::vector<float>(a.begin() + 5, a.begin() + 1005) == tail, "a draw at offset 5 continues the stream");
  double m = 0, s = 0;
  for (float v : a) m += v;
  m /= static_cast<double>(a.size());
  for (float v : a) s += (v - m) * (v - m);
  s = std::sqrt(s / static_cast<double>(a.size()));
  expect(std::fabs(m) < 0.005 && std::fabs(s - 1.0) < 0.005, "randn has mean 0 and standard deviation 1 (2^20 draws)");
  const auto u = mixmoe::cuda::uniform<float>({1 << 20}, 3, 0, -2.0, 3.0).to_vector();
  double lo = 1e9, hi = -1e9, um = 0;
  for (float v : u) {
    lo = std::fmin(lo, v);
    hi = std::fmax(hi, v);
    um += v;
  }
  um /= static_cast<double>(u.size());
  expect(lo >= -2.0 && hi < 3.0 && std::fabs(um - 0.5) < 0.01, "uniform(-2, 3) stays in range with mean 0.5");
}

void test_gemm() {
  Generator gen(11);
  const std::int64_t m = 67, n = 45, k = 129;
  for (int t = 0; t < 4; ++t) {
    const bool ta = t & 1, tb = t & 2;
    const Vec a = random_vec(static_cast<std::size_t>(m * k), gen), b = random_vec(static_cast<std::size_t>(k * n), gen);
    const auto da = dev(a, ta ? Shape{k, m} : Shape{m, k}), db = dev(b, tb ? Shape{n, k} : Shape{k, n});
    expect_close(mixmoe::cuda::matmul(da, db, ta, tb).to_vector(), mixmoe_cuda_test::cpu_matmul(a, b, m, n, k, ta, tb), 1e-5,
                 std::string("fp32 GEMM, op(A) ") + (ta ? "A^T" : "A") + ", op(B) " + (tb ? "B^T" : "B"));
  }
  // Batched: each product against its own CPU GEMM.
  const std::int64_t batch = 3;
  const Vec a = random_vec(static_cast<std::size_t>(batch * m * k), gen), b = random_vec(static_cast<std::size_t>(batch * k * n), gen);
  const auto da = dev(a, {batch, m, k}), db = dev(b, {batch, k, n});
  auto dc = Tensor<float, Cuda>::empty({batch, m, n});
  mixmoe::cuda::gemm_strided_batched<float>(false, false, m, n, k, 1.0f, da.data(), k, m * k, db.data(), n, k * n, 0.0f, dc.data(),
                                    n, m * n, batch);
  const auto c = dc.to_vector();
  for (std::int64_t i = 0; i < batch; ++i) {
    const Vec ai(a.begin() + i * m * k, a.begin() + (i + 1) * m * k), bi(b.begin() + i * k * n, b.begin() + (i + 1) * k * n);
    expect_close(Vec(c.begin() + i * m * n, c.begin() + (i + 1) * m * n),
                 mixmoe_cuda_test::cpu_matmul(ai, bi, m, n, k, false, false), 1e-5, "strided batched fp32 GEMM");
  }
  // bf16 operands: within bf16's rounding (8 bits of mantissa) of the fp32 product.
  const Vec a2 = random_vec(static_cast<std::size_t>(m * k), gen), b2 = random_vec(static_cast<std::size_t>(k * n), gen);
  const mixmoe::cuda::Bf16Buffer ba(dev(a2, {m, k})), bb(dev(b2, {k, n}));
  expect_close(mixmoe::cuda::matmul_bf16(ba, bb).to_vector(), mixmoe_cuda_test::cpu_matmul(a2, b2, m, n, k, false, false), 2e-2,
               "bf16 GEMM with fp32 accumulation");
  // ...and exact up to fp32 accumulation order against the CPU product of the bf16-rounded operands.
  const auto ra = ba.to_float().to_vector(), rb = bb.to_float().to_vector();
  expect_close(mixmoe::cuda::matmul_bf16(ba, bb).to_vector(), mixmoe_cuda_test::cpu_matmul(ra, rb, m, n, k, false, false), 1e-5,
               "bf16 GEMM equals the fp32 GEMM of the rounded operands");
}

void test_ops() {
  Generator gen(5);
  for (const std::int64_t cols : {7LL, 192LL, 1000LL}) {
    const std::int64_t rows = 37;
    const auto sz = static_cast<std::size_t>(rows * cols);
    const Vec x = random_vec(sz, gen, 2.0), g = random_vec(sz, gen), w = random_vec(static_cast<std::size_t>(cols), gen);
    const auto dx = dev(x, {rows, cols}), dg = dev(g, {rows, cols}), dw = dev(w, {cols});
    const std::string c = " (C = " + std::to_string(cols) + ")";

    const auto sm = mixmoe_cuda_test::cpu_softmax(x, g, rows, cols);
    const auto y = mixmoe::cuda::softmax_last(dx);
    expect_close(y.to_vector(), sm.y, 1e-6, "softmax forward" + c);
    expect_close(mixmoe::cuda::softmax_last_backward(dg, y).to_vector(), sm.dx, 1e-6, "softmax backward" + c);

    const auto rn = mixmoe_cuda_test::cpu_rms_norm(x, w, g, rows, cols, 1e-6);
    const auto [ry, rstd] = mixmoe::cuda::rms_norm(dx, dw, 1e-6);
    expect_close(ry.to_vector(), rn.y, 1e-6, "rms_norm forward" + c);
    const auto [rdx, rdw] = mixmoe::cuda::rms_norm_backward(dg, dx, dw, rstd);
    expect_close(rdx.to_vector(), rn.dx, 1e-5, "rms_norm backward dx" + c);
    expect_close(rdw.to_vector(), rn.dw, 1e-5, "rms_norm backward dweight" + c);

    const auto si = mixmoe_cuda_test::cpu_silu(x, g, rows, cols);
    expect_close(mixmoe::cuda::silu(dx).to_vector(), si.y, 1e-6, "silu forward" + c);
    expect_close(mixmoe::cuda::silu_backward(dg, dx).to_vector(), si.dx, 1e-6, "silu backward" + c);

    const auto mr = mixmoe_cuda_test::cpu_mul_row(x, w, g, rows, cols);
    expect_close(mixmoe::cuda::mul(dx, dw).to_vector(), mr.y, 1e-6, "mul by a broadcast row" + c);
    expect_close(mixmoe::cuda::mul(dg, dw).to_vector(), mr.dx, 1e-6, "mul backward, the full operand" + c);
    expect_close(mixmoe::cuda::sum_rows(dg, dx).to_vector(), mr.dw, 1e-5, "mul backward, the broadcast row" + c);
    Vec sum_ref(sz);
    for (std::size_t i = 0; i < sz; ++i) sum_ref[i] = x[i] + w[i % static_cast<std::size_t>(cols)];
    expect_close(mixmoe::cuda::add(dx, dw).to_vector(), sum_ref, 1e-7, "add a broadcast row" + c);

    for (const double eps : {0.0, 1e-6}) {
      const std::int64_t f = cols / 2 + 1;
      const Vec gf = random_vec(static_cast<std::size_t>(rows * f), gen);
      const auto fm = mixmoe_cuda_test::cpu_rfft_magnitude(x, gf, rows, cols, eps);
      const auto [mag, spec] = mixmoe::cuda::rfft_magnitude(dx, eps);
      expect_close(mag.to_vector(), fm.y, 1e-5, "rfft magnitude forward" + c);
      expect_close(mixmoe::cuda::rfft_magnitude_backward(dev(gf, {rows, f}), spec, mag, dx.shape()).to_vector(), fm.dx, 1e-5,
                   "rfft magnitude backward" + c);
    }
  }
}

// Var<float, Cuda>: the autograd ops that run on the device, against the same ops on the CPU.
void test_autograd() {
  Generator gen(23);
  const std::int64_t rows = 50, n = 33, k = 70;
  const Vec x = random_vec(rows * k, gen), w = random_vec(n * k, gen), b = random_vec(n, gen), g = random_vec(rows * n, gen);
  auto xv = parameter(dev(x, {rows, k})), wv = parameter(dev(w, {n, k})), bv = parameter(dev(b, {n}));
  auto y = linear(xv, wv, bv);
  y.backward(dev(g, {rows, n}));
  const auto ref = mixmoe_cuda_test::cpu_linear(x, w, b, g, rows, n, k);
  expect_close(y.value().to_vector(), ref.y, 1e-5, "Var linear forward (with bias)");
  expect_close(xv.grad().to_vector(), ref.dx, 1e-5, "Var linear backward dx");
  expect_close(wv.grad().to_vector(), ref.dw, 1e-5, "Var linear backward dweight");
  expect_close(bv.grad().to_vector(), ref.db, 1e-5, "Var linear backward dbias");
  // A second backward accumulates into the same gradients (autograd's add_into on the device).
  auto y2 = linear(xv, wv, bv);
  y2.backward(dev(g, {rows, n}));
  Vec twice = ref.dw;
  for (auto& v : twice) v *= 2;
  expect_close(wv.grad().to_vector(), twice, 1e-5, "gradients accumulate over two backward passes");

  const std::int64_t batch = 3, m = 17, nn = 9, kk = 21;
  const Vec a = random_vec(batch * m * kk, gen), bm = random_vec(kk * nn, gen), gm = random_vec(batch * m * nn, gen);
  auto av = parameter(dev(a, {batch, m, kk})), bmv = parameter(dev(bm, {kk, nn}));
  auto ym = matmul(av, bmv);
  ym.backward(dev(gm, {batch, m, nn}));
  const auto mref = mixmoe_cuda_test::cpu_matmul_broadcast(a, bm, gm, batch, m, nn, kk);
  expect_close(ym.value().to_vector(), mref.y, 1e-5, "Var batched matmul forward (b broadcast)");
  expect_close(av.grad().to_vector(), mref.dx, 1e-5, "Var batched matmul backward da");
  expect_close(bmv.grad().to_vector(), mref.dw, 1e-5, "Var batched matmul backward db (summed over the batch)");
}

void test_errors() {
  bool threw = false;
  try {
    (void)mixmoe::cuda::matmul(Tensor<float, Cuda>::zeros({2, 3}), Tensor<float, Cuda>::zeros({4, 5}));
  } catch (const Error& e) {
    threw = std::string(e.what()).find("inner extents") != std::string::npos;
  }
  expect(threw, "a shape mismatch in mixmoe::cuda::matmul is an Error naming the extents");
}

}  // namespace

int main() {
  const int devices = mixmoe::cuda::device_count();
  if (devices == 0) {
    std::printf("test_cuda: SKIPPED: no CUDA device found (or no driver); no GPU test ran\n");
    return 77;
  }
  std::printf("test_cuda: on %s\n", mixmoe::cuda::device_description().c_str());
  const std::pair<const char*, std::function<void()>> tests[] = {
      {"host<->device copies and views", test_copies}, {"caching allocator", test_allocator},
      {"device random numbers", test_random},          {"cuBLAS GEMM", test_gemm},
      {"ops forward and backward", test_ops},          {"Var<float, Cuda> autograd", test_autograd},
      {"errors", test_errors}};
  for (const auto& [name, fn] : tests) {
    std::printf("%s\n", name);
    try {
      fn();
      mixmoe::cuda::synchronize();
    } catch (const std::exception& e) {
      ++failures;
      std::printf("  FAILED: threw %s\n", e.what());
    }
  }
  std::printf("test_cuda: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
