// Reductions: sum and mean over all elements or over one axis.
//
// An axis reduction views x as (outer, n, inner) around the reduced axis.
//
// On a device (Cuda): the full sum in double over a fixed split (its result and gradient stay on
// the device), an axis sum per output element in T and in the CPU's order (backend/cuda/rows.cuh).
#pragma once

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail {

/// out[o, i] = scale * sum_j x[o, j, i] for x viewed as (outer, n, inner).
template <class T, class D>
Tensor<T, D> reduce_axis(const Tensor<T, D>& x, int axis, bool keepdim, T scale_by) {
  const Tensor<T, D> xc = x.contiguous();
  const Shape& s = x.shape();
  const index_t outer = s.prod(0, axis), n = s[axis], inner = s.prod(axis + 1, s.rank());
  Tensor<T, D> out = Tensor<T, D>::zeros(keepdim ? s.with(axis, 1) : s.without(axis));
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::rows_reduce_axis(xc.data(), out.data(), outer, n, inner, scale_by);
    return out;
  }
  const T* px = xc.data();
  T* po = out.data();
  cpu::parallel_for(outer, std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, n * inner)), [&](index_t lo, index_t hi) {
    for (index_t o = lo; o < hi; ++o) {
      T* dst = po + o * inner;
      for (index_t j = 0; j < n; ++j) {
        const T* src = px + (o * n + j) * inner;
        for (index_t i = 0; i < inner; ++i) dst[i] += src[i];
      }
      for (index_t i = 0; i < inner; ++i) dst[i] *= scale_by;
    }
  });
  return out;
}

/// gx[o, j, i] = scale * g[o, i]: the backward of reduce_axis.
template <class T, class D>
Tensor<T, D> expand_axis(const Tensor<T, D>& g, const Shape& xshape, int axis, T scale_by) {
  const index_t outer = xshape.prod(0, axis), n = xshape[axis], inner = xshape.prod(axis + 1, xshape.rank());
  Tensor<T, D> out = Tensor<T, D>::empty(xshape);
  const Tensor<T, D> gc = g.contiguous();
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::rows_expand_axis(gc.data(), out.data(), outer, n, inner, scale_by);
    return out;
  }
  const T* pg = gc.data();
  T* po = out.data();
  for (index_t o = 0; o < outer; ++o)
    for (index_t j = 0; j < n; ++j)
      for (index_t i = 0; i < inner; ++i) po[(o * n + j) * inner + i] = scale_by * pg[o * inner + i];
  return out;
}

template <class T, class D>
Var<T, D> reduce_all(const Var<T, D>& x, const char* op, T scale_by) {
  const Tensor<T, D> xc = x.value().contiguous();
  if constexpr (!Tensor<T, D>::on_host) {
    // The sum and its backward stay on the device (no item()): the gradient kernel reads g[0].
    require_device_ops<D>();
    auto out = Tensor<T, D>::empty(Shape{});
    DeviceOps<D>::rows_sum_all(xc.data(), xc.numel(), scale_by, out.data());
    return record(op, std::move(out), {x}, [shape = x.shape(), scale_by](autograd::BackwardContext<T, D>& ctx) {
      auto gx = Tensor<T, D>::empty(shape);
      DeviceOps<D>::rows_fill_scaled(gx.data(), gx.numel(), ctx.grad_out().data(), scale_by);
      ctx.accumulate(0, std::move(gx));
    });
  }
  double acc = 0;  // accumulate in double: a float sum of many terms drifts
  for (index_t i = 0, n = xc.numel(); i < n; ++i) acc += xc.data()[i];
  auto out = Tensor<T, D>::scalar(static_cast<T>(acc) * scale_by);
  return record(op, std::move(out), {x}, [shape = x.shape(), scale_by](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, Tensor<T, D>::full(shape, ctx.grad_out().item() * scale_by));
  });
}

template <class T, class D>
Var<T, D> reduce_one_axis(const Var<T, D>& x, int axis, bool keepdim, const char* op, bool mean) {
  const int a = x.shape().axis(axis, op);
  const index_t n = x.shape()[a];
  MIXMOE_CHECK(!mean || n > 0, op, "mean over an empty axis ", axis, " of shape ", x.shape());
  const T k = mean ? T(1) / static_cast<T>(n) : T(1);
  auto out = reduce_axis(x.value(), a, keepdim, k);
  return record(op, std::move(out), {x}, [shape = x.shape(), a, k](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, expand_axis(ctx.grad_out(), shape, a, k));
  });
}

}  // namespace detail

/// Sum of all elements: a rank-0 result.
template <Scalar T, Device D>
Var<T, D> sum(const Var<T, D>& x) {
  return detail::reduce_all(x, "sum", T(1));
}

/// Mean of all elements: a rank-0 result.
template <Scalar T, Device D>
Var<T, D> mean(const Var<T, D>& x) {
  MIXMOE_CHECK(x.numel() > 0, "mean", "mean of an empty tensor of shape ", x.shape());
  return detail::reduce_all(x, "mean", T(1) / static_cast<T>(x.numel()));
}

/// Sum over one axis (negative axes count from the end).
template <Scalar T, Device D>
Var<T, D> sum(const Var<T, D>& x, int axis, bool keepdim = false) {
  return detail::reduce_one_axis(x, axis, keepdim, "sum", false);
}

/// Mean over one axis.
template <Scalar T, Device D>
Var<T, D> mean(const Var<T, D>& x, int axis, bool keepdim = false) {
  return detail::reduce_one_axis(x, axis, keepdim, "mean", true);
}

}  // namespace mixmoe
