// Autodiff engine: accumulation, no_grad, detach, custom ops, gradcheck itself.
#include "test_util.hpp"

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_autograd {

using namespace mixmoe;
using namespace mixmoe::test;

TEST_CASE("gradient of a shared input accumulates over uses", "[autograd]") {
  auto x = Vd(Td::from({1.0, 2.0, 3.0}, {3}), true);
  auto y = sum(x * x + x);  // dy/dx = 2x + 1
  y.backward();
  REQUIRE(x.grad().to_vector() == std::vector<double>{3.0, 5.0, 7.0});
  // a second backward accumulates into the leaf (gradient accumulation)
  auto y2 = sum(x * 2.0);
  y2.backward();
  REQUIRE(x.grad().to_vector() == std::vector<double>{5.0, 7.0, 9.0});
  x.zero_grad();
  REQUIRE_FALSE(x.grad().defined());
}

TEST_CASE("no_grad records nothing and detach stops gradients", "[autograd]") {
  auto x = rand_var({4}, 1);
  {
    no_grad guard;
    auto y = x * x;
    REQUIRE_FALSE(y.requires_grad());
    REQUIRE(y.is_leaf());
    {
      enable_grad on;
      REQUIRE((x * x).requires_grad());
    }
    REQUIRE_FALSE(grad_enabled());
  }
  REQUIRE(grad_enabled());
  auto z = sum(x * stop_gradient(x));  // d/dx = x (only the first factor)
  z.backward();
  REQUIRE(max_abs_diff(x.grad(), x.value()) == 0.0);
  MIXMOE_REQUIRE_ERROR(sum(x.detach()).backward(), "does not require grad");
}

TEST_CASE("intermediate gradients are freed unless retained", "[autograd]") {
  auto x = rand_var({3}, 2);
  auto h = x * 3.0;
  auto k = x * 2.0;
  k.retain_grad();
  auto y = sum(h + k);
  y.backward();
  REQUIRE_FALSE(h.grad().defined());
  REQUIRE(k.grad().defined());
  REQUIRE(k.grad().to_vector() == std::vector<double>{1.0, 1.0, 1.0});
}

TEST_CASE("backward checks its gradient's shape", "[autograd][errors]") {
  auto x = rand_var({2, 3}, 3);
  auto y = x * 2.0;
  MIXMOE_REQUIRE_ERROR(y.backward(), "implicit gradient only for one-element results; shape is (2, 3)");
  MIXMOE_REQUIRE_ERROR(y.backward(Td::ones({3, 2})), "gradient of shape (3, 2) for a result of shape (2, 3)");
  MIXMOE_REQUIRE_ERROR(Vd().value(), "undefined Var");
}

// A custom op written by a user: y = x^3 with its own backward.
template <class T>
Var<T> cube(const Var<T>& x) {
  auto out = detail::map(x.value(), [](T v) { return v * v * v; });
  return record("cube", out, {x}, [xv = x.value().contiguous()](autograd::BackwardContext<T, Cpu>& ctx) {
    Tensor<T> g = ctx.grad_in(0);
    for (index_t i = 0; i < g.numel(); ++i) g.data()[i] += 3 * xv.data()[i] * xv.data()[i] * ctx.grad_out().data()[i];
  });
}

// The same op with a deliberately wrong backward: gradcheck must catch it.
template <class T>
Var<T> wrong_cube(const Var<T>& x) {
  auto out = detail::map(x.value(), [](T v) { return v * v * v; });
  return record("wrong_cube", out, {x}, [xv = x.value().contiguous()](autograd::BackwardContext<T, Cpu>& ctx) {
    Tensor<T> g = ctx.grad_in(0);
    for (index_t i = 0; i < g.numel(); ++i) g.data()[i] += 2 * xv.data()[i] * xv.data()[i] * ctx.grad_out().data()[i];
  });
}

TEST_CASE("custom ops with their own backward, checked by gradcheck", "[autograd][gradcheck]") {
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return cube(in[0]); }, {rand_var({3, 4}, 4)});
  auto bad = gradcheck([](const std::vector<Vd>& in) { return wrong_cube(in[0]); }, {rand_var({3, 4}, 4)});
  REQUIRE_FALSE(bad.ok);
  REQUIRE_THAT(bad.message, Catch::Matchers::Contains("input 0 (3, 4) element 0"));
}

TEST_CASE("gradcheck: elementwise with broadcasting", "[ops][gradcheck]") {
  auto f = [](auto op) {
    return [op](const std::vector<Vd>& in) { return op(in[0], in[1]); };
  };
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{3, 4}, {3, 4}}, {{3, 4}, {4}}, {{2, 3, 4}, {3, 1}}, {{1, 4}, {3, 1}}, {{2, 1, 4}, {}}, {{4}, {2, 3, 4}}};
  for (auto [sa, sb] : cases) {
    INFO("shapes " << sa << " and " << sb);
    MIXMOE_REQUIRE_GRADCHECK(f([](auto a, auto b) { return a + b; }), {rand_var(sa, 1), rand_var(sb, 2)});
    MIXMOE_REQUIRE_GRADCHECK(f([](auto a, auto b) { return a - b; }), {rand_var(sa, 3), rand_var(sb, 4)});
    MIXMOE_REQUIRE_GRADCHECK(f([](auto a, auto b) { return a * b; }), {rand_var(sa, 5), rand_var(sb, 6)});
    auto den = rand_var(sb, 8);
    for (index_t i = 0; i < den.numel(); ++i) den.value().data()[i] = 0.5 + std::abs(den.value().data()[i]);
    MIXMOE_REQUIRE_GRADCHECK(f([](auto a, auto b) { return a / b; }), {rand_var(sa, 7), den});
  }
  // one input constant: it must get no gradient
  MIXMOE_REQUIRE_GRADCHECK(f([](auto a, auto b) { return a * b; }), {rand_var({3}, 1), rand_var({3}, 2, false)});
}

