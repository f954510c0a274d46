// bf16 storage with fp32 compute: Var<bf16, D> values and gradients are stored in bf16
// (half the memory of float), and every op on them widens its operands to fp32, computes
// in fp32 and rounds its result to bf16 (nearest even).
//
//   cast<U>(x)                 float/double <-> bf16, differentiable (the gradient converts back)
//   matmul(a, b), linear(x, w[, bias])
//                              bf16 operands, fp32 accumulation, bf16 result: on a GPU one
//                              cuBLAS GEMM on the tensor cores (cublasGemmEx, bf16 in, fp32 out,
//                              then rounded); on the CPU the operands widened to fp32 (exact)
//                              and an fp32 GEMM, which is the same arithmetic
//   rms_norm, layer_norm, causal_attention, rope, add, mul, silu, gelu, operators + and *
//                              through via_fp32 (below)
//   reshape, transpose, permute, slice, concat (ops/shape_ops.hpp) take bf16 Vars as they are
//   grouped_linear (moe/grouped_gemm.hpp) has a bf16 form too (the bf16 grouped GEMMs, no recomputation)
//
// via_fp32(op, f, x...) makes any fp32 op a bf16 op: the forward runs f on fp32 copies of the
// bf16 inputs (without recording a graph) and stores the rounded result; the backward widens
// the saved bf16 inputs again, re-runs f with recording on, backpropagates the widened
// output gradient through it and rounds the input gradients to bf16. Nothing fp32 outlives the
// op: between forward and backward only the bf16 inputs are kept, as activation
// recomputation (checkpointing) keeps them. The price is one more forward of f in the
// backward, cheap for the norms and the elementwise ops; causal_attention's fused backward
// recomputes its probabilities anyway. f must be deterministic (no dropout) and pure.
//
// The mixed-precision pattern: keep fp32 master weights, cast them to bf16 where they are
// used (the gradient flows back through cast to the fp32 weight, where the optimizer steps
// in fp32), run the model's activations in bf16, and cast the logits to fp32 for the loss.
//
// Precision: a bf16 value has 8 significant bits (relative spacing 2^-8 to 2^-7), so results
// differ from fp32 by up to about 0.4 % of their magnitude per rounding; a gradient
// accumulated from several uses is summed in bf16 (as PyTorch does for bf16 tensors).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/gemm.hpp"
#include "mixmoe/core/bf16.hpp"
#include "mixmoe/ops/attention.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/matmul.hpp"
#include "mixmoe/ops/norm.hpp"
#include "mixmoe/ops/rope.hpp"
#include "mixmoe/ops/unary.hpp"

