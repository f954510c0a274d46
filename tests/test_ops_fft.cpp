// rfft and rfft_magnitude: values against a direct DFT, Parseval, gradients (even and
// odd lengths), the plan cache, concurrent use from several threads, and errors.
#include "test_util.hpp"

#include <mixmoe/ops/fft.hpp>

#include <atomic>
#include <cmath>
#include <numbers>
#include <thread>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_fft {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

/// Direct O(N^2) DFT of each row of x (R, N) in double: (R, F, 2).
std::vector<double> direct_rfft(const std::vector<double>& x, index_t rows, index_t n) {
  const index_t f = n / 2 + 1;
  std::vector<double> y(static_cast<std::size_t>(rows * f * 2), 0.0);
  for (index_t r = 0; r < rows; ++r)
    for (index_t k = 0; k < f; ++k) {
      double re = 0, im = 0;
      for (index_t j = 0; j < n; ++j) {
        // (k * j) mod n keeps the angle small, so cos/sin stay accurate for large k * j
        const double t = 2.0 * std::numbers::pi * static_cast<double>((k * j) % n) / static_cast<double>(n);
        re += x[r * n + j] * std::cos(t);
        im -= x[r * n + j] * std::sin(t);
      }
      y[(r * f + k) * 2] = re;
      y[(r * f + k) * 2 + 1] = im;
    }
  return y;
}

/// dL/dx_n = sum_k gr_k cos(t_kn) - gi_k sin(t_kn), directly, for g (R, F, 2).
std::vector<double> direct_rfft_grad(const std::vector<double>& g, index_t rows, index_t n) {
  const index_t f = n / 2 + 1;
  std::vector<double> gx(static_cast<std::size_t>(rows * n), 0.0);
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < n; ++j) {
      double acc = 0;
      for (index_t k = 0; k < f; ++k) {
        const double t = 2.0 * std::numbers::pi * static_cast<double>((k * j) % n) / static_cast<double>(n);
        acc += g[(r * f + k) * 2] * std::cos(t) - g[(r * f + k) * 2 + 1] * std::sin(t);
      }
      gx[r * n + j] = acc;
    }
  return gx;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::abs(e));
  return m;
}

template <class T>
std::vector<double> as_double(const Tensor<T>& t) {
  const auto v = t.to_vector();
  return std::vector<double>(v.begin(), v.end());
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

Shape with_last(std::initializer_list<index_t> lead, index_t n) {
  Shape s(lead);
  s.push_back(n);
  return s;
}

}  // namespace

TEST_CASE("rfft matches a direct DFT in double, even and odd N, batched", "[fft]") {
  std::uint64_t seed = 10;
  for (index_t n : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 30, 64, 100, 127}) {
    for (auto lead : {std::initializer_list<index_t>{}, {3}, {2, 3}, {2, 1, 4}}) {
      const Shape s = with_last(lead, n);
      INFO("shape " << s);
      auto x = rand_var(s, ++seed, false);
      auto y = rfft(x);
      Shape expect = s.with(-1, n / 2 + 1);
      expect.push_back(2);
      REQUIRE(y.shape() == expect);
      const auto ref = direct_rfft(x.value().to_vector(), x.numel() / n, n);
      REQUIRE(max_diff(y.value().to_vector(), ref) <= 1e-12 * static_cast<double>(n) * (1 + max_abs(ref)));
    }
  }
}

TEST_CASE("rfft in float matches the double DFT to float accuracy", "[fft]") {
  std::uint64_t seed = 100;
  for (index_t n : {1, 2, 5, 8, 9, 33, 64, 250, 256}) {
    for (auto lead : {std::initializer_list<index_t>{}, {4}, {3, 2}}) {
      const Shape s = with_last(lead, n);
      INFO("shape " << s);
      Generator g(++seed);
      auto xf = Vf(Tf::randn(s, g), false);
      auto y = rfft(xf);
      const auto ref = direct_rfft(as_double(xf.value()), xf.numel() / n, n);
      const double scale = std::sqrt(static_cast<double>(n));  // |Y_k| of unit normals grows like sqrt(N)
      REQUIRE(max_diff(as_double(y.value()), ref) <= 2e-6 * scale * (1 + std::log2(static_cast<double>(n))));
    }
  }
}

