// topk: sorted values and indices, tie order, NaN, gradients, errors.
#include <mixmoe/ops/shape_ops.hpp>
#include <mixmoe/ops/topk.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_topk {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {
using Ti = Tensor<Index>;
std::vector<Index> ivec(const Ti& t) { return t.to_vector(); }
}  // namespace

TEST_CASE("topk: sorted descending, ties broken by the lower index", "[ops][topk]") {
  auto x = Vd(Td::from({3, 1, 3, 2, 0, 5, 5, 5}, {2, 4}), true);
  auto r = topk(x, 3);
  REQUIRE(r.values.shape() == Shape{2, 3});
  REQUIRE(r.values.value().to_vector() == std::vector<double>{3, 3, 2, 5, 5, 5});
  REQUIRE(ivec(r.indices) == std::vector<Index>{0, 2, 3, 1, 2, 3});
  auto r2 = topk(x, 2, 1);
  REQUIRE(ivec(r2.indices) == std::vector<Index>{0, 2, 1, 2});
  auto r4 = topk(x, 4, -1);  // k = extent: a full stable descending sort
  REQUIRE(r4.values.value().to_vector() == std::vector<double>{3, 3, 2, 1, 5, 5, 5, 0});
  REQUIRE(ivec(r4.indices) == std::vector<Index>{0, 2, 3, 1, 1, 2, 3, 0});

  // along axis 0
  auto y = Vd(Td::from({1, 4, 7, 4, 1, 4}, {3, 2}));
  auto c = topk(y, 2, 0);
  REQUIRE(c.values.shape() == Shape{2, 2});
  REQUIRE(c.values.value().to_vector() == std::vector<double>{7, 4, 1, 4});
  REQUIRE(ivec(c.indices) == std::vector<Index>{1, 0, 0, 1});

  // a NaN ranks above every number; -inf below
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  auto z = Vd(Td::from({1, nan, -inf, 3, inf}, {5}));
  auto n = topk(z, 4);
  REQUIRE(ivec(n.indices) == std::vector<Index>{1, 4, 3, 0});
  REQUIRE(std::isnan(n.values.value()(0)));
  REQUIRE(n.values.value()(1) == inf);

  // middle axis of a 3-D tensor, compared with a stable sort per line
  Generator gen(4);
  Td w = Td::randn({3, 7, 4}, gen);
  for (index_t i = 0; i < w.numel(); i += 3) w.data()[i] = 0.5;  // plenty of ties
  auto m = topk(Vd(w), 5, 1);
  for (index_t o = 0; o < 3; ++o)
    for (index_t i = 0; i < 4; ++i) {
      std::vector<index_t> order(7);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](index_t p, index_t q) { return w(o, p, i) > w(o, q, i); });
      for (index_t j = 0; j < 5; ++j) {
        REQUIRE(m.indices(o, j, i) == order[static_cast<std::size_t>(j)]);
        REQUIRE(m.values.value()(o, j, i) == w(o, order[static_cast<std::size_t>(j)], i));
      }
    }
}

TEST_CASE("topk: the gradient goes to the selected positions", "[ops][topk]") {
  auto x = Vd(Td::from({3, 1, 4, 2, 0, 5, 9, 6}, {2, 4}), true);
  auto r = topk(x, 2);
  REQUIRE(ivec(r.indices) == std::vector<Index>{2, 0, 2, 3});
  r.values.backward(Td::from({10, 20, 30, 40}, {2, 2}));
  REQUIRE(x.grad().to_vector() == std::vector<double>{20, 0, 10, 0, 0, 0, 30, 40});

  const Shape s{3, 4, 5};
  for (int axis : {0, 1, 2, -1}) {
    const index_t n = s[axis < 0 ? axis + 3 : axis];
    for (index_t k : {index_t{1}, index_t{2}, n}) {
      INFO("axis " << axis << " k " << k);
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return topk(in[0], k, axis).values; },
                               {rand_var(s, 1)});
    }
  }
  // non-contiguous input: top-2 along what was axis 0
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return topk(transpose(in[0], 0, 2), 2, -1).values; },
                           {rand_var({4, 3, 2}, 2)});
  // the router pattern: values are used, indices are plain data
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) {
        auto r = topk(in[0], 2);
        return r.values * r.values;
      },
      {rand_var({6, 8}, 3)});
}

TEST_CASE("topk in float on many rows matches a reference", "[ops][topk]") {
  Generator gen(8);
  const Tf x = Tf::randn({400, 64}, gen);
  auto xv = Vf(x, true);
  auto r = topk(xv, 2);
  bool ok = true;
  for (index_t row = 0; row < 400; ++row) {
    const float* p = x.data() + row * 64;
    const auto best = std::max_element(p, p + 64) - p;
    ok = ok && r.indices(row, 0) == best && r.values.value()(row, 0) == p[best];
    ok = ok && r.values.value()(row, 1) <= r.values.value()(row, 0) && r.indices(row, 1) != best;
  }
  REQUIRE(ok);
  sum(r.values).backward();
  const auto g = xv.grad().to_vector();
  REQUIRE(std::accumulate(g.begin(), g.end(), 0.0) == 800.0);
}

TEST_CASE("topk rejects k out of range and bad axes", "[ops][topk][errors]") {
  auto x = rand_var({2, 4}, 1);
  MIXMOE_REQUIRE_ERROR(topk(x, 0), "[topk] k = 0 is out of range [1, 4] for axis -1 of shape (2, 4)");
  MIXMOE_REQUIRE_ERROR(topk(x, 5), "[topk] k = 5 is out of range [1, 4] for axis -1 of shape (2, 4)");
  MIXMOE_REQUIRE_ERROR(topk(x, 3, 0), "[topk] k = 3 is out of range [1, 2] for axis 0 of shape (2, 4)");
  MIXMOE_REQUIRE_ERROR(topk(x, 1, 2), "[topk] axis 2 out of range for shape (2, 4)");
}

TEST_CASE("topk: rewriting the returned indices does not change the gradient", "[ops][topk]") {
  auto x = Vd(Td::from({1, 5, 3, 2}, {1, 4}), true);
  auto r = topk(x, 2);
  r.indices.fill_(0);  // e.g. a caller turning them into global expert ids in place
  r.values.backward(Td::from({1, 2}, {1, 2}));
  REQUIRE(x.grad().to_vector() == std::vector<double>{0, 1, 2, 0});
}
}  // namespace test_ops_topk
