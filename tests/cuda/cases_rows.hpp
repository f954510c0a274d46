// Parity cases of the row ops: softmax and log_softmax (ops/softmax.hpp), rms_norm and layer_norm
// (ops/norm.hpp), cross_entropy (ops/cross_entropy.hpp), sum and mean (ops/reduce.hpp) and topk
// (ops/topk.hpp), forward and the gradients of sum(y * g). Widths 1, 7, 33, 257 and 1000+, more
// rows than the row kernels' grid (many_rows(), parity.hpp), inner axes, transposed (strided)
// inputs, masked (-inf) and fully masked entries, ignored targets; top-k on quantised values with ties, NaN,
// +-inf and -0, on both of its kernels (short lines: a thread each; long lines: a block each).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <mixmoe/ops/cross_entropy.hpp>
#include <mixmoe/ops/norm.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/ops/shape_ops.hpp>
#include <mixmoe/ops/softmax.hpp>
#include <mixmoe/ops/topk.hpp>

#include "parity.hpp"

namespace mixmoe_parity {

/// n normal values (stddev `scale`) from a seeded generator, in double, for inputs edited on the host.
inline std::vector<double> host_normal(index_t n, std::uint64_t seed, double scale = 1.0) {
  mixmoe::Generator gen(seed);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = gen.normal(0.0, scale);
  return v;
}

template <class T, class D>
mixmoe::Tensor<T, D> tensor_of(const std::vector<double>& v, const mixmoe::Shape& shape) {
  std::vector<T> t(v.begin(), v.end());
  return mixmoe::Tensor<T, D>::from(t, shape);
}

template <class T, class D>
void rows_softmax_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // GPU exp differs from Eigen's vectorised exp by an ulp or so
  const double tl = tol<T>(1e-5, 1e-11);
  struct Case {
    Shape shape;
    int axis;
  };
  const Case cases[] = {{{5, 1}, -1},     {{4, 7}, -1},    {{3, 33}, -1},    {{2, 257}, -1},
                        {{3, 1000}, -1},  {{2, 4099}, -1}, {{many_rows(), 3}, -1}, {{6, 5, 4}, 0},
                        {{3, 300, 5}, 1}, {{4, 3, 9}, 1},  {{2, 3, 1}, 2}};
  std::uint64_t seed = 1000;
  for (const auto& c : cases) {
    for (int log = 0; log < 2; ++log) {
      const std::string name =
          t + (log ? " log_softmax " : " softmax ") + c.shape.to_string() + " axis " + std::to_string(c.axis);
      auto x = leaf<T, D>(c.shape, ++seed, 3.0);
      Var<T, D> y = log ? log_softmax(x, c.axis) : softmax(x, c.axis);
      backward_random(y, ++seed);
      put(r, name + " y", y, tl);
      put(r, name + " dx", x.grad(), tl);
    }
  }
  // a transposed (strided) input, softmax over its last axis (the stored first axis)
  for (int log = 0; log < 2; ++log) {
    auto x = leaf<T, D>({40, 6}, 1100 + log, 2.0);
    Var<T, D> y = log ? log_softmax(transpose(x, 0, 1), -1) : softmax(transpose(x, 0, 1), -1);
    backward_random(y, 1110 + log);
    const std::string name = t + (log ? " log_softmax" : " softmax") + " transposed (6, 40)";
    put(r, name + " y", y, tl);
    put(r, name + " dx", x.grad(), tl);
  }
  // masked (-inf) entries, one row entirely masked (NaN, as on the CPU), on the last and a middle axis
  for (int axis = 0; axis < 2; ++axis) {
    const Shape shape = axis == 0 ? Shape{6, 300} : Shape{6, 300, 2};
    std::vector<double> v = host_normal(shape.numel(), 1200 + axis, 2.0);
    for (std::size_t i = 0; i < v.size(); ++i)
      if (i % 3 == 1) v[i] = -std::numeric_limits<double>::infinity();
    if (axis == 0)
      for (index_t j = 0; j < 300; ++j)
        v[static_cast<std::size_t>(2 * 300 + j)] = -std::numeric_limits<double>::infinity();
    for (int log = 0; log < 2; ++log) {
      Var<T, D> x(tensor_of<T, D>(v, shape), true);
      Var<T, D> y = log ? log_softmax(x, axis == 0 ? -1 : 1) : softmax(x, axis == 0 ? -1 : 1);
      backward_random(y, 1210 + 2 * axis + log);
      const std::string name = t + (log ? " log_softmax" : " softmax") + " masked " + shape.to_string();
      put(r, name + " y", y, tl);
      put(r, name + " dx", x.grad(), tl);
    }
  }
}

