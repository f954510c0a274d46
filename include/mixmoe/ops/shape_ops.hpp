// Shape ops on Vars: reshape, transpose, permute, slice, concat.
//
// reshape, transpose, permute and slice return views of the input's storage
// where the Tensor allows (reshape of a non-contiguous input copies); their
// backward puts the output gradient back into the input's row-major layout.
// concat copies. They move elements without arithmetic, so they take bf16 Vars too.
//
// On a device (Cuda) all of them run there: the views and the contiguous copies through the
// Tensor's device copies, the backwards of slice and concat through a strided add
// (backend/cuda/index.cuh).
//
//   reshape:   x (any shape) -> s (same number of elements, one extent may be -1)
//   transpose: x (..., A, ..., B, ...) -> (..., B, ..., A, ...)
//   permute:   x (d0, ..., dr-1) -> (d[order[0]], ..., d[order[r-1]])
//   slice:     x (..., N, ...) -> (..., end - begin, ...)
//   concat:    xs[k] (..., N_k, ...) -> (..., sum_k N_k, ...)
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <initializer_list>
#include <span>
#include <vector>

#include "mixmoe/autograd/var.hpp"

namespace mixmoe {

namespace detail {

/// An axis order held inline (no heap allocation): axis i of the result is axis perm[i].
struct AxisOrder {
  std::array<int, kMaxDims> perm{};
  int rank = 0;
};

/// Checks that `order` is a permutation of the axes of `shape` and normalises negative axes.
inline AxisOrder checked_permutation(const Shape& shape, std::span<const int> order, const char* op) {
  MIXMOE_CHECK(static_cast<int>(order.size()) == shape.rank(), op, order.size(), " axes given for shape ", shape);
  AxisOrder p;
  p.rank = shape.rank();
  bool seen[kMaxDims] = {};
  for (int i = 0; i < p.rank; ++i) {
    const int a = shape.axis(order[static_cast<std::size_t>(i)], op);
    MIXMOE_CHECK(!seen[a], op, "axis ", order[static_cast<std::size_t>(i)], " repeated in the order for shape ", shape);
    seen[a] = true;
    p.perm[static_cast<std::size_t>(i)] = a;
  }
  return p;
}

/// The view of t whose axis i is t's axis order.perm[i], built from swaps because
/// Tensor::permute takes its order as a literal list.
template <class T, class D>
Tensor<T, D> permute_view(const Tensor<T, D>& t, const AxisOrder& order) {
  Tensor<T, D> v = t;
  int label[kMaxDims] = {};  // label[i]: which axis of t sits at position i of v
  for (int i = 0; i < order.rank; ++i) label[i] = i;
  for (int i = 0; i < order.rank; ++i) {
    int p = i;
    while (label[p] != order.perm[static_cast<std::size_t>(i)]) ++p;
    if (p != i) {
      v = v.transpose(i, p);
      std::swap(label[i], label[p]);
    }
  }
  return v;
}

}  // namespace detail

/// Same elements in a new shape; one extent may be -1. A view when x is contiguous.
template <Floating T, Device D>
Var<T, D> reshape(const Var<T, D>& x, const Shape& shape) {
  auto out = x.value().reshape(shape);
  return record("reshape", std::move(out), {x}, [xshape = x.shape()](autograd::BackwardContext<T, D>& ctx) {
    // grad_out is contiguous, so its reshape is a view in the input's row-major layout.
    ctx.accumulate(0, ctx.grad_out().reshape(xshape));
  });
}

/// Swaps axes a and b (a view).
template <Floating T, Device D>
Var<T, D> transpose(const Var<T, D>& x, int a, int b) {
  const int ra = x.shape().axis(a, "transpose"), rb = x.shape().axis(b, "transpose");
  auto out = x.value().transpose(ra, rb);
  return record("transpose", std::move(out), {x}, [ra, rb](autograd::BackwardContext<T, D>& ctx) {
    // Swapping the axes back gives a strided view of the gradient; contiguous() lays it out like x.
    ctx.accumulate(0, ctx.grad_out().transpose(ra, rb).contiguous());
  });
}

/// Reorders axes: result axis i is x's axis order[i] (a view).
template <Floating T, Device D>
Var<T, D> permute(const Var<T, D>& x, std::span<const int> order) {
  const detail::AxisOrder p = detail::checked_permutation(x.shape(), order, "permute");
  auto out = detail::permute_view(x.value(), p);
  detail::AxisOrder inverse;
  inverse.rank = p.rank;
  for (int i = 0; i < p.rank; ++i) inverse.perm[static_cast<std::size_t>(p.perm[static_cast<std::size_t>(i)])] = i;
  return record("permute", std::move(out), {x}, [inverse](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, detail::permute_view(ctx.grad_out(), inverse).contiguous());
  });
}

template <Floating T, Device D>
Var<T, D> permute(const Var<T, D>& x, std::initializer_list<int> order) {
  return permute(x, std::span<const int>(order.begin(), order.size()));
}

