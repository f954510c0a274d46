// What a router produces, and the Router concept every router models.
//
//   x (N, C) token rows, E experts, M assignments (token -> expert pairs)
//   Routing: token (M), expert (M), gate (M) differentiable combine weights,
//            probs (N, E) the full routing distribution, logits (N, E)
//
// Routing is a list of assignments rather than an (N, K) table so that one
// dispatch serves token-choice top-k (M = N K), Switch (M = N), expert choice
// (M = E * capacity, a token may get 0..E experts) and hash routing alike.
#pragma once

#include <concepts>
#include <string>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

template <Scalar T, Device D = Cpu>
struct Routing {
  Tensor<Index, D> token;   // (M) row of x that each assignment reads
  Tensor<Index, D> expert;  // (M) expert of each assignment, in [0, num_experts)
  Var<T, D> gate;           // (M) combine weight of each assignment
  Var<T, D> probs;          // (N, E) routing distribution over all experts (softmax of logits)
  Var<T, D> logits;         // (N, E) router scores before selection
  index_t num_experts = 0;
  index_t num_tokens = 0;
};

/// Per-call information a router may use besides the hidden states.
template <Device D = Cpu>
struct RouteContext {
  const Tensor<Index, D>* token_ids = nullptr;  // (N) token ids of the rows, for hash routing
  bool training = true;
};

/// Sizes a router is built from (the MoE layer fills it in).
struct RouterShape {
  index_t d_model = 0;
  index_t num_experts = 0;
  index_t top_k = 1;
  index_t vocab = 0;  // for hash routing
};

/// A router maps token rows to expert assignments. Any type with these members works:
///   using value_type, device_type;                         scalar type and device
///   R(const RouterShape&, Generator&);                      construction
///   Routing<T, D> operator()(const Var<T, D>& x (N, C), const RouteContext<D>&) const;
///   index_t num_experts() const;
///   void visit_parameters(const ParameterVisitor<T, D>&, const std::string& prefix);
template <class R>
concept Router = Module<R> && std::constructible_from<R, const RouterShape&, Generator&> &&
    requires(const R& r, const Var<typename R::value_type, typename R::device_type>& x,
             const RouteContext<typename R::device_type>& ctx) {
      { r(x, ctx) } -> std::same_as<Routing<typename R::value_type, typename R::device_type>>;
      { r.num_experts() } -> std::convertible_to<index_t>;
    };

/// A router whose decision comes from per-expert logits: logits(x) then select().
/// Wrappers such as FourierFeatures add terms to the logits and reuse select().
template <class R>
concept LogitRouter = Router<R> &&
    requires(const R& r, const Var<typename R::value_type, typename R::device_type>& x,
             const RouteContext<typename R::device_type>& ctx) {
      { r.logits(x) } -> std::same_as<Var<typename R::value_type, typename R::device_type>>;
      { r.select(x, x, ctx) } -> std::same_as<Routing<typename R::value_type, typename R::device_type>>;
    };

/// Router policies (TopK<2>, Switch, ...) are written before the scalar type and
/// device are known; a policy binds to a concrete router with
///   template <Scalar T, Device D> using bind = SomeRouter<T, D, ...>;
/// A concrete router type (a user's) can be used directly.
template <class P, class T, class D>
struct bind_router {
  using type = P;
};
template <class P, class T, class D>
  requires requires { typename P::template bind<T, D>; }
struct bind_router<P, T, D> {
  using type = typename P::template bind<T, D>;
};
template <class P, class T, class D>
using bind_router_t = typename bind_router<P, T, D>::type;

}  // namespace mixmoe
