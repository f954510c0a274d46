// RISE expert selection (an RA-MoE baseline): pick, per layer zone, the experts a target
// language relies on from routing statistics, then fine-tune only those experts.
//
//   f[L][s][k]  routing frequency of expert k of router slot s for language L (e.g. the share
//               of L's tokens routed to k), L = 0..NL-1, English among them (options.english)
//   specificity spec[s][k] = f[t][s][k] − (1/NL) Σ_L f[L][s][k]
//               how much more the target t uses k than the languages on average
//   overlap     ovl[s][k]  = min(f[t][s][k], f[en][s][k])
//               the routing mass t and English share on k (high: k serves both, a bridge
//               through which English skill can reach t; low: k is idle for one of them)
//   score       score[s][k] = w_spec · spec[s][k] + w_ovl · ovl[s][k]
//               both terms are frequencies, so the weights compare like with like
//   selection   in a slot of zone z, the options.experts_per_slot[z] highest scores
//               (above options.min_score; ties: the lower id), listed by descending score
//
// Zones: shallow / middle / deep. zones_by_thirds(L) puts MoE layer l in zone
// floor(3 (l + 1/2) / L) (centre of the layer), symmetric for any L: 1 layer -> middle,
// 2 -> shallow, deep, 4 -> shallow, middle, middle, deep. Or pass a zone per MoE layer.
//
// Router slots and expert ids follow align/steering.hpp: routers in visit_moe_layers order,
// inside a layer the order of its routing_records(); ids local to the router. Frequencies
// from different routers are compared only within their slot, so their scale may differ.
//
// Fine-tuning: experts_only_policy(model, experts) is a FreezePolicy (train/freeze.hpp)
// that trains exactly the selected experts, "layers.3.ffn.lm.experts.2.*" for expert 2 of
// slot "router.lm" of MoE layer 3 in a DecoderLM, and freezes everything else (attention,
// norms, embeddings, routers, group gates, the other experts):
//
//   auto zones = slot_zones(model);                                   // thirds of the MoE layers
//   RiseSelection sel = rise_select(freq, /*target=*/de, zones, {.english = en});
//   apply_freeze_policy(model, experts_only_policy(model, sel.experts));
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/align/steering.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/train/freeze.hpp"

namespace mixmoe {

enum class LayerZone { shallow = 0, middle = 1, deep = 2 };

inline const char* zone_name(LayerZone z) {
  return z == LayerZone::shallow ? "shallow" : z == LayerZone::middle ? "middle" : "deep";
}

/// Zone of each of num_layers layers: floor(3 (l + 1/2) / num_layers).
inline std::vector<LayerZone> zones_by_thirds(index_t num_layers) {
  MIXMOE_CHECK(num_layers >= 0, "zones_by_thirds", "num_layers must be >= 0, got ", num_layers);
  std::vector<LayerZone> z(static_cast<std::size_t>(num_layers));
  for (index_t l = 0; l < num_layers; ++l)
    z[static_cast<std::size_t>(l)] = static_cast<LayerZone>((6 * l + 3) / (2 * num_layers));
  return z;
}

/// Zone of each router slot of the model: layer_zones[layer of the slot], or thirds of the
/// model's MoE layers when layer_zones is empty.
template <class Model>
std::vector<LayerZone> slot_zones(Model& model, const std::vector<LayerZone>& layer_zones = {}) {
  const std::vector<detail::SteerSlot> slots = detail::steer_slots(model, "slot_zones");
  const std::vector<LayerZone> zones = layer_zones.empty() ? zones_by_thirds(count_moe_layers(model)) : layer_zones;
  std::vector<LayerZone> out;
  out.reserve(slots.size());
  for (const detail::SteerSlot& s : slots) {
    MIXMOE_CHECK(static_cast<std::size_t>(s.layer) < zones.size(), "slot_zones", "MoE layer ", s.layer,
                 " has no zone: ", zones.size(), " zones given");
    out.push_back(zones[static_cast<std::size_t>(s.layer)]);
  }
  return out;
}

/// Routing frequencies per language, [language][slot][expert] (e.g. each language's
/// RoutingFrequencies::selection_frequency(), align/routing_capture.hpp).
using LanguageFrequencies = std::vector<std::vector<std::vector<double>>>;

struct RiseOptions {
  std::size_t english = 0;                              // index of English on the language axis
  std::array<index_t, 3> experts_per_slot = {1, 2, 1};  // per zone: shallow, middle, deep
  double specificity_weight = 1.0;
  double overlap_weight = 1.0;
  double min_score = -std::numeric_limits<double>::infinity();  // never select an expert scoring below
};

struct RiseSelection {
  std::vector<std::vector<double>> specificity;  // [slot][expert]
  std::vector<std::vector<double>> overlap;      // [slot][expert]
  std::vector<std::vector<double>> score;        // [slot][expert]
  std::vector<std::vector<index_t>> experts;     // [slot] -> selected ids, by descending score
  std::vector<LayerZone> zones;                  // [slot]

