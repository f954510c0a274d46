// Element-wise functions of one tensor, each with its gradient: exp, log, sqrt,
// relu, gelu (exact, erf form), gelu_tanh (tanh approximation, GPT-2), silu,
// sigmoid, tanh, square and pow_scalar.
//
// Shapes: any. The result has the input's shape and is contiguous; so is the
// gradient handed back to the input.
//
// Domain errors follow IEEE 754 instead of throwing, as std::log, std::sqrt and
// std::pow do: log(0) = -inf, log and sqrt of negative values are NaN, and so is
// pow_scalar of a negative base with a non-integer exponent. Checking every
// element would cost an extra pass over the data on every call; a NaN loss is
// caught once, by the training loop, instead. Gradients at the edge of a domain
// are IEEE too: d sqrt(x)/dx and d log(x)/dx at x = 0 are +inf. One exception:
// exp (and sigmoid / silu through it) flushes results below the smallest normal
// number to 0 (x < -87.3 in float, -708.4 in double), so exp(-inf) is exactly 0
// with the vectorised exp too (see cpu::flush_subnormal).
//
// The kernels run Eigen array expressions over contiguous chunks (vectorised
// exp/log/tanh/sqrt), split across threads for large tensors, and allocate
// nothing but the result: no Eigen temporaries.
#pragma once

#include <cmath>
#include <numbers>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/backend/cpu/vmath.hpp"

namespace mixmoe {

namespace detail::unary_impl {

namespace fn = mixmoe::detail::fn;


using cpu::Array;
using cpu::In;
using cpu::Out;
using cpu::kGrain;

inline void check_defined(bool defined, const char* op) {
  MIXMOE_CHECK(defined, op, "the input is an undefined Var");
}

/// A fresh contiguous tensor of x's shape; f(In x_chunk, Out out_chunk) fills it chunk by chunk.
/// On a device, `dev` (a function object of core/device_fn.hpp) maps each element instead.
template <class T, class D, class F, class G>
Tensor<T, D> map_chunks(const Tensor<T, D>& x, F f, G dev) {
  const Tensor<T, D> xc = x.contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::map(out.data(), out.numel(), dev, xc.data());
    return out;
  }
  const T* px = xc.data();
  T* po = out.data();
  cpu::parallel_for(out.numel(), kGrain, [&](index_t lo, index_t hi) {
    const In<T> a(px + lo, hi - lo);
    Out<T> o(po + lo, hi - lo);
    f(a, o);
  });
  return out;
}

/// The same with two same-shaped contiguous inputs: f(In g, In s, Out out), for backwards
/// where g is the output gradient and s the saved input or output.
template <class T, class D, class F, class G>
Tensor<T, D> map_chunks(const Tensor<T, D>& g, const Tensor<T, D>& s, F f, G dev) {
  Tensor<T, D> out = Tensor<T, D>::empty(g.shape());
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::map(out.data(), out.numel(), dev, g.data(), s.data());
    return out;
  }
  const T* pg = g.data();
  const T* ps = s.data();
  T* po = out.data();
  cpu::parallel_for(out.numel(), kGrain, [&](index_t lo, index_t hi) {
    const In<T> a(pg + lo, hi - lo), b(ps + lo, hi - lo);
    Out<T> o(po + lo, hi - lo);
    f(a, b, o);
  });
  return out;
}

/// o = sigmoid(a) without overflow: with e = exp(-|a|) <= 1, sigmoid is 1/(1+e) for
/// a >= 0 and e/(1+e) for a < 0, so tiny results keep their relative precision.
template <class T>
void sigmoid_into(const In<T>& a, Out<T>& o) {
  o = (-a.abs()).exp();
  cpu::flush_subnormal(o.data(), o.size());
  // a plain loop, vectorised as a blend (see backend/cpu/vmath.hpp)
  for (index_t i = 0; i < a.size(); ++i) {
    const T r = T(1) / (T(1) + o[i]);
    o[i] = a[i] >= T(0) ? r : o[i] * r;
  }
}

/// o = erf(a / sqrt 2). Float: Eigen's vectorised rational erf (a couple of ulp);
/// double: std::erf, which has no packet form (Eigen's double erf is std::erf too).
template <class T>
void erf_scaled_into(const In<T>& a, Out<T>& o) {
  constexpr T kRsqrt2 = T(1) / std::numbers::sqrt2_v<T>;
  if constexpr (std::is_same_v<T, float>) {
    o = (a * kRsqrt2).erf();
  } else {
    for (index_t i = 0; i < a.size(); ++i) o[i] = std::erf(a[i] * kRsqrt2);
  }
}

