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
#pragma once

#include <utility>

#include "mixmoe/data/batching.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

/// Logits and the targets that go with them (the same shapes but the last axis of the logits).
template <class LogitsVar>
struct SupervisedLogits {
  LogitsVar logits;
  Tensor<Index> targets;
};

/// True when `model` has hidden(ids) -> (B, T, C) and logits(h) -> (..., V).
template <class Model>
concept ProjectsHiddenStates = requires(const Model& m, const Tensor<Index>& ids) { m.logits(m.hidden(ids)); };

/// The logits of `batch`'s supervised positions; see the header comment.
template <class Model>
auto supervised_logits(const Model& model, const Batch& batch, Index ignore_index = -100) {
  using LogitsVar = decltype(model(batch.inputs));
  if constexpr (ProjectsHiddenStates<Model>) {
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
      auto h = model.hidden(batch.inputs);  // (B, T, C)
      const index_t c = h.shape()[h.shape().rank() - 1];
      auto picked = index_select(reshape(h, Shape{n, c}), 0, rows);  // (N, C)
      return SupervisedLogits<LogitsVar>{model.logits(picked), std::move(kept)};
    }
  }
  return SupervisedLogits<LogitsVar>{model(batch.inputs), batch.targets};
}

}  // namespace mixmoe
