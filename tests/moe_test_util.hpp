// Routers for the MoE tests, written the way a user writes one: tensor ops only, no
// backward by hand (the library's own routers are tested elsewhere).
#pragma once

#include "test_util.hpp"

#include <mixmoe/moe/routing.hpp>
#include <mixmoe/nn/config.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/nn/linear.hpp>

#include <string>
#include <vector>

namespace mixmoe::test {

/// A small two-group layer's configuration (d_model 4, experts of width `hidden`, or d_ff 6 / E_g
/// when hidden is 0; fixed_mix {0.7, 0.3}) for the MoE layer tests.
inline ModelConfig small_layer_config(GroupMix mix, double capacity_factor, index_t top_k,
                                      std::vector<index_t> experts = {2, 2}, index_t hidden = 3) {
  ModelConfig cfg;
  cfg.vocab = 16;
  cfg.d_model = 4;
  cfg.heads = 1;
  cfg.layers = 1;
  cfg.d_ff = 6;
  cfg.moe.experts_per_group = std::move(experts);
  cfg.moe.expert_hidden = hidden;
  cfg.moe.top_k = top_k;
  cfg.moe.capacity_factor = capacity_factor;
  cfg.moe.mix = mix;
  cfg.moe.fixed_mix = {0.7, 0.3};
  return cfg;
}

inline const char* mix_name(GroupMix m) {
  return m == GroupMix::shared_router ? "shared_router" : m == GroupMix::group_gate ? "group_gate" : "fixed";
}

/// Softmax over a linear projection, then the top-k experts per token; the gates are the
/// chosen probabilities. Assignments are token-major: m = n K + j.
template <Scalar T, Device D = Cpu>
struct SoftmaxTopK {
  using value_type = T;
  using device_type = D;

  SoftmaxTopK(const RouterShape& s, Generator& gen) : proj(s.d_model, s.num_experts, false, gen), k(s.top_k) {}

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>&) const {
    const index_t n = x.size(0), e = proj.out_features();
    Routing<T, D> r;
    r.logits = proj(x);               // (N, E)
    r.probs = softmax(r.logits, -1);  // (N, E)
    auto top = topk(r.probs, k, -1);  // (N, K)
    r.token = Tensor<Index, D>::empty({n * k});
    for (index_t i = 0; i < n * k; ++i) r.token.data()[i] = static_cast<Index>(i / k);
    r.expert = top.indices.reshape({n * k});
    r.gate = reshape(top.values, Shape{n * k});
    r.num_experts = e;
    r.num_tokens = n;
    return r;
  }
  [[nodiscard]] index_t num_experts() const { return proj.out_features(); }
  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    proj.visit_parameters(visit, join_name(prefix, "proj"));
  }

  Linear<T, D> proj;
  index_t k = 1;
};

struct SoftmaxTopKRoute {
  template <Scalar T, Device D>
  using bind = SoftmaxTopK<T, D>;
};

/// Sends every token to every expert with the same constant gate: 1 (Mean = false) or 1/E.
/// probs are uniform and logits zero. What upcycling's exactness needs.
template <Scalar T, Device D, bool Mean>
struct EveryExpert {
  using value_type = T;
  using device_type = D;

  EveryExpert(const RouterShape& s, Generator&) : e(s.num_experts) {}

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>&) const {
    const index_t n = x.size(0);
    Routing<T, D> r;
    r.token = Tensor<Index, D>::empty({n * e});
    r.expert = Tensor<Index, D>::empty({n * e});
    for (index_t i = 0; i < n * e; ++i) {
      r.token.data()[i] = static_cast<Index>(i / e);
      r.expert.data()[i] = static_cast<Index>(i % e);
    }
    r.gate = Var<T, D>(Tensor<T, D>::full({n * e}, Mean ? T(1) / static_cast<T>(e) : T(1)));
    r.probs = Var<T, D>(Tensor<T, D>::full({n, e}, T(1) / static_cast<T>(e)));
    r.logits = Var<T, D>(Tensor<T, D>::zeros({n, e}));
    r.num_experts = e;
    r.num_tokens = n;
    return r;
  }
  [[nodiscard]] index_t num_experts() const { return e; }
  void visit_parameters(const ParameterVisitor<T, D>&, const std::string&) {}

  index_t e = 1;
};

struct AllOnesRoute {
  template <Scalar T, Device D>
  using bind = EveryExpert<T, D, false>;
};
struct AllMeanRoute {
  template <Scalar T, Device D>
  using bind = EveryExpert<T, D, true>;
};

static_assert(Router<SoftmaxTopK<double>>);
static_assert(Router<EveryExpert<float, Cpu, true>>);

/// A hand-made routing: assignments (token, expert, gate) and a probs table.
template <Scalar T>
Routing<T, Cpu> make_routing(const std::vector<int>& token, const std::vector<int>& expert, const std::vector<T>& gate,
                             index_t num_tokens, index_t num_experts, const std::vector<T>& probs = {},
                             bool gate_requires_grad = false) {
  Routing<T, Cpu> r;
  const auto m = static_cast<index_t>(token.size());
  r.token = Tensor<Index, Cpu>::from_indices(token, {m});
  r.expert = Tensor<Index, Cpu>::from_indices(expert, {m});
  r.gate = Var<T, Cpu>(Tensor<T, Cpu>::from(gate, {m}), gate_requires_grad);
  if (!probs.empty()) r.probs = Var<T, Cpu>(Tensor<T, Cpu>::from(probs, {num_tokens, num_experts}));
  r.num_tokens = num_tokens;
  r.num_experts = num_experts;
  return r;
}

/// All parameters of a module, for gradcheck inputs (the Vars are the module's own).
template <class M>
std::vector<module_var_t<M>> with_params(const module_var_t<M>& x, M& m) {
  std::vector<module_var_t<M>> in{x};
  for (auto& p : parameters(m)) in.push_back(p);
  return in;
}

}  // namespace mixmoe::test
