// Routers: token-choice top-k, Switch, expert choice, hash routing, and the Fourier-feature
// wrapper with each transform. Values against independent computations in double, gradients
// by gradcheck, error messages.
#include <mixmoe/moe/expert_choice_router.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/hash_router.hpp>
#include <mixmoe/moe/router_check.hpp>
#include <mixmoe/moe/switch_router.hpp>
#include <mixmoe/moe/top_k_router.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <map>
#include <numbers>
#include <numeric>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_moe_routers {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Ti = Tensor<Index>;
using Ctx = RouteContext<Cpu>;

std::vector<Index> ivec(const Ti& t) { return t.to_vector(); }

/// Row-major N x E matrix of doubles.
struct Mat {
  index_t rows = 0, cols = 0;
  std::vector<double> v;
  Mat(index_t r, index_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(index_t i, index_t j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  double operator()(index_t i, index_t j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
};

template <class T>
Mat to_mat(const Tensor<T>& t) {
  Mat m(t.size(0), t.size(1));
  const auto v = t.to_vector();
  for (std::size_t i = 0; i < v.size(); ++i) m.v[i] = static_cast<double>(v[i]);
  return m;
}

/// a b^T for a (N, K), b (E, K).
Mat matmul_t(const Mat& a, const Mat& b) {
  Mat out(a.rows, b.rows);
  for (index_t i = 0; i < a.rows; ++i)
    for (index_t j = 0; j < b.rows; ++j) {
      double s = 0;
      for (index_t k = 0; k < a.cols; ++k) s += a(i, k) * b(j, k);
      out(i, j) = s;
    }
  return out;
}

Mat softmax_rows(const Mat& z) {
  Mat p(z.rows, z.cols);
  for (index_t i = 0; i < z.rows; ++i) {
    double m = z(i, 0), s = 0;
    for (index_t j = 1; j < z.cols; ++j) m = std::max(m, z(i, j));
    for (index_t j = 0; j < z.cols; ++j) s += std::exp(z(i, j) - m);
    for (index_t j = 0; j < z.cols; ++j) p(i, j) = std::exp(z(i, j) - m) / s;
  }
  return p;
}

/// Indices of the k largest entries of row i (ties: lower index first).
std::vector<Index> top_of_row(const Mat& p, index_t i, index_t k) {
  std::vector<Index> order(static_cast<std::size_t>(p.cols));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p(i, a) > p(i, b); });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

/// Everything differentiable a router produces, flattened: gate (M), probs (N E), logits (N E).
template <class T>
Var<T> routing_outputs(const Routing<T>& r) {
  return concat({r.gate, reshape(r.probs, Shape{-1}), reshape(r.logits, Shape{-1})}, 0);
}

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

}  // namespace

// ---- TopK ------------------------------------------------------------------------

TEMPLATE_TEST_CASE("TopKRouter: each token's k most probable experts, renormalised gates", "[moe][routers]", float,
                   double) {
  using T = TestType;
  Generator gen(11);
  const index_t n = 6, c = 8, e = 5, k = 2;
  TopKRouter<T> router(RouterShape{c, e, k}, gen);
  REQUIRE(router.num_experts() == e);
  REQUIRE(router.top_k() == k);
  // Larger weights than the init, so the probabilities are far from uniform.
  router.weight = parameter(Tensor<T>::randn({e, c}, gen));
  const Tensor<T> xt = Tensor<T>::randn({n, c}, gen);
  const auto r = router(Var<T>(xt), Ctx{});

  const Mat z = matmul_t(to_mat(xt), to_mat(router.weight.value())), p = softmax_rows(z);
  REQUIRE(r.num_tokens == n);
  REQUIRE(r.num_experts == e);
  REQUIRE(r.logits.shape() == Shape{n, e});
  REQUIRE(r.probs.shape() == Shape{n, e});
  REQUIRE(r.gate.shape() == Shape{n * k});
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < e; ++j) {
      REQUIRE(std::abs(r.logits.value()(i, j) - z(i, j)) < 10 * tol<T>());
      REQUIRE(std::abs(r.probs.value()(i, j) - p(i, j)) < tol<T>());
    }
  const auto tokens = ivec(r.token), experts = ivec(r.expert);
  const auto gates = r.gate.value().to_vector();
  for (index_t i = 0; i < n; ++i) {
    const auto want = top_of_row(p, i, k);
    double mass = 0, gsum = 0;
    for (index_t j = 0; j < k; ++j) mass += p(i, want[static_cast<std::size_t>(j)]);
    for (index_t j = 0; j < k; ++j) {
      const auto a = static_cast<std::size_t>(i * k + j);
      REQUIRE(tokens[a] == i);  // token-major
      REQUIRE(experts[a] == want[static_cast<std::size_t>(j)]);
      REQUIRE(std::abs(gates[a] - p(i, want[static_cast<std::size_t>(j)]) / mass) < tol<T>());
      gsum += gates[a];
    }
    REQUIRE(std::abs(gsum - 1.0) < tol<T>());
  }

  // Without renormalisation the gates are the selected probabilities themselves.
  Generator gen2(11);
  TopKRouter<T, Cpu, 0, false> plain(RouterShape{c, e, k}, gen2);
  plain.weight = router.weight;
  const auto rp = plain(Var<T>(xt), Ctx{});
  REQUIRE(ivec(rp.expert) == experts);
  for (index_t a = 0; a < n * k; ++a)
    REQUIRE(std::abs(rp.gate.value()(a) - p(a / k, experts[static_cast<std::size_t>(a)])) < tol<T>());
  // The runtime switch does the same.
  router.renormalize = false;
  REQUIRE(max_abs_diff(router(Var<T>(xt), Ctx{}).gate.value(), rp.gate.value()) == 0.0);
}

