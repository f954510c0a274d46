// Parity cases of the index family: index_select, gather, scatter_add (ops/index.hpp), embedding
// (ops/embedding.hpp), the shape ops (ops/shape_ops.hpp) and dropout (ops/dropout.hpp), forward
// and the gradients of sum(y * g), with repeated indices, strided inputs, empty and wide shapes.
//
// Pure copies (the forwards of the index and shape ops) must be exact (tolerance 0). The
// backwards that add repeated indices use atomics on the device: their float tolerance allows
// another order of the terms. The range checks are compared by their error messages, and dropout
// (whose device mask is another random stream than the CPU's) by properties recorded as exact
// 0/1 flags: a failing flag prints what it saw.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <mixmoe/ops/dropout.hpp>
#include <mixmoe/ops/embedding.hpp>
#include <mixmoe/ops/index.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/ops/shape_ops.hpp>

#include "parity.hpp"

namespace mixmoe_parity {

namespace index_cases {

/// Uniform indices in [lo, hi) of `shape` on D (drawn on the host: the same on every device).
template <class D>
mixmoe::Tensor<mixmoe::Index, D> rand_index(const mixmoe::Shape& shape, index_t lo, index_t hi, std::uint64_t seed) {
  mixmoe::Generator gen(seed);
  std::vector<mixmoe::Index> v(static_cast<std::size_t>(shape.numel()));
  for (auto& e : v)
    e = static_cast<mixmoe::Index>(lo + static_cast<index_t>(gen.below(static_cast<std::uint64_t>(hi - lo))));
  return mixmoe::Tensor<mixmoe::Index, D>::from(v, shape);
}

template <class D>
mixmoe::Tensor<mixmoe::Index, D> indices(const std::vector<mixmoe::Index>& v, const mixmoe::Shape& shape) {
  return mixmoe::Tensor<mixmoe::Index, D>::from(v, shape);
}

/// Records a 0/1 flag (exact); prints `what` when it is 0, so a failure says what was seen.
inline void flag(Results& r, const std::string& name, bool ok, const std::string& what = "") {
  if (!ok) std::printf("  [%s] is false%s%s\n", name.c_str(), what.empty() ? "" : ": ", what.c_str());
  r.push_back(Result{name, {ok ? 1.0 : 0.0}, 0.0});
}

/// Whether f() throws mixmoe::Error with exactly the message `expected` (prints what it got if not).
template <class F>
void error_case(Results& r, const std::string& name, const std::string& expected, F&& f) {
  std::string got = "(no error)";
  try {
    f();
  } catch (const mixmoe::Error& e) {
    got = e.what();
  }
  flag(r, name, got == expected, "expected \"" + expected + "\", got \"" + got + "\"");
}

template <class T, class D>
void index_select_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double exact = 0, atomic_tol = tol<T>(1e-5, 1e-12);
  struct Case {
    Shape x;
    int axis;
    index_t m;  // index length
  };
  // widths (inner) 1, 7, 33, 257, 1001; many repeats (m > extent); a single row
  const Case cases[] = {{{5, 7}, 0, 12},   {{6, 33}, 1, 50},   {{2, 9, 257}, 1, 20}, {{1, 1}, 0, 3},
                        {{3, 1001}, 0, 7}, {{4, 3, 5}, -1, 9}, {{2, 3, 4}, 0, 0}};
  std::uint64_t seed = 1000;
  for (const Case& c : cases) {
    const std::string name =
        t + " index_select " + c.x.to_string() + " axis " + std::to_string(c.axis) + " m " + std::to_string(c.m);
    auto x = leaf<T, D>(c.x, ++seed);
    const index_t extent = c.x[c.x.axis(c.axis, "case")];
    const auto idx = rand_index<D>({c.m}, 0, extent, ++seed);
    Var<T, D> y = index_select(x, c.axis, idx);
    backward_random(y, ++seed);
    put(r, name + " y", y, exact);
    put(r, name + " dx", x.grad(), atomic_tol);
  }
  // strided input: x is a transposed leaf (non-contiguous), index with every row and repeats
  {
    auto x = leaf<T, D>({6, 4, 5}, 1100);
    Var<T, D> xt = transpose(x, 0, 2);  // (5, 4, 6)
    const auto idx = indices<D>({3, 0, 3, 4, 1, 3, 2}, {7});
    Var<T, D> y = index_select(xt, 0, idx);
    backward_random(y, 1101);
    put(r, t + " index_select transposed y", y, exact);
    put(r, t + " index_select transposed dx", x.grad(), atomic_tol);
  }
}

template <class T, class D>
void gather_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double exact = 0, atomic_tol = tol<T>(1e-5, 1e-12);
  struct Case {
    Shape x;
    int axis;
    Shape index;
  };
  const Case cases[] = {
      {{6, 7}, 1, {6, 10}},          // index longer than x along the axis
      {{9, 5}, 0, {12, 3}},          // smaller off the axis
      {{4, 8, 3}, 1, {4, 5, 2}},     // 3-D, middle axis
      {{3, 4, 33}, -1, {2, 4, 40}},  // last axis, width 33
      {{257}, 0, {1500}},            // 1-D, every element picked about 6 times
      {{2, 1001}, 1, {2, 1003}},     // wide
      {{5, 1}, 0, {7, 1}},           // width 1
      {{3, 4}, 1, {3, 0}},           // empty index
  };
  std::uint64_t seed = 2000;
  for (const Case& c : cases) {
    const std::string name =
        t + " gather " + c.x.to_string() + " axis " + std::to_string(c.axis) + " index " + c.index.to_string();
    auto x = leaf<T, D>(c.x, ++seed);
    const index_t extent = c.x[c.x.axis(c.axis, "case")];
    const auto idx = rand_index<D>(c.index, 0, extent, ++seed);
    Var<T, D> y = gather(x, c.axis, idx);
    backward_random(y, ++seed);
    put(r, name + " y", y, exact);
    put(r, name + " dx", x.grad(), atomic_tol);
  }
  // strided x (a permuted leaf) and a strided index (a transposed index tensor)
  {
    auto x = leaf<T, D>({5, 3, 4}, 2100);
    Var<T, D> xp = permute(x, {2, 0, 1});                                   // (4, 5, 3)
    const auto idx = rand_index<D>({3, 5, 4}, 0, 5, 2101).transpose(0, 2);  // (4, 5, 3), non-contiguous
    Var<T, D> y = gather(xp, 1, idx);
    backward_random(y, 2102);
    put(r, t + " gather strided y", y, exact);
    put(r, t + " gather strided dx", x.grad(), atomic_tol);
  }
}

