// GPU benchmarks of the CUDA backend, in one run (about 1-2 minutes on an H100):
//
//   (a) GEMM throughput (TFLOP/s) of the library's matmul (cuda::matmul on tensors, and matmul on
//       Var<float, Cuda>) against raw cuBLAS at the same sizes: cublasSgemm in FP32 (TF32 off) and
//       with TF32 tensor cores, and bf16 operands with fp32 accumulation (cuda::matmul_bf16 against
//       cublasGemmEx). Square 1024..8192 and transformer shapes.
//   (b) one FFN layer, forward + backward on N token rows: the library's MoE layers (MixedMoE with
//       top-k routing; the Mix-MoE layer with LM and MT groups and Fourier router features), each
//       with its experts grouped (the grouped GEMM kernels, no host synchronisation; the top-k MoE also
//       with bf16 expert GEMMs, on the tensor-core kernels and, once, on the SIMT kernels) and per expert
//       (cuBLAS per expert after one read-back of the offsets), and its dense SwiGLU, against a chain
//       of 9 raw GEMMs with the same active FLOPs (the dense SwiGLU's 3 forward and 6 backward
//       GEMMs); with the host synchronisations of one step of each layer.
//   (c) a training step (forward, cross-entropy, backward, clipping, AdamW) of a decoder LM on the
//       GPU, dense and Mix-MoE: tokens/s and model-FLOPs utilisation, MFU = (6 * P * tokens +
//       attention FLOPs) / step time / peak, where P counts the parameters a token uses (a dense
//       model's all, tied embedding counted once as the output head; an MoE model's active experts
//       only) and the attention FLOPs are PaLM's 12 * layers * d_model * seq per token (forward and
//       backward, the causal mask not discounted). MFU is given against the datasheet peak and
//       against the best raw cuBLAS rate of (a) in the same precision. A third row per model runs it
//       in mixed precision (ModelConfig::activations bf16, bf16 experts): against the bf16 peaks.
//
// Peaks (dense, TFLOP/s) default to the H100 / H200 SXM datasheet values: --peak-bf16 989,
// --peak-tf32 494, --peak-fp32 67; pass the values of another GPU (a warning says when the GPU is
// neither; the JSON records where the peaks came from). Parts (b) and (c) run twice: with the
// library's default FP32 GEMMs, and with TF32 allowed (cuda::set_allow_tf32: cuBLAS and the MoE
// grouped GEMMs on the tensor cores; the other kernels, attention among them, are unchanged).
//
// Timing: warm-up calls, then cudaEvent pairs around each repetition on the library's stream (for
// small GEMMs, several calls per pair), the median of the repetitions. A table goes to stdout and
// everything to a JSON file (--json PATH). Without a CUDA device it prints that and exits with 77.
//
//   bench_gpu [--json out.json] [--reps 10] [--quick] [--parts gemm,moe,lm]
//             [--peak-bf16 989] [--peak-tf32 494] [--peak-fp32 67]
#include <mixmoe/backend/cuda/cuda.cuh>
#include <mixmoe/mixmoe.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_common.hpp"

using namespace mixmoe;
// The backend's namespace by a name of its own: <cub/...> (included by the MoE kernels) declares a
// global namespace `cuda` (libcu++), which makes a plain `cuda::` ambiguous after `using namespace mixmoe`.
namespace mcuda = mixmoe::cuda;
using json = nlohmann::ordered_json;