TEST_CASE("elementwise values and errors", "[ops]") {
  auto a = Vd(Td::from({1, 2, 3, 4, 5, 6}, {2, 3}));
  auto b = Vd(Td::from({10, 20, 30}, {3}));
  REQUIRE((a + b).value().to_vector() == std::vector<double>{11, 22, 33, 14, 25, 36});
  REQUIRE((a * 2.0 - 1.0).value().to_vector() == std::vector<double>{1, 3, 5, 7, 9, 11});
  MIXMOE_REQUIRE_ERROR(a + Vd(Td::zeros({2})), "[add] shapes (2, 3) and (2) do not broadcast");
  // transposed (non-contiguous) operands
  auto at = Vd(a.value().transpose(0, 1));
  REQUIRE((at + Vd(Td::zeros({3, 2}))).value().to_vector() == std::vector<double>{1, 4, 2, 5, 3, 6});
}

TEST_CASE("gradcheck: sum and mean", "[ops][gradcheck]") {
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return sum(in[0]); }, {rand_var({2, 3, 4}, 1)});
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return mean(in[0]); }, {rand_var({2, 3, 4}, 1)});
  for (int axis : {0, 1, 2, -1})
    for (bool keep : {false, true}) {
      INFO("axis " << axis << " keepdim " << keep);
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return sum(in[0], axis, keep); }, {rand_var({2, 3, 4}, 2)});
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return mean(in[0], axis, keep); }, {rand_var({2, 3, 4}, 3)});
    }
  auto x = Vd(Td::arange(6).reshape({2, 3}));
  REQUIRE(sum(x, 1).value().to_vector() == std::vector<double>{3, 12});
  REQUIRE(mean(x, 0).value().to_vector() == std::vector<double>{1.5, 2.5, 3.5});
  MIXMOE_REQUIRE_ERROR(sum(x, 2), "[sum] axis 2 out of range for shape (2, 3)");
  MIXMOE_REQUIRE_ERROR(mean(Vd(Td::zeros({0}))), "[mean] mean of an empty tensor");
}

TEST_CASE("gradcheck: matmul, batched matmul, linear", "[ops][gradcheck]") {
  auto mm = [](const std::vector<Vd>& in) { return matmul(in[0], in[1]); };
  MIXMOE_REQUIRE_GRADCHECK(mm, {rand_var({3, 4}, 1), rand_var({4, 5}, 2)});
  MIXMOE_REQUIRE_GRADCHECK(mm, {rand_var({2, 3, 4}, 1), rand_var({2, 4, 5}, 2)});
  MIXMOE_REQUIRE_GRADCHECK(mm, {rand_var({2, 2, 3, 4}, 1), rand_var({4, 5}, 2)});   // broadcast b
  MIXMOE_REQUIRE_GRADCHECK(mm, {rand_var({3, 4}, 1), rand_var({2, 4, 5}, 2)});      // broadcast a
  auto lin = [](const std::vector<Vd>& in) { return linear(in[0], in[1], in[2]); };
  MIXMOE_REQUIRE_GRADCHECK(lin, {rand_var({2, 3, 4}, 1), rand_var({5, 4}, 2), rand_var({5}, 3)});
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return linear(in[0], in[1]); }, {rand_var({6, 4}, 1), rand_var({5, 4}, 2)});
  // values against a hand computation
  auto a = Vd(Td::from({1, 2, 3, 4}, {2, 2})), b = Vd(Td::from({5, 6, 7, 8}, {2, 2}));
  REQUIRE(matmul(a, b).value().to_vector() == std::vector<double>{19, 22, 43, 50});
  REQUIRE(linear(a, b).value().to_vector() == std::vector<double>{17, 23, 39, 53});
  MIXMOE_REQUIRE_ERROR(matmul(a, Vd(Td::zeros({3, 2}))), "[matmul] inner dimensions differ: (2, 2) x (3, 2)");
  MIXMOE_REQUIRE_ERROR(matmul(Vd(Td::zeros({2})), b), "[matmul] needs at least 2-D operands");
  MIXMOE_REQUIRE_ERROR(linear(a, Vd(Td::zeros({2, 3}))), "[linear] input (2, 2) does not match weight (2, 3)");
}

TEST_CASE("BLAS and Eigen GEMM agree, all transposes", "[ops][gemm]") {
  Generator g(11);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const index_t m = 37, n = 29, k = 53;
      auto a = Tf::randn(ta ? Shape{k, m} : Shape{m, k}, g), b = Tf::randn(tb ? Shape{n, k} : Shape{k, n}, g);
      auto c1 = Tf::randn({m, n}, g), c2 = c1.clone();
      cpu::gemm(ta, tb, m, n, k, 0.5f, a.data(), ta ? m : k, b.data(), tb ? k : n, 2.0f, c1.data(), n);
      cpu::gemm_eigen(ta, tb, m, n, k, 0.5f, a.data(), ta ? m : k, b.data(), tb ? k : n, 2.0f, c2.data(), n);
      REQUIRE(max_abs_diff(c1, c2) < 1e-4);
    }
}
}  // namespace test_autograd
