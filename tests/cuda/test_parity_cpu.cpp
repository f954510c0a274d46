// Host-only check of the device parity cases (tests/cuda/cases_*.hpp): every family runs on
// the CPU in float and in double, and each float result must agree with its double twin
// ("f32 NAME" with "f64 NAME") to within float rounding; bf16 results ("bf16 NAME", from
// inputs rounded to bf16) with theirs to within bf16 rounding. It runs without a GPU, so the cases
// the GPU tests compare are known to run and to compute what they claim before a GPU sees them.
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "parity.hpp"

int main() {
  using namespace mixmoe_parity;
  int failures = 0, compared = 0;
  double worst_bf16 = 0;  // the largest bf16/double difference, reported for the tolerance's margin
  std::string worst_bf16_name;
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
      const bool is_bf16 = x.name.rfind("bf16 ", 0) == 0;
      if (x.name.rfind("f32 ", 0) != 0 && !is_bf16) continue;
      const auto it = f64.find(x.name.substr(is_bf16 ? 5 : 4));
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
      if (is_bf16 && !bad && rel > worst_bf16) {
        worst_bf16 = rel;
        worst_bf16_name = std::string(f.name) + " " + x.name;
      }
      // float rounding through a few ops: ~1e-6 relative; 1e-4 leaves room for ill-conditioned
      // steps (a difference of close values) while catching a formula that differs by type.
      // bf16 (8 significant bits): each rounding is up to 2^-9 relative; 3e-2 allows a few in a row
      if (bad || !(rel <= (is_bf16 ? 3e-2 : 1e-4))) {
        std::printf("  FAILED: %s %s: %s and double differ by %.3g%s\n", f.name, x.name.c_str(),
                    is_bf16 ? "bf16" : "float", rel, bad ? " (sizes or NaN placement differ)" : "");
        ++family_failed;
      }
      ++family_compared;
    }
    if (family_compared == 0) {
      std::printf("  FAILED: %s: no float or bf16 result has a double twin; nothing was compared\n", f.name);
      ++family_failed;
    }
    std::printf("%s: %zu results, %d float|bf16/double pairs compared, %d failed\n", f.name, r.size(), family_compared,
                family_failed);
    failures += family_failed;
    compared += family_compared;
  }
  if (registry().empty()) {
    std::printf("FAILED: no case family is linked in\n");
    return 1;
  }
  if (!worst_bf16_name.empty())
    std::printf("largest bf16/double difference: %.3g (%s; the bound is 3e-2)\n", worst_bf16, worst_bf16_name.c_str());
  std::printf("test_parity_cpu: %zu families, %d pairs compared, %d failed\n", registry().size(), compared, failures);
  return failures == 0 ? 0 : 1;
}
