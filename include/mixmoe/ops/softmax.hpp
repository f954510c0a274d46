// Softmax and log-softmax along one axis (the last by default).
//
//   softmax(x, axis)      x (..., N, ...) -> same shape; entries along `axis` are in [0, 1] and sum to 1
//   log_softmax(x, axis)  x (..., N, ...) -> same shape; log of the above, computed without taking a log of a
//                         rounded probability
//
// Shape legend: x is viewed as (O, N, I) around the axis: O the product of the axes
// before it, N its extent, I the product of the axes after it (I = 1 for the last axis).
//
// Numerically stable: the maximum along the axis is subtracted before exp, so no
// logit magnitude overflows; the sums along the axis are accumulated in double.
// Masked (-inf) entries get probability exactly 0 (and probabilities below the
// smallest normal number are flushed to 0, see cpu::flush_subnormal). A slice that is
// entirely -inf has no defined distribution and gives NaN, as in the other
// frameworks (mask with a large negative number, not -inf, if every position of a
// row can be masked).
//
// Both backwards work from the saved output y alone (x is not kept):
//   softmax:      dx = y * (g - sum_N(g * y))
//   log_softmax:  dx = g - exp(y) * sum_N(g)
//
// On a device (Cuda) the same formulas run as one block per slice (backend/cuda/rows.cuh,
// DeviceOps<D>::rows_softmax and rows_softmax_backward).
#pragma once

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/backend/cpu/vmath.hpp"

namespace mixmoe {

namespace detail::softmax_impl {

// Columns of an inner (I > 1) slice handled together: per-column max and sum live on the stack.
inline constexpr index_t kBlock = 256;

using cpu::Array;
using cpu::In;
using cpu::Out;
using cpu::kGrain;

/// y = softmax or log_softmax of x (contiguous, viewed as (O, N, I)) along N.
template <class T>
void forward(const T* x, T* y, index_t outer, index_t n, index_t inner, bool log) {
  if (outer * n * inner == 0) return;
  if (inner == 1) {  // the last axis: every row is contiguous
    cpu::parallel_for(outer, std::max<index_t>(1, kGrain / n), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        const In<T> a(x + r * n, n);  // (N)
        Out<T> o(y + r * n, n);       // (N)
        const T m = a.maxCoeff();
        o = (a - m).exp();
        cpu::flush_subnormal(o.data(), n);
        const double s = o.template cast<double>().sum();
        if (log)
          o = (a - m) - static_cast<T>(std::log(s));
        else
          o *= static_cast<T>(1.0 / s);
      }
    });
    return;
  }
  // I > 1: the N entries of a column are I apart; walk N rows of a block of columns at a time
  // so every inner loop is contiguous.
  const index_t blocks = (inner + kBlock - 1) / kBlock;
  const index_t grain = std::max<index_t>(1, kGrain / (n * std::min(inner, kBlock)));
  cpu::parallel_for(outer * blocks, grain, [&](index_t lo, index_t hi) {
    alignas(64) T mx[kBlock];
    alignas(64) T ls[kBlock];
    alignas(64) double sum[kBlock];
    for (index_t task = lo; task < hi; ++task) {
      const index_t o = task / blocks, c0 = (task % blocks) * kBlock, w = std::min(kBlock, inner - c0);
      const T* xs = x + o * n * inner + c0;  // (N, w) with row stride I
      T* ys = y + o * n * inner + c0;
      Out<T> m(mx, w);
      Eigen::Map<Array<double>> s(sum, w);
      m = In<T>(xs, w);
      for (index_t j = 1; j < n; ++j) m = m.max(In<T>(xs + j * inner, w));
      s.setZero();
      for (index_t j = 0; j < n; ++j) {
        Out<T> e(ys + j * inner, w);
        e = (In<T>(xs + j * inner, w) - m).exp();
        cpu::flush_subnormal(e.data(), w);
        s += e.template cast<double>();
      }
      if (log) {
        // (x - max) - log(sum), not x - (max + log(sum)): max may be large and log(sum) small
        const Out<T> l(ls, w);
        for (index_t i = 0; i < w; ++i) ls[i] = static_cast<T>(std::log(sum[i]));
        for (index_t j = 0; j < n; ++j) Out<T>(ys + j * inner, w) = (In<T>(xs + j * inner, w) - m) - l;
      } else {
        for (index_t i = 0; i < w; ++i) mx[i] = static_cast<T>(1.0 / sum[i]);
        for (index_t j = 0; j < n; ++j) Out<T>(ys + j * inner, w) *= m;
      }
    }
  });
}

