// Routing capture for RA-MoE: what a model's routers did on a batch, per example and per
// data set, and how similar English and target-language routing are per layer.
//
//   B examples of padded length S, N = B*S token rows; a router slot has E experts
//
// Router slots. A model's routers are numbered in the order visit_moe_layers visits its MoE
// layers (moe/moe_layer.hpp) and, inside a layer, the order of its routing_records(): one
// slot per router ("router", or "router.lm", "router.mt" when each group has its own router).
// Per-slot data is indexed [slot][expert] (SlotValues) and expert sets [slot] -> expert ids
// (ExpertSets).
//
// Rows. A RowMap says which example each token row of the forward belongs to, -1 for rows
// that do not count (padding, or tokens outside the region of interest):
//   padded_row_map(B, S, mask)         mask (B*S) of valid tokens, row = b*S + p
//   length_row_map(S, lengths)         row b*S + p counts when p < lengths[b]
//   batch_row_map(batch, examples, r)  a collated Batch: the prompt, the answer or all its inputs
//
// Per-example routing. For slot s and example b, the mean routing distribution
//   rbar[b, e] = (1 / |T_b|) sum_{n in T_b} probs[n, e],   T_b = the rows of example b
// is example_mean_routing(probs, rows), a differentiable (B, E) Var (the routing alignment
// loss trains through it); capture_example_routing(model, rows) returns it for every slot of
// the model's last forward (ExampleRouting; .values() gives plain numbers). probs is the
// router's full softmax distribution over its E experts, not only the top-k.
//
// Data-set statistics. RoutingFrequencies accumulates over forwards, per slot and expert:
//   selection_frequency[e] = (valid tokens whose top-k assignments include e) / (valid tokens)
//   probability_mass[e]    = mean over valid tokens of probs[n, e]
// Assignments are read from Routing.token/expert, dropped ones included (the router's choice,
// not what capacity let through); a token sent to e twice counts once.
//
// Cross-lingual routing similarity. On parallel inputs (row b of the English batch is the same
// item as row b of the target-language batch), per slot
//   sim_s = mean over items of cos(rbar_en[b], rbar_tgt[b])
// accumulated by RoutingSimilarity; per_layer() averages the slots of a layer.
//
// Alignment zone: the layers where routing is shared across languages. Default: the middle
// half of the layers (ZoneOptions::middle_fraction); or the top-q layers ranked by
// cross-lingual similarity (ZoneMode::most_similar). format_layer_similarity() prints the
// per-layer similarity as a bar plot with the zone marked.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/data/batching.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/routing.hpp"

namespace mixmoe {

/// One router of a model: the MoE layer it is in (forward order), its name in the layer, its experts.
struct RouterSlot {
  index_t layer = 0;
  std::string name;
  index_t num_experts = 0;

  friend bool operator==(const RouterSlot&, const RouterSlot&) = default;
};

/// Per-slot, per-expert numbers: [slot][expert].
using SlotValues = std::vector<std::vector<double>>;
/// Per-slot expert sets: [slot] -> expert ids (ascending).
using ExpertSets = std::vector<std::vector<index_t>>;
/// Per-slot, per-example distributions: [slot][example][expert].
using ExampleValues = std::vector<std::vector<std::vector<double>>>;

/// The router slots of a model, in slot order. Layers that ran a forward are described by their
/// routing records; a layer that has not run yet by its routers (MixedMoE: routers, router_name).
template <class Model>
std::vector<RouterSlot> router_slots(const Model& model) {
  std::vector<RouterSlot> slots;
  index_t layer = 0;
  visit_moe_layers(model, [&](const auto& moe) {
    if (!moe.routing_records().empty()) {
      for (const auto& rec : moe.routing_records()) {
        const index_t e = rec.routing.probs.defined() && rec.routing.probs.dim() == 2 ? rec.routing.probs.size(1)
                                                                                      : rec.routing.num_experts;
        slots.push_back(RouterSlot{layer, rec.name, e});
      }
    } else {
      if constexpr (requires {
                      moe.routers.size();
                      moe.routers[0].num_experts();
                      moe.router_name(std::size_t{0});
                    }) {
        for (std::size_t r = 0; r < moe.routers.size(); ++r)
          slots.push_back(RouterSlot{layer, moe.router_name(r), static_cast<index_t>(moe.routers[r].num_experts())});
      } else {
        MIXMOE_CHECK(false, "router_slots", "MoE layer ", layer,
                     " has no recorded routing and does not list its routers: run a forward pass first");
      }
    }
    ++layer;
  });
  return slots;
}

/// Number of MoE layers the slots span (the largest layer index + 1).
inline index_t num_slot_layers(const std::vector<RouterSlot>& slots) {
  index_t n = 0;
  for (const auto& s : slots) n = std::max(n, s.layer + 1);
  return n;
}

// ---------------------------------------------------------------------------------------------
// Rows -> examples

/// Which example each token row of a forward belongs to.
struct RowMap {
  index_t num_examples = 0;
  std::vector<index_t> example;  // (N) example of row n, or -1: the row does not count

