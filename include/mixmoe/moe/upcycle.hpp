// Upcycling: turn a trained dense FFN into the experts of an MoE layer, and a dense
// DecoderLM into an MoE one (Mix-MoE's starting point).
//
//   x (N, C) -> (N, C); dense hidden width F; a group of N_g experts
//   FeedForward: w_up (F, C), w_down (C, F)        SwiGLU: w_gate, w_up (F, C), w_down (C, F)
//
//   split: expert i gets rows [i F/N_g, (i+1) F/N_g) of w_gate / w_up and the same columns
//          of w_down. The hidden units of an FFN act independently, so the SUM of the
//          experts' outputs is the dense output exactly: with every gate 1 (all experts
//          chosen) the MoE layer reproduces the dense FFN. Needs F % N_g == 0 and experts
//          of width F / N_g (moe.expert_hidden = 0 gives that). A w_down bias is divided by N_g.
//   copy:  every expert is a full copy of the FFN (Mixtral-style); with gates summing to 1
//          the MoE reproduces the dense FFN. Needs experts of width F (moe.expert_hidden = F).
//
// The other groups (MT experts) keep their random initialisation (NewExpertInit::random)
// or become copies of the upcycled group's experts (copy_lm: expert i = upcycled expert
// i mod N_lm, same width needed). Values are copied into the existing parameters, so
// nothing that holds them (an optimizer) goes stale.
#pragma once

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/moe/expert_group.hpp"
#include "mixmoe/moe/mixed_moe.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/decoder.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

enum class UpcycleMode { split, copy };

/// How the groups that are not upcycled from the dense FFN start.
enum class NewExpertInit { random, copy_lm };

struct UpcycleOptions {
  UpcycleMode mode = UpcycleMode::split;
  NewExpertInit other_groups = NewExpertInit::random;
};

namespace detail::upcycle_impl {

/// dst = src[lo:hi) along `axis` of the weight (rows of an up projection, columns of a down projection).
template <class T, class D>
void copy_linear(const Linear<T, D>& src, Linear<T, D>& dst, int axis, index_t lo, index_t hi, double bias_scale,
                 const std::string& where, const char* name) {
  const Tensor<T, D> w = src.weight.value().slice(axis, lo, hi);
  MIXMOE_CHECK(dst.weight.defined() && dst.weight.shape() == w.shape(), "upcycle", where, ": ", name, " weight is ",
               dst.weight.defined() ? dst.weight.shape().to_string() : std::string("undefined"),
               ", the upcycled slice is ", w.shape(), " (set moe.expert_hidden to the width the mode needs)");
  dst.weight.value().copy_from(w);
  MIXMOE_CHECK(src.bias.defined() == dst.bias.defined(), "upcycle", where, ": ", name,
               " has a bias in one of the dense FFN and the expert only");
  if (!src.bias.defined()) return;
  // An up projection's bias belongs to its hidden units (sliced); a down projection's is added once per expert.
  const Tensor<T, D> b = axis == 0 ? src.bias.value().slice(0, lo, hi) : src.bias.value();
  MIXMOE_CHECK(dst.bias.shape() == b.shape(), "upcycle", where, ": ", name, " bias is ", dst.bias.shape(),
               ", the upcycled one is ", b.shape());
  const Tensor<T, D> bc = b.contiguous();
  if constexpr (!Tensor<T, D>::on_host) {  // construction-time copy: scaled on the host as below, copied back
    const Tensor<T, Cpu> hb = to_device<Cpu>(bc);
    Tensor<T, Cpu> scaled = Tensor<T, Cpu>::empty(hb.shape());
    for (index_t i = 0; i < hb.numel(); ++i)
      scaled.data()[i] = static_cast<T>(bias_scale * static_cast<double>(hb.data()[i]));
    dst.bias.value().copy_from(to_device<D>(scaled));
    return;
  }
  T* out = dst.bias.value().data();
  for (index_t i = 0; i < bc.numel(); ++i) out[i] = static_cast<T>(bias_scale * static_cast<double>(bc.data()[i]));
}

}  // namespace detail::upcycle_impl

/// Copies every parameter value of src into dst (same module type, same shapes), in visiting order.
template <class M>
void copy_parameter_values(const M& src, M& dst) {
  static_assert(Module<M>, "copy_parameter_values: M must be a module");
  M s = src;  // modules are handles on shared parameters: a copy visits the same tensors, read only here
  const auto from = named_parameters(s);
  const auto to = named_parameters(dst);
  MIXMOE_CHECK(from.size() == to.size(), "copy_parameter_values", "source has ", from.size(),
               " parameters, destination ", to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    MIXMOE_CHECK(from[i].second.shape() == to[i].second.shape(), "copy_parameter_values", "parameter ", from[i].first,
                 " is ", from[i].second.shape(), " in the source and ", to[i].second.shape(), " (", to[i].first,
                 ") in the destination");
    to[i].second.value().copy_from(from[i].second.value());
  }
}

