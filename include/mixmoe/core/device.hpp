// Devices are types: Tensor<T, Cpu> and Tensor<T, Cuda> are different types, so
// mixing devices in one op is a compile error, not a run-time surprise.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "mixmoe/core/bf16.hpp"

namespace mixmoe {

/// The host CPU: Eigen and OpenBLAS/FFTW kernels.
struct Cpu {
  static constexpr const char* name = "cpu";
};

/// An NVIDIA GPU through CUDA (cuBLAS, cuFFT and the kernels of backend/cuda/). The tag is
/// plain C++; tensors on it need <mixmoe/backend/cuda/tensor.cuh> in a CUDA translation unit.
struct Cuda {
  static constexpr const char* name = "cuda";
};

/// A device tag names itself; its kernels live in backend/<device>/.
template <class D>
concept Device = requires {
  { D::name } -> std::convertible_to<const char*>;
};

/// The compute types: every op takes float and double tensors (and Var<T, D>).
template <class T>
concept Scalar = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// The floating-point types a Var may hold: the compute types and the bf16 storage type.
/// Var<bf16, D> is a value stored in bf16; the ops that take it (ops/bf16.hpp: cast, matmul,
/// linear, the norms, attention, the grouped expert GEMM, ...) compute in fp32 and round.
template <class T>
concept Floating = Scalar<T> || std::is_same_v<T, bf16>;

/// Element types a tensor may hold: the floating types, plus integers for indices
/// (token ids, expert ids, gather/scatter positions).
template <class T>
concept Element = Floating<T> || std::is_same_v<T, std::int32_t> || std::is_same_v<T, std::int64_t>;

/// The integer type of index tensors (token ids, expert assignments, positions).
using Index = std::int32_t;

}  // namespace mixmoe