namespace {

struct Args {
  std::string json_path;
  int reps = 10;
  bool quick = false;
  std::string parts = "gemm,moe,lm";
  double peak_bf16 = 989.0, peak_tf32 = 494.0, peak_fp32 = 67.0;
  bool peaks_given = false;  // a --peak-* argument was passed
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_gpu: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    // a number > 0, or exit 2 naming the argument
    auto number = [&]() -> double {
      const std::string v = value();
      double x = 0;
      std::size_t used = 0;
      try {
        x = std::stod(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || !(x > 0) || !std::isfinite(x)) {
        std::fprintf(stderr, "bench_gpu: %s needs a number > 0, got '%s'\n", k.c_str(), v.c_str());
        std::exit(2);
      }
      return x;
    };
    if (k == "--json") a.json_path = value();
    else if (k == "--reps") a.reps = static_cast<int>(std::clamp(number(), 1.0, 1000.0));
    else if (k == "--quick") a.quick = true;
    else if (k == "--parts") a.parts = value();
    else if (k == "--peak-bf16") a.peak_bf16 = number(), a.peaks_given = true;
    else if (k == "--peak-tf32") a.peak_tf32 = number(), a.peaks_given = true;
    else if (k == "--peak-fp32") a.peak_fp32 = number(), a.peaks_given = true;
    else if (k == "--help" || k == "-h") {
      std::printf("usage: bench_gpu [--json PATH] [--reps N] [--quick] [--parts gemm,moe,lm] [--peak-bf16 TF] "
                  "[--peak-tf32 TF] [--peak-fp32 TF]\n");
      std::exit(0);
    } else {
      std::fprintf(stderr, "bench_gpu: unknown argument %s (--help)\n", k.c_str());
      std::exit(2);
    }
  }
  return a;
}

int g_row_failures = 0;  // rows of (b) and (c) that threw (the other rows still run)

/// Whether `part` is one of the comma-separated names of --parts.
bool wants(const Args& a, const char* part) {
  const std::string& p = a.parts;
  for (std::size_t start = 0; start <= p.size();) {
    const std::size_t end = std::min(p.find(',', start), p.size());
    if (p.compare(start, end - start, part) == 0) return true;
    start = end + 1;
  }
  return false;
}

/// Median milliseconds per call of f: `warmup` calls, then `reps` timed groups of `inner` calls
/// each (inner chosen so a group lasts about a millisecond, at most 50 calls).
double time_ms(const std::function<void()>& f, int reps, int warmup = 2, bool adaptive = true) {
  cudaStream_t s = mcuda::current_stream();
  for (int i = 0; i < warmup; ++i) f();
  mcuda::synchronize();
  cudaEvent_t a, b;
  MIXMOE_CUDA_CHECK(cudaEventCreate(&a));
  MIXMOE_CUDA_CHECK(cudaEventCreate(&b));
  auto group = [&](int inner) {
    MIXMOE_CUDA_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < inner; ++i) f();
    MIXMOE_CUDA_CHECK(cudaEventRecord(b, s));
    MIXMOE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MIXMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return static_cast<double>(ms) / inner;
  };
  int inner = 1;
  if (adaptive) {
    const double once = group(1);
    inner = once > 0 ? static_cast<int>(std::clamp(std::ceil(1.0 / once), 1.0, 50.0)) : 50;
  }
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) t.push_back(group(inner));
  MIXMOE_CUDA_CHECK(cudaEventDestroy(a));
  MIXMOE_CUDA_CHECK(cudaEventDestroy(b));
  return bench::median(t);
}


/// A cuBLAS handle of the benchmark's own (the raw baseline), on the library's stream.
struct RawCublas {
  cublasHandle_t h = nullptr;
  RawCublas() {
    MIXMOE_CUBLAS_CHECK(cublasCreate(&h));
    MIXMOE_CUBLAS_CHECK(cublasSetStream(h, mcuda::current_stream()));
  }
  ~RawCublas() { (void)cublasDestroy(h); }
  RawCublas(const RawCublas&) = delete;
  RawCublas& operator=(const RawCublas&) = delete;
  void math(bool tf32) const {
    MIXMOE_CUBLAS_CHECK(cublasSetMathMode(h, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  }
  /// Row-major C (m x n) = A (m x k) B (k x n): column-major C^T = B^T A^T.
  void sgemm(index_t m, index_t n, index_t k, const float* A, const float* B, float* C) const {
    const float one = 1, zero = 0;
    MIXMOE_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                             &one, B, static_cast<int>(n), A, static_cast<int>(k), &zero, C, static_cast<int>(n)));
  }
  void bf16gemm(index_t m, index_t n, index_t k, const __nv_bfloat16* A, const __nv_bfloat16* B, float* C) const {
    const float one = 1, zero = 0;
    MIXMOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                              static_cast<int>(k), &one, B, CUDA_R_16BF, static_cast<int>(n), A, CUDA_R_16BF,
                              static_cast<int>(k), &zero, C, CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
  }
};

double tflops(double flops, double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0; }

json device_json() {
  int dev = 0, rt = 0, drv = 0;
  MIXMOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MIXMOE_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  MIXMOE_CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  MIXMOE_CUDA_CHECK(cudaDriverGetVersion(&drv));
  return {{"name", p.name},
          {"compute_capability", std::to_string(p.major) + "." + std::to_string(p.minor)},
          {"memory_gib", static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0)},
          {"sms", p.multiProcessorCount},
          {"cuda_runtime", rt},
          {"cuda_driver", drv}};
}

// ---- (a) GEMM ----------------------------------------------------------------------------------

struct GemmBest {
  double fp32 = 0, tf32 = 0, bf16 = 0;  // best raw cuBLAS TFLOP/s seen
};