template <class T>
inline constexpr T kGeluTanhK = std::numbers::sqrt2_v<T> * std::numbers::inv_sqrtpi_v<T>;  // sqrt(2 / pi)
template <class T>
inline constexpr T kGeluTanhC = T(0.044715);

}  // namespace detail::unary_impl

/// e^x. The backward reuses the output: d e^x = e^x.
template <Scalar T, Device D>
Var<T, D> exp(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "exp");
  auto out = map_chunks(x.value(), [](const In<T>& a, Out<T>& o) {
    o = a.exp();
    cpu::flush_subnormal(o.data(), o.size());
  }, fn::Exp{});
  return record("exp", std::move(out), {x}, [](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), ctx.output(),
                                 [](const In<T>& g, const In<T>& y, Out<T>& o) { o = g * y; }, fn::ExpGrad{}));
  });
}

/// Natural logarithm; IEEE for x <= 0 (-inf at 0, NaN below), see the file comment.
template <Scalar T, Device D>
Var<T, D> log(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "log");
  const Tensor<T, D> xc = x.value().contiguous();
  auto out = map_chunks(xc, [](const In<T>& a, Out<T>& o) { o = a.log(); }, fn::Log{});
  return record("log", std::move(out), {x}, [xc](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc, [](const In<T>& g, const In<T>& v, Out<T>& o) { o = g / v; }, fn::LogGrad{}));
  });
}

/// Square root; NaN for x < 0. The backward reuses the output: d sqrt(x) = 1 / (2 sqrt(x)).
template <Scalar T, Device D>
Var<T, D> sqrt(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "sqrt");
  auto out = map_chunks(x.value(), [](const In<T>& a, Out<T>& o) { o = a.sqrt(); }, fn::Sqrt{});
  return record("sqrt", std::move(out), {x}, [](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), ctx.output(),
                                 [](const In<T>& g, const In<T>& y, Out<T>& o) { o = T(0.5) * g / y; }, fn::SqrtGrad{}));
  });
}

/// max(x, 0); NaN stays NaN (so a diverging run is not hidden). The gradient at 0 is 0.
template <Scalar T, Device D>
Var<T, D> relu(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "relu");
  // plain loops, vectorised as blends (see backend/cpu/vmath.hpp); a < 0 is false for NaN
  auto out = map_chunks(x.value(), [](const In<T>& a, Out<T>& o) {
    for (index_t i = 0; i < a.size(); ++i) o[i] = a[i] < T(0) ? T(0) : a[i];
  }, fn::Relu{});
  return record("relu", std::move(out), {x}, [](autograd::BackwardContext<T, D>& ctx) {
    // y > 0 exactly where x > 0, so the output serves as the mask.
    ctx.accumulate(0, map_chunks(ctx.grad_out(), ctx.output(), [](const In<T>& g, const In<T>& y, Out<T>& o) {
      for (index_t i = 0; i < g.size(); ++i) o[i] = y[i] > T(0) ? g[i] : T(0);
    }, fn::ReluGrad{}));
  });
}

/// Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), Phi the standard normal CDF.
template <Scalar T, Device D>
Var<T, D> gelu(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "gelu");
  const Tensor<T, D> xc = x.value().contiguous();
  auto out = map_chunks(xc, [](const In<T>& a, Out<T>& o) {
    erf_scaled_into(a, o);
    o = T(0.5) * a * (T(1) + o);
  }, fn::Gelu{});
  return record("gelu", std::move(out), {x}, [xc](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc, [](const In<T>& g, const In<T>& v, Out<T>& o) {
      // d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi). x phi(x) is 0 in
      // every precision beyond |x| = 40; clamping there keeps x * (clamped tiny exp) from growing.
      constexpr T kRsqrt2Pi = std::numbers::inv_sqrtpi_v<T> / std::numbers::sqrt2_v<T>;
      erf_scaled_into(v, o);
      o = g * (T(0.5) * (T(1) + o) + kRsqrt2Pi * v.max(T(-40)).min(T(40)) *
                                         (T(-0.5) * v.max(T(-40)).min(T(40)).square()).exp());
    }, fn::GeluGrad{}));
  });
}

/// GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
template <Scalar T, Device D>
Var<T, D> gelu_tanh(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "gelu_tanh");
  const Tensor<T, D> xc = x.value().contiguous();
  auto out = map_chunks(xc, [](const In<T>& a, Out<T>& o) {
    o = T(0.5) * a * (T(1) + (kGeluTanhK<T> * (a + kGeluTanhC<T> * a.cube())).tanh());
  }, fn::GeluTanh{});
  return record("gelu_tanh", std::move(out), {x}, [xc](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc, [](const In<T>& g, const In<T>& v, Out<T>& o) {
      // t = tanh(u) goes through o first (cwise, so reading and writing o in place is safe).
      // du/dx = k (1 + 3 c x^2) only matters where tanh is not saturated (|x| < 10); capping x^2
      // keeps 0 * inf = NaN out when x^2 overflows.
      o = (kGeluTanhK<T> * (v + kGeluTanhC<T> * v.cube())).tanh();
      o = g * (T(0.5) * (T(1) + o) + T(0.5) * v * (T(1) - o.square()) * kGeluTanhK<T> *
                                         (T(1) + T(3) * kGeluTanhC<T> * v.square().min(T(1e4))));
    }, fn::GeluTanhGrad{}));
  });
}

