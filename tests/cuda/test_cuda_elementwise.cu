// GPU parity of the element-wise ops (cases_elementwise.hpp) against the CPU backend.
#include "parity_main.cuh"

#include "cases_elementwise.hpp"

namespace mixmoe_parity {
void cpu_cases_elementwise(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_elementwise", cases_elementwise<mixmoe::Cuda>, cpu_cases_elementwise);
}
