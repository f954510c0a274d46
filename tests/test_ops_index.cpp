// Indexing ops: index_select, gather, scatter_add.
#include <mixmoe/ops/embedding.hpp>
#include <mixmoe/ops/index.hpp>
#include <mixmoe/ops/shape_ops.hpp>

#include "test_util.hpp"

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_index {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Ti = Tensor<Index>;

/// Uniform indices in [0, extent) of the given shape.
Ti rand_index(const Shape& s, index_t extent, std::uint64_t seed) {
  Generator g(seed);
  Ti t = Ti::empty(s);
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<Index>(g.below(static_cast<std::uint64_t>(extent)));
  return t;
}

/// The coordinates of element `flat` of a row-major 3-D shape.
std::array<index_t, 3> coords3(const Shape& s, index_t flat) {
  return {flat / (s[1] * s[2]), (flat / s[2]) % s[1], flat % s[2]};
}

/// gather on rank-3 tensors, written out from the definition.
Td naive_gather(const Td& x, int axis, const Ti& idx) {
  Td out = Td::empty(idx.shape());
  for (index_t f = 0; f < idx.numel(); ++f) {
    auto c = coords3(idx.shape(), f);
    auto xc = c;
    xc[static_cast<std::size_t>(axis)] = idx(c[0], c[1], c[2]);
    out.data()[f] = x(xc[0], xc[1], xc[2]);
  }
  return out;
}

/// scatter_add on rank-3 tensors, written out from the definition.
Td naive_scatter_add(const Td& x, int axis, const Ti& idx, const Td& src) {
  Td out = x.clone();
  for (index_t f = 0; f < idx.numel(); ++f) {
    auto c = coords3(idx.shape(), f);
    auto xc = c;
    xc[static_cast<std::size_t>(axis)] = idx(c[0], c[1], c[2]);
    out(xc[0], xc[1], xc[2]) += src(c[0], c[1], c[2]);
  }
  return out;
}

}  // namespace

TEST_CASE("index_select: values and accumulating backward", "[ops][index]") {
  auto x = Vd(Td::arange(12).reshape({4, 3}), true);
  const Ti idx = Ti::from({2, 0, 2, 3}, {4});
  auto y = index_select(x, 0, idx);
  REQUIRE(y.shape() == Shape{4, 3});
  REQUIRE(y.value().to_vector() == std::vector<double>{6, 7, 8, 0, 1, 2, 6, 7, 8, 9, 10, 11});
  y.backward(Td::arange(12).reshape({4, 3}));
  // row 2 is picked twice: it receives output rows 0 and 2; row 1 is never picked
  REQUIRE(x.grad().to_vector() == std::vector<double>{3, 4, 5, 0, 0, 0, 6, 8, 10, 9, 10, 11});
  auto cols = index_select(x, 1, Ti::from({1, 1}, {2}));
  REQUIRE(cols.value().to_vector() == std::vector<double>{1, 1, 4, 4, 7, 7, 10, 10});
  REQUIRE(index_select(x, 0, Ti::empty({0})).shape() == Shape{0, 3});

  for (int axis : {0, 1, 2, -1}) {
    INFO("axis " << axis);
    const Shape s{3, 4, 5};
    const index_t n = s[axis < 0 ? axis + 3 : axis];
    const Ti rep = rand_index({7}, n, 10 + static_cast<std::uint64_t>(axis + 1));  // 7 picks from <= 5: repeats
    MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return index_select(in[0], axis, rep); },
                             {rand_var(s, 1)});
    // a transposed (non-contiguous) x: axes 0 and 2 swap, so the picked axis has extent s[2 - a]
    const int a = axis < 0 ? axis + 3 : axis;
    const Ti rep_t = rand_index({6}, s[2 - a], 20 + static_cast<std::uint64_t>(a));
    MIXMOE_REQUIRE_GRADCHECK(
        [=](const std::vector<Vd>& in) { return index_select(transpose(in[0], 0, 2), axis, rep_t); }, {rand_var(s, 2)});
  }
  // a non-contiguous index tensor
  const Ti idx2 = Ti::from({2, 9, 1, 9, 0, 9}, {3, 2}).transpose(0, 1)[0];  // {2, 1, 0} with stride 2
  REQUIRE_FALSE(idx2.is_contiguous());
  REQUIRE(index_select(x, 0, idx2).value().to_vector() == std::vector<double>{6, 7, 8, 3, 4, 5, 0, 1, 2});
}