template <class T, class D>
void scatter_add_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double atomic_tol = tol<T>(1e-5, 1e-12), copy_tol = tol<T>(1e-6, 1e-12);
  struct Case {
    Shape x;
    int axis;
    Shape index, src;
  };
  const Case cases[] = {
      {{5, 7}, 0, {8, 7}, {9, 7}},    // src larger than index: its last row is unused (gradient 0)
      {{4, 6}, 1, {3, 10}, {4, 12}},  // index shorter off the axis: x's last row untouched
      {{3, 5, 33}, 1, {3, 9, 20}, {3, 9, 33}},
      {{7}, 0, {1000}, {1001}},  // 1-D, every element hit about 143 times
      {{2, 257}, -1, {2, 300}, {2, 300}},
      {{6, 1}, 0, {4, 1}, {4, 1}},  // width 1
      {{3, 4}, 0, {0, 4}, {2, 4}},  // empty index: out = x, dsrc = 0
  };
  std::uint64_t seed = 3000;
  for (const Case& c : cases) {
    const std::string name = t + " scatter_add " + c.x.to_string() + " axis " + std::to_string(c.axis) + " index " +
                             c.index.to_string() + " src " + c.src.to_string();
    auto x = leaf<T, D>(c.x, ++seed);
    auto src = leaf<T, D>(c.src, ++seed);
    const index_t extent = c.x[c.x.axis(c.axis, "case")];
    const auto idx = rand_index<D>(c.index, 0, extent, ++seed);
    Var<T, D> y = scatter_add(x, c.axis, idx, src);
    backward_random(y, ++seed);
    put(r, name + " y", y, atomic_tol);
    put(r, name + " dx", x.grad(), copy_tol);
    put(r, name + " dsrc", src.grad(), copy_tol);
  }
  // x without a gradient, src strided (transposed leaf)
  {
    Var<T, D> x(randn<T, D>({4, 5}, 3100), false);
    auto s = leaf<T, D>({6, 4}, 3101);
    Var<T, D> st = transpose(s, 0, 1);  // (4, 6)
    const auto idx = rand_index<D>({4, 6}, 0, 5, 3102);
    Var<T, D> y = scatter_add(x, 1, idx, st);
    backward_random(y, 3103);
    put(r, t + " scatter_add x constant, src strided y", y, atomic_tol);
    put(r, t + " scatter_add x constant, src strided dsrc", s.grad(), copy_tol);
  }
}