namespace mixmoe {

/// x converted to the floating type U (rounded to nearest even when U is narrower); differentiable:
/// the gradient is converted back to x's type. cast<T>(x) of a Var<T> is x itself.
template <Floating U, Floating T, Device D>
Var<U, D> cast(const Var<T, D>& x) {
  MIXMOE_CHECK(x.defined(), "cast", "the input is an undefined Var");
  if constexpr (std::is_same_v<U, T>) {
    return x;
  } else {
    return record_mixed("cast", x.value().template to<U>(), {x}, [](autograd::MixedBackwardContext<U, D>& ctx) {
      ctx.template accumulate<T>(0, ctx.grad_out().template to<T>());
    });
  }
}

namespace detail {

/// An fp32 leaf holding x's value widened (undefined for an undefined x).
template <Device D>
Var<float, D> widened(const Tensor<bf16, D>& x, bool requires_grad) {
  return x.defined() ? Var<float, D>(x.template to<float>(), requires_grad) : Var<float, D>();
}

template <Device D>
Tensor<bf16, D> value_or_empty(const Var<bf16, D>& x) {
  return x.defined() ? x.value() : Tensor<bf16, D>();
}

}  // namespace detail

/// The fp32 op f (Var<float, D>... -> Var<float, D>) as an op on bf16 Vars: f runs in fp32 on the
/// widened inputs and the result is rounded to bf16; the backward recomputes f (see the top of
/// this file). Undefined inputs reach f as undefined Vars (optional weights). op names the node.
template <class F, Device D, class... X>
  requires(std::is_same_v<X, Var<bf16, D>> && ...)
Var<bf16, D> via_fp32(const char* op, F f, const Var<bf16, D>& x0, const X&... xs) {
  static_assert(
      std::is_same_v<std::invoke_result_t<F&, const Var<float, D>&, std::conditional_t<true, const Var<float, D>&, X>...>,
                     Var<float, D>>,
      "via_fp32: f must take the inputs as Var<float, D> and return a Var<float, D>");
  constexpr std::size_t n = 1 + sizeof...(X);
  Tensor<bf16, D> out;
  {
    no_grad ng;
    out = f(detail::widened(detail::value_or_empty(x0), false), detail::widened(detail::value_or_empty(xs), false)...)
              .value()
              .template to<bf16>();
  }
  const std::array<Var<bf16, D>, n> ins{x0, xs...};
  std::array<Tensor<bf16, D>, n> saved{detail::value_or_empty(x0), detail::value_or_empty(xs)...};
  return record(op, std::move(out), std::span<const Var<bf16, D>>(ins),
                [f, saved = std::move(saved)](autograd::BackwardContext<bf16, D>& ctx) {
                  enable_grad on;
                  std::array<Var<float, D>, n> leaves;
                  for (std::size_t i = 0; i < n; ++i) leaves[i] = detail::widened(saved[i], ctx.needs_grad(i));
                  const Var<float, D> y = std::apply(f, leaves);
                  if (!y.requires_grad()) return;
                  y.backward(ctx.grad_out().template to<float>());
                  for (std::size_t i = 0; i < n; ++i)
                    if (ctx.needs_grad(i) && leaves[i].grad().defined())
                      ctx.accumulate(i, leaves[i].grad().template to<bf16>());
                });
}

namespace detail {

/// A bf16 matrix as a GEMM reads it: the bf16 values on a device (the tensor cores read bf16),
/// widened to fp32 on the host (exact), where the GEMM is an fp32 one.
template <Device D>
class GemmOperand {
 public:
  explicit GemmOperand(const Tensor<bf16, D>& t) {
    if constexpr (is_host_device<D>)
      wide_ = t.template to<float>();
    else
      narrow_ = t.contiguous();
  }
  [[nodiscard]] const float* wide() const { return wide_.data(); }
  [[nodiscard]] const bf16* narrow() const { return narrow_.data(); }

