// Seeded random numbers that are the same on every run and every platform:
// xoshiro256** seeded by splitmix64, with our own uniform/normal transforms
// (std:: distributions differ between standard libraries).
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

namespace mixmoe {

class Generator {
 public:
  explicit Generator(std::uint64_t seed = 0) { this->seed(seed); }

  void seed(std::uint64_t seed) {
    std::uint64_t x = seed;
    for (auto& w : s_) w = splitmix64(x);
    have_spare_ = false;
  }

  /// Uniform 64-bit word.
  std::uint64_t next_u64() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return static_cast<std::uint64_t>(uniform() * static_cast<double>(n)); }

  /// Standard normal (Box-Muller, the spare value is kept for the next call).
  double normal() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double a = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(a);
    have_spare_ = true;
    return r * std::cos(a);
  }

  double normal(double mean, double stddev) { return mean + stddev * normal(); }

  /// Full state, so checkpoints can resume a generator exactly.
  struct State {
    std::uint64_t s[4];
    double spare;
    bool have_spare;
  };
  [[nodiscard]] State state() const { return {{s_[0], s_[1], s_[2], s_[3]}, spare_, have_spare_}; }
  void set_state(const State& st) {
    for (int i = 0; i < 4; ++i) s_[i] = st.s[i];
    spare_ = st.spare;
    have_spare_ = st.have_spare;
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  std::uint64_t s_[4]{};
  double spare_ = 0.0;
  bool have_spare_ = false;
};

/// The process-wide generator used when an op is not given one; seed it with
/// manual_seed() for reproducible runs.
inline Generator& default_generator() {
  static Generator g(0);
  return g;
}

inline void manual_seed(std::uint64_t seed) { default_generator().seed(seed); }

}  // namespace mixmoe
