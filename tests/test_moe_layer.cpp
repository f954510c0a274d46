// The mixed MoE layer (three group-combination modes, dropless and capacity), expert groups,
// the auxiliary losses and the routing statistics.
#include "moe_test_util.hpp"

#include <mixmoe/loss/load_balance.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/routing_stats.hpp>
#include <mixmoe/nn/decoder.hpp>

#include <cmath>
#include <numbers>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_moe_layer {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

template <class T>
using LMGroup = ExpertGroup<SwiGLU<T>, tag::lm>;
template <class T>
using MTGroup = ExpertGroup<SwiGLU<T>, tag::mt>;
template <class T>
using Mixed = MixedMoE<SoftmaxTopKRoute, LMGroup<T>, MTGroup<T>>;

ModelConfig layer_config(GroupMix mix, double capacity_factor, index_t top_k) {
  return small_layer_config(mix, capacity_factor, top_k);
}

std::vector<std::string> names_of(auto& module) {
  std::vector<std::string> out;
  for (auto& [name, p] : named_parameters(module)) out.push_back(name);
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

// The layer's output recomputed one assignment at a time from its recorded routings (dropless).
template <class T>
Tensor<T> naive_layer(const Mixed<T>& layer, const Tensor<T>& x) {
  const index_t n = x.size(0), c = x.size(1);
  Tensor<T> out = Tensor<T>::zeros({n, c});
  Tensor<T> w;  // (N, G) group weights
  if (layer.mix() == GroupMix::group_gate) {
    no_grad ng;
    w = softmax(layer.group_gate(Var<T>(x)), -1).value();
  }
  const auto& recs = layer.routing_records();
  for (std::size_t g = 0; g < recs.size(); ++g) {
    const auto& r = recs[g].routing;
    for (index_t m = 0; m < r.token.numel(); ++m) {
      const index_t t = r.token.data()[m], e = r.expert.data()[m];
      T weight = r.gate.value().data()[m];
      if (layer.mix() == GroupMix::group_gate) weight *= w(t, static_cast<index_t>(g));
      if (layer.mix() == GroupMix::fixed) weight *= static_cast<T>(layer.fixed_mix()[g]);
      const Var<T> row(x.slice(0, t, t + 1).clone());
      // shared router: global ids, the LM group's experts first
      const bool lm = layer.mix() == GroupMix::shared_router ? e < layer.group_size(0) : g == 0;
      const index_t local = layer.mix() == GroupMix::shared_router && !lm ? e - layer.expert_offset(1) : e;
      const Tensor<T> y = (lm ? layer.template group<0>()[local](row) : layer.template group<1>()[local](row)).value();
      for (index_t j = 0; j < c; ++j) out(t, j) += weight * y(0, j);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("expert groups: sizes, names, checks", "[moe][layer]") {
  Generator gen(1);
  LMGroup<double> lm(3, 4, 5, gen);
  REQUIRE(lm.size() == 3);
  REQUIRE(std::string(LMGroup<double>::name()) == "lm");
  const auto names = names_of(lm);
  REQUIRE(names.size() == 9);
  REQUIRE(names[0] == "lm.experts.0.w_gate.weight");
  REQUIRE(names[8] == "lm.experts.2.w_down.weight");
  REQUIRE(lm[1].hidden() == 5);
  auto x = rand_var({2, 4}, 2);
  REQUIRE(lm(1, x).shape() == Shape{2, 4});
  MIXMOE_REQUIRE_ERROR(lm(3, x), "[ExpertGroup] expert 3 is out of range for group lm of 3 experts");
  MIXMOE_REQUIRE_ERROR(LMGroup<double>(0, 4, 5, gen), "[ExpertGroup] group lm needs at least one expert, got 0");
  static_assert(ExpertModule<SwiGLU<float>> && ExpertModule<FeedForward<double>>);
  static_assert(!ExpertModule<Linear<float>>);  // not constructible from (d_model, hidden, gen)
}

TEST_CASE("MixedMoE: parameter names per mode", "[moe][layer]") {
  Generator gen(2);
  Mixed<double> gated(layer_config(GroupMix::group_gate, 0, 1), gen);
  auto n1 = names_of(gated);
  REQUIRE(contains(n1, "lm.experts.0.w_gate.weight"));
  REQUIRE(contains(n1, "mt.experts.1.w_down.weight"));
  REQUIRE(contains(n1, "router.lm.proj.weight"));
  REQUIRE(contains(n1, "router.mt.proj.weight"));
  REQUIRE(contains(n1, "group_gate.weight"));
  REQUIRE(n1.size() == 4 * 3 + 2 + 1);
  REQUIRE(gated.group_gate.weight.shape() == Shape{2, 4});

  Mixed<double> shared(layer_config(GroupMix::shared_router, 0, 2), gen);
  auto n2 = names_of(shared);
  REQUIRE(contains(n2, "router.proj.weight"));
  REQUIRE_FALSE(contains(n2, "group_gate.weight"));
  REQUIRE(shared.routers.size() == 1);
  REQUIRE(shared.routers[0].num_experts() == 4);

  Mixed<double> fixed(layer_config(GroupMix::fixed, 0, 1), gen);
  auto n3 = names_of(fixed);
  REQUIRE(contains(n3, "router.mt.proj.weight"));
  REQUIRE_FALSE(contains(n3, "group_gate.weight"));
  REQUIRE(fixed.fixed_mix() == std::vector<double>{0.7, 0.3});

  // one group: a plain MoE whatever the mode; the group is found by tag
  ModelConfig one = layer_config(GroupMix::group_gate, 0, 2);
  one.moe.experts_per_group = {3};
  MixedMoE<SoftmaxTopKRoute, ExpertGroup<SwiGLU<double>, tag::generic>> plain(one, gen);
  REQUIRE(plain.mix() == GroupMix::shared_router);
  REQUIRE(contains(names_of(plain), "generic.experts.2.w_up.weight"));
  REQUIRE(contains(names_of(plain), "router.proj.weight"));
  REQUIRE(plain.group<tag::generic>().size() == 3);
  REQUIRE(Mixed<double>::index_of<tag::mt> == 1);
}

TEST_CASE("MixedMoE equals a per-assignment loop in every mode", "[moe][layer]") {
  for (GroupMix mix : {GroupMix::shared_router, GroupMix::group_gate, GroupMix::fixed}) {
    INFO("mode " << mix_name(mix));
    Generator gen(5);
    const index_t k = mix == GroupMix::shared_router ? 2 : 1;
    Mixed<double> layer(layer_config(mix, 0, k), gen);
    auto x = Vd(Td::randn({7, 4}, gen));
    auto y = layer(x);
    REQUIRE(y.shape() == Shape{7, 4});
    REQUIRE(layer.routing_records().size() == (mix == GroupMix::shared_router ? 1u : 2u));
    REQUIRE(max_abs_diff(y.value(), naive_layer(layer, x.value())) < 1e-12);

    Generator gf(5);
    Mixed<float> lf(layer_config(mix, 0, k), gf);
    auto xf = Vf(Tf::randn({7, 4}, gf));
    auto yf = lf(xf);  // before naive_layer, which reads this call's routing
    REQUIRE(max_abs_diff(yf.value(), naive_layer(lf, xf.value())) < 1e-5);
  }
}

TEST_CASE("gradcheck: MixedMoE w.r.t. x and every parameter, all modes, dropless and capacity",
          "[moe][layer][gradcheck]") {
  for (GroupMix mix : {GroupMix::shared_router, GroupMix::group_gate, GroupMix::fixed})
    for (double cf : {0.0, 0.5}) {
      INFO("mode " << mix_name(mix) << " capacity_factor " << cf);
      Generator gen(11);
      Mixed<double> layer(layer_config(mix, cf, mix == GroupMix::shared_router ? 2 : 1), gen);
      auto inputs = with_params(rand_var({6, 4}, 12), layer);
      MIXMOE_REQUIRE_GRADCHECK([&](const std::vector<Vd>& in) { return layer(in[0]); }, inputs);
      index_t dropped = 0;
      for (const auto& rec : layer.routing_records()) {
        dropped += rec.dropped();
        REQUIRE(rec.capacity == (cf > 0 ? 2 : 0));
      }
      if (cf > 0)
        REQUIRE(dropped > 0);
      else
        REQUIRE(dropped == 0);
    }
}

TEST_CASE("MixedMoE records the last forward's routing", "[moe][layer]") {
  Generator gen(3);
  Mixed<double> layer(layer_config(GroupMix::group_gate, 0, 1), gen);
  REQUIRE(layer.routing_records().empty());
  layer(rand_var({5, 4}, 1));
  const auto& recs = layer.routing_records();
  REQUIRE(recs.size() == 2);
  REQUIRE(recs[0].name == "router.lm");
  REQUIRE(recs[1].name == "router.mt");
  REQUIRE(recs[0].routing.probs.shape() == Shape{5, 2});
  REQUIRE(recs[0].routed()[0] + recs[0].routed()[1] == 5);
  REQUIRE(recs[0].kept() == recs[0].routed());
  layer(rand_var({3, 4}, 2));
  REQUIRE(layer.routing_records()[1].routing.probs.shape() == Shape{3, 2});
  layer.clear_routing_records();
  REQUIRE(layer.routing_records().empty());
}

TEST_CASE("MixedMoE configuration errors", "[moe][layer][errors]") {
  Generator gen(4);
  auto cfg = layer_config(GroupMix::group_gate, 0, 1);
  cfg.moe.experts_per_group = {2, 2, 2};
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen),
                       "[MixedMoE] moe.experts_per_group has 3 entries for the 2 expert groups (lm, mt)");
  cfg = layer_config(GroupMix::group_gate, 0, 1);
  cfg.moe.experts_per_group = {2, 0};
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen), "[MixedMoE] group mt needs at least one expert");
  cfg = layer_config(GroupMix::group_gate, 0, 1);
  cfg.moe.expert_hidden = 0;
  cfg.moe.experts_per_group = {4, 2};  // d_ff 6
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen),
                       "[MixedMoE] d_ff 6 is not divisible by the 4 experts of group lm; set moe.expert_hidden");
  cfg = layer_config(GroupMix::shared_router, 0, 5);
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen), "[MixedMoE] moe.top_k 5 exceeds the 4 experts of the shared router");
  cfg = layer_config(GroupMix::fixed, 0, 1);
  cfg.moe.fixed_mix = {1.0};
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen),
                       "[MixedMoE] moe.fixed_mix has 1 weights for the 2 expert groups (lm, mt)");
  cfg.moe.fixed_mix = {1.0, -0.5};
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen), "[MixedMoE] moe.fixed_mix[1] = -0.5 must be a finite weight >= 0");
  cfg = layer_config(GroupMix::group_gate, -1.0, 1);
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen), "[MixedMoE] moe.capacity_factor must be >= 0 (0 = dropless), got -1");
  cfg = layer_config(GroupMix::group_gate, 0, 0);
  MIXMOE_REQUIRE_ERROR(Mixed<double>(cfg, gen), "[MixedMoE] moe.top_k must be >= 1, got 0");
  cfg = layer_config(GroupMix::group_gate, 0, 1);
  Mixed<double> layer(cfg, gen);
  MIXMOE_REQUIRE_ERROR(layer(rand_var({3, 5}, 1)), "[MixedMoE] input must be (N, 4), got (3, 5)");
  MIXMOE_REQUIRE_ERROR(Mixed<double>()(rand_var({3, 4}, 1)),
                       "[MixedMoE] the layer is default-constructed: build it from a ModelConfig");
  // top_k larger than a group is capped at the group's size in per-group modes
  cfg.moe.top_k = 3;
  Mixed<double> capped(cfg, gen);
  capped(rand_var({3, 4}, 1));
  REQUIRE(capped.routing_records()[0].routing.token.numel() == 3 * 2);
}

