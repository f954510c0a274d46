// Element-wise functions, softmax / log_softmax and dropout: gradients, values, stability, errors.
#include "test_util.hpp"

#include <mixmoe/ops/dropout.hpp>
#include <mixmoe/ops/softmax.hpp>
#include <mixmoe/ops/unary.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <numbers>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_pointwise {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// A leaf whose values are kept at least `margin` away from 0 (for relu and friends).
Vd away_from_zero(const Shape& s, std::uint64_t seed, double margin = 0.05) {
  Vd v = rand_var(s, seed);
  for (index_t i = 0; i < v.numel(); ++i) {
    double& e = v.value().data()[i];
    if (std::abs(e) < margin) e = e < 0 ? -margin - 0.1 : margin + 0.1;
  }
  return v;
}

/// A leaf of values in [0.5, ...): inside the domain of log, sqrt and non-integer powers.
Vd positive(const Shape& s, std::uint64_t seed) {
  Vd v = rand_var(s, seed);
  for (index_t i = 0; i < v.numel(); ++i) v.value().data()[i] = 0.5 + std::abs(v.value().data()[i]);
  return v;
}

double ref_gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double ref_gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
}
double ref_sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)); }

/// Checks op(x) against ref(x) element by element, relative to max(1, |ref|).
template <class T, class Op>
void check_values(Op op, double (*ref)(double), const std::vector<double>& points, double tol) {
  std::vector<T> xs(points.begin(), points.end());
  const auto y = op(Var<T>(Tensor<T>::from(xs, {static_cast<index_t>(xs.size())}))).value().to_vector();
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double want = ref(static_cast<double>(xs[i]));
    INFO("x = " << xs[i] << " got " << y[i] << " want " << want);
    REQUIRE(std::abs(y[i] - want) <= tol * std::max(1.0, std::abs(want)));
  }
}

/// softmax along `axis` computed the plain way, in double, as the reference.
Td ref_softmax(const Td& x, int axis, bool log) {
  const Shape& s = x.shape();
  const int a = s.axis(axis);
  const index_t outer = s.prod(0, a), n = s[a], inner = s.prod(a + 1, s.rank());
  const Td xc = x.contiguous();
  Td y = Td::empty(s);
  for (index_t o = 0; o < outer; ++o)
    for (index_t i = 0; i < inner; ++i) {
      double m = -kInf, sum = 0;
      for (index_t j = 0; j < n; ++j) m = std::max(m, xc.data()[(o * n + j) * inner + i]);
      for (index_t j = 0; j < n; ++j) sum += std::exp(xc.data()[(o * n + j) * inner + i] - m);
      for (index_t j = 0; j < n; ++j) {
        const double v = xc.data()[(o * n + j) * inner + i] - m;
        y.data()[(o * n + j) * inner + i] = log ? v - std::log(sum) : std::exp(v) / sum;
      }
    }
  return y;
}

}  // namespace

// ---- unary ------------------------------------------------------------------------------------------

