// Learning-rate schedules: pure functions of the optimizer step, so a resumed run
// gets exactly the learning rate an uninterrupted run would have had.
//
//   WarmupCosine sched{.peak_lr = 3e-4, .min_lr = 3e-5, .warmup_steps = 200, .total_steps = 10000};
//   for (std::int64_t step = start; step < sched.total_steps; ++step) {
//     set_lr(opt, sched(step));
//     ... forward, backward, opt.step(), opt.zero_grad() ...
//   }
//
// Step numbering: `step` is the number of optimizer updates already applied (0 for the
// first update). Warm-up is linear from peak_lr / warmup_steps at step 0 to peak_lr at
// step warmup_steps - 1 (no update is taken with a learning rate of zero).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

namespace detail {

/// The linear warm-up factor for `step` (1 once warm-up is over).
inline double warmup_factor(std::int64_t step, std::int64_t warmup_steps) {
  if (warmup_steps <= 0 || step >= warmup_steps) return 1.0;
  if (step < 0) return 0.0;
  return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
}

inline void check_schedule(const char* where, double peak_lr, double min_lr, std::int64_t warmup_steps,
                           std::int64_t total_steps) {
  MIXMOE_CHECK(std::isfinite(peak_lr) && peak_lr >= 0, where, "peak_lr must be finite and >= 0, got ", peak_lr);
  MIXMOE_CHECK(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= peak_lr, where, "min_lr must be in [0, peak_lr = ",
               peak_lr, "], got ", min_lr);
  MIXMOE_CHECK(warmup_steps >= 0, where, "warmup_steps must be >= 0, got ", warmup_steps);
  MIXMOE_CHECK(total_steps >= warmup_steps, where, "total_steps (", total_steps, ") must be >= warmup_steps (",
               warmup_steps, ")");
}

}  // namespace detail

/// The same learning rate at every step.
struct ConstantLR {
  double lr = 1e-3;

  [[nodiscard]] double operator()(std::int64_t /*step*/) const { return lr; }
};

/// Linear warm-up to peak_lr, then linear decay to min_lr at total_steps; min_lr afterwards.
struct WarmupLinear {
  double peak_lr = 1e-3;
  double min_lr = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  /// Throws mixmoe::Error naming the field when the settings are inconsistent.
  void validate() const { detail::check_schedule("WarmupLinear", peak_lr, min_lr, warmup_steps, total_steps); }

  [[nodiscard]] double operator()(std::int64_t step) const {
    if (step < warmup_steps) return peak_lr * detail::warmup_factor(step, warmup_steps);
    if (step >= total_steps) return min_lr;
    const double span = static_cast<double>(total_steps - warmup_steps);
    const double progress = static_cast<double>(step - warmup_steps) / span;  // in [0, 1)
    return min_lr + (peak_lr - min_lr) * (1.0 - progress);
  }
};

/// Linear warm-up to peak_lr, then half a cosine down to min_lr at total_steps; min_lr afterwards.
struct WarmupCosine {
  double peak_lr = 1e-3;
  double min_lr = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  /// Throws mixmoe::Error naming the field when the settings are inconsistent.
  void validate() const { detail::check_schedule("WarmupCosine", peak_lr, min_lr, warmup_steps, total_steps); }

  [[nodiscard]] double operator()(std::int64_t step) const {
    if (step < warmup_steps) return peak_lr * detail::warmup_factor(step, warmup_steps);
    if (step >= total_steps) return min_lr;
    const double span = static_cast<double>(total_steps - warmup_steps);
    const double progress = static_cast<double>(step - warmup_steps) / span;  // in [0, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }
};

/// An optimizer whose learning rate can be changed between steps (SGD and AdamW are).
template <class O>
concept LearningRateSettable = requires(O& opt, double lr) { opt.set_lr(lr); };

/// Sets the optimizer's learning rate for the next step(); returns lr.
template <LearningRateSettable O>
double set_lr(O& opt, double lr) {
  MIXMOE_CHECK(std::isfinite(lr) && lr >= 0, "set_lr", "learning rate must be finite and >= 0, got ", lr);
  opt.set_lr(lr);
  return lr;
}

/// Sets the learning rate the schedule gives for `step` (updates applied so far); returns it.
template <LearningRateSettable O, class Schedule>
  requires requires(const Schedule& s, std::int64_t step) {
    { s(step) } -> std::convertible_to<double>;
  }
double apply_schedule(O& opt, const Schedule& schedule, std::int64_t step) {
  return set_lr(opt, static_cast<double>(schedule(step)));
}

}  // namespace mixmoe