TEST_CASE("load_balance_loss: values and gradient on hand-made routings", "[moe][loss]") {
  // uniform probabilities, balanced top-1: 1.0
  auto r = make_routing<double>({0, 1, 2, 3}, {0, 1, 0, 1}, {1, 1, 1, 1}, 4, 2, std::vector<double>(8, 0.5));
  REQUIRE(load_balance_loss(r).item() == Approx(1.0));
  // uniform and balanced top-2 over 4 experts: 1.0 as well
  auto r2 = make_routing<double>({0, 0, 1, 1}, {0, 1, 2, 3}, {1, 1, 1, 1}, 2, 4, std::vector<double>(8, 0.25));
  REQUIRE(load_balance_loss(r2).item() == Approx(1.0));
  // everything on expert 0: f = (1, 0), P = (0.7, 0.3): 2 * 0.7
  auto r3 = make_routing<double>({0, 1}, {0, 0}, {1, 1}, 2, 2, {0.8, 0.2, 0.6, 0.4});
  r3.probs = Vd(r3.probs.value(), true);
  auto l3 = load_balance_loss(r3);
  REQUIRE(l3.item() == Approx(1.4));
  l3.backward();  // dL/dp[n, e] = E f_e / N
  REQUIRE(r3.probs.grad().to_vector() == std::vector<double>{1.0, 0.0, 1.0, 0.0});
  // gradcheck w.r.t. probs (unnormalised rows are fine: the loss is linear in them)
  auto r4 = make_routing<double>({0, 0, 1, 1, 2, 2}, {0, 2, 1, 2, 2, 0}, std::vector<double>(6, 1.0), 3, 3);
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        Routing<double> rr = r4;
        rr.probs = in[0];
        return load_balance_loss(rr);
      },
      {rand_var({3, 3}, 1)});
  // float
  auto rf = make_routing<float>({0, 1, 2, 3}, {0, 1, 0, 1}, {1, 1, 1, 1}, 4, 2, std::vector<float>(8, 0.5f));
  REQUIRE(load_balance_loss(rf).item() == Approx(1.0f));

  auto bad = make_routing<double>({0, 1}, {0, 2}, {1, 1}, 2, 2, {0.5, 0.5, 0.5, 0.5});
  MIXMOE_REQUIRE_ERROR(load_balance_loss(bad),
                       "[load_balance_loss] expert 2 of assignment 1 is out of range for 2 experts");
  auto no_probs = make_routing<double>({0, 1}, {0, 1}, {1, 1}, 2, 2);
  MIXMOE_REQUIRE_ERROR(load_balance_loss(no_probs),
                       "[load_balance_loss] routing.probs must be (N, E), got an undefined Var");
  auto wrong_e = make_routing<double>({0, 1}, {0, 1}, {1, 1}, 2, 3);
  wrong_e.probs = Vd(Td::full({2, 2}, 0.5));
  MIXMOE_REQUIRE_ERROR(load_balance_loss(wrong_e),
                       "[load_balance_loss] routing.probs (2, 2) has 2 experts, the routing says 3");
}

