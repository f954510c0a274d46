// Row-major GEMM for the CPU: C = alpha * op(A) * op(B) + beta * C.
//
// With MIXMOE_USE_BLAS (the default CMake configuration) the call goes to CBLAS
// (OpenBLAS on Debian), which the benchmark measures faster than Eigen's own GEMM
// on this class of machine; without it, Eigen's GEMM is used. Both paths are tested.
#pragma once

#include <Eigen/Core>

#include "mixmoe/core/shape.hpp"

#ifdef MIXMOE_USE_BLAS
#include <cblas.h>
#endif

namespace mixmoe::cpu {

/// Name of the GEMM implementation compiled in ("cblas" or "eigen").
inline const char* gemm_backend() {
#ifdef MIXMOE_USE_BLAS
  return "cblas";
#else
  return "eigen";
#endif
}

/// Eigen's GEMM, always available (also the reference for the BLAS path in tests).
template <class T>
void gemm_eigen(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                index_t ldb, T beta, T* c, index_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
  MMap cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == T(0))
    cm.setZero();
  else if (beta != T(1))
    cm *= beta;
  if (k == 0) return;
  const CMap am(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
  const CMap bm(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
  if (!trans_a && !trans_b) cm.noalias() += alpha * am * bm;
  else if (trans_a && !trans_b) cm.noalias() += alpha * am.transpose() * bm;
  else if (!trans_a && trans_b) cm.noalias() += alpha * am * bm.transpose();
  else cm.noalias() += alpha * am.transpose() * bm.transpose();
}

/// C (m x n, leading dim ldc) = alpha * op(A) * op(B) + beta * C, row-major;
/// op(A) is m x k, op(B) is k x n.
template <class T>
void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b, index_t ldb,
          T beta, T* c, index_t ldc) {
  if (m == 0 || n == 0) return;
#ifdef MIXMOE_USE_BLAS
  if (k == 0) {  // BLAS leaves C untouched only when beta == 1; make k == 0 mean "scale C"
    gemm_eigen(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  const auto im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, im, in, ik, alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
                static_cast<int>(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, im, in, ik, alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
                static_cast<int>(ldc));
#else
  gemm_eigen(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

}  // namespace mixmoe::cpu