TEST_CASE("TopKRouter: k from the policy or from RouterShape, and the init scale", "[moe][routers]") {
  Generator gen(3);
  const RouterShape shape{64, 16, 3};
  TopKRouter<double> from_shape(shape, gen);
  REQUIRE(from_shape.top_k() == 3);
  bind_router_t<TopK<2>, double, Cpu> fixed(shape, gen);  // the policy's K wins over RouterShape::top_k
  REQUIRE(fixed.top_k() == 2);
  const auto r = fixed(rand_var({5, 64}, 1, false), Ctx{});
  REQUIRE(r.gate.numel() == 10);
  REQUIRE(ivec(r.token) == std::vector<Index>{0, 0, 1, 1, 2, 2, 3, 3, 4, 4});

  // weight ~ N(0, 0.1 / C): 1024 samples, their std within 10% of sqrt(0.1 / 64)
  const auto w = from_shape.weight.value().to_vector();
  double ss = 0;
  for (double v : w) ss += v * v;
  const double std = std::sqrt(ss / static_cast<double>(w.size()));
  REQUIRE(std::abs(std - std::sqrt(0.1 / 64)) < 0.1 * std::sqrt(0.1 / 64));
  REQUIRE(from_shape.weight.requires_grad());
  TopKRouter<double> custom(shape, gen, 0.5);
  REQUIRE(custom.weight.value().to_vector() != w);

  auto names = named_parameters(fixed);
  REQUIRE(names.size() == 1);
  REQUIRE(names[0].first == "weight");
  std::vector<std::string> prefixed;
  fixed.visit_parameters([&](const std::string& name, Vd&) { prefixed.push_back(name); }, "router");
  REQUIRE(prefixed == std::vector<std::string>{"router.weight"});
}

TEST_CASE("TopKRouter: k = E selects every expert, and an empty batch gives no assignments", "[moe][routers]") {
  Generator gen(5);
  TopKRouter<double> all(RouterShape{4, 3, 3}, gen);
  const auto r = all(rand_var({2, 4}, 2, false), Ctx{});
  REQUIRE(r.gate.numel() == 6);
  for (index_t i = 0; i < 2; ++i) {
    std::set<Index> seen;
    for (index_t j = 0; j < 3; ++j) seen.insert(r.expert(i * 3 + j));
    REQUIRE(seen.size() == 3);
    // with every expert selected, the renormalised gates are the probs
    for (index_t j = 0; j < 3; ++j)
      REQUIRE(std::abs(r.gate.value()(i * 3 + j) - r.probs.value()(i, r.expert(i * 3 + j))) < 1e-12);
  }
  const auto empty = all(Vd(Td::empty({0, 4})), Ctx{});
  REQUIRE(empty.gate.numel() == 0);
  REQUIRE(empty.token.numel() == 0);
  REQUIRE(empty.probs.shape() == Shape{0, 3});
}

TEST_CASE("TopKRouter: gradients of gates, probs and logits w.r.t. x and the weight", "[moe][routers][gradcheck]") {
  struct Case {
    index_t n, c, e, k;
    bool renormalize;
  };
  for (const Case cs : {Case{4, 6, 4, 2, true}, Case{7, 5, 8, 3, true}, Case{3, 4, 3, 1, true}, Case{3, 4, 3, 3, true},
                        Case{5, 6, 4, 2, false}, Case{6, 3, 5, 1, false}}) {
    INFO("N " << cs.n << " C " << cs.c << " E " << cs.e << " k " << cs.k << " renormalize " << cs.renormalize);
    Generator gen(cs.n * 100 + cs.e);
    TopKRouter<double> router(RouterShape{cs.c, cs.e, cs.k}, gen);
    router.renormalize = cs.renormalize;
    auto fn = [router](const std::vector<Vd>& in) {
      TopKRouter<double> r = router;
      r.weight = in[1];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(fn, (std::vector<Vd>{rand_var({cs.n, cs.c}, cs.n + 1), rand_var({cs.e, cs.c}, cs.e + 2)}));
    // the gate alone, w.r.t. x only (the weight frozen)
    auto gate_only = [router](const std::vector<Vd>& in) {
      TopKRouter<double> r = router;
      r.weight = in[1];
      return r(in[0], Ctx{}).gate;
    };
    MIXMOE_REQUIRE_GRADCHECK(
        gate_only, (std::vector<Vd>{rand_var({cs.n, cs.c}, cs.c + 3), rand_var({cs.e, cs.c}, cs.k + 4, false)}));
  }
}

TEST_CASE("TopKRouter: errors name the router and the shapes", "[moe][routers][errors]") {
  Generator gen(1);
  TopKRouter<double> router(RouterShape{8, 4, 2}, gen);
  MIXMOE_REQUIRE_ERROR(router(rand_var({3, 5}, 1), Ctx{}),
                       "[TopKRouter] x must be token rows (N, C) with C = d_model = 8, got shape (3, 5)");
  MIXMOE_REQUIRE_ERROR(router(rand_var({2, 3, 8}, 1), Ctx{}), "got shape (2, 3, 8)");
  MIXMOE_REQUIRE_ERROR(router(Vd(), Ctx{}), "[TopKRouter] x is an undefined Var");
  MIXMOE_REQUIRE_ERROR(TopKRouter<double>(RouterShape{8, 4, 5}, gen),
                       "[TopKRouter] top_k = 5 is out of range [1, num_experts = 4]");
  MIXMOE_REQUIRE_ERROR((TopKRouter<double, Cpu, 6>(RouterShape{8, 4, 1}, gen)), "top_k = 6 is out of range");
  MIXMOE_REQUIRE_ERROR(TopKRouter<double>(RouterShape{8, 4, 0}, gen), "top_k = 0 is out of range");
  MIXMOE_REQUIRE_ERROR(TopKRouter<double>(RouterShape{0, 4, 1}, gen), "[TopKRouter] d_model must be positive, got 0");
  MIXMOE_REQUIRE_ERROR(TopKRouter<double>(RouterShape{8, 0, 1}, gen), "[TopKRouter] num_experts must be positive");
  const auto x = rand_var({3, 8}, 2);
  MIXMOE_REQUIRE_ERROR(router.select(rand_var({3, 5}, 3), x, Ctx{}),
                       "[TopKRouter] logits must be (N, E) = (3, 4) for x of shape (3, 8), got (3, 5)");
  MIXMOE_REQUIRE_ERROR(router.select(rand_var({2, 4}, 3), x, Ctx{}), "got (2, 4)");
  router.k = 9;  // changed after construction
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{}), "[TopKRouter] top_k = 9 is out of range [1, num_experts = 4]");
  MIXMOE_REQUIRE_ERROR(TopKRouter<double>()(x, Ctx{}), "[TopKRouter] the router is default-constructed");
}

