// Vectorised math shared by the CPU kernels of the element-wise ops (Eigen array
// expressions, so they run on whole packets).
#pragma once

#include <limits>
#include <numbers>

#include <Eigen/Core>

namespace mixmoe::cpu {

/// ln of the smallest normal number of T (about -87.3 for float, -708.4 for double).
template <class T>
inline constexpr T kExpFlushBelow = static_cast<T>(std::numeric_limits<T>::min_exponent - 1) * std::numbers::ln2_v<T>;

/// e^a coefficient-wise, with results below the smallest normal number flushed to 0.
/// Eigen's packet exp clamps its argument, so on its own exp(-inf) is about 3e-39 in
/// float (6e-309 in double) instead of 0; flushed, masked (-inf) logits give exactly
/// 0, on every instruction set. NaN stays NaN.
template <class Derived>
auto exp_flush(const Eigen::ArrayBase<Derived>& a) {
  using T = typename Derived::Scalar;
  return (a < kExpFlushBelow<T>).select(T(0), a.exp());
}

}  // namespace mixmoe::cpu
