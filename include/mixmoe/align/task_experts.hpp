// Task experts for RA-MoE: the experts a task uses more than general text does.
//
//   per slot s and expert k:  delta[s][k] = freq_k(task data) - freq_k(general data)
//
// freq is a RoutingFrequencies statistic (align/routing_capture.hpp) of the same model over
// English task data and over general data: the selection frequency (share of tokens whose top-k
// includes k; default) or the mean probability mass (TaskExpertOptions::source).
//
// The task set A_s of slot s, for the slots of the alignment zone only (empty elsewhere):
//   TaskExpertSelect::threshold   A_s = { k : delta[s][k] > tau }
//   TaskExpertSelect::top_m       the m experts of largest delta (ties: the lower id), keeping
//                                 only those with delta > min_delta (default: no floor)
// Sets are returned as ascending expert ids, one per slot (ExpertSets).
//
//   RoutingFrequencies task, general;            // filled with forwards over the two data sets
//   auto zone = alignment_zone(task.slots());    // middle half of the layers
//   ExpertSets a = select_task_experts(task, general, zone, {.select = TaskExpertSelect::top_m, .top_m = 2});
#pragma once

#include <algorithm>
#include <cstdio>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/align/routing_capture.hpp"
#include "mixmoe/core/error.hpp"

namespace mixmoe {

enum class TaskExpertSelect { threshold, top_m };
enum class FrequencySource { selection, probability_mass };

struct TaskExpertOptions {
  TaskExpertSelect select = TaskExpertSelect::threshold;
  double tau = 0.0;                                             // threshold: keep delta > tau
  index_t top_m = 2;                                            // top_m: experts per slot at most
  double min_delta = -std::numeric_limits<double>::infinity();  // top_m: keep only delta > min_delta
  FrequencySource source = FrequencySource::selection;
};

/// delta[s][k] = task[s][k] - general[s][k].
inline SlotValues frequency_delta(const SlotValues& task, const SlotValues& general) {
  MIXMOE_CHECK(task.size() == general.size(), "frequency_delta", task.size(), " task slots and ", general.size(),
               " general slots");
  SlotValues d(task.size());
  for (std::size_t s = 0; s < task.size(); ++s) {
    MIXMOE_CHECK(task[s].size() == general[s].size(), "frequency_delta", "slot ", s, ": ", task[s].size(),
                 " task experts and ", general[s].size(), " general experts");
    d[s].resize(task[s].size());
    for (std::size_t k = 0; k < task[s].size(); ++k) d[s][k] = task[s][k] - general[s][k];
  }
  return d;
}

/// The task set of one slot from its deltas (see the header comment).
inline std::vector<index_t> select_experts(const std::vector<double>& delta, const TaskExpertOptions& opt = {}) {
  std::vector<index_t> out;
  if (opt.select == TaskExpertSelect::threshold) {
    for (std::size_t k = 0; k < delta.size(); ++k)
      if (delta[k] > opt.tau) out.push_back(static_cast<index_t>(k));
    return out;
  }
  MIXMOE_CHECK(opt.top_m >= 0, "select_experts", "top_m ", opt.top_m, " is negative");
  std::vector<index_t> order(delta.size());
  std::iota(order.begin(), order.end(), index_t{0});
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return delta[static_cast<std::size_t>(a)] > delta[static_cast<std::size_t>(b)];
  });
  for (index_t k : order) {
    if (static_cast<index_t>(out.size()) >= opt.top_m) break;
    if (delta[static_cast<std::size_t>(k)] > opt.min_delta) out.push_back(k);
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// Task sets of every slot: selected in the slots of `zone_slots`, empty in the others.
inline ExpertSets select_task_experts(const SlotValues& delta, const std::vector<index_t>& zone_slots,
                                      const TaskExpertOptions& opt = {}) {
  ExpertSets sets(delta.size());
  for (index_t s : zone_slots) {
    MIXMOE_CHECK(s >= 0 && s < static_cast<index_t>(delta.size()), "select_task_experts", "zone slot ", s,
                 " is outside the ", delta.size(), " slots");
    sets[static_cast<std::size_t>(s)] = select_experts(delta[static_cast<std::size_t>(s)], opt);
  }
  return sets;
}

/// The deltas of two accumulators over the same slots, by opt.source.
inline SlotValues frequency_delta(const RoutingFrequencies& task, const RoutingFrequencies& general,
                                  FrequencySource source = FrequencySource::selection) {
  MIXMOE_CHECK(task.slots() == general.slots(), "frequency_delta",
               "the task and general statistics come from different router slots (", task.num_slots(), " and ",
               general.num_slots(), ")");
  if (source == FrequencySource::selection)
    return frequency_delta(task.selection_frequency(), general.selection_frequency());
  return frequency_delta(task.probability_mass(), general.probability_mass());
}

/// Task sets from the statistics of task data and general data.
inline ExpertSets select_task_experts(const RoutingFrequencies& task, const RoutingFrequencies& general,
                                      const std::vector<index_t>& zone_slots, const TaskExpertOptions& opt = {}) {
  return select_task_experts(frequency_delta(task, general, opt.source), zone_slots, opt);
}

/// One line per slot with a non-empty set: layer, router, the experts and their deltas.
inline std::string format_task_experts(const std::vector<RouterSlot>& slots, const ExpertSets& sets,
                                       const SlotValues& delta = {}) {
  MIXMOE_CHECK(sets.size() == slots.size(), "format_task_experts", sets.size(), " sets for ", slots.size(), " slots");
  std::ostringstream os;
  os << "layer router          task experts (delta)\n";
  char buf[64];
  for (std::size_t s = 0; s < slots.size(); ++s) {
    if (sets[s].empty()) continue;
    std::snprintf(buf, sizeof buf, "%-5lld %-14s ", static_cast<long long>(slots[s].layer), slots[s].name.c_str());
    os << buf;
    for (index_t k : sets[s]) {
      os << ' ' << k;
      if (s < delta.size() && static_cast<std::size_t>(k) < delta[s].size()) {
        std::snprintf(buf, sizeof buf, "(%+.3f)", delta[s][static_cast<std::size_t>(k)]);
        os << buf;
      }
    }
    os << '\n';
  }
  return os.str();
}

}  // namespace mixmoe
