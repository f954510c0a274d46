// Fused causal multi-head attention with grouped-query (GQA) heads and a KV cache.
//
//   B batch, Tq query tokens, Tk key tokens (cached + new, Tq <= Tk), Dh head size,
//   Hq query heads, Hkv key/value heads, G = Hq / Hkv query heads sharing one kv head
//   causal_attention: q (B, Tq, Hq, Dh), k (B, Tk, Hkv, Dh), v (B, Tk, Hkv, Dh) -> (B, Tq, Hq, Dh)
//
// Query i sits at absolute position Tk - Tq + i (the last Tq tokens of the sequence)
// and attends to keys 0 .. Tk - Tq + i; query head h reads kv head h / G.
//
// One op with its own backward. Per (batch, head), rows are processed in blocks:
// S = scale Q K^T over the keys the block can see, a masked row softmax, O = P V.
// Only the log-sum-exp of each row is kept, never the (Tq, Tk) probabilities: the
// backward recomputes P = exp(S - lse) block by block, so a thread holds the scores
// of one row block of one head at a time.
//
// On a device (Cuda) the same op is fused kernels (backend/cuda/attention.cuh): the forward
// streams key tiles with an online softmax and writes O and the log-sum-exp once; the backward
// recomputes P from the log-sum-exp, dQ per query row and dK/dV per key (no atomics).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/gemm.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail {

/// Query rows per block: the scores of a block are (kAttentionRowBlock, Tk).
inline constexpr index_t kAttentionRowBlock = 64;

