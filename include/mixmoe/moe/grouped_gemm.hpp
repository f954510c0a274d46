// Grouped GEMM: every expert's block of rows times that expert's own matrix, in one call.
//
//   a (M, K) rows sorted by expert (a DispatchPlan's x_sorted), E experts,
//   offsets (E + 1) on the tensors' device: expert e owns rows [offsets[e], offsets[e + 1]),
//   b (E, K, N), or (E, N, K) with trans_b (e.g. stacked Linear weights (E, out, in))
//   grouped_matmul(a, b, offsets, trans_b) -> c (M, N), c[rows of e] = a[rows of e] op(b[e])
//   grouped_matmul_bf16: the same with a and b rounded to bf16 (nearest even), products summed in fp32
//   grouped_linear(x, w, offsets)   the differentiable form for expert code: x (M, K), w (E, N, K)
//                                   (E Linear weights stacked) -> y (M, N), y[rows of e] = x[rows of e] w[e]^T;
//                                   optionally in bf16 (MatmulPrecision::bf16: bf16 operands, fp32 sums)
//   stack_weights(ws)               E Vars of one shape (N, K) -> (E, N, K), differentiable
//
// Rows outside every expert's range are 0 in c (and get no gradient). On Cpu: one cpu::gemm per
// non-empty expert. On a device: one kernel (backend/cuda/moe.cuh, cuda::grouped_gemm; the weight
// gradient cuda::grouped_gemm_wgrad) that reads the offsets from device memory, so it needs no host
// synchronisation (DispatchPlan::device_offsets); there the offsets are the caller's promise
// (non-decreasing, offsets[E] <= M: rows past M are never touched) because checking them would mean
// reading them back. On Cpu they are checked.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/gemm.hpp"
#include "mixmoe/core/bf16.hpp"
#include "mixmoe/core/tensor.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

namespace detail {

/// A rounded-to-bf16 copy of n float values (the host path of the bf16 GEMMs).
inline std::vector<float> bf16_copy(const float* p, index_t n) {
  std::vector<float> out(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = round_to_bf16(p[i]);
  return out;
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

inline void check_host_offsets(const index_t* off, index_t x, index_t m, const char* op) {
  MIXMOE_CHECK(off[x] >= 0 && off[x] <= off[x + 1] && off[x + 1] <= m, op, "offsets[", x, "..", x + 1, "] = ", off[x],
               "..", off[x + 1], " are not a range of the ", m, " rows");
}

/// The host path: per expert, cpu::gemm on its rows (offsets read and checked on the host);
/// c[rows of x] (+)= a[rows of x] op(b[x]).
template <class T>
void grouped_matmul_host(const T* a, index_t m, index_t k, const T* b, index_t e, index_t n, bool trans_b,
                         const index_t* off, T* c, const char* op, bool accumulate = false) {
  for (index_t x = 0; x < e; ++x) {
    check_host_offsets(off, x, m, op);
    const index_t rows = off[x + 1] - off[x];
    if (rows == 0 || n == 0 || k == 0) continue;  // k == 0: the rows stay as they are
    cpu::gemm(false, trans_b, rows, n, k, T(1), a + off[x] * k, k, b + x * k * n, trans_b ? k : n,
              accumulate ? T(1) : T(0), c + off[x] * n, n);
  }
}

/// The weight gradient on the host: dw[x] (n, k) += dy[rows of x]^T a[rows of x], dy (m, n), a (m, k).
template <class T>
void grouped_wgrad_host(const T* dy, const T* a, index_t m, index_t n, index_t k, index_t e, const index_t* off, T* dw,
                        const char* op) {
  for (index_t x = 0; x < e; ++x) {
    check_host_offsets(off, x, m, op);
    const index_t rows = off[x + 1] - off[x];
    if (rows == 0) continue;
    cpu::gemm(true, false, n, k, rows, T(1), dy + off[x] * n, n, a + off[x] * k, k, T(1), dw + x * n * k, k);
  }
}

/// c (m, n) (+)= per expert x: a[rows of x] (m, k) op(b[x]) for contiguous a, b (e, k, n) or (e, n, k)
/// with trans_b, c; on the device D, or on the host through cpu::gemm. bf16 (float only): a and b
/// rounded to bf16, fp32 sums.
template <Scalar T, Device D>
void grouped_gemm_into(index_t m, index_t n, index_t k, index_t e, const index_t* off, const T* a, const T* b,
                       bool trans_b, T* c, bool accumulate, bool bf16, const char* op) {
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        DeviceOps<D>::moe_grouped_gemm_bf16(m, n, k, e, off, a, m * k, k, b, e * k * n, trans_b ? k : n, k * n, trans_b,
                                            c, n, accumulate);
        return;
      }
    }
    DeviceOps<D>::moe_grouped_gemm(m, n, k, e, off, a, k, b, trans_b ? k : n, k * n, trans_b, c, n, accumulate);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        const std::vector<float> a16 = bf16_copy(a, m * k), b16 = bf16_copy(b, e * k * n);
        grouped_matmul_host(a16.data(), m, k, b16.data(), e, n, trans_b, off, c, op, accumulate);
        return;
      }
    }
    grouped_matmul_host(a, m, k, b, e, n, trans_b, off, c, op, accumulate);
  }
}

