// GPU parity of the row ops (cases_rows.hpp) against the CPU backend.
#include "parity_main.cuh"

#include "cases_rows.hpp"

namespace mixmoe_parity {
void cpu_cases_rows(Results& r);
}

int main() {
  using namespace mixmoe_parity;
  return parity_main("test_cuda_rows", cases_rows<mixmoe::Cuda>, cpu_cases_rows);
}
