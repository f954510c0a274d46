// GPU parity of the attention family (cases_attention.hpp: fused attention, rope, rfft, the bf16 ops) against the CPU backend.
#include "parity_main.cuh"

#include "cases_attention.hpp"

namespace mixmoe_parity {
void cpu_cases_attention(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_attention", cases_attention<mixmoe::Cuda>, cpu_cases_attention);
}