/// dw (e, n, k) += per expert x: dy[rows of x]^T a[rows of x] for contiguous dy (m, n) and a (m, k); on
/// the device D, or on the host. bf16 (float only): dy and a rounded to bf16, fp32 sums.
template <Scalar T, Device D>
void grouped_wgrad_into(index_t m, index_t n, index_t k, index_t e, const index_t* off, const T* dy, const T* a, T* dw,
                        bool bf16, const char* op) {
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        DeviceOps<D>::moe_grouped_gemm_wgrad_bf16(m, n, k, e, off, dy, a, dw);
        return;
      }
    }
    DeviceOps<D>::moe_grouped_gemm_wgrad(m, n, k, e, off, dy, a, dw);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        const std::vector<float> dy16 = bf16_copy(dy, m * n), a16 = bf16_copy(a, m * k);
        grouped_wgrad_host(dy16.data(), a16.data(), m, n, k, e, off, dw, op);
        return;
      }
    }
    grouped_wgrad_host(dy, a, m, n, k, e, off, dw, op);
  }
}

/// grouped_matmul (bf16: grouped_matmul_bf16), its errors naming `op`.
template <Scalar T, Device D>
Tensor<T, D> grouped_matmul_as(const Tensor<T, D>& a, const Tensor<T, D>& b, const Tensor<index_t, D>& offsets,
                               bool trans_b, bool bf16, const char* op) {
  check_grouped(a, b, offsets, trans_b, op);
  const index_t m = a.size(0), k = a.size(1), e = b.size(0), n = trans_b ? b.size(1) : b.size(2);
  const Tensor<T, D> ac = a.contiguous(), bc = b.contiguous();
  const Tensor<index_t, D> oc = offsets.contiguous();
  Tensor<T, D> c = Tensor<T, D>::zeros({m, n});
  grouped_gemm_into<T, D>(m, n, k, e, oc.data(), ac.data(), bc.data(), trans_b, c.data(), false, bf16, op);
  return c;
}

}  // namespace detail

/// c (M, N) = per expert e, a[offsets[e]:offsets[e + 1]] op(b[e]); other rows 0.
template <Scalar T, Device D>
Tensor<T, D> grouped_matmul(const Tensor<T, D>& a, const Tensor<T, D>& b, const Tensor<index_t, D>& offsets,
                            bool trans_b = false) {
  return detail::grouped_matmul_as(a, b, offsets, trans_b, false, "grouped_matmul");
}

/// grouped_matmul with a and b rounded to bf16 and fp32 accumulation (the tensor-core precision).
template <Device D>
Tensor<float, D> grouped_matmul_bf16(const Tensor<float, D>& a, const Tensor<float, D>& b,
                                     const Tensor<index_t, D>& offsets, bool trans_b = false) {
  return detail::grouped_matmul_as(a, b, offsets, trans_b, true, "grouped_matmul_bf16");
}

/// What expert code needs to run its experts grouped: the row offsets of each expert on the device
/// and the GEMMs' operand precision (moe.expert_precision).
template <Device D>
struct GroupedRows {
  Tensor<index_t, D> offsets;  // (E + 1) expert i owns rows [offsets[i], offsets[i + 1])
  MatmulPrecision precision = MatmulPrecision::native;
};

