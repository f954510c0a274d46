// Grouped GEMM: every expert's block of rows times that expert's own matrix, in one call.
//
//   a (M, K) rows sorted by expert (a DispatchPlan's x_sorted), E experts,
//   offsets (E + 1) on the tensors' device: expert e owns rows [offsets[e], offsets[e + 1]),
//   b (E, K, N), or (E, N, K) with trans_b (e.g. stacked Linear weights (E, out, in))
//   grouped_matmul(a, b, offsets, trans_b) -> c (M, N), c[rows of e] = a[rows of e] op(b[e])
//   grouped_matmul_bf16: the same with a and b rounded to bf16 (nearest even), products summed in fp32
//
// Rows outside every expert's range are 0 in c. On Cpu: one cpu::gemm per non-empty expert. On a
// device: one kernel (backend/cuda/moe.cuh, cuda::grouped_gemm) that reads the offsets from device
// memory, so it needs no host synchronisation (DispatchPlan::device_offsets); there the offsets are
// the caller's promise (non-decreasing, offsets[E] <= M: rows past M are never touched) because
// checking them would mean reading them back. Not differentiable: a building block for expert code.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "mixmoe/backend/cpu/gemm.hpp"
#include "mixmoe/core/tensor.hpp"

namespace mixmoe {

namespace detail {

/// v rounded to the nearest bf16 (ties to even), as a float; NaN stays NaN.
inline float round_to_bf16(float v) {
  std::uint32_t u = 0;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return v;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float r = 0;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

template <class T, class D>
void check_grouped(const Tensor<T, D>& a, const Tensor<T, D>& b, const Tensor<index_t, D>& offsets, bool trans_b,
                   const char* op) {
  MIXMOE_CHECK(a.dim() == 2 && b.dim() == 3, op, "a must be (M, K) and b (E, K, N) or (E, N, K), got ", a.shape(),
               " and ", b.shape());
  MIXMOE_CHECK((trans_b ? b.size(2) : b.size(1)) == a.size(1), op, "a ", a.shape(), " and b ", b.shape(),
               trans_b ? " (transposed)" : "", " differ in K");
  MIXMOE_CHECK(offsets.dim() == 1 && offsets.size(0) == b.size(0) + 1, op, "offsets must be (E + 1) = (", b.size(0) + 1,
               "), got ", offsets.shape());
}

/// The host path: per expert, cpu::gemm on its rows (offsets read and checked on the host).
template <class T>
void grouped_matmul_host(const T* a, index_t m, index_t k, const T* b, index_t e, index_t n, bool trans_b,
                         const index_t* off, T* c, const char* op) {
  for (index_t x = 0; x < e; ++x) {
    MIXMOE_CHECK(off[x] >= 0 && off[x] <= off[x + 1] && off[x + 1] <= m, op, "offsets[", x, "..", x + 1, "] = ", off[x],
                 "..", off[x + 1], " are not a range of the ", m, " rows");
    const index_t rows = off[x + 1] - off[x];
    if (rows == 0 || n == 0 || k == 0) continue;  // k == 0: the rows stay 0
    cpu::gemm(false, trans_b, rows, n, k, T(1), a + off[x] * k, k, b + x * k * n, trans_b ? k : n, T(0), c + off[x] * n,
              n);
  }
}

}  // namespace detail

/// c (M, N) = per expert e, a[offsets[e]:offsets[e + 1]] op(b[e]); other rows 0.
template <Scalar T, Device D>
Tensor<T, D> grouped_matmul(const Tensor<T, D>& a, const Tensor<T, D>& b, const Tensor<index_t, D>& offsets,
                            bool trans_b = false) {
  const char* op = "grouped_matmul";
  detail::check_grouped(a, b, offsets, trans_b, op);
  const index_t m = a.size(0), k = a.size(1), e = b.size(0), n = trans_b ? b.size(1) : b.size(2);
  const Tensor<T, D> ac = a.contiguous(), bc = b.contiguous();
  const Tensor<index_t, D> oc = offsets.contiguous();
  Tensor<T, D> c = Tensor<T, D>::zeros({m, n});
  if constexpr (!Tensor<T, D>::on_host) {
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::moe_grouped_gemm(m, n, k, e, oc.data(), ac.data(), k, bc.data(), trans_b ? k : n, k * n,
                                           trans_b, c.data(), n, false);
    return c;
  }
  detail::grouped_matmul_host(ac.data(), m, k, bc.data(), e, n, trans_b, oc.data(), c.data(), op);
  return c;
}

/// grouped_matmul with a and b rounded to bf16 and fp32 accumulation (the tensor-core precision).
template <Device D>
Tensor<float, D> grouped_matmul_bf16(const Tensor<float, D>& a, const Tensor<float, D>& b,
                                     const Tensor<index_t, D>& offsets, bool trans_b = false) {
  const char* op = "grouped_matmul_bf16";
  detail::check_grouped(a, b, offsets, trans_b, op);
  const index_t m = a.size(0), k = a.size(1), e = b.size(0), n = trans_b ? b.size(1) : b.size(2);
  const Tensor<float, D> ac = a.contiguous(), bc = b.contiguous();
  const Tensor<index_t, D> oc = offsets.contiguous();
  Tensor<float, D> c = Tensor<float, D>::zeros({m, n});
  if constexpr (!Tensor<float, D>::on_host) {
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::moe_grouped_gemm_bf16(m, n, k, e, oc.data(), ac.data(), ac.numel(), k, bc.data(), bc.numel(),
                                                trans_b ? k : n, k * n, trans_b, c.data(), n, false);
    return c;
  }
  std::vector<float> ar(static_cast<std::size_t>(ac.numel())), br(static_cast<std::size_t>(bc.numel()));
  for (std::size_t i = 0; i < ar.size(); ++i) ar[i] = detail::round_to_bf16(ac.data()[i]);
  for (std::size_t i = 0; i < br.size(); ++i) br[i] = detail::round_to_bf16(bc.data()[i]);
  detail::grouped_matmul_host(ar.data(), m, k, br.data(), e, n, trans_b, oc.data(), c.data(), op);
  return c;
}

}  // namespace mixmoe
