// Checks shared by the routers: readable compile-time diagnostics for the Router
// concepts, and the run-time checks of sizes and inputs.
//
//   x (N, C) token rows, C = d_model, E experts, K experts per token
//
// A type that misses a member of Router fails inside a requires-expression, and the
// compiler reports which clause failed, not what to write. check_router<R>() asks for
// the members one at a time and fails a static_assert whose message is the missing
// member's declaration, e.g.
//   static assertion failed: mixmoe: a Router needs `index_t num_experts() const`
// The type members are asked for first, on their own: without them every other
// question would fail too and bury the one line that matters.
//
// checked_router_t<P, T, D> binds a policy (or takes a concrete router) like
// bind_router_t, then runs check_router on the result: use it wherever a router
// type enters a layer, so a user's mistake is reported where it is made.
#pragma once

#include <cmath>
#include <concepts>
#include <string>
#include <type_traits>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

namespace detail::router_check {

template <class R>
concept has_value_type = requires { typename R::value_type; } && Scalar<typename R::value_type>;

template <class R>
concept has_device_type = requires { typename R::device_type; } && Device<typename R::device_type>;

template <class R>
using var_t = Var<typename R::value_type, typename R::device_type>;
template <class R>
using routing_t = Routing<typename R::value_type, typename R::device_type>;
template <class R>
using context_t = RouteContext<typename R::device_type>;

template <class R>
concept constructible = std::constructible_from<R, const RouterShape&, Generator&>;

template <class R>
concept callable = requires(const R& r, const var_t<R>& x, const context_t<R>& ctx) {
  { r(x, ctx) } -> std::same_as<routing_t<R>>;
};

template <class R>
concept counts_experts = requires(const R& r) {
  { r.num_experts() } -> std::convertible_to<index_t>;
};

template <class R>
concept has_logits = requires(const R& r, const var_t<R>& x) {
  { r.logits(x) } -> std::same_as<var_t<R>>;
};

template <class R>
concept has_select = requires(const R& r, const var_t<R>& x, const context_t<R>& ctx) {
  { r.select(x, x, ctx) } -> std::same_as<routing_t<R>>;
};

}  // namespace detail::router_check

/// Fails a static_assert naming the first missing member group of Router; true otherwise.
/// Use as `static_assert(check_router<MyRouter>());`.
template <class R>
consteval bool check_router() {
  namespace rc = detail::router_check;
  if constexpr (!rc::has_value_type<R>) {
    static_assert(rc::has_value_type<R>, "mixmoe: a Router needs `using value_type = T;` with T float or double");
  } else if constexpr (!rc::has_device_type<R>) {
    static_assert(rc::has_device_type<R>, "mixmoe: a Router needs `using device_type = D;` with D a device (Cpu)");
  } else {
    static_assert(rc::constructible<R>, "mixmoe: a Router needs a constructor `R(const RouterShape&, Generator&)`");
    static_assert(rc::callable<R>,
                  "mixmoe: a Router needs `Routing<T, D> operator()(const Var<T, D>&, const RouteContext<D>&) const`");
    static_assert(rc::counts_experts<R>, "mixmoe: a Router needs `index_t num_experts() const`");
    static_assert(Module<R>,
                  "mixmoe: a Router needs `void visit_parameters(const ParameterVisitor<T, D>&, const std::string&)` "
                  "(an empty body when it has no parameters)");
    // Reached only when every member above is present: a mismatch between this list and the concept.
    static_assert(!(rc::constructible<R> && rc::callable<R> && rc::counts_experts<R> && Module<R>) || Router<R>,
                  "mixmoe: the type has every member asked for but does not model Router (see moe/routing.hpp)");
  }
  return true;
}

