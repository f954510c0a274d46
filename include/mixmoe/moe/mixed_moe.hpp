// MixedMoE<Route, Groups...>: an MoE feed-forward layer over any number of expert
// groups (Mix-MoE: LM experts and MT experts), a drop-in FFN of DecoderLM.
//
//   x (N, C) -> (N, C); G groups, group g has E_g experts, E = sum_g E_g, K = moe.top_k
//
// Group combination (cfg.moe.mix, fixed at construction):
//   shared_router: one router over all E experts (global ids in group order: the
//                  first group's experts, then the next group's, ...), top-K across groups;
//   group_gate:    one router per group, top-min(K, E_g) within it; group g's gates are
//                  multiplied by w_g(x) = softmax(x Wg^T)_g, Wg (G, C), learned per token;
//   fixed:         one router per group, group g's gates multiplied by moe.fixed_mix[g]
//                  (default 1/G).
// With one group every mode is the same plain MoE: one router, no group weights (a
// dense FFN is MixedMoE with one group of one expert and top_k 1).
//
// Sizes: group g has moe.experts_per_group[g] experts of hidden width moe.expert_hidden,
// or d_ff / E_g when that is 0 (the upcycling split). Dispatch is dropless unless
// moe.capacity_factor > 0 (per router: capacity = ceil(capacity_factor * M / E_router)).
//
// Parameter names: "<tag>.experts.<i>.*" per group, "router.*" (shared router or one
// group) or "router.<tag>.*" (per-group routers), "group_gate.weight".
//
// Expert execution (cfg.moe.execution): grouped runs each router's experts in one grouped
// GEMM per weight over their stacked weights (GroupedExpert types: FeedForward, SwiGLU); with
// a shared router and groups of one expert type and width, all groups in one call, otherwise
// one call per group over the same sorted rows. On a device that is the path without a host
// synchronisation (in a dropless layer). per_expert calls each expert on its block of rows
// (any expert type; the row counts must come to the host). automatic: grouped on a device
// when the expert types allow it, per_expert on Cpu (no weight copies).
// cfg.moe.expert_precision bf16 (float models): the experts' grouped GEMMs, forward and
// backward, take bf16 operands and sum in fp32; the built-in experts (FeedForward, SwiGLU)
// also keep their input, hidden activations and output in bf16 (ops/bf16.hpp), a custom
// GroupedExpert gets the precision in GroupedRows. The weights, the routers and the combine
// stay float. It implies grouped execution (automatic means grouped then, on Cpu too).
//
// Statistics: routing_records() holds, per router, the routing of the LAST forward call
// (probs, logits, gates, tokens per expert, dropped count), for the auxiliary losses and
// the routing statistics; release_routing_graph() drops the graph they hold (see
// moe/moe_layer.hpp). They are mutable state of a const call: do not run one layer
// object from two threads at once.
//
// Routing intervention (inference-time routing steering, align/steering.hpp): router r may
// carry a function f, set with set_logit_intervention(r, f), that rewrites its logits
// z (N, E_r) before selection: the layer routes with router.select(f(z), x, ctx) instead of
// router(x, ctx) (= select(logits(x), x, ctx) for a LogitRouter). The records hold the
// steered routing (its logits are f(z), its probs and gates come from them). Only for
// LogitRouters (FourierFeatures over a LogitRouter included): setting one on any other
// router is an error. Unset (the default), the forward is the plain one; the one added
// cost is a size check per router call.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/moe/dispatch.hpp"
#include "mixmoe/moe/expert_group.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/shape_ops.hpp"
#include "mixmoe/ops/softmax.hpp"

namespace mixmoe {

namespace detail {

/// Index of the first group of the pack whose tag is Tag (sizeof...(Groups) when none).
template <class Tag, class... Groups>
constexpr std::size_t group_index_of() {
  std::size_t i = 0;
  const bool found = ((std::is_same_v<typename Groups::tag_type, Tag> ? true : (++i, false)) || ...);
  return found ? i : sizeof...(Groups);
}

}  // namespace detail

template <class Route, class... Groups>
struct MixedMoE {
  static_assert(sizeof...(Groups) >= 1, "MixedMoE<Route, Groups...>: needs at least one expert group");
  static_assert((is_expert_group_v<Groups> && ...),
                "MixedMoE<Route, Groups...>: every group must be an ExpertGroup<Expert, Tag> (moe/expert_group.hpp)");
  using first_group = std::tuple_element_t<0, std::tuple<Groups...>>;
  using value_type = typename first_group::value_type;
  using device_type = typename first_group::device_type;
  using T = value_type;
  using D = device_type;
  static_assert((std::is_same_v<typename Groups::value_type, T> && ...) &&
                    (std::is_same_v<typename Groups::device_type, D> && ...),
                "MixedMoE<Route, Groups...>: all groups must have the same scalar type and device");
  // Binds a policy (TopK<2>, ...) to T and D, or takes a concrete router; a missing member of the
  // Router concept fails here with a one-line message naming it (moe/router_check.hpp).
  using router_type = checked_router_t<Route, T, D>;
  static constexpr std::size_t num_groups = sizeof...(Groups);
  static constexpr auto G = static_cast<index_t>(sizeof...(Groups));

