// Shape ops on Vars: reshape, transpose, permute, slice, concat.
#include <mixmoe/ops/shape_ops.hpp>

#include "test_util.hpp"

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_shape {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

/// A Var whose gradient after backward(g) of f(x) we inspect directly.
Td backward_grad(const std::function<Vd(const Vd&)>& f, const Vd& x, const Td& g) {
  x.zero_grad();
  f(x).backward(g);
  return x.grad();
}

}  // namespace

TEST_CASE("reshape: values, views and gradients", "[ops][shape]") {
  auto x = Vd(Td::arange(12).reshape({3, 4}), true);
  auto y = reshape(x, {2, -1, 3});
  REQUIRE(y.shape() == Shape{2, 2, 3});
  REQUIRE(y.value().shares_storage(x.value()));  // a contiguous input is reshaped as a view
  REQUIRE(y.value().to_vector() == x.value().to_vector());
  // the gradient of a view lands in x's layout, element for element
  const Td g = Td::from({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, {2, 2, 3});
  REQUIRE(backward_grad([](const Vd& v) { return reshape(v, {2, -1, 3}); }, x, g).to_vector() == g.to_vector());

  for (Shape s : {Shape{6, 4}, Shape{24}, Shape{2, -1}, Shape{4, 3, 2}, Shape{-1, 1, 8}}) {
    INFO("to " << s);
    MIXMOE_REQUIRE_GRADCHECK([s](const std::vector<Vd>& in) { return reshape(in[0], s); }, {rand_var({2, 3, 4}, 1)});
    // a transposed (non-contiguous) input is copied in its logical row-major order
    MIXMOE_REQUIRE_GRADCHECK([s](const std::vector<Vd>& in) { return reshape(transpose(in[0], 0, 2), s); },
                             {rand_var({2, 3, 4}, 2)});
  }
  auto xt = transpose(x, 0, 1);  // (4, 3)
  auto r = reshape(xt, {12});
  REQUIRE_FALSE(r.value().shares_storage(x.value()));
  REQUIRE(r.value().to_vector() == std::vector<double>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11});
}

TEST_CASE("transpose and permute: views, values and gradient layout", "[ops][shape]") {
  auto x = Vd(Td::arange(6).reshape({2, 3}), true);
  auto t = transpose(x, 0, 1);
  REQUIRE(t.shape() == Shape{3, 2});
  REQUIRE(t.value().shares_storage(x.value()));
  REQUIRE(t.value().to_vector() == std::vector<double>{0, 3, 1, 4, 2, 5});
  // dL/dy[j, i] flows to x[i, j]
  const Td g = Td::from({10, 20, 30, 40, 50, 60}, {3, 2});
  REQUIRE(backward_grad([](const Vd& v) { return transpose(v, 1, 0); }, x, g).to_vector() ==
          std::vector<double>{10, 30, 50, 20, 40, 60});

  auto x3 = Vd(Td::arange(24).reshape({2, 3, 4}), true);
  auto p = permute(x3, {2, 0, 1});  // (4, 2, 3)
  REQUIRE(p.shape() == Shape{4, 2, 3});
  REQUIRE(p.value().shares_storage(x3.value()));
  REQUIRE(p.value()(3, 1, 2) == x3.value()(1, 2, 3));
  REQUIRE(max_abs_diff(p.value(), x3.value().permute({2, 0, 1})) == 0.0);
  // backward: gradient element p[k, i, j] belongs to x[i, j, k]
  const Td gp = Td::arange(24).reshape({4, 2, 3});
  const Td gx = backward_grad([](const Vd& v) { return permute(v, {2, 0, 1}); }, x3, gp);
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j)
      for (index_t k = 0; k < 4; ++k) REQUIRE(gx(i, j, k) == gp(k, i, j));
  // a runtime order (std::vector) works like the literal one
  const std::vector<int> order = {1, 2, 0};
  REQUIRE(max_abs_diff(permute(x3, order).value(), x3.value().permute({1, 2, 0})) == 0.0);

  for (auto [a, b] : std::vector<std::pair<int, int>>{{0, 1}, {0, 2}, {1, 2}, {-1, 0}, {1, 1}}) {
    INFO("transpose " << a << " " << b);
    MIXMOE_REQUIRE_GRADCHECK([a, b](const std::vector<Vd>& in) { return transpose(in[0], a, b); },
                             {rand_var({2, 3, 4}, 3)});
  }
  for (const std::vector<int>& ord :
       std::vector<std::vector<int>>{{0, 1, 2}, {2, 1, 0}, {1, 2, 0}, {2, 0, 1}, {-1, 0, -2}}) {
    INFO("permute order of size " << ord.size() << " starting " << ord[0]);
    MIXMOE_REQUIRE_GRADCHECK([ord](const std::vector<Vd>& in) { return permute(in[0], ord); },
                             {rand_var({2, 3, 4}, 4)});
    // a chain of views: permute of a transposed view, then a copy-reshape
    MIXMOE_REQUIRE_GRADCHECK(
        [ord](const std::vector<Vd>& in) { return reshape(permute(transpose(in[0], 0, 1), ord), {-1}); },
        {rand_var({2, 3, 4}, 5)});
  }
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) {
        return permute(in[0], {3, 1, 0, 2});
      },
      {rand_var({2, 1, 3, 2}, 6)});
}