TEST_CASE("rfft of simple signals", "[fft]") {
  // an impulse has a flat spectrum; a constant has only DC; a cosine at bin 2 has two peaks
  auto impulse = rfft(Vd(Td::from({1.0, 0.0, 0.0, 0.0, 0.0}, {5})));
  REQUIRE(impulse.value().to_vector() == std::vector<double>{1, 0, 1, 0, 1, 0});
  auto constant = rfft(Vd(Td::from({2.0, 2.0, 2.0, 2.0}, {4})));
  REQUIRE(max_diff(constant.value().to_vector(), {8, 0, 0, 0, 0, 0}) < 1e-14);
  std::vector<double> c(8);
  for (int j = 0; j < 8; ++j) c[j] = std::cos(2 * std::numbers::pi * 2 * j / 8);
  auto cosine = rfft(Vd(Td::from(c, {8})));
  REQUIRE(max_diff(cosine.value().to_vector(), {0, 0, 0, 0, 4, 0, 0, 0, 0, 0}) < 1e-12);
  // alternating signs: all energy in the Nyquist bin (real), for even N
  auto alt = rfft(Vd(Td::from({1.0, -1.0, 1.0, -1.0, 1.0, -1.0}, {6})));
  REQUIRE(max_diff(alt.value().to_vector(), {0, 0, 0, 0, 0, 0, 6, 0}) < 1e-12);
}

TEST_CASE("rfft accepts views and misaligned rows", "[fft]") {
  for (index_t n : {5, 8, 9}) {
    auto base = rand_var({7, n}, 7 + static_cast<std::uint64_t>(n), false);
    // rows starting at an odd element offset are not SIMD-aligned: they are staged
    auto sliced = Vd(base.value().slice(0, 1, 7), false);
    const auto ref = direct_rfft(sliced.value().to_vector(), 6, n);
    REQUIRE(max_diff(rfft(sliced).value().to_vector(), ref) < 1e-12 * static_cast<double>(n) * (1 + max_abs(ref)));
    // a transposed (non-contiguous) view is made contiguous first
    auto xt = rand_var({n, 4}, 99, false);
    auto t = Vd(xt.value().transpose(0, 1), false);
    const auto ref_t = direct_rfft(t.value().to_vector(), 4, n);
    REQUIRE(max_diff(rfft(t).value().to_vector(), ref_t) < 1e-12 * static_cast<double>(n) * (1 + max_abs(ref_t)));
  }
}

TEST_CASE("Parseval: sum x^2 equals the one-sided spectral energy over N", "[fft]") {
  std::uint64_t seed = 500;
  for (index_t n : {1, 2, 3, 8, 9, 16, 31, 128}) {
    auto x = rand_var({3, n}, ++seed, false);
    const auto y = rfft(x).value().to_vector();
    const auto xv = x.value().to_vector();
    const index_t f = n / 2 + 1;
    for (index_t r = 0; r < 3; ++r) {
      double time_energy = 0, freq_energy = 0;
      for (index_t j = 0; j < n; ++j) time_energy += xv[r * n + j] * xv[r * n + j];
      for (index_t k = 0; k < f; ++k) {
        const double p = y[(r * f + k) * 2] * y[(r * f + k) * 2] + y[(r * f + k) * 2 + 1] * y[(r * f + k) * 2 + 1];
        // bins 0 and (for even N) N/2 occur once in the full spectrum; the others twice (conjugate pairs)
        const bool single = k == 0 || (n % 2 == 0 && k == n / 2);
        freq_energy += single ? p : 2 * p;
      }
      INFO("n " << n << " row " << r);
      REQUIRE(std::abs(time_energy - freq_energy / static_cast<double>(n)) <= 1e-12 * (1 + time_energy));
    }
  }
}

TEST_CASE("rfft_magnitude values", "[fft]") {
  for (index_t n : {1, 4, 7, 16}) {
    auto x = rand_var({2, 3, n}, 40 + static_cast<std::uint64_t>(n), false);
    const auto y = rfft(x).value().to_vector();
    for (double eps : {0.0, 0.25}) {
      auto m = rfft_magnitude(x, eps);
      REQUIRE(m.shape() == Shape{2, 3, n / 2 + 1});
      const auto mv = m.value().to_vector();
      for (std::size_t i = 0; i < mv.size(); ++i)
        REQUIRE(std::abs(mv[i] - std::sqrt(y[2 * i] * y[2 * i] + y[2 * i + 1] * y[2 * i + 1] + eps)) < 1e-12);
    }
  }
  // float
  Generator g(3);
  auto xf = Vf(Tf::randn({4, 10}, g), false);
  const auto ref = direct_rfft(as_double(xf.value()), 4, 10);
  const auto mf = rfft_magnitude(xf, 1e-3).value().to_vector();
  for (std::size_t i = 0; i < mf.size(); ++i)
    REQUIRE(std::abs(mf[i] - std::sqrt(ref[2 * i] * ref[2 * i] + ref[2 * i + 1] * ref[2 * i + 1] + 1e-3)) < 1e-4);
}

