// main() of a device parity test (tests/cuda/parity.hpp): skip without a device, run the
// family's cases on Cuda, compare with the CPU's results from the host translation unit.
#pragma once

#include <cstdio>
#include <exception>

#include <mixmoe/backend/cuda/cuda.cuh>

#include "parity.hpp"

namespace mixmoe_parity {

template <class DeviceRun, class CpuRun>
int parity_main(const char* family, DeviceRun device_run, CpuRun cpu_run) {
  if (mixmoe::cuda::device_count() == 0) {
    std::printf("%s: SKIPPED: no CUDA device found (or no driver); no GPU test ran\n", family);
    return 77;
  }
  std::printf("%s: on %s\n", family, mixmoe::cuda::device_description().c_str());
  try {
    Results cpu, dev;
    cpu_run(cpu);
    device_run(dev);
    mixmoe::cuda::synchronize();
    return compare(family, dev, cpu);
  } catch (const std::exception& e) {
    std::printf("  FAILED: threw %s\n", e.what());
    return 1;
  }
}

}  // namespace mixmoe_parity
