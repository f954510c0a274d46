// Normalisation over the last axis: rms_norm and layer_norm, each ONE fused op with
// a hand-written backward.
//
//   rms_norm(x (..., C), weight (C), eps)              y = x / sqrt(mean_C(x^2) + eps) * weight
//   layer_norm(x (..., C), weight (C), bias (C), eps)  y = (x - mean_C(x)) / sqrt(var_C(x) + eps) * weight + bias
//
// Shape legend: C channels (the normalised last axis), R = numel / C rows.
// weight and bias are optional: an undefined Var means weight 1 and bias 0. var is
// the biased (1/C) variance, as in the usual LayerNorm.
//
// Precision: the row statistics are computed and saved in double, for float inputs
// too, and the variance is the mean of squared deviations from a first-pass mean
// (never E[x^2] - E[x]^2, which cancels catastrophically for rows of large
// magnitude). Saved per row: rstd = 1 / sqrt(mean square (+ eps)) and, for
// layer_norm, the mean; the backward recomputes xhat = (x - mean) * rstd from them.
//
// Backward, with dy = g * weight and means over C:
//   rms_norm:   dx = rstd * (dy - xhat * mean(dy * xhat))
//   layer_norm: dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
//   dweight = sum_R(g * xhat), dbias = sum_R(g)
// The parameter gradients are summed in double over a fixed split of the rows that
// does not depend on the thread count, so they are the same on every run.
//
// On a device (Cuda) a block per row computes the same (backend/cuda/rows.cuh, DeviceOps<D>::rows_norm*);
// the parameter gradients are summed in double over a fixed split of the rows there too.
#pragma once

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/vmath.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail::norm_impl {

// Most row blocks whose partial parameter gradients are summed at the end (fixed: deterministic).
inline constexpr index_t kMaxBlocks = 32;
inline constexpr index_t kMinRowsPerBlock = 16;

using cpu::Array;
using cpu::In;
using cpu::Out;
using cpu::kGrain;

template <class T, class D>
void check_args(const char* op, const Var<T, D>& x, const Var<T, D>& weight, const Var<T, D>& bias, double eps) {
  MIXMOE_CHECK(x.defined(), op, "the input is an undefined Var");
  MIXMOE_CHECK(x.dim() >= 1, op, "needs an input with a last axis to normalise, got shape ", x.shape());
  const index_t c = x.size(-1);
  MIXMOE_CHECK(c > 0, op, "the last axis of x ", x.shape(), " is empty");
  if (weight.defined())
    MIXMOE_CHECK(weight.dim() == 1 && weight.size(0) == c, op, "weight ", weight.shape(),
                 " does not match the last axis of x ", x.shape(), " (expected (", c, "))");
  if (bias.defined())
    MIXMOE_CHECK(bias.dim() == 1 && bias.size(0) == c, op, "bias ", bias.shape(),
                 " does not match the last axis of x ", x.shape(), " (expected (", c, "))");
  MIXMOE_CHECK(std::isfinite(eps) && eps >= 0.0, op, "eps must be finite and >= 0, got ", eps);
}

/// Forward over R rows of C: y, and the saved rstd (R) and, when centre, mean (R).
/// w and b may be null (weight 1, bias 0).
template <class T>
void forward(const T* x, const T* w, const T* b, T* y, double* mean, double* rstd, index_t rows, index_t c, double eps,
             bool centre) {
  cpu::parallel_for(rows, std::max<index_t>(1, kGrain / c), [&](index_t lo, index_t hi) {
    for (index_t r = lo; r < hi; ++r) {
      const In<T> a(x + r * c, c);  // (C)
      Out<T> o(y + r * c, c);       // (C)
      const auto ad = a.template cast<double>();
      const double mu = centre ? ad.mean() : 0.0;
      const double rs = 1.0 / std::sqrt((ad - mu).square().mean() + eps);
      if (centre) mean[r] = mu;
      rstd[r] = rs;
      o = ((ad - mu) * rs).template cast<T>();  // xhat
      if (w) o *= In<T>(w, c);
      if (b) o += In<T>(b, c);
    }
  });
}

/// Backward: gx (R, C) when non-null, and per-block partial sums (blocks, C) in double of
/// g * xhat (pw) and g (pb) when non-null.
template <class T>
void backward(const T* g, const T* x, const T* w, const double* mean, const double* rstd, T* gx, double* pw, double* pb,
              index_t rows, index_t c, index_t blocks) {
  // blocks per thread so that each thread gets at least kGrain elements
  const index_t grain = std::max<index_t>(1, kGrain * blocks / std::max<index_t>(1, rows * c));
  cpu::parallel_for(blocks, grain, [&](index_t blo, index_t bhi) {
    for (index_t blk = blo; blk < bhi; ++blk) {
      const index_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
      for (index_t r = r0; r < r1; ++r) {
        const In<T> gr(g + r * c, c), a(x + r * c, c);  // (C)
        const double mu = mean ? mean[r] : 0.0, rs = rstd[r];
        const auto xhat = (a.template cast<double>() - mu) * rs;
        const auto gd = gr.template cast<double>();
        if (pw) Eigen::Map<Array<double>>(pw + blk * c, c) += gd * xhat;
        if (pb) Eigen::Map<Array<double>>(pb + blk * c, c) += gd;
        if (!gx) continue;
        Out<T> o(gx + r * c, c);
        if (w) {
          const auto dy = gd * In<T>(w, c).template cast<double>();
          const double m2 = (dy * xhat).mean(), m1 = mean ? dy.mean() : 0.0;
          o = (rs * (dy - m1 - xhat * m2)).template cast<T>();
        } else {
          const double m2 = (gd * xhat).mean(), m1 = mean ? gd.mean() : 0.0;
          o = (rs * (gd - m1 - xhat * m2)).template cast<T>();
        }
      }
    }
  });
}

/// Sums the (blocks, C) partials in block order into a fresh (C) tensor of T.
template <class T, class D>
Tensor<T, D> sum_blocks(const Tensor<double, D>& partial, index_t blocks, index_t c) {
  require_host<D>();
  Tensor<T, D> out = Tensor<T, D>::empty(Shape{c});
  const double* p = partial.data();
  for (index_t j = 0; j < c; ++j) {
    double s = 0;
    for (index_t blk = 0; blk < blocks; ++blk) s += p[blk * c + j];
    out.data()[j] = static_cast<T>(s);
  }
  return out;
}

template <class T, class D>
Var<T, D> norm_op(const char* op, const Var<T, D>& x, const Var<T, D>& weight, const Var<T, D>& bias, double eps,
                  bool centre) {
  check_args(op, x, weight, bias, eps);
  const index_t c = x.size(-1), rows = x.numel() / c;
  const Tensor<T, D> xc = x.value().contiguous();
  const Tensor<T, D> wc = weight.defined() ? weight.value().contiguous() : Tensor<T, D>();
  const Tensor<T, D> bc = bias.defined() ? bias.value().contiguous() : Tensor<T, D>();
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());                                                     // (..., C)
  const Tensor<double, D> mean = centre ? Tensor<double, D>::empty(Shape{rows}) : Tensor<double, D>();  // (R)
  const Tensor<double, D> rstd = Tensor<double, D>::empty(Shape{rows});                                  // (R)
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::rows_norm(xc.data(), wc.defined() ? wc.data() : nullptr, bc.defined() ? bc.data() : nullptr,
                            out.data(), centre ? mean.data() : nullptr, rstd.data(), rows, c, eps, centre);
  } else {
    forward(xc.data(), wc.defined() ? wc.data() : nullptr, bc.defined() ? bc.data() : nullptr, out.data(),
            centre ? mean.data() : nullptr, rstd.data(), rows, c, eps, centre);
  }
  auto back = [xc, wc, mean, rstd, rows, c](autograd::BackwardContext<T, D>& ctx) {
    const bool need_x = ctx.needs_grad(0), need_w = ctx.needs_grad(1), need_b = ctx.needs_grad(2);
    if constexpr (!Tensor<T, D>::on_host) {
      const T* g = ctx.grad_out().data();
      const double* pm = mean.defined() ? mean.data() : nullptr;
      Tensor<T, D> gx = need_x ? Tensor<T, D>::empty(xc.shape()) : Tensor<T, D>();
      Tensor<T, D> dw = need_w ? Tensor<T, D>::empty(Shape{c}) : Tensor<T, D>();  // (C)
      Tensor<T, D> db = need_b ? Tensor<T, D>::empty(Shape{c}) : Tensor<T, D>();  // (C)
      if (need_x)
        DeviceOps<D>::rows_norm_backward(g, xc.data(), wc.defined() ? wc.data() : nullptr, pm, rstd.data(), gx.data(),
                                         rows, c);
      DeviceOps<D>::rows_norm_param_grads(g, xc.data(), pm, rstd.data(), need_w ? dw.data() : nullptr,
                                          need_b ? db.data() : nullptr, rows, c);
      if (need_x) ctx.accumulate(0, std::move(gx));
      if (need_w) ctx.accumulate(1, std::move(dw));
      if (need_b) ctx.accumulate(2, std::move(db));
    } else {
      const index_t blocks = std::clamp<index_t>(rows / kMinRowsPerBlock, 1, kMaxBlocks);
      Tensor<T, D> gx = need_x ? Tensor<T, D>::empty(xc.shape()) : Tensor<T, D>();
      Tensor<double, D> pw = need_w ? Tensor<double, D>::zeros(Shape{blocks, c}) : Tensor<double, D>();  // (blocks, C)
      Tensor<double, D> pb = need_b ? Tensor<double, D>::zeros(Shape{blocks, c}) : Tensor<double, D>();  // (blocks, C)
      if (rows > 0)
        backward(ctx.grad_out().data(), xc.data(), wc.defined() ? wc.data() : nullptr,
                 mean.defined() ? mean.data() : nullptr, rstd.data(), need_x ? gx.data() : nullptr,
                 need_w ? pw.data() : nullptr, need_b ? pb.data() : nullptr, rows, c, blocks);
      if (need_x) ctx.accumulate(0, std::move(gx));
      if (need_w) ctx.accumulate(1, sum_blocks<T>(pw, blocks, c));
      if (need_b) ctx.accumulate(2, sum_blocks<T>(pb, blocks, c));
    }
  };
  return record(op, std::move(out), {x, weight, bias}, std::move(back));
}

}  // namespace detail::norm_impl

/// RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight (weight optional).
template <Scalar T, Device D>
Var<T, D> rms_norm(const Var<T, D>& x, const Var<T, D>& weight = Var<T, D>(), double eps = 1e-6) {
  return detail::norm_impl::norm_op("rms_norm", x, weight, Var<T, D>(), eps, false);
}

/// LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias (both optional).
template <Scalar T, Device D>
Var<T, D> layer_norm(const Var<T, D>& x, const Var<T, D>& weight = Var<T, D>(), const Var<T, D>& bias = Var<T, D>(),
                     double eps = 1e-5) {
  return detail::norm_impl::norm_op("layer_norm", x, weight, bias, eps, true);
}

}  // namespace mixmoe