/// The per-head products run inside parallel tasks, one head per thread at a time, so
/// they use the single-threaded Eigen GEMM: a multi-threaded BLAS called from every
/// worker at once oversubscribes the cores and its threads spin against each other
/// (measured 10-30x slower than single-threaded products on a shared 2-core machine).
template <class T>
void head_gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
               const T* b, index_t ldb, T beta, T* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  cpu::gemm_eigen(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/// The rows of one head inside a (B, T, H, Dh) tensor: row t at p + t * ld (channels contiguous).
template <class T>
struct HeadRows {
  T* p = nullptr;
  index_t ld = 0;
  [[nodiscard]] T* row(index_t t) const { return p + t * ld; }
};

/// Head h of batch b of x (B, T, H, Dh) in place, through x's strides (x.stride(3) == 1):
/// head_in to read it, head_out to write it.
template <class T, class D>
HeadRows<const T> head_in(const Tensor<T, D>& x, index_t b, index_t h) {
  return {x.data() + b * x.stride(0) + h * x.stride(2), x.stride(1)};
}
template <class T, class D>
HeadRows<T> head_out(const Tensor<T, D>& x, index_t b, index_t h) {
  return {x.data() + b * x.stride(0) + h * x.stride(2), x.stride(1)};
}

/// x itself when its channels are contiguous (then a head is a row-strided matrix of x,
/// as in a slice of a KV cache), else a contiguous copy.
template <class T, class D>
Tensor<T, D> channels_contiguous(const Tensor<T, D>& x) {
  return x.stride(3) == 1 || x.size(3) <= 1 ? x : x.contiguous();
}

/// One query head: o = softmax(scale q k^T, causal) v and the log-sum-exp of each row.
/// q and o have Tq rows, k and v Tk rows, of Dh channels; s is scratch of
/// min(Tq, block) * Tk; lse (Tq) is contiguous.
template <class T>
void attention_forward_head(HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v, HeadRows<T> o, T* lse,
                            index_t tq, index_t tk, index_t dh, T scale, T* s) {
  const index_t past = tk - tq;
  for (index_t r0 = 0; r0 < tq; r0 += kAttentionRowBlock) {
    const index_t rows = std::min(kAttentionRowBlock, tq - r0);
    const index_t n = past + r0 + rows;  // keys visible to the block's last row: later keys are masked for all
    head_gemm(false, true, rows, n, dh, scale, q.row(r0), q.ld, k.p, k.ld, T(0), s, n);  // (rows, n)
    for (index_t i = 0; i < rows; ++i) {
      T* si = s + i * n;
      const index_t len = past + r0 + i + 1;  // keys 0 .. position of this query
      const T m = *std::max_element(si, si + len);
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> e(si, len);
      e = (e - m).exp();
      double sum = 0;  // terms in (0, 1], at least one is 1: the sum is >= 1 and log(sum) is safe
      for (index_t j = 0; j < len; ++j) sum += si[j];
      e *= static_cast<T>(1.0 / sum);
      std::fill(si + len, si + n, T(0));
      lse[r0 + i] = m + static_cast<T>(std::log(sum));
    }
    head_gemm(false, false, rows, dh, n, T(1), s, n, v.p, v.ld, T(0), o.row(r0), o.ld);  // (rows, Dh)
  }
}

/// One query head's backward: dq (Tq rows) is written (beta = 0); dk and dv (Tk rows) are
/// added to, so the G query heads of a kv head can accumulate into one buffer in turn.
/// A null dq/dk/dv skips that gradient. s and dp are scratch of min(Tq, block) * Tk,
/// delta of Tq.
template <class T>
void attention_backward_head(HeadRows<const T> q, HeadRows<const T> k, HeadRows<const T> v, HeadRows<const T> o,
                             HeadRows<const T> go, const T* lse, HeadRows<T> dq, HeadRows<T> dk, HeadRows<T> dv,
                             index_t tq, index_t tk, index_t dh, T scale, T* s, T* dp, T* delta) {
  const index_t past = tk - tq;
  // rowsum(dO * O) = rowsum(dP * P): the softmax backward's per-row term.
  for (index_t i = 0; i < tq; ++i) {
    double acc = 0;
    for (index_t d = 0; d < dh; ++d) acc += static_cast<double>(go.row(i)[d]) * static_cast<double>(o.row(i)[d]);
    delta[i] = static_cast<T>(acc);
  }
  for (index_t r0 = 0; r0 < tq; r0 += kAttentionRowBlock) {
    const index_t rows = std::min(kAttentionRowBlock, tq - r0), n = past + r0 + rows;
    head_gemm(false, true, rows, n, dh, scale, q.row(r0), q.ld, k.p, k.ld, T(0), s, n);  // S (rows, n)
    for (index_t i = 0; i < rows; ++i) {
      T* si = s + i * n;
      const index_t len = past + r0 + i + 1;
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> e(si, len);
      e = (e - lse[r0 + i]).exp();  // P recomputed from the saved log-sum-exp
      std::fill(si + len, si + n, T(0));
    }
    if (dv.p) head_gemm(true, false, n, dh, rows, T(1), s, n, go.row(r0), go.ld, T(1), dv.p, dv.ld);  // dV += P^T dO
    if (!dq.p && !dk.p) continue;
    head_gemm(false, true, rows, n, dh, T(1), go.row(r0), go.ld, v.p, v.ld, T(0), dp, n);  // dP = dO V^T (rows, n)
    for (index_t i = 0; i < rows; ++i) {
      const T di = delta[r0 + i];
      T* dpi = dp + i * n;
      const T* pi = s + i * n;
      for (index_t j = 0; j < n; ++j) dpi[j] = pi[j] * (dpi[j] - di);  // dS; masked entries have P = 0
    }
    if (dq.p) head_gemm(false, false, rows, dh, n, scale, dp, n, k.p, k.ld, T(0), dq.row(r0), dq.ld);  // scale dS K
    if (dk.p) head_gemm(true, false, n, dh, rows, scale, dp, n, q.row(r0), q.ld, T(1), dk.p, dk.ld);   // scale dS^T Q
  }
}

/// Gradients of causal_attention for the inputs flagged in `need`: {dq, dk, dv}, contiguous,
/// in the inputs' shapes (undefined where not needed). q, k, v have contiguous channels;
/// out and gout are contiguous; lse (B, Hq, Tq) is the forward's.
template <class T, class D>
std::array<Tensor<T, D>, 3> attention_backward(const Tensor<T, D>& q, const Tensor<T, D>& k, const Tensor<T, D>& v,
                                               const Tensor<T, D>& out, const Tensor<T, D>& gout,
                                               const Tensor<T, D>& lse, T scale, const bool need[3]) {
  require_host<D>();  // attention_backward_device is the device's
  const index_t b = q.size(0), tq = q.size(1), hq = q.size(2), dh = q.size(3), tk = k.size(1), hkv = k.size(2);
  const index_t group = hq / hkv, blk = std::min(tq, kAttentionRowBlock);
  std::array<Tensor<T, D>, 3> grads;
  if (!need[0] && !need[1] && !need[2]) return grads;
  // The G query heads of a kv head add into the same dK/dV rows. A task owns one (batch,
  // kv head) and a share of its query heads; when there are fewer (batch, kv head) pairs
  // than threads, the group is split and each part adds into its own copy of dK/dV,
  // summed afterwards: no two tasks ever write the same memory.
  const index_t pairs = b * hkv, threads = cpu::ThreadPool::instance().num_threads();
  const index_t wanted = (threads + pairs - 1) / std::max<index_t>(pairs, 1);
  const index_t splits = std::clamp<index_t>(wanted, 1, std::max<index_t>(group, 1));
  const Shape kv_parts{splits * b, tk, hkv, dh};  // the parts stacked along the batch axis
  Tensor<T, D> dq, dk, dv;
  if (need[0]) dq = Tensor<T, D>::zeros(q.shape());  // (B, Tq, Hq, Dh)
  if (need[1]) dk = Tensor<T, D>::zeros(kv_parts);   // (splits * B, Tk, Hkv, Dh)
  if (need[2]) dv = Tensor<T, D>::zeros(kv_parts);   // (splits * B, Tk, Hkv, Dh)
  const index_t task_work = std::max<index_t>(1, tq * tk * std::max<index_t>(dh, 1) * (group / splits));
  cpu::parallel_for(pairs * splits, std::max<index_t>(1, (1 << 15) / task_work), [&](index_t lo, index_t hi) {
    Tensor<T, D> s = Tensor<T, D>::empty(Shape{blk * tk});   // (blk, Tk) probabilities
    Tensor<T, D> dp = Tensor<T, D>::empty(Shape{blk * tk});  // (blk, Tk) dP, then dS
    Tensor<T, D> delta = Tensor<T, D>::empty(Shape{tq});     // (Tq)
    for (index_t r = lo; r < hi; ++r) {
      const index_t pair = r / splits, part = r % splits, bb = pair / hkv, kvh = pair % hkv;
      const index_t h0 = kvh * group + part * group / splits, h1 = kvh * group + (part + 1) * group / splits;
      const HeadRows<T> gk = need[1] ? head_out(dk, part * b + bb, kvh) : HeadRows<T>{};  // this part's dK rows
      const HeadRows<T> gv = need[2] ? head_out(dv, part * b + bb, kvh) : HeadRows<T>{};
      for (index_t h = h0; h < h1; ++h)
        attention_backward_head(head_in(q, bb, h), head_in(k, bb, kvh), head_in(v, bb, kvh), head_in(out, bb, h),
                                head_in(gout, bb, h), lse.data() + (bb * hq + h) * tq,
                                need[0] ? head_out(dq, bb, h) : HeadRows<T>{}, gk, gv, tq, tk, dh, scale, s.data(),
                                dp.data(), delta.data());
    }
  });
  // (splits * B, Tk, Hkv, Dh) -> (B, Tk, Hkv, Dh), summing the parts of split groups.
  const auto kv_grad = [&](const Tensor<T, D>& parts) {
    if (splits == 1) return parts;
    const index_t part_size = b * tk * hkv * dh;
    Tensor<T, D> g = Tensor<T, D>::empty(Shape{b, tk, hkv, dh});  // (B, Tk, Hkv, Dh)
    T* pg = g.data();
    const T* pp = parts.data();
    cpu::parallel_for(part_size, 1 << 14, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) {
        T acc = pp[i];
        for (index_t sp = 1; sp < splits; ++sp) acc += pp[sp * part_size + i];
        pg[i] = acc;
      }
    });
    return g;
  };
  grads[0] = dq;
  if (need[1]) grads[1] = kv_grad(dk);
  if (need[2]) grads[2] = kv_grad(dv);
  return grads;
}