json bench_gemm(const Args& a, GemmBest& best) {
  struct Size {
    index_t m, k, n;
    const char* what;
  };
  std::vector<Size> sizes = {{1024, 1024, 1024, "square"},       {2048, 2048, 2048, "square"},
                             {4096, 4096, 4096, "square"},       {8192, 8192, 8192, "square"},
                             {4096, 1024, 4096, "(4096x1024)x(1024x4096): FFN up, d 1024"},
                             {4096, 4096, 1024, "(4096x4096)x(4096x1024): FFN down"},
                             {16384, 1024, 3072, "(16384x1024)x(1024x3072): fused QKV, 16k tokens"}};
  if (a.quick) sizes = {{1024, 1024, 1024, "square"}, {4096, 1024, 4096, "(4096x1024)x(1024x4096)"}};
  RawCublas raw;
  Generator gen(1);
  json rows = json::array();
  std::printf("\n(a) GEMM, TFLOP/s (median of %d); library = cuda::matmul / Var matmul, raw = cuBLAS\n", a.reps);
  std::printf("%-7s %-7s %-7s | %9s %9s %9s | %9s %9s %9s | %9s %9s\n", "M", "K", "N", "lib fp32", "Var fp32", "raw fp32",
              "lib tf32", "Var tf32", "raw tf32", "lib bf16", "raw bf16");
  for (const Size& s : sizes) {
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k);
    const auto A = mcuda::randn<float>({s.m, s.k}, 11), B = mcuda::randn<float>({s.k, s.n}, 12);
    auto C = Tensor<float, Cuda>::empty({s.m, s.n});
    const Var<float, Cuda> va(A), vb(B);
    json row = {{"m", s.m}, {"k", s.k}, {"n", s.n}, {"shape", s.what}};
    double r[8] = {};
    for (int tf = 0; tf < 2; ++tf) {
      mcuda::set_allow_tf32(tf == 1);
      raw.math(tf == 1);
      const double lib = time_ms([&] { (void)mcuda::matmul(A, B); }, a.reps);
      const double var = time_ms([&] { (void)matmul(va, vb); }, a.reps);
      const double rw = time_ms([&] { raw.sgemm(s.m, s.n, s.k, A.data(), B.data(), C.data()); }, a.reps);
      const char* p = tf ? "tf32" : "fp32";
      row[std::string("lib_") + p + "_tflops"] = r[3 * tf] = tflops(flops, lib);
      row[std::string("var_") + p + "_tflops"] = r[3 * tf + 1] = tflops(flops, var);
      row[std::string("raw_") + p + "_tflops"] = r[3 * tf + 2] = tflops(flops, rw);
    }
    mcuda::set_allow_tf32(false);
    raw.math(false);
    best.fp32 = std::max(best.fp32, r[2]);
    best.tf32 = std::max(best.tf32, r[5]);
    {
      const mcuda::Bf16Buffer a16(A), b16(B);
      const double lib = time_ms([&] { (void)mcuda::matmul_bf16(a16, b16); }, a.reps);
      const double rw = time_ms([&] { raw.bf16gemm(s.m, s.n, s.k, a16.data(), b16.data(), C.data()); }, a.reps);
      row["lib_bf16_tflops"] = r[6] = tflops(flops, lib);
      row["raw_bf16_tflops"] = r[7] = tflops(flops, rw);
      best.bf16 = std::max(best.bf16, r[7]);
    }
    row["raw_tf32_fraction_of_peak"] = r[5] / a.peak_tf32;
    row["raw_bf16_fraction_of_peak"] = r[7] / a.peak_bf16;
    std::printf("%-7ld %-7ld %-7ld | %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %9.1f %9.1f\n", static_cast<long>(s.m),
                static_cast<long>(s.k), static_cast<long>(s.n), r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    std::fflush(stdout);
    rows.push_back(row);
  }
  std::printf("best raw cuBLAS: fp32 %.1f (%.0f%% of %.0f), tf32 %.1f (%.0f%% of %.0f), bf16 %.1f (%.0f%% of %.0f)\n",
              best.fp32, 100 * best.fp32 / a.peak_fp32, a.peak_fp32, best.tf32, 100 * best.tf32 / a.peak_tf32,
              a.peak_tf32, best.bf16, 100 * best.bf16 / a.peak_bf16, a.peak_bf16);
  return {{"rows", rows}, {"best_raw_fp32_tflops", best.fp32}, {"best_raw_tf32_tflops", best.tf32},
          {"best_raw_bf16_tflops", best.bf16}};
}

