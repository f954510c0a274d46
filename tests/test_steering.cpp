// RA-MoE baselines: Routing Steering (soft / hard logit interventions on MixedMoE routers)
// and RISE expert selection with its freeze policy.
#include "moe_test_util.hpp"

#include <mixmoe/align/rise.hpp>
#include <mixmoe/align/routing_capture.hpp>
#include <mixmoe/align/steering.hpp>

#include <algorithm>
#include <cmath>
#include <set>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_steering {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Layer = MixedMoE<TopK<2>, ExpertGroup<SwiGLU<double>, tag::lm>, ExpertGroup<SwiGLU<double>, tag::mt>>;
using LM = DecoderLM<CausalSelfAttention<double>, Layer>;
using PlainLayer = MixedMoE<SoftmaxTopKRoute, ExpertGroup<SwiGLU<double>, tag::generic>>;  // not a LogitRouter

ModelConfig layer_config(GroupMix mix) {
  ModelConfig cfg;
  cfg.vocab = 11;
  cfg.d_model = 4;
  cfg.heads = 1;
  cfg.layers = 1;
  cfg.d_ff = 6;
  cfg.moe.experts_per_group = {3, 3};
  cfg.moe.expert_hidden = 3;
  cfg.moe.top_k = 2;
  cfg.moe.mix = mix;
  return cfg;
}

ModelConfig lm_config() {
  ModelConfig cfg;
  cfg.vocab = 11;
  cfg.d_model = 8;
  cfg.heads = 2;
  cfg.layers = 3;
  cfg.d_ff = 8;
  cfg.seed = 3;
  cfg.moe.experts_per_group = {3, 3};
  cfg.moe.expert_hidden = 4;
  cfg.moe.top_k = 2;
  cfg.moe.mix = GroupMix::group_gate;
  return cfg;
}

// Population std of a row, in double.
double row_std(const std::vector<double>& z, index_t row, index_t e) {
  double mean = 0, var = 0;
  for (index_t j = 0; j < e; ++j) mean += z[static_cast<std::size_t>(row * e + j)];
  mean /= static_cast<double>(e);
  for (index_t j = 0; j < e; ++j) var += std::pow(z[static_cast<std::size_t>(row * e + j)] - mean, 2);
  return std::sqrt(var / static_cast<double>(e));
}

// Token n's experts of a token-choice routing (token-major, k per token), in selection order.
std::vector<index_t> experts_of_token(const Routing<double>& r, index_t n) {
  std::vector<index_t> out;
  const auto tok = r.token.to_vector();
  const auto ex = r.expert.to_vector();
  for (std::size_t m = 0; m < tok.size(); ++m)
    if (tok[m] == n) out.push_back(static_cast<index_t>(ex[m]));
  return out;
}

std::vector<double> gates_of_token(const Routing<double>& r, index_t n) {
  std::vector<double> out;
  const auto tok = r.token.to_vector();
  const auto g = r.gate.value().to_vector();
  for (std::size_t m = 0; m < tok.size(); ++m)
    if (tok[m] == n) out.push_back(g[m]);
  return out;
}

bool same_bits(const Td& a, const Td& b) {
  if (a.shape() != b.shape()) return false;
  const auto va = a.to_vector(), vb = b.to_vector();
  return std::equal(va.begin(), va.end(), vb.begin());
}

}  // namespace