  MixedMoE() = default;

  MixedMoE(const ModelConfig& cfg, Generator& gen) : d_model_(cfg.d_model) {
    const MoEConfig& moe = cfg.moe;
    MIXMOE_CHECK(static_cast<index_t>(moe.experts_per_group.size()) == G, "MixedMoE", "moe.experts_per_group has ",
                 moe.experts_per_group.size(), " entries for the ", G, " expert groups (", group_names(), ")");
    MIXMOE_CHECK(cfg.d_model > 0, "MixedMoE", "d_model must be positive, got ", cfg.d_model);
    MIXMOE_CHECK(moe.top_k >= 1, "MixedMoE", "moe.top_k must be >= 1, got ", moe.top_k);
    MIXMOE_CHECK(std::isfinite(moe.capacity_factor) && moe.capacity_factor >= 0, "MixedMoE",
                 "moe.capacity_factor must be >= 0 (0 = dropless), got ", moe.capacity_factor);
    capacity_factor_ = moe.capacity_factor;
    execution_ = moe.execution;
    precision_ = moe.expert_precision;
    check_precision(execution_, precision_, "MixedMoE");
    MIXMOE_CHECK(execution_ != ExpertExecution::grouped || all_grouped, "MixedMoE",
                 "moe.execution is grouped, but an expert type of the groups (", group_names(),
                 ") has no grouped form (static grouped(experts, x_sorted, rows), see GroupedExpert)");
    std::vector<index_t> hidden(num_groups);
    expert_offset_.assign(num_groups + 1, 0);
    for (std::size_t g = 0; g < num_groups; ++g) {
      const index_t n = moe.experts_per_group[g];
      MIXMOE_CHECK(n >= 1, "MixedMoE", "group ", tag_name(g), " needs at least one expert, moe.experts_per_group[", g,
                   "] is ", n);
      if (moe.expert_hidden > 0) {
        hidden[g] = moe.expert_hidden;
      } else {
        MIXMOE_CHECK(cfg.d_ff % n == 0, "MixedMoE", "d_ff ", cfg.d_ff, " is not divisible by the ", n,
                     " experts of group ", tag_name(g), "; set moe.expert_hidden");
        hidden[g] = cfg.d_ff / n;
      }
      expert_offset_[g + 1] = expert_offset_[g] + n;
    }
    for (std::size_t a = 0; a < num_groups; ++a)
      for (std::size_t b = a + 1; b < num_groups; ++b)
        MIXMOE_CHECK(std::string(tag_name(a)) != tag_name(b), "MixedMoE", "groups ", a, " and ", b,
                     " have the same tag name '", tag_name(a), "': parameter names would collide");

    fuse_groups_ = one_expert_type && std::all_of(hidden.begin(), hidden.end(), [&](index_t h) { return h == hidden[0]; });
    const double out_std = cfg.init_std / std::sqrt(2.0 * static_cast<double>(std::max<index_t>(cfg.layers, 1)));
    groups =
        make_groups(moe.experts_per_group, cfg.d_model, hidden, out_std, gen, std::index_sequence_for<Groups...>{});

    mix_ = num_groups == 1 ? GroupMix::shared_router : moe.mix;
    if (mix_ == GroupMix::shared_router) {
      MIXMOE_CHECK(moe.top_k <= num_experts(), "MixedMoE", "moe.top_k ", moe.top_k, " exceeds the ", num_experts(),
                   " experts of the shared router");
      routers.emplace_back(RouterShape{cfg.d_model, num_experts(), moe.top_k, cfg.vocab}, gen);
    } else {
      for (std::size_t g = 0; g < num_groups; ++g) {
        const index_t n = expert_offset_[g + 1] - expert_offset_[g];
        routers.emplace_back(RouterShape{cfg.d_model, n, std::min(moe.top_k, n), cfg.vocab}, gen);
      }
    }
    for (std::size_t r = 0; r < routers.size(); ++r) {
      const index_t want = mix_ == GroupMix::shared_router ? num_experts() : group_size(r);
      MIXMOE_CHECK(routers[r].num_experts() == want, "MixedMoE", "router ", router_name(r), " reports ",
                   routers[r].num_experts(), " experts, the layer built it for ", want);
    }
    if (mix_ == GroupMix::group_gate) group_gate = Linear<T, D>(cfg.d_model, G, false, gen);
    if (mix_ == GroupMix::fixed) {
      if (moe.fixed_mix.empty()) {
        fixed_mix_.assign(num_groups, 1.0 / static_cast<double>(num_groups));
      } else {
        MIXMOE_CHECK(moe.fixed_mix.size() == num_groups, "MixedMoE", "moe.fixed_mix has ", moe.fixed_mix.size(),
                     " weights for the ", G, " expert groups (", group_names(), ")");
        for (std::size_t g = 0; g < num_groups; ++g)
          MIXMOE_CHECK(std::isfinite(moe.fixed_mix[g]) && moe.fixed_mix[g] >= 0, "MixedMoE", "moe.fixed_mix[", g,
                       "] = ", moe.fixed_mix[g], " must be a finite weight >= 0");
        fixed_mix_ = moe.fixed_mix;
      }
    }
  }