// ---- (b) one MoE FFN layer ---------------------------------------------------------------------

template <class Layer>
double time_layer_ms(Layer& layer, const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& gy, int reps) {
  return time_ms(
      [&] {
        Var<float, Cuda> xv(x, true);
        auto y = layer(xv);
        y.backward(gy);
        release_routing_graphs(layer);
      },
      reps, 2, false);
}

/// Host synchronisations of one forward+backward step (after the timing's warm-up).
template <class Layer>
long long step_syncs(Layer& layer, const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& gy) {
  const std::uint64_t before = mcuda::synchronization_count();
  Var<float, Cuda> xv(x, true);
  auto y = layer(xv);
  y.backward(gy);
  release_routing_graphs(layer);
  return static_cast<long long>(mcuda::synchronization_count() - before);
}

/// Puts a layer's execution (and, with restore_precision, its expert precision) back to the defaults
/// when a row ends, also when it throws: the next row must not inherit a failed row's settings.
template <class Layer>
struct LayerDefaults {
  Layer& layer;
  bool restore_precision = false;
  ~LayerDefaults() {
    try {
      layer.set_execution(ExpertExecution::automatic);
      if (restore_precision) layer.set_expert_precision(MatmulPrecision::native);
    } catch (...) {
    }
  }
};

/// The grouped GEMMs on the SIMT kernels while in scope (the previous choice back after).
struct SimtGroupedGemm {
  bool before = mcuda::grouped_gemm_tensor_cores();
  SimtGroupedGemm() { mcuda::set_grouped_gemm_tensor_cores(false); }
  ~SimtGroupedGemm() {
    try {
      mcuda::set_grouped_gemm_tensor_cores(before);
    } catch (...) {
    }
  }
};

/// A layer timed with its experts run the given way (grouped GEMM kernel or per-expert cuBLAS).
template <class Layer>
double time_layer_as(Layer& layer, ExpertExecution ex, const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& gy,
                     int reps, json& syncs, const char* key) {
  const LayerDefaults<Layer> restore{layer};
  layer.set_execution(ex);
  const double ms = time_layer_ms(layer, x, gy, reps);
  syncs[key] = step_syncs(layer, x, gy);
  return ms;
}

