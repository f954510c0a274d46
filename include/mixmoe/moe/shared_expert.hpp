// SharedExpertMoE<MoE, Expert, Gated>: an MoE layer plus one always-on shared expert, a drop-in
// FFN of DecoderLM (the Qwen2-MoE / Qwen1.5-MoE block).
//
//   x (N, C) -> (N, C)
//   y = moe(x) + g(x) * shared(x)
//   g(x) = sigmoid(x w^T) (N, 1), w (1, C) "shared_expert_gate.weight"    Gated = true
//   g(x) = 1                                                             Gated = false
//
// Every token goes through the shared expert (no routing, no capacity); the routed experts are
// the MoE layer's. Sizes: the MoE layer is built from the ModelConfig as usual (its experts'
// width is moe.expert_hidden, or d_ff / experts), the shared expert is an Expert of width
// cfg.d_ff. So a checkpoint whose routed and shared widths differ sets moe.expert_hidden to
// the routed width and d_ff to the shared one.
//
// Parameter names: the MoE layer's own names at the layer's prefix ("router.weight",
// "generic.experts.3.w_up.weight", ...), then "shared_expert.*" and "shared_expert_gate.weight".
// visit_moe_layers finds the inner MoE layer (routing records, auxiliary losses, statistics).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <string>
#include <type_traits>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/unary.hpp"

namespace mixmoe {

template <class MoE, class Expert, bool Gated = true>
struct SharedExpertMoE {
  using value_type = typename MoE::value_type;
  using device_type = typename MoE::device_type;
  using T = value_type;
  using D = device_type;
  static_assert(std::is_same_v<typename Expert::value_type, T> && std::is_same_v<typename Expert::device_type, D>,
                "SharedExpertMoE<MoE, Expert>: the MoE layer and the shared expert must have the same scalar type "
                "and device");
  static_assert(std::constructible_from<MoE, const ModelConfig&, Generator&>,
                "SharedExpertMoE<MoE, Expert>: MoE must be constructible from (const ModelConfig&, Generator&)");
  static constexpr bool gated = Gated;

  SharedExpertMoE() = default;
  /// The MoE layer from cfg, then the shared expert (width cfg.d_ff) and its gate, drawn from gen in that order.
  SharedExpertMoE(const ModelConfig& cfg, Generator& gen) : moe(cfg, gen), d_model_(cfg.d_model) {
    MIXMOE_CHECK(cfg.d_ff > 0, "SharedExpertMoE", "the shared expert's width d_ff must be positive, got ", cfg.d_ff);
    const double out_std = cfg.init_std / std::sqrt(2.0 * static_cast<double>(std::max<index_t>(cfg.layers, 1)));
    if constexpr (std::constructible_from<Expert, index_t, index_t, Generator&, double>)
      shared_expert = Expert(cfg.d_model, cfg.d_ff, gen, out_std);
    else
      shared_expert = Expert(cfg.d_model, cfg.d_ff, gen);
    if constexpr (Gated) shared_expert_gate = Linear<T, D>(cfg.d_model, 1, false, gen);
  }

  /// x (N, C) -> (N, C).
  Var<T, D> operator()(const Var<T, D>& x) const { return (*this)(x, RouteContext<D>{}); }

  /// x (N, C) -> (N, C), with the routing information the MoE layer takes.
  Var<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const {
    MIXMOE_CHECK(d_model_ > 0, "SharedExpertMoE", "the layer is default-constructed: build it from a ModelConfig");
    MIXMOE_CHECK(x.defined() && x.dim() == 2 && x.size(1) == d_model_, "SharedExpertMoE", "input must be (N, ",
                 d_model_, "), got ", x.defined() ? x.shape().to_string() : std::string("an undefined Var"));
    Var<T, D> routed;
    if constexpr (std::is_invocable_v<const MoE&, const Var<T, D>&, const RouteContext<D>&>)
      routed = moe(x, ctx);
    else
      routed = moe(x);
    Var<T, D> shared = shared_expert(x);                                    // (N, C)
    if constexpr (Gated) shared = sigmoid(shared_expert_gate(x)) * shared;  // (N, 1) * (N, C)
    return routed + shared;
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    moe.visit_parameters(visit, prefix);
    shared_expert.visit_parameters(visit, join_name(prefix, "shared_expert"));
    if constexpr (Gated) shared_expert_gate.visit_parameters(visit, join_name(prefix, "shared_expert_gate"));
  }

  /// The MoE layers inside: the routed one.
  template <class F>
  void visit_moe_layers(F&& f) {
    mixmoe::visit_moe_layers(moe, f);
  }
  template <class F>
  void visit_moe_layers(F&& f) const {
    mixmoe::visit_moe_layers(moe, f);
  }

  [[nodiscard]] index_t d_model() const { return d_model_; }

  MoE moe;                          // the routed experts
  Expert shared_expert;             // (C) -> (C), width d_ff, every token
  Linear<T, D> shared_expert_gate;  // (1, C) weight; Gated only

 private:
  index_t d_model_ = 0;
};

/// True for SharedExpertMoE types.
template <class L>
inline constexpr bool is_shared_expert_moe_v = false;
template <class MoE, class Expert, bool Gated>
inline constexpr bool is_shared_expert_moe_v<SharedExpertMoE<MoE, Expert, Gated>> = true;

}  // namespace mixmoe
