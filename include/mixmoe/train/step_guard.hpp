// StepGuard: refuses optimizer steps whose loss or gradient norm is not finite, and stops
// training when too many are refused in a row.
//
//   StepGuard guard({.max_consecutive = 5});
//   ...
//   loss.backward();
//   const GradNorm gn = clip_grad_norm(params, 1.0);
//   if (guard.check(loss.item(), gn.norm, step)) opt.step();   // throws TrainingDiverged on the 5th bad step in a row
//   opt.zero_grad();                                            // a skipped step's gradients must go too
//
// A skipped step writes one warning line to the guard's stream ("step guard: skipping step
// 120: loss is nan (1 in a row, 3 in total)"). When the limit is reached, check() throws
// mixmoe::TrainingDiverged before anything is applied, so the last checkpoint written by the
// training loop is still that of a good state. Zeroing the gradients of a skipped step is the
// caller's job (opt.zero_grad() as usual, or skip(params)).
#pragma once

#include <cmath>
#include <cstdint>
#include <iostream>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/core/error.hpp"

namespace mixmoe {

/// Thrown by StepGuard when the consecutive-skip limit is reached: training has diverged.
class TrainingDiverged : public Error {
 public:
  using Error::Error;
};

struct StepGuardOptions {
  /// Throw TrainingDiverged when this many steps in a row are skipped; 0 = never throw.
  int max_consecutive = 5;
  /// Where the warning for each skipped step goes; nullptr = no warnings.
  std::ostream* warn = &std::cerr;
};

class StepGuard {
 public:
  StepGuard() : StepGuard(StepGuardOptions{}) {}
  explicit StepGuard(StepGuardOptions options) : opt_(options) {
    MIXMOE_CHECK(opt_.max_consecutive >= 0, "StepGuard", "max_consecutive must be >= 0, got ", opt_.max_consecutive);
  }

  /// Whether the step with this loss and gradient norm may be applied (both finite). A refused
  /// step is counted and warned about; the max_consecutive-th refusal in a row throws
  /// TrainingDiverged. `step` names the step in messages; by default the number of checks so far.
  bool check(double loss, double grad_norm, std::int64_t step = -1) {
    const std::int64_t at = step >= 0 ? step : checks_;
    ++checks_;
    std::string reason;
    if (!std::isfinite(loss)) reason = "loss is " + describe(loss);
    if (!std::isfinite(grad_norm)) {
      if (!reason.empty()) reason += " and ";
      reason += "gradient norm is " + describe(grad_norm);
    }
    if (reason.empty()) {
      consecutive_ = 0;
      return true;
    }
    const std::string what = reason;
    reason += " at step " + std::to_string(at);
    last_reason_ = reason;
    ++total_;
    ++consecutive_;
    if (opt_.max_consecutive > 0 && consecutive_ >= opt_.max_consecutive) {
      std::ostringstream os;
      os << "training diverged: " << consecutive_ << " steps in a row skipped (limit " << opt_.max_consecutive
         << "), the last because " << reason;
      if (opt_.warn) *opt_.warn << "step guard: " << os.str() << '\n' << std::flush;
      throw TrainingDiverged("[StepGuard] " + os.str());
    }
    if (opt_.warn)
      *opt_.warn << "step guard: skipping step " << at << ": " << what << " (" << consecutive_ << " in a row, "
                 << total_ << " in total)\n"
                 << std::flush;
    return false;
  }

  /// check() then, for a refused step, clears the parameters' gradients.
  template <Scalar T, Device D>
  bool check(double loss, double grad_norm, const std::vector<Var<T, D>>& params, std::int64_t step = -1) {
    const bool ok = check(loss, grad_norm, step);
    if (!ok) skip(params);
    return ok;
  }

  /// Clears every gradient of a skipped step (set-to-none).
  template <Scalar T, Device D>
  static void skip(const std::vector<Var<T, D>>& params) {
    for (const auto& p : params)
      if (p.defined()) p.zero_grad();
  }

  /// Steps refused since the start (or since restore()).
  [[nodiscard]] std::int64_t skipped_total() const { return total_; }
  /// Steps refused in a row, up to the last check (0 after a good step).
  [[nodiscard]] int skipped_consecutive() const { return consecutive_; }
  /// Calls to check() so far.
  [[nodiscard]] std::int64_t checks() const { return checks_; }
  /// Why the last refused step was refused ("loss is nan at step 120"); empty when none was.
  [[nodiscard]] const std::string& last_reason() const { return last_reason_; }
  [[nodiscard]] const StepGuardOptions& options() const { return opt_; }

  /// Restores the counts saved with a checkpoint (skipped_total(), skipped_consecutive()).
  void restore(std::int64_t skipped_total, int skipped_consecutive = 0) {
    MIXMOE_CHECK(skipped_total >= 0 && skipped_consecutive >= 0 && skipped_consecutive <= skipped_total, "StepGuard",
                 "restore: counts must satisfy 0 <= consecutive <= total, got total ", skipped_total, ", consecutive ",
                 skipped_consecutive);
    total_ = skipped_total;
    consecutive_ = skipped_consecutive;
  }

 private:
  static std::string describe(double v) {
    if (std::isnan(v)) return "nan";
    return v > 0 ? "inf" : "-inf";
  }

  StepGuardOptions opt_;
  std::int64_t total_ = 0;
  std::int64_t checks_ = 0;
  int consecutive_ = 0;
  std::string last_reason_;
};

}  // namespace mixmoe
