#include "cpu_reference.hpp"

#include <mixmoe/backend/cpu/gemm.hpp>
#include <mixmoe/ops/elementwise.hpp>
#include <mixmoe/ops/fft.hpp>
#include <mixmoe/ops/matmul.hpp>
#include <mixmoe/ops/norm.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/ops/softmax.hpp>
#include <mixmoe/ops/unary.hpp>

namespace mixmoe_cuda_test {

using namespace mixmoe;

namespace {
Tensor<float> tensor(const Vec& v, const Shape& s) { return Tensor<float>::from(v, s); }

template <class Op>
Grads run(const Vec& x, const Vec& g, const Shape& xs, const Shape& gs, Op op) {
  auto xv = parameter(tensor(x, xs));
  Var<float> y = op(xv);
  auto loss = sum(y * Var<float>(tensor(g, gs)));
  loss.backward();
  return {y.value().to_vector(), xv.grad().to_vector(), {}};
}
}  // namespace

Vec cpu_matmul(const Vec& a, const Vec& b, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a, bool trans_b) {
  Vec c(static_cast<std::size_t>(m * n));
  cpu::gemm<float>(trans_a, trans_b, m, n, k, 1.0f, a.data(), trans_a ? m : k, b.data(), trans_b ? k : n, 0.0f, c.data(), n);
  return c;
}

Grads cpu_softmax(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols) {
  return run(x, g, {rows, cols}, {rows, cols}, [](const Var<float>& v) { return softmax(v, -1); });
}

Grads cpu_silu(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols) {
  return run(x, g, {rows, cols}, {rows, cols}, [](const Var<float>& v) { return silu(v); });
}

Grads cpu_rfft_magnitude(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols, double eps) {
  return run(x, g, {rows, cols}, {rows, cols / 2 + 1}, [eps](const Var<float>& v) { return rfft_magnitude(v, eps); });
}

Grads cpu_rms_norm(const Vec& x, const Vec& w, const Vec& g, std::int64_t rows, std::int64_t cols, double eps) {
  auto wv = parameter(tensor(w, {cols}));
  Grads r = run(x, g, {rows, cols}, {rows, cols}, [&](const Var<float>& v) { return rms_norm(v, wv, eps); });
  r.dw = wv.grad().to_vector();
  return r;
}

Grads cpu_mul_row(const Vec& a, const Vec& b, const Vec& g, std::int64_t rows, std::int64_t cols) {
  auto bv = parameter(tensor(b, {cols}));
  Grads r = run(a, g, {rows, cols}, {rows, cols}, [&](const Var<float>& v) { return v * bv; });
  r.dw = bv.grad().to_vector();
  return r;
}

LinearGrads cpu_linear(const Vec& x, const Vec& w, const Vec& b, const Vec& g, std::int64_t rows, std::int64_t n,
                       std::int64_t k) {
  auto xv = parameter(tensor(x, {rows, k})), wv = parameter(tensor(w, {n, k})), bv = parameter(tensor(b, {n}));
  auto y = linear(xv, wv, bv);
  y.backward(tensor(g, {rows, n}));
  return {y.value().to_vector(), xv.grad().to_vector(), wv.grad().to_vector(), bv.grad().to_vector()};
}

Grads cpu_matmul_broadcast(const Vec& a, const Vec& b, const Vec& g, std::int64_t batch, std::int64_t m, std::int64_t n,
                           std::int64_t k) {
  auto av = parameter(tensor(a, {batch, m, k})), bv = parameter(tensor(b, {k, n}));
  auto y = matmul(av, bv);
  y.backward(tensor(g, {batch, m, n}));
  return {y.value().to_vector(), av.grad().to_vector(), bv.grad().to_vector()};
}

}  // namespace mixmoe_cuda_test