json bench_moe(const Args& a) {
  const index_t n = a.quick ? 2048 : 8192, c = a.quick ? 512 : 1024, f = a.quick ? 2048 : 4096, experts = 8, k = 2;
  ModelConfig cfg;
  cfg.d_model = c;
  cfg.d_ff = f;
  cfg.moe.expert_hidden = f / k;  // the same active FLOPs as the dense FFN
  Generator gen(3);
  const auto x = mcuda::randn<float>({n, c}, 21), gy = mcuda::randn<float>({n, c}, 22);
  // forward 3 GEMMs + backward 6, each 2 N C F
  const double flops = 9.0 * 2.0 * static_cast<double>(n) * static_cast<double>(c) * static_cast<double>(f);

  SwiGLU<float, Cuda> dense(cfg, gen);
  cfg.moe.experts_per_group = {experts};
  cfg.moe.top_k = k;
  MixedMoE<TopK<>, ExpertGroup<SwiGLU<float, Cuda>, tag::generic>> moe(cfg, gen);
  cfg.moe.experts_per_group = {experts / 2, experts - experts / 2};
  cfg.moe.mix = GroupMix::shared_router;  // top-k over all experts: the same active experts per token
  MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>, ExpertGroup<SwiGLU<float, Cuda>, tag::lm>,
           ExpertGroup<SwiGLU<float, Cuda>, tag::mt>>
      mixed(cfg, gen);

  // The raw chain: forward H1 = X W1^T, H2 = X W2^T, Y = H W3^T; backward dH = dY W3, dW3 = dY^T H,
  // dX = dH1 W1 + dH2 W2, dW1 = dH1^T X, dW2 = dH2^T X.
  auto w1 = mcuda::randn<float>({f, c}, 31), w2 = mcuda::randn<float>({f, c}, 32), w3 = mcuda::randn<float>({c, f}, 33);
  auto h1 = Tensor<float, Cuda>::empty({n, f}), h2 = Tensor<float, Cuda>::empty({n, f}), y = Tensor<float, Cuda>::empty({n, c});
  auto dh = Tensor<float, Cuda>::empty({n, f}), dx = Tensor<float, Cuda>::empty({n, c});
  auto dw1 = Tensor<float, Cuda>::empty({f, c}), dw3 = Tensor<float, Cuda>::empty({c, f});
  auto chain = [&] {
    mcuda::gemm<float>(false, true, n, f, c, 1.f, x.data(), c, w1.data(), c, 0.f, h1.data(), f);
    mcuda::gemm<float>(false, true, n, f, c, 1.f, x.data(), c, w2.data(), c, 0.f, h2.data(), f);
    mcuda::gemm<float>(false, true, n, c, f, 1.f, h1.data(), f, w3.data(), f, 0.f, y.data(), c);
    mcuda::gemm<float>(false, false, n, f, c, 1.f, gy.data(), c, w3.data(), f, 0.f, dh.data(), f);
    mcuda::gemm<float>(true, false, c, f, n, 1.f, gy.data(), c, h1.data(), f, 0.f, dw3.data(), f);
    mcuda::gemm<float>(false, false, n, c, f, 1.f, dh.data(), f, w1.data(), c, 0.f, dx.data(), c);
    mcuda::gemm<float>(false, false, n, c, f, 1.f, h2.data(), f, w2.data(), c, 1.f, dx.data(), c);
    mcuda::gemm<float>(true, false, f, c, n, 1.f, dh.data(), f, x.data(), c, 0.f, dw1.data(), c);
    mcuda::gemm<float>(true, false, f, c, n, 1.f, h2.data(), f, x.data(), c, 0.f, dw1.data(), c);
  };

  json out = {{"tokens", n}, {"d_model", c}, {"d_ff", f}, {"experts", experts}, {"top_k", k},
              {"expert_hidden", f / k}, {"active_gflop", flops / 1e9}, {"modes", json::array()}};
  std::printf("\n(b) FFN layer forward+backward, N=%ld tokens, d_model %ld, dense hidden %ld, MoE %ld experts x %ld, "
              "top-%ld (%.1f GFLOP active)\n",
              static_cast<long>(n), static_cast<long>(c), static_cast<long>(f), static_cast<long>(experts),
              static_cast<long>(f / k), static_cast<long>(k), flops / 1e9);
  std::printf("%-6s %-40s %10s %10s %14s\n", "gemm", "layer", "ms", "TFLOP/s", "chain/layer");
  for (int tf = 0; tf < 2; ++tf) {
    mcuda::set_allow_tf32(tf == 1);
    const char* mode = tf ? "tf32" : "fp32";
    json m = {{"gemm", mode}};
    const double t_chain = time_ms(chain, a.reps, 2, false);
    auto row = [&](const char* name, const char* key, double ms) {
      std::printf("%-6s %-40s %10.2f %10.1f %14.3f\n", mode, name, ms, tflops(flops, ms), t_chain / ms);
      std::fflush(stdout);
      m[key] = {{"ms", ms}, {"tflops", tflops(flops, ms)}, {"chain_over_layer", t_chain / ms}};
    };
    row("raw GEMM chain (9 GEMMs, same FLOPs)", "gemm_chain", t_chain);
    auto attempt = [&](const char* name, const char* key, const std::function<double()>& run) {
      try {
        row(name, key, run());
      } catch (const std::exception& e) {
        std::printf("%-6s %-40s FAILED: %s\n", mode, name, e.what());
        ++g_row_failures;
        m[key] = {{"error", e.what()}};
      }
    };
    attempt("dense SwiGLU (library)", "dense_swiglu", [&] { return time_layer_ms(dense, x, gy, a.reps); });
    // grouped: the grouped GEMM kernels, no host synchronisation; per_expert: one cuBLAS GEMM per
    // expert and weight, after one read-back of the expert offsets per layer call
    json syncs;
    attempt("MoE top-k, grouped (MixedMoE, one group)", "moe_topk",
            [&] { return time_layer_as(moe, ExpertExecution::grouped, x, gy, a.reps, syncs, "moe_topk"); });
    attempt("MoE top-k, per-expert cuBLAS", "moe_topk_per_expert", [&] {
      return time_layer_as(moe, ExpertExecution::per_expert, x, gy, a.reps, syncs, "moe_topk_per_expert");
    });
    m["float_grouped_gemm"] = tf == 1 && mcuda::grouped_gemm_tensor_cores() ? "tensor cores (TF32)" : "SIMT";
    attempt(mcuda::grouped_gemm_tensor_cores() ? "MoE top-k, grouped, bf16 experts (TC)" : "MoE top-k, grouped, bf16 experts",
            "moe_topk_bf16", [&] {
              const LayerDefaults<decltype(moe)> restore{moe, true};
              moe.set_expert_precision(MatmulPrecision::bf16);
              return time_layer_as(moe, ExpertExecution::grouped, x, gy, a.reps, syncs, "moe_topk_bf16");
            });
    if (tf == 0 && mcuda::grouped_gemm_tensor_cores())  // the same row on the SIMT kernels, once
      attempt("MoE top-k, grouped, bf16 experts (SIMT)", "moe_topk_bf16_simt", [&] {
        const SimtGroupedGemm simt;
        const LayerDefaults<decltype(moe)> restore{moe, true};
        moe.set_expert_precision(MatmulPrecision::bf16);
        return time_layer_as(moe, ExpertExecution::grouped, x, gy, a.reps, syncs, "moe_topk_bf16_simt");
      });
    attempt("Mix-MoE LM+MT, shared Fourier top-2", "mix_moe_fourier", [&] {
      return time_layer_as(mixed, ExpertExecution::grouped, x, gy, a.reps, syncs, "mix_moe_fourier");
    });
    attempt("Mix-MoE LM+MT, Fourier, per-expert", "mix_moe_fourier_per_expert", [&] {
      return time_layer_as(mixed, ExpertExecution::per_expert, x, gy, a.reps, syncs, "mix_moe_fourier_per_expert");
    });
    std::printf("%-6s host synchronisations per step:", mode);
    for (const auto& [key, v] : syncs.items()) std::printf(" %s %lld", key.c_str(), v.get<long long>());
    std::printf("\n");
    m["syncs_per_step"] = syncs;
    out["modes"].push_back(m);
  }
  mcuda::set_allow_tf32(false);
  return out;
}