template <class T, class D>
void embedding_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double exact = 0, atomic_tol = tol<T>(1e-5, 1e-12);
  struct Case {
    index_t v, c;
    Shape ids;
  };
  const Case cases[] = {
      {11, 7, {3, 4}},                  // repeats
      {50, 1, {70001}},                 // width 1, 70001 tokens: each weight row gets about 1400 gradient rows
      {20, 1000, {2, 3}},               // wide rows
      {300, 257, {33}},   {5, 33, {}},  // rank-0 ids
      {6, 4, {0, 5}},                   // no tokens: output (0, 5, 4), gradient zero
      {4, 3, {2, 2, 2}},                // rank-3 ids
  };
  std::uint64_t seed = 4000;
  for (const Case& c : cases) {
    const std::string name =
        t + " embedding V " + std::to_string(c.v) + " C " + std::to_string(c.c) + " ids " + c.ids.to_string();
    auto w = leaf<T, D>({c.v, c.c}, ++seed);
    const auto ids = rand_index<D>(c.ids, 0, c.v, ++seed);
    Var<T, D> y = embedding(w, ids);
    backward_random(y, ++seed);
    put(r, name + " y", y, exact);
    put(r, name + " dw", w.grad(), atomic_tol);
  }
  // a transposed (strided) weight, and two lookups into one weight (the gradient accumulates)
  {
    auto w = leaf<T, D>({7, 11}, 4100);
    Var<T, D> wt = transpose(w, 0, 1);  // (11, 7)
    const auto ids = rand_index<D>({5, 6}, 0, 11, 4101);
    Var<T, D> y1 = embedding(wt, ids);
    Var<T, D> y2 = embedding(wt, rand_index<D>({9}, 0, 11, 4102));
    Var<T, D> y = concat({reshape(y1, {30, 7}), y2}, 0);
    backward_random(y, 4103);
    put(r, t + " embedding transposed weight y", y, exact);
    put(r, t + " embedding transposed weight dw", w.grad(), atomic_tol);
  }
}

