// Token embedding: rows of a (V, C) table picked by integer ids of any shape.
//
//   V vocabulary size, C channels
//   embedding: weight (V, C), ids (...) -> (..., C)
//
// The backward scatter-adds each output row's gradient into the weight row of its
// id; ids that repeat (the same token twice in a batch) accumulate.
//
// On a device (Cuda) the forward and the backward run there (backend/cuda/index.cuh), and the
// backward adds with atomics, so a float gradient row of a repeated id may differ in its last bits
// from the CPU's. The ids are range-checked as IndexCheck says (ops/index.hpp): by default the
// first bad position is read back at once (one small copy, a synchronisation, per call);
// IndexCheck::deferred (what nn::Embedding uses) waits for nothing and the next synchronisation
// throws the same error, the output rows of bad ids being NaN meanwhile. The CPU checks at once.
#pragma once

#include <sstream>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/ops/index.hpp"

namespace mixmoe {

/// out[..., :] = weight[ids[...], :].
template <Scalar T, Device D>
Var<T, D> embedding(const Var<T, D>& weight, const Tensor<Index, D>& ids, IndexCheck check = IndexCheck::checked) {
  MIXMOE_CHECK(weight.dim() == 2, "embedding", "weight must be (V, C), got ", weight.shape());
  MIXMOE_CHECK(ids.dim() < kMaxDims, "embedding", "ids of shape ", ids.shape(),
               " leave no room for the channel axis (at most ", kMaxDims, " axes)");
  const index_t v = weight.size(0), c = weight.size(1);
  const Tensor<Index, D> ic = ids.contiguous();  // (...)
  const Index* pi = ic.data();
  detail::check_indices(ic, v, check, [v, ishape = ic.shape()](long long at, long long id) {
    std::ostringstream os;
    os << "[embedding] id " << id << " at position " << detail::index_position(ishape, at)
       << " is out of range for a vocabulary of V = " << v;
    return os.str();
  });
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
