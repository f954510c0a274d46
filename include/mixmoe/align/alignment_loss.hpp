// RA-MoE's routing alignment loss: on correctable (ci) examples, pull the target-language
// routing of the alignment zone towards the English routing of the same item, on the task
// experts.
//
//   r_tgt[b] (E)  per-example mean routing of the target-language forward (with graph)
//   r_en[b]  (E)  the same of the English forward of item b (a constant: stop-gradient)
//   A_s           task experts of zone slot s (align/task_experts.hpp)
//
//   L_mass(b, s)  = (sum_{k in A_s} r_tgt[b, k] - sum_{k in A_s} r_en[b, k])^2
//   L_alloc(b, s) = KL(p || q) = sum_{k in A_s} p_k (log p_k - log q_k),
//                   p = normalise(r_en[b] | A_s), q = normalise(r_tgt[b] | A_s)
//   L_align = lambda / Z * sum_{b : ci[b]} sum_{s in zone, A_s not empty} (L_mass + beta * L_alloc)
//
// Averaging (Z, AlignmentAverage):
//   ci_examples  (default) Z = number of ci examples of the batch: the mean per correctable
//                example, so lambda keeps its meaning whatever share of the batch is ci;
//   all_examples Z = B: the per-example formula L = L_task + lambda 1[ci] sum_s (...) averaged over
//                the batch like the task loss, so the term shrinks with the ci share.
// Either way the sum runs over zone slots (not averaged over them).
//
// Edge cases: a slot outside the zone, or with an empty A_s, adds nothing; a batch without ci
// examples gives a constant 0 (no graph), so `task_loss + align_loss` is always valid. With a
// single task expert L_alloc is 0 (both normalised distributions are 1).
//
// Epsilon: the normalised distributions are smoothed,
//   p_k = (r_en[b, k] + eps) / (sum_{j in A} r_en[b, j] + |A| eps), q_k likewise from r_tgt,
// so that log q_k stays finite when the router gives a task expert (almost) no mass, and the
// gradient -p_k / (r_tgt[b, k] + eps) + 1 / (sum_A r_tgt + |A| eps) stays bounded by 1/eps.
// eps must be > 0 (default 1e-6, negligible next to probabilities that sum to 1 over the
// experts). L_mass uses the raw sums.
//
// Usage with a model built with the library (one training step on a batch of ci and other items):
//
//   auto en = english_reference_routing(model, en_batch.inputs, en_rows);   // no_grad forward, first
//   auto logits = model(tgt_batch.inputs);                                    // its own statement
//   auto loss = cross_entropy(logits, tgt_batch.targets)
//             + routing_alignment_loss(model, tgt_rows, en, task_experts, zone_slots, ci_mask, {.lambda = 0.1});
//
// In a loop whose extra loss runs after the target-language forward (train/loop.hpp), the
// English forward comes second instead:
//
//   auto logits = model(tgt_batch.inputs);
//   auto loss = cross_entropy(logits, tgt_batch.targets)
//             + routing_alignment_loss_with_english_forward(model, tgt_rows, en_batch.inputs, en_rows,
//                                                           task_experts, zone_slots, ci_mask, {.lambda = 0.1});
//
// The model-level forms read the last forward's routing records once (like load_balance_loss:
// reading them twice, or after release_routing_graphs, is an error).
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "mixmoe/align/routing_capture.hpp"
#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/autograd/var.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/elementwise.hpp"