TEST_CASE("gradcheck: unary functions", "[ops][unary][gradcheck]") {
  using Fn = std::function<Vd(const Vd&)>;
  const std::vector<std::pair<const char*, Fn>> smooth = {
      {"exp", [](const Vd& x) { return exp(x); }},
      {"gelu", [](const Vd& x) { return gelu(x); }},
      {"gelu_tanh", [](const Vd& x) { return gelu_tanh(x); }},
      {"silu", [](const Vd& x) { return silu(x); }},
      {"sigmoid", [](const Vd& x) { return sigmoid(x); }},
      {"tanh", [](const Vd& x) { return tanh(x); }},
      {"square", [](const Vd& x) { return square(x); }},
      {"pow_scalar 3", [](const Vd& x) { return pow_scalar(x, 3.0); }},
      {"pow_scalar 0", [](const Vd& x) { return pow_scalar(x, 0.0); }},
  };
  const std::vector<std::pair<const char*, Fn>> positive_domain = {
      {"log", [](const Vd& x) { return log(x); }},
      {"sqrt", [](const Vd& x) { return sqrt(x); }},
      {"pow_scalar 2.5", [](const Vd& x) { return pow_scalar(x, 2.5); }},
      {"pow_scalar -1.5", [](const Vd& x) { return pow_scalar(x, -1.5); }},
  };
  const std::vector<Shape> shapes = {{5}, {3, 4}, {2, 3, 4}, {}};
  for (const Shape& s : shapes) {
    for (const auto& [name, f] : smooth) {
      INFO(name << " on " << s);
      MIXMOE_REQUIRE_GRADCHECK([f](const std::vector<Vd>& in) { return f(in[0]); }, {rand_var(s, 11)});
    }
    for (const auto& [name, f] : positive_domain) {
      INFO(name << " on " << s);
      MIXMOE_REQUIRE_GRADCHECK([f](const std::vector<Vd>& in) { return f(in[0]); }, {positive(s, 12)});
    }
    INFO("relu on " << s);
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return relu(in[0]); }, {away_from_zero(s, 13)});
  }
  // large inputs: the saturated tails of sigmoid, tanh and silu
  auto wide = rand_var({4, 5}, 14);
  for (index_t i = 0; i < wide.numel(); ++i) wide.value().data()[i] *= 8.0;
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return sigmoid(in[0]); }, {wide});
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return silu(in[0]); }, {wide});
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return tanh(in[0]); }, {wide});
  // compositions (gradients flow through several unary nodes and accumulate)
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return tanh(silu(in[0])) * exp(sigmoid(in[0])); },
                           {rand_var({3, 4}, 15)});
}

TEST_CASE("unary values against std:: and hand formulas", "[ops][unary]") {
  const std::vector<double> pts = {-30, -7.5, -3, -1.25, -0.5, -1e-3, 0, 1e-3, 0.3, 1, 2.5, 6, 30};
  const std::vector<double> pos = {1e-6, 1e-3, 0.25, 1, 2, 10, 1e5};
  for (const double tol : {1e-13, 3e-6}) {
    const bool dbl = tol < 1e-9;
    INFO((dbl ? "double" : "float"));
    auto run = [&](auto op, double (*ref)(double), const std::vector<double>& p) {
      if (dbl)
        check_values<double>(op, ref, p, tol);
      else
        check_values<float>(op, ref, p, tol);
    };
    run([](auto x) { return exp(x); }, [](double x) { return std::exp(x); }, {-30, -3, -0.5, 0, 0.3, 1, 2.5, 6, 30});
    run([](auto x) { return log(x); }, [](double x) { return std::log(x); }, pos);
    run([](auto x) { return sqrt(x); }, [](double x) { return std::sqrt(x); }, pos);
    run([](auto x) { return relu(x); }, [](double x) { return x > 0 ? x : 0.0; }, pts);
    run([](auto x) { return gelu(x); }, ref_gelu, pts);
    run([](auto x) { return gelu_tanh(x); }, ref_gelu_tanh, pts);
    run([](auto x) { return silu(x); }, [](double x) { return x * ref_sigmoid(x); }, pts);
    run([](auto x) { return sigmoid(x); }, ref_sigmoid, pts);
    run([](auto x) { return tanh(x); }, [](double x) { return std::tanh(x); }, pts);
    run([](auto x) { return square(x); }, [](double x) { return x * x; }, pts);
    run([](auto x) { return pow_scalar(x, 3.0); }, [](double x) { return x * x * x; }, {-2.5, -1, 0, 0.5, 3});
    run([](auto x) { return pow_scalar(x, 0.5); }, [](double x) { return std::sqrt(x); }, pos);
    run([](auto x) { return pow_scalar(x, -2.0); }, [](double x) { return 1.0 / (x * x); }, {-4.0, -0.5, 0.5, 2.0});
  }
  // known values: Phi(1) = 0.841344746068543
  auto g = gelu(Vd(Td::from({1.0, -1.0, 0.0}, {3}))).value().to_vector();
  REQUIRE(g[0] == Approx(0.8413447460685429).epsilon(1e-14));
  REQUIRE(g[1] == Approx(-0.15865525393145707).epsilon(1e-14));
  REQUIRE(g[2] == 0.0);
  REQUIRE(gelu_tanh(Vd(Td::from({1.0}, {1}))).item() == Approx(0.8411919906082768).epsilon(1e-12));
  // tiny sigmoid keeps its relative precision (no 1 - (1 - tiny) cancellation)
  const float s = sigmoid(Vf(Tf::from({-30.0f}, {1}))).item();
  REQUIRE(s == Approx(ref_sigmoid(-30.0)).epsilon(1e-5));
}