/// attention_backward on a device: the fused kernels of DeviceOps<D> (backend/cuda/attention.cuh);
/// each wanted gradient is written whole by one kernel, so it is allocated uninitialised.
template <class T, class D>
std::array<Tensor<T, D>, 3> attention_backward_device(const Tensor<T, D>& q, const Tensor<T, D>& k,
                                                      const Tensor<T, D>& v, const Tensor<T, D>& out,
                                                      const Tensor<T, D>& gout, const Tensor<T, D>& lse, T scale,
                                                      const bool need[3]) {
  require_device_ops<D>();
  const index_t b = q.size(0), tq = q.size(1), hq = q.size(2), dh = q.size(3), tk = k.size(1), hkv = k.size(2);
  std::array<Tensor<T, D>, 3> grads;
  if (!need[0] && !need[1] && !need[2]) return grads;
  if (need[0]) grads[0] = Tensor<T, D>::empty(q.shape());                  // (B, Tq, Hq, Dh)
  if (need[1]) grads[1] = Tensor<T, D>::empty(Shape{b, tk, hkv, dh});      // (B, Tk, Hkv, Dh)
  if (need[2]) grads[2] = Tensor<T, D>::empty(Shape{b, tk, hkv, dh});      // (B, Tk, Hkv, Dh)
  const Tensor<T, D> oc = out.contiguous(), gc = gout.contiguous();
  DeviceOps<D>::attn_backward(q.data(), q.strides(), k.data(), k.strides(), v.data(), v.strides(), oc.data(), gc.data(),
                              lse.data(), need[0] ? grads[0].data() : nullptr, need[1] ? grads[1].data() : nullptr,
                              need[2] ? grads[2].data() : nullptr, b, tq, tk, hq, hkv, dh, scale);
  return grads;
}

}  // namespace detail