  /// x (N, C) -> (N, C).
  Var<T, D> operator()(const Var<T, D>& x) const { return (*this)(x, RouteContext<D>{}); }

  /// x (N, C) -> (N, C), with per-call routing information (token ids for hash routers).
  Var<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const {
    MIXMOE_CHECK(!routers.empty(), "MixedMoE", "the layer is default-constructed: build it from a ModelConfig");
    MIXMOE_CHECK(x.defined() && x.dim() == 2 && x.size(1) == d_model_, "MixedMoE", "input must be (N, ", d_model_,
                 "), got ", x.defined() ? x.shape().to_string() : std::string("an undefined Var"));
    // Written in place: the records' vectors keep their capacity from step to step.
    std::vector<RoutingRecord<T, D>>& records = records_;
    records.clear();
    Var<T, D> out;
    if (mix_ == GroupMix::shared_router) {
      const Routing<T, D> routing = route(0, x, ctx);
      DispatchPlan<D> plan;
      if (grouped())
        out = moe_forward_grouped(
            x, routing, num_experts(), capacity_factor_,
            [this](const Var<T, D>& xs, const DispatchPlan<D>& p) {
              return all_experts_grouped(xs, GroupedRows<D>{p.device_offsets, precision_});
            },
            &plan);
      else
        out = moe_forward(
            x, routing, num_experts(), capacity_factor_,
            [this](index_t e, const Var<T, D>& rows) { return call_expert(e, rows); }, &plan);
      records.push_back(make_record(router_name(0), routing, plan));
    } else {
      Var<T, D> weights;  // (N * G) per-token group weights, row-major (N, G)
      if (mix_ == GroupMix::group_gate) weights = reshape(softmax(group_gate(x), -1), Shape{x.size(0) * G});
      [&]<std::size_t... I>(std::index_sequence<I...>) {
        ((out = add_group(out, run_group<I>(x, ctx, weights, records))), ...);
      }
      (std::index_sequence_for<Groups...>{});
    }
    return out;
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    std::apply([&](auto&... g) { (g.visit_parameters(visit, prefix), ...); }, groups);
    for (std::size_t r = 0; r < routers.size(); ++r)
      routers[r].visit_parameters(visit, join_name(prefix, router_name(r)));
    if (group_gate.weight.defined()) group_gate.visit_parameters(visit, join_name(prefix, "group_gate"));
  }

  /// An MoE layer is its own only MoE layer (see moe/moe_layer.hpp).
  template <class F>
  void visit_moe_layers(F&& f) {
    f(*this);
  }
  template <class F>
  void visit_moe_layers(F&& f) const {
    f(*this);
  }

  /// Per router, the routing of the last forward call (empty before the first one).
  [[nodiscard]] const std::vector<RoutingRecord<T, D>>& routing_records() const { return records_; }
  /// Forgets the last forward's routings (and the graph their probabilities hold on to).
  void clear_routing_records() const { records_.clear(); }
  /// Keeps the last forward's routing values (statistics) but lets go of their graph.
  void release_routing_graph() const {
    for (auto& rec : records_) rec.release_graph();
  }

