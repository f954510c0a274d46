// Dense feed-forward blocks; each is also an expert type for the MoE layers.
//
//   x (N, C) -> (N, C), hidden width F
//   FeedForward: w_down(gelu(w_up x))                    w_up (F, C), w_down (C, F)
//   SwiGLU:      w_down(silu(w_gate x) * w_up x)         w_gate, w_up (F, C), w_down (C, F)
//
// Constructible as an expert, (d_model, hidden, gen), or as a model's dense FFN,
// (ModelConfig, gen). Parameter names follow the LLaMA/Qwen2 layout
// (gate_proj/up_proj/down_proj) under our own names w_gate/w_up/w_down.
//
// Float blocks also run on bf16 activations (ops/bf16.hpp), the fp32 weights cast to bf16 for
// each GEMM; so do their grouped (MoE expert) forms, and with moe.expert_precision bf16 the
// grouped forms of a float layer keep their hidden activations in bf16.
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/moe/grouped_gemm.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/unary.hpp"

namespace mixmoe {

namespace detail {

/// The weights of one Linear member of every expert of a list, stacked: (E, out, in).
template <Floating X, class E, Scalar T, Device D>
Var<X, D> stacked_weight(std::span<const E* const> experts, Linear<T, D> E::*member) {
  std::vector<Var<T, D>> ws;
  ws.reserve(experts.size());
  for (const E* e : experts) ws.push_back((e->*member).weight);
  const std::span<const Var<T, D>> list(ws.data(), ws.size());
  if constexpr (std::is_same_v<X, bf16> && std::is_same_v<T, float>)
    return stack_weights_bf16(list);  // one bf16 stack, no fp32 stack kept
  else
    return cast<X>(stack_weights(list));
}

/// A grouped expert form run on bf16 storage when the rows ask for bf16 (a float layer with
/// moe.expert_precision bf16): x cast to bf16, the block in bf16, the result cast back.
template <class E, Scalar T, Device D>
Var<T, D> grouped_maybe_bf16(std::span<const E* const> experts, const Var<T, D>& x, const GroupedRows<D>& rows) {
  if constexpr (std::is_same_v<T, float>) {
    if (rows.precision == MatmulPrecision::bf16) return cast<float>(E::grouped(experts, cast<bf16>(x), rows));
  }
  return E::template grouped_as<T>(experts, x, rows);
}

}  // namespace detail

template <Scalar T, Device D = Cpu>
struct FeedForward {
  using value_type = T;
  using device_type = D;

  FeedForward() = default;
  FeedForward(index_t d_model, index_t hidden, Generator& gen, double out_std = -1.0)
      : w_up(d_model, hidden, false, gen), w_down(hidden, d_model, false, gen, out_std) {}
  FeedForward(const ModelConfig& cfg, Generator& gen)
      : FeedForward(cfg.d_model, cfg.d_ff, gen, cfg.init_std / std::sqrt(2.0 * static_cast<double>(cfg.layers))) {}

  [[nodiscard]] index_t hidden() const { return w_up.out_features(); }
  /// x in T, or in bf16 for a float block.
  template <detail::ActivationOf<T> X>
  Var<X, D> operator()(const Var<X, D>& x) const {
    return w_down(gelu(w_up(x)));
  }

  /// Experts in one call (GroupedExpert, moe/expert_group.hpp): two grouped GEMMs over the stacked
  /// weights; rows outside every expert's range stay 0 (gelu(0) = 0).
  static Var<T, D> grouped(std::span<const FeedForward* const> experts, const Var<T, D>& x,
                           const GroupedRows<D>& rows) {
    return detail::grouped_maybe_bf16(experts, x, rows);
  }
  static Var<bf16, D> grouped(std::span<const FeedForward* const> experts, const Var<bf16, D>& x,
                              const GroupedRows<D>& rows)
    requires std::is_same_v<T, float>
  {
    return grouped_as<bf16>(experts, x, rows);
  }
  template <Floating X>
  static Var<X, D> grouped_as(std::span<const FeedForward* const> experts, const Var<X, D>& x,
                              const GroupedRows<D>& rows) {
    const Var<X, D> h = gelu(grouped_linear(x, detail::stacked_weight<X>(experts, &FeedForward::w_up), rows));
    return grouped_linear(h, detail::stacked_weight<X>(experts, &FeedForward::w_down), rows);
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    w_up.visit_parameters(visit, join_name(prefix, "w_up"));
    w_down.visit_parameters(visit, join_name(prefix, "w_down"));
  }

  Linear<T, D> w_up, w_down;
};

template <Scalar T, Device D = Cpu>
struct SwiGLU {
  using value_type = T;
  using device_type = D;

  SwiGLU() = default;
  SwiGLU(index_t d_model, index_t hidden, Generator& gen, double out_std = -1.0)
      : w_gate(d_model, hidden, false, gen), w_up(d_model, hidden, false, gen), w_down(hidden, d_model, false, gen, out_std) {}
  SwiGLU(const ModelConfig& cfg, Generator& gen)
      : SwiGLU(cfg.d_model, cfg.d_ff, gen, cfg.init_std / std::sqrt(2.0 * static_cast<double>(cfg.layers))) {}

  [[nodiscard]] index_t hidden() const { return w_up.out_features(); }
  /// x in T, or in bf16 for a float block.
  template <detail::ActivationOf<T> X>
  Var<X, D> operator()(const Var<X, D>& x) const {
    return w_down(silu(w_gate(x)) * w_up(x));
  }

  /// Experts in one call (GroupedExpert, moe/expert_group.hpp): three grouped GEMMs over the stacked
  /// weights; rows outside every expert's range stay 0 (silu(0) * 0 = 0).
  static Var<T, D> grouped(std::span<const SwiGLU* const> experts, const Var<T, D>& x, const GroupedRows<D>& rows) {
    return detail::grouped_maybe_bf16(experts, x, rows);
  }
  static Var<bf16, D> grouped(std::span<const SwiGLU* const> experts, const Var<bf16, D>& x, const GroupedRows<D>& rows)
    requires std::is_same_v<T, float>
  {
    return grouped_as<bf16>(experts, x, rows);
  }
  template <Floating X>
  static Var<X, D> grouped_as(std::span<const SwiGLU* const> experts, const Var<X, D>& x, const GroupedRows<D>& rows) {
    const Var<X, D> g = grouped_linear(x, detail::stacked_weight<X>(experts, &SwiGLU::w_gate), rows);
    const Var<X, D> u = grouped_linear(x, detail::stacked_weight<X>(experts, &SwiGLU::w_up), rows);
    return grouped_linear(silu(g) * u, detail::stacked_weight<X>(experts, &SwiGLU::w_down), rows);
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    w_gate.visit_parameters(visit, join_name(prefix, "w_gate"));
    w_up.visit_parameters(visit, join_name(prefix, "w_up"));
    w_down.visit_parameters(visit, join_name(prefix, "w_down"));
  }

  Linear<T, D> w_gate, w_up, w_down;
};

}  // namespace mixmoe