/// Bad indices fail with the CPU's message on every device (the first bad position in row-major
/// order is the one named), and the device works on after the error.
template <class T, class D>
void range_error_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  auto x = leaf<T, D>({4, 3}, 5000);
  error_case(r, t + " index_select error message",
             "[index_select] index 5 at position (1) is out of range for axis 0 of extent 4 (x of shape (4, 3))", [&] {
               (void)index_select(x, 0, indices<D>({0, 5, 1, 7}, {4}));
             });
  error_case(r, t + " index_select negative index error message",
             "[index_select] index -1 at position (1) is out of range for axis -1 of extent 3 (x of shape (4, 3))",
             [&] {
               (void)index_select(x, -1, indices<D>({0, -1}, {2}));
             });
  error_case(r, t + " gather error message",
             "[gather] index 3 at position (1, 1) is out of range for axis 1 of extent 3 (x of shape (4, 3))", [&] {
               (void)gather(x, 1, indices<D>({0, 1, 2, 3}, {2, 2}));
             });
  error_case(r, t + " scatter_add error message",
             "[scatter_add] index 4 at position (0, 1) is out of range for axis 0 of extent 4 (x of shape (4, 3))",
             [&] {
               (void)scatter_add(x, 0, indices<D>({0, 4}, {1, 2}), leaf<T, D>({4, 3}, 5001));
             });
  // 100000 ids (many blocks), three bad ones: the first in row-major order is named
  {
    Tensor<Index, Cpu> host = rand_index<Cpu>({1000, 100}, 0, 10, 5002);
    host.data()[70000] = -2;
    host.data()[54321] = 10;
    host.data()[99999] = 11;
    const auto ids = indices<D>(host.to_vector(), {1000, 100});
    auto w = leaf<T, D>({10, 4}, 5003);
    error_case(r, t + " embedding error message (first of three bad ids)",
               "[embedding] id 10 at position (543, 21) is out of range for a vocabulary of V = 10",
               [&] { (void)embedding(w, ids); });
    // the device is still usable, and the check passes a valid index
    Var<T, D> y = embedding(w, rand_index<D>({3, 5}, 0, 10, 5004));
    put(r, t + " embedding after an error y", y, 0);

    // Deferred checks: on a device the call returns and the next read of the device throws the
    // same message (the CPU throws at the call); the first failed check is the one named.
    error_case(r, t + " deferred embedding error message",
               "[embedding] id 10 at position (543, 21) is out of range for a vocabulary of V = 10", [&] {
                 Var<T, D> bad = embedding(w, ids, IndexCheck::deferred);
                 Var<T, D> later = embedding(w, indices<D>({0, 11}, {2}), IndexCheck::deferred);  // fails too
                 (void)sum(later).value().item();
               });
    Var<T, D> y2 = embedding(w, rand_index<D>({3, 5}, 0, 10, 5004), IndexCheck::deferred);
    put(r, t + " deferred embedding after an error y", y2, 0);
  }
  error_case(r, t + " deferred index_select error message",
             "[index_select] index 5 at position (1) is out of range for axis 0 of extent 4 (x of shape (4, 3))", [&] {
               (void)index_select(x, 0, indices<D>({0, 5, 1, 7}, {4}), IndexCheck::deferred).value().to_vector();
             });
  error_case(r, t + " deferred gather error message",
             "[gather] index 3 at position (1, 1) is out of range for axis 1 of extent 3 (x of shape (4, 3))", [&] {
               (void)gather(x, 1, indices<D>({0, 1, 2, 3}, {2, 2}), IndexCheck::deferred).value().to_vector();
             });
  error_case(r, t + " deferred scatter_add error message",
             "[scatter_add] index 4 at position (0, 1) is out of range for axis 0 of extent 4 (x of shape (4, 3))",
             [&] {
               (void)scatter_add(x, 0, indices<D>({0, 4}, {1, 2}), leaf<T, D>({4, 3}, 5001), IndexCheck::deferred)
                   .value()
                   .to_vector();
             });
  // A deferred check that passes: the values are the checked op's.
  {
    const auto idx = indices<D>({3, 0, 3, 1}, {4});
    Var<T, D> ys = index_select(x, 0, idx, IndexCheck::deferred);
    put(r, t + " deferred index_select y", ys, 0);
    backward_random(ys, 5005);
    put(r, t + " deferred index_select dx", x.grad(), tol<T>(1e-5, 1e-12));
  }
}