/// check_router, then the two members a LogitRouter adds (what FourierFeatures wraps).
template <class R>
consteval bool check_logit_router() {
  namespace rc = detail::router_check;
  check_router<R>();
  if constexpr (rc::has_value_type<R> && rc::has_device_type<R>) {
    static_assert(rc::has_logits<R>,
                  "mixmoe: a LogitRouter needs `Var<T, D> logits(const Var<T, D>& x) const` (HashRouting has no "
                  "logits and cannot be wrapped)");
    static_assert(rc::has_select<R>,
                  "mixmoe: a LogitRouter needs `Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& x, "
                  "const RouteContext<D>&) const`");
  }
  return true;
}

namespace detail {

/// check_router, then that a concrete router uses the layer's scalar type and device.
template <class R, class T, class D>
consteval bool check_bound_router() {
  namespace rc = detail::router_check;
  check_router<R>();
  if constexpr (rc::has_value_type<R> && rc::has_device_type<R>) {
    static_assert(std::is_same_v<typename R::value_type, T>,
                  "mixmoe: a concrete router's value_type differs from the layer's scalar type");
    static_assert(std::is_same_v<typename R::device_type, D>,
                  "mixmoe: a concrete router's device_type differs from the layer's device");
  }
  return true;
}

/// The router a policy binds to, checked member by member.
template <class P, class T, class D>
struct checked_bind {
  using type = bind_router_t<P, T, D>;
  static_assert(check_bound_router<type, T, D>());
};

/// sqrt(0.1 / fan_in): the Switch Transformer's router init (a normal with variance s / fan_in, s = 0.1).
/// Small logits at the start give near-uniform routing, so early training sees balanced experts.
inline double router_init_std(index_t fan_in) { return std::sqrt(0.1 / static_cast<double>(fan_in)); }

/// The sizes every router needs.
inline void check_router_shape(const RouterShape& s, const char* op) {
  MIXMOE_CHECK(s.d_model > 0, op, "d_model must be positive, got ", s.d_model);
  MIXMOE_CHECK(s.num_experts > 0, op, "num_experts must be positive, got ", s.num_experts);
}

/// k experts per token must be in [1, E].
inline void check_top_k(index_t k, index_t num_experts, const char* op) {
  MIXMOE_CHECK(k >= 1 && k <= num_experts, op, "top_k = ", k, " is out of range [1, num_experts = ", num_experts, "]");
}

/// x must be token rows (N, C) with C = d_model.
template <class T, class D>
void check_router_input(const Var<T, D>& x, index_t d_model, const char* op) {
  MIXMOE_CHECK(x.defined(), op, "x is an undefined Var");
  MIXMOE_CHECK(x.dim() == 2 && x.size(1) == d_model, op, "x must be token rows (N, C) with C = d_model = ", d_model,
               ", got shape ", x.shape());
}

/// logits must be (N, E) for the N rows of x.
template <class T, class D>
void check_router_logits(const Var<T, D>& logits, const Var<T, D>& x, index_t num_experts, const char* op) {
  MIXMOE_CHECK(logits.defined() && x.defined(), op, "logits and x must be defined Vars");
  MIXMOE_CHECK(logits.dim() == 2 && logits.size(0) == x.size(0) && logits.size(1) == num_experts, op,
               "logits must be (N, E) = (", x.size(0), ", ", num_experts, ") for x of shape ", x.shape(), ", got ",
               logits.shape());
}

/// 0, .., 0, 1, .., 1, ..: each of n rows repeated k times (token-major assignments).
template <class D>
Tensor<Index, D> repeat_rows(index_t n, index_t k) {
  Tensor<Index, D> t = Tensor<Index, D>::empty(Shape{n * k});  // (N K)
  if constexpr (!Tensor<Index, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::moe_iota_div(t.data(), n * k, k);  // element i = i / k
    return t;
  }
  Index* p = t.data();
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < k; ++j) p[i * k + j] = static_cast<Index>(i);
  return t;
}

}  // namespace detail

/// bind_router_t, with check_router's one-line diagnostics when the router is malformed.
template <class P, class T, class D>
using checked_router_t = typename detail::checked_bind<P, T, D>::type;

}  // namespace mixmoe