// ---- (c) a training step of a decoder LM -------------------------------------------------------

using AttnC = CausalSelfAttention<float, Cuda>;
using DenseLMC = DecoderLM<AttnC, SwiGLU<float, Cuda>>;
using MixLMC = DecoderLM<AttnC, MixedMoE<FourierFeatures<TopK<>, transform::FFTMagnitude<>>,
                                         ExpertGroup<SwiGLU<float, Cuda>, tag::lm>, ExpertGroup<SwiGLU<float, Cuda>, tag::mt>>>;

struct LmShape {
  index_t batch, seq;
};

/// Times the training step of a model of type Model: built from cfg, with FP32 GEMMs, then with TF32
/// (the same model), then built again in mixed precision (activations bf16, and bf16 experts for an
/// MoE model; see docs/mixed-precision.md); one row each.
template <class Model>
void bench_lm_model(const Args& a, const char* name, const ModelConfig& cfg, const LmShape& sh, double unused_params,
                    const GemmBest& best, json& rows) {
  Generator gen(5);
  std::vector<Index> ids(static_cast<std::size_t>(sh.batch * (sh.seq + 1)));
  for (auto& v : ids) v = static_cast<Index>(gen.below(static_cast<std::uint64_t>(cfg.vocab)));
  const auto all = Tensor<Index, Cuda>::from(ids, {sh.batch, sh.seq + 1});
  const Tensor<Index, Cuda> in = all.slice(1, 0, sh.seq).contiguous(), target = all.slice(1, 1, sh.seq + 1).contiguous();
  const double tokens = static_cast<double>(sh.batch * sh.seq);
  const double attn = 12.0 * static_cast<double>(cfg.layers) * static_cast<double>(cfg.d_model) *
                      static_cast<double>(sh.seq) * tokens;

  // one row: the step of `model` timed in `mode` (fp32, tf32 or bf16)
  const auto run = [&](Model& model, const char* mode) {
    const double total_params = static_cast<double>(count_parameters(model));
    const double active_params = total_params - unused_params;
    const double model_flops = 6.0 * active_params * tokens + attn;
    const auto params = parameters(model);
    AdamW<float, Cuda> opt(params, {.lr = 3e-4});
    const bool moe = count_moe_layers(model) > 0;
    float last_loss = 0;
    auto step = [&] {
      auto loss = cross_entropy(model(in), target);
      if (moe) loss = loss + load_balance_loss(model) * 0.01 + router_z_loss(model) * 0.001;
      loss.backward();
      (void)clip_grad_norm_async(params, 1.0);  // the norm stays on the device
      opt.step();
      opt.zero_grad();
      release_routing_graphs(model);
      last_loss = loss.item();  // the step's one wait, as in train_loop
    };
    const std::string m = mode;
    const int reps = a.quick ? 3 : 5;  // a step is long: fewer repetitions than --reps
    const double ms = time_ms(step, reps, 2, false);
    const std::uint64_t syncs_before = mcuda::synchronization_count();
    step();
    const auto step_syncs = static_cast<long long>(mcuda::synchronization_count() - syncs_before);
    const double achieved = tflops(model_flops, ms);
    const double peak = m == "tf32" ? a.peak_tf32 : m == "bf16" ? a.peak_bf16 : a.peak_fp32;
    const double best_raw = m == "tf32" ? best.tf32 : m == "bf16" ? best.bf16 : best.fp32;
    const std::string vs_raw =
        best_raw > 0 ? std::to_string(static_cast<int>(std::lround(100 * achieved / best_raw))) + "%" : "n/a";
    std::printf("%-6s %-10s %9.1fM %9.1fM %10.1f %12.0f %9.1f %9.1f%% %11s\n", mode, name, total_params / 1e6,
                active_params / 1e6, ms, tokens / (ms * 1e-3), achieved, 100 * achieved / peak, vs_raw.c_str());
    std::fflush(stdout);
    rows.push_back({{"model", name},
                    {"gemm", mode},
                    {"params", total_params},
                    {"active_params", active_params},
                    {"batch", sh.batch},
                    {"seq", sh.seq},
                    {"step_ms", ms},
                    {"tokens_per_s", tokens / (ms * 1e-3)},
                    {"model_tflop_per_step", model_flops / 1e12},
                    {"achieved_tflops", achieved},
                    {"peak_tflops", peak},
                    {"mfu_vs_peak", achieved / peak},
                    {"mfu_vs_bf16_peak", achieved / a.peak_bf16},
                    {"mfu_vs_best_raw_cublas", best_raw > 0 ? json(achieved / best_raw) : json(nullptr)},
                    {"syncs_per_step", step_syncs},
                    {"reps", reps},
                    {"warmup", 2},
                    {"final_loss", last_loss}});
  };
  const auto guarded = [&](const char* mode, auto&& body) {
    try {
      body();
    } catch (const std::exception& e) {
      std::printf("%-6s %-10s FAILED: %s\n", mode, name, e.what());
      ++g_row_failures;
      rows.push_back({{"model", name}, {"gemm", mode}, {"error", e.what()}});
    }
    mcuda::set_allow_tf32(false);
  };
  {
    Model model(cfg);
    guarded("fp32", [&] { run(model, "fp32"); });
    guarded("tf32", [&] {
      mcuda::set_allow_tf32(true);
      run(model, "tf32");
    });
  }
  guarded("bf16", [&] {
    ModelConfig mixed = cfg;
    mixed.activations = ActivationPrecision::bf16;
    mixed.moe.expert_precision = MatmulPrecision::bf16;  // a dense model ignores it
    Model model(mixed);
    run(model, "bf16");
  });
}