template <class T, class D>
void rows_norm_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-5, 1e-11);
  const Shape shapes[] = {{6, 1}, {5, 7}, {3, 2, 33}, {4, 257}, {3, 1000}, {2, 4100}, {many_rows(), 2}};
  std::uint64_t seed = 2000;
  for (const Shape& s : shapes) {
    const index_t c = s[s.rank() - 1];
    // params: 0 none, 1 weight, 2 weight and bias
    for (int centre = 0; centre < 2; ++centre)
      for (int params = 0; params < 3; ++params) {
        if (!centre && params == 2) continue;  // rms_norm has no bias
        auto x = leaf<T, D>(s, ++seed, 2.0);
        Var<T, D> w = params >= 1 ? leaf<T, D>({c}, ++seed) : Var<T, D>();
        Var<T, D> b = params >= 2 ? leaf<T, D>({c}, ++seed) : Var<T, D>();
        Var<T, D> y = centre ? layer_norm(x, w, b, 1e-5) : rms_norm(x, w, 1e-6);
        backward_random(y, ++seed);
        const std::string name =
            t + (centre ? " layer_norm " : " rms_norm ") + s.to_string() + " params " + std::to_string(params);
        put(r, name + " y", y, tl);
        put(r, name + " dx", x.grad(), tl);
        if (params >= 1) put(r, name + " dw", w.grad(), tl);
        if (params >= 2) put(r, name + " db", b.grad(), tl);
      }
  }
  // a transposed (strided) input, and only the parameters needing gradients
  for (int centre = 0; centre < 2; ++centre) {
    auto x = leaf<T, D>({48, 10}, 2100 + centre, 1.5);
    Var<T, D> xs = transpose(x, 0, 1);  // (10, 48)
    auto w = leaf<T, D>({48}, 2110 + centre), b = leaf<T, D>({48}, 2120 + centre);
    Var<T, D> y = centre ? layer_norm(xs, w, b) : rms_norm(xs, w);
    backward_random(y, 2130 + centre);
    const std::string name = t + (centre ? " layer_norm" : " rms_norm") + " transposed (10, 48)";
    put(r, name + " y", y, tl);
    put(r, name + " dx", x.grad(), tl);
    put(r, name + " dw", w.grad(), tl);
    if (centre) put(r, name + " db", b.grad(), tl);

    Var<T, D> xc(randn<T, D>({300, 33}, 2140 + centre), false);  // x needs no gradient
    auto w2 = leaf<T, D>({33}, 2150 + centre), b2 = leaf<T, D>({33}, 2160 + centre);
    Var<T, D> y2 = centre ? layer_norm(xc, w2, b2) : rms_norm(xc, w2);
    backward_random(y2, 2170 + centre);
    const std::string name2 = t + (centre ? " layer_norm" : " rms_norm") + " params only (300, 33)";
    put(r, name2 + " y", y2, tl);
    put(r, name2 + " dw", w2.grad(), tl);
    if (centre) put(r, name2 + " db", b2.grad(), tl);
  }
}

/// Targets in [0, v), every `ignore_every`-th (0: none; 1: all) set to `ignore`.
template <class D>
mixmoe::Tensor<mixmoe::Index, D> targets_of(const mixmoe::Shape& shape, index_t v, std::uint64_t seed,
                                            index_t ignore_every, mixmoe::Index ignore) {
  mixmoe::Generator gen(seed);
  std::vector<mixmoe::Index> t(static_cast<std::size_t>(shape.numel()));
  for (std::size_t i = 0; i < t.size(); ++i) {
    t[i] = static_cast<mixmoe::Index>(
        std::min<double>(static_cast<double>(v - 1), gen.uniform(0.0, static_cast<double>(v))));
    if (ignore_every > 0 && i % static_cast<std::size_t>(ignore_every) == static_cast<std::size_t>(ignore_every - 1))
      t[i] = ignore;
  }
  return mixmoe::Tensor<mixmoe::Index, D>::from(t, shape);
}