TEST_CASE("slice: view values and a gradient that is zero outside the window", "[ops][shape]") {
  auto x = Vd(Td::arange(12).reshape({3, 4}), true);
  auto s = slice(x, 1, 1, 3);  // (3, 2)
  REQUIRE(s.value().shares_storage(x.value()));
  REQUIRE(s.value().to_vector() == std::vector<double>{1, 2, 5, 6, 9, 10});
  const Td g = Td::from({1, 2, 3, 4, 5, 6}, {3, 2});
  REQUIRE(backward_grad([](const Vd& v) { return slice(v, -1, 1, 3); }, x, g).to_vector() ==
          std::vector<double>{0, 1, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0});
  REQUIRE(slice(x, 0, 2, 3).value().to_vector() == std::vector<double>{8, 9, 10, 11});
  REQUIRE(slice(x, 0, 1, 1).shape() == Shape{0, 4});

  for (int axis : {0, 1, 2, -1})
    for (auto [b, e] : std::vector<std::pair<index_t, index_t>>{{0, 1}, {1, 2}, {0, 2}}) {
      INFO("axis " << axis << " [" << b << ", " << e << ")");
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return slice(in[0], axis, b, e); },
                               {rand_var({2, 3, 4}, 7)});
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return slice(transpose(in[0], 0, 2), axis, b, e); },
                               {rand_var({2, 3, 4}, 8)});
    }
  // two overlapping slices of the same input: their gradients add up
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return slice(in[0], 1, 0, 3) * slice(in[0], 1, 1, 4); },
                           {rand_var({2, 4, 3}, 9)});
}

TEST_CASE("concat: values and gradients per input", "[ops][shape]") {
  auto a = Vd(Td::from({1, 2, 3, 4}, {2, 2}), true);
  auto b = Vd(Td::from({5, 6}, {2, 1}), true);
  auto c = Vd(Td::from({7, 8, 9, 10, 11, 12}, {2, 3}), true);
  auto y = concat({a, b, c}, 1);
  REQUIRE(y.shape() == Shape{2, 6});
  REQUIRE(y.value().to_vector() == std::vector<double>{1, 2, 5, 7, 8, 9, 3, 4, 6, 10, 11, 12});
  y.backward(Td::arange(12).reshape({2, 6}));
  REQUIRE(a.grad().to_vector() == std::vector<double>{0, 1, 6, 7});
  REQUIRE(b.grad().to_vector() == std::vector<double>{2, 8});
  REQUIRE(c.grad().to_vector() == std::vector<double>{3, 4, 5, 9, 10, 11});
  REQUIRE(concat(std::vector<Vd>{a, a}, 0).value().to_vector() == std::vector<double>{1, 2, 3, 4, 1, 2, 3, 4});

  auto cat = [](int axis) { return [axis](const std::vector<Vd>& in) { return concat(in, axis); }; };
  MIXMOE_REQUIRE_GRADCHECK(cat(0), {rand_var({1, 3, 4}, 1), rand_var({2, 3, 4}, 2), rand_var({3, 3, 4}, 3)});
  MIXMOE_REQUIRE_GRADCHECK(cat(1), {rand_var({2, 1, 4}, 1), rand_var({2, 3, 4}, 2), rand_var({2, 2, 4}, 3)});
  MIXMOE_REQUIRE_GRADCHECK(cat(-1), {rand_var({2, 3, 2}, 1), rand_var({2, 3, 1}, 2), rand_var({2, 3, 4}, 3)});
  MIXMOE_REQUIRE_GRADCHECK(cat(0), {rand_var({3}, 4), rand_var({0}, 5), rand_var({2}, 6)});  // an empty input
  // an input that does not require grad gets none; the same input twice accumulates
  MIXMOE_REQUIRE_GRADCHECK(cat(1), {rand_var({2, 2}, 7), rand_var({2, 3}, 8, false)});
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) {
        return concat({in[0], in[1], in[0]}, 0);
      },
      {rand_var({2, 3}, 9), rand_var({1, 3}, 10)});
  // non-contiguous inputs
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) {
        return concat({transpose(in[0], 0, 1), in[1]}, 1);
      },
      {rand_var({2, 3}, 11), rand_var({3, 4}, 12)});
}