TEST_CASE("router_z_loss: value, stability, gradient, errors", "[moe][loss]") {
  const double ln3 = std::log(3.0), ln2 = std::numbers::ln2, ln4 = std::log(4.0);
  auto logits = Vd(Td::from({0, 0, ln3, 0}, {2, 2}));
  REQUIRE(router_z_loss(logits).item() == Approx((ln2 * ln2 + ln4 * ln4) / 2));
  // large logits do not overflow: logsumexp(100, 100) = 100 + ln 2
  auto big = Vd(Td::from({100, 100}, {1, 2}));
  REQUIRE(router_z_loss(big).item() == Approx((100 + ln2) * (100 + ln2)));
  auto bigf = Vf(Tf::from({100, 100}, {1, 2}));
  REQUIRE(router_z_loss(bigf).item() == Approx((100 + ln2) * (100 + ln2)).epsilon(1e-6));
  for (Shape s : {Shape{3, 4}, Shape{1, 5}, Shape{6, 1}}) {
    INFO("shape " << s);
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return router_z_loss(in[0]); }, {rand_var(s, 3)});
  }
  MIXMOE_REQUIRE_ERROR(router_z_loss(Vd(Td::zeros({3}))), "[router_z_loss] logits must be (N, E), got (3)");
  MIXMOE_REQUIRE_ERROR(router_z_loss(Vd(Td::zeros({0, 3}))), "[router_z_loss] logits (0, 3) are empty");
}

