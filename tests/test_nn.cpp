// Transformer pieces: modules, parameter names, a whole DecoderLM's gradient,
// KV-cache decoding against the full forward.
#include "test_util.hpp"

#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/hash_router.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_nn {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab = 11;
  c.d_model = 8;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.d_ff = 12;
  c.seed = 3;
  c.init_std = 0.3;  // large enough that every parameter matters numerically
  return c;
}

Tensor<Index> ids_of(std::initializer_list<int> v, index_t b, index_t t) {
  return Tensor<Index>::from_indices(std::span<const int>(v.begin(), v.size()), {b, t});
}

}  // namespace

using DenseLMd = DecoderLM<CausalSelfAttention<double>, SwiGLU<double>>;
using DenseLMf = DecoderLM<CausalSelfAttention<float>, SwiGLU<float>>;

TEST_CASE("DecoderLM parameter registry: names, counts, freezing", "[nn]") {
  auto cfg = tiny_config();
  DenseLMd model(cfg);
  auto named = named_parameters(model);
  std::vector<std::string> names;
  for (auto& [n, p] : named) names.push_back(n);
  REQUIRE(names.front() == "embed.weight");
  REQUIRE(std::find(names.begin(), names.end(), "layers.1.ffn.w_gate.weight") != names.end());
  REQUIRE(std::find(names.begin(), names.end(), "layers.0.attn.wk.weight") != names.end());
  REQUIRE(names.back() == "norm.weight");  // tied head: no head.weight
  const index_t c = 8, f = 12, kv = 4;    // kv width = kv_heads * head_dim
  const index_t per_layer = c * c * 2 + c * kv * 2 + 3 * c * f + 2 * c;
  REQUIRE(count_parameters(model) == 11 * c + 2 * per_layer + c);
  // freezing by name
  const int frozen = set_requires_grad(model, [](std::string_view n) { return n.find(".attn.") != std::string_view::npos; }, false);
  REQUIRE(frozen == 2 * 4);
  REQUIRE(count_parameters(model, true) == count_parameters(model) - 2 * (c * c * 2 + c * kv * 2));
  REQUIRE(trainable_parameters(model).size() == parameters(model).size() - 8);
  cfg.tie_embeddings = false;
  DenseLMd untied(cfg);
  REQUIRE(named_parameters(untied).back().first == "head.weight");
}

TEST_CASE("gradcheck: a whole 2-layer DecoderLM (GQA, RoPE, SwiGLU, tied head)", "[nn][gradcheck]") {
  DenseLMd model(tiny_config());
  const auto ids = ids_of({1, 4, 2, 7, 3, 9, 0, 5}, 2, 4);
  const auto targets = ids_of({4, 2, 7, 3, 9, 0, 5, 10}, 2, 4);
  auto fn = [&](const std::vector<Vd>&) { return cross_entropy(model(ids), targets); };
  MIXMOE_REQUIRE_GRADCHECK(fn, parameters(model), GradcheckOptions{.eps = 1e-6, .atol = 1e-7, .rtol = 1e-5});
}

TEST_CASE("KV-cache decoding matches the full forward", "[nn][decode]") {
  DenseLMf model(tiny_config());
  const auto ids = ids_of({1, 4, 2, 7, 3, 9, 0, 5, 6, 6}, 1, 10);
  no_grad ng;
  const Tf full = model(ids).value();  // (1, 10, V)
  DecodeState<float> state;
  // a prompt of 4 tokens, then one token at a time
  Tf prompt = model(Tensor<Index>(ids.slice(1, 0, 4).contiguous()), &state).value();
  REQUIRE(state.length() == 4);
  REQUIRE(max_abs_diff(prompt, full.slice(1, 0, 4).contiguous()) < 1e-5);
  for (index_t t = 4; t < 10; ++t) {
    Tf step = model(Tensor<Index>(ids.slice(1, t, t + 1).contiguous()), &state).value();
    INFO("position " << t);
    REQUIRE(max_abs_diff(step, full.slice(1, t, t + 1).contiguous()) < 1e-5);
  }
  REQUIRE(state.length() == 10);
}

