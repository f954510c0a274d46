// The CPU backend's results for the GPU tests, computed in a plain C++ translation unit
// (cpu_reference.cpp, compiled by the host compiler with the CPU ops and their autograd), so
// that the CUDA translation unit compares against the library's own CPU ops, not a copy.
#pragma once

#include <cstdint>
#include <vector>

namespace mixmoe_cuda_test {

using Vec = std::vector<float>;

/// C (m x n) = op(A) op(B) with cpu::gemm.
Vec cpu_matmul(const Vec& a, const Vec& b, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a, bool trans_b);

/// Forward y of an op on x (rows x cols) and dL/d(inputs) for L = sum(y * g), through Var.
struct Grads {
  Vec y, dx, dw;
};
Grads cpu_softmax(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols);
Grads cpu_rms_norm(const Vec& x, const Vec& w, const Vec& g, std::int64_t rows, std::int64_t cols, double eps);
Grads cpu_silu(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols);
/// y = rfft_magnitude(x, eps) over the last axis, g of y's shape (rows x (cols/2 + 1)).
Grads cpu_rfft_magnitude(const Vec& x, const Vec& g, std::int64_t rows, std::int64_t cols, double eps);
/// y = a * b with b a row (cols) broadcast over the rows: dx = dL/da, dw = dL/db.
Grads cpu_mul_row(const Vec& a, const Vec& b, const Vec& g, std::int64_t rows, std::int64_t cols);

/// y = linear(x (rows, k), w (n, k), b (n)); y.backward(g): dx, dw and db (in `extra`).
struct LinearGrads {
  Vec y, dx, dw, db;
};
LinearGrads cpu_linear(const Vec& x, const Vec& w, const Vec& b, const Vec& g, std::int64_t rows, std::int64_t n,
                       std::int64_t k);
/// y = matmul(a (batch, m, k), b (k, n)) with b broadcast over the batch; y.backward(g): da, db.
Grads cpu_matmul_broadcast(const Vec& a, const Vec& b, const Vec& g, std::int64_t batch, std::int64_t m, std::int64_t n,
                           std::int64_t k);

}  // namespace mixmoe_cuda_test