template <class T, class D>
void shape_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double exact = 0, add_tol = tol<T>(1e-6, 1e-12);
  // reshape of a contiguous and of a transposed (copied) input; -1 inferred
  {
    auto x = leaf<T, D>({4, 6, 5}, 6000);
    Var<T, D> a = reshape(x, {24, -1});
    Var<T, D> b = reshape(transpose(x, 0, 2), {5, 24});
    Var<T, D> y = concat({reshape(a, {-1}), reshape(b, {-1})}, 0);
    backward_random(y, 6001);
    put(r, t + " reshape y", y, exact);
    put(r, t + " reshape dx", x.grad(), add_tol);
  }
  // transpose and permute (3-D and 4-D)
  {
    auto x = leaf<T, D>({3, 4, 5}, 6010);
    Var<T, D> y = transpose(x, 0, 2);
    backward_random(y, 6011);
    put(r, t + " transpose y", y, exact);
    put(r, t + " transpose dx", x.grad(), exact);
  }
  {
    auto x = leaf<T, D>({2, 3, 4, 33}, 6020);
    Var<T, D> y = permute(x, {3, 1, 0, 2});
    backward_random(y, 6021);
    put(r, t + " permute y", y, exact);
    put(r, t + " permute dx", x.grad(), exact);
  }
  // slices: middle axis, first axis, last axis of width 1, empty, of a strided input; overlapping
  // slices of one x add up in its gradient
  struct SliceCase {
    Shape x;
    int axis;
    index_t begin, end;
  };
  const SliceCase slices[] = {{{4, 10, 3}, 1, 2, 7},   {{9, 7}, 0, 3, 9}, {{5, 257}, -1, 256, 257},
                              {{3, 1001}, 1, 0, 1001}, {{4, 6}, 1, 3, 3}, {{2, 33, 2}, 1, 32, 33}};
  std::uint64_t seed = 6100;
  for (const SliceCase& c : slices) {
    const std::string name = t + " slice " + c.x.to_string() + " axis " + std::to_string(c.axis) + " [" +
                             std::to_string(c.begin) + ", " + std::to_string(c.end) + ")";
    auto x = leaf<T, D>(c.x, ++seed);
    Var<T, D> y = slice(x, c.axis, c.begin, c.end);
    backward_random(y, ++seed);
    put(r, name + " y", y, exact);
    put(r, name + " dx", x.grad(), exact);
  }
  {
    auto x = leaf<T, D>({5, 8, 3}, 6200);
    Var<T, D> xt = transpose(x, 0, 1);  // (8, 5, 3), strided
    Var<T, D> y = concat({slice(xt, 0, 1, 6), slice(xt, 0, 3, 8), slice(slice(xt, 0, 0, 5), 1, 1, 4)}, 1);
    backward_random(y, 6201);
    put(r, t + " overlapping slices of a strided x y", y, exact);
    put(r, t + " overlapping slices of a strided x dx", x.grad(), add_tol);
  }
  // concat: extents 1, 7, 0, 33 on the middle axis; a strided input; an input without a gradient
  {
    auto a = leaf<T, D>({3, 1, 4}, 6300);
    auto b = leaf<T, D>({3, 7, 4}, 6301);
    auto e = leaf<T, D>({3, 0, 4}, 6302);
    auto c = leaf<T, D>({4, 33, 3}, 6303);
    Var<T, D> ct = transpose(c, 0, 2);  // (3, 33, 4), strided
    Var<T, D> k(randn<T, D>({3, 2, 4}, 6304), false);
    Var<T, D> y = concat({a, b, e, ct, k}, 1);
    backward_random(y, 6305);
    put(r, t + " concat axis 1 y", y, exact);
    put(r, t + " concat axis 1 da", a.grad(), exact);
    put(r, t + " concat axis 1 db", b.grad(), exact);
    flag(r, t + " concat axis 1 de (empty input) left without a gradient", !e.grad().defined());
    put(r, t + " concat axis 1 dc", c.grad(), exact);
  }
  // concat on the first and the last axis, wide rows, the same input twice
  {
    auto a = leaf<T, D>({2, 1000}, 6310);
    auto b = leaf<T, D>({2, 257}, 6311);
    Var<T, D> y = concat({a, b, a}, -1);
    backward_random(y, 6312);
    put(r, t + " concat last axis y", y, exact);
    put(r, t + " concat last axis da", a.grad(), add_tol);
    put(r, t + " concat last axis db", b.grad(), exact);
  }
  {
    auto a = leaf<T, D>({5, 7}, 6320);
    auto b = leaf<T, D>({1, 7}, 6321);
    Var<T, D> y = concat({a, b}, 0);
    backward_random(y, 6322);
    put(r, t + " concat axis 0 y", y, exact);
    put(r, t + " concat axis 0 da", a.grad(), exact);
    put(r, t + " concat axis 0 db", b.grad(), exact);
  }
}