/// Elements [begin, end) along one axis (a view).
template <Floating T, Device D>
Var<T, D> slice(const Var<T, D>& x, int axis, index_t begin, index_t end) {
  auto out = x.value().slice(axis, begin, end);  // checks the axis and the range
  const Shape& s = x.shape();
  const int a = s.axis(axis, "slice");
  const index_t outer = s.prod(0, a), n = s[a], inner = s.prod(a + 1, s.rank()), len = end - begin;
  return record("slice", std::move(out), {x}, [outer, n, inner, len, begin](autograd::BackwardContext<T, D>& ctx) {
    // The gradient of x is zero outside the slice: add the output gradient into the window.
    if constexpr (!Tensor<T, D>::on_host) {
      detail::require_device_ops<D>();
      // x's gradient seen as (outer, n, inner); the window is its slice [begin, begin + len) on axis 1
      const Tensor<T, D> window = ctx.grad_in(0).reshape(Shape{outer, n, inner}).slice(1, begin, begin + len);
      const Tensor<T, D> g = ctx.grad_out().reshape(Shape{outer, len, inner});
      detail::DeviceOps<D>::index_add_strided(window.data(), window.strides(), g.data(), g.strides(), g.shape());
      return;
    }
    const T* g = ctx.grad_out().data();
    T* gx = ctx.grad_in(0).data();
    for (index_t o = 0; o < outer; ++o) {
      T* dst = gx + (o * n + begin) * inner;
      const T* src = g + o * len * inner;
      for (index_t i = 0; i < len * inner; ++i) dst[i] += src[i];
    }
  });
}

/// Joins xs along `axis`; every other extent must agree.
template <Floating T, Device D>
Var<T, D> concat(std::span<const Var<T, D>> xs, int axis) {
  MIXMOE_CHECK(!xs.empty(), "concat", "needs at least one input");
  for (std::size_t k = 0; k < xs.size(); ++k)
    MIXMOE_CHECK(xs[k].defined(), "concat", "input ", k, " is an undefined Var");
  const Shape& first = xs[0].shape();
  const int a = first.axis(axis, "concat");
  index_t total = 0;
  for (std::size_t k = 0; k < xs.size(); ++k) {
    const Shape& s = xs[k].shape();
    bool same = s.rank() == first.rank();
    for (int d = 0; same && d < s.rank(); ++d) same = d == a || s[d] == first[d];
    MIXMOE_CHECK(same, "concat", "input ", k, " of shape ", s, " does not match input 0 of shape ", first,
                 " outside axis ", axis);
    total += s[a];
  }
  const index_t outer = first.prod(0, a), inner = first.prod(a + 1, first.rank());
  std::vector<index_t, PoolAllocator<index_t>> extents(xs.size());  // the pool: no malloc once warm
  for (std::size_t k = 0; k < xs.size(); ++k) extents[k] = xs[k].shape()[a];

  Tensor<T, D> out = Tensor<T, D>::empty(first.with(a, total));  // (..., sum_k N_k, ...)
  if constexpr (!Tensor<T, D>::on_host) {
    // input k (any layout) is copied into its window of out on the device
    index_t at = 0;
    for (std::size_t k = 0; k < xs.size(); ++k) {
      out.slice(a, at, at + extents[k]).copy_from(xs[k].value());
      at += extents[k];
    }
  } else {
    T* po = out.data();
    index_t at = 0;  // start of input k along the axis
    for (std::size_t k = 0; k < xs.size(); ++k) {
      const index_t block = extents[k] * inner;
      if (block > 0) {
        const Tensor<T, D> xc = xs[k].value().contiguous();
        const T* px = xc.data();
        for (index_t o = 0; o < outer; ++o)
          std::memcpy(po + (o * total + at) * inner, px + o * block, static_cast<std::size_t>(block) * sizeof(T));
      }
      at += extents[k];
    }
  }
  return record("concat", std::move(out), xs,
                [extents = std::move(extents), outer, inner, total](autograd::BackwardContext<T, D>& ctx) {
                  if constexpr (!Tensor<T, D>::on_host) {
                    detail::require_device_ops<D>();
                    // the gradient seen as (outer, total, inner); input k's part is its slice on axis 1
                    const Tensor<T, D> g = ctx.grad_out().reshape(Shape{outer, total, inner});
                    index_t start = 0;
                    for (std::size_t k = 0; k < extents.size(); ++k) {
                      if (ctx.needs_grad(k) && extents[k] * inner == 0) (void)ctx.grad_in(k);  // see below
                      if (ctx.needs_grad(k) && extents[k] * inner > 0) {
                        const Tensor<T, D> part = g.slice(1, start, start + extents[k]);  // (outer, N_k, inner)
                        Tensor<T, D>& gx = ctx.grad_in(k);  // contiguous: row-major (outer, N_k, inner)
                        detail::DeviceOps<D>::index_add_strided(gx.data(), contiguous_strides(part.shape()),
                                                                part.data(), part.strides(), part.shape());
                      }
                      start += extents[k];
                    }
                    return;
                  }
                  const T* g = ctx.grad_out().data();
                  index_t start = 0;
                  for (std::size_t k = 0; k < extents.size(); ++k) {
                    const index_t block = extents[k] * inner;
                    // An empty input still gets its (empty) gradient, so the graph behind it runs: the
                    // parameters of an MoE expert called on no rows get a zero gradient (moe_forward).
                    if (ctx.needs_grad(k) && block == 0) (void)ctx.grad_in(k);
                    if (ctx.needs_grad(k) && block > 0) {
                      T* gx = ctx.grad_in(k).data();
                      for (index_t o = 0; o < outer; ++o) {
                        const T* src = g + (o * total + start) * inner;
                        T* dst = gx + o * block;
                        for (index_t i = 0; i < block; ++i) dst[i] += src[i];
                      }
                    }
                    start += extents[k];
                  }
                });
}

template <Floating T, Device D>
Var<T, D> concat(const std::vector<Var<T, D>>& xs, int axis) {
  return concat(std::span<const Var<T, D>>(xs), axis);
}

template <Floating T, Device D>
Var<T, D> concat(std::initializer_list<Var<T, D>> xs, int axis) {
  return concat(std::span<const Var<T, D>>(xs.begin(), xs.size()), axis);
}

}  // namespace mixmoe