TEST_CASE("unary ops follow IEEE at domain edges and saturate without NaN", "[ops][unary]") {
  const auto l = log(Vd(Td::from({0.0, -1.0}, {2}))).value().to_vector();
  REQUIRE(l[0] == -kInf);
  REQUIRE(std::isnan(l[1]));
  REQUIRE(std::isnan(sqrt(Vf(Tf::from({-1.0f}, {1}))).item()));
  REQUIRE(std::isnan(pow_scalar(Vd(Td::from({-2.0}, {1})), 0.5).item()));
  REQUIRE(std::isnan(relu(Vd(Td::from({std::nan("")}, {1}))).item()));  // NaN is not hidden
  // exp of -inf is exactly 0 and deep underflow flushes to 0, in the vectorised path too (long rows)
  for (double v : exp(Vd(Td::full({37}, -kInf))).value().to_vector()) REQUIRE(v == 0.0);
  for (double v : exp(Vd(Td::full({37}, -1000.0))).value().to_vector()) REQUIRE(v == 0.0);
  for (float v : exp(Vf(Tf::full({37}, -100.0f))).value().to_vector()) REQUIRE(v == 0.0f);
  for (float v : exp(Vf(Tf::full({37}, -80.0f))).value().to_vector()) REQUIRE(v == Approx(std::exp(-80.0f)));
  REQUIRE(std::isnan(exp(Vd(Td::from({std::nan("")}, {1}))).item()));
  // the gradient of pow_scalar(x, 0) is 0 at x = 0 too (not 0 * inf)
  auto z = Vd(Td::from({0.0, 2.0}, {2}), true);
  sum(pow_scalar(z, 0.0)).backward();
  REQUIRE(z.grad().to_vector() == std::vector<double>{0.0, 0.0});
  // saturation: no NaN or inf in values or gradients for large |x|, float and double
  for (float big : {80.0f, 1e4f, 1e30f}) {
    auto x = Vf(Tf::from({-big, big}, {2}), true);
    const auto sg = sigmoid(x).value().to_vector(), si = silu(x).value().to_vector(), th = tanh(x).value().to_vector();
    REQUIRE((sg[0] >= 0.0f && sg[0] < 1e-30f));
    REQUIRE(sg[1] == 1.0f);
    REQUIRE(th == std::vector<float>{-1.0f, 1.0f});
    REQUIRE((si[0] <= 0.0f && si[0] > -1e-30f));
    REQUIRE(si[1] == big);
    sum(sigmoid(x) + silu(x) + tanh(x) + gelu(x) + gelu_tanh(x)).backward();
    for (float v : x.grad().to_vector()) REQUIRE(std::isfinite(v));
  }
}

