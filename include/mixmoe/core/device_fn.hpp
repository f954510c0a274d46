// Element functions that run on either device: the per-element math of the ops of ops/
// as function objects, so that a device backend can launch them in its kernels (nvcc
// compiles their call operators for the GPU too) while g++ sees plain C++.
//
//   MIXMOE_HD                __host__ __device__ under a CUDA compiler, nothing otherwise
//   fn::Add, Sub, Mul, Div    (a, b) -> a op b
//   fn::Scale{k}, AddC{k}     v -> v * k, v + k
//   fn::Exp ... fn::Pow{k}    the unary ops of ops/unary.hpp; each has a ...Grad(g, s)
//                             taking the output gradient g and the saved input or output s
//                             (which one is stated on each)
//
// The CPU backend keeps its own vectorised loops (backend/cpu/vmath.hpp): these are the
// reference definitions for a device, and the CPU's results are what the GPU tests compare with.
#pragma once

#include <cmath>
#include <limits>
#include <numbers>

#if defined(__CUDACC__)
#define MIXMOE_HD __host__ __device__
#else
#define MIXMOE_HD
#endif

namespace mixmoe::detail::fn {

struct Add {
  template <class T> MIXMOE_HD T operator()(T a, T b) const { return a + b; }
};
struct Sub {
  template <class T> MIXMOE_HD T operator()(T a, T b) const { return a - b; }
};
struct Mul {
  template <class T> MIXMOE_HD T operator()(T a, T b) const { return a * b; }
};
struct Div {
  template <class T> MIXMOE_HD T operator()(T a, T b) const { return a / b; }
};
/// -g * o: the quotient rule's factor for the divisor (o = a / b).
struct NegMul {
  template <class T> MIXMOE_HD T operator()(T g, T o) const { return -g * o; }
};
struct Negate {
  template <class T> MIXMOE_HD T operator()(T v) const { return -v; }
};
template <class T>
struct Scale {
  T k;
  MIXMOE_HD T operator()(T v) const { return v * k; }
};
template <class T>
struct AddC {
  T k;
  MIXMOE_HD T operator()(T v) const { return v + k; }
};
struct Identity {
  template <class T> MIXMOE_HD T operator()(T v) const { return v; }
};

/// e^x, results below the smallest normal number flushed to 0 (as cpu::flush_subnormal).
struct Exp {
  template <class T> MIXMOE_HD T operator()(T x) const {
    const T y = std::exp(x);
    return y < std::numeric_limits<T>::min() ? T(0) : y;
  }
};
/// g * y, y = exp(x) (the saved output).
struct ExpGrad {
  template <class T> MIXMOE_HD T operator()(T g, T y) const { return g * y; }
};
struct Log {
  template <class T> MIXMOE_HD T operator()(T x) const { return std::log(x); }
};
/// g / x (the saved input).
struct LogGrad {
  template <class T> MIXMOE_HD T operator()(T g, T x) const { return g / x; }
};
struct Sqrt {
  template <class T> MIXMOE_HD T operator()(T x) const { return std::sqrt(x); }
};
/// g / (2 y), y = sqrt(x) (the saved output).
struct SqrtGrad {
  template <class T> MIXMOE_HD T operator()(T g, T y) const { return T(0.5) * g / y; }
};
/// max(x, 0) with NaN kept.
struct Relu {
  template <class T> MIXMOE_HD T operator()(T x) const { return x < T(0) ? T(0) : x; }
};
/// g where y > 0 (y the saved output).
struct ReluGrad {
  template <class T> MIXMOE_HD T operator()(T g, T y) const { return y > T(0) ? g : T(0); }
};
/// 1 / (1 + e^-x) without overflow: e = exp(-|x|) <= 1.
struct Sigmoid {
  template <class T> MIXMOE_HD T operator()(T x) const {
    T e = std::exp(-(x < T(0) ? -x : x));
    if (e < std::numeric_limits<T>::min()) e = T(0);
    const T r = T(1) / (T(1) + e);
    return x >= T(0) ? r : e * r;
  }
};
/// g y (1 - y), y the saved output.
struct SigmoidGrad {
  template <class T> MIXMOE_HD T operator()(T g, T y) const { return g * y * (T(1) - y); }
};
struct Silu {
  template <class T> MIXMOE_HD T operator()(T x) const { return x * Sigmoid{}(x); }
};
/// g s (1 + x (1 - s)), s = sigmoid(x), x the saved input.
struct SiluGrad {
  template <class T> MIXMOE_HD T operator()(T g, T x) const {
    const T s = Sigmoid{}(x);
    return g * s * (T(1) + x * (T(1) - s));
  }
};
struct Tanh {
  template <class T> MIXMOE_HD T operator()(T x) const { return std::tanh(x); }
};
/// g (1 - y^2), y the saved output.
struct TanhGrad {
  template <class T> MIXMOE_HD T operator()(T g, T y) const { return g * (T(1) - y * y); }
};
struct Square {
  template <class T> MIXMOE_HD T operator()(T x) const { return x * x; }
};
/// 2 g x, x the saved input.
struct SquareGrad {
  template <class T> MIXMOE_HD T operator()(T g, T x) const { return T(2) * g * x; }
};
/// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
struct Gelu {
  template <class T> MIXMOE_HD T operator()(T x) const {
    return T(0.5) * x * (T(1) + std::erf(x * (T(1) / std::numbers::sqrt2_v<T>)));
  }
};
/// g (Phi(x) + x phi(x)), x the saved input (clamped to +-40 in the density, as on the CPU).
struct GeluGrad {
  template <class T> MIXMOE_HD T operator()(T g, T x) const {
    constexpr T kRsqrt2Pi = std::numbers::inv_sqrtpi_v<T> / std::numbers::sqrt2_v<T>;
    const T c = x < T(-40) ? T(-40) : (x > T(40) ? T(40) : x);
    const T cdf = T(0.5) * (T(1) + std::erf(x * (T(1) / std::numbers::sqrt2_v<T>)));
    return g * (cdf + kRsqrt2Pi * c * std::exp(T(-0.5) * c * c));
  }
};
/// GELU, tanh approximation (GPT-2).
struct GeluTanh {
  template <class T> MIXMOE_HD T operator()(T x) const {
    constexpr T k = std::numbers::sqrt2_v<T> * std::numbers::inv_sqrtpi_v<T>, c = T(0.044715);
    return T(0.5) * x * (T(1) + std::tanh(k * (x + c * x * x * x)));
  }
};
/// Its gradient, x the saved input (x^2 capped at 1e4 in du/dx, as on the CPU).
struct GeluTanhGrad {
  template <class T> MIXMOE_HD T operator()(T g, T x) const {
    constexpr T k = std::numbers::sqrt2_v<T> * std::numbers::inv_sqrtpi_v<T>, c = T(0.044715);
    const T t = std::tanh(k * (x + c * x * x * x));
    const T x2 = x * x < T(1e4) ? x * x : T(1e4);
    return g * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3) * c * x2));
  }
};
template <class T>
struct Pow {
  T k;
  MIXMOE_HD T operator()(T x) const { return std::pow(x, k); }
};
/// k g x^(k-1), x the saved input.
template <class T>
struct PowGrad {
  T k;
  MIXMOE_HD T operator()(T g, T x) const { return k * g * std::pow(x, k - T(1)); }
};

}  // namespace mixmoe::detail::fn
