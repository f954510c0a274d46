// GPU parity of training (cases_training.hpp) against the CPU backend, then a device-only check:
// how often a training step of the Mix-MoE LM waits for the device.
#include "parity_main.cuh"

#include <cstdint>
#include <string>

#include "cases_training.hpp"

namespace mixmoe_parity {
void cpu_cases_training(Results& r);
}

namespace {

using mixmoe_parity::expect;

/// A hand-written step (batch upload, forward, losses, backward, clip_grad_norm_async, AdamW)
/// waits 0 times; train_loop waits once per step (the step's numbers, read in one copy).
void step_synchronisations() {
  using namespace mixmoe;
  using namespace mixmoe_parity::training;
  {
    MixLM<float, Cuda> model(mix_config(21));
    const auto params = parameters(model);
    AdamW<float, Cuda> opt(params, {.lr = 1e-3, .weight_decay = 0.01});
    const Batch batch = random_batch(2, 10, 64, 4, 141);
    std::uint64_t used = 0;
    for (int step = 0; step < 3; ++step) {  // the first step warms the caches (cuFFT plans, blocks)
      const std::uint64_t before = mixmoe::cuda::synchronization_count();
      auto sup = supervised_logits(model, batch, -100);
      auto loss = cross_entropy(sup.logits, sup.targets) + load_balance_loss(model) * 0.01;
      loss.backward();
      (void)clip_grad_norm_async(params, 1.0);
      opt.step();
      opt.zero_grad();
      release_routing_graphs(model);
      used = mixmoe::cuda::synchronization_count() - before;
    }
    mixmoe::cuda::synchronize();
    expect(used == 0, "a Mix-MoE LM training step (upload, forward, backward, async clipping, AdamW) waits 0 times "
                      "(got " + std::to_string(used) + ")");
  }
  const auto loop_syncs = [](int steps) {
    MixLM<float, Cuda> model(mix_config(22));
    AdamW<float, Cuda> opt(parameters(model), {.lr = 1e-3, .weight_decay = 0.01});
    FixedBatches data;
    data.batches = {random_batch(2, 10, 64, 4, 151), random_batch(3, 8, 64, 0, 152)};
    LoopOptions o;
    o.stage = "syncs";
    o.steps = steps;
    o.log_every = 0;
    o.out = nullptr;
    const std::uint64_t before = mixmoe::cuda::synchronization_count();
    (void)train_loop(model, opt, data, o);
    return mixmoe::cuda::synchronization_count() - before;
  };
  const std::uint64_t two = loop_syncs(2), six = loop_syncs(6);
  expect(six - two == 4, "train_loop waits once per step (4 more steps: " + std::to_string(six - two) + " more waits)");
}

}  // namespace

int main() {
  using namespace mixmoe_parity;
  const int rc = parity_main("test_cuda_training", cases_training<mixmoe::Cuda>, cpu_cases_training);
  return with_device_checks("test_cuda_training", rc, [] {
    step_synchronisations();
  });
}