 private:
  Tensor<float, D> wide_;
  Tensor<bf16, D> narrow_;
};

/// c (fp32) = op(a) op(b) + beta c, a and b bf16 read at element offsets ao and bo.
template <Device D>
void gemm_bf16_on(bool ta, bool tb, index_t m, index_t n, index_t k, const GemmOperand<D>& a, index_t ao, index_t lda,
                  const GemmOperand<D>& b, index_t bo, index_t ldb, float beta, float* c, index_t ldc) {
  if constexpr (is_host_device<D>) {
    cpu::gemm(ta, tb, m, n, k, 1.0f, a.wide() + ao, lda, b.wide() + bo, ldb, beta, c, ldc);
  } else {
    require_device_ops<D>();
    DeviceOps<D>::gemm_bf16(ta, tb, m, n, k, a.narrow() + ao, lda, b.narrow() + bo, ldb, beta, c, ldc);
  }
}

}  // namespace detail

/// a (..., M, K) x b (..., K, N) in bf16 (broadcast batch axes as matmul's): fp32 accumulation,
/// the result rounded to bf16.
template <Device D>
Var<bf16, D> matmul(const Var<bf16, D>& a, const Var<bf16, D>& b) {
  const detail::MatmulSizes z = detail::matmul_sizes(a.shape(), b.shape());
  const index_t m = z.m, n = z.n, k = z.k, nb = z.batch, sa = z.a_stride, sb = z.b_stride;
  const Tensor<bf16, D> av = a.value().contiguous(), bv = b.value().contiguous();
  Tensor<float, D> acc = Tensor<float, D>::empty(z.out);
  {
    const detail::GemmOperand<D> ga(av), gb(bv);
    for (index_t i = 0; i < nb; ++i)
      detail::gemm_bf16_on<D>(false, false, m, n, k, ga, i * sa, k, gb, i * sb, n, 0.0f, acc.data() + i * m * n, n);
  }
  return record("matmul", acc.template to<bf16>(), {a, b},
                [av, bv, m, n, k, nb, sa, sb](autograd::BackwardContext<bf16, D>& ctx) {
                  const detail::GemmOperand<D> g(ctx.grad_out());
                  if (ctx.needs_grad(0)) {  // dA = dC B^T, summed over broadcast batches
                    const detail::GemmOperand<D> gb(bv);
                    Tensor<float, D> da = Tensor<float, D>::zeros(av.shape());
                    for (index_t i = 0; i < nb; ++i)
                      detail::gemm_bf16_on<D>(false, true, m, k, n, g, i * m * n, n, gb, i * sb, n, 1.0f,
                                              da.data() + (sa ? i * sa : 0), k);
                    ctx.accumulate(0, da.template to<bf16>());
                  }
                  if (ctx.needs_grad(1)) {  // dB = A^T dC
                    const detail::GemmOperand<D> ga(av);
                    Tensor<float, D> db = Tensor<float, D>::zeros(bv.shape());
                    for (index_t i = 0; i < nb; ++i)
                      detail::gemm_bf16_on<D>(true, false, k, n, m, ga, i * sa, k, g, i * m * n, n, 1.0f,
                                              db.data() + (sb ? i * sb : 0), n);
                    ctx.accumulate(1, db.template to<bf16>());
                  }
                });
}

namespace detail {

/// A weight as the bf16 GEMMs read it: bf16 as it is, an fp32 master rounded (a copy for one call).
template <Floating W, Device D>
Tensor<bf16, D> as_bf16(const Tensor<W, D>& w) {
  if constexpr (std::is_same_v<W, bf16>)
    return w.contiguous();
  else
    return w.template to<bf16>();
}

/// linear on bf16 x with weights of type W (bf16, or fp32 masters rounded for the GEMM: no bf16
/// copy of them is kept, and their gradients are accumulated in fp32 without rounding), the result
/// of type Out (bf16, or fp32 for logits). fp32 accumulation, the bias added in fp32.
template <Floating Out, Floating W, Device D>
Var<Out, D> linear_bf16(const Var<bf16, D>& x, const Var<W, D>& w, const Var<W, D>& bias) {
  const std::array<index_t, 3> sizes = linear_sizes(x, w, bias);  // not a structured binding: captured below
  const index_t k = sizes[0], n = sizes[1], rows = sizes[2];
  const Tensor<bf16, D> xv = x.value().contiguous();
  const Tensor<W, D> wv = w.value();  // shared, not copied: an fp32 master is rounded again in the backward
  Tensor<float, D> acc = Tensor<float, D>::empty(Shape{rows, n});
  if (bias.defined()) fill_rows(acc, bias.value().template to<float>(), rows, n);  // rows start as the bias
  {
    const GemmOperand<D> gx(xv), gw(as_bf16(wv));
    gemm_bf16_on<D>(false, true, rows, n, k, gx, 0, k, gw, 0, k, bias.defined() ? 1.0f : 0.0f, acc.data(), n);
  }
  const Shape oshape = x.shape().with(-1, n);
  Tensor<Out, D> out;
  if constexpr (std::is_same_v<Out, float>)
    out = acc.reshape(oshape);
  else
    out = acc.template to<bf16>().reshape(oshape);
  // the weight's gradient in its own type: fp32 masters get the fp32 sums
  const auto to_w = [](Tensor<float, D> t) {
    if constexpr (std::is_same_v<W, float>)
      return t;
    else
      return t.template to<W>();
  };
  return record_mixed("linear", std::move(out), {x, w, bias},
                      [xv, wv, rows, n, k, to_w](autograd::MixedBackwardContext<Out, D>& ctx) {
                        const Tensor<bf16, D> g16 = as_bf16(ctx.grad_out());  // the tensor cores read bf16
                        const GemmOperand<D> g(g16);
                        if (ctx.needs_grad(0)) {  // dx (rows, K) = dy (rows, N) w (N, K)
                          const GemmOperand<D> gw(as_bf16(wv));
                          Tensor<float, D> dx = Tensor<float, D>::empty(Shape{rows, k});
                          gemm_bf16_on<D>(false, false, rows, k, n, g, 0, n, gw, 0, k, 0.0f, dx.data(), k);
                          ctx.template accumulate<bf16>(0, dx.template to<bf16>().reshape(xv.shape()));
                        }
                        if (ctx.needs_grad(1)) {  // dw (N, K) = dy^T x
                          const GemmOperand<D> gx(xv);
                          Tensor<float, D> dw = Tensor<float, D>::empty(Shape{n, k});
                          gemm_bf16_on<D>(true, false, n, k, rows, g, 0, n, gx, 0, k, 0.0f, dw.data(), k);
                          ctx.template accumulate<W>(1, to_w(std::move(dw)));
                        }
                        if (ctx.needs_grad(2)) {  // dbias = column sums of dy, in fp32
                          const Tensor<float, D> gy = ctx.grad_out().template to<float>().reshape(Shape{rows, n});
                          Tensor<float, D> db = Tensor<float, D>::zeros(Shape{n});
                          add_column_sums<D>(db.data(), gy.data(), rows, n);
                          ctx.template accumulate<W>(2, to_w(std::move(db)));
                        }
                      });
}

}  // namespace detail

/// x (..., K) w^T with w (N, K), plus bias (N) when given, in bf16: fp32 accumulation (the bias
/// added in fp32), the result rounded to bf16.
template <Device D>
Var<bf16, D> linear(const Var<bf16, D>& x, const Var<bf16, D>& w, const Var<bf16, D>& bias = Var<bf16, D>()) {
  return detail::linear_bf16<bf16>(x, w, bias);
}

/// linear of bf16 x with fp32 (master) weights: the weights rounded to bf16 for the GEMM only (no
/// bf16 copy is kept for the backward), their gradients accumulated in fp32; bf16 result.
template <Device D>
Var<bf16, D> linear(const Var<bf16, D>& x, const Var<float, D>& w, const Var<float, D>& bias = Var<float, D>()) {
  return detail::linear_bf16<bf16>(x, w, bias);
}

/// linear of bf16 x with an fp32 result (no bf16 rounding of it): logits for an fp32 loss without a
/// bf16 copy of them. w and bias fp32 masters or bf16.
template <Floating W, Device D>
Var<float, D> linear_fp32_out(const Var<bf16, D>& x, const Var<W, D>& w, const Var<W, D>& bias = Var<W, D>()) {
  return detail::linear_bf16<float>(x, w, bias);
}

/// a (fp32) + b (bf16, broadcast as add's): fp32 result, b widened for the sum only (no fp32 copy of
/// it is kept), its gradient rounded to bf16. The residual add of a block with bf16 sublayers.
template <Device D>
Var<float, D> add(const Var<float, D>& a, const Var<bf16, D>& b) {
  MIXMOE_CHECK(a.defined() && b.defined(), "add", "both operands must be defined Vars");
  Tensor<float, D> out;
  {
    no_grad ng;
    out = add(Var<float, D>(a.value()), Var<float, D>(b.value().template to<float>())).value();
  }
  return record_mixed("add", std::move(out), {a, b},
                      [as = a.shape(), bs = b.shape()](autograd::MixedBackwardContext<float, D>& ctx) {
                        // the gradient of a broadcast operand is the output gradient summed to its shape
                        if (ctx.needs_grad(0)) ctx.template accumulate<float>(0, detail::sum_to_shape(ctx.grad_out(), as));
                        if (ctx.needs_grad(1))
                          ctx.template accumulate<bf16>(1, detail::sum_to_shape(ctx.grad_out(), bs).template to<bf16>());
                      });
}

/// RMSNorm of a bf16 x (fp32 statistics and arithmetic, bf16 result); weight optional.
template <Device D>
Var<bf16, D> rms_norm(const Var<bf16, D>& x, const Var<bf16, D>& weight = Var<bf16, D>(), double eps = 1e-6) {
  return via_fp32(
      "rms_norm", [eps](const Var<float, D>& a, const Var<float, D>& w) { return rms_norm(a, w, eps); }, x, weight);
}

/// LayerNorm of a bf16 x (fp32 statistics and arithmetic, bf16 result); weight and bias optional.
template <Device D>
Var<bf16, D> layer_norm(const Var<bf16, D>& x, const Var<bf16, D>& weight = Var<bf16, D>(),
                        const Var<bf16, D>& bias = Var<bf16, D>(), double eps = 1e-5) {
  return via_fp32(
      "layer_norm",
      [eps](const Var<float, D>& a, const Var<float, D>& w, const Var<float, D>& b) { return layer_norm(a, w, b, eps); },
      x, weight, bias);
}

/// Causal attention on bf16 q, k, v (the fused fp32 kernel on the widened inputs; bf16 result).
template <Device D>
Var<bf16, D> causal_attention(const Var<bf16, D>& q, const Var<bf16, D>& k, const Var<bf16, D>& v,
                              std::optional<double> scale = std::nullopt) {
  return via_fp32(
      "causal_attention",
      [scale](const Var<float, D>& a, const Var<float, D>& b, const Var<float, D>& c) {
        return causal_attention(a, b, c, scale);
      },
      q, k, v);
}

/// Rotary positions on a bf16 x (B, T, H, Dh): the fp32 rotation, bf16 result.
template <Device D>
Var<bf16, D> rope(const Var<bf16, D>& x, index_t position_offset = 0, double theta = 10000.0) {
  return via_fp32(
      "rope", [position_offset, theta](const Var<float, D>& a) { return rope(a, position_offset, theta); }, x);
}

/// a + b, a * b (broadcasting as the fp32 ops), silu and gelu on bf16 Vars, computed in fp32.
template <Device D>
Var<bf16, D> add(const Var<bf16, D>& a, const Var<bf16, D>& b) {
  return via_fp32("add", [](const Var<float, D>& x, const Var<float, D>& y) { return add(x, y); }, a, b);
}
template <Device D>
Var<bf16, D> mul(const Var<bf16, D>& a, const Var<bf16, D>& b) {
  return via_fp32("mul", [](const Var<float, D>& x, const Var<float, D>& y) { return mul(x, y); }, a, b);
}
template <Device D>
Var<bf16, D> silu(const Var<bf16, D>& x) {
  return via_fp32("silu", [](const Var<float, D>& a) { return silu(a); }, x);
}
template <Device D>
Var<bf16, D> gelu(const Var<bf16, D>& x) {
  return via_fp32("gelu", [](const Var<float, D>& a) { return gelu(a); }, x);
}
template <Device D>
Var<bf16, D> operator+(const Var<bf16, D>& a, const Var<bf16, D>& b) {
  return add(a, b);
}
template <Device D>
Var<bf16, D> operator*(const Var<bf16, D>& a, const Var<bf16, D>& b) {
  return mul(a, b);
}

}  // namespace mixmoe
