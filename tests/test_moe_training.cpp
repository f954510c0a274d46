// A tiny mixed-MoE LM (LM + MT groups, Fourier-feature routing) learns real text,
// with the load-balance loss keeping the expert load even; and a whole 2-layer
// Fourier-routed DecoderLM passes gradcheck.
#include "test_util.hpp"

#include <fstream>
#include <iterator>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_moe_training {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

template <class T>
using FourierMixedLM =
    DecoderLM<CausalSelfAttention<T>, MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>,
                                               ExpertGroup<SwiGLU<T>, tag::lm>, ExpertGroup<SwiGLU<T>, tag::mt>>>;

// The GPL-3 text shipped by base-files (present on every Debian system), as bytes.
std::vector<unsigned char> read_text() {
  const char* path = "/usr/share/common-licenses/GPL-3";
  std::ifstream f(path, std::ios::binary);
  INFO("reading " << path);
  REQUIRE(f.good());
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("gradcheck: a 2-layer DecoderLM with Fourier-routed mixed-MoE layers", "[moe][gradcheck]") {
  ModelConfig cfg;
  cfg.vocab = 9;
  cfg.d_model = 8;
  cfg.layers = 2;
  cfg.heads = 2;
  cfg.d_ff = 8;
  cfg.init_std = 0.3;
  cfg.seed = 5;
  cfg.moe.experts_per_group = {2, 2};
  cfg.moe.top_k = 1;
  cfg.moe.expert_hidden = 4;
  FourierMixedLM<double> model(cfg);
  // The router's top-k choice is piecewise constant: finite differences across a
  // switch would be meaningless, so the step is small and the inputs fixed.
  const auto ids = Tensor<Index>::from({1, 4, 2, 7, 3, 8}, {2, 3});
  const auto targets = Tensor<Index>::from({4, 2, 7, 3, 8, 0}, {2, 3});
  auto fn = [&](const std::vector<Vd>&) {
    auto logits = model(ids);
    return cross_entropy(logits, targets) + 0.1 * load_balance_loss(model) + 0.01 * router_z_loss(model);
  };
  MIXMOE_REQUIRE_GRADCHECK(fn, parameters(model), GradcheckOptions{.eps = 1e-6, .atol = 1e-7, .rtol = 1e-5});
}

TEST_CASE("a tiny mixed-MoE LM learns real text, with balanced experts", "[moe][training]") {
  const auto text = read_text();
  REQUIRE(text.size() > 20000);
  const std::size_t split = text.size() * 9 / 10;  // last 10% held out

  // Unigram baseline: the entropy of the byte distribution of the training part, in nats.
  std::vector<double> freq(256, 0.0);
  for (std::size_t i = 0; i < split; ++i) freq[text[i]] += 1;
  double unigram = 0;
  for (double c : freq)
    if (c > 0) unigram -= c / static_cast<double>(split) * std::log(c / static_cast<double>(split));

  ModelConfig cfg;
  cfg.vocab = 256;
  cfg.d_model = 48;
  cfg.layers = 2;
  cfg.heads = 4;
  cfg.d_ff = 96;
  cfg.seed = 1;
  cfg.moe.experts_per_group = {4, 4};
  cfg.moe.top_k = 1;
  cfg.moe.expert_hidden = 48;
  FourierMixedLM<float> model(cfg);
  AdamW<float> opt(parameters(model), {.lr = 3e-3, .weight_decay = 0.0});

  const index_t batch = 8, seq = 48;
  Generator gen(7);
  auto sample = [&](std::size_t lo, std::size_t hi, Tensor<Index>& in, Tensor<Index>& out) {
    for (index_t b = 0; b < batch; ++b) {
      const std::size_t start = lo + gen.below(hi - lo - static_cast<std::size_t>(seq) - 1);
      for (index_t t = 0; t < seq; ++t) {
        in(b, t) = text[start + static_cast<std::size_t>(t)];
        out(b, t) = text[start + static_cast<std::size_t>(t) + 1];
      }
    }
  };
  auto in = Tensor<Index>::empty({batch, seq}), out = Tensor<Index>::empty({batch, seq});
  for (int step = 0; step < 1000; ++step) {
    sample(0, split, in, out);
    auto logits = model(in);
    auto loss = cross_entropy(logits, out) + 0.01 * load_balance_loss(model);
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
  // Held-out loss over fixed windows.
  double held_out = 0;
  std::vector<RoutingStats> stats;
  {
    no_grad ng;
    gen.seed(99);
    for (int i = 0; i < 8; ++i) {
      sample(split, text.size(), in, out);
      held_out += cross_entropy(model(in), out).item() / 8.0;
      if (i == 7) stats = collect_routing_stats(model);
    }
  }
  INFO("held-out loss " << held_out << " nats, unigram baseline " << unigram << "\n" << format_routing_stats(stats));
  REQUIRE(held_out < 0.75 * unigram);
  // Load balance: 4 routers (2 layers x 2 groups), each over 4 experts; max/mean load bound 2.0.
  REQUIRE(stats.size() == 4);
  for (const auto& s : stats) REQUIRE(s.load_ratio < 2.0);
}
}  // namespace test_moe_training