/// y (M, N) = per expert e, x[offsets[e]:offsets[e + 1]] w[e]^T, for x (M, K) and w (E, N, K) (E Linear
/// weights (out, in) stacked); rows outside every expert's range are 0. Differentiable in x and w:
/// dx[rows of e] = dy[rows of e] w[e], dw[e] = dy[rows of e]^T x[rows of e]. offsets stay on the
/// tensors' device (a DispatchPlan's device_offsets): on a GPU nothing is read back.
/// MatmulPrecision::bf16 (float only): every GEMM of the forward and the backward rounds its two
/// operands to bf16 and accumulates in fp32; x, w, y and the gradients stay float.
template <Scalar T, Device D>
Var<T, D> grouped_linear(const Var<T, D>& x, const Var<T, D>& w, const Tensor<index_t, D>& offsets,
                         MatmulPrecision precision = MatmulPrecision::native) {
  const char* op = "grouped_linear";
  MIXMOE_CHECK(x.defined() && w.defined(), op, "x and w must be defined Vars");
  MIXMOE_CHECK((precision == MatmulPrecision::native || std::is_same_v<T, float>), op,
               "bf16 precision needs float tensors (got ", sizeof(T) * 8, "-bit)");
  detail::check_grouped(x.value(), w.value(), offsets, true, op);
  const index_t m = x.size(0), k = x.size(1), e = w.size(0), n = w.size(1);
  const Tensor<T, D> xv = x.value().contiguous(), wv = w.value().contiguous();
  const Tensor<index_t, D> oc = offsets.contiguous();
  const bool bf16 = precision == MatmulPrecision::bf16;
  Tensor<T, D> y = detail::grouped_matmul_as(xv, wv, oc, true, bf16, op);  // (M, N)
  return record(op, std::move(y), {x, w}, [xv, wv, oc, m, n, k, e, op, bf16](autograd::BackwardContext<T, D>& ctx) {
    const T* dy = ctx.grad_out().data();  // (M, N)
    if (ctx.needs_grad(0))  // dx (M, K) += dy[rows of e] w[e]: w[e] as (N, K) untransposed
      detail::grouped_gemm_into<T, D>(m, k, n, e, oc.data(), dy, wv.data(), false, ctx.grad_in(0).data(), true, bf16,
                                      op);
    if (ctx.needs_grad(1))  // dw[e] += dy[rows of e]^T x[rows of e]
      detail::grouped_wgrad_into<T, D>(m, n, k, e, oc.data(), dy, xv.data(), ctx.grad_in(1).data(), bf16, op);
  });
}

/// grouped_linear over a GroupedRows (its offsets and precision): what GroupedExpert code calls.
template <Scalar T, Device D>
Var<T, D> grouped_linear(const Var<T, D>& x, const Var<T, D>& w, const GroupedRows<D>& rows) {
  return grouped_linear(x, w, rows.offsets, rows.precision);
}

/// grouped_linear on bf16 x and w (bf16 storage): the bf16 grouped GEMMs with fp32 accumulation (on
/// fp32 copies of the operands that live for one call), the result and the gradients rounded to bf16.
/// A GroupedRows' precision is bf16 here whatever it says.
template <Device D>
Var<bf16, D> grouped_linear(const Var<bf16, D>& x, const Var<bf16, D>& w, const Tensor<index_t, D>& offsets) {
  const char* op = "grouped_linear";
  MIXMOE_CHECK(x.defined() && w.defined(), op, "x and w must be defined Vars");
  detail::check_grouped(x.value(), w.value(), offsets, true, op);
  const index_t m = x.size(0), k = x.size(1), e = w.size(0), n = w.size(1);
  const Tensor<bf16, D> xv = x.value().contiguous(), wv = w.value().contiguous();
  const Tensor<index_t, D> oc = offsets.contiguous();
  const Tensor<float, D> y = detail::grouped_matmul_as(xv.template to<float>(), wv.template to<float>(), oc, true, true, op);
  return record(op, y.template to<bf16>(), {x, w}, [xv, wv, oc, m, n, k, e, op](autograd::BackwardContext<bf16, D>& ctx) {
    const Tensor<float, D> dy = ctx.grad_out().template to<float>();  // (M, N)
    if (ctx.needs_grad(0)) {  // dx (M, K) = dy[rows of e] w[e]
      const Tensor<float, D> wf = wv.template to<float>();
      Tensor<float, D> dx = Tensor<float, D>::zeros({m, k});
      detail::grouped_gemm_into<float, D>(m, k, n, e, oc.data(), dy.data(), wf.data(), false, dx.data(), true, true, op);
      ctx.accumulate(0, dx.template to<bf16>());
    }
    if (ctx.needs_grad(1)) {  // dw[e] = dy[rows of e]^T x[rows of e]
      const Tensor<float, D> xf = xv.template to<float>();
      Tensor<float, D> dw = Tensor<float, D>::zeros({e, n, k});
      detail::grouped_wgrad_into<float, D>(m, n, k, e, oc.data(), dy.data(), xf.data(), dw.data(), true, op);
      ctx.accumulate(1, dw.template to<bf16>());
    }
  });
}