// ---- Switch ----------------------------------------------------------------------

TEMPLATE_TEST_CASE("SwitchRouter: top-1, gate = the unrenormalised top probability", "[moe][routers]", float, double) {
  using T = TestType;
  Generator gen(21);
  const index_t n = 9, c = 6, e = 4;
  SwitchRouter<T> router(RouterShape{c, e, 2}, gen);  // top_k 2 in the shape: Switch stays top-1
  router.weight = parameter(Tensor<T>::randn({e, c}, gen));
  const Tensor<T> xt = Tensor<T>::randn({n, c}, gen);
  const auto r = router(Var<T>(xt), Ctx{});
  const Mat p = softmax_rows(matmul_t(to_mat(xt), to_mat(router.weight.value())));
  REQUIRE(r.gate.shape() == Shape{n});
  REQUIRE(ivec(r.token) == ivec(Ti::arange(n)));
  for (index_t i = 0; i < n; ++i) {
    const Index best = top_of_row(p, i, 1)[0];
    REQUIRE(r.expert(i) == best);
    REQUIRE(std::abs(r.gate.value()(i) - p(i, best)) < tol<T>());
    double mx = 0;
    for (index_t j = 0; j < e; ++j) mx = std::max(mx, static_cast<double>(r.probs.value()(i, j)));
    REQUIRE(r.gate.value()(i) == static_cast<T>(mx));
    REQUIRE(r.gate.value()(i) < T(1));
  }
  // the same routing as TopK<1, false>
  bind_router_t<TopK<1, false>, T, Cpu> top1;
  top1.weight = router.weight;
  const auto r1 = top1(Var<T>(xt), Ctx{});
  REQUIRE(ivec(r1.expert) == ivec(r.expert));
  REQUIRE(max_abs_diff(r1.gate.value(), r.gate.value()) == 0.0);
}

TEST_CASE("SwitchRouter: gradients and errors", "[moe][routers][gradcheck][errors]") {
  for (const auto& [n, c, e] : std::vector<std::array<index_t, 3>>{{5, 4, 3}, {8, 6, 8}, {2, 3, 2}}) {
    INFO("N " << n << " C " << c << " E " << e);
    Generator gen(n + c + e);
    SwitchRouter<double> router(RouterShape{c, e, 1}, gen);
    auto fn = [router](const std::vector<Vd>& in) {
      SwitchRouter<double> r = router;
      r.weight = in[1];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(fn, (std::vector<Vd>{rand_var({n, c}, n + 7), rand_var({e, c}, e + 8)}));
  }
  Generator gen(2);
  SwitchRouter<double> router(RouterShape{8, 4, 1}, gen);
  MIXMOE_REQUIRE_ERROR(router(rand_var({3, 7}, 1), Ctx{}),
                       "[SwitchRouter] x must be token rows (N, C) with C = d_model = 8, got shape (3, 7)");
  MIXMOE_REQUIRE_ERROR(SwitchRouter<double>(RouterShape{8, 0, 1}, gen), "[SwitchRouter] num_experts must be positive");
}

// ---- Expert choice ---------------------------------------------------------------

TEMPLATE_TEST_CASE("ExpertChoiceRouter: every expert takes exactly c tokens, its most probable ones", "[moe][routers]",
                   float, double) {
  using T = TestType;
  Generator gen(31);
  const index_t n = 10, c = 6, e = 4, k = 2;
  ExpertChoiceRouter<T> router(RouterShape{c, e, k}, gen);
  router.weight = parameter(Tensor<T>::randn({e, c}, gen));
  const index_t cap = router.capacity(n);
  REQUIRE(cap == 5);  // ceil(10 * 2 / 4)
  const Tensor<T> xt = Tensor<T>::randn({n, c}, gen);
  const auto r = router(Var<T>(xt), Ctx{});
  const Mat p = softmax_rows(matmul_t(to_mat(xt), to_mat(router.weight.value())));
  REQUIRE(r.gate.shape() == Shape{e * cap});
  const auto tokens = ivec(r.token), experts = ivec(r.expert);
  std::vector<int> per_token(static_cast<std::size_t>(n), 0);
  for (index_t j = 0; j < e; ++j) {
    // expert-major: expert j's block, its tokens in descending probability
    std::vector<Index> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p(a, j) > p(b, j); });
    for (index_t s = 0; s < cap; ++s) {
      const auto a = static_cast<std::size_t>(j * cap + s);
      REQUIRE(experts[a] == j);
      REQUIRE(tokens[a] == order[static_cast<std::size_t>(s)]);
      REQUIRE(std::abs(r.gate.value()(static_cast<index_t>(a)) - p(tokens[a], j)) < tol<T>());
      ++per_token[static_cast<std::size_t>(tokens[a])];
    }
    REQUIRE(std::count(experts.begin(), experts.end(), static_cast<Index>(j)) == cap);
  }
  // tokens get between 0 and E experts, E * c in all
  REQUIRE(std::accumulate(per_token.begin(), per_token.end(), 0) == e * cap);
  for (int m : per_token) REQUIRE((m >= 0 && m <= e));
  // the softmax is over experts for each token
  for (index_t i = 0; i < n; ++i) {
    double s = 0;
    for (index_t j = 0; j < e; ++j) s += static_cast<double>(r.probs.value()(i, j));
    REQUIRE(std::abs(s - 1.0) < tol<T>() * 10);
  }
}