TEST_CASE("unary ops on large and non-contiguous inputs", "[ops][unary]") {
  // big enough to be split across threads
  Generator gen(3);
  const Tf xf = Tf::randn({300, 257}, gen);
  auto xv = Vf(xf, true);
  const auto y = tanh(xv).value().to_vector(), e = exp(xv).value().to_vector(), gl = gelu(xv).value().to_vector();
  const auto xs = xf.to_vector();
  for (std::size_t i = 0; i < xs.size(); ++i) {
    REQUIRE(std::abs(y[i] - std::tanh(xs[i])) < 1e-6);
    REQUIRE(std::abs(e[i] - std::exp(xs[i])) < 2e-6 * std::exp(xs[i]));
    REQUIRE(std::abs(gl[i] - ref_gelu(xs[i])) < 1e-6);
  }
  sum(square(xv)).backward();
  const auto gx = xv.grad().to_vector();
  for (std::size_t i = 0; i < xs.size(); ++i) REQUIRE(gx[i] == 2 * xs[i]);
  // a transposed view gives the function of the transposed values, and the gradient its layout
  const Td base = Td::from({0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, {2, 3});
  auto t = Vd(base.transpose(0, 1), true);
  auto et = exp(t);
  REQUIRE(et.shape() == Shape{3, 2});
  const std::vector<double> tv = base.transpose(0, 1).to_vector(), ev = et.value().to_vector();
  for (std::size_t i = 0; i < tv.size(); ++i) REQUIRE(ev[i] == Approx(std::exp(tv[i])).epsilon(1e-15));
  sum(et).backward();
  REQUIRE(t.grad().shape() == Shape{3, 2});
  REQUIRE(max_abs_diff(t.grad(), et.value()) < 1e-15);
}

TEST_CASE("unary op errors", "[ops][unary][errors]") {
  MIXMOE_REQUIRE_ERROR(exp(Vd()), "[exp] the input is an undefined Var");
  MIXMOE_REQUIRE_ERROR(log(Vd()), "[log] the input is an undefined Var");
  MIXMOE_REQUIRE_ERROR(gelu_tanh(Vf()), "[gelu_tanh] the input is an undefined Var");
  MIXMOE_REQUIRE_ERROR(relu(Vd()), "[relu] the input is an undefined Var");
  MIXMOE_REQUIRE_ERROR(pow_scalar(rand_var({2}, 1), kInf), "[pow_scalar] the exponent must be finite, got inf");
  MIXMOE_REQUIRE_ERROR(pow_scalar(rand_var({2}, 1), std::nan("")), "[pow_scalar] the exponent must be finite, got nan");
  // without a requires-grad input, no node is recorded
  auto c = silu(rand_var({3}, 2, false));
  REQUIRE(c.is_leaf());
  REQUIRE_FALSE(c.requires_grad());
}

// ---- softmax / log_softmax --------------------------------------------------------------------------

TEST_CASE("gradcheck: softmax and log_softmax on every axis", "[ops][softmax][gradcheck]") {
  const std::vector<std::pair<Shape, int>> cases = {{{5}, -1},       {{3, 4}, -1},    {{3, 4}, 0},    {{2, 3, 4}, 0},
                                                    {{2, 3, 4}, 1},  {{2, 3, 4}, 2},  {{2, 3, 4}, -2}, {{1, 4}, 0},
                                                    {{2, 1, 3}, 1},  {{3, 260}, 0}};  // the last: I > one column block
  for (auto [s, axis] : cases) {
    INFO("shape " << s << " axis " << axis);
    MIXMOE_REQUIRE_GRADCHECK([axis](const std::vector<Vd>& in) { return softmax(in[0], axis); }, {rand_var(s, 21)});
    MIXMOE_REQUIRE_GRADCHECK([axis](const std::vector<Vd>& in) { return log_softmax(in[0], axis); }, {rand_var(s, 22)});
  }
  // composed with another op, so grad_out is not the gradcheck weights alone
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return softmax(in[0], 1) * in[1]; },
                           {rand_var({2, 3, 4}, 23), rand_var({2, 3, 4}, 24)});
}

