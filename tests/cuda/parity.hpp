// Device parity tests: one set of cases, written once as a function template over the device,
// runs on Cpu (compiled by the host compiler, cpu_cases_<family>.cpp) and on Cuda (compiled by
// nvcc, test_cuda_<family>.cu); the GPU program compares the two result lists entry by entry.
//
// A family's header cases_<family>.hpp defines
//
//   template <class D> void cases_<family>(mixmoe_parity::Results& r);
//
// which builds its inputs from seeded generators (Tensor<T, D>::randn draws on the host, so both
// devices get the same values), runs ops forward and backward, and records every output and
// gradient with put(r, name, tensor, tolerance). Run each case in float and in double: double
// with a tight tolerance (1e-9) is what catches a wrong formula, float what a real run uses.
//
// Without a CUDA device the GPU program exits with 77 (CTest: skipped), never passing.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <mixmoe/autograd/var.hpp>
#include <mixmoe/core/tensor.hpp>

namespace mixmoe_parity {

using mixmoe::index_t;

struct Result {
  std::string name;
  std::vector<double> values;
  double tol = 0;  // max |cuda - cpu| / (1 + max |cpu|); 0 = exactly equal
};
using Results = std::vector<Result>;

/// Rows in the cases that must outnumber the row kernels' grid (backend/cuda/rows.cuh:
/// kMaxRowBlocks, 65535), so that their grid-stride loops run: 70000. The host model of CUDA
/// (tests/cuda/host_model) lowers that grid to 512 blocks and these cases to 700 rows, which
/// checks the same loop at a hundredth of the cost (its kernels run a fiber per CUDA thread).
inline index_t& many_rows() {
  static index_t n = 70000;
  return n;
}

/// The tolerance for T: f32 for float, f64 for double.
template <class T>
double tol(double f32, double f64 = 1e-9) {
  return std::is_same_v<T, float> ? f32 : f64;
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "f32" : std::is_same_v<T, double> ? "f64" : std::is_same_v<T, mixmoe::bf16> ? "bf16" : "int";
}

/// Records the values of t (any device, any layout) under `name`.
template <class T, class D>
void put(Results& r, const std::string& name, const mixmoe::Tensor<T, D>& t, double tolerance) {
  Result res{name, {}, tolerance};
  for (const T& v : t.contiguous().to_vector()) res.values.push_back(static_cast<double>(v));
  r.push_back(std::move(res));
}

/// Records a Var's value, and the gradient of each listed input (after the caller's backward).
template <class T, class D>
void put(Results& r, const std::string& name, const mixmoe::Var<T, D>& v, double tolerance) {
  put(r, name, v.value(), tolerance);
}

/// A seeded normal tensor of `shape` on D, the same values on every device.
template <class T, class D>
mixmoe::Tensor<T, D> randn(const mixmoe::Shape& shape, std::uint64_t seed, double scale = 1.0) {
  mixmoe::Generator gen(seed);
  return mixmoe::Tensor<T, D>::randn(shape, gen, 0.0, scale);
}

/// A leaf Var that requires its gradient.
template <class T, class D>
mixmoe::Var<T, D> leaf(const mixmoe::Shape& shape, std::uint64_t seed, double scale = 1.0) {
  return mixmoe::Var<T, D>(randn<T, D>(shape, seed, scale), /*requires_grad=*/true);
}

/// y.backward(g) with a seeded random g of y's shape: the gradients are those of sum(y * g).
template <class T, class D>
void backward_random(const mixmoe::Var<T, D>& y, std::uint64_t seed) {
  y.backward(randn<T, D>(y.shape(), seed));
}

/// The CPU runs of every family linked into a program (each cpu_cases_<family>.cpp registers
/// its own), for the host-only check that float and double agree (test_parity_cpu).
using CaseFn = void (*)(Results&);
struct Family {
  const char* name;
  CaseFn cpu_run;
};
inline std::vector<Family>& registry() {
  static std::vector<Family> families;
  return families;
}
struct Registrar {
  Registrar(const char* name, CaseFn fn) { registry().push_back({name, fn}); }
};

/// Compares the device's results with the CPU's, prints one line per failure and a summary;
/// returns the process exit code (0 all equal within tolerance, 1 otherwise).
inline int compare(const char* family, const Results& dev, const Results& cpu) {
  int failures = 0;
  if (dev.size() != cpu.size()) {
    std::printf("  FAILED: %zu device results, %zu CPU results (the cases differ)\n", dev.size(), cpu.size());
    return 1;
  }
  for (std::size_t i = 0; i < dev.size(); ++i) {
    const Result& d = dev[i];
    const Result& c = cpu[i];
    if (d.name != c.name || d.values.size() != c.values.size()) {
      std::printf("  FAILED: %s: %zu values on the device, %s: %zu on the CPU\n", d.name.c_str(), d.values.size(),
                  c.name.c_str(), c.values.size());
      ++failures;
      continue;
    }
    double err = 0, scale = 0;
    bool nan_mismatch = false;
    for (std::size_t j = 0; j < d.values.size(); ++j) {
      if (std::isnan(d.values[j]) != std::isnan(c.values[j])) nan_mismatch = true;
      if (std::isnan(c.values[j])) continue;
      if (std::isinf(c.values[j]) || std::isinf(d.values[j])) {
        if (d.values[j] != c.values[j]) nan_mismatch = true;
        continue;
      }
      err = std::fmax(err, std::fabs(d.values[j] - c.values[j]));
      scale = std::fmax(scale, std::fabs(c.values[j]));
    }
    const double rel = err / (1.0 + scale);
    const bool ok = !nan_mismatch && (d.tol == 0 ? err == 0 : rel <= d.tol);
    if (!ok) {
      ++failures;
      std::printf("  FAILED: %s: relative error %.3g > %.3g%s\n", d.name.c_str(), rel, d.tol,
                  nan_mismatch ? " (NaN or inf in different places)" : "");
    }
  }
  std::printf("%s: %zu results compared with the CPU, %d failed\n", family, dev.size(), failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace mixmoe_parity