/// gx from the output gradient g and the saved output y (all contiguous, (O, N, I)).
template <class T>
void backward(const T* g, const T* y, T* gx, index_t outer, index_t n, index_t inner, bool log) {
  if (outer * n * inner == 0) return;
  if (inner == 1) {
    cpu::parallel_for(outer, std::max<index_t>(1, kGrain / n), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        const In<T> gr(g + r * n, n), yr(y + r * n, n);  // (N)
        Out<T> o(gx + r * n, n);                          // (N)
        if (log) {
          const double s = gr.template cast<double>().sum();
          o = yr.exp();
          cpu::flush_subnormal(o.data(), n);
          o = gr - o * static_cast<T>(s);
        } else {
          const double s = (gr.template cast<double>() * yr.template cast<double>()).sum();
          o = yr * (gr - static_cast<T>(s));
        }
      }
    });
    return;
  }
  const index_t blocks = (inner + kBlock - 1) / kBlock;
  const index_t grain = std::max<index_t>(1, kGrain / (n * std::min(inner, kBlock)));
  cpu::parallel_for(outer * blocks, grain, [&](index_t lo, index_t hi) {
    alignas(64) double sum[kBlock];
    alignas(64) T st[kBlock];
    for (index_t task = lo; task < hi; ++task) {
      const index_t o = task / blocks, c0 = (task % blocks) * kBlock, w = std::min(kBlock, inner - c0);
      const index_t base = o * n * inner + c0;
      Eigen::Map<Array<double>> s(sum, w);
      s.setZero();
      for (index_t j = 0; j < n; ++j) {
        const In<T> gj(g + base + j * inner, w);
        if (log)
          s += gj.template cast<double>();
        else
          s += gj.template cast<double>() * In<T>(y + base + j * inner, w).template cast<double>();
      }
      Out<T> sv(st, w);
      sv = s.template cast<T>();
      for (index_t j = 0; j < n; ++j) {
        const In<T> gj(g + base + j * inner, w), yj(y + base + j * inner, w);
        Out<T> o(gx + base + j * inner, w);
        if (log) {
          o = yj.exp();
          cpu::flush_subnormal(o.data(), w);
          o = gj - o * sv;
        } else {
          o = yj * (gj - sv);
        }
      }
    }
  });
}

template <class T, class D>
Var<T, D> softmax_op(const Var<T, D>& x, int axis, bool log, const char* op) {
  MIXMOE_CHECK(x.defined(), op, "the input is an undefined Var");
  const Shape& s = x.shape();
  const int a = s.axis(axis, op);
  const index_t outer = s.prod(0, a), n = s[a], inner = s.prod(a + 1, s.rank());
  const Tensor<T, D> xc = x.value().contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(s);
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::rows_softmax(xc.data(), out.data(), outer, n, inner, log);
  } else if (out.numel() > 0) {
    forward(xc.data(), out.data(), outer, n, inner, log);
  }
  return record(op, std::move(out), {x}, [outer, n, inner, log](autograd::BackwardContext<T, D>& ctx) {
    const Tensor<T, D>& y = ctx.output();
    Tensor<T, D> gx = Tensor<T, D>::empty(y.shape());
    if constexpr (!Tensor<T, D>::on_host)
      DeviceOps<D>::rows_softmax_backward(ctx.grad_out().data(), y.data(), gx.data(), outer, n, inner, log);
    else if (gx.numel() > 0)
      backward(ctx.grad_out().data(), y.data(), gx.data(), outer, n, inner, log);
    ctx.accumulate(0, std::move(gx));
  });
}

}  // namespace detail::softmax_impl

/// exp(x) / sum(exp(x)) along `axis` (negative counts from the end), max-subtracted.
template <Scalar T, Device D>
Var<T, D> softmax(const Var<T, D>& x, int axis = -1) {
  return detail::softmax_impl::softmax_op(x, axis, false, "softmax");
}

/// x - log(sum(exp(x))) along `axis`, max-subtracted: finite wherever softmax underflows to 0.
template <Scalar T, Device D>
Var<T, D> log_softmax(const Var<T, D>& x, int axis = -1) {
  return detail::softmax_impl::softmax_op(x, axis, true, "log_softmax");
}

}  // namespace mixmoe