template <class T, class D>
void rows_cross_entropy_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-5, 1e-11);
  struct Case {
    Shape shape;           // logits (..., V)
    index_t ignore_every;  // every ignore_every-th target ignored (0: none)
    Index ignore;
    double smoothing;
  };
  const Case cases[] = {{{5, 1}, 0, -100, 0.0},   {{6, 7}, 3, -100, 0.0},       {{4, 33}, 0, -100, 0.1},
                        {{3, 257}, 2, -100, 0.2}, {{2, 3, 1000}, 4, -100, 0.0}, {{3, 5003}, 0, -100, 0.1},
                        {{9, 50}, 2, 3, 0.05},    {{many_rows(), 2}, 5, -100, 0.1},   {{4, 9}, 1, -1, 0.1}};
  const Reduction reductions[] = {Reduction::mean, Reduction::sum, Reduction::none};
  const char* rnames[] = {"mean", "sum", "none"};
  std::uint64_t seed = 3000;
  for (const auto& c : cases) {
    const index_t v = c.shape[c.shape.rank() - 1];
    const Tensor<Index, D> targets = targets_of<D>(c.shape.without(-1), v, ++seed, c.ignore_every, c.ignore);
    for (int red = 0; red < 3; ++red) {
      auto x = leaf<T, D>(c.shape, ++seed, 3.0);
      CrossEntropyOptions opt;
      opt.ignore_index = c.ignore;
      opt.label_smoothing = c.smoothing;
      opt.reduction = reductions[red];
      Var<T, D> loss = cross_entropy(x, targets, opt);
      backward_random(loss, ++seed);
      const std::string name = t + " cross_entropy " + c.shape.to_string() + " ignore every " +
                               std::to_string(c.ignore_every) + " (" + std::to_string(c.ignore) + ") smoothing " +
                               std::to_string(c.smoothing) + " " + rnames[red];
      put(r, name + " loss", loss, tl);
      put(r, name + " dx", x.grad(), tl);
    }
  }
  // a transposed (strided) logits view
  {
    auto x = leaf<T, D>({40, 8}, 3100, 2.0);
    const Tensor<Index, D> targets = targets_of<D>({8}, 40, 3101, 3, -100);
    Var<T, D> loss = cross_entropy(transpose(x, 0, 1), targets);
    backward_random(loss, 3102);
    put(r, t + " cross_entropy transposed (8, 40) loss", loss, tl);
    put(r, t + " cross_entropy transposed (8, 40) dx", x.grad(), tl);
  }
  // A target out of range: the CPU's error at the call, a device's when the loss is read (the
  // first bad position in row-major order; ignore_index -1 passes, -2 does not).
  {
    auto x = leaf<T, D>({3, 4, 6}, 3200);
    const Tensor<Index, D> targets = Tensor<Index, D>::from({0, -1, 5, 2, 3, -1, 6, 1, -2, 0, 0, 9}, {3, 4});
    std::string got = "(no error)";
    try {
      CrossEntropyOptions opt;
      opt.ignore_index = -1;
      (void)cross_entropy(x, targets, opt).value().item();
    } catch (const Error& e) {
      got = e.what();
    }
    const std::string want = "[cross_entropy] target 6 at position (1, 2) is out of range for V = 6 classes "
                             "(ignore_index is -1)";
    if (got != want) std::printf("  [cross_entropy error] expected \"%s\", got \"%s\"\n", want.c_str(), got.c_str());
    put(r, t + " cross_entropy out-of-range target error message", Tensor<double>::from({got == want ? 1.0 : 0.0}, {1}),
        0.0);
  }
}

template <class T, class D>
void rows_reduce_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-6, 1e-12);
  // over all elements: one part, several, many (each thread a grid-stride share of 16)
  const Shape all[] = {{1}, {7, 33}, {70000}, {3, 400000}};
  std::uint64_t seed = 4000;
  for (const Shape& s : all)
    for (int m = 0; m < 2; ++m) {
      auto x = leaf<T, D>(s, ++seed);
      Var<T, D> y = m ? mean(x) : sum(x);
      backward_random(y, ++seed);
      const std::string name = t + (m ? " mean " : " sum ") + s.to_string();
      put(r, name + " y", y, tl);
      put(r, name + " dx", x.grad(), tl);
    }
  // over one axis, with and without keepdim
  struct Case {
    Shape shape;
    int axis;
  };
  const Case cases[] = {{{4, 5, 6}, 0}, {{4, 5, 6}, 1}, {{4, 5, 6}, -1}, {{3, 1000}, -1},
                        {{2000, 3}, 0}, {{7, 1}, 1},    {{1, 257}, 0},   {{70000, 2}, 1}};
  for (const auto& c : cases)
    for (int m = 0; m < 2; ++m)
      for (int keep = 0; keep < 2; ++keep) {
        auto x = leaf<T, D>(c.shape, ++seed);
        Var<T, D> y = m ? mean(x, c.axis, keep == 1) : sum(x, c.axis, keep == 1);
        backward_random(y, ++seed);
        const std::string name = t + (m ? " mean " : " sum ") + c.shape.to_string() + " axis " +
                                 std::to_string(c.axis) + (keep ? " keepdim" : "");
        put(r, name + " y", y, tl);
        put(r, name + " dx", x.grad(), tl);
      }
  // a transposed (strided) input
  {
    auto x = leaf<T, D>({9, 5}, 4100);
    Var<T, D> y = sum(transpose(x, 0, 1), 1);
    Var<T, D> z = mean(transpose(x, 0, 1));
    backward_random(y, 4101);
    backward_random(z, 4102);
    put(r, t + " sum transposed (5, 9) axis 1 y", y, tl);
    put(r, t + " mean transposed (5, 9) y", z, tl);
    put(r, t + " sum/mean transposed (5, 9) dx", x.grad(), tl);
  }
}