TEST_CASE("softmax values: reference, sums, log_softmax == log(softmax)", "[ops][softmax]") {
  const std::vector<std::pair<Shape, int>> cases = {{{7}, 0}, {{4, 9}, 1}, {{4, 9}, 0}, {{3, 5, 6}, 1},
                                                    {{2, 3, 300}, 0}, {{2, 3, 300}, 1}, {{64, 1000}, -1}};
  for (auto [s, axis] : cases) {
    INFO("shape " << s << " axis " << axis);
    Generator gen(31);
    const Td x = Td::randn(s, gen, 0.0, 3.0);
    const Td y = softmax(Vd(x), axis).value(), ly = log_softmax(Vd(x), axis).value();
    REQUIRE(max_abs_diff(y, ref_softmax(x, axis, false)) < 1e-15);
    REQUIRE(max_abs_diff(ly, ref_softmax(x, axis, true)) < 1e-13);
    // sums along the axis are 1; log_softmax is the log of softmax
    const Td sums = sum(Vd(y), axis).value();
    REQUIRE(max_abs_diff(sums, Td::ones(sums.shape())) < 1e-14);
    const auto yv = y.to_vector(), lv = ly.to_vector();
    for (std::size_t i = 0; i < yv.size(); ++i) REQUIRE(std::abs(std::log(yv[i]) - lv[i]) < 1e-12);
    // float agrees with double
    const Tf yf = softmax(Vf(x.to<float>()), axis).value(), lf = log_softmax(Vf(x.to<float>()), axis).value();
    REQUIRE(max_abs_diff(yf.to<double>(), y) < 1e-6);
    REQUIRE(max_abs_diff(lf.to<double>(), ly) < 1e-5);
  }
  auto x = Vd(Td::from({1.0, 2.0, 3.0}, {3}));
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  const auto y = softmax(x).value().to_vector();
  REQUIRE(y[0] == Approx(std::exp(1.0) / z).epsilon(1e-15));
  REQUIRE(y[2] == Approx(std::exp(3.0) / z).epsilon(1e-15));
}

TEST_CASE("softmax is stable for large logits, float and double", "[ops][softmax]") {
  // logits of 1000 (exp overflows in both types without the max subtraction)
  auto big = Vf(Tf::from({1000.0f, 1001.0f, 1002.0f, 998.0f}, {1, 4}));
  auto small = Vf(Tf::from({0.0f, 1.0f, 2.0f, -2.0f}, {1, 4}));
  const Tf yb = softmax(big).value(), lb = log_softmax(big).value();
  for (float v : yb.to_vector()) REQUIRE(std::isfinite(v));
  REQUIRE(max_abs_diff(yb, softmax(small).value()) < 1e-7);
  REQUIRE(max_abs_diff(lb, log_softmax(small).value()) < 1e-6);
  // along a non-last axis too
  const Tf yc = softmax(Vf(big.value().reshape({4, 1})), 0).value();
  REQUIRE(max_abs_diff(yc.reshape({1, 4}), yb) < 1e-7);
  // log_softmax stays finite where softmax underflows to 0
  const auto l = log_softmax(Vd(Td::from({0.0, -1000.0}, {2}))).value().to_vector();
  REQUIRE(l[0] == Approx(0.0).margin(1e-300));
  REQUIRE(l[1] == Approx(-1000.0).epsilon(1e-15));
  // float vs double on large-magnitude inputs (values ~1e3 with spread ~10), both axis paths
  Generator gen(5);
  Tf xf = Tf::randn({16, 33}, gen, 0.0, 10.0);
  for (index_t i = 0; i < xf.numel(); ++i) xf.data()[i] += 1000.0f;
  const Td xd = xf.to<double>();
  for (int axis : {0, 1}) {
    INFO("axis " << axis);
    const Tf sf = softmax(Vf(xf), axis).value(), lf = log_softmax(Vf(xf), axis).value();
    for (float v : lf.to_vector()) REQUIRE(std::isfinite(v));
    REQUIRE(max_abs_diff(sf.to<double>(), softmax(Vd(xd), axis).value()) < 1e-6);
    REQUIRE(max_abs_diff(lf.to<double>(), log_softmax(Vd(xd), axis).value()) < 2e-5);
  }
  // the gradients agree too
  auto vf = Vf(xf, true);
  auto vd = Vd(xd, true);
  const Tf gf = Tf::randn({16, 33}, gen);
  softmax(vf).backward(gf);
  softmax(vd).backward(gf.to<double>());
  REQUIRE(max_abs_diff(vf.grad().to<double>(), vd.grad()) < 1e-5);
}

