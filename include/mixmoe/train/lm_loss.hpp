// The logits a language-model loss needs, and only those.
//
//   supervised_logits(model, batch, ignore_index) -> {logits (N, V) or (B, T, V), targets}
//
// In a translation batch the prompt and padding positions carry no loss (their targets are
// ignore_index): about half of all positions. Their logits are never used, yet a plain
// model(inputs) projects every position onto the whole vocabulary, which is the largest single
// GEMM of a small model and its widest softmax. When the model exposes hidden() and logits()
// (DecoderLM does), this computes the hidden states of every position, picks the rows whose target
// counts, and projects only those: the loss and every gradient are those of model(inputs) followed
// by cross_entropy with ignore_index (the ignored positions contribute nothing to either), at a
// fraction of the head's cost. Batches whose positions all count (language-model blocks), and
// models without hidden()/logits(), take the plain path.
//
// A model on a device (Model::device_type, e.g. Cuda) gets the batch's token ids copied to the
// device, and the returned targets are a device tensor too; the supervised positions are found on
// the host, where the batch is, and their row numbers copied up (a few small uploads per batch).
#pragma once

#include <type_traits>
#include <utility>

#include "mixmoe/data/batching.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

namespace detail {

/// The device of a model's parameters: Model::device_type, or Cpu for a model that does not say.
template <class Model, class = void>
struct lm_model_device {
  using type = Cpu;
};
template <class Model>
struct lm_model_device<Model, std::void_t<typename Model::device_type>> {
  using type = typename Model::device_type;
};

}  // namespace detail

/// Logits and the targets that go with them (the same shapes but the last axis of the logits), on
/// the logits' device.
template <class LogitsVar>
struct SupervisedLogits {
  LogitsVar logits;
  Tensor<Index, typename LogitsVar::device_type> targets;
};

/// True when `model` has hidden(ids) -> (B, T, C) and logits(h) -> (..., V), for ids on device D.
template <class Model, class D = Cpu>
concept ProjectsHiddenStates = requires(const Model& m, const Tensor<Index, D>& ids) { m.logits(m.hidden(ids)); };

/// The logits of `batch`'s supervised positions; see the header comment.
template <class Model>
auto supervised_logits(const Model& model, const Batch& batch, Index ignore_index = -100) {
  using MD = typename detail::lm_model_device<Model>::type;
  const Tensor<Index, MD> inputs = to_device<MD>(batch.inputs);  // the batch itself on Cpu
  using LogitsVar = decltype(model(inputs));
  if constexpr (ProjectsHiddenStates<Model, MD>) {
    const index_t n = batch.targets.numel();
    if (batch.target_tokens > 0 && batch.target_tokens < n) {
      const Tensor<Index> flat = batch.targets.contiguous().reshape(Shape{n});
      Tensor<Index> rows = Tensor<Index>::empty({batch.target_tokens});
      Tensor<Index> kept = Tensor<Index>::empty({batch.target_tokens});
      const Index* t = flat.data();
      index_t m = 0;
      for (index_t i = 0; i < n; ++i)
        if (t[i] != ignore_index) {
          MIXMOE_CHECK(m < batch.target_tokens, "supervised_logits", "the batch has more targets than its target_tokens (",
                       batch.target_tokens, ")");
          rows.data()[m] = static_cast<Index>(i);
          kept.data()[m] = t[i];
          ++m;
        }
      MIXMOE_CHECK(m == batch.target_tokens, "supervised_logits", "the batch has ", m,
                   " targets that are not ignore_index, but its target_tokens says ", batch.target_tokens);
      auto h = model.hidden(inputs);  // (B, T, C)
      const index_t c = h.shape()[h.shape().rank() - 1];
      // rows < n by construction: a device need not check them (nor wait for the check)
      auto picked = index_select(reshape(h, Shape{n, c}), 0, to_device<MD>(rows), IndexCheck::trusted);  // (N, C)
      return SupervisedLogits<LogitsVar>{model.logits(picked), to_device<MD>(kept)};
    }
  }
  return SupervisedLogits<LogitsVar>{model(inputs), to_device<MD>(batch.targets)};
}

}  // namespace mixmoe