namespace mixmoe {

enum class AlignmentAverage { ci_examples, all_examples };

struct AlignmentLossOptions {
  double lambda = 1.0;    // weight of the whole term
  double beta = 1.0;      // weight of L_alloc against L_mass
  double epsilon = 1e-6;  // smoothing of the normalised distributions in the KL (> 0)
  AlignmentAverage average = AlignmentAverage::ci_examples;
};

/// The bit RoutingRecord::read_by_losses uses for the routing alignment loss.
inline constexpr unsigned kRoutingAlignmentLossBit = 4u;

/// sum over the ci examples of one slot of L_mass + beta * L_alloc (a scalar, not averaged).
///   target (B, E) with graph; english (B, E) values; experts: the slot's task set; ci (B).
template <Scalar T, Device D>
Var<T, D> routing_alignment_slot_loss(const Var<T, D>& target, const Tensor<T, D>& english,
                                      const std::vector<index_t>& experts, std::span<const unsigned char> ci,
                                      double beta = 1.0, double epsilon = 1e-6) {
  constexpr const char* where = "routing_alignment_loss";
  detail::require_host<D>();  // host loops; the RA-MoE ops run on Cpu tensors (docs/cuda.md)
  MIXMOE_CHECK(target.defined() && target.dim() == 2, where, "the target-language routing must be (B, E), got ",
               target.defined() ? target.shape().to_string() : std::string("an undefined Var"));
  const index_t b_count = target.size(0), e_count = target.size(1);
  MIXMOE_CHECK(english.dim() == 2 && english.size(0) == b_count && english.size(1) == e_count, where,
               "the English routing ", english.shape(), " does not match the target-language routing ", target.shape(),
               " (the items must be parallel)");
  MIXMOE_CHECK(static_cast<index_t>(ci.size()) == b_count, where, "the ci mask has ", ci.size(), " entries for ",
               b_count, " examples");
  MIXMOE_CHECK(std::isfinite(epsilon) && epsilon > 0, where, "epsilon must be > 0, got ", epsilon);
  MIXMOE_CHECK(std::isfinite(beta), where, "beta must be finite, got ", beta);
  for (std::size_t i = 0; i < experts.size(); ++i) {
    MIXMOE_CHECK(experts[i] >= 0 && experts[i] < e_count, where, "task expert ", experts[i], " is outside the ",
                 e_count, " experts of the slot");
    for (std::size_t j = 0; j < i; ++j)
      MIXMOE_CHECK(experts[i] != experts[j], where, "task expert ", experts[i], " is listed twice");
  }
  const Tensor<T, D> tv = target.value().contiguous(), ev = english.contiguous();
  const auto a_count = static_cast<double>(experts.size());
  // Per ci example: 2 (s_t - s_e), p_k, and 1 / (s_t + |A| eps), kept for the backward.
  std::vector<index_t> rows;
  std::vector<double> mass_grad, p, inv_norm_t;
  double total = 0;
  for (index_t b = 0; b < b_count && !experts.empty(); ++b) {
    if (!ci[static_cast<std::size_t>(b)]) continue;
    const T* rt = tv.data() + b * e_count;
    const T* re = ev.data() + b * e_count;
    double st = 0, se = 0;
    for (index_t k : experts) {
      const double t = static_cast<double>(rt[k]), e = static_cast<double>(re[k]);
      MIXMOE_CHECK(t + epsilon > 0 && e + epsilon > 0, where, "example ", b, ", expert ", k,
                   ": routing probabilities must be >= 0, got ", t, " (target) and ", e, " (English)");
      st += t;
      se += e;
    }
    const double zt = st + a_count * epsilon, ze = se + a_count * epsilon;
    double kl = 0;
    for (index_t k : experts) {
      const double pk = (static_cast<double>(re[k]) + epsilon) / ze;
      const double qk = (static_cast<double>(rt[k]) + epsilon) / zt;
      kl += pk * (std::log(pk) - std::log(qk));
      p.push_back(pk);
    }
    total += (st - se) * (st - se) + beta * kl;
    rows.push_back(b);
    mass_grad.push_back(2 * (st - se));
    inv_norm_t.push_back(1 / zt);
  }
  auto out = Tensor<T, D>::scalar(static_cast<T>(total));
  if (rows.empty()) return Var<T, D>(std::move(out), false);
  return record(
      "routing_alignment_loss", std::move(out), {target},
      [tv, rows = std::move(rows), mass_grad = std::move(mass_grad), p = std::move(p),
       inv_norm_t = std::move(inv_norm_t), experts, e_count, beta, epsilon](autograd::BackwardContext<T, D>& ctx) {
        if (!ctx.needs_grad(0)) return;
        const double g = static_cast<double>(ctx.grad_out().item());
        T* gt = ctx.grad_in(0).data();
        const T* t = tv.data();
        std::size_t pi = 0;
        for (std::size_t r = 0; r < rows.size(); ++r) {
          const index_t b = rows[r];
          for (index_t k : experts) {
            // d/dr_k [(s_t - s_e)^2 + beta KL(p || q)] = 2 (s_t - s_e) + beta (1/Z_t - p_k/(r_k + eps))
            const double rk = static_cast<double>(t[b * e_count + k]);
            const double d = mass_grad[r] + beta * (inv_norm_t[r] - p[pi++] / (rk + epsilon));
            gt[b * e_count + k] += static_cast<T>(g * d);
          }
        }
      });
}

namespace detail {

inline index_t count_ci(std::span<const unsigned char> ci) {
  index_t n = 0;
  for (unsigned char c : ci) n += c ? 1 : 0;
  return n;
}

}  // namespace detail

/// The routing alignment loss of a batch (see the header comment).
///   target:  [slot] (B, E_s) per-example mean routing of the target-language forward, with graph
///   english: [slot] (B, E_s) the same of the English forward; only its values are used
///   experts: [slot] task sets; zone_slots: the slots the loss covers; ci: (B) 1 for ci examples
template <Scalar T, Device D>
Var<T, D> routing_alignment_loss(const std::vector<Var<T, D>>& target, const std::vector<Var<T, D>>& english,
                                 const ExpertSets& experts, const std::vector<index_t>& zone_slots,
                                 std::span<const unsigned char> ci, const AlignmentLossOptions& opt = {}) {
  constexpr const char* where = "routing_alignment_loss";
  MIXMOE_CHECK(target.size() == english.size() && target.size() == experts.size(), where, target.size(),
               " target-language slots, ", english.size(), " English slots and ", experts.size(),
               " task expert sets: they must be the same model's slots");
  MIXMOE_CHECK(std::isfinite(opt.lambda), where, "lambda must be finite, got ", opt.lambda);
  const index_t b_count = target.empty() ? static_cast<index_t>(ci.size()) : target.front().size(0);
  MIXMOE_CHECK(static_cast<index_t>(ci.size()) == b_count, where, "the ci mask has ", ci.size(), " entries for ",
               b_count, " examples");
  const index_t n_ci = detail::count_ci(ci);
  Var<T, D> total;
  for (std::size_t z = 0; z < zone_slots.size(); ++z) {
    const index_t s = zone_slots[z];
    MIXMOE_CHECK(s >= 0 && s < static_cast<index_t>(target.size()), where, "zone slot ", s, " is outside the ",
                 target.size(), " slots");
    for (std::size_t y = 0; y < z; ++y) MIXMOE_CHECK(zone_slots[y] != s, where, "zone slot ", s, " is listed twice");
    const auto si = static_cast<std::size_t>(s);
    if (experts[si].empty() || n_ci == 0) continue;
    MIXMOE_CHECK(english[si].defined(), where, "the English routing of slot ", s, " is undefined");
    Var<T, D> term =
        routing_alignment_slot_loss(target[si], english[si].value(), experts[si], ci, opt.beta, opt.epsilon);
    total = total.defined() ? total + term : term;
  }
  if (!total.defined()) return Var<T, D>(Tensor<T, D>::scalar(T(0)));
  const index_t z = opt.average == AlignmentAverage::ci_examples ? n_ci : b_count;
  return total * (opt.lambda / static_cast<double>(z));
}

/// The same from two captures (align/routing_capture.hpp) of parallel batches.
template <Scalar T, Device D>
Var<T, D> routing_alignment_loss(const ExampleRouting<T, D>& target, const ExampleRouting<T, D>& english,
                                 const ExpertSets& experts, const std::vector<index_t>& zone_slots,
                                 std::span<const unsigned char> ci, const AlignmentLossOptions& opt = {}) {
  MIXMOE_CHECK(target.slots == english.slots, "routing_alignment_loss",
               "the target-language and English captures come from different router slots");
  return routing_alignment_loss(target.mean, english.mean, experts, zone_slots, ci, opt);
}

/// The English side: runs model(inputs) under no_grad and captures its per-example mean routing
/// (values only). Run it BEFORE the target-language forward: it replaces the routing records.
template <class Model, class Input>
auto english_reference_routing(const Model& model, const Input& inputs, const RowMap& rows) {
  no_grad guard;
  (void)model(inputs);
  return capture_example_routing(model, rows).detached();
}

/// The loss on the model's last forward (the target-language batch, rows mapped by `rows`).
/// Reads that forward's routing records once: a second call before the next forward, or a call
/// after release_routing_graphs, is an error.
template <Module Model>
Var<typename Model::value_type, typename Model::device_type> routing_alignment_loss(
    const Model& model, const RowMap& rows,
    const ExampleRouting<typename Model::value_type, typename Model::device_type>& english, const ExpertSets& experts,
    const std::vector<index_t>& zone_slots, std::span<const unsigned char> ci, const AlignmentLossOptions& opt = {}) {
  constexpr const char* where = "routing_alignment_loss";
  // Check every record before marking any, so a refused call leaves them as they were.
  detail::for_each_routing_record(model, where, [&](index_t layer, const auto& rec) {
    MIXMOE_CHECK(!rec.graph_released, where, "the routing graph of MoE layer ", layer, " (", rec.name,
                 ") was released (release_routing_graphs): run a forward pass first");
    MIXMOE_CHECK(!(rec.read_by_losses & kRoutingAlignmentLossBit), where, "the routing of MoE layer ", layer, " (",
                 rec.name,
                 ") was already used by this loss: run a forward pass first (in its own statement: in "
                 "`cross_entropy(model(x), y) + loss(model)` C++ may evaluate the loss first)");
  });
  auto target = capture_example_routing(model, rows);
  detail::for_each_routing_record(model, where,
                                  [&](index_t, const auto& rec) { rec.read_by_losses |= kRoutingAlignmentLossBit; });
  return routing_alignment_loss(target, english, experts, zone_slots, ci, opt);
}

/// The loss for a training step whose target-language forward has just run (a training loop's
/// extra loss, train/loop.hpp): captures that forward's routing with its graph, THEN runs the
/// English forward model(english_inputs) under no_grad for the reference (row b of both batches is
/// item b), and returns the loss. The English forward replaces the routing records; the captured
/// target-language routing keeps its graph. Without ci examples or task experts in the zone the
/// English forward is skipped and the loss is a constant 0. Marks the target forward's records
/// read, like the model-level routing_alignment_loss.
template <Module Model, class Input>
Var<typename Model::value_type, typename Model::device_type> routing_alignment_loss_with_english_forward(
    const Model& model, const RowMap& rows, const Input& english_inputs, const RowMap& english_rows,
    const ExpertSets& experts, const std::vector<index_t>& zone_slots, std::span<const unsigned char> ci,
    const AlignmentLossOptions& opt = {}) {
  constexpr const char* where = "routing_alignment_loss";
  detail::for_each_routing_record(model, where, [&](index_t layer, const auto& rec) {
    MIXMOE_CHECK(!rec.graph_released, where, "the routing graph of MoE layer ", layer, " (", rec.name,
                 ") was released (release_routing_graphs): run a forward pass first");
    MIXMOE_CHECK(!(rec.read_by_losses & kRoutingAlignmentLossBit), where, "the routing of MoE layer ", layer, " (",
                 rec.name, ") was already used by this loss: run a forward pass first");
  });
  auto target = capture_example_routing(model, rows);
  detail::for_each_routing_record(model, where,
                                  [&](index_t, const auto& rec) { rec.read_by_losses |= kRoutingAlignmentLossBit; });
  MIXMOE_CHECK(english_rows.num_examples == rows.num_examples, where, "the English batch has ",
               english_rows.num_examples, " items, the target-language batch ", rows.num_examples);
  bool any_set = false;
  for (index_t s : zone_slots)
    if (s >= 0 && s < static_cast<index_t>(experts.size()) && !experts[static_cast<std::size_t>(s)].empty())
      any_set = true;
  if (detail::count_ci(ci) == 0 || !any_set) {
    MIXMOE_CHECK(static_cast<index_t>(ci.size()) == rows.num_examples, where, "the ci mask has ", ci.size(),
                 " entries for ", rows.num_examples, " examples");
    return Var<typename Model::value_type, typename Model::device_type>(
        Tensor<typename Model::value_type, typename Model::device_type>::scalar(0));
  }
  const auto english = english_reference_routing(model, english_inputs, english_rows);
  return routing_alignment_loss(target, english, experts, zone_slots, ci, opt);
}

}  // namespace mixmoe