TEST_CASE("model-level losses average over every router of every MoE layer", "[moe][loss]") {
  ModelConfig cfg;
  cfg.vocab = 11;
  cfg.d_model = 8;
  cfg.heads = 2;
  cfg.layers = 2;
  cfg.d_ff = 8;
  cfg.moe.experts_per_group = {2, 2};
  cfg.moe.top_k = 1;
  using Model = DecoderLM<CausalSelfAttention<double>, Mixed<double>>;
  Model model(cfg);
  REQUIRE(count_moe_layers(model) == 2);
  MIXMOE_REQUIRE_ERROR(load_balance_loss(model),
                       "[load_balance_loss] MoE layer 0 has no recorded routing: run a forward pass before computing");
  auto ids = Tensor<Index>::from_indices(std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8}, {2, 4});
  auto logits = model(ids);
  double lb = 0, z = 0;
  int routers = 0;
  for (auto& block : model.blocks)
    for (const auto& rec : block.ffn.routing_records()) {
      lb += load_balance_loss(rec.routing).item();
      z += router_z_loss(rec.routing).item();
      ++routers;
    }
  REQUIRE(routers == 4);
  auto lb_model = load_balance_loss(model);
  auto z_model = router_z_loss(model);
  REQUIRE(lb_model.item() == Approx(lb / 4));
  REQUIRE(z_model.item() == Approx(z / 4));
  // one forward's routing is read once per loss: a second read would be a stale or doubled term
  MIXMOE_REQUIRE_ERROR(load_balance_loss(model),
                       "[load_balance_loss] the routing of MoE layer 0 (router.lm) was "
                       "already used by this loss: run a forward pass first");
  // the losses reach the routers (and the gate) through probs
  (lb_model + 0.1 * z_model).backward();
  REQUIRE(model.blocks[1].ffn.routers[0].proj.weight.grad().defined());
  REQUIRE_FALSE(model.blocks[1].ffn.group<tag::lm>()[0].w_up.weight.grad().defined());
  // next step: a loss computed before the step's forward (what `cross_entropy(model(x), y) + loss(model)` may do,
  // depending on the compiler's evaluation order) would read the previous step's routing, and is refused
  MIXMOE_REQUIRE_ERROR(router_z_loss(model), "[router_z_loss] the routing of MoE layer 0 (router.lm) was already used");
  auto logits2 = model(ids);
  auto loss2 = mean(logits2) + load_balance_loss(model);
  REQUIRE(std::isfinite(loss2.item()));
  // after backward, the trainer may let go of the graph the records hold; the values stay for statistics
  auto probs_node = std::weak_ptr(model.blocks[0].ffn.routing_records()[0].routing.probs.node());
  loss2.backward();
  logits2 = Vd();
  loss2 = Vd();
  REQUIRE_FALSE(probs_node.expired());  // still held by the records
  release_routing_graphs(model);
  REQUIRE(probs_node.expired());
  const auto& rec = model.blocks[0].ffn.routing_records()[0];
  REQUIRE_FALSE(rec.routing.probs.requires_grad());
  REQUIRE(rec.routing.probs.shape() == Shape{8, 2});
  REQUIRE(collect_routing_stats(model).size() == 4);
  MIXMOE_REQUIRE_ERROR(router_z_loss(model),
                       "[router_z_loss] the routing graph of MoE layer 0 (router.lm) was released");
  // a dense model has no MoE layers: a constant 0
  DecoderLM<CausalSelfAttention<double>, SwiGLU<double>> dense(cfg);
  REQUIRE(count_moe_layers(dense) == 0);
  REQUIRE(load_balance_loss(dense).item() == 0.0);
  REQUIRE_FALSE(router_z_loss(dense).requires_grad());
}

