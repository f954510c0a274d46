// Trains a small decoder LM for a few steps and reports tokens/s and peak memory:
// the mixmoe side of the comparison with PyTorch (benchmarks/torch_lm.py builds
// the same models). One JSON line on stdout. graph_mib is the memory the autodiff graph holds
// for the backward (allocator bytes in use after the forward and the loss, less before them).
// --activations bf16 runs the model in mixed precision (ModelConfig::activations, bf16 experts).
//
//   dense          SwiGLU FFN of width d_ff
//   moe            one group of E SwiGLU experts (width expert_hidden), softmax top-k router
//   mixed-fourier  LM and MT groups of E/2 experts, a top-k router per group with FFT-magnitude
//                  features, mixed by a learned group gate (Mix-MoE, combination mode b)
#include <mixmoe/mixmoe.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef MIXMOE_USE_BLAS
#include <cblas.h>
#endif

#include "bench_common.hpp"

using namespace mixmoe;

namespace {

struct Args {
  std::string model = "dense";
  index_t vocab = 8000, d_model = 256, layers = 4, heads = 4, d_ff = 1024;
  index_t experts = 8, expert_hidden = 512, top_k = 2, group_top_k = 1;
  index_t seq = 64, batch = 32;
  int steps = 10, warmup = 2;
  std::string activations = "native";
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_lm: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--model") a.model = next();
    else if (k == "--vocab") a.vocab = std::stol(next());
    else if (k == "--d-model") a.d_model = std::stol(next());
    else if (k == "--layers") a.layers = std::stol(next());
    else if (k == "--heads") a.heads = std::stol(next());
    else if (k == "--d-ff") a.d_ff = std::stol(next());
    else if (k == "--experts") a.experts = std::stol(next());
    else if (k == "--expert-hidden") a.expert_hidden = std::stol(next());
    else if (k == "--top-k") a.top_k = std::stol(next());
    else if (k == "--group-top-k") a.group_top_k = std::stol(next());
    else if (k == "--seq") a.seq = std::stol(next());
    else if (k == "--batch") a.batch = std::stol(next());
    else if (k == "--steps") a.steps = std::stoi(next());
    else if (k == "--warmup") a.warmup = std::stoi(next());
    else if (k == "--activations") a.activations = next();
    else {
      std::fprintf(stderr,
                   "usage: bench_lm [--model dense|moe|mixed-fourier] [--vocab N] [--d-model N] [--layers N] [--heads N]\n"
                   "                [--d-ff N] [--experts N] [--expert-hidden N] [--top-k N] [--group-top-k N]\n"
                   "                [--seq N] [--batch N] [--steps N] [--warmup N] [--activations native|bf16]\n");
      std::exit(k == "--help" ? 0 : 2);
    }
  }
  if (a.model != "dense" && a.model != "moe" && a.model != "mixed-fourier") {
    std::fprintf(stderr, "bench_lm: unknown --model '%s' (dense, moe, mixed-fourier)\n", a.model.c_str());
    std::exit(2);
  }
  if (a.activations != "native" && a.activations != "bf16") {
    std::fprintf(stderr, "bench_lm: unknown --activations '%s' (native, bf16)\n", a.activations.c_str());
    std::exit(2);
  }
  return a;
}

using Attn = CausalSelfAttention<float>;
using Expert = SwiGLU<float>;
using DenseLM = DecoderLM<Attn, SwiGLU<float>>;
using PlainMoELM = DecoderLM<Attn, MixedMoE<TopK<>, ExpertGroup<Expert, tag::generic>>>;
using MixedLM = DecoderLM<Attn, MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>,
                                         ExpertGroup<Expert, tag::lm>, ExpertGroup<Expert, tag::mt>>>;

template <class Model>
int run(const Args& a, ModelConfig cfg) {
  Model model(cfg);
  AdamW<float> opt(parameters(model), {.lr = 3e-4});
  Generator gen(0);
  std::vector<double> times;
  float loss_value = 0;
  double graph_bytes = 0;
  const double load = bench::load_average();
  for (int step = 0; step < a.warmup + a.steps; ++step) {
    auto ids = Tensor<Index>::empty({a.batch, a.seq + 1});
    for (index_t i = 0; i < ids.numel(); ++i) ids.data()[i] = static_cast<Index>(gen.below(static_cast<std::uint64_t>(a.vocab)));
    const Tensor<Index> in = ids.slice(1, 0, a.seq).contiguous(), target = ids.slice(1, 1, a.seq + 1).contiguous();
    const double t0 = bench::now_s();
    const std::size_t before = CachingHostAllocator::instance().stats().bytes_in_use;
    auto loss = cross_entropy(model(in), target);
    graph_bytes = static_cast<double>(CachingHostAllocator::instance().stats().bytes_in_use) - static_cast<double>(before);
    loss.backward();
    opt.step();
    opt.zero_grad();
    loss_value = loss.item();
    if (step >= a.warmup) times.push_back(bench::now_s() - t0);
  }
  const double med = bench::median(times);
  std::printf(
      "{\"impl\": \"mixmoe\", \"model\": \"%s\", \"activations\": \"%s\", \"threads\": %d, \"gemm\": \"%s\", "
      "\"tokens_per_s\": %.1f, \"step_ms_median\": %.2f, \"step_ms_min\": %.2f, \"peak_rss_mib\": %.1f, "
      "\"graph_mib\": %.1f, \"params\": %ld, \"final_loss\": %.4f, \"load_at_start\": %.2f}\n",
      a.model.c_str(), a.activations.c_str(), cpu::ThreadPool::instance().num_threads(), cpu::gemm_backend(),
      static_cast<double>(a.batch * a.seq) / med, med * 1e3, *std::min_element(times.begin(), times.end()) * 1e3,
      bench::peak_rss_mib(), graph_bytes / (1024.0 * 1024.0), static_cast<long>(count_parameters(model)),
      static_cast<double>(loss_value), load);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  ModelConfig cfg;
  cfg.vocab = a.vocab;
  cfg.d_model = a.d_model;
  cfg.layers = a.layers;
  cfg.heads = a.heads;
  cfg.d_ff = a.d_ff;
  cfg.moe.expert_hidden = a.expert_hidden;
  if (a.activations == "bf16") {
    cfg.activations = ActivationPrecision::bf16;
    cfg.moe.expert_precision = MatmulPrecision::bf16;  // grouped bf16 experts (a dense model ignores it)
  }
  try {
    if (a.model == "dense") return run<DenseLM>(a, cfg);
    if (a.model == "moe") {
      cfg.moe.experts_per_group = {a.experts};
      cfg.moe.top_k = a.top_k;
      return run<PlainMoELM>(a, cfg);
    }
    cfg.moe.experts_per_group = {a.experts / 2, a.experts - a.experts / 2};
    cfg.moe.top_k = a.group_top_k;
    cfg.moe.mix = GroupMix::group_gate;
    return run<MixedLM>(a, cfg);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_lm: %s\n", e.what());
    return 1;
  }
}