TEST_CASE("model configuration and input errors", "[nn][errors]") {
  auto cfg = tiny_config();
  cfg.kv_heads = 3;
  MIXMOE_REQUIRE_ERROR(DenseLMd{cfg}, "[ModelConfig] heads 2 is not divisible by kv_heads 3");
  cfg = tiny_config();
  cfg.d_model = 9;
  MIXMOE_REQUIRE_ERROR(DenseLMd{cfg}, "[ModelConfig] d_model 9 is not divisible by heads 2");
  DenseLMd model(tiny_config());
  MIXMOE_REQUIRE_ERROR(model(Tensor<Index>::zeros({4})), "[DecoderLM] token ids must be (B, T), got (4)");
  MIXMOE_REQUIRE_ERROR(model(ids_of({1, 11}, 1, 2)), "[embedding] id 11");
  MIXMOE_REQUIRE_ERROR(Linear<float>(0, 3, false, default_generator()), "[Linear] sizes must be positive");
}

TEST_CASE("a dense LM learns a repeating sequence", "[nn][training]") {
  auto cfg = tiny_config();
  cfg.init_std = 0.02;
  cfg.d_model = 16;
  cfg.d_ff = 32;
  DenseLMf model(cfg);
  // period-5 pattern: predictable after one period
  std::vector<int> seq;
  for (int i = 0; i < 33; ++i) seq.push_back((i * 3) % 5 + 1);
  const auto ids = Tensor<Index>::from_indices(std::span<const int>(seq.data(), 32), {2, 16});
  const auto targets = Tensor<Index>::from_indices(std::span<const int>(seq.data() + 1, 32), {2, 16});
  AdamW<float> opt(parameters(model), {.lr = 3e-3, .weight_decay = 0.0});
  float first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    auto loss = cross_entropy(model(ids), targets);
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
  INFO("loss " << first << " -> " << last);
  REQUIRE(first > 2.0f);  // about ln 11
  REQUIRE(last < 0.3f);
}

TEST_CASE("MoE DecoderLMs: token ids reach the router; decoding matches the full forward", "[nn][moe][decode]") {
  auto cfg = tiny_config();
  cfg.moe.experts_per_group = {4};
  cfg.moe.top_k = 1;
  cfg.moe.expert_hidden = 6;
  const auto ids = ids_of({1, 4, 2, 7, 3, 9, 0, 5}, 1, 8);
  {
    using HashLM = DecoderLM<CausalSelfAttention<float>, MixedMoE<HashRouting, ExpertGroup<SwiGLU<float>, tag::generic>>>;
    HashLM model(cfg);
    no_grad ng;
    const Tf full = model(ids).value();
    DecodeState<float> state;
    for (index_t t = 0; t < 8; ++t) {
      Tf step = model(Tensor<Index>(ids.slice(1, t, t + 1).contiguous()), &state).value();
      REQUIRE(max_abs_diff(step, full.slice(1, t, t + 1).contiguous()) < 1e-5);
    }
  }
  {
    cfg.moe.experts_per_group = {2, 2};
    using MixedLM = DecoderLM<CausalSelfAttention<float>,
                              MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>, ExpertGroup<SwiGLU<float>, tag::lm>,
                                       ExpertGroup<SwiGLU<float>, tag::mt>>>;
    MixedLM model(cfg);
    no_grad ng;
    const Tf full = model(ids).value();
    DecodeState<float> state;
    Tf prompt = model(Tensor<Index>(ids.slice(1, 0, 3).contiguous()), &state).value();
    REQUIRE(max_abs_diff(prompt, full.slice(1, 0, 3).contiguous()) < 1e-5);
    for (index_t t = 3; t < 8; ++t) {
      Tf step = model(Tensor<Index>(ids.slice(1, t, t + 1).contiguous()), &state).value();
      REQUIRE(max_abs_diff(step, full.slice(1, t, t + 1).contiguous()) < 1e-5);
    }
  }
}
}  // namespace test_nn
