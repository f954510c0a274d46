// GPU parity of training (cases_training.hpp) against the CPU backend.
#include "parity_main.cuh"

#include "cases_training.hpp"

namespace mixmoe_parity {
void cpu_cases_training(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_training", cases_training<mixmoe::Cuda>, cpu_cases_training);
}
