// One FFN layer alone, forward + backward on N token rows: a dense SwiGLU against
// MoE layers of the same active FLOPs (E experts of width F/K, top-K), in one run.
// The ratio dense_time / moe_time is the MoE layer's speed relative to dense (goal >= 0.9).
#include <mixmoe/mixmoe.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/ffn.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_common.hpp"

using namespace mixmoe;

namespace {

template <class Layer>
double time_layer(const Layer& layer, const Tensor<float>& x_value, int reps) {
  std::vector<double> times;
  for (int r = 0; r < reps + 2; ++r) {
    Var<float> x(x_value, true);
    const double t0 = bench::now_s();
    auto y = layer(x);
    y.backward(Tensor<float>::ones(y.shape()));
    const double dt = bench::now_s() - t0;
    if (r >= 2) times.push_back(dt);  // two warm-up calls fill the caches
  }
  return bench::median(times);
}

}  // namespace

int main(int argc, char** argv) {
  index_t n = 4096, c = 256, f = 1024, experts = 8, k = 2;
  int reps = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long v = std::stol(argv[i + 1]);
    if (a == "--tokens") n = v;
    else if (a == "--d-model") c = v;
    else if (a == "--d-ff") f = v;
    else if (a == "--experts") experts = v;
    else if (a == "--top-k") k = v;
    else if (a == "--reps") reps = static_cast<int>(v);
  }
  Generator gen(0);
  const auto x = Tensor<float>::randn({n, c}, gen);
  ModelConfig cfg;
  cfg.d_model = c;
  cfg.d_ff = f;
  cfg.moe.expert_hidden = f / k;  // same active FLOPs as the dense FFN

  const double load = bench::load_average();
  SwiGLU<float> dense(cfg, gen);
  const double t_dense = time_layer(dense, x, reps);

  cfg.moe.experts_per_group = {experts};
  cfg.moe.top_k = k;
  MixedMoE<TopK<>, ExpertGroup<SwiGLU<float>, tag::generic>> moe(cfg, gen);
  const double t_moe = time_layer(moe, x, reps);
  moe.set_execution(ExpertExecution::grouped);  // the GPU's default path, on the CPU: stacked weights, grouped GEMMs
  const double t_grouped = time_layer(moe, x, reps);

  MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>, ExpertGroup<SwiGLU<float>, tag::generic>> moe_fourier(cfg,
                                                                                                                  gen);
  const double t_fourier = time_layer(moe_fourier, x, reps);

  cfg.moe.experts_per_group = {experts / 2, experts - experts / 2};
  cfg.moe.top_k = k / 2 > 0 ? k / 2 : 1;  // per group: the same number of active experts per token
  MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>, ExpertGroup<SwiGLU<float>, tag::lm>,
           ExpertGroup<SwiGLU<float>, tag::mt>>
      mixed(cfg, gen);
  const double t_mixed = time_layer(mixed, x, reps);

  // FLOPs of the expert GEMMs, forward + backward (3 GEMMs of 2*N*C*F each way, x3 for fwd + 2 bwd)
  const double flops = 3.0 * 3.0 * 2.0 * static_cast<double>(n) * static_cast<double>(c) * static_cast<double>(f);
  std::printf("FFN layer forward+backward, N=%ld tokens, d_model=%ld, dense hidden %ld, MoE %ld experts x %ld top-%ld "
              "(threads %d, gemm %s, load %.2f)\n",
              static_cast<long>(n), static_cast<long>(c), static_cast<long>(f), static_cast<long>(experts),
              static_cast<long>(f / k), static_cast<long>(k), cpu::ThreadPool::instance().num_threads(),
              cpu::gemm_backend(), load);
  std::printf("%-34s %10s %10s %14s\n", "layer", "ms", "GFLOP/s", "dense/layer");
  auto row = [&](const char* name, double t) {
    std::printf("%-34s %10.2f %10.1f %14.3f\n", name, t * 1e3, flops / t / 1e9, t_dense / t);
  };
  row("dense SwiGLU", t_dense);
  row("MoE top-k", t_moe);
  row("MoE top-k, grouped experts", t_grouped);
  row("MoE top-k + Fourier router", t_fourier);
  row("mixed MoE (2 groups) + Fourier", t_mixed);
  std::printf("{\"dense_ms\": %.3f, \"moe_ms\": %.3f, \"moe_grouped_ms\": %.3f, \"moe_fourier_ms\": %.3f, "
              "\"mixed_fourier_ms\": %.3f, \"load\": %.2f}\n",
              t_dense * 1e3, t_moe * 1e3, t_grouped * 1e3, t_fourier * 1e3, t_mixed * 1e3, load);
  return 0;
}
