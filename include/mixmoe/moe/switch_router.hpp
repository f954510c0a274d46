// Switch router (Switch Transformer): every token goes to its single most probable expert.
//
//   x (N, C) token rows, C = d_model, E experts, M = N assignments
//   weight (E, C), no bias
//   logits = x weight^T (N, E), probs = softmax(logits) over E (N, E)
//   gate (M) = the top probability itself, not renormalised (renormalising one prob would give 1
//              and no gradient to the router): the expert's output is scaled by the router's
//              confidence, which is how the router learns
//   assignments: token i is assignment i
//
// Always top-1, whatever RouterShape::top_k says (an MoE layer's default top_k of 2 does not
// turn Switch into top-2). Init: weight ~ N(0, 0.1 / C), as in the Switch Transformer.
// The same routing is TopK<1, false>; this type exists under its own name for the
// configurations and checkpoints that name it.
#pragma once

#include <string>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/moe/top_k_router.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

template <Scalar T, Device D = Cpu>
struct SwitchRouter {
  using value_type = T;
  using device_type = D;

  SwitchRouter() = default;
  /// weight ~ N(0, init_std^2), init_std defaulting to sqrt(0.1 / d_model).
  SwitchRouter(const RouterShape& shape, Generator& gen, double init_std = -1.0) {
    detail::check_router_shape(shape, "SwitchRouter");
    const double std = init_std >= 0 ? init_std : detail::router_init_std(shape.d_model);
    weight = parameter(Tensor<T, D>::randn({shape.num_experts, shape.d_model}, gen, 0.0, std));
  }

  [[nodiscard]] index_t num_experts() const { return weight.defined() ? weight.size(0) : 0; }
  [[nodiscard]] index_t d_model() const { return weight.defined() ? weight.size(1) : 0; }
  [[nodiscard]] static constexpr index_t top_k() { return 1; }

  /// x (N, C) -> (N, E)
  Var<T, D> logits(const Var<T, D>& x) const { return detail::router_logits(x, weight, "SwitchRouter"); }

  /// Top-1 of the given logits (N, E), gate = its probability.
  Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& x, const RouteContext<D>& /*ctx*/) const {
    return detail::token_choice(logits, x, 1, false, num_experts(), "SwitchRouter");
  }

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const { return select(logits(x), x, ctx); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
  }

  Var<T, D> weight;  // (E, C)
};

/// Policy: Switch top-1 routing.
struct Switch {
  template <Scalar T, Device D>
  using bind = SwitchRouter<T, D>;
};

static_assert(check_logit_router<SwitchRouter<float>>());
static_assert(LogitRouter<bind_router_t<Switch, double, Cpu>>);

}  // namespace mixmoe