/// 1 / (1 + e^-x), without overflow for large |x|. The backward reuses the output: y (1 - y).
template <Scalar T, Device D>
Var<T, D> sigmoid(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "sigmoid");
  auto out = map_chunks(x.value(), [](const In<T>& a, Out<T>& o) { sigmoid_into(a, o); }, fn::Sigmoid{});
  return record("sigmoid", std::move(out), {x}, [](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), ctx.output(),
                                 [](const In<T>& g, const In<T>& y, Out<T>& o) { o = g * y * (T(1) - y); }, fn::SigmoidGrad{}));
  });
}

/// SiLU (swish): x * sigmoid(x).
template <Scalar T, Device D>
Var<T, D> silu(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "silu");
  const Tensor<T, D> xc = x.value().contiguous();
  auto out = map_chunks(xc, [](const In<T>& a, Out<T>& o) {
    sigmoid_into(a, o);
    o *= a;
  }, fn::Silu{});
  return record("silu", std::move(out), {x}, [xc](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc, [](const In<T>& g, const In<T>& v, Out<T>& o) {
      // d/dx x s(x) = s (1 + x (1 - s)), with s = sigmoid(x) computed into o first
      sigmoid_into(v, o);
      o = g * o * (T(1) + v * (T(1) - o));
    }, fn::SiluGrad{}));
  });
}

/// Hyperbolic tangent. The backward reuses the output: 1 - y^2.
template <Scalar T, Device D>
Var<T, D> tanh(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "tanh");
  auto out = map_chunks(x.value(), [](const In<T>& a, Out<T>& o) { o = a.tanh(); }, fn::Tanh{});
  return record("tanh", std::move(out), {x}, [](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), ctx.output(),
                                 [](const In<T>& g, const In<T>& y, Out<T>& o) { o = g * (T(1) - y.square()); }, fn::TanhGrad{}));
  });
}

/// x^2.
template <Scalar T, Device D>
Var<T, D> square(const Var<T, D>& x) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "square");
  const Tensor<T, D> xc = x.value().contiguous();
  auto out = map_chunks(xc, [](const In<T>& a, Out<T>& o) { o = a.square(); }, fn::Square{});
  return record("square", std::move(out), {x}, [xc](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc,
                                 [](const In<T>& g, const In<T>& v, Out<T>& o) { o = T(2) * g * v; }, fn::SquareGrad{}));
  });
}

/// x^p for a constant exponent p, as std::pow (NaN for a negative base with non-integer p).
/// p = 0 gives ones and a zero gradient everywhere, x = 0 included.
template <Scalar T, Device D>
Var<T, D> pow_scalar(const Var<T, D>& x, double p) {
  using namespace detail::unary_impl;
  check_defined(x.defined(), "pow_scalar");
  MIXMOE_CHECK(std::isfinite(p), "pow_scalar", "the exponent must be finite, got ", p);
  const T k = static_cast<T>(p);
  const Tensor<T, D> xc = x.value().contiguous();
  // std::pow, not Eigen's packet pow: exactly the documented IEEE semantics, and GCC 12 warns
  // (-Wuninitialized, a false positive inside its AVX-512 intrinsics) on Eigen's version.
  auto out = map_chunks(xc, [k](const In<T>& a, Out<T>& o) {
    for (index_t i = 0; i < a.size(); ++i) o[i] = std::pow(a[i], k);
  }, fn::Pow<T>{k});
  return record("pow_scalar", std::move(out), {x}, [xc, k](autograd::BackwardContext<T, D>& ctx) {
    if (k == T(0)) {  // p x^(p-1) would be 0 * inf = NaN at x = 0
      ctx.accumulate(0, Tensor<T, D>::zeros(xc.shape()));
      return;
    }
    ctx.accumulate(0, map_chunks(ctx.grad_out(), xc, [k](const In<T>& g, const In<T>& v, Out<T>& o) {
      for (index_t i = 0; i < v.size(); ++i) o[i] = k * g[i] * std::pow(v[i], k - T(1));
    }, fn::PowGrad<T>{k}));
  });
}

}  // namespace mixmoe
