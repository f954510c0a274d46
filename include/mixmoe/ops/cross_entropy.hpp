// Cross-entropy of logits against integer class targets, as one fused op:
// log-softmax, optional label smoothing, ignore_index and the reduction.
//
//   V classes (vocabulary), N = number of positions (all axes but the last)
//   cross_entropy: logits (..., V), targets (...) -> () for mean/sum, (...) for none
//
// With label smoothing eps the target distribution of a position with class t is
// q = (1 - eps) * onehot(t) + eps / V (as in PyTorch), and its loss is
//   -sum_j q_j log softmax(x)_j = (1 - eps) (lse - x_t) + eps (lse - mean_j x_j),
// lse = log sum_j exp x_j. Positions whose target is ignore_index contribute 0;
// the mean divides by the number of positions that are not ignored (and is 0, not
// NaN, when all are). The gradient of a row is scale * (softmax(x) - q).
//
// On a device (Cuda) a block per row computes the same (backend/cuda/rows.cuh) and the loss
// stays on the device: the targets are checked by a deferred check (ops/index.hpp), so a target
// outside [0, V) that is not ignore_index is the CPU's error, thrown by the next synchronisation
// (reading the loss), and its row's loss and gradient are NaN until then.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/ops/index.hpp"

namespace mixmoe {

/// How a per-position loss is reduced.
enum class Reduction { mean, sum, none };

struct CrossEntropyOptions {
  Index ignore_index = -100;     // targets equal to this contribute no loss and no gradient
  double label_smoothing = 0.0;  // eps in [0, 1]
  Reduction reduction = Reduction::mean;
};

namespace detail {

/// The error of a target outside [0, V) at flat position `at` of targets of `shape`.
inline std::string target_error(long long target, const Shape& shape, long long at, index_t v, Index ignore) {
  std::ostringstream os;
  os << "[cross_entropy] target " << target << " at position " << index_position(shape, at)
     << " is out of range for V = " << v << " classes (ignore_index is " << ignore << ")";
  return os.str();
}

/// cross_entropy on a device (DeviceOps<D>::rows_cross_entropy*): the same loss and gradient as
/// the host code below, with the targets and the loss kept on the device. The host code checks
/// every target and throws; reading them here would synchronise, so the check is deferred
/// (ops/index.hpp): the next synchronisation throws the host's error, and until then a target
/// outside [0, V) (other than ignore_index) gives a NaN loss for its row (and NaN gradients).
template <class T, class D>
Var<T, D> cross_entropy_device(const Var<T, D>& logits, const Tensor<Index, D>& targets,
                               const CrossEntropyOptions& opt) {
  require_device_ops<D>();
  const index_t v = logits.size(-1);
  const Tensor<Index, D> tc = targets.contiguous();     // (N)
  const Tensor<T, D> xc = logits.value().contiguous();  // (N, V)
  const index_t rows = tc.numel();
  DeviceOps<D>::index_check_deferred(
      tc.data(), rows, v,
      [v, ignore = opt.ignore_index, shape = tc.shape()](long long at, long long target) {
        return target_error(target, shape, at, v, ignore);
      },
      static_cast<index_t>(opt.ignore_index));
  const double eps = opt.label_smoothing;
  const bool none = opt.reduction == Reduction::none;
  auto stats = Tensor<double, D>::empty({rows, 2});  // per row (max, log sum exp(x - max))
  auto losses = Tensor<double, D>::empty({rows});
  auto count = Tensor<double, D>::zeros({1});  // positions that are not ignored (mean, sum)
  Tensor<T, D> out = none ? Tensor<T, D>::empty(logits.shape().without(-1)) : Tensor<T, D>::empty(Shape{});
  DeviceOps<D>::rows_cross_entropy(xc.data(), tc.data(), stats.data(), losses.data(), none ? out.data() : nullptr, rows,
                                   v, opt.ignore_index, eps);
  if (!none)
    DeviceOps<D>::rows_cross_entropy_reduce(losses.data(), tc.data(), rows, opt.ignore_index,
                                            opt.reduction == Reduction::mean, out.data(), count.data());
  auto backward = [xc, tc, stats, count, opt, v, rows](autograd::BackwardContext<T, D>& ctx) {
    Tensor<T, D> gx = Tensor<T, D>::empty(xc.shape());  // (..., V)
    const int mode = opt.reduction == Reduction::none ? 0 : opt.reduction == Reduction::sum ? 1 : 2;
    DeviceOps<D>::rows_cross_entropy_backward(xc.data(), tc.data(), stats.data(), ctx.grad_out().data(), count.data(),
                                              gx.data(), rows, v, opt.ignore_index, opt.label_smoothing, mode);
    ctx.accumulate(0, std::move(gx));
  };
  return record("cross_entropy", std::move(out), {logits}, std::move(backward));
}

}  // namespace detail

/// Softmax cross-entropy over the last axis of logits; see the header comment.
template <Scalar T, Device D>
Var<T, D> cross_entropy(const Var<T, D>& logits, const Tensor<Index, D>& targets, CrossEntropyOptions opt = {}) {
  MIXMOE_CHECK(logits.dim() >= 1, "cross_entropy", "logits must have a class axis, got shape ", logits.shape());
  const Shape expect = logits.shape().without(-1);
  MIXMOE_CHECK(targets.shape() == expect, "cross_entropy", "targets of shape ", targets.shape(),
               " do not match logits of shape ", logits.shape(), ": expected ", expect);
  const index_t v = logits.size(-1);
  MIXMOE_CHECK(v > 0, "cross_entropy", "logits of shape ", logits.shape(), " have no classes");
  MIXMOE_CHECK(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0, "cross_entropy", "label_smoothing ",
               opt.label_smoothing, " is outside [0, 1]");
  if constexpr (!Tensor<T, D>::on_host) return detail::cross_entropy_device(logits, targets, opt);
  const Tensor<Index, D> tc = targets.contiguous();  // (N)
  const Index* pt = tc.data();
  const index_t rows = tc.numel();
  index_t count = 0;  // positions that are not ignored
  for (index_t r = 0; r < rows; ++r) {
    if (pt[r] == opt.ignore_index) continue;
    if (pt[r] < 0 || pt[r] >= v) [[unlikely]]
      throw Error(detail::target_error(pt[r], tc.shape(), r, v, opt.ignore_index));
    ++count;
  }

  using Row = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const Tensor<T, D> xc = logits.value().contiguous();  // (N, V)
  // Per row (max, log sum exp(x - max)), kept for the backward: softmax = exp((x - max) - log_s)
  // stays accurate in float, where exp(x - lse) would lose the low bits of a large lse.
  auto stats = Tensor<double, D>::empty({rows, 2});
  auto losses = Tensor<double, D>::empty({rows});
  const double eps = opt.label_smoothing;
  const index_t grain = std::max<index_t>(1, (1 << 14) / v);
  {
    const T* px = xc.data();
    double* pst = stats.data();
    double* ploss = losses.data();
    cpu::parallel_for(rows, grain, [&](index_t lo, index_t hi) {
      auto scratch = Tensor<T, D>::empty({v});
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> e(scratch.data(), v);
      for (index_t r = lo; r < hi; ++r) {
        const Row x(px + r * v, v);
        const T mx = x.maxCoeff();
        e = (x - mx).exp();  // vectorised in T; the sum below is in double
        double s = 0;
        for (index_t j = 0; j < v; ++j) s += static_cast<double>(e[j]);
        const double log_s = std::log(s);
        pst[2 * r] = static_cast<double>(mx);
        pst[2 * r + 1] = log_s;
        if (pt[r] == opt.ignore_index) {
          ploss[r] = 0;
          continue;
        }
        double loss = (1.0 - eps) * (static_cast<double>(mx) - static_cast<double>(x[pt[r]]) + log_s);
        if (eps > 0) {
          double shifted = 0;  // sum_j (x_j - max)
          for (index_t j = 0; j < v; ++j) shifted += static_cast<double>(x[j]) - static_cast<double>(mx);
          loss += eps * (log_s - shifted / static_cast<double>(v));
        }
        ploss[r] = loss;
      }
    });
  }

  Tensor<T, D> out;
  if (opt.reduction == Reduction::none) {
    out = Tensor<T, D>::empty(expect);  // (...)
    for (index_t r = 0; r < rows; ++r) out.data()[r] = static_cast<T>(losses.data()[r]);
  } else {
    double total = 0;
    for (index_t r = 0; r < rows; ++r) total += losses.data()[r];
    if (opt.reduction == Reduction::mean) total = count > 0 ? total / static_cast<double>(count) : 0.0;
    out = Tensor<T, D>::scalar(static_cast<T>(total));  // ()
  }

  auto backward = [xc, tc, stats, opt, v, rows, count, grain](autograd::BackwardContext<T, D>& ctx) {
    const Tensor<T, D>& g = ctx.grad_out();
    // The factor on (softmax - q) of a row: its output gradient, or the scalar one (over the count for the mean).
    const bool per_row = opt.reduction == Reduction::none;
    double common = 0.0;
    if (opt.reduction == Reduction::sum) common = static_cast<double>(g.item());
    if (opt.reduction == Reduction::mean && count > 0)
      common = static_cast<double>(g.item()) / static_cast<double>(count);
    const double eps = opt.label_smoothing;
    Tensor<T, D> gx = Tensor<T, D>::empty(xc.shape());  // (..., V)
    const T* px = xc.data();
    const T* pg = g.data();
    const Index* pt = tc.data();
    const double* pst = stats.data();
    T* pgx = gx.data();
    cpu::parallel_for(rows, grain, [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> gr(pgx + r * v, v);
        const double scale = per_row ? static_cast<double>(pg[r]) : common;
        if (pt[r] == opt.ignore_index || scale == 0.0) {
          gr.setZero();
          continue;
        }
        const Row x(px + r * v, v);
        const T mx = static_cast<T>(pst[2 * r]), log_s = static_cast<T>(pst[2 * r + 1]);
        gr = ((x - mx) - log_s).exp() * static_cast<T>(scale);
        if (eps > 0) gr -= static_cast<T>(scale * eps / static_cast<double>(v));
        gr[pt[r]] -= static_cast<T>(scale * (1.0 - eps));
      }
    });
    ctx.accumulate(0, std::move(gx));
  };
  return record("cross_entropy", std::move(out), {logits}, std::move(backward));
}

}  // namespace mixmoe
