// Parity cases of the element-wise ops (ops/elementwise.hpp, ops/unary.hpp): every binary op
// with full, trailing-row, scalar and middle-axis broadcasting, the scalar forms, and every
// unary function, forward and the gradients of sum(y * g).
#pragma once

#include <mixmoe/ops/elementwise.hpp>
#include <mixmoe/ops/shape_ops.hpp>
#include <mixmoe/ops/unary.hpp>

#include "parity.hpp"

namespace mixmoe_parity {

/// |v| + 0.1, computed through the ops (so on either device).
template <class T, class D>
mixmoe::Tensor<T, D> abs_plus(const mixmoe::Tensor<T, D>& v) {
  using namespace mixmoe;
  Var<T, D> x(v);
  return add_scalar(sqrt(add_scalar(square(x), 0.01)), 0.1).value();
}

template <class T, class D>
void elementwise_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-6, 1e-12);
  // binary ops over broadcast pairs: same shape, trailing row, scalar, a middle axis of size 1
  const std::pair<Shape, Shape> pairs[] = {
      {{3, 5, 7}, {3, 5, 7}}, {{3, 5, 7}, {7}}, {{3, 5, 7}, {1}}, {{3, 1, 7}, {3, 5, 1}}, {{4, 1000}, {4, 1}}};
  std::uint64_t seed = 100;
  for (const auto& [sa, sb] : pairs) {
    const std::string shapes = sa.to_string() + " " + sb.to_string();
    for (int op = 0; op < 4; ++op) {
      auto a = leaf<T, D>(sa, ++seed), b = leaf<T, D>(sb, ++seed);
      if (op == 3) b = Var<T, D>(add_scalar(b, 3.0).value().clone(), true);  // keep divisors away from 0
      static const char* names[] = {"add", "sub", "mul", "div"};
      Var<T, D> y = op == 0 ? add(a, b) : op == 1 ? sub(a, b) : op == 2 ? mul(a, b) : div(a, b);
      backward_random(y, ++seed);
      put(r, t + " " + names[op] + " " + shapes + " y", y, tl);
      // a broadcast input's gradient is a sum: in double on the device, in order in T on the CPU
      const double tg = tol<T>(1e-5, 1e-12);
      put(r, t + " " + names[op] + " " + shapes + " da", a.grad(), tg);
      put(r, t + " " + names[op] + " " + shapes + " db", b.grad(), tg);
    }
  }
  // scalar forms, on a transposed (strided) input
  {
    auto x = leaf<T, D>({6, 9}, 200);
    Var<T, D> xt = transpose(x, 0, 1);
    Var<T, D> y = add_scalar(scale(xt, -2.5), 0.75) * 3.0 - 1.0;
    backward_random(y, 201);
    put(r, t + " scale/add_scalar y", y, tl);
    put(r, t + " scale/add_scalar dx", x.grad(), tl);
  }
  // unary functions; inputs spread over [-6, 6] (positive where the domain needs it)
  const char* unary[] = {"exp", "log", "sqrt", "relu", "gelu", "gelu_tanh", "sigmoid", "silu", "tanh", "square", "pow"};
  for (int u = 0; u < 11; ++u) {
    const bool positive = u == 1 || u == 2 || u == 10;
    Tensor<T, D> v = randn<T, D>({7, 129}, 300 + u, 3.0);
    Var<T, D> x(positive ? abs_plus(v) : v, true);
    Var<T, D> y;
    switch (u) {
      case 0: y = exp(x); break;
      case 1: y = log(x); break;
      case 2: y = sqrt(x); break;
      case 3: y = relu(x); break;
      case 4: y = gelu(x); break;
      case 5: y = gelu_tanh(x); break;
      case 6: y = sigmoid(x); break;
      case 7: y = silu(x); break;
      case 8: y = tanh(x); break;
      case 9: y = square(x); break;
      default: y = pow_scalar(x, 1.7); break;
    }
    backward_random(y, 400 + u);
    // float: the GPU's exp/erf/tanh differ from Eigen's vectorised ones by a few ulp
    put(r, t + " " + unary[u] + " y", y, tol<T>(2e-6, 1e-12));
    put(r, t + " " + unary[u] + " dx", x.grad(), tol<T>(2e-6, 1e-12));
  }
}

template <class D>
void cases_elementwise(Results& r) {
  elementwise_cases<float, D>(r);
  elementwise_cases<double, D>(r);
}

}  // namespace mixmoe_parity
