// Shared helpers for the tests: random inputs and a gradcheck assertion.
#pragma once

#include <catch2/catch.hpp>
#include <mixmoe/mixmoe.hpp>

#include <string>
#include <vector>

namespace mixmoe::test {

using Vd = Var<double, Cpu>;
using Td = Tensor<double, Cpu>;
using Vf = Var<float, Cpu>;
using Tf = Tensor<float, Cpu>;

/// A leaf of normal(0, 1) values in double that requires grad.
inline Vd rand_var(const Shape& s, std::uint64_t seed, bool requires_grad = true) {
  Generator g(seed);
  return Vd(Td::randn(s, g), requires_grad);
}

/// REQUIRE that fn's gradient matches central differences, printing the mismatches.
#define MIXMOE_REQUIRE_GRADCHECK(fn, inputs, ...)                          \
  do {                                                                     \
    auto gc_result_ = ::mixmoe::gradcheck(fn, inputs, ##__VA_ARGS__);      \
    INFO(gc_result_.message);                                              \
    REQUIRE(gc_result_.ok);                                                \
  } while (0)

/// REQUIRE that expr throws mixmoe::Error whose message contains `needle`.
#define MIXMOE_REQUIRE_ERROR(expr, needle) REQUIRE_THROWS_WITH((expr), Catch::Matchers::Contains(needle))

/// Max |a - b| over elements of same-shaped tensors.
template <class T>
double max_abs_diff(const Tensor<T, Cpu>& a, const Tensor<T, Cpu>& b) {
  REQUIRE(a.shape() == b.shape());
  const auto va = a.to_vector(), vb = b.to_vector();
  double m = 0;
  for (std::size_t i = 0; i < va.size(); ++i) m = std::max(m, std::abs(static_cast<double>(va[i]) - static_cast<double>(vb[i])));
  return m;
}

}  // namespace mixmoe::test
