// GPU parity of the MoE layers (cases_moe.hpp) against the CPU backend.
#include "parity_main.cuh"

#include "cases_moe.hpp"

namespace mixmoe_parity {
void cpu_cases_moe(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_moe", cases_moe<mixmoe::Cuda>, cpu_cases_moe);
}