  /// Selected experts over all slots.
  [[nodiscard]] index_t count() const {
    index_t n = 0;
    for (const auto& s : experts) n += static_cast<index_t>(s.size());
    return n;
  }
};

/// Scores and selection for the target language `target` (see the header comment).
inline RiseSelection rise_select(const LanguageFrequencies& freq, std::size_t target,
                                 const std::vector<LayerZone>& zones, const RiseOptions& options = {}) {
  const char* op = "rise_select";
  MIXMOE_CHECK(!freq.empty(), op, "no languages in the frequency table");
  const std::size_t langs = freq.size();
  MIXMOE_CHECK(target < langs, op, "target language ", target, " is out of range: ", langs, " languages");
  MIXMOE_CHECK(options.english < langs, op, "English (", options.english, ") is out of range: ", langs, " languages");
  const std::size_t slots = freq[0].size();
  MIXMOE_CHECK(zones.size() == slots, op, zones.size(), " zones for ", slots, " router slots");
  for (std::size_t z = 0; z < 3; ++z)
    MIXMOE_CHECK(options.experts_per_slot[z] >= 0, op, "experts_per_slot[", zone_name(static_cast<LayerZone>(z)),
                 "] must be >= 0, got ", options.experts_per_slot[z]);
  MIXMOE_CHECK(std::isfinite(options.specificity_weight) && std::isfinite(options.overlap_weight), op,
               "the weights must be finite");
  for (std::size_t l = 0; l < langs; ++l) {
    MIXMOE_CHECK(freq[l].size() == slots, op, "language ", l, " has ", freq[l].size(), " slots, language 0 has ",
                 slots);
    for (std::size_t s = 0; s < slots; ++s) {
      MIXMOE_CHECK(freq[l][s].size() == freq[0][s].size(), op, "slot ", s, ": language ", l, " has ", freq[l][s].size(),
                   " experts, language 0 has ", freq[0][s].size());
      for (std::size_t k = 0; k < freq[l][s].size(); ++k)
        MIXMOE_CHECK(std::isfinite(freq[l][s][k]) && freq[l][s][k] >= 0, op, "frequency [", l, "][", s, "][", k,
                     "] = ", freq[l][s][k], " must be finite and >= 0");
    }
  }

  RiseSelection sel;
  sel.zones = zones;
  sel.specificity.resize(slots);
  sel.overlap.resize(slots);
  sel.score.resize(slots);
  sel.experts.resize(slots);
  for (std::size_t s = 0; s < slots; ++s) {
    const std::size_t e = freq[0][s].size();
    auto& spec = sel.specificity[s];
    auto& ovl = sel.overlap[s];
    auto& score = sel.score[s];
    spec.assign(e, 0.0);
    ovl.assign(e, 0.0);
    score.assign(e, 0.0);
    for (std::size_t k = 0; k < e; ++k) {
      double mean = 0.0;
      for (std::size_t l = 0; l < langs; ++l) mean += freq[l][s][k];
      mean /= static_cast<double>(langs);
      spec[k] = freq[target][s][k] - mean;
      ovl[k] = std::min(freq[target][s][k], freq[options.english][s][k]);
      score[k] = options.specificity_weight * spec[k] + options.overlap_weight * ovl[k];
    }
    std::vector<index_t> order(e);
    std::iota(order.begin(), order.end(), index_t{0});
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
    const auto want = static_cast<std::size_t>(options.experts_per_slot[static_cast<std::size_t>(zones[s])]);
    for (std::size_t i = 0; i < order.size() && sel.experts[s].size() < want; ++i)
      if (score[static_cast<std::size_t>(order[i])] >= options.min_score) sel.experts[s].push_back(order[i]);
  }
  return sel;
}

namespace detail {

template <class L>
concept named_expert_layer = has_router_list<L> && requires(const L& l) {
  { l.mix() } -> std::same_as<GroupMix>;
  { L::tag_name(std::size_t{0}) } -> std::convertible_to<std::string>;
  { l.expert_offset(std::size_t{0}) } -> std::convertible_to<index_t>;
  { l.group_size(std::size_t{0}) } -> std::convertible_to<index_t>;
  { L::num_groups } -> std::convertible_to<std::size_t>;
};

}  // namespace detail

/// The parameter-name prefix of every expert of every router slot, [slot][expert]:
/// "layers.3.ffn.lm.experts.2" (the expert's parameters are "<prefix>.*").
template <Module Model>
std::vector<std::vector<std::string>> expert_parameter_prefixes(Model& model) {
  using V = module_var_t<Model>;
  std::vector<std::pair<const void*, std::string>> full;
  model.visit_parameters([&](const std::string& name, V& p) { full.emplace_back(p.node().get(), name); }, "");
  std::vector<std::vector<std::string>> out;
  index_t layer = 0;
  visit_moe_layers(model, [&](auto& l) {
    using L = std::remove_cvref_t<decltype(l)>;
    if constexpr (!detail::named_expert_layer<L>) {
      (void)l;
      MIXMOE_CHECK(false, "expert_parameter_prefixes", "MoE layer ", layer,
                   " is not a MixedMoE: its experts' parameter names are unknown");
    } else {
      // The layer's prefix inside the model: the full name of its first parameter less its local name.
      const void* node = nullptr;
      std::string local;
      l.visit_parameters(
          [&](const std::string& name, V& p) {
            if (node == nullptr) {
              node = p.node().get();
              local = name;
            }
          },
          "");
      MIXMOE_CHECK(node != nullptr, "expert_parameter_prefixes", "MoE layer ", layer, " has no parameters");
      const auto it = std::find_if(full.begin(), full.end(), [&](const auto& f) { return f.first == node; });
      MIXMOE_CHECK(it != full.end(), "expert_parameter_prefixes", "MoE layer ", layer,
                   "'s parameters are not among the model's");
      const std::string& name = it->second;
      const bool ends = name.size() >= local.size() &&
                        name.compare(name.size() - local.size(), local.size(), local) == 0 &&
                        (name.size() == local.size() || name[name.size() - local.size() - 1] == '.');
      MIXMOE_CHECK(ends, "expert_parameter_prefixes", "parameter '", name, "' does not end with the layer's name '",
                   local, "'");
      const std::string prefix =
          name.size() == local.size() ? std::string() : name.substr(0, name.size() - local.size() - 1);
      const auto expert_name = [&](std::size_t g, index_t i) {
        return join_name(prefix, std::string(L::tag_name(g)) + ".experts." + std::to_string(i));
      };
      for (std::size_t r = 0; r < l.routers.size(); ++r) {
        std::vector<std::string> names;
        if (l.mix() == GroupMix::shared_router) {
          for (std::size_t g = 0; g < L::num_groups; ++g)
            for (index_t i = 0; i < l.group_size(g); ++i) names.push_back(expert_name(g, i));
        } else {
          for (index_t i = 0; i < l.group_size(r); ++i) names.push_back(expert_name(r, i));
        }
        MIXMOE_CHECK(static_cast<index_t>(names.size()) == l.routers[r].num_experts(), "expert_parameter_prefixes",
                     "router ", l.router_name(r), " of MoE layer ", layer, " has ", l.routers[r].num_experts(),
                     " experts, its groups ", names.size());
        out.push_back(std::move(names));
      }
    }
    ++layer;
  });
  return out;
}

/// A FreezePolicy that trains exactly the given experts ([slot] -> ids) and freezes every other parameter.
template <Module Model>
FreezePolicy experts_only_policy(Model& model, const std::vector<std::vector<index_t>>& experts) {
  const std::vector<std::vector<std::string>> names = expert_parameter_prefixes(model);
  MIXMOE_CHECK(experts.size() == names.size(), "experts_only_policy", "expert sets for ", experts.size(),
               " router slots, the model has ", names.size());
  FreezePolicy policy;
  policy.otherwise_freeze();
  for (std::size_t s = 0; s < experts.size(); ++s)
    for (const index_t id : experts[s]) {
      MIXMOE_CHECK(id >= 0 && id < static_cast<index_t>(names[s].size()), "experts_only_policy", "slot ", s,
                   ": expert ", id, " is out of range [0, ", names[s].size(), ")");
      policy.train(names[s][static_cast<std::size_t>(id)] + ".*");
    }
  return policy;
}

}  // namespace mixmoe