  /// Rewrites router r's logits (N, E_r) -> (N, E_r) before its selection (see the header comment).
  using LogitIntervention = std::function<Var<T, D>(const Var<T, D>& logits)>;
  void set_logit_intervention(std::size_t r, LogitIntervention f) {
    MIXMOE_CHECK(r < routers.size(), "MixedMoE::set_logit_intervention", "router ", r, " of a layer with ",
                 routers.size(), " router(s)");
    MIXMOE_CHECK(LogitRouter<router_type>, "MixedMoE::set_logit_intervention", "router ", router_name(r),
                 " is not a LogitRouter (no logits(x) / select(logits, x, ctx)): its routing cannot be steered");
    if (interventions_.size() < routers.size()) interventions_.resize(routers.size());
    interventions_[r] = std::move(f);
  }
  [[nodiscard]] bool has_logit_intervention(std::size_t r) const {
    return r < interventions_.size() && static_cast<bool>(interventions_[r]);
  }
  /// Removes every router's intervention: the layer routes as built again.
  void clear_logit_interventions() { interventions_.clear(); }

  [[nodiscard]] GroupMix mix() const { return mix_; }
  /// How the experts run (as configured; see grouped() for what automatic means on this device).
  [[nodiscard]] ExpertExecution execution() const { return execution_; }
  /// Switches between grouped and per-expert execution (grouped needs GroupedExpert types).
  void set_execution(ExpertExecution e) {
    MIXMOE_CHECK(e != ExpertExecution::grouped || all_grouped, "MixedMoE::set_execution",
                 "an expert type of the groups (", group_names(), ") has no grouped form");
    check_precision(e, precision_, "MixedMoE::set_execution");
    execution_ = e;
  }
  /// The operand precision of the experts' grouped GEMMs (moe.expert_precision).
  [[nodiscard]] MatmulPrecision expert_precision() const { return precision_; }
  void set_expert_precision(MatmulPrecision p) {
    check_precision(execution_, p, "MixedMoE::set_expert_precision");
    precision_ = p;
  }
  /// True when the forward runs the experts grouped.
  [[nodiscard]] bool grouped() const {
    if constexpr (!all_grouped) {
      return false;
    } else {
      return execution_ == ExpertExecution::grouped ||
             (execution_ == ExpertExecution::automatic &&
              (!Tensor<T, D>::on_host || precision_ == MatmulPrecision::bf16));
    }
  }
  [[nodiscard]] double capacity_factor() const { return capacity_factor_; }
  [[nodiscard]] index_t d_model() const { return d_model_; }
  /// All experts, over every group.
  [[nodiscard]] index_t num_experts() const { return expert_offset_.empty() ? 0 : expert_offset_.back(); }
  [[nodiscard]] index_t group_size(std::size_t g) const { return expert_offset_[g + 1] - expert_offset_[g]; }
  /// Global id of group g's first expert (the shared router's numbering).
  [[nodiscard]] index_t expert_offset(std::size_t g) const { return expert_offset_[g]; }
  /// The fixed group weights (GroupMix::fixed only).
  [[nodiscard]] const std::vector<double>& fixed_mix() const { return fixed_mix_; }
  [[nodiscard]] static const char* tag_name(std::size_t g) {
    static constexpr const char* names[] = {Groups::tag_type::name...};
    return names[g];
  }
  /// The parameter prefix of router r: "router" or "router.<tag>".
  [[nodiscard]] std::string router_name(std::size_t r) const {
    return mix_ == GroupMix::shared_router ? std::string("router") : "router." + std::string(tag_name(r));
  }

  /// Group I, or the group tagged Tag.
  template <std::size_t I>
  auto& group() {
    return std::get<I>(groups);
  }
  template <std::size_t I>
  const auto& group() const {
    return std::get<I>(groups);
  }
  template <class Tag>
  static constexpr std::size_t index_of = detail::group_index_of<Tag, Groups...>();
  template <class Tag>
  static constexpr bool has_group = index_of<Tag> < sizeof...(Groups);
  template <class Tag>
  auto& group() {
    static_assert(has_group<Tag>, "MixedMoE::group<Tag>(): no group of the layer has this tag");
    return std::get<index_of<Tag>>(groups);
  }
  template <class Tag>
  const auto& group() const {
    static_assert(has_group<Tag>, "MixedMoE::group<Tag>(): no group of the layer has this tag");
    return std::get<index_of<Tag>>(groups);
  }