TEST_CASE("ExpertChoiceRouter: capacity, capacity factor, small and empty batches", "[moe][routers]") {
  Generator gen(4);
  ExpertChoiceRouter<double> router(RouterShape{4, 4, 1}, gen);
  REQUIRE(router.capacity(0) == 0);
  REQUIRE(router.capacity(2) == 1);   // ceil(0.5)
  REQUIRE(router.capacity(9) == 3);   // ceil(2.25)
  REQUIRE(router.capacity(16) == 4);  // exact
  router.capacity_factor = 2.0;
  REQUIRE(router.capacity(9) == 5);  // ceil(4.5)
  ExpertChoiceRouter<double> wide(RouterShape{4, 2, 2}, gen);
  REQUIRE(wide.capacity(3) == 3);  // ceil(3 * 2 / 2) = 3 = N: every expert takes every token
  const auto all = wide(rand_var({3, 4}, 1, false), Ctx{});
  REQUIRE(all.gate.numel() == 6);
  const auto empty = wide(Vd(Td::empty({0, 4})), Ctx{});
  REQUIRE(empty.gate.numel() == 0);
  REQUIRE(empty.token.numel() == 0);
  REQUIRE(empty.expert.numel() == 0);
  wide.capacity_factor = 0.0;
  MIXMOE_REQUIRE_ERROR(wide(rand_var({3, 4}, 1), Ctx{}),
                       "[ExpertChoiceRouter] capacity_factor must be positive, got 0");
  MIXMOE_REQUIRE_ERROR(wide(rand_var({3, 5}, 1), Ctx{}),
                       "[ExpertChoiceRouter] x must be token rows (N, C) with C = d_model = 4, got shape (3, 5)");
  MIXMOE_REQUIRE_ERROR(ExpertChoiceRouter<double>(RouterShape{4, 2, 3}, gen),
                       "[ExpertChoiceRouter] top_k = 3 is out of range [1, num_experts = 2]");
}

