// Routing Steering (RA-MoE's inference-time baseline, after Bandarkar et al.): shift the
// router logits of chosen ("task") experts so that a target language's tokens use them.
//
//   z (N, E) one router's logits, S the chosen experts of that router, k its experts per token
//   soft: z'_{n,e} = z_{n,e} + λ · std(z_n)                       for e in S (others unchanged)
//         std(z_n) = sqrt(mean_e (z_{n,e} − mean(z_n))²), the population std over the row's E
//         logits, computed from the values and DETACHED (a constant per token; the shift carries
//         no gradient, steering is meant for inference). λ defaults to 0.5.
//   hard: z'_{n,e} = z_{n,e} + m_n                                 for e in S (others unchanged)
//         m_n = max(0, max_{e∉S} z_{n,e} − min_{e∈S} z_{n,e} + δ_n), δ_n = 1e-3 (1 + |max_{e∉S} z_{n,e}|)
//         one detached shift per token, common to all of S, that ranks every expert of S above
//         every other (tokens whose S already ranks first are unchanged). A token-choice router
//         then picks min(|S|, k) experts of S: all of S when |S| <= k, else the k of S with the
//         largest logits (a common shift keeps their order), plus the best others when |S| < k.
//         Gates: with |S| >= k and renormalised top-k gates (TopK<K, true>) the shift cancels and
//         the gates are exactly the softmax of the UNSTEERED logits over the chosen experts; with
//         |S| < k the others that fill the top-k get small gates (exp(−m_n) relative); routers
//         whose gates are the plain probs (Switch, TopK<K, false>) give S nearly all the mass.
//         Expert-choice routers see S's scores raised but guarantee no token its experts.
//
// Router slots: a model's routers in the order visit_moe_layers visits its MoE layers and,
// inside a layer, the order of its routing_records() ("router", or "router.lm", "router.mt"
// with per-group routers). Expert ids are local to their router (the shared router numbers the
// experts of all groups, group by group).
//
//   RoutingSteering spec{task_experts, SteeringMode::soft, 0.5, {}};   // [slot] -> expert ids
//   { SteeringGuard guard(model, spec); evaluate(model); }              // steered inside the scope
//
// apply_steering installs one logit intervention per steered router (MixedMoE's
// set_logit_intervention, moe/mixed_moe.hpp); the routing records then show the steered
// routing. Only LogitRouters can be steered (a hash router has no logits): an error otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/ops/elementwise.hpp"