/// Dropout by its properties (the device's mask is not the CPU's): each is an exact 0/1 flag.
template <class T, class D>
void dropout_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // p = 0 and training = false return x itself
  {
    auto x = leaf<T, D>({7, 33}, 7000);
    Generator gen(1);
    Var<T, D> y0 = dropout(x, 0.0, gen);
    Var<T, D> y1 = dropout(x, 0.5, gen, /*training=*/false);
    flag(r, t + " dropout p = 0 is the identity", y0.node() == x.node());
    flag(r, t + " dropout training = false is the identity", y1.node() == x.node());
    put(r, t + " dropout identity y", y1, 0);
  }
  struct Case {
    Shape shape;
    double p;
    bool transposed;
  };
  // 1e6 elements at p = 0.3; p = 0.9 on a transposed (strided) input; an odd size (not a multiple of 4)
  const Case cases[] = {{{1000, 1000}, 0.3, false}, {{300, 333}, 0.9, true}, {{7, 33}, 0.5, false}};
  std::uint64_t seed = 7100;
  for (const Case& c : cases) {
    const std::string name = t + " dropout " + c.shape.to_string() + " p " + std::to_string(c.p).substr(0, 3) +
                             (c.transposed ? " transposed" : "");
    auto x = leaf<T, D>(c.shape, ++seed);
    Var<T, D> xin = c.transposed ? transpose(x, 0, 1) : x;
    Generator gen(++seed);
    const Generator::State start = gen.state();
    Var<T, D> y = dropout(xin, c.p, gen);
    const Tensor<T, D> g = randn<T, D>(y.shape(), ++seed);
    y.backward(g);
    Generator again;
    again.set_state(start);
    const std::vector<T> ys = y.value().to_vector(), xs = xin.value().to_vector(), gs = g.to_vector();
    const std::vector<T> same = dropout(xin, c.p, again).value().to_vector();
    const std::vector<T> next = dropout(xin, c.p, gen).value().to_vector();  // the advanced generator
    const std::vector<T> dx = (c.transposed ? x.grad().transpose(0, 1) : x.grad()).to_vector();  // y's layout
    const T scale = static_cast<T>(1.0 / (1.0 - c.p));
    const std::size_t n = ys.size();
    std::size_t kept = 0, bad_value = 0, bad_grad = 0, differ = 0, pairs_equal = 0;
    std::size_t kept_mod4[4] = {}, count_mod4[4] = {};
    for (std::size_t i = 0; i < n; ++i) {
      const bool k = ys[i] != T(0);
      kept += k;
      kept_mod4[i % 4] += k;
      ++count_mod4[i % 4];
      if (ys[i] != (k ? xs[i] * scale : T(0))) ++bad_value;
      if (dx[i] != (k ? gs[i] * scale : T(0))) ++bad_grad;
      differ += (next[i] != T(0)) != k;
      if (i + 1 < n) pairs_equal += (ys[i + 1] != T(0)) == k;
    }
    const double q = 1.0 - c.p, nn = static_cast<double>(n);
    const double frac = static_cast<double>(kept) / nn, sigma = std::sqrt(c.p * q / nn);
    flag(r, name + " kept entries scaled, dropped entries 0", bad_value == 0, std::to_string(bad_value) + " wrong");
    flag(r, name + " gradient is g times the mask", bad_grad == 0, std::to_string(bad_grad) + " wrong");
    flag(r, name + " kept fraction within 5 sigma", std::fabs(frac - q) <= 5 * sigma,
         "kept " + std::to_string(frac) + ", expected " + std::to_string(q) + " +- " + std::to_string(5 * sigma));
    bool mod4_ok = true;
    std::string mod4 = "kept fraction by i mod 4:";
    for (int m = 0; m < 4; ++m) {
      const double fm = static_cast<double>(kept_mod4[m]) / static_cast<double>(count_mod4[m]);
      mod4_ok = mod4_ok && std::fabs(fm - q) <= 5 * std::sqrt(c.p * q / static_cast<double>(count_mod4[m]));
      mod4 += " " + std::to_string(fm);
    }
    flag(r, name + " kept fraction by position mod 4 within 5 sigma", mod4_ok, mod4);
    // neighbours independent: P(same decision) = p^2 + q^2
    const double pe = c.p * c.p + q * q, fe = static_cast<double>(pairs_equal) / (nn - 1);
    flag(r, name + " neighbours independent", std::fabs(fe - pe) <= 5 * std::sqrt(pe * (1 - pe) / (nn - 1)),
         "equal neighbours " + std::to_string(fe) + ", expected " + std::to_string(pe));
    flag(r, name + " same generator state gives the same mask", same == ys);
    // two independent masks differ at a fraction 2 p q of the positions
    const double fd = static_cast<double>(differ) / nn, pd = 2 * c.p * q;
    flag(r, name + " the advanced generator gives another mask",
         std::fabs(fd - pd) <= 5 * std::sqrt(pd * (1 - pd) / nn),
         "differ at " + std::to_string(fd) + ", expected " + std::to_string(pd));
  }
}

}  // namespace index_cases

template <class T, class D>
void index_family_cases(Results& r) {
  index_cases::index_select_cases<T, D>(r);
  index_cases::gather_cases<T, D>(r);
  index_cases::scatter_add_cases<T, D>(r);
  index_cases::embedding_cases<T, D>(r);
  index_cases::range_error_cases<T, D>(r);
  index_cases::shape_cases<T, D>(r);
  index_cases::dropout_cases<T, D>(r);
}

template <class D>
void cases_index(Results& r) {
  index_family_cases<float, D>(r);
  index_family_cases<double, D>(r);
}

}  // namespace mixmoe_parity
