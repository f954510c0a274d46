// GPU parity of the MoE layers (cases_moe.hpp) against the CPU backend, then two checks that only
// mean something on the device: a dropless MoE layer with grouped experts waits for the device
// zero times in a training step (forward, auxiliary loss, backward), and a routing with an expert
// id out of range poisons the layer's output with NaN and is reported when the plan's counts are
// read; and the bf16 grouped GEMMs on the tensor cores agree with the SIMT kernels.
#include "parity_main.cuh"

#include "cases_moe.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mixmoe_parity {
void cpu_cases_moe(Results& r);
}

namespace {

using mixmoe_parity::expect;

/// Host synchronisations of one training step of a layer (after a warm-up step: cuFFT plans, the
/// caching allocator's first blocks).
template <class Layer>
std::uint64_t step_synchronisations(Layer& layer, mixmoe::index_t n, mixmoe::index_t c) {
  using namespace mixmoe;
  using namespace mixmoe_parity;
  const Var<float, Cuda> x = leaf<float, Cuda>({n, c}, 1);
  const Var<float, Cuda> g(randn<float, Cuda>({n, c}, 2));
  std::uint64_t used = 0;
  for (int step = 0; step < 2; ++step) {
    const std::uint64_t before = mixmoe::cuda::synchronization_count();
    Var<float, Cuda> out = layer(x);
    Var<float, Cuda> total = sum(out * g) + load_balance_loss(layer) * 0.01;
    total.backward();
    used = mixmoe::cuda::synchronization_count() - before;
  }
  mixmoe::cuda::synchronize();
  return used;
}

void synchronisation_free_layer() {
  using namespace mixmoe;
  ModelConfig cfg = mixmoe_parity::moe_cases::layer_config();
  for (GroupMix mix : {GroupMix::shared_router, GroupMix::group_gate}) {
    const std::string name = mix == GroupMix::shared_router ? "shared_router" : "group_gate";
    cfg.moe.mix = mix;
    Generator gen(7);
    mixmoe_parity::moe_cases::MixLayer<float, Cuda> layer(cfg, gen);
    expect(layer.grouped(), name + ": automatic execution runs the experts grouped on the device");
    const std::uint64_t grouped = step_synchronisations(layer, 37, cfg.d_model);
    expect(grouped == 0, name + ": a dropless grouped step waits for the device 0 times (got " +
                             std::to_string(grouped) + ")");
    layer.set_execution(ExpertExecution::per_expert);
    const std::uint64_t single = step_synchronisations(layer, 37, cfg.d_model);
    expect(single > 0, name + ": the per-expert step waits (got " + std::to_string(single) +
                           "): the counter sees the plan's read-back");
  }
}

void out_of_range_expert() {
  using namespace mixmoe;
  using namespace mixmoe_parity;
  Routing<float, Cuda> r;
  r.token = moe_cases::indices<Cuda>({0, 1, 2, 2});
  r.expert = moe_cases::indices<Cuda>({0, 5, 1, 2});
  r.gate = Var<float, Cuda>(Tensor<float, Cuda>::ones({4}));
  r.num_tokens = 3;
  r.num_experts = 3;
  const Var<float, Cuda> x = leaf<float, Cuda>({3, 8}, 3);
  DispatchPlan<Cuda> plan;
  const Var<float, Cuda> out = moe_forward_grouped(
      x, r, 3, 0.0, [](const Var<float, Cuda>& xs, const DispatchPlan<Cuda>&) { return xs * 2.0; }, &plan);
  bool all_nan = true;
  for (float v : out.value().to_vector()) all_nan = all_nan && std::isnan(v);
  expect(all_nan, "a dropless device plan with expert 5 of 3: every output is NaN");
  std::string message;
  try {
    (void)plan.offsets();
  } catch (const Error& e) {
    message = e.what();
  }
  expect(message.find("expert 5 of assignment 1 is out of range for 3 experts") != std::string::npos,
         "reading the plan's counts throws the CPU's message (got '" + message + "')");
  // capacity mode refuses it when the plan is made, as on the CPU
  message.clear();
  try {
    (void)make_dispatch_plan(r, 1.0);
  } catch (const Error& e) {
    message = e.what();
  }
  expect(message.find("expert 5 of assignment 1 is out of range for 3 experts") != std::string::npos,
         "capacity mode: make_dispatch_plan throws at once (got '" + message + "')");
}

/// max |u - v| and max |v| over two lists of equal length.
std::pair<double, double> max_difference(const std::vector<float>& u, const std::vector<float>& v) {
  double diff = 0, scale = 0;
  for (std::size_t j = 0; j < v.size(); ++j) {
    diff = std::max(diff, static_cast<double>(std::abs(u[j] - v[j])));
    scale = std::max(scale, static_cast<double>(std::abs(v[j])));
  }
  return {diff, scale};
}

/// grouped_linear (forward, input and weight gradients) on the tensor-core kernels and on the SIMT
/// kernels: in bf16 the same products summed in fp32 in another order; in float with TF32 allowed,
/// products of operands rounded to TF32 (and TF32 really in effect: the results move). Then a cuBLAS
/// matmul with TF32 allowed and not.
void tensor_core_grouped_gemm() {
  using namespace mixmoe;
  using namespace mixmoe_parity;
  if (!mixmoe::cuda::grouped_gemm_tensor_cores()) {
    expect(true, "no usable tensor cores on this device: the SIMT kernels run (nothing to compare)");
    return;
  }
  struct Restore {  // the defaults back, also when a check throws
    ~Restore() {
      mixmoe::cuda::set_allow_tf32(false);
      mixmoe::cuda::set_grouped_gemm_tensor_cores(true);
    }
  } restore;
  const index_t m = 517, kd = 96, n = 80, e = 6;
  const auto offsets = Tensor<index_t, Cuda>::from({0, 100, 100, 250, 400, 460, 517}, {e + 1});
  const auto run = [&](bool tensor_cores, bool tf32, MatmulPrecision precision) {
    mixmoe::cuda::set_grouped_gemm_tensor_cores(tensor_cores);
    mixmoe::cuda::set_allow_tf32(tf32);
    Var<float, Cuda> x = leaf<float, Cuda>({m, kd}, 11);
    Var<float, Cuda> w = leaf<float, Cuda>({e, n, kd}, 12);
    Var<float, Cuda> y = grouped_linear(x, w, offsets, precision);
    sum(y * Var<float, Cuda>(randn<float, Cuda>({m, n}, 13))).backward();
    return std::vector<std::vector<float>>{y.value().to_vector(), x.grad().to_vector(), w.grad().to_vector()};
  };
  const char* names[3] = {"y", "dx", "dw"};
  const auto simt = run(false, false, MatmulPrecision::bf16), tc = run(true, false, MatmulPrecision::bf16);
  for (int i = 0; i < 3; ++i) {
    const auto [diff, scale] = max_difference(tc[i], simt[i]);
    expect(diff <= 1e-5 * (1 + scale), std::string("bf16 grouped_linear ") + names[i] +
                                           ": tensor cores against SIMT, max |difference| " + std::to_string(diff) +
                                           " (values up to " + std::to_string(scale) + ")");
  }
  const auto fp32 = run(true, false, MatmulPrecision::native), tf32 = run(true, true, MatmulPrecision::native);
  for (int i = 0; i < 3; ++i) {
    const auto [diff, scale] = max_difference(tf32[i], fp32[i]);
    expect(diff > 0 && diff <= 5e-3 * (1 + scale), std::string("float grouped_linear ") + names[i] +
                                                       ": TF32 tensor cores against fp32 SIMT, max |difference| " +
                                                       std::to_string(diff) + " (values up to " +
                                                       std::to_string(scale) + ")");
  }
  const auto a = randn<float, Cuda>({256, 192}, 14), b = randn<float, Cuda>({192, 160}, 15);
  mixmoe::cuda::set_allow_tf32(false);
  const std::vector<float> full = mixmoe::cuda::matmul(a, b).to_vector();
  mixmoe::cuda::set_allow_tf32(true);
  const std::vector<float> rounded = mixmoe::cuda::matmul(a, b).to_vector();
  const auto [diff, scale] = max_difference(rounded, full);
  expect(diff > 0 && diff <= 5e-3 * (1 + scale), "cuBLAS matmul with TF32 allowed against not, max |difference| " +
                                                     std::to_string(diff) + " (values up to " +
                                                     std::to_string(scale) + ")");
}

}  // namespace

int main() {
  using namespace mixmoe_parity;
  const int rc = parity_main("test_cuda_moe", cases_moe<mixmoe::Cuda>, cpu_cases_moe);
  return with_device_checks("test_cuda_moe", rc, [] {
    synchronisation_free_layer();
    out_of_range_expert();
    tensor_core_grouped_gemm();
  });
}
