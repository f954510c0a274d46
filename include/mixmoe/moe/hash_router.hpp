// Hash router (Roller et al., 2021, "Hash Layers"): the expert is a fixed hash of the token id.
//
//   x (N, C) token rows, C = d_model, E experts, K = RouterShape::top_k, M = N K assignments
//   token_ids (N) from RouteContext::token_ids (any shape with N elements, e.g. (B, T))
//   expert of copy j of token i: hash(id_i, seed, j) mod E, moved to the next free expert
//            (linear probing) when an earlier copy took it, so a token's K experts are distinct
//   gate (M) = 1 / K, a constant: the K experts are averaged (for K = 1 the gate is 1)
//   probs (N, E): 1 / K on each selected expert, 0 elsewhere (a constant distribution)
//   logits (N, E): zeros (constants)
//   assignments token-major: token 0's K experts (copy 0 first), then token 1's, ...
//
// No parameters and no gradient: the routing is fixed before training and balanced as well as
// the token frequencies allow. The hash is splitmix64's finaliser, the same on every platform;
// `seed` (default 0) gives a different fixed hash, e.g. per layer. The router does not read
// x's values, only its rows; it is not a LogitRouter (there are no logits to add to).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

namespace detail {

/// splitmix64's finaliser of the id mixed with (seed, copy) (HashRouter::hash); host and device.
MIXMOE_HD inline std::uint64_t hash_router_hash(std::uint64_t id, std::uint64_t seed, std::uint64_t copy) {
  std::uint64_t z = id + 0x9e3779b97f4a7c15ULL * (copy + 1) + 0xd1b54a32d192ed03ULL * seed;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// The k distinct experts (of e) of one token id, copy 0 first, into out[0..k) (HashRouter::experts_of).
MIXMOE_HD inline void hash_router_experts(Index id, std::uint64_t seed, index_t k, index_t e, Index* out) {
  const auto ue = static_cast<std::uint64_t>(e);
  for (index_t j = 0; j < k; ++j) {
    auto pick =
        static_cast<Index>(hash_router_hash(static_cast<std::uint64_t>(id), seed, static_cast<std::uint64_t>(j)) % ue);
    for (bool taken = true; taken;) {  // k <= e: a free expert exists
      taken = false;
      for (index_t i = 0; i < j; ++i) taken = taken || out[i] == pick;
      if (taken) pick = static_cast<Index>((pick + 1) % e);
    }
    out[j] = pick;
  }
}

/// hash_router_experts as a function object, for a device kernel.
struct HashRouterExperts {
  std::uint64_t seed;
  index_t k;
  index_t e;
  MIXMOE_HD void operator()(Index id, Index* out) const { hash_router_experts(id, seed, k, e, out); }
};

}  // namespace detail

template <Scalar T, Device D = Cpu>
struct HashRouter {
  using value_type = T;
  using device_type = D;

  HashRouter() = default;
  /// Draws nothing from gen: the hash is fixed. vocab > 0 makes out-of-vocabulary ids an error.
  HashRouter(const RouterShape& shape, Generator& /*gen*/)
      : k(shape.top_k), vocab(shape.vocab), d_model_(shape.d_model), experts_(shape.num_experts) {
    detail::check_router_shape(shape, "HashRouter");
    detail::check_top_k(k, experts_, "HashRouter");
    MIXMOE_CHECK(vocab >= 0, "HashRouter", "vocab must be >= 0 (0: unchecked ids), got ", vocab);
  }

  [[nodiscard]] index_t num_experts() const { return experts_; }
  [[nodiscard]] index_t d_model() const { return d_model_; }
  [[nodiscard]] index_t top_k() const { return k; }

  /// splitmix64's finaliser of the id mixed with (seed, copy): a fixed, well-spread 64-bit hash.
  [[nodiscard]] static std::uint64_t hash(std::uint64_t id, std::uint64_t seed, std::uint64_t copy) {
    return detail::hash_router_hash(id, seed, copy);
  }

  /// The K distinct experts of one token id, copy 0 first, into out[0..K).
  void experts_of(Index id, Index* out) const { detail::hash_router_experts(id, seed, k, experts_, out); }

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const {
    const char* op = "HashRouter";
    MIXMOE_CHECK(experts_ > 0, op, "the router is default-constructed (no experts)");
    detail::check_router_input(x, d_model_, op);
    detail::check_top_k(k, experts_, op);
    const index_t n = x.size(0);
    MIXMOE_CHECK(ctx.token_ids != nullptr, op, "hash routing needs the token ids of the ", n,
                 " rows: set RouteContext::token_ids");
    MIXMOE_CHECK(ctx.token_ids->numel() == n, op, "token_ids of shape ", ctx.token_ids->shape(),
                 " must have one id per row of x of shape ", x.shape());
    const Tensor<Index, D> ids = ctx.token_ids->contiguous();  // (N)
    const auto message = [op, vocab = vocab](long long row, long long id) {
      return std::string("[") + op + "] token id " + std::to_string(id) + " at row " + std::to_string(row) +
             " is out of range [0, " + (vocab == 0 ? std::string("inf") : std::to_string(vocab)) + ")";
    };
    Routing<T, D> r;
    r.token = detail::repeat_rows<D>(n, k);                   // (M)
    r.expert = Tensor<Index, D>::empty(Shape{n * k});         // (M)
    Tensor<T, D> probs = Tensor<T, D>::zeros({n, experts_});  // (N, E)
    const T share = T(1) / static_cast<T>(k);
    if constexpr (!Tensor<Index, D>::on_host) {
      // One thread per row; the kernel checks the ids without a wait: a bad id is thrown by the
      // next synchronisation (a deferred check, ops/index.hpp), its layer's output NaN meanwhile.
      mixmoe::detail::require_device_ops<D>();
      mixmoe::detail::DeviceOps<D>::moe_hash_route(ids.data(), n, k, experts_, vocab,
                                                   detail::HashRouterExperts{seed, k, experts_}, r.expert.data(),
                                                   probs.data(), share, message);
    } else {
      const Index* pid = ids.data();
      for (index_t i = 0; i < n; ++i)
        if (pid[i] < 0 || (vocab != 0 && pid[i] >= vocab)) throw Error(message(i, pid[i]));
      Index* pe = r.expert.data();
      T* pp = probs.data();
      for (index_t i = 0; i < n; ++i) {
        experts_of(pid[i], pe + i * k);
        for (index_t j = 0; j < k; ++j) pp[i * experts_ + pe[i * k + j]] = share;
      }
    }
    r.gate = Var<T, D>(Tensor<T, D>::full(Shape{n * k}, share));  // (M), constant
    r.probs = Var<T, D>(std::move(probs));
    r.logits = Var<T, D>(Tensor<T, D>::zeros({n, experts_}));
    r.num_experts = experts_;
    r.num_tokens = n;
    return r;
  }

  /// No parameters.
  void visit_parameters(const ParameterVisitor<T, D>& /*visit*/, const std::string& /*prefix*/) {}

  index_t k = 1;           // distinct experts per token, at most E
  index_t vocab = 0;       // ids must be below it when > 0
  std::uint64_t seed = 0;  // selects the fixed hash

 private:
  index_t d_model_ = 0;
  index_t experts_ = 0;
};

/// Policy: hash routing on token ids (RouteContext::token_ids).
struct HashRouting {
  template <Scalar T, Device D>
  using bind = HashRouter<T, D>;
};

static_assert(check_router<HashRouter<float>>());
static_assert(Router<bind_router_t<HashRouting, double, Cpu>>);

}  // namespace mixmoe
