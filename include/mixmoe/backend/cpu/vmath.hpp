// Vectorised math shared by the CPU kernels of the element-wise ops.
//
// Eigen 3.4's select() has no packet path (a select in an expression makes the whole
// expression scalar), so conditional steps are plain loops written for the compiler
// to vectorise as blends instead.
#pragma once

#include <limits>

#include <Eigen/Core>

#include "mixmoe/core/shape.hpp"

namespace mixmoe::cpu {

/// Elements per thread below which splitting an element-wise loop costs more than it saves.
inline constexpr index_t kGrain = 1 << 14;

/// Eigen views of a contiguous chunk, for vectorised exp/log/tanh/erf.
template <class T>
using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
template <class T>
using In = Eigen::Map<const Array<T>>;
template <class T>
using Out = Eigen::Map<Array<T>>;

/// Sets p[i] below the smallest normal number to 0, in place; for exp results.
/// Eigen's packet exp clamps its argument, so on its own exp(-inf) is about 3e-39 in
/// float (6e-309 in double) instead of 0; flushed, masked (-inf) logits give exactly 0
/// on every instruction set. Results that would be subnormal become 0 too. NaN stays.
template <class T>
void flush_subnormal(T* p, index_t n) {
  constexpr T kMinNormal = std::numeric_limits<T>::min();
  for (index_t i = 0; i < n; ++i) p[i] = p[i] < kMinNormal ? T(0) : p[i];
}

}  // namespace mixmoe::cpu
