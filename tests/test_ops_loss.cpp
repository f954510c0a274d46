// Cross-entropy (fused log-softmax, label smoothing, ignore_index, reductions) and embedding.
#include <mixmoe/ops/cross_entropy.hpp>
#include <mixmoe/ops/embedding.hpp>
#include <mixmoe/ops/shape_ops.hpp>

#include "test_util.hpp"

#include <cmath>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_loss {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Ti = Tensor<Index>;

/// Per-row losses from the definition, -sum_j q_j log p_j, without max subtraction
/// (fine for small logits); ignored rows give NaN so that a mistake would show.
std::vector<double> direct_losses(const Td& logits, const Ti& targets, double eps, Index ignore) {
  const Td x = logits.contiguous();
  const index_t v = x.size(-1), rows = x.numel() / v;
  const Ti t = targets.contiguous();
  std::vector<double> out(static_cast<std::size_t>(rows));
  for (index_t r = 0; r < rows; ++r) {
    const double* row = x.data() + r * v;
    if (t.data()[r] == ignore) {
      out[static_cast<std::size_t>(r)] = std::nan("");
      continue;
    }
    double s = 0;
    for (index_t j = 0; j < v; ++j) s += std::exp(row[j]);
    const double lse = std::log(s);
    double loss = 0;
    for (index_t j = 0; j < v; ++j) {
      const double q = (j == t.data()[r] ? 1.0 - eps : 0.0) + eps / static_cast<double>(v);
      loss -= q * (row[j] - lse);
    }
    out[static_cast<std::size_t>(r)] = loss;
  }
  return out;
}

Ti rand_targets(const Shape& s, index_t v, std::uint64_t seed) {
  Generator g(seed);
  Ti t = Ti::empty(s);
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<Index>(g.below(static_cast<std::uint64_t>(v)));
  return t;
}

}  // namespace

TEST_CASE("cross_entropy matches the log-sum-exp formula for every reduction", "[ops][loss]") {
  auto logits = rand_var({2, 3, 5}, 1);
  Ti targets = rand_targets({2, 3}, 5, 2);
  targets(0, 1) = -100;  // ignored
  targets(1, 2) = -100;
  for (double eps : {0.0, 0.1, 1.0}) {
    INFO("label smoothing " << eps);
    const auto direct = direct_losses(logits.value(), targets, eps, -100);
    double total = 0;
    int count = 0;
    for (double l : direct)
      if (!std::isnan(l)) total += l, ++count;
    REQUIRE(count == 4);
    const auto none = cross_entropy(logits, targets, {.label_smoothing = eps, .reduction = Reduction::none});
    REQUIRE(none.shape() == Shape{2, 3});
    for (std::size_t i = 0; i < direct.size(); ++i) {
      const double got = none.value().data()[i];
      if (std::isnan(direct[i]))
        REQUIRE(got == 0.0);  // ignored positions contribute exactly 0
      else
        REQUIRE(got == Approx(direct[i]).epsilon(1e-12));
    }
    const auto sum_loss = cross_entropy(logits, targets, {.label_smoothing = eps, .reduction = Reduction::sum});
    REQUIRE(sum_loss.shape() == Shape{});
    REQUIRE(sum_loss.item() == Approx(total).epsilon(1e-12));
    REQUIRE(cross_entropy(logits, targets, {.label_smoothing = eps}).item() == Approx(total / count).epsilon(1e-12));
  }
}

TEST_CASE("cross_entropy: hand-computed values", "[ops][loss]") {
  // p = (1, 2, 3) / 6: the loss of class 2 is ln 2
  auto logits = Vd(Td::from({std::log(1.0), std::log(2.0), std::log(3.0)}, {1, 3}), true);
  const Ti t = Ti::from({2}, {1});
  REQUIRE(cross_entropy(logits, t).item() == Approx(std::log(2.0)).epsilon(1e-14));
  // eps = 0.3 on V = 3: q = (0.1, 0.1, 0.8), loss = 0.1 ln 6 + 0.1 ln 3 + 0.8 ln 2
  auto smooth = cross_entropy(logits, t, {.label_smoothing = 0.3});
  REQUIRE(smooth.item() == Approx(0.1 * std::log(6.0) + 0.1 * std::log(3.0) + 0.8 * std::log(2.0)).epsilon(1e-14));
  // its gradient is softmax - q
  smooth.backward();
  const std::vector<double> expect = {1.0 / 6 - 0.1, 2.0 / 6 - 0.1, 3.0 / 6 - 0.8};
  for (std::size_t j = 0; j < 3; ++j) REQUIRE(logits.grad().to_vector()[j] == Approx(expect[j]).epsilon(1e-13));

  // a rank-1 logits vector with a rank-0 target
  auto v = Vd(Td::from({0.0, 0.0, 0.0, 0.0}, {4}));
  REQUIRE(cross_entropy(v, Ti::from({3}, {})).item() == Approx(std::log(4.0)).epsilon(1e-14));

  // huge logits: the max is subtracted, so nothing overflows, in float too
  auto big = Vf(Tf::from({1000.0f, 0.0f, -1000.0f, 50.0f, 50.0f, 50.0f}, {2, 3}), true);
  auto l = cross_entropy(big, Ti::from({1, 0}, {2}), {.reduction = Reduction::none});
  REQUIRE(l.value()(0) == Approx(1000.0f));
  REQUIRE(l.value()(1) == Approx(std::log(3.0f)));
  sum(l).backward();
  const auto g = big.grad().to_vector();
  for (float e : g) REQUIRE(std::isfinite(e));
  REQUIRE(g[0] == Approx(1.0f));
  REQUIRE(g[1] == Approx(-1.0f));
  REQUIRE(g[3] == Approx(1.0f / 3 - 1.0f));
}

