// Routing statistics: how much each expert is used, how sure the router is, what was dropped.
//
//   N tokens, E experts of one router, M assignments
//
//   tokens_per_expert[e]  assignments the router sent to e (a token counts once per expert it goes to),
//                         dropped ones included; kept_per_expert[e] is what capacity let through
//   entropy               mean over tokens of -sum_e p log p of the routing distribution probs (N, E), in nats;
//                         max_entropy = log E is the value of a router that cannot tell experts apart
//   load_ratio            max_e tokens_per_expert / mean_e tokens_per_expert: 1 = perfectly balanced, E = all on one
//   dropped               assignments over capacity (0 when dropless)
//
// collect_routing_stats(model) reads every MoE layer's last forward (moe/moe_layer.hpp);
// format_routing_stats() prints one line per router:
//
//   layer router     tokens assigned dropped entropy    load  tokens per expert
//   0     router.lm      64      128       0 0.62/1.39  1.41  40 25 33 30
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/routing.hpp"

namespace mixmoe {

struct RoutingStats {
  index_t layer = 0;                       // index of the MoE layer in forward order
  std::string router;                      // the router's name inside the layer ("router", "router.lm", ...)
  index_t num_tokens = 0;                  // N
  index_t num_assignments = 0;             // M
  std::vector<index_t> tokens_per_expert;  // (E) routed, dropped included
  std::vector<index_t> kept_per_expert;    // (E) processed
  double entropy = 0;                      // mean per-token entropy of probs (nats)
  double max_entropy = 0;                  // log E
  double load_ratio = 0;                   // max / mean of tokens_per_expert (0 when nothing is routed)
  index_t dropped = 0;
  index_t capacity = 0;  // 0 = dropless

  [[nodiscard]] index_t num_experts() const { return static_cast<index_t>(tokens_per_expert.size()); }
};

/// Statistics of one routing (dispatch counts: `kept` per expert and `dropped`; empty kept = all kept).
template <Scalar T, Device D, class List = std::vector<index_t>>
RoutingStats routing_stats(const Routing<T, D>& routing, const List& kept = {}, index_t dropped = 0) {
  const Var<T, D>& probs = routing.probs;
  MIXMOE_CHECK(probs.defined() && probs.dim() == 2, "routing_stats", "routing.probs must be (N, E), got ",
               probs.defined() ? probs.shape().to_string() : std::string("an undefined Var"));
  const index_t n = probs.size(0), e_count = probs.size(1);
  MIXMOE_CHECK(routing.expert.defined() && routing.expert.dim() == 1, "routing_stats",
               "routing.expert must be a 1-D list of assignments, got ", routing.expert.shape());
  MIXMOE_CHECK(kept.empty() || static_cast<index_t>(kept.size()) == e_count, "routing_stats", kept.size(),
               " kept counts for ", e_count, " experts");
  RoutingStats s;
  s.num_tokens = n;
  s.num_assignments = routing.expert.numel();
  s.tokens_per_expert.assign(static_cast<std::size_t>(e_count), 0);
  // Statistics are read on the host: a device routing is copied there (on Cpu, no copy).
  const Tensor<Index, Cpu> ex = to_device<Cpu>(routing.expert.contiguous());
  for (index_t i = 0; i < s.num_assignments; ++i) {
    const Index e = ex.data()[i];
    MIXMOE_CHECK(e >= 0 && e < e_count, "routing_stats", "expert ", e, " of assignment ", i, " is out of range for ",
                 e_count, " experts");
    ++s.tokens_per_expert[static_cast<std::size_t>(e)];
  }
  if (kept.empty())
    s.kept_per_expert = s.tokens_per_expert;
  else
    s.kept_per_expert.assign(kept.begin(), kept.end());
  s.dropped = dropped;
  const Tensor<T, Cpu> p = to_device<Cpu>(probs.value().contiguous());
  double h = 0;
  for (index_t t = 0; t < n; ++t)
    for (index_t e = 0; e < e_count; ++e) {
      const double v = p.data()[t * e_count + e];
      if (v > 0) h -= v * std::log(v);
    }
  s.entropy = n > 0 ? h / static_cast<double>(n) : 0.0;
  s.max_entropy = e_count > 0 ? std::log(static_cast<double>(e_count)) : 0.0;
  if (s.num_assignments > 0 && e_count > 0) {
    const double mean = static_cast<double>(s.num_assignments) / static_cast<double>(e_count);
    s.load_ratio =
        static_cast<double>(*std::max_element(s.tokens_per_expert.begin(), s.tokens_per_expert.end())) / mean;
  }
  return s;
}

/// Statistics of one router record of an MoE layer.
template <Scalar T, Device D>
RoutingStats routing_stats(const RoutingRecord<T, D>& rec, index_t layer = 0) {
  RoutingStats s = routing_stats(rec.routing, rec.kept(), rec.dropped());
  s.layer = layer;
  s.router = rec.name;
  s.capacity = rec.capacity;
  return s;
}

/// One entry per router of every MoE layer of `model`, from the layers' last forward
/// (layers not run yet are skipped).
template <class Model>
std::vector<RoutingStats> collect_routing_stats(const Model& model) {
  std::vector<RoutingStats> out;
  index_t layer = 0;
  visit_moe_layers(model, [&](const auto& moe) {
    for (const auto& rec : moe.routing_records()) out.push_back(routing_stats(rec, layer));
    ++layer;
  });
  return out;
}

/// A compact table, one line per router; at most `max_experts` per-expert counts are listed.
inline std::string format_routing_stats(const std::vector<RoutingStats>& stats, std::size_t max_experts = 16) {
  std::ostringstream os;
  os << "layer router          tokens assigned dropped   entropy    load  tokens per expert\n";
  char buf[160];
  for (const auto& s : stats) {
    std::snprintf(buf, sizeof buf, "%-5lld %-14s %7lld %8lld %7lld %4.2f/%4.2f %7.2f ", static_cast<long long>(s.layer),
                  s.router.c_str(), static_cast<long long>(s.num_tokens), static_cast<long long>(s.num_assignments),
                  static_cast<long long>(s.dropped), s.entropy, s.max_entropy, s.load_ratio);
    os << buf;
    const std::size_t shown = std::min(max_experts, s.tokens_per_expert.size());
    for (std::size_t e = 0; e < shown; ++e) os << ' ' << s.tokens_per_expert[e];
    if (shown < s.tokens_per_expert.size()) os << " ... (" << s.tokens_per_expert.size() << " experts)";
    os << '\n';
  }
  return os.str();
}

inline void print_routing_stats(std::ostream& os, const std::vector<RoutingStats>& stats,
                                std::size_t max_experts = 16) {
  os << format_routing_stats(stats, max_experts);
}

}  // namespace mixmoe
