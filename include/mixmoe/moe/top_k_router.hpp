// Token-choice top-k router: every token picks its k most probable experts.
//
//   x (N, C) token rows, C = d_model, E experts, K experts per token, M = N K assignments
//   weight (E, C), no bias
//   logits = x weight^T (N, E), probs = softmax(logits) over E (N, E)
//   selection: the K largest logits of each row (the K largest probs: softmax is monotonic)
//   gate (M):  renormalised, the selected probs divided by their sum (= softmax over the K
//              selected logits, computed that way: no division by a small sum); or, not
//              renormalised, the selected probs themselves
//   assignments token-major: token 0's K experts in descending order, then token 1's, ...
//
// The gate is differentiable w.r.t. x and the weight through the softmax; the selection
// itself (which experts) is piecewise constant and carries no gradient.
//
// K and renormalisation come from the policy TopK<K, Renormalize>; K = 0 takes k from
// RouterShape::top_k at construction. A policy K > 0 wins over RouterShape::top_k.
// Init: weight ~ N(0, 0.1 / C) (Switch Transformer): near-uniform routing at the start.
#pragma once

#include <string>
#include <utility>

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/matmul.hpp"
#include "mixmoe/ops/shape_ops.hpp"
#include "mixmoe/ops/softmax.hpp"
#include "mixmoe/ops/topk.hpp"

namespace mixmoe {

namespace detail {

/// x weight^T, after checking x against the weight's width (so the error names the router).
template <class T, class D>
Var<T, D> router_logits(const Var<T, D>& x, const Var<T, D>& weight, const char* op) {
  MIXMOE_CHECK(weight.defined(), op, "the router is default-constructed (no weight)");
  check_router_input(x, weight.size(1), op);
  return linear(x, weight);  // (N, E)
}

/// Token-choice selection shared by TopKRouter and SwitchRouter: each row's k largest logits.
template <class T, class D>
Routing<T, D> token_choice(const Var<T, D>& logits, const Var<T, D>& x, index_t k, bool renormalize,
                           index_t num_experts, const char* op) {
  check_router_logits(logits, x, num_experts, op);
  check_top_k(k, num_experts, op);
  const index_t n = logits.size(0);
  Var<T, D> probs = softmax(logits, -1);  // (N, E)
  Tensor<Index, D> picked;                // (N, K)
  {
    no_grad selection_only;  // only the indices are used: the gates come from the softmax below
    picked = topk(logits, k, -1).indices;
  }
  // picked comes from topk over the E columns: in range by construction (no device check, no wait)
  Var<T, D> gate = renormalize ? softmax(gather(logits, 1, picked, IndexCheck::trusted), -1)
                               : gather(probs, 1, picked, IndexCheck::trusted);  // (N, K)
  Routing<T, D> r;
  r.token = repeat_rows<D>(n, k);           // (M)
  r.expert = picked.reshape(Shape{n * k});  // (M)
  r.gate = reshape(gate, Shape{n * k});     // (M)
  r.probs = std::move(probs);
  r.logits = logits;
  r.num_experts = num_experts;
  r.num_tokens = n;
  return r;
}

}  // namespace detail

template <Scalar T, Device D = Cpu, index_t K = 0, bool Renormalize = true>
struct TopKRouter {
  using value_type = T;
  using device_type = D;
  static_assert(K >= 0, "mixmoe: TopK<K>: K must be >= 0 (0 takes k from RouterShape::top_k)");

  TopKRouter() = default;
  /// weight ~ N(0, init_std^2), init_std defaulting to sqrt(0.1 / d_model).
  TopKRouter(const RouterShape& shape, Generator& gen, double init_std = -1.0) : k(K > 0 ? K : shape.top_k) {
    detail::check_router_shape(shape, "TopKRouter");
    detail::check_top_k(k, shape.num_experts, "TopKRouter");
    const double std = init_std >= 0 ? init_std : detail::router_init_std(shape.d_model);
    weight = parameter(Tensor<T, D>::randn({shape.num_experts, shape.d_model}, gen, 0.0, std));
  }

  [[nodiscard]] index_t num_experts() const { return weight.defined() ? weight.size(0) : 0; }
  [[nodiscard]] index_t d_model() const { return weight.defined() ? weight.size(1) : 0; }
  [[nodiscard]] index_t top_k() const { return k; }

  /// x (N, C) -> (N, E)
  Var<T, D> logits(const Var<T, D>& x) const { return detail::router_logits(x, weight, "TopKRouter"); }

  /// Top-k of the given logits (N, E); a wrapper may have added terms to them.
  Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& x, const RouteContext<D>& /*ctx*/) const {
    return detail::token_choice(logits, x, k, renormalize, num_experts(), "TopKRouter");
  }

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const { return select(logits(x), x, ctx); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
  }

  Var<T, D> weight;                // (E, C)
  index_t k = K;                   // experts per token
  bool renormalize = Renormalize;  // gates sum to 1 over a token's k experts
};

/// Policy: token-choice top-k; K = 0 takes k from RouterShape::top_k.
template <index_t K = 0, bool Renormalize = true>
struct TopK {
  template <Scalar T, Device D>
  using bind = TopKRouter<T, D, K, Renormalize>;
};

static_assert(check_logit_router<TopKRouter<float>>());
static_assert(LogitRouter<TopKRouter<double, Cpu, 2, false>>);
static_assert(LogitRouter<bind_router_t<TopK<2>, float, Cpu>>);

}  // namespace mixmoe
