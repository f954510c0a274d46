// Host-only check of the device parity cases (tests/cuda/cases_*.hpp): every family runs on
// the CPU in float and in double, and each float result must agree with its double twin
// ("f32 NAME" with "f64 NAME") to within float rounding. It runs without a GPU, so the cases
// the GPU tests compare are known to run and to compute what they claim before a GPU sees them.
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "parity.hpp"

int main() {
  using namespace mixmoe_parity;
  int failures = 0, compared = 0;
  for (const Family& f : registry()) {
    Results r;
    try {
      f.cpu_run(r);
    } catch (const std::exception& e) {
      std::printf("  FAILED: %s threw %s\n", f.name, e.what());
      ++failures;
      continue;
    }
    std::map<std::string, const Result*> f64;
    for (const Result& x : r)
      if (x.name.rfind("f64 ", 0) == 0) f64[x.name.substr(4)] = &x;
    int family_compared = 0, family_failed = 0;
    for (const Result& x : r) {
      if (x.name.rfind("f32 ", 0) != 0) continue;
      const auto it = f64.find(x.name.substr(4));
      if (it == f64.end()) {
        std::printf("  FAILED: %s %s has no double twin\n", f.name, x.name.c_str());
        ++family_failed;
        continue;
      }
      const Result& d = *it->second;
      double err = 0, scale = 0;
      bool bad = d.values.size() != x.values.size();
      for (std::size_t i = 0; !bad && i < x.values.size(); ++i) {
        if (std::isnan(x.values[i]) != std::isnan(d.values[i])) bad = true;
        if (!std::isfinite(d.values[i]) || !std::isfinite(x.values[i])) continue;
        err = std::fmax(err, std::fabs(x.values[i] - d.values[i]));
        scale = std::fmax(scale, std::fabs(d.values[i]));
      }
      const double rel = err / (1.0 + scale);
      // float rounding through a few ops: ~1e-6 relative; 1e-4 leaves room for ill-conditioned
      // steps (a difference of close values) while catching a formula that differs by type
      if (bad || !(rel <= 1e-4)) {
        std::printf("  FAILED: %s %s: float and double differ by %.3g%s\n", f.name, x.name.c_str(), rel,
                    bad ? " (sizes or NaN placement differ)" : "");
        ++family_failed;
      }
      ++family_compared;
    }
    if (family_compared == 0) {
      std::printf("  FAILED: %s: no float result has a double twin; nothing was compared\n", f.name);
      ++family_failed;
    }
    std::printf("%s: %zu results, %d float/double pairs compared, %d failed\n", f.name, r.size(), family_compared,
                family_failed);
    failures += family_failed;
    compared += family_compared;
  }
  if (registry().empty()) {
    std::printf("FAILED: no case family is linked in\n");
    return 1;
  }
  std::printf("test_parity_cpu: %zu families, %d pairs compared, %d failed\n", registry().size(), compared, failures);
  return failures == 0 ? 0 : 1;
}