TEST_CASE("ExpertChoiceRouter: gradients w.r.t. x and the weight", "[moe][routers][gradcheck]") {
  for (const auto& [n, c, e, k] :
       std::vector<std::array<index_t, 4>>{{6, 4, 3, 1}, {9, 5, 4, 2}, {4, 3, 2, 2}, {12, 6, 5, 3}}) {
    INFO("N " << n << " C " << c << " E " << e << " k " << k);
    Generator gen(n * 10 + k);
    ExpertChoiceRouter<double> router(RouterShape{c, e, k}, gen);
    auto fn = [router](const std::vector<Vd>& in) {
      ExpertChoiceRouter<double> r = router;
      r.weight = in[1];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(fn, (std::vector<Vd>{rand_var({n, c}, n + 11), rand_var({e, c}, e + 12)}));
  }
}

// ---- Hash ------------------------------------------------------------------------

TEST_CASE("HashRouter: deterministic, distinct experts per token, constant gates", "[moe][routers]") {
  Generator gen(1);
  const index_t n = 7, c = 4, e = 5, k = 3;
  HashRouter<double> router(RouterShape{c, e, k, 1000}, gen);
  REQUIRE(count_parameters(router) == 0);
  const Ti ids = Ti::from({5, 17, 5, 999, 0, 123, 17}, {n});
  const Ctx ctx{&ids};
  const auto x = rand_var({n, c}, 3);
  const auto r = router(x, ctx);
  REQUIRE(ivec(r.token) == std::vector<Index>{0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6});
  const auto experts = ivec(r.expert);
  for (index_t i = 0; i < n; ++i) {
    std::set<Index> mine;
    for (index_t j = 0; j < k; ++j) {
      const Index ex = experts[static_cast<std::size_t>(i * k + j)];
      REQUIRE((ex >= 0 && ex < e));
      mine.insert(ex);
      REQUIRE(r.probs.value()(i, ex) == 1.0 / 3.0);
    }
    REQUIRE(mine.size() == static_cast<std::size_t>(k));
    double s = 0;
    for (index_t j = 0; j < e; ++j) s += r.probs.value()(i, j);
    REQUIRE(std::abs(s - 1.0) < 1e-15);
  }
  // the same id gets the same experts, in any row, call or router instance
  for (index_t j = 0; j < k; ++j) {
    REQUIRE(experts[static_cast<std::size_t>(0 * k + j)] == experts[static_cast<std::size_t>(2 * k + j)]);
    REQUIRE(experts[static_cast<std::size_t>(1 * k + j)] == experts[static_cast<std::size_t>(6 * k + j)]);
  }
  Generator other(99);
  HashRouter<double> again(RouterShape{c, e, k, 1000}, other);
  REQUIRE(ivec(again(x, ctx).expert) == experts);
  REQUIRE(ivec(router(x, ctx).expert) == experts);
  // gates and probs are constants: nothing to train
  REQUIRE(r.gate.value().to_vector() == std::vector<double>(static_cast<std::size_t>(n * k), 1.0 / 3.0));
  REQUIRE_FALSE(r.gate.requires_grad());
  REQUIRE_FALSE(r.probs.requires_grad());
  REQUIRE(r.logits.value().to_vector() == std::vector<double>(static_cast<std::size_t>(n * e), 0.0));
  // k = 1: gate 1, probs one-hot; ids as a (B, T) tensor
  HashRouter<double> one(RouterShape{c, e, 1}, gen);
  const Ti ids2 = Ti::from({5, 17, 5, 999, 0, 123}, {2, 3});
  const Ctx ctx2{&ids2};
  const auto r1 = one(rand_var({6, c}, 4, false), ctx2);
  REQUIRE(r1.gate.value().to_vector() == std::vector<double>(6, 1.0));
  for (index_t i = 0; i < 6; ++i) REQUIRE(r1.expert(i) == experts[static_cast<std::size_t>(i * k)]);  // copy 0
  // another seed is another hash
  HashRouter<double> seeded(RouterShape{c, e, k, 1000}, gen);
  seeded.seed = 7;
  REQUIRE(ivec(seeded(x, ctx).expert) != experts);
}

TEST_CASE("HashRouter: ids spread evenly over the experts", "[moe][routers]") {
  Generator gen(1);
  const index_t n = 16000, e = 8;
  HashRouter<float> router(RouterShape{2, e, 1}, gen);
  const Ti ids = Ti::arange(n);
  const Ctx ctx{&ids};
  const auto r = router(Var<float>(Tensor<float>::zeros({n, 2})), ctx);
  std::vector<index_t> count(static_cast<std::size_t>(e), 0);
  for (Index ex : ivec(r.expert)) ++count[static_cast<std::size_t>(ex)];
  for (index_t m : count) REQUIRE(std::abs(static_cast<double>(m) - 2000.0) < 200.0);
  // top-E copies are a permutation of the experts for every id
  HashRouter<float> all(RouterShape{2, e, e}, gen);
  Index out[8];
  for (Index id = 0; id < 500; ++id) {
    all.experts_of(id, out);
    REQUIRE(std::set<Index>(out, out + e).size() == static_cast<std::size_t>(e));
  }
}

TEST_CASE("HashRouter: errors", "[moe][routers][errors]") {
  Generator gen(1);
  HashRouter<double> router(RouterShape{4, 3, 1, 50}, gen);
  const auto x = rand_var({3, 4}, 1);
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{}),
                       "[HashRouter] hash routing needs the token ids of the 3 rows: set RouteContext::token_ids");
  const Ti two = Ti::from({1, 2}, {2});
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{&two}),
                       "[HashRouter] token_ids of shape (2) must have one id per row of x of shape (3, 4)");
  const Ti big = Ti::from({1, 50, 2}, {3});
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{&big}), "[HashRouter] token id 50 at row 1 is out of range [0, 50)");
  const Ti neg = Ti::from({1, 2, -4}, {3});
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{&neg}), "token id -4 at row 2 is out of range");
  const Ti ok = Ti::from({1, 2, 3}, {3});
  MIXMOE_REQUIRE_ERROR(router(rand_var({3, 5}, 1), Ctx{&ok}),
                       "[HashRouter] x must be token rows (N, C) with C = d_model = 4, got shape (3, 5)");
  MIXMOE_REQUIRE_ERROR(HashRouter<double>(RouterShape{4, 3, 4}, gen),
                       "[HashRouter] top_k = 4 is out of range [1, num_experts = 3]");
  router.k = 5;
  MIXMOE_REQUIRE_ERROR(router(x, Ctx{&ok}), "[HashRouter] top_k = 5 is out of range [1, num_experts = 3]");
  MIXMOE_REQUIRE_ERROR(HashRouter<double>()(x, Ctx{&ok}), "[HashRouter] the router is default-constructed");
}

// ---- Fourier features ------------------------------------------------------------

namespace {

/// Unnormalised DFT bins 0..C/2 of one row, summed directly.
std::vector<std::complex<double>> direct_dft(const Mat& h, index_t i) {
  const index_t c = h.cols, f = c / 2 + 1;
  std::vector<std::complex<double>> y(static_cast<std::size_t>(f));
  for (index_t k = 0; k < f; ++k) {
    std::complex<double> s = 0;
    for (index_t n = 0; n < c; ++n)
      s += h(i, n) * std::polar(1.0, -2.0 * std::numbers::pi * static_cast<double>(k * n) / static_cast<double>(c));
    y[static_cast<std::size_t>(k)] = s;
  }
  return y;
}

/// phi(h) for transform policy P, computed here from its definition (the random matrix aside).
template <class P, class Router>
Mat explicit_phi(const Mat& h, const Router& router) {
  const index_t n = h.rows, c = h.cols;
  if constexpr (std::is_same_v<P, transform::FFTRealImag>) {
    Mat out(n, 2 * (c / 2 + 1));
    for (index_t i = 0; i < n; ++i) {
      const auto y = direct_dft(h, i);
      for (std::size_t k = 0; k < y.size(); ++k) {
        out(i, static_cast<index_t>(2 * k)) = y[k].real() / std::sqrt(static_cast<double>(c));
        out(i, static_cast<index_t>(2 * k + 1)) = y[k].imag() / std::sqrt(static_cast<double>(c));
      }
    }
    return out;
  } else if constexpr (std::is_same_v<P, transform::DCT>) {
    Mat out(n, c);
    for (index_t i = 0; i < n; ++i)
      for (index_t k = 0; k < c; ++k) {
        double s = 0;
        for (index_t m = 0; m < c; ++m)
          s += h(i, m) *
               std::cos(std::numbers::pi * static_cast<double>((2 * m + 1) * k) / (2.0 * static_cast<double>(c)));
        out(i, k) = s * std::sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(c));
      }
    return out;
  } else if constexpr (std::is_same_v<P, transform::RandomProjection>) {
    return matmul_t(h, to_mat(router.phi.matrix.value()));
  } else {  // FFTMagnitude<LogScale, Normalize>
    const double eps = router.phi.eps;
    const index_t f = c / 2 + 1;
    Mat out(n, f);
    for (index_t i = 0; i < n; ++i) {
      const auto y = direct_dft(h, i);
      for (index_t k = 0; k < f; ++k) {
        const auto v = y[static_cast<std::size_t>(k)];
        double m = std::sqrt(v.real() * v.real() + v.imag() * v.imag() + eps);
        if (P::log_scale) m = std::log1p(m);
        out(i, k) = m;
      }
      if (P::normalize) {
        double mu = 0, var = 0;
        for (index_t k = 0; k < f; ++k) mu += out(i, k) / static_cast<double>(f);
        for (index_t k = 0; k < f; ++k) var += (out(i, k) - mu) * (out(i, k) - mu) / static_cast<double>(f);
        for (index_t k = 0; k < f; ++k) out(i, k) = (out(i, k) - mu) / std::sqrt(var + router.phi.norm_eps);
      }
    }
    return out;
  }
}

