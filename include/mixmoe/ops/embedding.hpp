// Token embedding: rows of a (V, C) table picked by integer ids of any shape.
//
//   V vocabulary size, C channels
//   embedding: weight (V, C), ids (...) -> (..., C)
//
// The backward scatter-adds each output row's gradient into the weight row of its
// id; ids that repeat (the same token twice in a batch) accumulate.
//
// On a device (Cuda) the forward and the backward run there (backend/cuda/index.cuh): the ids
// are range-checked in a kernel whose first bad position is read back (one small copy, a
// synchronisation, per call; the error is the CPU's), and the backward adds with atomics, so a
// float gradient row of a repeated id may differ in its last bits from the CPU's.
#pragma once

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/ops/index.hpp"

namespace mixmoe {

/// out[..., :] = weight[ids[...], :].
template <Scalar T, Device D>
Var<T, D> embedding(const Var<T, D>& weight, const Tensor<Index, D>& ids) {
  MIXMOE_CHECK(weight.dim() == 2, "embedding", "weight must be (V, C), got ", weight.shape());
  MIXMOE_CHECK(ids.dim() < kMaxDims, "embedding", "ids of shape ", ids.shape(),
               " leave no room for the channel axis (at most ", kMaxDims, " axes)");
  const index_t v = weight.size(0), c = weight.size(1);
  const Tensor<Index, D> ic = ids.contiguous();  // (...)
  const Index* pi = ic.data();
  if constexpr (!Tensor<T, D>::on_host) {
    // The first bad id is found on the device and read back (a synchronisation): the price of an
    // error that names it, as on the CPU, instead of an out-of-bounds read.
    detail::require_device_ops<D>();
    const index_t bad = detail::DeviceOps<D>::index_first_out_of_range(pi, ic.numel(), v);
    if (bad >= 0) {
      const Index id = ic.reshape(Shape{ic.numel()})[bad].item();
      detail::fail("embedding", "id ", id, " at position ", detail::index_position(ic.shape(), bad),
                   " is out of range for a vocabulary of V = ", v);
    }
  } else {
    for (index_t i = 0, n = ic.numel(); i < n; ++i)
      MIXMOE_CHECK(pi[i] >= 0 && pi[i] < v, "embedding", "id ", pi[i], " at position ",
                   detail::index_position(ic.shape(), i), " is out of range for a vocabulary of V = ", v);
  }
  Shape oshape = ic.shape();
  oshape.push_back(c);
  const index_t tokens = ic.numel();
  const Tensor<T, D> wc = weight.value().contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(oshape);  // (..., C)
  if constexpr (!Tensor<T, D>::on_host) {
    detail::DeviceOps<D>::index_select_rows(wc.data(), 1, v, c, pi, tokens, out.data());
    return record("embedding", std::move(out), {weight}, [ic, v, c, tokens](autograd::BackwardContext<T, D>& ctx) {
      detail::DeviceOps<D>::index_select_rows_backward(ctx.grad_out().data(), 1, v, c, ic.data(), tokens,
                                                       ctx.grad_in(0).data());
    });
  }
  detail::select_rows(wc.data(), 1, v, c, pi, tokens, out.data());
  return record("embedding", std::move(out), {weight}, [ic, v, c, tokens](autograd::BackwardContext<T, D>& ctx) {
    detail::select_rows_backward(ctx.grad_out().data(), 1, v, c, ic.data(), tokens, ctx.grad_in(0).data());
  });
}

}  // namespace mixmoe
