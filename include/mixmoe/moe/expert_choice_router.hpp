// Expert-choice router (Zhou et al., 2022): every expert picks its c most probable tokens.
//
//   x (N, C) token rows, C = d_model, E experts, k = RouterShape::top_k (average experts per token)
//   c = min(N, ceil(N k f / E)) tokens per expert (the capacity; f = capacity_factor, default 1)
//   M = E c assignments
//   weight (E, C), no bias
//   logits = x weight^T (N, E), probs = softmax(logits) over E for each token (N, E)
//   selection: for each expert e, the c tokens with the largest probs[:, e] (ties: lower token first)
//   gate (M) = probs[token, e], not renormalised
//   assignments expert-major: expert 0's c tokens in descending prob, then expert 1's, ...
//
// Every expert gets exactly c tokens (perfect load balance by construction); a token may get
// 0..E experts, so some tokens are dropped (their MoE output is zero: the residual carries them).
// The softmax runs over experts per token, as in the paper's S = softmax(X W); the choice is
// then made across tokens, so a token's routing depends on the other tokens of the batch:
// not causal, and not usable token by token in incremental decoding.
// Init: weight ~ N(0, 0.1 / C), as the other routers.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/moe/top_k_router.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/shape_ops.hpp"
#include "mixmoe/ops/softmax.hpp"
#include "mixmoe/ops/topk.hpp"

namespace mixmoe {

template <Scalar T, Device D = Cpu>
struct ExpertChoiceRouter {
  using value_type = T;
  using device_type = D;

  ExpertChoiceRouter() = default;
  /// weight ~ N(0, init_std^2), init_std defaulting to sqrt(0.1 / d_model).
  ExpertChoiceRouter(const RouterShape& shape, Generator& gen, double init_std = -1.0) : k(shape.top_k) {
    detail::check_router_shape(shape, "ExpertChoiceRouter");
    detail::check_top_k(k, shape.num_experts, "ExpertChoiceRouter");
    const double std = init_std >= 0 ? init_std : detail::router_init_std(shape.d_model);
    weight = parameter(Tensor<T, D>::randn({shape.num_experts, shape.d_model}, gen, 0.0, std));
  }

  [[nodiscard]] index_t num_experts() const { return weight.defined() ? weight.size(0) : 0; }
  [[nodiscard]] index_t d_model() const { return weight.defined() ? weight.size(1) : 0; }
  [[nodiscard]] index_t top_k() const { return k; }

  /// Tokens per expert for a batch of n tokens: min(n, ceil(n k f / E)), at least 1 when n > 0.
  [[nodiscard]] index_t capacity(index_t n) const {
    if (n == 0) return 0;
    const double want = std::ceil(static_cast<double>(n * k) * capacity_factor / static_cast<double>(num_experts()));
    return std::clamp<index_t>(static_cast<index_t>(want), 1, n);
  }

  /// x (N, C) -> (N, E)
  Var<T, D> logits(const Var<T, D>& x) const { return detail::router_logits(x, weight, "ExpertChoiceRouter"); }

  /// Each expert's top-c tokens by probability, from the given logits (N, E).
  Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& x, const RouteContext<D>& /*ctx*/) const {
    const char* op = "ExpertChoiceRouter";
    const index_t e = num_experts();
    detail::check_router_logits(logits, x, e, op);
    MIXMOE_CHECK(capacity_factor > 0 && std::isfinite(capacity_factor), op, "capacity_factor must be positive, got ",
                 capacity_factor);
    const index_t n = logits.size(0), c = capacity(n);
    Routing<T, D> r;
    r.probs = softmax(logits, -1);  // (N, E)
    r.logits = logits;
    r.num_experts = e;
    r.num_tokens = n;
    if (c == 0) {  // no tokens: no assignments
      r.token = Tensor<Index, D>::empty(Shape{0});
      r.expert = Tensor<Index, D>::empty(Shape{0});
      r.gate = Var<T, D>(Tensor<T, D>::empty(Shape{0}));
      return r;
    }
    auto chosen = topk(r.probs, c, 0);                                            // values, indices (c, E)
    r.gate = reshape(transpose(chosen.values, 0, 1), Shape{e * c});               // (M), expert-major
    r.token = chosen.indices.transpose(0, 1).contiguous().reshape(Shape{e * c});  // (M)
    if constexpr (!Tensor<Index, D>::on_host) {
      r.expert = detail::repeat_rows<D>(e, c);  // (M): c copies of each expert id, expert-major
      return r;
    }
    r.expert = Tensor<Index, D>::empty(Shape{e * c});  // (M)
    Index* pe = r.expert.data();
    for (index_t j = 0; j < e; ++j) std::fill_n(pe + j * c, c, static_cast<Index>(j));
    return r;
  }

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const { return select(logits(x), x, ctx); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
  }

  Var<T, D> weight;              // (E, C)
  index_t k = 1;                 // average experts per token: sets the capacity
  double capacity_factor = 1.0;  // scales the capacity (c grows with it, capped at N)
};

/// Policy: expert-choice routing, capacity from RouterShape::top_k.
struct ExpertChoice {
  template <Scalar T, Device D>
  using bind = ExpertChoiceRouter<T, D>;
};

static_assert(check_logit_router<ExpertChoiceRouter<float>>());
static_assert(LogitRouter<bind_router_t<ExpertChoice, double, Cpu>>);

}  // namespace mixmoe