template <bool L, bool N>
struct MagnitudeCase : transform::FFTMagnitude<L, N> {
  static constexpr bool log_scale = L, normalize = N;
};

}  // namespace

TEMPLATE_TEST_CASE("FourierFeatures: logits = base logits + phi(h) Wf^T, per transform", "[moe][routers][fourier]",
                   transform::FFTRealImag, transform::DCT, transform::RandomProjection, (MagnitudeCase<true, true>),
                   (MagnitudeCase<false, false>), (MagnitudeCase<true, false>), (MagnitudeCase<false, true>)) {
  using P = TestType;
  for (const index_t c : {8, 7}) {  // even and odd widths (with and without a Nyquist bin)
    INFO("C " << c);
    const index_t n = 5, e = 4;
    Generator gen(c);
    bind_router_t<FourierFeatures<TopK<2>, P>, double, Cpu> router(RouterShape{c, e, 3}, gen);
    if constexpr (requires { router.phi.eps; }) router.phi.eps = 1e-3;
    const index_t f = router.features();
    REQUIRE(router.fourier_weight.shape() == Shape{e, f});
    REQUIRE(router.base.top_k() == 2);
    const Td ht = Td::randn({n, c}, gen);
    const Mat h = to_mat(ht);
    const Mat phi = explicit_phi<P>(h, router);
    REQUIRE(phi.cols == f);
    const Mat zb = matmul_t(h, to_mat(router.base.weight.value()));
    const Mat zf = matmul_t(phi, to_mat(router.fourier_weight.value()));
    const auto r = router(Vd(ht), Ctx{});
    REQUIRE(max_abs_diff(router.base.logits(Vd(ht)).value(), router.base(Vd(ht), Ctx{}).logits.value()) == 0.0);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < e; ++j) REQUIRE(std::abs(r.logits.value()(i, j) - (zb(i, j) + zf(i, j))) < 1e-10);
    const Td features = router.feature_map(Vd(ht)).value();
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < f; ++j) REQUIRE(std::abs(features(i, j) - phi(i, j)) < 1e-10);
    // selection is the base router's on the combined logits
    const auto want = router.base.select(r.logits, Vd(ht), Ctx{});
    REQUIRE(ivec(r.expert) == ivec(want.expert));
    REQUIRE(max_abs_diff(r.gate.value(), want.gate.value()) == 0.0);
    // causal-safe: a token's logits do not move when another token's hidden vector does
    Td h2 = ht.clone();
    for (index_t j = 0; j < c; ++j) h2(3, j) += 1.0;
    const auto r2 = router(Vd(h2), Ctx{});
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < e; ++j)
        if (i != 3) REQUIRE(r2.logits.value()(i, j) == r.logits.value()(i, j));
  }
}

TEMPLATE_TEST_CASE("FourierFeatures: gradients w.r.t. h, the base weight and Wf, per transform",
                   "[moe][routers][fourier][gradcheck]", transform::FFTRealImag, transform::DCT,
                   transform::RandomProjection, transform::FFTMagnitude<>, (transform::FFTMagnitude<false, false>),
                   (transform::FFTMagnitude<true, false>), transform::None) {
  using P = TestType;
  for (const auto& [n, c, e] : std::vector<std::array<index_t, 3>>{{4, 8, 4}, {5, 7, 3}, {3, 6, 6}}) {
    INFO("N " << n << " C " << c << " E " << e);
    using R = bind_router_t<FourierFeatures<TopK<2>, P>, double, Cpu>;
    Generator gen(n + c);
    R router(RouterShape{c, e, 2}, gen);
    if constexpr (requires { router.phi.eps; }) router.phi.eps = 1e-3;
    const index_t f = router.features();
    auto fn = [router](const std::vector<Vd>& in) {
      R r = router;
      r.base.weight = in[1];
      if (in.size() > 2) r.fourier_weight = in[2];
      return routing_outputs(r(in[0], Ctx{}));
    };
    // Built by push_back only: GCC 12 warns falsely (-Warray-bounds) on a push_back after an
    // initializer-list construction here when the test is compiled in the unity build.
    std::vector<Vd> inputs;
    inputs.reserve(3);
    inputs.push_back(rand_var({n, c}, n + 21));
    inputs.push_back(rand_var({e, c}, e + 22));
    if (f > 0) inputs.push_back(rand_var({e, f}, f + 23));
    MIXMOE_REQUIRE_GRADCHECK(fn, inputs);
  }
}