TEST_CASE("index_select backward on large inputs matches a serial reference", "[ops][index]") {
  // sizes that make both parallel split strategies (by slab and by column) run
  for (const Shape& s : {Shape{3, 50, 300}, Shape{50, 300}}) {
    INFO("shape " << s);
    const int axis = s.rank() - 2;
    Generator gen(3);
    auto x = Vf(Tf::randn(s, gen), true);
    const Ti idx = rand_index({2000}, 50, 4);
    auto y = index_select(x, axis, idx);
    const Tf g = Tf::randn(y.shape(), gen);
    y.backward(g);
    const index_t outer = s.rank() == 3 ? s[0] : 1, inner = 300;
    Tf expect = Tf::zeros(s);
    const Tf yv = y.value();
    bool values_match = true;
    for (index_t o = 0; o < outer; ++o)
      for (index_t j = 0; j < 2000; ++j)
        for (index_t i = 0; i < inner; ++i) {
          const index_t src = (o * 2000 + j) * inner + i, dst = (o * 50 + idx.data()[j]) * inner + i;
          expect.data()[dst] += g.data()[src];
          values_match = values_match && yv.data()[src] == x.value().data()[dst];
        }
    REQUIRE(values_match);
    REQUIRE(max_abs_diff(x.grad(), expect) < 1e-4);
  }
}

TEST_CASE("gather: torch semantics, values and gradients", "[ops][index]") {
  // the example of torch.gather's documentation
  auto t = Vd(Td::from({1, 2, 3, 4}, {2, 2}), true);
  auto y = gather(t, 1, Ti::from({0, 0, 1, 0}, {2, 2}));
  REQUIRE(y.value().to_vector() == std::vector<double>{1, 1, 4, 3});
  y.backward(Td::from({1, 2, 3, 4}, {2, 2}));
  REQUIRE(t.grad().to_vector() == std::vector<double>{3, 0, 4, 3});  // t[0, 0] picked twice
  // along axis 0, with an index smaller than x off the axis
  auto x = Vd(Td::arange(12).reshape({3, 4}));
  REQUIRE(gather(x, 0, Ti::from({2, 0, 1, 2, 2, 2}, {2, 3})).value().to_vector() ==
          std::vector<double>{8, 1, 6, 8, 9, 10});

  const Shape s{3, 4, 5};
  for (int axis : {0, 1, 2, -1}) {
    const int a = axis < 0 ? axis + 3 : axis;
    for (const Shape& is : {Shape{3, 4, 5}, Shape{2, 3, 4}.with(a, 6), Shape{1, 2, 2}.with(a, 9)}) {
      INFO("axis " << axis << " index shape " << is);
      const Ti idx = rand_index(is, s[a], 30 + static_cast<std::uint64_t>(a));
      auto xv = rand_var(s, 5);
      REQUIRE(max_abs_diff(gather(xv, axis, idx).value(), naive_gather(xv.value(), a, idx)) == 0.0);
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return gather(in[0], axis, idx); }, {xv});
    }
  }
  // a permuted (non-contiguous) x: (5, 3, 4)
  const Ti idx = rand_index({5, 3, 7}, 4, 40);
  auto xv = rand_var({3, 4, 5}, 6);
  REQUIRE(max_abs_diff(gather(permute(xv, {2, 0, 1}), 2, idx).value(),
                       naive_gather(xv.value().permute({2, 0, 1}), 2, idx)) == 0.0);
  MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return gather(permute(in[0], {2, 0, 1}), 2, idx); }, {xv});
}