TEST_CASE("cross_entropy: ignore_index", "[ops][loss]") {
  auto logits = rand_var({4, 6}, 3);
  // all ignored: the mean is 0 (not NaN) and no gradient flows
  const Ti all = Ti::full({4}, -100);
  auto m = cross_entropy(logits, all);
  REQUIRE(m.item() == 0.0);
  m.backward();
  for (double g : logits.grad().to_vector()) REQUIRE(g == 0.0);
  REQUIRE(cross_entropy(logits, all, {.reduction = Reduction::sum}).item() == 0.0);
  // ignore_index may be a valid class id: those targets are skipped, the others are averaged
  const Ti t = Ti::from({0, 2, 0, 5}, {4});
  const auto direct = direct_losses(logits.value(), t, 0.0, 0);
  REQUIRE(cross_entropy(logits, t, {.ignore_index = 0}).item() == Approx((direct[1] + direct[3]) / 2).epsilon(1e-12));
  // the mean's gradient divides by the number of targets that count
  logits.zero_grad();
  cross_entropy(logits, t, {.ignore_index = 0}).backward();
  const Td gx = logits.grad();
  for (index_t j = 0; j < 6; ++j) {
    REQUIRE(gx(0, j) == 0.0);
    REQUIRE(gx(2, j) == 0.0);
  }
  double s = 0;
  for (index_t j = 0; j < 6; ++j) s += std::exp(logits.value()(1, j));
  REQUIRE(gx(1, 2) == Approx((std::exp(logits.value()(1, 2)) / s - 1.0) / 2).epsilon(1e-12));
}

TEST_CASE("gradcheck: cross_entropy", "[ops][loss][gradcheck]") {
  const std::vector<std::pair<Shape, index_t>> cases = {{{4, 5}, 5}, {{2, 3, 7}, 7}, {{6}, 6}, {{3, 1}, 1}};
  for (auto [shape, v] : cases) {
    Ti t = rand_targets(shape.without(-1), v, 4);
    if (t.numel() > 2) t.data()[1] = -1;  // one ignored position (ignore_index = -1 below)
    for (Reduction red : {Reduction::mean, Reduction::sum, Reduction::none})
      for (double eps : {0.0, 0.2}) {
        INFO("logits " << shape << " reduction " << static_cast<int>(red) << " smoothing " << eps);
        const CrossEntropyOptions opt{.ignore_index = -1, .label_smoothing = eps, .reduction = red};
        MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return cross_entropy(in[0], t, opt); },
                                 {rand_var(shape, 5)});
      }
  }
  // non-contiguous logits: the class axis comes from a transpose
  const Ti t = rand_targets({3, 2}, 4, 6);
  MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return cross_entropy(transpose(in[0], 1, 2), t); },
                           {rand_var({3, 4, 2}, 7)});
  MIXMOE_REQUIRE_GRADCHECK(
      [=](const std::vector<Vd>& in) {
        return cross_entropy(permute(in[0], {2, 0, 1}), t, {.label_smoothing = 0.1, .reduction = Reduction::none});
      },
      {rand_var({2, 4, 3}, 8)});
}

TEST_CASE("cross_entropy in float on a large batch matches double", "[ops][loss]") {
  // enough rows for the parallel split; logits spread wide
  Generator gen(11);
  const Tf xf = Tf::randn({512, 1000}, gen, 0.0, 4.0);
  Ti t = rand_targets({512}, 1000, 12);
  for (index_t r = 0; r < 512; r += 7) t.data()[r] = -100;
  for (double eps : {0.0, 0.1}) {
    auto xfv = Vf(xf, true);
    auto xdv = Vd(xf.to<double>(), true);
    auto lf = cross_entropy(xfv, t, {.label_smoothing = eps});
    auto ld = cross_entropy(xdv, t, {.label_smoothing = eps});
    REQUIRE(static_cast<double>(lf.item()) == Approx(ld.item()).epsilon(1e-5));
    lf.backward();
    ld.backward();
    REQUIRE(max_abs_diff(xfv.grad().to<double>(), xdv.grad()) < 1e-7);
    const auto direct = direct_losses(xdv.value(), t, eps, -100);
    auto none = cross_entropy(xdv, t, {.label_smoothing = eps, .reduction = Reduction::none});
    double worst = 0;
    for (std::size_t r = 0; r < direct.size(); ++r)
      if (!std::isnan(direct[r])) worst = std::max(worst, std::abs(direct[r] - none.value().data()[r]));
    REQUIRE(worst < 1e-10);
  }
}

