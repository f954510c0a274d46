// What losses and statistics need of an MoE layer, and how they find the layers of a model.
//
//   N tokens, E experts of one router, M assignments
//
// An MoE layer keeps, per router, the routing of its LAST forward call (a
// RoutingRecord): the losses (loss/load_balance.hpp) and the statistics
// (moe/routing_stats.hpp) read it after the forward and before the next one. With
// gradient accumulation over micro-batches, add the auxiliary losses after every
// forward, not once per step. Run the forward in a statement of its own: in
//   cross_entropy(model(x), y) + load_balance_loss(model)
// C++ may evaluate either operand first (GCC evaluates the loss first), so the loss
// would read the previous forward's routing; the model-level losses refuse that.
//
// Memory: the recorded probs and logits keep their graph (and through it the forward's
// activations) alive until the layer's next forward. A trainer that wants that memory
// back as soon as the step is done calls release_routing_graphs(model) after backward:
// the values stay (statistics still work), the graph goes.
//
// A model exposes its MoE layers with a member
//   template <class F> void visit_moe_layers(F&& f);        // and a const overload
// that calls visit_moe_layers(sub, f) on its sub-modules (an MoE layer's own member
// calls f(*this)). visit_moe_layers(model, f) below uses that member when there is
// one; otherwise it looks inside `blocks` (a range of blocks) and `ffn` members, the
// layout of DecoderLM/DecoderBlock, so those work without a member of their own.
#pragma once

#include <concepts>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/moe/dispatch.hpp"
#include "mixmoe/moe/routing.hpp"

namespace mixmoe {

/// The routing of one router in an MoE layer's last forward, with its dispatch counts.
template <Scalar T, Device D = Cpu>
struct RoutingRecord {
  std::string name;       // the router's parameter prefix inside the layer: "router", "router.lm", ...
  Routing<T, D> routing;  // as the router returned it (probs and logits keep their graph until the next forward)
  index_t capacity = 0;   // per-expert capacity; 0 = dropless
  // The dispatch plan's row counts, shared with the plan. On a device they are read back from the
  // GPU on the first call of routed(), kept() or dropped() (one small copy), not in the forward.
  std::shared_ptr<detail::PlanCounts<D>> counts;
  // Model-level auxiliary losses mark what they have read (one bit per loss), so that reading
  // one forward's routing twice, or a previous step's, is an error instead of a stale loss.
  mutable unsigned read_by_losses = 0;
  bool graph_released = false;  // release_graph() ran: values only, no gradient to take

  /// (E) assignments sent to each expert, dropped ones included.
  [[nodiscard]] const IndexList& routed() const { return host().routed; }
  /// (E) assignments each expert processed.
  [[nodiscard]] IndexList kept() const {
    const IndexList& off = host().offsets;
    IndexList k(off.size() > 0 ? off.size() - 1 : 0);
    for (std::size_t e = 0; e < k.size(); ++e) k[e] = off[e + 1] - off[e];
    return k;
  }
  /// Assignments over capacity.
  [[nodiscard]] index_t dropped() const { return host().dropped; }

  /// Keeps the values of gate, probs and logits and lets go of their graph.
  void release_graph() {
    for (Var<T, D>* v : {&routing.gate, &routing.probs, &routing.logits})
      if (v->defined()) *v = v->detach();
    graph_released = true;
  }

 private:
  const detail::PlanCounts<D>& host() const {
    MIXMOE_CHECK(counts != nullptr, "RoutingRecord", "record '", name, "' has no dispatch counts");
    return counts->host();
  }
};

/// A layer whose last forward's routings can be read: routing_records() const.
template <class L>
concept MoELayer = requires(const L& layer) {
  typename L::value_type;
  typename L::device_type;
  {
    layer.routing_records()
    } -> std::convertible_to<const std::vector<RoutingRecord<typename L::value_type, typename L::device_type>>&>;
};

/// Calls f(layer) for every MoE layer of `model` (a model, a block or a layer), in forward order.
template <class Model, class F>
void visit_moe_layers(Model& model, F&& f) {
  using M = std::remove_const_t<Model>;
  if constexpr (requires { model.visit_moe_layers(f); }) {
    model.visit_moe_layers(f);
  } else if constexpr (MoELayer<M>) {
    f(model);
  } else if constexpr (requires { model.blocks.begin(); }) {
    for (auto& block : model.blocks) visit_moe_layers(block, f);
  } else if constexpr (requires { model.ffn; }) {
    visit_moe_layers(model.ffn, f);
  }
  // anything else (a dense FFN, attention, ...) has no MoE layer
}

/// Lets go of the graph held by every MoE layer's last routing (values kept for statistics);
/// call it after backward. Layers without release_routing_graph() are left alone.
template <class Model>
void release_routing_graphs(Model& model) {
  visit_moe_layers(model, [](auto& layer) {
    if constexpr (requires { layer.release_routing_graph(); }) layer.release_routing_graph();
  });
}

/// Number of MoE layers of a model.
template <class Model>
index_t count_moe_layers(Model& model) {
  index_t n = 0;
  visit_moe_layers(model, [&](auto&) { ++n; });
  return n;
}

}  // namespace mixmoe
