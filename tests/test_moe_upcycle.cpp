// Upcycling dense FFNs and models into MoE ones, and the freeze policies of the two training stages.
#include "moe_test_util.hpp"

#include <mixmoe/loss/load_balance.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/upcycle.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/train/freeze.hpp>

#include <cstring>
#include <map>
#include <optional>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_moe_upcycle {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using LMf = ExpertGroup<SwiGLU<float>, tag::lm>;
using MTf = ExpertGroup<SwiGLU<float>, tag::mt>;

ModelConfig ffn_config(std::vector<index_t> experts, index_t expert_hidden, index_t top_k = 1) {
  ModelConfig cfg;
  cfg.vocab = 20;
  cfg.d_model = 8;
  cfg.heads = 2;
  cfg.layers = 1;
  cfg.d_ff = 12;
  cfg.moe.experts_per_group = std::move(experts);
  cfg.moe.expert_hidden = expert_hidden;
  cfg.moe.top_k = top_k;
  return cfg;
}

// A dense FFN with biases, to check how split and copy treat them.
template <Scalar T, Device D = Cpu>
struct BiasFFN {
  using value_type = T;
  using device_type = D;
  BiasFFN(index_t d_model, index_t hidden, Generator& gen)
      : w_up(d_model, hidden, true, gen), w_down(hidden, d_model, true, gen) {
    for (auto* l : {&w_up, &w_down}) {
      Tensor<T, D> b = Tensor<T, D>::randn(l->bias.shape(), gen);
      l->bias.value().copy_from(b);
    }
  }
  Var<T, D> operator()(const Var<T, D>& x) const { return w_down(gelu(w_up(x))); }
  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    w_up.visit_parameters(visit, join_name(prefix, "w_up"));
    w_down.visit_parameters(visit, join_name(prefix, "w_down"));
  }
  Linear<T, D> w_up, w_down;
};

std::map<std::string, Tf> snapshot(auto& model) {
  std::map<std::string, Tf> out;
  for (auto& [name, p] : named_parameters(model)) out[name] = p.value().clone();
  return out;
}