TEST_CASE("cross_entropy errors name the bad target, shapes and options", "[ops][loss][errors]") {
  auto logits = rand_var({2, 3, 5}, 1);
  MIXMOE_REQUIRE_ERROR(
      cross_entropy(logits, Ti::from({0, 1, 2, 3, 5, 4}, {2, 3})),
      "[cross_entropy] target 5 at position (1, 1) is out of range for V = 5 classes (ignore_index is -100)");
  MIXMOE_REQUIRE_ERROR(cross_entropy(logits, Ti::from({0, 1, 2, -1, 0, 0}, {2, 3})),
                       "[cross_entropy] target -1 at position (1, 0) is out of range for V = 5 classes");
  MIXMOE_REQUIRE_ERROR(cross_entropy(logits, Ti::zeros({6})),
                       "[cross_entropy] targets of shape (6) do not match logits of shape (2, 3, 5): expected (2, 3)");
  MIXMOE_REQUIRE_ERROR(cross_entropy(logits, Ti::zeros({2, 3}), {.label_smoothing = 1.5}),
                       "[cross_entropy] label_smoothing 1.5 is outside [0, 1]");
  MIXMOE_REQUIRE_ERROR(cross_entropy(Vd(Td::scalar(1.0)), Ti::scalar(0)),
                       "[cross_entropy] logits must have a class axis");
  MIXMOE_REQUIRE_ERROR(cross_entropy(Vd(Td::zeros({2, 0})), Ti::zeros({2})),
                       "[cross_entropy] logits of shape (2, 0) have no classes");
}

TEST_CASE("embedding: values and a backward that accumulates repeated ids", "[ops][embedding]") {
  auto w = Vd(Td::arange(12).reshape({4, 3}), true);
  const Ti ids = Ti::from({1, 3, 1, 0}, {2, 2});
  auto e = embedding(w, ids);
  REQUIRE(e.shape() == Shape{2, 2, 3});
  REQUIRE(e.value().to_vector() == std::vector<double>{3, 4, 5, 9, 10, 11, 3, 4, 5, 0, 1, 2});
  e.backward(Td::arange(12).reshape({2, 2, 3}));
  // row 1 gets tokens 0 and 2, row 2 nothing
  REQUIRE(w.grad().to_vector() == std::vector<double>{9, 10, 11, 6, 8, 10, 0, 0, 0, 3, 4, 5});
  REQUIRE(embedding(w, Ti::from({2}, {})).value().to_vector() == std::vector<double>{6, 7, 8});  // rank-0 ids
  REQUIRE(embedding(w, Ti::empty({0, 5})).shape() == Shape{0, 5, 3});

  for (const Shape& s : {Shape{5}, Shape{2, 3}, Shape{}, Shape{2, 2, 4}}) {
    INFO("ids " << s);
    const Ti rep = rand_targets(s, 4, 13);  // more ids than rows: repeats
    MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return embedding(in[0], rep); }, {rand_var({4, 3}, 14)});
    // a transposed (non-contiguous) weight
    MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return embedding(transpose(in[0], 0, 1), rep); },
                             {rand_var({3, 4}, 15)});
  }
}

TEST_CASE("embedding backward on a large batch matches a serial reference", "[ops][embedding]") {
  Generator gen(21);
  auto w = Vf(Tf::randn({50, 256}, gen), true);
  const Ti ids = rand_targets({4, 500}, 50, 22);
  auto e = embedding(w, ids);
  const Tf g = Tf::randn(e.shape(), gen);
  e.backward(g);
  Tf expect = Tf::zeros({50, 256});
  for (index_t t = 0; t < 2000; ++t)
    for (index_t c = 0; c < 256; ++c) expect.data()[ids.data()[t] * 256 + c] += g.data()[t * 256 + c];
  REQUIRE(max_abs_diff(w.grad(), expect) < 1e-4);
}

TEST_CASE("embedding errors name the id and the vocabulary", "[ops][embedding][errors]") {
  auto w = rand_var({10, 4}, 1);
  MIXMOE_REQUIRE_ERROR(embedding(w, Ti::from({1, 2, 12, 0}, {2, 2})),
                       "[embedding] id 12 at position (1, 0) is out of range for a vocabulary of V = 10");
  MIXMOE_REQUIRE_ERROR(embedding(w, Ti::from({-3}, {1})),
                       "[embedding] id -3 at position (0) is out of range for a vocabulary of V = 10");
  MIXMOE_REQUIRE_ERROR(embedding(rand_var({10}, 2), Ti::from({1}, {1})), "[embedding] weight must be (V, C), got (10)");
  MIXMOE_REQUIRE_ERROR(embedding(w, Ti::zeros({1, 1, 1, 1, 1, 1})),
                       "[embedding] ids of shape (1, 1, 1, 1, 1, 1) leave no room");
}
}  // namespace test_ops_loss