TEST_CASE("scatter_add: torch semantics, values and gradients", "[ops][index]") {
  // the example of torch.Tensor.scatter_add_'s documentation
  auto src = Vd(Td::ones({2, 5}), true);
  auto x0 = Vd(Td::zeros({3, 5}), true);
  const Ti idx1 = Ti::from({0, 1, 2, 0, 0}, {1, 5});
  REQUIRE(scatter_add(x0, 0, idx1, src).value().to_vector() ==
          std::vector<double>{1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0});
  const Ti idx2 = Ti::from({0, 1, 2, 0, 0, 0, 1, 2, 2, 2}, {2, 5});
  auto y = scatter_add(x0, 0, idx2, src);
  REQUIRE(y.value().to_vector() == std::vector<double>{2, 0, 0, 1, 1, 0, 2, 0, 0, 0, 0, 0, 2, 1, 1});
  const Td g = Td::arange(15).reshape({3, 5});
  y.backward(g);
  REQUIRE(x0.grad().to_vector() == g.to_vector());
  // src[i, j] reads the gradient of the element it was added to
  REQUIRE(src.grad().to_vector() == std::vector<double>{0, 6, 12, 3, 4, 0, 6, 12, 13, 14});

  const Shape s{3, 4, 5};
  for (int axis : {0, 1, 2, -1}) {
    const int a = axis < 0 ? axis + 3 : axis;
    for (const Shape& is : {Shape{3, 4, 5}, Shape{2, 3, 4}.with(a, 7), Shape{1, 2, 2}.with(a, 9)}) {
      INFO("axis " << axis << " index shape " << is);
      const Ti idx = rand_index(is, s[a], 50 + static_cast<std::uint64_t>(a));
      Shape ss = is;  // src one larger than the index on every axis: the extra elements get no gradient
      for (int d = 0; d < 3; ++d) ss[d] += 1;
      auto xv = rand_var(s, 7), sv = rand_var(ss, 8);
      REQUIRE(max_abs_diff(scatter_add(xv, axis, idx, sv).value(), naive_scatter_add(xv.value(), a, idx, sv.value())) <
              1e-14);
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return scatter_add(in[0], axis, idx, in[1]); },
                               {xv, sv});
      // only src, or only x, differentiable
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return scatter_add(in[0], axis, idx, in[1]); },
                               {rand_var(s, 9, false), rand_var(ss, 10)});
      MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return scatter_add(in[0], axis, idx, in[1]); },
                               {rand_var(s, 11), rand_var(ss, 12, false)});
    }
  }
  // non-contiguous x and src
  const Ti idx = rand_index({4, 3, 2}, 5, 60);
  MIXMOE_REQUIRE_GRADCHECK(
      [=](const std::vector<Vd>& in) { return scatter_add(transpose(in[0], 0, 2), 0, idx, transpose(in[1], 0, 1)); },
      {rand_var({3, 4, 5}, 13), rand_var({3, 4, 2}, 14)});
}

TEST_CASE("float index ops agree with double", "[ops][index]") {
  Generator gen(9);
  const Tf xf = Tf::randn({4, 6, 5}, gen);
  const Ti idx = rand_index({4, 9, 5}, 6, 70);
  auto xd = Vd(xf.to<double>(), true);
  auto x = Vf(xf, true);
  const Tf srcf = Tf::randn({4, 9, 5}, gen);
  auto yf = scatter_add(x, 1, idx, gather(x, 1, idx) * Vf(srcf));
  auto yd = scatter_add(xd, 1, idx, gather(xd, 1, idx) * Vd(srcf.to<double>()));
  REQUIRE(max_abs_diff(yf.value().to<double>(), yd.value()) < 1e-5);
  sum(yf * yf).backward();
  sum(yd * yd).backward();
  REQUIRE(max_abs_diff(x.grad().to<double>(), xd.grad()) < 1e-3);
}