TEST_CASE("softmax with masked (-inf) entries", "[ops][softmax]") {
  auto x = Vd(Td::from({0.0, -kInf, 1.0}, {3}), true);
  const auto y = softmax(x).value().to_vector();
  const double e = std::exp(1.0);
  REQUIRE(y[0] == Approx(1.0 / (1.0 + e)).epsilon(1e-15));
  REQUIRE(y[1] == 0.0);
  REQUIRE(y[2] == Approx(e / (1.0 + e)).epsilon(1e-15));
  REQUIRE(log_softmax(x).value().to_vector()[1] == -kInf);
  sum(softmax(x) * Vd(Td::from({1.0, 2.0, 3.0}, {3}))).backward();
  const auto g = x.grad().to_vector();
  REQUIRE(g[1] == 0.0);  // a masked entry gets no gradient
  for (double v : g) REQUIRE(std::isfinite(v));
  // long rows (vectorised exp) in float and double, last axis and inner axis: masked entries exactly 0
  for (index_t n : {37, 300}) {
    Tf lf = Tf::zeros({2, n});
    // masks in the first row only, so no row or column is masked entirely
    for (index_t i = 0; i < 2 * n; ++i)
      lf.data()[i] = i < n && i % 3 == 0 ? -std::numeric_limits<float>::infinity() : 0.1f * static_cast<float>(i);
    for (int axis : {0, 1}) {
      const auto pf = softmax(Vf(lf), axis).value().to_vector();
      const auto pd = softmax(Vd(lf.to<double>()), axis).value().to_vector();
      const auto lp = log_softmax(Vf(lf), axis).value().to_vector();
      for (index_t i = 0; i < n; i += 3) {
        REQUIRE(pf[i] == 0.0f);
        REQUIRE(pd[i] == 0.0);
        REQUIRE(lp[i] == -std::numeric_limits<float>::infinity());
      }
    }
  }
  // a row with every entry masked has no distribution: NaN, as documented
  REQUIRE(std::isnan(softmax(Vd(Td::from({-kInf, -kInf}, {2}))).value().to_vector()[0]));
}

TEST_CASE("softmax on non-contiguous input and empty shapes", "[ops][softmax]") {
  Generator gen(41);
  const Td x = Td::randn({3, 5}, gen);
  // softmax over the last axis of the transposed view == softmax over axis 0, transposed
  auto xt = Vd(x.transpose(0, 1), true);
  const Td a = softmax(xt, -1).value(), b = softmax(Vd(x), 0).value().transpose(0, 1);
  REQUIRE(max_abs_diff(a, b) < 1e-15);
  sum(softmax(xt, -1) * softmax(xt, -1)).backward();
  REQUIRE(xt.grad().shape() == Shape{5, 3});
  REQUIRE(softmax(Vd(Td::zeros({0, 4}))).shape() == Shape{0, 4});
  REQUIRE(log_softmax(Vd(Td::zeros({3, 0})), 1).shape() == Shape{3, 0});
  REQUIRE(softmax(Vd(Td::zeros({2, 0, 3})), 2).numel() == 0);
}

TEST_CASE("softmax errors", "[ops][softmax][errors]") {
  auto x = rand_var({2, 3}, 1);
  MIXMOE_REQUIRE_ERROR(softmax(x, 2), "[softmax] axis 2 out of range for shape (2, 3)");
  MIXMOE_REQUIRE_ERROR(log_softmax(x, -3), "[log_softmax] axis -3 out of range for shape (2, 3)");
  MIXMOE_REQUIRE_ERROR(softmax(Vd(Td::scalar(1.0))), "[softmax] axis -1 out of range for shape ()");
  MIXMOE_REQUIRE_ERROR(log_softmax(Vf()), "[log_softmax] the input is an undefined Var");
}

// ---- dropout ----------------------------------------------------------------------------------------