/// Causal attention of q (B, Tq, Hq, Dh) over k, v (B, Tk, Hkv, Dh) -> (B, Tq, Hq, Dh).
/// Hq must be a multiple of Hkv (grouped-query heads); Tq <= Tk, the queries being the
/// last Tq positions. scale defaults to 1 / sqrt(Dh).
template <Scalar T, Device D>
Var<T, D> causal_attention(const Var<T, D>& q, const Var<T, D>& k, const Var<T, D>& v,
                           std::optional<double> scale = std::nullopt) {
  const char* op = "causal_attention";
  MIXMOE_CHECK(q.dim() == 4, op, "query must be (B, Tq, Hq, Dh), got ", q.shape());
  MIXMOE_CHECK(k.dim() == 4, op, "key must be (B, Tk, Hkv, Dh), got ", k.shape());
  MIXMOE_CHECK(k.shape() == v.shape(), op, "key ", k.shape(), " and value ", v.shape(), " must have the same shape");
  MIXMOE_CHECK(q.size(0) == k.size(0), op, "batch of query ", q.shape(), " and key ", k.shape(), " differ");
  MIXMOE_CHECK(q.size(3) == k.size(3), op, "head size of query ", q.shape(), " and key ", k.shape(), " differ");
  const index_t b = q.size(0), tq = q.size(1), hq = q.size(2), dh = q.size(3), tk = k.size(1), hkv = k.size(2);
  MIXMOE_CHECK(hkv > 0 && hq % hkv == 0, op, "Hq = ", hq, " query heads must be a multiple of Hkv = ", hkv,
               " kv heads (query ", q.shape(), ", key ", k.shape(), ")");
  MIXMOE_CHECK(tq <= tk, op, "Tq = ", tq, " queries but only Tk = ", tk,
               " keys: each query must see its own key (query ", q.shape(), ", key ", k.shape(), ")");
  const double sc = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(std::max<index_t>(dh, 1)));
  MIXMOE_CHECK(std::isfinite(sc), op, "scale ", sc, " must be finite");
  const T st = static_cast<T>(sc);
  const index_t group = hq / hkv, blk = std::min(tq, detail::kAttentionRowBlock);
  const index_t head_work = std::max<index_t>(1, tq * tk * std::max<index_t>(dh, 1));

  // Heads are read in place as row-strided matrices of the (B, T, H, Dh) inputs, so a
  // view such as the filled part of a KV cache is used without copying it.
  const Tensor<T, D> qc = detail::channels_contiguous(q.value());
  const Tensor<T, D> kc = detail::channels_contiguous(k.value());
  const Tensor<T, D> vc = detail::channels_contiguous(v.value());
  Tensor<T, D> out = Tensor<T, D>::empty(q.shape());         // (B, Tq, Hq, Dh)
  Tensor<T, D> lse = Tensor<T, D>::empty(Shape{b, hq, tq});  // (B, Hq, Tq)
  if constexpr (!Tensor<T, D>::on_host) {
    // One fused kernel (backend/cuda/attention.cuh): the probabilities are never stored.
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::attn_forward(qc.data(), qc.strides(), kc.data(), kc.strides(), vc.data(), vc.strides(),
                                       out.data(), lse.data(), b, tq, tk, hq, hkv, dh, st);
  } else {
    cpu::parallel_for(b * hq, std::max<index_t>(1, (1 << 15) / head_work), [&](index_t lo, index_t hi) {
      Tensor<T, D> s = Tensor<T, D>::empty(Shape{blk * tk});  // (blk, Tk) scores of one row block
      for (index_t r = lo; r < hi; ++r) {
        const index_t bb = r / hq, h = r % hq, kvh = h / group;
        detail::attention_forward_head(detail::head_in(qc, bb, h), detail::head_in(kc, bb, kvh),
                                       detail::head_in(vc, bb, kvh), detail::head_out(out, bb, h),
                                       lse.data() + r * tq, tq, tk, dh, st, s.data());
      }
    });
  }

  // The backward keeps the inputs' values (shared, not copied) and the row log-sum-exps.
  return record(op, std::move(out), {q, k, v}, [qc, kc, vc, lse, st](autograd::BackwardContext<T, D>& ctx) {
    const bool need[3] = {ctx.needs_grad(0), ctx.needs_grad(1), ctx.needs_grad(2)};
    std::array<Tensor<T, D>, 3> grads;
    if constexpr (Tensor<T, D>::on_host)
      grads = detail::attention_backward(qc, kc, vc, ctx.output(), ctx.grad_out(), lse, st, need);
    else
      grads = detail::attention_backward_device(qc, kc, vc, ctx.output(), ctx.grad_out(), lse, st, need);
    for (std::size_t i = 0; i < 3; ++i)
      if (need[i]) ctx.accumulate(i, std::move(grads[i]));
  });
}

}  // namespace mixmoe