template <Device D>
Var<bf16, D> grouped_linear(const Var<bf16, D>& x, const Var<bf16, D>& w, const GroupedRows<D>& rows) {
  return grouped_linear(x, w, rows.offsets);
}

namespace detail {

/// The shape (E, S...) of E weights of one shape S; errors name the odd one out.
template <Floating T, Device D>
Shape stacked_shape(std::span<const Var<T, D>> ws) {
  MIXMOE_CHECK(!ws.empty(), "stack_weights", "needs at least one weight");
  const Shape& s = ws.front().shape();
  for (std::size_t i = 1; i < ws.size(); ++i)
    MIXMOE_CHECK(ws[i].shape() == s, "stack_weights", "weight ", i, " has shape ", ws[i].shape(), ", weight 0 has ", s,
                 ": grouped experts need experts of one size");
  MIXMOE_CHECK(s.rank() >= 1 && s.rank() < kMaxDims, "stack_weights", "weights of shape ", s,
               " cannot be stacked (rank 1 to ", kMaxDims - 1, ")");
  index_t dims[kMaxDims] = {static_cast<index_t>(ws.size())};
  for (int d = 0; d < s.rank(); ++d) dims[d + 1] = s[d];
  return Shape(std::span<const index_t>(dims, static_cast<std::size_t>(s.rank()) + 1));
}

}  // namespace detail

/// E fp32 weights of one shape S -> a bf16 (E, S...) stack in one op (the experts' weights for the
/// bf16 grouped GEMMs): neither an fp32 stack nor bf16 copies of the single weights are kept; the
/// gradient of weight i is slice i of the stack's gradient, widened to fp32.
template <Device D>
Var<bf16, D> stack_weights_bf16(std::span<const Var<float, D>> ws) {
  const Shape shape = detail::stacked_shape(ws);
  Tensor<bf16, D> out = Tensor<bf16, D>::empty(shape);
  std::vector<AnyVar<D>> inputs;
  inputs.reserve(ws.size());
  for (std::size_t i = 0; i < ws.size(); ++i) {
    out[static_cast<index_t>(i)].copy_from(ws[i].value().template to<bf16>());
    inputs.emplace_back(ws[i]);
  }
  return record_mixed("stack_weights", std::move(out), std::span<const AnyVar<D>>(inputs),
                      [e = ws.size()](autograd::MixedBackwardContext<bf16, D>& ctx) {
                        for (std::size_t i = 0; i < e; ++i)
                          if (ctx.needs_grad(i))
                            ctx.template accumulate<float>(i, ctx.grad_out()[static_cast<index_t>(i)].template to<float>());
                      });
}

/// E Vars of one shape S -> (E, S...): the experts' weights side by side for grouped_linear (a copy;
/// the gradient flows back to each weight). One Var is reshaped, not copied.
template <Scalar T, Device D>
Var<T, D> stack_weights(std::span<const Var<T, D>> ws) {
  const Shape out = detail::stacked_shape(ws);
  return reshape(ws.size() == 1 ? ws.front() : concat(ws, 0), out);
}

}  // namespace mixmoe