TEST_CASE("dropout: same seed same mask, keep rate, expected value", "[ops][dropout]") {
  const Shape s{400, 500};
  const double p = 0.3;
  auto ones = Vf(Tf::ones(s));
  Generator g1(7), g2(7), g3(8);
  const auto a = dropout(ones, p, g1).value().to_vector();
  const auto b = dropout(ones, p, g2).value().to_vector();
  const auto c = dropout(ones, p, g3).value().to_vector();
  REQUIRE(a == b);
  REQUIRE(a != c);
  // kept values are exactly 1 / (1 - p), the rest exactly 0
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  double kept = 0, total = 0;
  for (float v : a) {
    REQUIRE((v == 0.0f || v == scale));
    kept += v != 0.0f;
    total += v;
  }
  const double n = static_cast<double>(a.size());
  // 200000 Bernoulli draws: the standard deviation of the keep rate is about 0.001
  REQUIRE(std::abs(kept / n - (1.0 - p)) < 0.005);
  REQUIRE(std::abs(total / n - 1.0) < 0.01);  // inverted dropout keeps the mean
  // the generator advanced by exactly one draw per element
  Generator ref(7);
  for (std::size_t i = 0; i < a.size(); ++i) (void)ref.uniform();
  REQUIRE(g1.next_u64() == ref.next_u64());
  // the mask follows the draws: element i is kept when its draw is >= p
  Generator replay(7);
  for (std::size_t i = 0; i < 1000; ++i) REQUIRE((a[i] != 0.0f) == (replay.uniform() >= p));
}

TEST_CASE("dropout: gradient is the mask times the scale", "[ops][dropout][gradcheck]") {
  const double p = 0.4;
  auto x = rand_var({30, 40}, 51);
  Generator gen(3);
  auto y = dropout(x, p, gen);
  const Td g = rand_var({30, 40}, 52, false).value();
  y.backward(g);
  const auto xv = x.value().to_vector(), yv = y.value().to_vector(), gv = g.to_vector(), dx = x.grad().to_vector();
  const double scale = 1.0 / (1.0 - p);
  for (std::size_t i = 0; i < xv.size(); ++i) {
    const bool kept = yv[i] != 0.0;
    REQUIRE(yv[i] == (kept ? xv[i] * scale : 0.0));
    REQUIRE(dx[i] == (kept ? gv[i] * scale : 0.0));
  }
  // gradcheck with a fixed seed inside, so every evaluation draws the same mask
  for (const Shape& s : {Shape{7}, Shape{3, 4}, Shape{2, 3, 5}}) {
    MIXMOE_REQUIRE_GRADCHECK(
        [](const std::vector<Vd>& in) {
          Generator local(99);
          return dropout(in[0], 0.5, local);
        },
        {rand_var(s, 53)});
  }
}

TEST_CASE("dropout: p = 0 and evaluation return the input itself", "[ops][dropout]") {
  auto x = rand_var({4, 4}, 61);
  Generator gen(1);
  const auto before = gen.state();
  REQUIRE(dropout(x, 0.0, gen).node() == x.node());
  REQUIRE(dropout(x, 0.7, gen, false).node() == x.node());
  const auto after = gen.state();
  for (int i = 0; i < 4; ++i) REQUIRE(before.s[i] == after.s[i]);  // no draws
  // a non-contiguous input gives a contiguous result of its shape
  auto t = Vd(x.value().transpose(0, 1));
  REQUIRE(dropout(t, 0.5, gen).value().is_contiguous());
}

TEST_CASE("dropout errors", "[ops][dropout][errors]") {
  auto x = rand_var({3}, 1);
  Generator gen(1);
  MIXMOE_REQUIRE_ERROR(dropout(x, 1.0, gen), "[dropout] p must be in [0, 1), got 1");
  MIXMOE_REQUIRE_ERROR(dropout(x, -0.1, gen), "[dropout] p must be in [0, 1), got -0.1");
  MIXMOE_REQUIRE_ERROR(dropout(x, std::nan(""), gen), "[dropout] p must be in [0, 1), got nan");
  MIXMOE_REQUIRE_ERROR(dropout(x, 1.5, gen, false), "[dropout] p must be in [0, 1), got 1.5");  // checked in eval too
  MIXMOE_REQUIRE_ERROR(dropout(Vd(), 0.1, gen), "[dropout] the input is an undefined Var");
}
}  // namespace test_ops_pointwise