  [[nodiscard]] index_t num_rows() const { return static_cast<index_t>(example.size()); }
  /// Counted rows of each example.
  [[nodiscard]] std::vector<index_t> tokens_per_example() const {
    std::vector<index_t> c(static_cast<std::size_t>(num_examples), 0);
    for (index_t e : example)
      if (e >= 0) ++c[static_cast<std::size_t>(e)];
    return c;
  }
  /// Counted rows in all.
  [[nodiscard]] index_t valid_rows() const {
    return static_cast<index_t>(std::count_if(example.begin(), example.end(), [](index_t e) { return e >= 0; }));
  }
};

/// B examples of padded length S, row b*S + p; mask (B*S) nonzero for the tokens that count
/// (empty: all count).
inline RowMap padded_row_map(index_t batch, index_t seq, std::span<const unsigned char> mask = {}) {
  MIXMOE_CHECK(batch >= 0 && seq >= 0, "padded_row_map", "batch ", batch, " and length ", seq, " must be >= 0");
  MIXMOE_CHECK(mask.empty() || static_cast<index_t>(mask.size()) == batch * seq, "padded_row_map", "the mask has ",
               mask.size(), " entries for ", batch, " x ", seq, " tokens");
  RowMap m;
  m.num_examples = batch;
  m.example.resize(static_cast<std::size_t>(batch * seq));
  for (index_t n = 0; n < batch * seq; ++n)
    m.example[static_cast<std::size_t>(n)] =
        mask.empty() || mask[static_cast<std::size_t>(n)] ? n / std::max<index_t>(seq, 1) : -1;
  return m;
}

/// B = lengths.size() examples of padded length S: row b*S + p counts when p < lengths[b].
inline RowMap length_row_map(index_t seq, std::span<const index_t> lengths) {
  MIXMOE_CHECK(seq >= 0, "length_row_map", "length ", seq, " must be >= 0");
  const auto batch = static_cast<index_t>(lengths.size());
  RowMap m;
  m.num_examples = batch;
  m.example.assign(static_cast<std::size_t>(batch * seq), -1);
  for (index_t b = 0; b < batch; ++b) {
    const index_t len = lengths[static_cast<std::size_t>(b)];
    MIXMOE_CHECK(len >= 0 && len <= seq, "length_row_map", "example ", b, " has length ", len, ", outside [0, ", seq,
                 "]");
    for (index_t p = 0; p < len; ++p) m.example[static_cast<std::size_t>(b * seq + p)] = b;
  }
  return m;
}

/// Which input positions of a collated example count.
enum class TokenRegion {
  inputs,  // every input token (positions 0 .. len-2 of its ids)
  prompt,  // the prompt: ids before target_begin
  answer,  // the answer fed as input (teacher forcing): ids from target_begin on, the last id excepted
};

/// The rows of a Batch collated from `examples` (batch.example_ids[b] indexes `examples`; for
/// collate(examples) that is row b = example b). Example b of the map is row b of the batch.
inline RowMap batch_row_map(const Batch& batch, std::span<const Example> examples,
                            TokenRegion region = TokenRegion::inputs) {
  MIXMOE_CHECK(batch.inputs.dim() == 2, "batch_row_map", "batch.inputs must be (B, T), got ", batch.inputs.shape());
  const index_t b_count = batch.inputs.size(0), seq = batch.inputs.size(1);
  MIXMOE_CHECK(static_cast<index_t>(batch.example_ids.size()) == b_count, "batch_row_map", "the batch has ", b_count,
               " rows and ", batch.example_ids.size(), " example ids");
  RowMap m;
  m.num_examples = b_count;
  m.example.assign(static_cast<std::size_t>(b_count * seq), -1);
  for (index_t b = 0; b < b_count; ++b) {
    const index_t id = batch.example_ids[static_cast<std::size_t>(b)];
    MIXMOE_CHECK(id >= 0 && id < static_cast<index_t>(examples.size()), "batch_row_map", "row ", b,
                 " comes from example ", id, ", outside the ", examples.size(), " examples given");
    const Example& ex = examples[static_cast<std::size_t>(id)];
    const index_t inputs = std::min<index_t>(static_cast<index_t>(ex.ids.size()) - 1, seq);  // truncation-safe
    index_t lo = 0, hi = inputs;
    if (region == TokenRegion::prompt) hi = std::min(inputs, ex.target_begin);
    if (region == TokenRegion::answer) lo = std::min(inputs, ex.target_begin);
    for (index_t p = lo; p < hi; ++p) m.example[static_cast<std::size_t>(b * seq + p)] = b;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Per-example mean routing

/// rbar (B, E): the mean of probs (N, E) over each example's counted rows; differentiable in probs.
/// Every example must have at least one counted row.
template <Scalar T, Device D>
Var<T, D> example_mean_routing(const Var<T, D>& probs, const RowMap& rows) {
  constexpr const char* where = "example_mean_routing";
  detail::require_host<D>();  // host loops; the RA-MoE ops run on Cpu tensors (docs/cuda.md)
  MIXMOE_CHECK(probs.defined() && probs.dim() == 2, where, "probs must be (N, E), got ",
               probs.defined() ? probs.shape().to_string() : std::string("an undefined Var"));
  const index_t n = probs.size(0), e_count = probs.size(1);
  MIXMOE_CHECK(rows.num_rows() == n, where, "the row map has ", rows.num_rows(), " rows, the routing has ", n,
               " tokens");
  const index_t b_count = rows.num_examples;
  std::vector<index_t> count(static_cast<std::size_t>(b_count), 0);
  for (index_t r = 0; r < n; ++r) {
    const index_t b = rows.example[static_cast<std::size_t>(r)];
    MIXMOE_CHECK(b >= -1 && b < b_count, where, "row ", r, " belongs to example ", b, ", outside [-1, ", b_count, ")");
    if (b >= 0) ++count[static_cast<std::size_t>(b)];
  }
  for (index_t b = 0; b < b_count; ++b)
    MIXMOE_CHECK(count[static_cast<std::size_t>(b)] > 0, where, "example ", b,
                 " has no counted token: its mean routing is undefined");
  const Tensor<T, D> pv = probs.value().contiguous();
  std::vector<double> acc(static_cast<std::size_t>(b_count * e_count), 0.0);
  for (index_t r = 0; r < n; ++r) {
    const index_t b = rows.example[static_cast<std::size_t>(r)];
    if (b < 0) continue;
    const T* row = pv.data() + r * e_count;
    double* a = acc.data() + b * e_count;
    for (index_t e = 0; e < e_count; ++e) a[e] += static_cast<double>(row[e]);
  }
  Tensor<T, D> out = Tensor<T, D>::empty({b_count, e_count});
  for (index_t b = 0; b < b_count; ++b)
    for (index_t e = 0; e < e_count; ++e)
      out.data()[b * e_count + e] = static_cast<T>(acc[static_cast<std::size_t>(b * e_count + e)] /
                                                   static_cast<double>(count[static_cast<std::size_t>(b)]));
  return record(where, std::move(out), {probs},
                [example = rows.example, count, n, e_count](autograd::BackwardContext<T, D>& ctx) {
                  if (!ctx.needs_grad(0)) return;
                  const T* g = ctx.grad_out().data();
                  T* gp = ctx.grad_in(0).data();
                  for (index_t r = 0; r < n; ++r) {
                    const index_t b = example[static_cast<std::size_t>(r)];
                    if (b < 0) continue;
                    const T inv = T(1) / static_cast<T>(count[static_cast<std::size_t>(b)]);
                    for (index_t e = 0; e < e_count; ++e) gp[r * e_count + e] += g[b * e_count + e] * inv;
                  }
                });
}

/// Plain values of a (B, E) Var: [example][expert].
template <Scalar T, Device D>
std::vector<std::vector<double>> to_rows(const Var<T, D>& m) {
  MIXMOE_CHECK(m.defined() && m.dim() == 2, "to_rows", "expected a (B, E) Var, got ",
               m.defined() ? m.shape().to_string() : std::string("an undefined Var"));
  const Tensor<T, Cpu> v = to_device<Cpu>(m.value().contiguous());  // a host copy on a device
  const index_t b_count = m.size(0), e_count = m.size(1);
  std::vector<std::vector<double>> out(static_cast<std::size_t>(b_count));
  for (index_t b = 0; b < b_count; ++b)
    out[static_cast<std::size_t>(b)].assign(v.data() + b * e_count, v.data() + (b + 1) * e_count);
  return out;
}

/// Per-example mean routing of every slot of one forward.
template <Scalar T, Device D = Cpu>
struct ExampleRouting {
  std::vector<RouterSlot> slots;
  std::vector<Var<T, D>> mean;  // [slot] (B, E_slot); keeps the forward's graph when it had one

  [[nodiscard]] index_t num_slots() const { return static_cast<index_t>(mean.size()); }
  [[nodiscard]] index_t num_examples() const { return mean.empty() ? 0 : mean.front().size(0); }
  /// The same values without graph (a stop-gradient copy).
  [[nodiscard]] ExampleRouting detached() const {
    ExampleRouting out{slots, {}};
    for (const auto& m : mean) out.mean.push_back(m.detach());
    return out;
  }
  /// Plain values: [slot][example][expert].
  [[nodiscard]] ExampleValues values() const {
    ExampleValues out;
    for (const auto& m : mean) out.push_back(to_rows(m));
    return out;
  }
};

namespace detail {

template <class Model>
using routing_model_value_t = typename std::remove_const_t<Model>::value_type;
template <class Model>
using routing_model_device_t = typename std::remove_const_t<Model>::device_type;

/// Calls f(layer_index, record) for every routing record of the model's last forward; an MoE
/// layer without records is an error naming `where`.
template <class Model, class F>
void for_each_routing_record(const Model& model, const char* where, F&& f) {
  index_t layer = 0;
  visit_moe_layers(model, [&](const auto& moe) {
    MIXMOE_CHECK(!moe.routing_records().empty(), where, "MoE layer ", layer,
                 " has no recorded routing: run a forward pass first");
    for (const auto& rec : moe.routing_records()) f(layer, rec);
    ++layer;
  });
}

}  // namespace detail

/// Per slot, the per-token routing distribution probs (N, E) of the model's last forward.
template <class Model>
auto slot_probs(const Model& model) {
  std::vector<Var<detail::routing_model_value_t<Model>, detail::routing_model_device_t<Model>>> out;
  detail::for_each_routing_record(model, "slot_probs",
                                  [&](index_t, const auto& rec) { out.push_back(rec.routing.probs); });
  return out;
}

/// Per slot, the per-example mean routing (B, E) of the model's last forward over the rows of
/// `rows`. Differentiable while the forward's graph is held (a forward with grad enabled and no
/// release_routing_graphs since).
template <class Model>
auto capture_example_routing(const Model& model, const RowMap& rows) {
  ExampleRouting<detail::routing_model_value_t<Model>, detail::routing_model_device_t<Model>> out;
  detail::for_each_routing_record(model, "capture_example_routing", [&](index_t layer, const auto& rec) {
    out.mean.push_back(example_mean_routing(rec.routing.probs, rows));
    out.slots.push_back(RouterSlot{layer, rec.name, rec.routing.probs.size(1)});
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Frequencies over a data set

/// Per slot and expert: how often the router selects the expert, and its mean probability mass,
/// over all counted tokens of the forwards added.
class RoutingFrequencies {
 public:
  /// Adds the model's last forward (its rows mapped by `rows`; rows mapped to -1 are skipped).
  template <class Model>
  void add(const Model& model, const RowMap& rows) {
    std::vector<RouterSlot> slots;
    detail::for_each_routing_record(model, "RoutingFrequencies::add", [&](index_t layer, const auto& rec) {
      slots.push_back(RouterSlot{layer, rec.name, rec.routing.probs.size(1)});
    });
    bind_slots(slots);
    index_t s = 0;
    detail::for_each_routing_record(model, "RoutingFrequencies::add",
                                    [&](index_t, const auto& rec) { add(s++, rec.routing, rows); });
  }

  /// Adds one routing of slot `slot` (the slots must have been set: bind_slots or a model-level add).
  template <Scalar T, Device D>
  void add(index_t slot, const Routing<T, D>& routing, const RowMap& rows) {
    constexpr const char* where = "RoutingFrequencies::add";
    MIXMOE_CHECK(slot >= 0 && slot < num_slots(), where, "slot ", slot, " is outside the ", num_slots(),
                 " slots bound");
    const Var<T, D>& probs = routing.probs;
    MIXMOE_CHECK(probs.defined() && probs.dim() == 2, where, "routing.probs must be (N, E), got ",
                 probs.defined() ? probs.shape().to_string() : std::string("an undefined Var"));
    const index_t n = probs.size(0), e_count = probs.size(1);
    const auto si = static_cast<std::size_t>(slot);
    MIXMOE_CHECK(e_count == slots_[si].num_experts, where, "slot ", slot, " (", slots_[si].name, ") has ",
                 slots_[si].num_experts, " experts, the routing has ", e_count);
    MIXMOE_CHECK(rows.num_rows() == n, where, "the row map has ", rows.num_rows(), " rows, the routing has ", n,
                 " tokens");
    // statistics are gathered on the host: a device routing is copied once
    const Tensor<T, Cpu> pv = to_device<Cpu>(probs.value().contiguous());
    std::vector<unsigned char> chosen(static_cast<std::size_t>(n * e_count), 0);
    if (routing.expert.defined() && routing.expert.numel() > 0) {
      MIXMOE_CHECK(routing.token.defined() && routing.token.numel() == routing.expert.numel(), where,
                   "routing.token and routing.expert must list the same assignments");
      const Tensor<Index, Cpu> tok = to_device<Cpu>(routing.token.contiguous());
      const Tensor<Index, Cpu> ex = to_device<Cpu>(routing.expert.contiguous());
      for (index_t m = 0; m < ex.numel(); ++m) {
        const index_t t = tok.data()[m], e = ex.data()[m];
        MIXMOE_CHECK(t >= 0 && t < n && e >= 0 && e < e_count, where, "assignment ", m, " (token ", t, ", expert ", e,
                     ") is outside ", n, " tokens x ", e_count, " experts");
        chosen[static_cast<std::size_t>(t * e_count + e)] = 1;
      }
    }
    for (index_t t = 0; t < n; ++t) {
      if (rows.example[static_cast<std::size_t>(t)] < 0) continue;
      ++tokens_[si];
      for (index_t e = 0; e < e_count; ++e) {
        selected_[si][static_cast<std::size_t>(e)] += chosen[static_cast<std::size_t>(t * e_count + e)];
        mass_[si][static_cast<std::size_t>(e)] += static_cast<double>(pv.data()[t * e_count + e]);
      }
    }
  }

  /// Sets the slots (first call), or checks that they are the ones already set.
  void bind_slots(const std::vector<RouterSlot>& slots) {
    if (slots_.empty() && tokens_.empty()) {
      slots_ = slots;
      tokens_.assign(slots.size(), 0);
      selected_.clear();
      mass_.clear();
      for (const auto& s : slots) {
        selected_.emplace_back(static_cast<std::size_t>(s.num_experts), 0.0);
        mass_.emplace_back(static_cast<std::size_t>(s.num_experts), 0.0);
      }
      return;
    }
    MIXMOE_CHECK(slots == slots_, "RoutingFrequencies", "the model's router slots (", slots.size(),
                 ") differ from those of the forwards added before (", slots_.size(), ")");
  }

  /// Adds the counts of another accumulator over the same slots.
  void merge(const RoutingFrequencies& other) {
    if (other.slots_.empty()) return;
    bind_slots(other.slots_);
    for (std::size_t s = 0; s < slots_.size(); ++s) {
      tokens_[s] += other.tokens_[s];
      for (std::size_t e = 0; e < selected_[s].size(); ++e) {
        selected_[s][e] += other.selected_[s][e];
        mass_[s][e] += other.mass_[s][e];
      }
    }
  }

  void clear() { *this = RoutingFrequencies{}; }

  [[nodiscard]] const std::vector<RouterSlot>& slots() const { return slots_; }
  [[nodiscard]] index_t num_slots() const { return static_cast<index_t>(slots_.size()); }
  /// Counted tokens of slot s.
  [[nodiscard]] index_t tokens(index_t s) const { return tokens_.at(static_cast<std::size_t>(s)); }

  /// [slot][expert]: fraction of counted tokens whose selection includes the expert (sums to
  /// about K per slot for top-K routing). Zero for a slot that saw no token.
  [[nodiscard]] SlotValues selection_frequency() const { return normalised(selected_); }
  /// [slot][expert]: mean routing probability of the expert over counted tokens (sums to 1).
  [[nodiscard]] SlotValues probability_mass() const { return normalised(mass_); }

 private:
  [[nodiscard]] SlotValues normalised(const SlotValues& sums) const {
    SlotValues out = sums;
    for (std::size_t s = 0; s < out.size(); ++s)
      for (double& v : out[s]) v = tokens_[s] > 0 ? v / static_cast<double>(tokens_[s]) : 0.0;
    return out;
  }

  std::vector<RouterSlot> slots_;
  std::vector<index_t> tokens_;  // [slot] counted tokens
  SlotValues selected_;          // [slot][expert] tokens that selected the expert
  SlotValues mass_;              // [slot][expert] sum of probabilities
};

// ---------------------------------------------------------------------------------------------
// Cross-lingual similarity and the alignment zone

/// cos(a, b); 0 when either vector is zero.
inline double cosine_similarity(std::span<const double> a, std::span<const double> b) {
  MIXMOE_CHECK(a.size() == b.size(), "cosine_similarity", "vectors of ", a.size(), " and ", b.size(), " entries");
  double ab = 0, aa = 0, bb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    ab += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
}

/// Mean cosine similarity, per slot, between the English and target-language per-example
/// routing of the same items, accumulated over batches of parallel items.
class RoutingSimilarity {
 public:
  /// english and target: [slot][item][expert], item b of both is the same item.
  void add(const std::vector<RouterSlot>& slots, const ExampleValues& english, const ExampleValues& target) {
    constexpr const char* where = "RoutingSimilarity::add";
    if (slots_.empty() && items_ == 0) {
      slots_ = slots;
      sum_.assign(slots.size(), 0.0);
    }
    MIXMOE_CHECK(slots == slots_, where, "router slots differ from those of the batches added before");
    MIXMOE_CHECK(english.size() == slots.size() && target.size() == slots.size(), where, "expected ", slots.size(),
                 " slots, got ", english.size(), " (English) and ", target.size(), " (target)");
    index_t items = -1;
    for (std::size_t s = 0; s < slots.size(); ++s) {
      MIXMOE_CHECK(english[s].size() == target[s].size(), where, "slot ", s, ": ", english[s].size(),
                   " English items and ", target[s].size(), " target-language items");
      MIXMOE_CHECK(items < 0 || static_cast<index_t>(english[s].size()) == items, where, "slot ", s, " has ",
                   english[s].size(), " items, slot 0 has ", items);
      items = static_cast<index_t>(english[s].size());
      for (std::size_t b = 0; b < english[s].size(); ++b) sum_[s] += cosine_similarity(english[s][b], target[s][b]);
    }
    items_ += std::max<index_t>(items, 0);
  }

  /// The same from two captures of parallel batches.
  template <Scalar T, Device D>
  void add(const ExampleRouting<T, D>& english, const ExampleRouting<T, D>& target) {
    MIXMOE_CHECK(english.slots == target.slots, "RoutingSimilarity::add",
                 "the English and target-language captures come from different router slots");
    add(english.slots, english.values(), target.values());
  }

  [[nodiscard]] const std::vector<RouterSlot>& slots() const { return slots_; }
  [[nodiscard]] index_t items() const { return items_; }
  /// [slot] mean cosine similarity over the items added.
  [[nodiscard]] std::vector<double> per_slot() const {
    std::vector<double> out(sum_.size(), 0.0);
    for (std::size_t s = 0; s < sum_.size(); ++s) out[s] = items_ > 0 ? sum_[s] / static_cast<double>(items_) : 0.0;
    return out;
  }
  /// [layer] mean of per_slot() over the slots of the layer.
  [[nodiscard]] std::vector<double> per_layer() const { return slots_to_layers(slots_, per_slot()); }

  /// Averages per-slot numbers over the slots of each layer.
  static std::vector<double> slots_to_layers(const std::vector<RouterSlot>& slots, const std::vector<double>& v) {
    MIXMOE_CHECK(v.size() == slots.size(), "RoutingSimilarity", v.size(), " values for ", slots.size(), " slots");
    const index_t layers = num_slot_layers(slots);
    std::vector<double> sum(static_cast<std::size_t>(layers), 0.0), n(static_cast<std::size_t>(layers), 0.0);
    for (std::size_t s = 0; s < slots.size(); ++s) {
      sum[static_cast<std::size_t>(slots[s].layer)] += v[s];
      n[static_cast<std::size_t>(slots[s].layer)] += 1;
    }
    for (std::size_t l = 0; l < sum.size(); ++l) sum[l] = n[l] > 0 ? sum[l] / n[l] : 0.0;
    return sum;
  }

 private:
  std::vector<RouterSlot> slots_;
  std::vector<double> sum_;
  index_t items_ = 0;
};

enum class ZoneMode {
  middle,        // the middle `middle_fraction` of the layers
  most_similar,  // the `top_q` layers of highest cross-lingual routing similarity
};

struct ZoneOptions {
  ZoneMode mode = ZoneMode::middle;
  double middle_fraction = 0.5;  // ZoneMode::middle: share of the layers (see middle_layers)
  index_t top_q = 0;             // ZoneMode::most_similar: layers kept; 0 = as many as middle_fraction gives
};

/// The middle `fraction` of L layers, symmetric: round(L (1 - fraction) / 2) layers are left out
/// at each end (halves round up), and at least the middle layer (L - 1) / 2 is kept:
/// L = 3 -> {1}; L = 4 -> {1, 2}; L = 5 -> {1, 2, 3}; L = 6 -> {2, 3}; L = 8 -> {2, 3, 4, 5}; L = 24 -> 6..17.
inline std::vector<index_t> middle_layers(index_t num_layers, double fraction = 0.5) {
  MIXMOE_CHECK(num_layers >= 0, "middle_layers", "num_layers ", num_layers, " is negative");
  MIXMOE_CHECK(fraction > 0 && fraction <= 1, "middle_layers", "fraction ", fraction, " must be in (0, 1]");
  if (num_layers == 0) return {};
  const auto skip = static_cast<index_t>(std::lround(static_cast<double>(num_layers) * (1.0 - fraction) / 2.0));
  std::vector<index_t> out;
  for (index_t l = skip; l < num_layers - skip; ++l) out.push_back(l);
  if (out.empty()) out.push_back((num_layers - 1) / 2);
  return out;
}

/// The q layers of highest similarity (ties: the lower layer), ascending.
inline std::vector<index_t> most_similar_layers(const std::vector<double>& layer_similarity, index_t q) {
  const auto n = static_cast<index_t>(layer_similarity.size());
  MIXMOE_CHECK(q >= 1 && q <= n, "most_similar_layers", "q = ", q, " layers asked of ", n);
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return layer_similarity[static_cast<std::size_t>(a)] > layer_similarity[static_cast<std::size_t>(b)];
  });
  order.resize(static_cast<std::size_t>(q));
  std::sort(order.begin(), order.end());
  return order;
}

/// The zone's layers. ZoneMode::most_similar needs layer_similarity ([layer], e.g.
/// RoutingSimilarity::per_layer()).
inline std::vector<index_t> alignment_zone_layers(index_t num_layers, const ZoneOptions& opt = {},
                                                  const std::vector<double>& layer_similarity = {}) {
  if (opt.mode == ZoneMode::middle) return middle_layers(num_layers, opt.middle_fraction);
  MIXMOE_CHECK(static_cast<index_t>(layer_similarity.size()) == num_layers, "alignment_zone_layers",
               "ZoneMode::most_similar needs the similarity of each of the ", num_layers, " layers, got ",
               layer_similarity.size());
  const index_t q =
      opt.top_q > 0 ? opt.top_q : static_cast<index_t>(middle_layers(num_layers, opt.middle_fraction).size());
  return most_similar_layers(layer_similarity, q);
}

/// The slots whose layer is in `layers`, ascending.
inline std::vector<index_t> slots_of_layers(const std::vector<RouterSlot>& slots, const std::vector<index_t>& layers) {
  std::vector<index_t> out;
  for (std::size_t s = 0; s < slots.size(); ++s)
    if (std::find(layers.begin(), layers.end(), slots[s].layer) != layers.end()) out.push_back(static_cast<index_t>(s));
  return out;
}

/// The zone's slots for a model's slots (see alignment_zone_layers).
inline std::vector<index_t> alignment_zone(const std::vector<RouterSlot>& slots, const ZoneOptions& opt = {},
                                           const std::vector<double>& layer_similarity = {}) {
  return slots_of_layers(slots, alignment_zone_layers(num_slot_layers(slots), opt, layer_similarity));
}

/// One line per layer: its similarity as a number and a bar, '*' marking the zone's layers.
inline std::string format_layer_similarity(const std::vector<double>& layer_similarity,
                                           const std::vector<index_t>& zone_layers = {}, int width = 40) {
  std::ostringstream os;
  os << "layer  similarity  (* alignment zone)\n";
  char buf[64];
  for (std::size_t l = 0; l < layer_similarity.size(); ++l) {
    const double v = layer_similarity[l];
    const bool in_zone =
        std::find(zone_layers.begin(), zone_layers.end(), static_cast<index_t>(l)) != zone_layers.end();
    std::snprintf(buf, sizeof buf, "%c%-5zu %10.4f  ", in_zone ? '*' : ' ', l, v);
    const int bar = static_cast<int>(std::lround(std::clamp(v, 0.0, 1.0) * width));
    os << buf << std::string(static_cast<std::size_t>(bar), '#') << '\n';
  }
  return os.str();
}

}  // namespace mixmoe