namespace mixmoe {

enum class SteeringMode { soft, hard };

inline const char* steering_mode_name(SteeringMode m) { return m == SteeringMode::soft ? "soft" : "hard"; }

/// What to steer: chosen experts per router slot, the mode, λ (soft) and the MoE layers.
struct RoutingSteering {
  std::vector<std::vector<index_t>> experts;  // [slot] -> expert ids local to that router; empty = not steered
  SteeringMode mode = SteeringMode::soft;
  double lambda = 0.5;          // soft: the shift in units of the token's logit std
  std::vector<index_t> layers;  // MoE layer indices (visit order) to steer; empty = every layer
};

namespace detail {

/// One router slot as steering and RISE see it: its MoE layer (visit order), its index in the
/// layer, its name ("router", "router.lm", ...) and its number of experts.
struct SteerSlot {
  index_t layer = 0;
  index_t router = 0;
  std::string name;
  index_t num_experts = 0;
};

template <class L>
concept has_router_list = requires(const L& l) {
  l.routers.size();
  { l.router_name(std::size_t{0}) } -> std::convertible_to<std::string>;
  { l.routers[0].num_experts() } -> std::convertible_to<index_t>;
};

template <class L>
concept steerable_layer = has_router_list<L> && requires(L& l) {
  typename L::LogitIntervention;
  l.set_logit_intervention(std::size_t{0}, typename L::LogitIntervention{});
  l.clear_logit_interventions();
};

/// The router slots of a model (or of one MoE layer). A layer with a `routers` list (MixedMoE)
/// gives one slot per router; any other MoE layer one per record of its last forward (so it
/// must have run one).
template <class Model>
std::vector<SteerSlot> steer_slots(Model& model, const char* op) {
  std::vector<SteerSlot> slots;
  index_t layer = 0;
  visit_moe_layers(model, [&](auto& l) {
    using L = std::remove_cvref_t<decltype(l)>;
    if constexpr (has_router_list<L>) {
      for (std::size_t r = 0; r < l.routers.size(); ++r)
        slots.push_back({layer, static_cast<index_t>(r), l.router_name(r), l.routers[r].num_experts()});
    } else {
      const auto& recs = l.routing_records();
      MIXMOE_CHECK(!recs.empty(), op, "MoE layer ", layer,
                   " has no router list and no routing records: run a forward first");
      for (std::size_t r = 0; r < recs.size(); ++r)
        slots.push_back({layer, static_cast<index_t>(r), recs[r].name, recs[r].routing.num_experts});
    }
    ++layer;
  });
  return slots;
}

}  // namespace detail

/// The steered logits z' (N, E) of z (N, E) for the chosen experts (see the header comment).
/// The shift is a constant: dz'/dz is the identity.
template <Scalar T, Device D>
Var<T, D> steer_logits(const Var<T, D>& logits, const std::vector<index_t>& experts, SteeringMode mode,
                       double lambda = 0.5) {
  detail::require_host<D>();  // host loops; the RA-MoE ops run on Cpu tensors (docs/cuda.md)
  MIXMOE_CHECK(logits.defined() && logits.dim() == 2, "steer_logits", "logits must be (N, E), got ",
               logits.defined() ? logits.shape().to_string() : std::string("an undefined Var"));
  const index_t n = logits.size(0), e = logits.size(1);
  std::vector<char> chosen(static_cast<std::size_t>(e), 0);
  for (const index_t id : experts) {
    MIXMOE_CHECK(id >= 0 && id < e, "steer_logits", "expert ", id, " is out of range [0, ", e, ")");
    chosen[static_cast<std::size_t>(id)] = 1;
  }
  MIXMOE_CHECK(std::isfinite(lambda), "steer_logits", "lambda must be finite, got ", lambda);
  const Tensor<T, D> z = logits.value().contiguous();
  Tensor<T, D> shift = Tensor<T, D>::zeros({n, e});
  const T* zp = z.data();
  T* sp = shift.data();
  for (index_t i = 0; i < n; ++i) {
    const T* row = zp + i * e;
    double delta = 0.0;
    if (mode == SteeringMode::soft) {
      double mean = 0.0;
      for (index_t j = 0; j < e; ++j) mean += static_cast<double>(row[j]);
      mean /= static_cast<double>(e);
      double var = 0.0;
      for (index_t j = 0; j < e; ++j)
        var += (static_cast<double>(row[j]) - mean) * (static_cast<double>(row[j]) - mean);
      delta = lambda * std::sqrt(var / static_cast<double>(e));
    } else {
      double min_in = std::numeric_limits<double>::infinity(), max_out = -std::numeric_limits<double>::infinity();
      for (index_t j = 0; j < e; ++j) {
        const double v = static_cast<double>(row[j]);
        if (chosen[static_cast<std::size_t>(j)])
          min_in = std::min(min_in, v);
        else
          max_out = std::max(max_out, v);
      }
      if (std::isfinite(min_in) && std::isfinite(max_out) && min_in <= max_out)
        delta = max_out - min_in + 1e-3 * (1.0 + std::abs(max_out));
    }
    for (index_t j = 0; j < e; ++j)
      if (chosen[static_cast<std::size_t>(j)]) sp[i * e + j] = static_cast<T>(delta);
  }
  return logits + Var<T, D>(std::move(shift));
}

/// Checks a spec against the model's slots; returns, per slot, whether it is steered.
template <class Model>
std::vector<bool> steered_slots(Model& model, const RoutingSteering& spec) {
  const std::vector<detail::SteerSlot> slots = detail::steer_slots(model, "apply_steering");
  MIXMOE_CHECK(spec.experts.size() == slots.size(), "apply_steering", "the spec has expert sets for ",
               spec.experts.size(), " router slots, the model has ", slots.size());
  MIXMOE_CHECK(std::isfinite(spec.lambda), "apply_steering", "lambda must be finite, got ", spec.lambda);
  const index_t layers = slots.empty() ? 0 : slots.back().layer + 1;
  for (const index_t l : spec.layers)
    MIXMOE_CHECK(l >= 0 && l < layers, "apply_steering", "layer ", l, " is out of range: the model has ", layers,
                 " MoE layers");
  std::vector<bool> on(slots.size(), false);
  for (std::size_t s = 0; s < slots.size(); ++s) {
    std::vector<index_t> ids = spec.experts[s];
    for (const index_t id : ids)
      MIXMOE_CHECK(id >= 0 && id < slots[s].num_experts, "apply_steering", "slot ", s, " (layer ", slots[s].layer, ", ",
                   slots[s].name, "): expert ", id, " is out of range [0, ", slots[s].num_experts, ")");
    std::sort(ids.begin(), ids.end());
    MIXMOE_CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end(), "apply_steering", "slot ", s,
                 " lists an expert twice");
    const bool layer_on =
        spec.layers.empty() || std::find(spec.layers.begin(), spec.layers.end(), slots[s].layer) != spec.layers.end();
    on[s] = layer_on && !ids.empty();
  }
  return on;
}

