// main() of a device parity test (tests/cuda/parity.hpp): skip without a device, run the
// family's cases on Cuda, compare with the CPU's results from the host translation unit.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

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
#ifdef MIXMOE_CUDA_HOST_MODEL
  static_assert(MIXMOE_CUDA_MAX_ROW_BLOCKS == 512, "the host model's row grid, as many_rows() assumes");
  many_rows() = 700;  // see parity.hpp
#endif
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

/// Failed expect() calls of a test's device-only checks.
inline int& device_check_failures() {
  static int n = 0;
  return n;
}

/// One device-only check: prints "ok" or "FAILED" with what was checked.
inline void expect(bool ok, const std::string& what) {
  std::printf("  %s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++device_check_failures();
}

/// Runs `checks` (calling expect) after a parity run whose status is parity_rc, unless that run
/// was skipped (77: no device); the exit status fails when either part failed.
template <class Checks>
int with_device_checks(const char* family, int parity_rc, Checks&& checks) {
  if (parity_rc == 77) return parity_rc;
  std::printf("%s: device-only checks\n", family);
  try {
    checks();
  } catch (const std::exception& e) {
    expect(false, std::string("threw ") + e.what());
  }
  std::printf("%s: device-only checks: %d failed\n", family, device_check_failures());
  return parity_rc != 0 ? parity_rc : (device_check_failures() == 0 ? 0 : 1);
}

}  // namespace mixmoe_parity
