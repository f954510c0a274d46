// Devices are types: Tensor<T, Cpu> and Tensor<T, Cuda> are different types, so
// mixing devices in one op is a compile error, not a run-time surprise.
#pragma once

#include <concepts>
#include <type_traits>

namespace mixmoe {

/// The host CPU: Eigen and OpenBLAS/FFTW kernels.
struct Cpu {
  static constexpr const char* name = "cpu";
};

/// A device tag names itself; its kernels live in backend/<device>/.
template <class D>
concept Device = requires {
  { D::name } -> std::convertible_to<const char*>;
};

/// Scalar types a tensor may hold.
template <class T>
concept Scalar = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace mixmoe
