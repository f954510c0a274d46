// Matrix products: matmul (2-D, or batched N-D with broadcast batch axes), and
// linear (x W^T + b, the layer form that avoids a transpose copy).
//
//   matmul: a (..., M, K) x b (..., K, N) -> (..., M, N)
//   linear: x (..., K) x w (N, K) [+ bias (N)] -> (..., N)
#pragma once

#include <algorithm>
#include <array>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/gemm.hpp"
#include "mixmoe/ops/elementwise.hpp"

namespace mixmoe {

namespace detail {

/// Row-major GEMM on device D's memory: cpu::gemm on the host, the device's GEMM otherwise.
template <class D, class T>
void gemm_on(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
             index_t ldb, T beta, T* c, index_t ldc) {
  if constexpr (is_host_device<D>) {
    cpu::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    require_device_ops<D>();
    DeviceOps<D>::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

/// c[b] (+)= op(a[b]) * op(b[b]) for each batch b; batch shapes already broadcast.
/// a: (Ba, M, K) or (Ba, K, M) if ta; b: (Bb, K, N) or (Bb, N, K) if tb; Ba, Bb in {1, B}.
template <class D, class T>
void batched_gemm(index_t batch, bool ta, bool tb, index_t m, index_t n, index_t k, const T* a, index_t a_batch_stride,
                  const T* b, index_t b_batch_stride, T beta, T* c) {
  const index_t lda = ta ? m : k, ldb = tb ? k : n;
  for (index_t i = 0; i < batch; ++i)
    gemm_on<D>(ta, tb, m, n, k, T(1), a + i * a_batch_stride, lda, b + i * b_batch_stride, ldb, beta, c + i * m * n, n);
}

/// Checks linear(x, w, bias)'s operands; returns {K, N, rows of x}.
template <class X, class W, class D>
std::array<index_t, 3> linear_sizes(const Var<X, D>& x, const Var<W, D>& w, const Var<W, D>& bias) {
  MIXMOE_CHECK(x.defined() && w.defined(), "linear", "x and w must be defined Vars");
  MIXMOE_CHECK(w.dim() == 2, "linear", "weight must be (out, in), got ", w.shape());
  MIXMOE_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear", "input ", x.shape(), " does not match weight ", w.shape());
  const index_t k = w.size(1), n = w.size(0);
  if (bias.defined())
    MIXMOE_CHECK(bias.dim() == 1 && bias.size(0) == n, "linear", "bias ", bias.shape(), " for weight ", w.shape());
  return {k, n, x.numel() / std::max<index_t>(k, 1)};
}

/// out (n) += the column sums of g (rows, n), both contiguous on device D (a bias's gradient).
template <class D, class T>
void add_column_sums(T* out, const T* g, index_t rows, index_t n) {
  if constexpr (is_host_device<D>) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < n; ++j) out[j] += g[r * n + j];
  } else {
    DeviceOps<D>::add_column_sums(out, g, rows, n);
  }
}

/// Every row of out (rows, n), contiguous, = b (n), contiguous.
template <class T, class D>
void fill_rows(const Tensor<T, D>& out, const Tensor<T, D>& b, index_t rows, index_t n) {
  if constexpr (Tensor<T, D>::on_host) {
    for (index_t r = 0; r < rows; ++r) std::copy(b.data(), b.data() + n, out.data() + r * n);
  } else {  // a copy from a view of b with a 0 stride on the rows
    DeviceBackend<D>::copy(b.data(), Shape{0, 1}, out.data(), Shape{n, 1}, Shape{rows, n});
  }
}

/// The sizes of matmul(a, b): batch count, output shape, M, N, K and the operands' batch strides
/// (0 for an operand broadcast over the batch).
struct MatmulSizes {
  Shape out;
  index_t m = 0, n = 0, k = 0, batch = 0, a_stride = 0, b_stride = 0;
};

inline MatmulSizes matmul_sizes(const Shape& as, const Shape& bs) {
  MIXMOE_CHECK(as.rank() >= 2 && bs.rank() >= 2, "matmul", "needs at least 2-D operands, got ", as, " and ", bs);
  MatmulSizes z;
  z.m = as[as.rank() - 2];
  z.k = as[as.rank() - 1];
  z.n = bs[bs.rank() - 1];
  MIXMOE_CHECK(bs[bs.rank() - 2] == z.k, "matmul", "inner dimensions differ: ", as, " x ", bs);
  const Shape ba(std::span<const index_t>(as.begin(), as.end() - 2));
  const Shape bb(std::span<const index_t>(bs.begin(), bs.end() - 2));
  const Shape batch = broadcast_shapes(ba, bb, "matmul");
  z.batch = batch.numel();
  // Batch broadcasting is supported when an operand has all batch axes or none (or all 1).
  MIXMOE_CHECK(ba.numel() == z.batch || ba.numel() == 1, "matmul", "batch axes of ", as, " and ", bs,
               " broadcast only partially; expand one operand first");
  MIXMOE_CHECK(bb.numel() == z.batch || bb.numel() == 1, "matmul", "batch axes of ", as, " and ", bs,
               " broadcast only partially; expand one operand first");
  z.out = batch;
  z.out.push_back(z.m);
  z.out.push_back(z.n);
  z.a_stride = ba.numel() == 1 ? 0 : z.m * z.k;
  z.b_stride = bb.numel() == 1 ? 0 : z.k * z.n;
  return z;
}

}  // namespace detail

/// a (M, K) x b (K, N), or batched (..., M, K) x (..., K, N) with broadcast batch axes.
template <Scalar T, Device D>
Var<T, D> matmul(const Var<T, D>& a, const Var<T, D>& b) {
  const detail::MatmulSizes z = detail::matmul_sizes(a.shape(), b.shape());
  const index_t m = z.m, n = z.n, k = z.k, nb = z.batch, sa = z.a_stride, sb = z.b_stride;
  const Shape& oshape = z.out;
  const Tensor<T, D> av = a.value().contiguous(), bv = b.value().contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(oshape);
  detail::batched_gemm<D>(nb, false, false, m, n, k, av.data(), sa, bv.data(), sb, T(0), out.data());
  return record("matmul", std::move(out), {a, b}, [av, bv, m, n, k, nb, sa, sb](autograd::BackwardContext<T, D>& ctx) {
    const T* g = ctx.grad_out().data();
    if (ctx.needs_grad(0)) {  // dA = dC B^T, summed over broadcast batches
      T* ga = ctx.grad_in(0).data();
      for (index_t i = 0; i < nb; ++i)
        detail::gemm_on<D>(false, true, m, k, n, T(1), g + i * m * n, n, bv.data() + i * sb, n, T(1), ga + (sa ? i * sa : 0), k);
    }
    if (ctx.needs_grad(1)) {  // dB = A^T dC
      T* gb = ctx.grad_in(1).data();
      for (index_t i = 0; i < nb; ++i)
        detail::gemm_on<D>(true, false, k, n, m, T(1), av.data() + i * sa, k, g + i * m * n, n, T(1), gb + (sb ? i * sb : 0), n);
    }
  });
}

/// x (..., K) W^T with w (N, K), plus bias (N) when given: the Linear layer's op.
template <Scalar T, Device D>
Var<T, D> linear(const Var<T, D>& x, const Var<T, D>& w, const Var<T, D>& bias = Var<T, D>()) {
  const std::array<index_t, 3> sizes = detail::linear_sizes(x, w, bias);  // not a structured binding: captured below
  const index_t k = sizes[0], n = sizes[1], rows = sizes[2];
  const Tensor<T, D> xv = x.value().contiguous(), wv = w.value().contiguous();
  Shape oshape = x.shape().with(-1, n);
  Tensor<T, D> out = Tensor<T, D>::empty(oshape);
  if (bias.defined()) detail::fill_rows(out, bias.value().contiguous(), rows, n);
  detail::gemm_on<D>(false, true, rows, n, k, T(1), xv.data(), k, wv.data(), k, bias.defined() ? T(1) : T(0), out.data(), n);
  return record("linear", std::move(out), {x, w, bias}, [xv, wv, rows, n, k](autograd::BackwardContext<T, D>& ctx) {
    const T* g = ctx.grad_out().data();
    if (ctx.needs_grad(0))
      detail::gemm_on<D>(false, false, rows, k, n, T(1), g, n, wv.data(), k, T(1), ctx.grad_in(0).data(), k);
    if (ctx.needs_grad(1))
      detail::gemm_on<D>(true, false, n, k, rows, T(1), g, n, xv.data(), k, T(1), ctx.grad_in(1).data(), k);
    if (ctx.needs_grad(2)) detail::add_column_sums<D>(ctx.grad_in(2).data(), g, rows, n);
  });
}

}  // namespace mixmoe
