// Top-k along one axis (the router's expert choice).
//
//   N extent of the axis, K the number kept
//   topk: x (..., N, ...) -> values (..., K, ...), indices (..., K, ...)
//
// Results are sorted descending; equal values keep the lower index first, and a
// NaN counts as larger than every number (so the order is total and a NaN logit
// is visible in the selection rather than silently skipped). The values are
// differentiable: the backward sends each value's gradient to the position it
// came from. The indices are plain integers.
//
// On a device (Cuda) a k-pass selection in the same order gives the same values and indices,
// ties and NaN included (backend/cuda/rows.cuh, DeviceOps<D>::rows_topk).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

template <Scalar T, Device D = Cpu>
struct TopKResult {
  Var<T, D> values;          // (..., K, ...)
  Tensor<Index, D> indices;  // (..., K, ...) positions along the axis
};

namespace detail {

/// topk on a device (DeviceOps<D>::rows_topk): the same values, indices and order as the host
/// code below; the backward scatters the values' gradient back on the device.
template <class T, class D>
TopKResult<T, D> topk_device(const Var<T, D>& x, index_t k, int a, index_t outer, index_t n, index_t inner) {
  require_device_ops<D>();
  const Shape& s = x.shape();
  const Tensor<T, D> xc = x.value().contiguous();
  Tensor<T, D> values = Tensor<T, D>::empty(s.with(a, k));  // (..., K, ...)
  Tensor<Index, D> indices = Tensor<Index, D>::empty(s.with(a, k));
  DeviceOps<D>::rows_topk(xc.data(), values.data(), indices.data(), outer, n, inner, k);
  // The backward keeps its own copy: the caller owns `indices` and may rewrite them (expert offsets).
  auto backward = [picked = indices.clone(), s, outer, n, inner, k](autograd::BackwardContext<T, D>& ctx) {
    Tensor<T, D> gx = Tensor<T, D>::zeros(s);
    DeviceOps<D>::rows_topk_backward(ctx.grad_out().data(), picked.data(), gx.data(), outer, n, inner, k);
    ctx.accumulate(0, std::move(gx));
  };
  return {record("topk", std::move(values), {x}, std::move(backward)), std::move(indices)};
}

}  // namespace detail

/// The k largest entries of x along `axis`, sorted descending (ties: lower index first).
template <Scalar T, Device D>
TopKResult<T, D> topk(const Var<T, D>& x, index_t k, int axis = -1) {
  const Shape& s = x.shape();
  const int a = s.axis(axis, "topk");
  const index_t n = s[a];
  MIXMOE_CHECK(k >= 1 && k <= n, "topk", "k = ", k, " is out of range [1, ", n, "] for axis ", axis, " of shape ", s);
  MIXMOE_CHECK(n <= std::numeric_limits<Index>::max(), "topk", "axis ", axis, " of shape ", s,
               " is too long for Index");
  const index_t outer = s.prod(0, a), inner = s.prod(a + 1, s.rank());
  if constexpr (!Tensor<T, D>::on_host) return detail::topk_device(x, k, a, outer, n, inner);
  const Tensor<T, D> xc = x.value().contiguous();
  Tensor<T, D> values = Tensor<T, D>::empty(s.with(a, k));  // (..., K, ...)
  Tensor<Index, D> indices = Tensor<Index, D>::empty(s.with(a, k));
  {
    struct Entry {
      T value;
      Index index;
    };
    const auto before = [](const Entry& p, const Entry& q) {
      const bool pn = std::isnan(p.value), qn = std::isnan(q.value);
      if (pn != qn) return pn;
      if (!pn && p.value != q.value) return p.value > q.value;
      return p.index < q.index;
    };
    const T* px = xc.data();
    T* pv = values.data();
    Index* pi = indices.data();
    cpu::parallel_for(outer * inner, std::max<index_t>(1, (1 << 13) / n), [&](index_t lo, index_t hi) {
      std::vector<Entry, PoolAllocator<Entry>> buf(static_cast<std::size_t>(n));
      for (index_t line = lo; line < hi; ++line) {
        const index_t o = line / inner, i = line % inner;
        const T* src = px + o * n * inner + i;
        for (index_t j = 0; j < n; ++j) buf[static_cast<std::size_t>(j)] = {src[j * inner], static_cast<Index>(j)};
        std::partial_sort(buf.begin(), buf.begin() + k, buf.end(), before);
        for (index_t j = 0; j < k; ++j) {
          const index_t at = (o * k + j) * inner + i;
          pv[at] = buf[static_cast<std::size_t>(j)].value;
          pi[at] = buf[static_cast<std::size_t>(j)].index;
        }
      }
    });
  }
  // The backward keeps its own copy: the caller owns `indices` and may rewrite them (expert offsets).
  auto backward = [picked = indices.clone(), s, outer, n, inner, k](autograd::BackwardContext<T, D>& ctx) {
    // The k indices of a line are distinct, so every gradient lands on its own element.
    Tensor<T, D> gx = Tensor<T, D>::zeros(s);
    const T* g = ctx.grad_out().data();
    const Index* pi = picked.data();
    T* pgx = gx.data();
    const index_t grain = std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, k * inner));
    cpu::parallel_for(outer, grain, [&](index_t lo, index_t hi) {
      for (index_t o = lo; o < hi; ++o)
        for (index_t j = 0; j < k; ++j)
          for (index_t i = 0; i < inner; ++i) {
            const index_t at = (o * k + j) * inner + i;
            pgx[(o * n + pi[at]) * inner + i] += g[at];
          }
    });
    ctx.accumulate(0, std::move(gx));
  };
  return {record("topk", std::move(values), {x}, std::move(backward)), std::move(indices)};
}

}  // namespace mixmoe