TEST_CASE("index ops name the bad index, its position and the extent", "[ops][index][errors]") {
  auto x = rand_var({4, 3}, 1);
  MIXMOE_REQUIRE_ERROR(
      index_select(x, 0, Ti::from({0, 5, 1}, {3})),
      "[index_select] index 5 at position (1) is out of range for axis 0 of extent 4 (x of shape (4, 3))");
  MIXMOE_REQUIRE_ERROR(index_select(x, -1, Ti::from({0, -1}, {2})),
                       "[index_select] index -1 at position (1) is out of range for axis -1 of extent 3");
  MIXMOE_REQUIRE_ERROR(index_select(x, 0, Ti::from({0, 1}, {1, 2})),
                       "[index_select] index must be 1-D, got shape (1, 2)");
  MIXMOE_REQUIRE_ERROR(index_select(x, 2, Ti::from({0}, {1})), "[index_select] axis 2 out of range for shape (4, 3)");

  MIXMOE_REQUIRE_ERROR(
      gather(x, 1, Ti::from({0, 1, 2, 3}, {2, 2})),
      "[gather] index 3 at position (1, 1) is out of range for axis 1 of extent 3 (x of shape (4, 3))");
  MIXMOE_REQUIRE_ERROR(gather(x, 1, Ti::from({0, 1}, {2})),
                       "[gather] index of shape (2) must have the rank of x of shape (4, 3)");
  MIXMOE_REQUIRE_ERROR(
      gather(x, 1, Ti::zeros({5, 1})),
      "[gather] index of shape (5, 1) is larger than x of shape (4, 3) on axis 0 (only the gather axis 1");
  MIXMOE_REQUIRE_ERROR(gather(x, -3, Ti::zeros({4, 3})), "[gather] axis -3 out of range for shape (4, 3)");

  auto src = rand_var({4, 3}, 2);
  MIXMOE_REQUIRE_ERROR(
      scatter_add(x, 0, Ti::from({0, 4}, {1, 2}), src),
      "[scatter_add] index 4 at position (0, 1) is out of range for axis 0 of extent 4 (x of shape (4, 3))");
  MIXMOE_REQUIRE_ERROR(scatter_add(x, 0, Ti::zeros({2}), src),
                       "[scatter_add] x (4, 3), index (2) and src (4, 3) must have the same rank");
  MIXMOE_REQUIRE_ERROR(scatter_add(x, 0, Ti::zeros({5, 3}), src),
                       "[scatter_add] index of shape (5, 3) is larger than src of shape (4, 3) on axis 0");
  MIXMOE_REQUIRE_ERROR(
      scatter_add(x, 0, Ti::zeros({1, 4}), rand_var({1, 4}, 3)),
      "[scatter_add] index of shape (1, 4) is larger than x of shape (4, 3) on axis 1 (only the scatter axis 0");
  MIXMOE_REQUIRE_ERROR(scatter_add(x, 2, Ti::zeros({1, 1}), src), "[scatter_add] axis 2 out of range for shape (4, 3)");
}

TEST_CASE("on the CPU every IndexCheck checks at once", "[ops][index][errors]") {
  auto x = rand_var({4, 3}, 1);
  for (const IndexCheck c : {IndexCheck::checked, IndexCheck::deferred, IndexCheck::trusted}) {
    MIXMOE_REQUIRE_ERROR(
        index_select(x, 0, Ti::from({0, 5, 1}, {3}), c),
        "[index_select] index 5 at position (1) is out of range for axis 0 of extent 4 (x of shape (4, 3))");
    MIXMOE_REQUIRE_ERROR(
        gather(x, 1, Ti::from({0, 1, 2, 3}, {2, 2}), c),
        "[gather] index 3 at position (1, 1) is out of range for axis 1 of extent 3 (x of shape (4, 3))");
    MIXMOE_REQUIRE_ERROR(
        scatter_add(x, 0, Ti::from({0, 4}, {1, 2}), rand_var({4, 3}, 2), c),
        "[scatter_add] index 4 at position (0, 1) is out of range for axis 0 of extent 4 (x of shape (4, 3))");
    MIXMOE_REQUIRE_ERROR(embedding(x, Ti::from({2, 4, 7}, {3}), c),
                         "[embedding] id 4 at position (1) is out of range for a vocabulary of V = 4");
    // a good index gives the same values whatever the mode
    REQUIRE(max_abs_diff(embedding(x, Ti::from({3, 0}, {2}), c).value(),
                         index_select(x, 0, Ti::from({3, 0}, {2})).value()) == 0);
  }
}
}  // namespace test_ops_index