bool same_bits(const Tf& a, const Tf& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("split upcycling: the sum of the experts is the dense FFN", "[moe][upcycle]") {
  Generator gen(1);
  auto x = Vf(Tf::randn({10, 8}, gen));
  SECTION("SwiGLU, through the MoE layer with every gate 1") {
    SwiGLU<float> dense(8, 12, gen);
    MixedMoE<AllOnesRoute, LMf> moe(ffn_config({3}, 0, 3), gen);
    REQUIRE(moe.group<tag::lm>()[0].hidden() == 4);
    upcycle_layer(dense, moe);
    REQUIRE(max_abs_diff(moe(x).value(), dense(x).value()) < 1e-5);
    // expert 1 holds hidden units [4, 8)
    REQUIRE(same_bits(moe.group<tag::lm>()[1].w_up.weight.value(), dense.w_up.weight.value().slice(0, 4, 8).clone()));
    REQUIRE(
        same_bits(moe.group<tag::lm>()[1].w_down.weight.value(), dense.w_down.weight.value().slice(1, 4, 8).clone()));
  }
  SECTION("FeedForward, through moe_forward") {
    FeedForward<float> dense(8, 12, gen);
    ExpertGroup<FeedForward<float>, tag::lm> group(4, 8, 3, gen);
    upcycle_experts(dense, group, UpcycleMode::split);
    EveryExpert<float, Cpu, false> router(RouterShape{8, 4, 4, 0}, gen);
    auto y = moe_forward(x, router(x, {}), 4, 0.0, [&](index_t e, const Vf& rows) { return group(e, rows); });
    REQUIRE(max_abs_diff(y.value(), dense(x).value()) < 1e-5);
  }
  SECTION("biases: up biases are sliced, the down bias shared out") {
    BiasFFN<double> dense(8, 12, gen);
    ExpertGroup<BiasFFN<double>, tag::generic> group(2, 8, 6, gen);
    upcycle_experts(dense, group, UpcycleMode::split);
    auto xd = Vd(x.value().to<double>());
    auto sum = group(0, xd) + group(1, xd);
    REQUIRE(max_abs_diff(sum.value(), dense(xd).value()) < 1e-12);
    ExpertGroup<BiasFFN<double>, tag::generic> copies(3, 8, 12, gen);
    upcycle_experts(dense, copies, UpcycleMode::copy);
    REQUIRE(max_abs_diff(copies(2, xd).value(), dense(xd).value()) == 0.0);
  }
}

TEST_CASE("copy upcycling: full copies with gates 1/N reproduce the dense FFN", "[moe][upcycle]") {
  Generator gen(2);
  SwiGLU<float> dense(8, 12, gen);
  MixedMoE<AllMeanRoute, LMf> moe(ffn_config({3}, 12, 3), gen);
  upcycle_layer(dense, moe, {.mode = UpcycleMode::copy});
  auto x = Vf(Tf::randn({10, 8}, gen));
  REQUIRE(max_abs_diff(moe(x).value(), dense(x).value()) < 1e-5);
  // every expert is its own copy, not a shared tensor
  REQUIRE_FALSE(moe.group<0>()[0].w_up.weight.value().shares_storage(dense.w_up.weight.value()));
  REQUIRE_FALSE(moe.group<0>()[0].w_up.weight.value().shares_storage(moe.group<0>()[1].w_up.weight.value()));
}

TEST_CASE("the MT group starts at random or as copies of the LM experts", "[moe][upcycle]") {
  Generator gen(3);
  SwiGLU<float> dense(8, 12, gen);
  auto cfg = ffn_config({2, 3}, 6);
  cfg.moe.mix = GroupMix::fixed;
  cfg.moe.fixed_mix = {1.0, 0.0};
  MixedMoE<AllOnesRoute, LMf, MTf> random_mt(cfg, gen), copied_mt(cfg, gen);
  const Tf before = random_mt.group<tag::mt>()[0].w_up.weight.value().clone();
  upcycle_layer(dense, random_mt);
  REQUIRE(same_bits(random_mt.group<tag::mt>()[0].w_up.weight.value(), before));
  upcycle_layer(dense, copied_mt, {.other_groups = NewExpertInit::copy_lm});
  // MT expert i = LM expert i mod 2
  for (index_t i = 0; i < 3; ++i)
    REQUIRE(same_bits(copied_mt.group<tag::mt>()[i].w_gate.weight.value(),
                      copied_mt.group<tag::lm>()[i % 2].w_gate.weight.value()));
  // with the MT group weighted 0, both layers still compute the dense FFN
  auto x = Vf(Tf::randn({5, 8}, gen));
  REQUIRE(max_abs_diff(random_mt(x).value(), dense(x).value()) < 1e-5);
  REQUIRE(max_abs_diff(copied_mt(x).value(), dense(x).value()) < 1e-5);
}

TEST_CASE("upcycling errors", "[moe][upcycle][errors]") {
  Generator gen(4);
  SwiGLU<float> dense(8, 12, gen);
  LMf five(5, 8, 2, gen);
  MIXMOE_REQUIRE_ERROR(
      upcycle_experts(dense, five, UpcycleMode::split),
      "[upcycle] split: hidden width 12 of the dense FFN is not divisible by the 5 experts of group lm");
  LMf narrow(3, 8, 4, gen);
  MIXMOE_REQUIRE_ERROR(upcycle_experts(dense, narrow, UpcycleMode::copy),
                       "[upcycle] expert 0 of group lm: w_gate weight is (4, 8), the upcycled slice is (12, 8)");
  LMf wide(2, 8, 12, gen);
  MIXMOE_REQUIRE_ERROR(upcycle_experts(dense, wide, UpcycleMode::split),
                       "[upcycle] expert 0 of group lm: w_gate weight is (12, 8), the upcycled slice is (6, 8)");
  auto cfg = ffn_config({2, 2}, 0);
  cfg.moe.experts_per_group = {2, 3};
  cfg.moe.expert_hidden = 0;  // lm width 6, mt width 4: MT experts cannot be copies
  MixedMoE<AllOnesRoute, LMf, MTf> moe(cfg, gen);
  MIXMOE_REQUIRE_ERROR(upcycle_layer(dense, moe, {.other_groups = NewExpertInit::copy_lm}),
                       "[copy_parameter_values] parameter w_gate.weight is (6, 8) in the source and (4, 8)");
  // whole models: sizes must agree
  ModelConfig dc = ffn_config({1}, 0);
  DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> dense_lm(dc);
  ModelConfig mc = dc;
  mc.moe.experts_per_group = {2};
  mc.d_model = 16;
  MIXMOE_REQUIRE_ERROR((upcycle_model<MixedMoE<AllOnesRoute, LMf>>(dense_lm, mc)),
                       "[upcycle_model] the MoE config has d_model 16, the dense model 8");
}

TEST_CASE("a dense DecoderLM upcycled into LM + MT experts computes the same logits", "[moe][upcycle]") {
  ModelConfig dc;
  dc.vocab = 20;
  dc.d_model = 16;
  dc.heads = 2;
  dc.layers = 2;
  dc.d_ff = 24;
  dc.tie_embeddings = false;
  dc.seed = 5;
  DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> dense(dc);
  ModelConfig mc = dc;
  mc.seed = 6;  // different random init: everything that matters must be copied
  mc.moe.experts_per_group = {3, 2};
  mc.moe.top_k = 3;
  mc.moe.mix = GroupMix::fixed;
  mc.moe.fixed_mix = {1.0, 0.0};
  using FFN = MixedMoE<AllOnesRoute, LMf, MTf>;
  auto moe = upcycle_model<FFN>(dense, mc);
  auto ids = Tensor<Index>::from_indices(std::vector<int>{1, 5, 7, 2, 19, 0, 3, 3}, {2, 4});
  REQUIRE(max_abs_diff(moe(ids).value(), dense(ids).value()) < 1e-4);
  REQUIRE(same_bits(moe.blocks[1].ffn.group<tag::lm>()[2].w_up.weight.value(),
                    dense.blocks[1].ffn.w_up.weight.value().slice(0, 16, 24).clone()));
  REQUIRE(same_bits(moe.blocks[0].attn.wq.weight.value(), dense.blocks[0].attn.wq.weight.value()));
  REQUIRE(same_bits(moe.head.weight.value(), dense.head.weight.value()));
}

TEST_CASE("name patterns: globs and dotted components", "[train][freeze]") {
  REQUIRE(name_matches("lm.experts", "layers.0.ffn.lm.experts.3.w_up.weight"));
  REQUIRE(name_matches("lm.experts", "lm.experts.0.w_up.weight"));
  REQUIRE_FALSE(name_matches("lm.experts", "layers.0.ffn.xlm.experts.3.w_up.weight"));
  REQUIRE(name_matches("router", "layers.1.ffn.router.mt.proj.weight"));
  REQUIRE_FALSE(name_matches("attn", "layers.1.attn_x.weight"));
  REQUIRE(name_matches("layers.*.attn.*", "layers.12.attn.wq.weight"));
  REQUIRE_FALSE(name_matches("layers.*.attn.*", "embed.weight"));
  REQUIRE(name_matches("*.w_down.weight", "layers.0.ffn.mt.experts.1.w_down.weight"));
  REQUIRE(name_matches("layers.?.norm1.weight", "layers.3.norm1.weight"));
  REQUIRE_FALSE(name_matches("layers.?.norm1.weight", "layers.13.norm1.weight"));
  REQUIRE(name_matches("*", "anything.at.all"));
  REQUIRE_FALSE(name_matches("", "embed.weight"));
  // the last matching rule decides
  FreezePolicy p;
  p.freeze("*").train("router").freeze("router.lm");
  REQUIRE(p.decide("layers.0.ffn.router.mt.proj.weight") == std::optional<bool>(true));
  REQUIRE(p.decide("layers.0.ffn.router.lm.proj.weight") == std::optional<bool>(false));
  REQUIRE(p.decide("embed.weight") == std::optional<bool>(false));
  REQUIRE_FALSE(FreezePolicy{}.decide("embed.weight").has_value());
  REQUIRE(FreezeReport::human_count(999) == "999");
  REQUIRE(FreezeReport::human_count(1234567) == "1.2M");
  FreezeReport report;
  report.frozen = 1200000;
  report.trainable = 400000;
  REQUIRE(report.summary() == "frozen 1.2M / trainable 400.0K parameters");
}

TEST_CASE("stage policies: frozen parameters stay bit-identical through AdamW steps", "[train][freeze]") {
  ModelConfig cfg;
  cfg.vocab = 20;
  cfg.d_model = 16;
  cfg.heads = 2;
  cfg.layers = 2;
  cfg.d_ff = 24;
  cfg.moe.experts_per_group = {3, 2};
  cfg.moe.expert_hidden = 8;
  cfg.moe.top_k = 2;
  using Model = DecoderLM<CausalSelfAttention<float>, MixedMoE<SoftmaxTopKRoute, LMf, MTf>>;
  Model model(cfg);
  const index_t total = count_parameters(model);

  const auto s1 = apply_freeze_policy(model, stage1_policy());
  index_t lm_and_routers = 0;
  for (auto& [name, p] : named_parameters(model))
    if (name_matches("lm.experts", name) || name_matches("router", name) || name_matches("group_gate", name))
      lm_and_routers += p.numel();
  REQUIRE(s1.trainable == lm_and_routers);
  REQUIRE(s1.frozen + s1.trainable == total);
  REQUIRE(s1.unused_patterns.empty());
  REQUIRE(apply_freeze_policy(model, stage1_policy(true)).trainable > s1.trainable);

  const auto s2 = apply_freeze_policy(model, stage2_policy());
  index_t expected = 0;
  for (auto& [name, p] : named_parameters(model)) {
    const bool train =
        name_matches("mt.experts", name) || name_matches("router", name) || name_matches("group_gate", name);
    REQUIRE(p.requires_grad() == train);
    if (train) expected += p.numel();
  }
  REQUIRE(s2.trainable == expected);
  REQUIRE(s2.trainable_tensors == 2 * (2 * 3 + 2 + 1));  // per layer: 2 MT experts x 3, 2 routers, the gate
  REQUIRE(count_parameters(model, true) == s2.trainable);

  const auto before = snapshot(model);
  AdamW<float> opt(parameters(model), {.lr = 1e-2});
  Generator gen(8);
  for (int step = 0; step < 3; ++step) {
    auto ids = Tensor<Index>::from_indices(std::vector<int>{1, 5, 7, 2, 19, 0, 3, 3, 4, 4}, {2, 5});
    auto targets = Tensor<Index>::from_indices(std::vector<int>{5, 7, 2, 19, 0, 3, 3, 4, 4, 1}, {2, 5});
    auto logits = model(ids);  // before the auxiliary loss, which reads this forward's routing
    auto loss = cross_entropy(logits, targets) + 0.01 * load_balance_loss(model);
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
  int changed = 0;
  for (auto& [name, p] : named_parameters(model)) {
    INFO(name);
    if (!p.requires_grad()) {
      REQUIRE(same_bits(p.value(), before.at(name)));
    } else if (!same_bits(p.value(), before.at(name))) {
      ++changed;
    } else {
      // only an MT expert that no token reached in 3 steps may stay put
      REQUIRE(name_matches("mt.experts", name));
    }
  }
  REQUIRE(changed >= 2 * 3);  // at least every router and gate

  FreezePolicy typo;
  typo.freeze("lm.expert");
  const auto r = apply_freeze_policy(model, typo);
  REQUIRE(r.unused_patterns == std::vector<std::string>{"lm.expert"});
}
}  // namespace test_moe_upcycle