  std::tuple<Groups...> groups;
  std::vector<router_type> routers;  // one (shared_router, or one group) or one per group, in group order
  Linear<T, D> group_gate;           // (G, C) weight; GroupMix::group_gate only

 private:
  static constexpr bool all_grouped = (GroupedExpert<typename Groups::expert_type> && ...);
  static constexpr bool one_expert_type =
      (std::is_same_v<typename Groups::expert_type, typename first_group::expert_type> && ...);

  /// bf16 expert GEMMs exist only as grouped GEMMs of float tensors.
  static void check_precision(ExpertExecution e, MatmulPrecision p, const char* where) {
    if (p != MatmulPrecision::bf16) return;
    MIXMOE_CHECK((std::is_same_v<T, float>), where, "moe.expert_precision bf16 needs a float model (got ", sizeof(T) * 8,
                 "-bit)");
    MIXMOE_CHECK(all_grouped, where, "moe.expert_precision bf16 runs the experts grouped, but an expert type of the groups (",
                 group_names(), ") has no grouped form");
    MIXMOE_CHECK(e != ExpertExecution::per_expert, where,
                 "moe.expert_precision bf16 needs grouped execution (moe.execution grouped or automatic), not per_expert");
  }

  static std::string group_names() {
    std::string s;
    for (std::size_t g = 0; g < num_groups; ++g) {
      if (g) s += ", ";
      s += tag_name(g);
    }
    return s;
  }

  template <std::size_t... I>
  static std::tuple<Groups...> make_groups(const std::vector<index_t>& counts, index_t d_model,
                                           const std::vector<index_t>& hidden, double out_std, Generator& gen,
                                           std::index_sequence<I...>) {
    // A braced list is evaluated left to right: the groups draw from gen in group order.
    return std::tuple<Groups...>{Groups(counts[I], d_model, hidden[I], gen, out_std)...};
  }

  /// Router r's routing of x, through its logit intervention when one is set.
  Routing<T, D> route(std::size_t r, const Var<T, D>& x, const RouteContext<D>& ctx) const {
    if constexpr (LogitRouter<router_type>) {
      if (r < interventions_.size() && interventions_[r]) {
        const Var<T, D> z = routers[r].logits(x);
        const Var<T, D> steered = interventions_[r](z);
        MIXMOE_CHECK(steered.defined() && steered.shape() == z.shape(), "MixedMoE", "the logit intervention of router ",
                     router_name(r), " returned ", steered.defined() ? steered.shape().to_string() : "an undefined Var",
                     " for logits ", z.shape());
        return routers[r].select(steered, x, ctx);
      }
    }
    return routers[r](x, ctx);
  }

  /// Expert e of the shared numbering on its rows.
  Var<T, D> call_expert(index_t e, const Var<T, D>& rows) const {
    Var<T, D> out;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (void)((e >= expert_offset_[I] && e < expert_offset_[I + 1]
                  ? (out = std::get<I>(groups)(e - expert_offset_[I], rows), true)
                  : false) ||
             ...);
    }
    (std::index_sequence_for<Groups...>{});
    return out;
  }

  /// Every expert of every group on the rows sorted by the shared router (offsets (E + 1) in its numbering):
  /// one grouped call when the groups share an expert type and width, else one per group over the same
  /// rows (each group's call leaves the others' rows 0, so the outputs add).
  Var<T, D> all_experts_grouped(const Var<T, D>& xs, const GroupedRows<D>& rows) const {
    if constexpr (all_grouped) {
      if constexpr (one_expert_type) {
        if (fuse_groups_) {
          using E = typename first_group::expert_type;
          std::vector<const E*> list;
          list.reserve(static_cast<std::size_t>(num_experts()));
          std::apply([&](const auto&... g) { ((std::for_each(g.experts.begin(), g.experts.end(),
                                                             [&](const E& e) { list.push_back(&e); })),
                                              ...); },
                     groups);
          return E::grouped(std::span<const E* const>(list.data(), list.size()), xs, rows);
        }
      }
      Var<T, D> y;
      [&]<std::size_t... I>(std::index_sequence<I...>) {
        ((y = add_group(y, std::get<I>(groups).grouped(
                               xs, GroupedRows<D>{rows.offsets.slice(0, expert_offset_[I], expert_offset_[I + 1] + 1),
                                                  rows.precision}))),
         ...);
      }
      (std::index_sequence_for<Groups...>{});
      return y;
    } else {
      (void)xs;
      (void)rows;
      detail::fail("MixedMoE", "grouped execution needs GroupedExpert types");
    }
  }