TEST_CASE("routing statistics on a hand-made routing", "[moe][stats]") {
  // 4 tokens, 3 experts, top-1 with a drop; probs rows: one-hot, uniform, two halves, one-hot
  const double third = 1.0 / 3.0;
  auto r = make_routing<double>({0, 1, 2, 3}, {0, 0, 1, 0}, {1, 1, 1, 1}, 4, 3,
                                {1, 0, 0, third, third, third, 0.5, 0.5, 0, 0, 0, 1});
  const auto s = routing_stats(r, {2, 1, 0}, 1);
  REQUIRE(s.num_tokens == 4);
  REQUIRE(s.num_assignments == 4);
  REQUIRE(s.tokens_per_expert == std::vector<index_t>{3, 1, 0});
  REQUIRE(s.kept_per_expert == std::vector<index_t>{2, 1, 0});
  REQUIRE(s.dropped == 1);
  REQUIRE(s.entropy == Approx((std::log(3.0) + std::log(2.0)) / 4));
  REQUIRE(s.max_entropy == Approx(std::log(3.0)));
  REQUIRE(s.load_ratio == Approx(3.0 / (4.0 / 3.0)));
  const std::string table = format_routing_stats({s});
  INFO(table);
  REQUIRE_THAT(table, Catch::Matchers::Contains("tokens per expert"));
  REQUIRE_THAT(table, Catch::Matchers::Contains(" 3 1 0"));
  REQUIRE_THAT(table, Catch::Matchers::Contains("0.45/1.10"));
  REQUIRE_THAT(format_routing_stats({s}, 2), Catch::Matchers::Contains(" 3 1 ... (3 experts)"));
  MIXMOE_REQUIRE_ERROR(routing_stats(r, {1, 1}), "[routing_stats] 2 kept counts for 3 experts");
}

TEST_CASE("routing statistics of a model's layers", "[moe][stats]") {
  Generator gen(9);
  auto cfg = layer_config(GroupMix::group_gate, 0.5, 1);
  Mixed<double> layer(cfg, gen);
  REQUIRE(collect_routing_stats(layer).empty());
  layer(rand_var({6, 4}, 1));
  const auto stats = collect_routing_stats(layer);
  REQUIRE(stats.size() == 2);
  REQUIRE(stats[1].router == "router.mt");
  REQUIRE(stats[0].num_tokens == 6);
  REQUIRE(stats[0].capacity == 2);
  REQUIRE(stats[0].dropped == layer.routing_records()[0].dropped());
  index_t kept = 0;
  for (auto v : stats[0].kept_per_expert) kept += v;
  REQUIRE(kept + stats[0].dropped == 6);
  REQUIRE(stats[0].entropy > 0);
  REQUIRE(stats[0].entropy <= stats[0].max_entropy + 1e-12);
  std::ostringstream os;
  print_routing_stats(os, stats);
  REQUIRE_THAT(os.str(), Catch::Matchers::Contains("router.mt"));
}
}  // namespace test_moe_layer