/// Fills the experts of `group` from a dense FFN of the same type (FeedForward, SwiGLU, or any
/// FFN with Linear members w_up, w_down and optionally w_gate).
template <class Dense, class E, class Tag>
void upcycle_experts(const Dense& dense, ExpertGroup<E, Tag>& group, UpcycleMode mode) {
  static_assert(std::is_same_v<Dense, E>,
                "upcycle_experts: the experts must have the dense FFN's type (same FFN kind, scalar type and device)");
  static_assert(
      requires {
        dense.w_up.weight;
        dense.w_down.weight;
      },
      "upcycle_experts: the FFN needs Linear members w_up (F, C) and w_down (C, F), like FeedForward and SwiGLU");
  const index_t f = dense.w_up.weight.size(0), n = group.size();
  MIXMOE_CHECK(n >= 1, "upcycle", "group ", Tag::name, " has no experts");
  MIXMOE_CHECK(dense.w_down.weight.size(1) == f, "upcycle", "dense w_up ", dense.w_up.weight.shape(), " and w_down ",
               dense.w_down.weight.shape(), " disagree on the hidden width");
  if (mode == UpcycleMode::split)
    MIXMOE_CHECK(f % n == 0, "upcycle", "split: hidden width ", f, " of the dense FFN is not divisible by the ", n,
                 " experts of group ", Tag::name);
  const index_t width = mode == UpcycleMode::split ? f / n : f;
  const double down_bias_scale = mode == UpcycleMode::split ? 1.0 / static_cast<double>(n) : 1.0;
  for (index_t i = 0; i < n; ++i) {
    E& ex = group[i];
    const index_t lo = mode == UpcycleMode::split ? i * width : 0, hi = lo + width;
    const std::string where = "expert " + std::to_string(i) + " of group " + Tag::name;
    if constexpr (requires { dense.w_gate.weight; })
      detail::upcycle_impl::copy_linear(dense.w_gate, ex.w_gate, 0, lo, hi, 1.0, where, "w_gate");
    detail::upcycle_impl::copy_linear(dense.w_up, ex.w_up, 0, lo, hi, 1.0, where, "w_up");
    detail::upcycle_impl::copy_linear(dense.w_down, ex.w_down, 1, lo, hi, down_bias_scale, where, "w_down");
  }
}

/// Expert i of dst becomes a copy of expert (i mod src.size()) of src.
template <class E, class TagSrc, class TagDst>
void copy_experts(const ExpertGroup<E, TagSrc>& src, ExpertGroup<E, TagDst>& dst) {
  MIXMOE_CHECK(src.size() >= 1, "upcycle", "group ", TagSrc::name, " has no experts to copy");
  for (index_t i = 0; i < dst.size(); ++i) copy_parameter_values(src[i % src.size()], dst[i]);
}

/// Upcycles one MoE layer from a dense FFN: the group tagged Target (the first group when
/// none has that tag) from the FFN, the others as opt.other_groups says.
template <class Target = tag::lm, class Dense, class Route, class... Groups>
void upcycle_layer(const Dense& dense, MixedMoE<Route, Groups...>& moe, const UpcycleOptions& opt = {}) {
  using L = MixedMoE<Route, Groups...>;
  constexpr std::size_t target = L::template has_group<Target> ? L::template index_of<Target> : 0;
  auto& base = std::get<target>(moe.groups);
  using Base = std::remove_reference_t<decltype(base)>;
  upcycle_experts(dense, base, opt.mode);
  if (opt.other_groups != NewExpertInit::copy_lm) return;
  const auto copy_into = [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
    if constexpr (I != target) {
      auto& other = std::get<I>(moe.groups);
      using Other = std::remove_reference_t<decltype(other)>;
      if constexpr (std::is_same_v<typename Other::expert_type, typename Base::expert_type>)
        copy_experts(base, other);
      else
        MIXMOE_CHECK(false, "upcycle", "group ", Other::tag_type::name, " has another expert type than group ",
                     Base::tag_type::name, ": it cannot start as a copy");
    }
  };
  [&]<std::size_t... I>(std::index_sequence<I...>) { (copy_into(std::integral_constant<std::size_t, I>{}), ...); }
  (std::index_sequence_for<Groups...>{});
}

/// A DecoderLM<Attn, MoEFFN> (cfg: the dense model's sizes plus cfg.moe) upcycled from a dense
/// DecoderLM<Attn, Dense>: embeddings, attention, norms and head copied, every FFN upcycled
/// into the Target group of its layer (upcycle_layer).
template <class MoEFFN, class Target = tag::lm, class Attn, class Dense>
DecoderLM<Attn, MoEFFN> upcycle_model(const DecoderLM<Attn, Dense>& dense, const ModelConfig& cfg,
                                      const UpcycleOptions& opt = {}) {
  static_assert(is_mixed_moe_v<MoEFFN>, "upcycle_model<MoEFFN>: MoEFFN must be a MixedMoE<Route, Groups...>");
  const ModelConfig& dc = dense.config;
  const auto same = [](const char* what, index_t a, index_t b) {
    MIXMOE_CHECK(a == b, "upcycle_model", "the MoE config has ", what, " ", a, ", the dense model ", b);
  };
  same("vocab", cfg.vocab, dc.vocab);
  same("d_model", cfg.d_model, dc.d_model);
  same("layers", cfg.layers, dc.layers);
  same("heads", cfg.heads, dc.heads);
  same("kv_heads", cfg.kv_head_count(), dc.kv_head_count());
  same("d_ff", cfg.d_ff, dc.d_ff);
  MIXMOE_CHECK(cfg.tie_embeddings == dc.tie_embeddings, "upcycle_model",
               "the MoE config and the dense model differ in tie_embeddings");
  DecoderLM<Attn, MoEFFN> moe(cfg);
  copy_parameter_values(dense.embed, moe.embed);
  copy_parameter_values(dense.norm, moe.norm);
  if (!cfg.tie_embeddings) copy_parameter_values(dense.head, moe.head);
  for (std::size_t i = 0; i < moe.blocks.size(); ++i) {
    copy_parameter_values(dense.blocks[i].norm1, moe.blocks[i].norm1);
    copy_parameter_values(dense.blocks[i].attn, moe.blocks[i].attn);
    copy_parameter_values(dense.blocks[i].norm2, moe.blocks[i].norm2);
    upcycle_layer<Target>(dense.blocks[i].ffn, moe.blocks[i].ffn, opt);
  }
  return moe;
}

}  // namespace mixmoe