/// Removes every routing intervention of the model: it routes as built again.
template <class Model>
void clear_steering(Model& model) {
  visit_moe_layers(model, [&](auto& l) {
    using L = std::remove_cvref_t<decltype(l)>;
    if constexpr (detail::steerable_layer<L>) l.clear_logit_interventions();
    (void)l;
  });
}

/// Installs the spec's interventions (after removing any earlier ones); returns the number of
/// routers steered. On an error (a router that is not a LogitRouter, ...) nothing stays steered.
template <class Model>
index_t apply_steering(Model& model, const RoutingSteering& spec) {
  const std::vector<bool> on = steered_slots(model, spec);
  clear_steering(model);
  std::size_t slot = 0;
  index_t layer = 0, count = 0;
  try {
    visit_moe_layers(model, [&](auto& l) {
      using L = std::remove_cvref_t<decltype(l)>;
      if constexpr (detail::steerable_layer<L>) {
        using V = Var<typename L::value_type, typename L::device_type>;
        for (std::size_t r = 0; r < l.routers.size(); ++r, ++slot) {
          if (!on[slot]) continue;
          l.set_logit_intervention(r, [ids = spec.experts[slot], mode = spec.mode, lambda = spec.lambda](const V& z) {
            return steer_logits(z, ids, mode, lambda);
          });
          ++count;
        }
      } else {
        const std::size_t n = l.routing_records().size();
        for (std::size_t r = 0; r < n; ++r, ++slot)
          MIXMOE_CHECK(!on[slot], "apply_steering", "MoE layer ", layer,
                       " has no routing intervention hook: its routers cannot be steered");
      }
      ++layer;
    });
  } catch (...) {
    clear_steering(model);
    throw;
  }
  return count;
}

/// Steers the model for the lifetime of the guard; the destructor removes every intervention.
template <class Model>
class SteeringGuard {
 public:
  SteeringGuard(Model& model, const RoutingSteering& spec) : model_(&model) { steered_ = apply_steering(model, spec); }
  ~SteeringGuard() { clear_steering(*model_); }
  SteeringGuard(const SteeringGuard&) = delete;
  SteeringGuard& operator=(const SteeringGuard&) = delete;

  /// Routers steered.
  [[nodiscard]] index_t steered() const { return steered_; }

 private:
  Model* model_;
  index_t steered_ = 0;
};

}  // namespace mixmoe