TEST_CASE("rfft gradcheck, even and odd N", "[fft][gradcheck]") {
  std::uint64_t seed = 700;
  for (index_t n : {1, 2, 5, 8, 9, 16}) {
    for (auto lead : {std::initializer_list<index_t>{}, {3}, {2, 2}}) {
      const Shape s = with_last(lead, n);
      INFO("shape " << s);
      MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rfft(in[0]); }, {rand_var(s, ++seed)});
    }
  }
}

TEST_CASE("rfft_magnitude gradcheck with eps > 0, even and odd N", "[fft][gradcheck]") {
  std::uint64_t seed = 800;
  for (index_t n : {1, 2, 5, 8, 9, 16}) {
    for (auto lead : {std::initializer_list<index_t>{}, {3}, {2, 2}}) {
      const Shape s = with_last(lead, n);
      INFO("shape " << s);
      MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rfft_magnitude(in[0], 1e-3); },
                               {rand_var(s, ++seed)});
    }
  }
  // eps = 0 away from zero bins is differentiable too
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rfft_magnitude(in[0]); }, {rand_var({2, 6}, 9)});
}

TEST_CASE("rfft backward equals the direct adjoint formula, double and float", "[fft][gradient]") {
  std::uint64_t seed = 900;
  for (index_t n : {1, 2, 3, 6, 7, 32, 33}) {
    const index_t rows = 5, f = n / 2 + 1;
    auto x = rand_var({rows, n}, ++seed);
    Generator gg(++seed);
    const Td g = Td::randn({rows, f, 2}, gg);
    rfft(x).backward(g);
    const auto ref = direct_rfft_grad(g.to_vector(), rows, n);
    INFO("n " << n);
    REQUIRE(max_diff(x.grad().to_vector(), ref) < 1e-12 * static_cast<double>(n) * (1 + max_abs(ref)));

    Generator gx(++seed);
    auto xf = Vf(Tf::randn({rows, n}, gx), true);
    const Tf gf = g.to<float>();
    rfft(xf).backward(gf);
    const auto ref_f = direct_rfft_grad(as_double(gf), rows, n);
    REQUIRE(max_diff(as_double(xf.grad()), ref_f) < 1e-5 * static_cast<double>(n) * (1 + max_abs(ref_f)));
  }
}

TEST_CASE("rfft_magnitude gradient at an all-zero input", "[fft][gradient]") {
  // every bin is zero: eps > 0 gives a finite (zero) gradient; eps = 0 uses the zero subgradient, not NaN
  for (double eps : {0.0, 1e-6}) {
    auto x = Vd(Td::zeros({2, 8}), true);
    sum(rfft_magnitude(x, eps)).backward();
    for (double v : x.grad().to_vector()) REQUIRE(v == 0.0);
  }
  auto xf = Vf(Tf::zeros({9}), true);
  sum(rfft_magnitude(xf)).backward();
  for (float v : xf.grad().to_vector()) REQUIRE(v == 0.0f);
}

TEST_CASE("rfft records no graph under no_grad and skips inputs that need no gradient", "[fft][autograd]") {
  auto x = rand_var({3, 8}, 1);
  {
    no_grad guard;
    REQUIRE_FALSE(rfft(x).requires_grad());
    REQUIRE_FALSE(rfft_magnitude(x).requires_grad());
  }
  REQUIRE(rfft(x).requires_grad());
  REQUIRE_FALSE(rfft(rand_var({3, 8}, 2, false)).requires_grad());
}