TEST_CASE("FourierFeatures: gradients with Switch and expert-choice bases, and wrapped twice",
          "[moe][routers][fourier][gradcheck]") {
  {
    using R = bind_router_t<FourierFeatures<Switch, transform::DCT>, double, Cpu>;
    Generator gen(1);
    R router(RouterShape{6, 4, 1}, gen);
    auto fn = [router](const std::vector<Vd>& in) {
      R r = router;
      r.base.weight = in[1];
      r.fourier_weight = in[2];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(fn, (std::vector<Vd>{rand_var({5, 6}, 1), rand_var({4, 6}, 2), rand_var({4, 6}, 3)}));
  }
  {
    using R = bind_router_t<FourierFeatures<ExpertChoice, transform::FFTMagnitude<>>, double, Cpu>;
    Generator gen(2);
    R router(RouterShape{8, 3, 2}, gen);
    router.phi.eps = 1e-3;
    auto fn = [router](const std::vector<Vd>& in) {
      R r = router;
      r.base.weight = in[1];
      r.fourier_weight = in[2];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(fn, (std::vector<Vd>{rand_var({7, 8}, 4), rand_var({3, 8}, 5), rand_var({3, 5}, 6)}));
  }
  {
    using R = bind_router_t<FourierFeatures<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, transform::DCT>,
                            double, Cpu>;
    Generator gen(3);
    R router(RouterShape{6, 4, 2}, gen);
    router.base.phi.eps = 1e-3;
    std::vector<std::string> names;
    router.visit_parameters([&](const std::string& name, Vd&) { names.push_back(name); }, "router");
    REQUIRE(names ==
            std::vector<std::string>{"router.base.base.weight", "router.base.fourier.weight", "router.fourier.weight"});
    auto fn = [router](const std::vector<Vd>& in) {
      R r = router;
      r.base.base.weight = in[1];
      r.base.fourier_weight = in[2];
      r.fourier_weight = in[3];
      return routing_outputs(r(in[0], Ctx{}));
    };
    MIXMOE_REQUIRE_GRADCHECK(
        fn, (std::vector<Vd>{rand_var({4, 6}, 7), rand_var({4, 6}, 8), rand_var({4, 4}, 9), rand_var({4, 6}, 10)}));
  }
}

TEST_CASE("FourierFeatures: parameter names, None, zero-initialised Wf, float", "[moe][routers][fourier]") {
  Generator gen(5);
  bind_router_t<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, float, Cpu> router(RouterShape{16, 4, 2}, gen);
  auto names = named_parameters(router);
  REQUIRE(names.size() == 2);
  REQUIRE(names[0].first == "base.weight");
  REQUIRE(names[1].first == "fourier.weight");
  REQUIRE(names[1].second.shape() == Shape{4, 9});
  REQUIRE(count_parameters(router) == 4 * 16 + 4 * 9);

  // None: no Wf, the base router alone
  Generator g1(6), g2(6);
  bind_router_t<FourierFeatures<TopK<2>, transform::None>, double, Cpu> none(RouterShape{8, 4, 2}, g1);
  TopKRouter<double, Cpu, 2> plain(RouterShape{8, 4, 2}, g2);
  REQUIRE(named_parameters(none).size() == 1);
  REQUIRE(named_parameters(none)[0].first == "base.weight");
  REQUIRE_FALSE(none.fourier_weight.defined());
  const auto x = rand_var({5, 8}, 1, false);
  REQUIRE(max_abs_diff(none(x, Ctx{}).logits.value(), plain(x, Ctx{}).logits.value()) == 0.0);

  // fourier_init_std = 0: starts as its base router
  bind_router_t<FourierFeatures<TopK<2>, transform::DCT>, double, Cpu> zero(RouterShape{8, 4, 2}, g1, 0.0);
  REQUIRE(zero.fourier_weight.value().to_vector() == std::vector<double>(32, 0.0));
  REQUIRE(max_abs_diff(zero(x, Ctx{}).logits.value(), zero.base.logits(x).value()) == 0.0);

  // a default-constructed wrapper has no d_model, and says so
  bind_router_t<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, double, Cpu> unset;
  MIXMOE_REQUIRE_ERROR(unset(x, Ctx{}), "[FourierFeatures] x must be token rows (N, C) with C = d_model = 0");

  // float agrees with double on the same values
  Generator g3(5);
  bind_router_t<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, double, Cpu> dbl(RouterShape{16, 4, 2}, g3);
  dbl.base.weight = Vd(router.base.weight.value().to<double>(), true);
  dbl.fourier_weight = Vd(router.fourier_weight.value().to<double>(), true);
  Generator gx(7);
  const Tf hf = Tf::randn({6, 16}, gx);
  const auto rf = router(Var<float>(hf), Ctx{});
  const auto rd = dbl(Vd(hf.to<double>()), Ctx{});
  REQUIRE(max_abs_diff(rf.logits.value().to<double>(), rd.logits.value()) < 1e-4);
  REQUIRE(ivec(rf.expert) == ivec(rd.expert));
  REQUIRE(max_abs_diff(rf.gate.value().to<double>(), rd.gate.value()) < 1e-5);
}

TEST_CASE("FourierFeatures: DCT matrix orthonormal, random projection fixed by its seed", "[moe][routers][fourier]") {
  for (const index_t c : {1, 2, 7, 16}) {
    Generator gen(1);
    transform::DCTMap<double, Cpu> dct(c, gen);
    const Mat b = to_mat(dct.matrix.value());
    const Mat bbt = matmul_t(b, b);
    for (index_t i = 0; i < c; ++i)
      for (index_t j = 0; j < c; ++j) REQUIRE(std::abs(bbt(i, j) - (i == j ? 1.0 : 0.0)) < 1e-12);
    REQUIRE_FALSE(dct.matrix.requires_grad());
  }
  using R = bind_router_t<FourierFeatures<TopK<1>, transform::RandomProjection>, double, Cpu>;
  Generator g1(42), g2(42), g3(43);
  R a(RouterShape{6, 3, 1}, g1), b(RouterShape{6, 3, 1}, g2), c(RouterShape{6, 3, 1}, g3);
  REQUIRE(max_abs_diff(a.phi.matrix.value(), b.phi.matrix.value()) == 0.0);
  REQUIRE(max_abs_diff(a.phi.matrix.value(), c.phi.matrix.value()) > 0.1);
  REQUIRE_FALSE(a.phi.matrix.requires_grad());
  // drawn after the base weight from the same generator: N(0, 1/C) entries
  Generator replay(42);
  (void)Td::randn({3, 6}, replay);
  const Td expect = Td::randn({6, 6}, replay, 0.0, 1.0 / std::sqrt(6.0));
  REQUIRE(max_abs_diff(a.phi.matrix.value(), expect) == 0.0);
  // fixed across calls, and not trained (not a parameter)
  const auto x = rand_var({4, 6}, 2, false);
  REQUIRE(max_abs_diff(a(x, Ctx{}).logits.value(), a(x, Ctx{}).logits.value()) == 0.0);
  REQUIRE(named_parameters(a).size() == 2);
  // a trained step on the router leaves the projection alone
  auto r = a(rand_var({4, 6}, 3, false), Ctx{});
  sum(r.gate).backward();
  REQUIRE_FALSE(a.phi.matrix.grad().defined());
  REQUIRE(a.fourier_weight.grad().defined());
}

TEST_CASE("FourierFeatures: a concrete base router and the errors", "[moe][routers][fourier][errors]") {
  Generator gen(8);
  bind_router_t<FourierFeatures<TopKRouter<double, Cpu, 3>, transform::FFTRealImag>, double, Cpu> router(
      RouterShape{8, 5, 1}, gen);
  REQUIRE(router.base.top_k() == 3);
  REQUIRE(router(rand_var({4, 8}, 1), Ctx{}).gate.numel() == 12);
  MIXMOE_REQUIRE_ERROR(router(rand_var({4, 6}, 1), Ctx{}),
                       "[FourierFeatures] x must be token rows (N, C) with C = d_model = 8, got shape (4, 6)");
  MIXMOE_REQUIRE_ERROR(router.logits(rand_var({4}, 1)), "[FourierFeatures] x must be token rows");
  MIXMOE_REQUIRE_ERROR(router.phi(rand_var({4, 6}, 1)),
                       "[FFTRealImag] h must be token rows (N, C) with C = d_model = 8, got (4, 6)");
  MIXMOE_REQUIRE_ERROR((bind_router_t<FourierFeatures<TopK<>, transform::DCT>, double, Cpu>(RouterShape{8, 4, 5}, gen)),
                       "[TopKRouter] top_k = 5 is out of range [1, num_experts = 4]");
  transform::DCTMap<double, Cpu> dct(4, gen);
  MIXMOE_REQUIRE_ERROR(dct(rand_var({2, 5}, 1)), "[DCT] h must be token rows (N, C) with C = d_model = 4, got (2, 5)");
  MIXMOE_REQUIRE_ERROR((transform::DCTMap<double, Cpu>(0, gen)), "[DCT] d_model must be positive, got 0");
}

// ---- the Router concept's diagnostics ---------------------------------------------

namespace {

/// A minimal user router: everything to the expert given by the row's parity.
struct ParityRouter {
  using value_type = double;
  using device_type = Cpu;
  ParityRouter(const RouterShape& s, Generator&) : experts(s.num_experts) {}
  Routing<double> operator()(const Vd& x, const Ctx&) const {
    Routing<double> r;
    const index_t n = x.size(0);
    r.token = Ti::arange(n);
    r.expert = Ti::empty({n});
    for (index_t i = 0; i < n; ++i) r.expert(i) = static_cast<Index>(i % 2);
    r.gate = Vd(Td::ones({n}));
    r.probs = Vd(Td::zeros({n, experts}));
    r.logits = Vd(Td::zeros({n, experts}));
    r.num_experts = experts;
    r.num_tokens = n;
    return r;
  }
  [[nodiscard]] index_t num_experts() const { return experts; }
  void visit_parameters(const ParameterVisitor<double, Cpu>&, const std::string&) {}
  index_t experts;
};

}  // namespace

TEST_CASE("check_router accepts a user's router, and checked_router_t binds policies", "[moe][routers]") {
  static_assert(check_router<ParityRouter>());
  static_assert(std::is_same_v<checked_router_t<ParityRouter, double, Cpu>, ParityRouter>);
  static_assert(std::is_same_v<checked_router_t<TopK<2>, float, Cpu>, TopKRouter<float, Cpu, 2, true>>);
  static_assert(std::is_same_v<checked_router_t<HashRouting, double, Cpu>, HashRouter<double, Cpu>>);
  static_assert(!LogitRouter<HashRouter<double>>);
  static_assert(Router<bind_router_t<FourierFeatures<ExpertChoice, transform::RandomProjection>, float, Cpu>>);
  Generator gen(1);
  checked_router_t<ParityRouter, double, Cpu> r(RouterShape{4, 2, 1}, gen);
  REQUIRE(ivec(r(rand_var({3, 4}, 1), Ctx{}).expert) == std::vector<Index>{0, 1, 0});
}
}  // namespace test_moe_routers