TEST_CASE("steer_logits: soft adds lambda * std to the chosen experts, hard ranks them first", "[align][steering]") {
  // Row 0: std of (1, 2, 3, 4) = sqrt(1.25); row 1: all equal, std 0; row 2: (4, -1, 0, 2), mean 1.25.
  const Vd z(Td::from({1, 2, 3, 4, 5, 5, 5, 5, 4, -1, 0, 2}, {3, 4}), true);
  const std::vector<index_t> chosen = {0, 2};

  const Vd soft = steer_logits(z, chosen, SteeringMode::soft, 0.5);
  const std::vector<double> s = soft.value().to_vector();
  const double std0 = std::sqrt(1.25), std2 = std::sqrt((2.75 * 2.75 + 2.25 * 2.25 + 1.25 * 1.25 + 0.75 * 0.75) / 4.0);
  CHECK(s[0] == Approx(1 + 0.5 * std0).epsilon(1e-15));
  CHECK(s[1] == 2);
  CHECK(s[2] == Approx(3 + 0.5 * std0).epsilon(1e-15));
  CHECK(s[3] == 4);
  for (int j = 4; j < 8; ++j) CHECK(s[static_cast<std::size_t>(j)] == 5);  // std 0: nothing moves
  CHECK(s[8] == Approx(4 + 0.5 * std2).epsilon(1e-15));
  CHECK(s[9] == -1);
  CHECK(s[10] == Approx(0 + 0.5 * std2).epsilon(1e-15));
  CHECK(s[11] == 2);

  // The shift is a constant: the gradient passes through unchanged.
  const Vd w(Td::from({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, {3, 4}));
  sum(soft * w).backward();
  CHECK(same_bits(z.grad(), w.value()));

  // Hard, chosen {0, 2}: row 0 min_S = 1, max_other = 4 -> shift 4 - 1 + 1e-3 (1 + 4) = 3.005;
  // row 1: 5 - 5 + 0.006; row 2: min_S = 0 <= max_other = 2 -> 2 + 0.003.
  const std::vector<double> h = steer_logits(z, chosen, SteeringMode::hard).value().to_vector();
  CHECK(h[0] == Approx(4.005).epsilon(1e-14));
  CHECK(h[2] == Approx(6.005).epsilon(1e-14));
  CHECK(h[1] == 2);
  CHECK(h[3] == 4);
  CHECK(h[4] == Approx(5.006).epsilon(1e-14));
  CHECK(h[6] == Approx(5.006).epsilon(1e-14));
  CHECK(h[8] == Approx(6.003).epsilon(1e-14));
  CHECK(h[10] == Approx(2.003).epsilon(1e-14));
  // Chosen {0}: row 2 already ranks expert 0 first: unchanged.
  const std::vector<double> h0 = steer_logits(z, {0}, SteeringMode::hard).value().to_vector();
  CHECK(h0[8] == 4);

  MIXMOE_REQUIRE_ERROR(steer_logits(z, {4}, SteeringMode::soft), "expert 4 is out of range");
}

TEST_CASE("soft steering of a MixedMoE layer shifts the recorded logits by lambda * std", "[align][steering]") {
  for (const GroupMix mix : {GroupMix::shared_router, GroupMix::group_gate}) {
    INFO((mix == GroupMix::shared_router ? "shared_router" : "group_gate"));
    Generator gen(7);
    Layer layer(layer_config(mix), gen);
    const Vd x = rand_var({5, 4}, 11, false);
    (void)layer(x);
    std::vector<std::vector<double>> before;
    for (const auto& rec : layer.routing_records()) before.push_back(rec.routing.logits.value().to_vector());

    const std::vector<RouterSlot> slots = router_slots(layer);
    REQUIRE(slots.size() == (mix == GroupMix::shared_router ? 1u : 2u));
    RoutingSteering spec;
    spec.lambda = 0.7;
    spec.experts = mix == GroupMix::shared_router ? std::vector<std::vector<index_t>>{{1, 4}}
                                                  : std::vector<std::vector<index_t>>{{2}, {0, 1}};
    REQUIRE(apply_steering(layer, spec) == static_cast<index_t>(slots.size()));
    REQUIRE(layer.has_logit_intervention(0));
    (void)layer(x);
    for (std::size_t r = 0; r < slots.size(); ++r) {
      const auto& routing = layer.routing_records()[r].routing;
      const index_t e = routing.num_experts;
      const std::vector<double> after = routing.logits.value().to_vector();
      for (index_t n = 0; n < 5; ++n) {
        const double shift = 0.7 * row_std(before[r], n, e);
        REQUIRE(shift > 0);
        for (index_t j = 0; j < e; ++j) {
          const bool chosen = std::count(spec.experts[r].begin(), spec.experts[r].end(), j) > 0;
          const std::size_t i = static_cast<std::size_t>(n * e + j);
          CHECK(after[i] - before[r][i] == Approx(chosen ? shift : 0.0).margin(1e-14));
        }
      }
      // The recorded probs are the softmax of the steered logits.
      CHECK(max_abs_diff(routing.probs.value(), softmax(routing.logits, -1).value()) < 1e-15);
    }
  }
}

TEST_CASE("hard steering puts the chosen experts in every token's top-k", "[align][steering]") {
  Generator gen(5);
  Layer layer(layer_config(GroupMix::shared_router), gen);  // 6 experts, top-2
  const index_t n_tok = 8;
  const Vd x = rand_var({n_tok, 4}, 13, false);
  (void)layer(x);
  const std::vector<double> z0 = layer.routing_records()[0].routing.logits.value().to_vector();
  const auto z = [&](index_t n, index_t e) { return z0[static_cast<std::size_t>(n * 6 + e)]; };

  // |S| = 1 < k, |S| = k, |S| = 3 > k.
  for (const std::vector<index_t>& set : {std::vector<index_t>{5}, {1, 4}, {0, 2, 3}}) {
    INFO("chosen set of " << set.size());
    SteeringGuard guard(layer, RoutingSteering{{set}, SteeringMode::hard, 0.5, {}});
    REQUIRE(guard.steered() == 1);
    (void)layer(x);
    const auto& routing = layer.routing_records()[0].routing;
    for (index_t n = 0; n < n_tok; ++n) {
      const std::vector<index_t> got = experts_of_token(routing, n);
      REQUIRE(got.size() == 2);
      if (set.size() <= 2) {
        for (const index_t e : set) CHECK(std::count(got.begin(), got.end(), e) == 1);
      } else {
        // The top 2 of the set by the unsteered logits.
        std::vector<index_t> s = set;
        std::sort(s.begin(), s.end(), [&](index_t a, index_t b) { return z(n, a) > z(n, b); });
        CHECK(std::set<index_t>(got.begin(), got.end()) == std::set<index_t>(s.begin(), s.begin() + 2));
      }
      if (set.size() >= 2) {
        // The common shift cancels in the renormalised gates: softmax of the unsteered logits.
        const std::vector<double> g = gates_of_token(routing, n);
        const double a = z(n, got[0]), b = z(n, got[1]);
        CHECK(g[0] == Approx(1.0 / (1.0 + std::exp(b - a))).epsilon(1e-12));
        CHECK(g[1] == Approx(1.0 / (1.0 + std::exp(a - b))).epsilon(1e-12));
      }
    }
  }
  CHECK_FALSE(layer.has_logit_intervention(0));  // the guards cleared it
}

TEST_CASE("clearing the steering restores the layer's outputs bit for bit", "[align][steering]") {
  Generator gen(9);
  Layer layer(layer_config(GroupMix::group_gate), gen);
  const Vd x = rand_var({6, 4}, 17, false);
  const Td y0 = layer(x).value().clone();
  {
    SteeringGuard guard(layer, RoutingSteering{{{0, 2}, {1}}, SteeringMode::soft, 2.0, {}});
    CHECK_FALSE(same_bits(layer(x).value(), y0));
  }
  CHECK(same_bits(layer(x).value(), y0));
  apply_steering(layer, RoutingSteering{{{1}, {2}}, SteeringMode::hard, 0.5, {}});
  CHECK_FALSE(same_bits(layer(x).value(), y0));
  clear_steering(layer);
  CHECK(same_bits(layer(x).value(), y0));
  CHECK(same_bits(layer.routing_records()[0].routing.logits.value(),
                  layer.routers[0].logits(x).value()));  // the records show the plain routing again
}

TEST_CASE("steering a DecoderLM: router slots, layer choice, errors", "[align][steering]") {
  LM model(lm_config());
  const std::vector<RouterSlot> slots = router_slots(model);
  REQUIRE(slots.size() == 6);
  CHECK(slots[2].layer == 1);
  CHECK(slots[2].name == "router.lm");  // the slot convention of align/routing_capture.hpp
  CHECK(slots[3].name == "router.mt");
  CHECK(slots[3].num_experts == 3);

  const auto ids = Tensor<Index>::from({1, 4, 2, 7, 3, 8}, {2, 3});
  const Td y0 = model(ids).value().clone();
  RoutingSteering spec{{{0}, {1}, {0}, {1}, {0}, {1}}, SteeringMode::hard, 0.5, {1}};  // layer 1 only
  REQUIRE(apply_steering(model, spec) == 2);
  std::vector<bool> has;
  visit_moe_layers(model, [&](auto& l) { has.push_back(l.has_logit_intervention(0)); });
  CHECK(has == std::vector<bool>{false, true, false});
  (void)model(ids);
  // Layer 1's routers (top-2 of 3) now send every token to expert 0 (lm) and expert 1 (mt).
  int layer = 0, checked = 0;
  visit_moe_layers(model, [&](auto& l) {
    if (layer++ != 1) return;
    for (std::size_t r = 0; r < 2; ++r)
      for (index_t n = 0; n < ids.numel(); ++n, ++checked) {
        const std::vector<index_t> got = experts_of_token(l.routing_records()[r].routing, n);
        CHECK(std::count(got.begin(), got.end(), r == 0 ? 0 : 1) == 1);
      }
  });
  CHECK(checked == 12);
  clear_steering(model);
  CHECK(same_bits(model(ids).value(), y0));

  spec.experts.pop_back();
  MIXMOE_REQUIRE_ERROR(apply_steering(model, spec), "expert sets for 5 router slots, the model has 6");
  spec.experts.push_back({3});
  MIXMOE_REQUIRE_ERROR(apply_steering(model, spec), "expert 3 is out of range [0, 3)");
  spec.experts.back() = {1, 1};
  MIXMOE_REQUIRE_ERROR(apply_steering(model, spec), "lists an expert twice");
  spec.experts.back() = {1};
  spec.layers = {3};
  MIXMOE_REQUIRE_ERROR(apply_steering(model, spec), "layer 3 is out of range");

  // A router that is not a LogitRouter cannot be steered.
  ModelConfig cfg = layer_config(GroupMix::shared_router);
  cfg.moe.experts_per_group = {3};
  Generator gen(1);
  PlainLayer plain(cfg, gen);
  MIXMOE_REQUIRE_ERROR(apply_steering(plain, RoutingSteering{{{0}}, SteeringMode::soft, 0.5, {}}), "not a LogitRouter");
  CHECK(apply_steering(plain, RoutingSteering{{{}}, SteeringMode::soft, 0.5, {}}) == 0);  // nothing to steer is fine
}

TEST_CASE("RISE: zones, specificity, overlap and per-zone selection on a hand-made table", "[align][rise]") {
  using Z = LayerZone;
  CHECK(zones_by_thirds(1) == std::vector<Z>{Z::middle});
  CHECK(zones_by_thirds(2) == std::vector<Z>{Z::shallow, Z::deep});
  CHECK(zones_by_thirds(3) == std::vector<Z>{Z::shallow, Z::middle, Z::deep});
  CHECK(zones_by_thirds(4) == std::vector<Z>{Z::shallow, Z::middle, Z::middle, Z::deep});
  CHECK(zones_by_thirds(6) == std::vector<Z>{Z::shallow, Z::shallow, Z::middle, Z::middle, Z::deep, Z::deep});

  // Languages en (0), de (1), fr (2); three slots of three experts; target de.
  const LanguageFrequencies freq = {
      {{0.5, 0.3, 0.2}, {0.6, 0.1, 0.3}, {0.4, 0.4, 0.2}},  // en
      {{0.2, 0.2, 0.6}, {0.3, 0.1, 0.6}, {0.4, 0.4, 0.2}},  // de
      {{0.2, 0.5, 0.3}, {0.3, 0.4, 0.3}, {0.4, 0.4, 0.2}},  // fr
  };
  const std::vector<Z> zones = {Z::shallow, Z::middle, Z::deep};
  const RiseSelection sel = rise_select(freq, 1, zones, RiseOptions{.english = 0});
  // slot 0: mean (0.3, 1/3, 11/30) -> spec (-0.1, -2/15, 7/30); overlap min(de, en) = (0.2, 0.2, 0.2).
  CHECK(sel.specificity[0][0] == Approx(-0.1));
  CHECK(sel.specificity[0][1] == Approx(-2.0 / 15.0));
  CHECK(sel.specificity[0][2] == Approx(7.0 / 30.0));
  CHECK(sel.overlap[0] == std::vector<double>{0.2, 0.2, 0.2});
  CHECK(sel.score[0][2] == Approx(13.0 / 30.0));
  // slot 1: spec (-0.1, -0.1, 0.2), overlap (0.3, 0.1, 0.3), score (0.2, 0, 0.5).
  CHECK(sel.score[1][0] == Approx(0.2));
  CHECK(sel.score[1][1] == Approx(0.0).margin(1e-15));
  CHECK(sel.score[1][2] == Approx(0.5));
  // slot 2: every language alike: spec 0, score = overlap (0.4, 0.4, 0.2); tie -> lower id.
  CHECK(sel.specificity[2][0] == Approx(0.0).margin(1e-15));
  CHECK(sel.score[2][1] == Approx(0.4));
  // Default counts: shallow 1, middle 2, deep 1.
  CHECK(sel.experts == std::vector<std::vector<index_t>>{{2}, {2, 0}, {0}});
  CHECK(sel.count() == 4);

  // Specificity only, with a threshold: slot 1 keeps only the expert above 0.
  RiseOptions o;
  o.overlap_weight = 0.0;
  o.min_score = 0.05;
  o.experts_per_slot = {0, 3, 1};
  const RiseSelection spec_only = rise_select(freq, 1, zones, o);
  CHECK(spec_only.experts == std::vector<std::vector<index_t>>{{}, {2}, {}});  // slot 2: spec 0 < 0.05
  // Overlap only, for fr: slot 1 overlap min(fr, en) = (0.3, 0.1, 0.3).
  o = RiseOptions{};
  o.specificity_weight = 0.0;
  CHECK(rise_select(freq, 2, zones, o).experts[1] == std::vector<index_t>{0, 2});

  MIXMOE_REQUIRE_ERROR(rise_select(freq, 3, zones), "target language 3 is out of range");
  MIXMOE_REQUIRE_ERROR(rise_select(freq, 1, {Z::middle}), "1 zones for 3 router slots");
  LanguageFrequencies bad = freq;
  bad[2][1].pop_back();
  MIXMOE_REQUIRE_ERROR(rise_select(bad, 1, zones), "slot 1: language 2 has 2 experts");
}

TEST_CASE("RISE freeze policy: exactly the selected experts train", "[align][rise]") {
  LM model(lm_config());
  const auto prefixes = expert_parameter_prefixes(model);
  REQUIRE(prefixes.size() == 6);
  CHECK(prefixes[0] == std::vector<std::string>{"layers.0.ffn.lm.experts.0", "layers.0.ffn.lm.experts.1",
                                                "layers.0.ffn.lm.experts.2"});
  CHECK(prefixes[5][1] == "layers.2.ffn.mt.experts.1");
  CHECK(slot_zones(model) == std::vector<LayerZone>{LayerZone::shallow, LayerZone::shallow, LayerZone::middle,
                                                    LayerZone::middle, LayerZone::deep, LayerZone::deep});

  const std::vector<std::vector<index_t>> chosen = {{1}, {}, {}, {0}, {0, 1}, {}};
  const FreezeReport report = apply_freeze_policy(model, experts_only_policy(model, chosen));
  const std::set<std::string> want = {"layers.0.ffn.lm.experts.1.", "layers.1.ffn.mt.experts.0.",
                                      "layers.2.ffn.lm.experts.0.", "layers.2.ffn.lm.experts.1."};
  index_t trainable = 0, tensors = 0;
  for (auto& [name, p] : named_parameters(model)) {
    const bool in = std::any_of(want.begin(), want.end(), [&](const std::string& w) { return name.rfind(w, 0) == 0; });
    INFO(name);
    CHECK(p.requires_grad() == in);
    if (in) {
      trainable += p.numel();
      ++tensors;
    }
  }
  // 4 SwiGLU experts of d_model 8, hidden 4: w_gate, w_up (4 x 8) and w_down (8 x 4) each.
  CHECK(trainable == 4 * 3 * 32);
  CHECK(tensors == 12);
  CHECK(report.trainable == trainable);
  CHECK(count_parameters(model, true) == trainable);
  CHECK(report.unused_patterns.empty());

  // The shared router numbers the experts of both groups: global 4 is mt's expert 1.
  Generator gen(2);
  Layer shared(layer_config(GroupMix::shared_router), gen);
  const auto names = expert_parameter_prefixes(shared);
  REQUIRE(names.size() == 1);
  REQUIRE(names[0].size() == 6);
  CHECK(names[0][4] == "mt.experts.1");
  apply_freeze_policy(shared, experts_only_policy(shared, {{4}}));
  index_t n = 0;
  for (auto& [name, p] : named_parameters(shared))
    if (p.requires_grad()) {
      CHECK(name.rfind("mt.experts.1.", 0) == 0);
      ++n;
    }
  CHECK(n == 3);
  MIXMOE_REQUIRE_ERROR(experts_only_policy(shared, {{6}}), "expert 6 is out of range [0, 6)");
}
}  // namespace test_steering