TEST_CASE("FFTW plan cache reuses plans per length and precision", "[fft][plans]") {
  auto& cache = cpu::fft::PlanCache::instance();
  const auto p1 = cache.get<double>(cpu::fft::Transform::r2c, 1000);
  const std::size_t before = cache.size();
  REQUIRE(cache.get<double>(cpu::fft::Transform::r2c, 1000) == p1);
  REQUIRE(cache.size() == before);
  (void)cache.get<float>(cpu::fft::Transform::r2c, 1000);  // the other precision is its own plan
  (void)cache.get<double>(cpu::fft::Transform::c2r, 1000);  // and so is the other direction
  REQUIRE(cache.size() == before + 2);
  MIXMOE_REQUIRE_ERROR(cache.get<double>(cpu::fft::Transform::r2c, 0), "transform length 0 out of range");

  // measured plans (planned on scratch arrays) give the same results
  cache.set_effort(cpu::fft::Effort::measure);
  REQUIRE(cache.effort() == cpu::fft::Effort::measure);
  auto x = rand_var({4, 48}, 3, false);
  const auto measured = rfft(x).value().to_vector();
  cache.set_effort(cpu::fft::Effort::estimate);
  const auto ref = direct_rfft(x.value().to_vector(), 4, 48);
  REQUIRE(max_diff(measured, ref) < 1e-10);
}

TEST_CASE("rffts of different lengths from two threads at once are correct", "[fft][threads]") {
  // Both threads plan new lengths while the other executes: the planner lock and the
  // new-array execute functions must keep every result right.
  std::atomic<int> failures{0};
  std::atomic<int> done{0};
  const auto worker = [&](index_t first_n, std::uint64_t seed) {
    try {
      for (int it = 0; it < 40; ++it) {
        const index_t n = first_n + 2 * (it % 20);  // 20 lengths per thread, disjoint between threads
        Generator g(seed + static_cast<std::uint64_t>(it));
        auto x = Vd(Td::randn({6, n}, g), true);
        auto y = rfft(x);
        const auto ref = direct_rfft(x.value().to_vector(), 6, n);
        if (max_diff(y.value().to_vector(), ref) > 1e-11 * static_cast<double>(n) * (1 + max_abs(ref))) ++failures;
        const Td gy = Td::randn(y.shape(), g);
        y.backward(gy);
        const auto ref_g = direct_rfft_grad(gy.to_vector(), 6, n);
        if (max_diff(x.grad().to_vector(), ref_g) > 1e-11 * static_cast<double>(n) * (1 + max_abs(ref_g))) ++failures;
        // float plans are cached separately; exercise them concurrently too
        auto xf = Vf(Tf::randn({3, n}, g), false);
        const auto ref_f = direct_rfft(as_double(xf.value()), 3, n);
        if (max_diff(as_double(rfft(xf).value()), ref_f) > 1e-4 * (1 + max_abs(ref_f))) ++failures;
        ++done;
      }
    } catch (...) {
      ++failures;
    }
  };
  std::thread a(worker, index_t{201}, 1);  // odd lengths
  std::thread b(worker, index_t{300}, 2);  // even lengths
  a.join();
  b.join();
  REQUIRE(failures.load() == 0);
  REQUIRE(done.load() == 80);
}

TEST_CASE("rfft errors name the op and the shape", "[fft][errors]") {
  MIXMOE_REQUIRE_ERROR(rfft(Vd(Td::zeros({3, 0}))), "[rfft] empty last axis in shape (3, 0)");
  MIXMOE_REQUIRE_ERROR(rfft(Vd(Td::scalar(1.0))), "[rfft] needs at least one axis (the transform axis), got shape ()");
  MIXMOE_REQUIRE_ERROR(rfft(Vd(Td::zeros({1, 1, 1, 1, 1, 4}))), "[rfft] input of shape (1, 1, 1, 1, 1, 4) would give");
  MIXMOE_REQUIRE_ERROR(rfft_magnitude(Vd(Td::zeros({0}))), "[rfft_magnitude] empty last axis in shape (0)");
  MIXMOE_REQUIRE_ERROR(rfft_magnitude(Vd(Td::zeros({4})), -1.0), "[rfft_magnitude] eps must be finite and >= 0, got -1");
  MIXMOE_REQUIRE_ERROR(rfft_magnitude(Vf(Tf::scalar(1.0f))), "[rfft_magnitude] needs at least one axis");
}

TEST_CASE("rfft with no rows gives an empty spectrum", "[fft]") {
  auto y = rfft(Vd(Td::zeros({0, 8}), true));
  REQUIRE(y.shape() == Shape{0, 5, 2});
  y.backward(Td::zeros({0, 5, 2}));
  REQUIRE(rfft_magnitude(Vd(Td::zeros({2, 0, 5}))).shape() == Shape{2, 0, 3});
}
}  // namespace test_ops_fft