  /// Group I with its own router, its gates scaled by the group weights.
  template <std::size_t I>
  Var<T, D> run_group(const Var<T, D>& x, const RouteContext<D>& ctx, const Var<T, D>& weights,
                      std::vector<RoutingRecord<T, D>>& records) const {
    const auto& grp = std::get<I>(groups);
    const Routing<T, D> routing = route(I, x, ctx);
    Routing<T, D> scaled = routing;
    MIXMOE_CHECK(routing.gate.defined() && routing.token.defined(), "MixedMoE", "router ", router_name(I),
                 " returned a routing without gates or tokens");
    if (mix_ == GroupMix::group_gate) {
      // w[token[m], I] for every assignment m of this group: the flat row-major index token * G + I.
      const index_t m = routing.token.numel();
      const Tensor<Index, D> tc = routing.token.contiguous();
      Tensor<Index, D> at = Tensor<Index, D>::empty({m});
      if constexpr (!Tensor<Index, D>::on_host) {
        detail::require_device_ops<D>();
        detail::DeviceOps<D>::moe_affine_index(tc.data(), m, x.size(0), G, static_cast<index_t>(I), at.data());
      } else {
        for (index_t i = 0; i < m; ++i) at.data()[i] = static_cast<Index>(tc.data()[i] * G + static_cast<index_t>(I));
      }
      MIXMOE_CHECK(routing.gate.dim() == 1 && routing.gate.size(0) == m, "MixedMoE", "router ", router_name(I),
                   " returned gates ", routing.gate.shape(), " for ", m, " assignments");
      // at = token * G + I, a token outside [0, N) taken as 0 on a device (the plan then poisons the
      // output and reports it): always in range, so no device check or wait
      scaled.gate = routing.gate * index_select(weights, 0, at, IndexCheck::trusted);  // (M)
    } else {
      scaled.gate = routing.gate * fixed_mix_[I];
    }
    DispatchPlan<D> plan;
    Var<T, D> y;
    if (grouped()) {
      if constexpr (GroupedExpert<typename std::tuple_element_t<I, std::tuple<Groups...>>::expert_type>)
        y = moe_forward_grouped(
            x, scaled, grp.size(), capacity_factor_,
            [&](const Var<T, D>& xs, const DispatchPlan<D>& p) {
              return grp.grouped(xs, GroupedRows<D>{p.device_offsets, precision_});
            },
            &plan);
    } else {
      y = moe_forward(
          x, scaled, grp.size(), capacity_factor_, [&grp](index_t e, const Var<T, D>& rows) { return grp(e, rows); },
          &plan);
    }
    records.push_back(make_record(router_name(I), routing, plan));
    return y;
  }

  static Var<T, D> add_group(const Var<T, D>& acc, const Var<T, D>& y) { return acc.defined() ? acc + y : y; }

  static RoutingRecord<T, D> make_record(std::string name, const Routing<T, D>& routing, const DispatchPlan<D>& plan) {
    RoutingRecord<T, D> rec;
    rec.name = std::move(name);
    rec.routing = routing;
    rec.counts = plan.counts;  // read from the device only when someone asks (statistics)
    rec.capacity = plan.capacity;
    return rec;
  }

  index_t d_model_ = 0;
  double capacity_factor_ = 0.0;
  GroupMix mix_ = GroupMix::shared_router;
  ExpertExecution execution_ = ExpertExecution::automatic;
  MatmulPrecision precision_ = MatmulPrecision::native;
  bool fuse_groups_ = false;  // shared router, one expert type and width: all groups in one grouped call
  std::vector<index_t> expert_offset_;  // (G + 1)
  std::vector<double> fixed_mix_;
  mutable std::vector<RoutingRecord<T, D>> records_;
  std::vector<LogitIntervention> interventions_;  // per router, or empty: none set
};

/// True for MixedMoE types.
template <class L>
inline constexpr bool is_mixed_moe_v = false;
template <class Route, class... Groups>
inline constexpr bool is_mixed_moe_v<MixedMoE<Route, Groups...>> = true;

}  // namespace mixmoe