TEST_CASE("float shape ops match double", "[ops][shape]") {
  Generator gen(5);
  auto x = Vf(Tf::randn({2, 3, 4}, gen), true);
  auto y = concat({slice(permute(x, {2, 1, 0}), 0, 1, 3), reshape(transpose(x, 0, 2), {4, 3, 2})}, 0);
  REQUIRE(y.shape() == Shape{6, 3, 2});
  sum(y * y).backward();
  // x appears once whole (via transpose) and once partly (the slice): grad = 2x everywhere plus 2x on the slice
  const auto xv = x.value(), gx = x.grad();
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j)
      for (index_t k = 0; k < 4; ++k) {
        const float expect = (k == 1 || k == 2 ? 4.0f : 2.0f) * xv(i, j, k);
        REQUIRE(gx(i, j, k) == Approx(expect));
      }
}

TEST_CASE("shape ops reject bad arguments", "[ops][shape][errors]") {
  auto x = rand_var({2, 3, 4}, 1);
  MIXMOE_REQUIRE_ERROR(reshape(x, {5, -1}), "[reshape] cannot infer -1: shape (2, 3, 4) to (5, -1)");
  MIXMOE_REQUIRE_ERROR(reshape(x, {5, 5}), "[reshape] shape (2, 3, 4) (24 elements) cannot become (5, 5)");
  MIXMOE_REQUIRE_ERROR(reshape(x, {-1, -1}), "[reshape] more than one -1");
  MIXMOE_REQUIRE_ERROR(transpose(x, 0, 3), "[transpose] axis 3 out of range for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(permute(x, {0, 1}), "[permute] 2 axes given for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(permute(x, {0, 1, -3}), "[permute] axis -3 repeated in the order for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(permute(x, {0, 1, 5}), "[permute] axis 5 out of range for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(slice(x, 1, 2, 4), "[slice] range [2, 4) out of bounds on axis 1 of shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(slice(x, 0, 2, 1), "[slice] range [2, 1) out of bounds");
  MIXMOE_REQUIRE_ERROR(slice(x, -4, 0, 1), "[slice] axis -4 out of range for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(concat(std::vector<Vd>{}, 0), "[concat] needs at least one input");
  MIXMOE_REQUIRE_ERROR(concat({x, rand_var({2, 5, 4}, 2)}, 0),
                       "[concat] input 1 of shape (2, 5, 4) does not match input 0 of shape (2, 3, 4) outside axis 0");
  MIXMOE_REQUIRE_ERROR(concat({x, rand_var({2, 3}, 2)}, 1), "[concat] input 1 of shape (2, 3) does not match input 0");
  MIXMOE_REQUIRE_ERROR(concat({x, x}, 3), "[concat] axis 3 out of range for shape (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(concat({x, Vd()}, 0), "[concat] input 1 is an undefined Var");
}
}  // namespace test_ops_shape
