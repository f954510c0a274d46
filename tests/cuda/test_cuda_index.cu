// GPU parity of the index family (cases_index.hpp) against the CPU backend.
#include "parity_main.cuh"

#include "cases_index.hpp"

namespace mixmoe_parity {
void cpu_cases_index(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_index", cases_index<mixmoe::Cuda>, cpu_cases_index);
}