json bench_lm(const Args& a, const GemmBest& best) {
  ModelConfig cfg;
  cfg.vocab = a.quick ? 8000 : 32000;
  cfg.d_model = a.quick ? 512 : 1024;
  cfg.layers = a.quick ? 2 : 8;
  cfg.heads = a.quick ? 8 : 16;
  cfg.d_ff = a.quick ? 2048 : 4096;
  const LmShape sh{a.quick ? 4 : 8, a.quick ? 256 : 512};
  const double c = static_cast<double>(cfg.d_model);
  std::printf("\n(c) training step (forward, loss, backward, clip, AdamW), batch %ld x %ld tokens, d_model %ld, %ld "
              "layers, vocab %ld; MFU = (6 P tokens + 12 L d T tokens) / time / peak\n",
              static_cast<long>(sh.batch), static_cast<long>(sh.seq), static_cast<long>(cfg.d_model),
              static_cast<long>(cfg.layers), static_cast<long>(cfg.vocab));
  std::printf("MFU peak: against the datasheet peak of the row's GEMMs (fp32 %.0f, tf32 %.0f, bf16 %.0f: mixed "
              "precision); MFU cuBLAS: against the best raw cuBLAS rate of (a) in that precision\n",
              a.peak_fp32, a.peak_tf32, a.peak_bf16);
  std::printf("%-6s %-10s %10s %10s %10s %12s %9s %10s %11s\n", "gemm", "model", "params", "active", "step ms",
              "tokens/s", "TFLOP/s", "MFU peak", "MFU cuBLAS");
  json rows = json::array();
  try {
    // Dense: every parameter is used by every token (the tied embedding once, as the output head).
    bench_lm_model<DenseLMC>(a, "dense", cfg, sh, 0.0, best, rows);
  } catch (const std::exception& e) {
    std::printf("dense LM FAILED: %s\n", e.what());
    ++g_row_failures;
    rows.push_back({{"model", "dense"}, {"error", e.what()}});
  }
  try {
    // Mix-MoE: 4 + 4 experts of hidden d_ff / 2 and a shared top-2 router: a token uses 2 experts,
    // the FLOPs of the dense FFN; the 6 experts it does not use are not counted.
    ModelConfig m = cfg;
    m.moe.experts_per_group = {4, 4};
    m.moe.expert_hidden = cfg.d_ff / 2;
    m.moe.top_k = 2;
    m.moe.mix = GroupMix::shared_router;
    const double unused = static_cast<double>(cfg.layers) * 6 * 3 * c * static_cast<double>(m.moe.expert_hidden);
    bench_lm_model<MixLMC>(a, "mix-moe", m, sh, unused, best, rows);
  } catch (const std::exception& e) {
    std::printf("mix-moe LM FAILED: %s\n", e.what());
    ++g_row_failures;
    rows.push_back({{"model", "mix-moe"}, {"error", e.what()}});
  }
  return {{"vocab", cfg.vocab}, {"d_model", cfg.d_model}, {"layers", cfg.layers}, {"heads", cfg.heads},
          {"d_ff", cfg.d_ff}, {"batch", sh.batch}, {"seq", sh.seq}, {"rows", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  if (mcuda::device_count() == 0) {
    std::printf("bench_gpu: no CUDA device found (or no driver); nothing was measured\n");
    return 77;
  }
  if (!wants(a, "gemm") && !wants(a, "moe") && !wants(a, "lm")) {
    std::fprintf(stderr, "bench_gpu: --parts %s names no part (gemm, moe, lm)\n", a.parts.c_str());
    return 2;
  }
  const double t0 = bench::now_s();
  std::printf("bench_gpu on %s; peaks (dense TFLOP/s): bf16 %.0f, tf32 %.0f, fp32 %.0f%s\n",
              mcuda::device_description().c_str(), a.peak_bf16, a.peak_tf32, a.peak_fp32, a.quick ? "; --quick" : "");
  json device = device_json();
  device["bf16_grouped_gemm"] = mcuda::grouped_gemm_tensor_cores() ? "tensor cores" : "SIMT";
  // The default peaks are the H100 SXM's and the H200's (989 / 494 / 67); other GPUs need theirs.
  const std::string gpu = device["name"].get<std::string>();
  const bool sxm_peaks = gpu.find("H100 80GB HBM3") != std::string::npos ||
                         (gpu.find("H200") != std::string::npos && gpu.find("NVL") == std::string::npos);
  std::string peaks_note = a.peaks_given ? "given on the command line" : "the H100 SXM / H200 datasheet values";
  if (!a.peaks_given && !sxm_peaks) {
    peaks_note += ", which may not be this GPU's: pass --peak-bf16, --peak-tf32 and --peak-fp32";
    std::printf("bench_gpu: WARNING: %s is not an H100 SXM or H200: the peak percentages use %s\n", gpu.c_str(),
                peaks_note.c_str());
  }
  json out = {{"device", device},
              {"peaks_tflops", {{"bf16", a.peak_bf16}, {"tf32", a.peak_tf32}, {"fp32", a.peak_fp32}}},
              {"peaks_source", peaks_note},
              {"reps", a.reps},
              {"quick", a.quick}};
  int failures = 0;
  GemmBest best;
  // The JSON file is rewritten after each part: a run cut short keeps the parts it finished.
  auto save = [&]() {
    if (a.json_path.empty()) return true;
    std::ofstream f(a.json_path);
    f << out.dump(2) << '\n';
    if (!f) std::fprintf(stderr, "bench_gpu: cannot write %s\n", a.json_path.c_str());
    return static_cast<bool>(f);
  };
  auto part = [&](const char* name, const std::function<json()>& run) {
    if (!wants(a, name)) return;
    const double s = bench::now_s();
    try {
      out[name] = run();
    } catch (const std::exception& e) {
      std::printf("%s: FAILED: %s\n", name, e.what());
      out[name] = {{"error", e.what()}};
      ++failures;
    }
    mcuda::set_allow_tf32(false);  // whatever happened in the part, the next one starts in FP32
    out[name]["seconds"] = bench::now_s() - s;
    out["seconds"] = bench::now_s() - t0;
    if (!save()) ++failures;
  };
  part("gemm", [&] { return bench_gemm(a, best); });
  part("moe", [&] { return bench_moe(a); });
  part("lm", [&] { return bench_lm(a, best); });
  std::printf("\nbench_gpu: %.0f s%s%s\n", bench::now_s() - t0, a.json_path.empty() ? "" : "; wrote ",
              a.json_path.c_str());
  return failures + g_row_failures == 0 ? 0 : 1;
}