/// Values from {-2, -1.5, ..., 2} (many ties), with NaN, +-inf and -0 mixed in when `specials`.
template <class T, class D>
mixmoe::Tensor<T, D> tied_values(const mixmoe::Shape& shape, std::uint64_t seed, bool specials) {
  mixmoe::Generator gen(seed);
  std::vector<double> v(static_cast<std::size_t>(shape.numel()));
  for (auto& e : v) {
    const double u = gen.uniform(0.0, 1.0);
    e = std::floor(gen.uniform(-4.0, 5.0)) * 0.5;
    if (!specials) continue;
    if (u < 0.03)
      e = std::numeric_limits<double>::quiet_NaN();
    else if (u < 0.05)
      e = std::numeric_limits<double>::infinity();
    else if (u < 0.07)
      e = -std::numeric_limits<double>::infinity();
    else if (u < 0.10)
      e = -0.0;
  }
  return tensor_of<T, D>(v, shape);
}

template <class T, class D>
void rows_topk_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  struct Case {
    Shape shape;
    index_t k;
    int axis;
    bool specials;
  };
  // n <= 128: a thread per line; longer lines: a block per line
  const Case cases[] = {{{50, 1}, 1, -1, false},  {{40, 7}, 3, -1, true},      {{30, 33}, 5, -1, true},
                        {{10, 64}, 64, -1, true}, {{20, 128}, 7, -1, true},    {{3, 20, 5}, 4, 1, true},
                        {{6, 257}, 10, -1, true}, {{4, 1000}, 20, -1, true},   {{3, 200}, 200, -1, true},
                        {{300, 8}, 40, 0, true},  {{2, 129, 3}, 129, 1, true}, {{300000, 2}, 1, -1, true}};
  std::uint64_t seed = 5000;
  for (const auto& c : cases) {
    Var<T, D> x(tied_values<T, D>(c.shape, ++seed, c.specials), true);
    TopKResult<T, D> res = topk(x, c.k, c.axis);
    backward_random(res.values, ++seed);
    const std::string name =
        t + " topk " + c.shape.to_string() + " k " + std::to_string(c.k) + " axis " + std::to_string(c.axis);
    // selection and scatter copy values: exact
    put(r, name + " values", res.values, 0.0);
    put(r, name + " indices", res.indices, 0.0);
    put(r, name + " dx", x.grad(), 0.0);
  }
  // router-like logits without ties (randn), and more lines than the block kernel's grid
  {
    auto x = leaf<T, D>({1000, 16}, 5100);
    TopKResult<T, D> res = topk(x, 2);
    backward_random(res.values, 5101);
    put(r, t + " topk randn (1000, 16) k 2 values", res.values, 0.0);
    put(r, t + " topk randn (1000, 16) k 2 indices", res.indices, 0.0);
    put(r, t + " topk randn (1000, 16) k 2 dx", x.grad(), 0.0);
  }
  {
    const Shape shape{many_rows(), 130};
    Var<T, D> x(tied_values<T, D>(shape, 5200, true), false);
    TopKResult<T, D> res = topk(x, 2);
    put(r, t + " topk " + shape.to_string() + " k 2 values", res.values, 0.0);
    put(r, t + " topk " + shape.to_string() + " k 2 indices", res.indices, 0.0);
  }
}

template <class T, class D>
void rows_cases(Results& r) {
  rows_softmax_cases<T, D>(r);
  rows_norm_cases<T, D>(r);
  rows_cross_entropy_cases<T, D>(r);
  rows_reduce_cases<T, D>(r);
  rows_topk_cases<T, D>(r);
}

template <class D>
void cases_rows(Results& r) {
  rows_cases<float, D>(r);
  rows_cases<double, D>(r);
}

}  // namespace mixmoe_parity
