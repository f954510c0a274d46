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

/// Swaps axes 1 and 2 of x (N, A, C, Dh) into a contiguous copy: (B, T, H, Dh) <-> (B, H, T, Dh).
template <class T, class D>
Tensor<T, D> swap_axes_1_2(const Tensor<T, D>& x) {
  const Tensor<T, D> xc = x.contiguous();
  const index_t n = x.size(0), a = x.size(1), c = x.size(2), dh = x.size(3);
  Tensor<T, D> out = Tensor<T, D>::empty(Shape{n, c, a, dh});
  const T* px = xc.data();
  T* po = out.data();
  cpu::parallel_for(n * c, std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, a * dh)), [&](index_t lo, index_t hi) {
    for (index_t r = lo; r < hi; ++r) {
      const index_t i = r / c, j = r % c;
      for (index_t t = 0; t < a; ++t) std::copy_n(px + ((i * a + t) * c + j) * dh, dh, po + ((i * c + j) * a + t) * dh);
    }
  });
  return out;
}

/// One query head: o (Tq, Dh) = softmax(scale q k^T, causal) v, and lse (Tq) of each row.
/// q (Tq, Dh), k and v (Tk, Dh) contiguous; s is scratch of min(Tq, block) * Tk.
template <class T>
void attention_forward_head(const T* q, const T* k, const T* v, T* o, T* lse, index_t tq, index_t tk, index_t dh,
                            T scale, T* s) {
  const index_t past = tk - tq;
  for (index_t r0 = 0; r0 < tq; r0 += kAttentionRowBlock) {
    const index_t rows = std::min(kAttentionRowBlock, tq - r0);
    const index_t n = past + r0 + rows;  // keys visible to the block's last row: later keys are masked for all
    head_gemm(false, true, rows, n, dh, scale, q + r0 * dh, dh, k, dh, T(0), s, n);  // (rows, n)
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
    head_gemm(false, false, rows, dh, n, T(1), s, n, v, dh, T(0), o + r0 * dh, dh);  // (rows, Dh)
  }
}

/// One query head's backward: dq (Tq, Dh) is written (beta = 0); dk and dv (Tk, Dh) are
/// added to, so the G query heads of a kv head can accumulate into one buffer in turn.
/// Null dq/dk/dv pointers skip that gradient. s and dp are scratch of min(Tq, block) * Tk,
/// delta of Tq.
template <class T>
void attention_backward_head(const T* q, const T* k, const T* v, const T* o, const T* go, const T* lse, T* dq, T* dk,
                             T* dv, index_t tq, index_t tk, index_t dh, T scale, T* s, T* dp, T* delta) {
  const index_t past = tk - tq;
  // rowsum(dO * O) = rowsum(dP * P): the softmax backward's per-row term.
  for (index_t i = 0; i < tq; ++i) {
    double acc = 0;
    for (index_t d = 0; d < dh; ++d) acc += static_cast<double>(go[i * dh + d]) * static_cast<double>(o[i * dh + d]);
    delta[i] = static_cast<T>(acc);
  }
  for (index_t r0 = 0; r0 < tq; r0 += kAttentionRowBlock) {
    const index_t rows = std::min(kAttentionRowBlock, tq - r0), n = past + r0 + rows;
    const T* qb = q + r0 * dh;    // (rows, Dh)
    const T* gob = go + r0 * dh;  // (rows, Dh)
    head_gemm(false, true, rows, n, dh, scale, qb, dh, k, dh, T(0), s, n);  // S (rows, n)
    for (index_t i = 0; i < rows; ++i) {
      T* si = s + i * n;
      const index_t len = past + r0 + i + 1;
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> e(si, len);
      e = (e - lse[r0 + i]).exp();  // P recomputed from the saved log-sum-exp
      std::fill(si + len, si + n, T(0));
    }
    if (dv) head_gemm(true, false, n, dh, rows, T(1), s, n, gob, dh, T(1), dv, dh);  // dV += P^T dO
    if (!dq && !dk) continue;
    head_gemm(false, true, rows, n, dh, T(1), gob, dh, v, dh, T(0), dp, n);  // dP = dO V^T (rows, n)
    for (index_t i = 0; i < rows; ++i) {
      const T di = delta[r0 + i];
      T* dpi = dp + i * n;
      const T* pi = s + i * n;
      for (index_t j = 0; j < n; ++j) dpi[j] = pi[j] * (dpi[j] - di);  // dS; masked entries have P = 0
    }
    if (dq) head_gemm(false, false, rows, dh, n, scale, dp, n, k, dh, T(0), dq + r0 * dh, dh);  // dQ = scale dS K
    if (dk) head_gemm(true, false, n, dh, rows, scale, dp, n, qb, dh, T(1), dk, dh);            // dK += scale dS^T Q
  }
}

/// Gradients of causal_attention for the inputs flagged in `need`: {dq, dk, dv} in the
/// inputs' layouts (undefined where not needed). lse (B, Hq, Tq) is the forward's.
template <class T, class D>
std::array<Tensor<T, D>, 3> attention_backward(const Tensor<T, D>& qv, const Tensor<T, D>& kv, const Tensor<T, D>& vv,
                                               const Tensor<T, D>& out, const Tensor<T, D>& gout,
                                               const Tensor<T, D>& lse, T scale, const bool need[3]) {
  const index_t b = qv.size(0), tq = qv.size(1), hq = qv.size(2), dh = qv.size(3), tk = kv.size(1), hkv = kv.size(2);
  const index_t group = hq / hkv, blk = std::min(tq, kAttentionRowBlock);
  std::array<Tensor<T, D>, 3> grads;
  if (!need[0] && !need[1] && !need[2]) return grads;
  const Tensor<T, D> qh = swap_axes_1_2(qv);     // (B, Hq, Tq, Dh)
  const Tensor<T, D> kh = swap_axes_1_2(kv);     // (B, Hkv, Tk, Dh)
  const Tensor<T, D> vh = swap_axes_1_2(vv);     // (B, Hkv, Tk, Dh)
  const Tensor<T, D> oh = swap_axes_1_2(out);    // (B, Hq, Tq, Dh)
  const Tensor<T, D> goh = swap_axes_1_2(gout);  // (B, Hq, Tq, Dh)
  // The G query heads of a kv head add into the same dK/dV rows. A task owns one (batch,
  // kv head) and a share of its query heads; when there are fewer (batch, kv head) pairs
  // than threads, the group is split and each part writes its own partial dK/dV, summed
  // afterwards: no two tasks ever write the same memory.
  const index_t pairs = b * hkv, threads = cpu::ThreadPool::instance().num_threads();
  const index_t wanted = (threads + pairs - 1) / std::max<index_t>(pairs, 1);
  const index_t splits = std::clamp<index_t>(wanted, 1, std::max<index_t>(group, 1));
  Tensor<T, D> dqh, dkp, dvp;
  if (need[0]) dqh = Tensor<T, D>::zeros(Shape{b, hq, tq, dh});          // (B, Hq, Tq, Dh)
  if (need[1]) dkp = Tensor<T, D>::zeros(Shape{b, hkv, splits, tk, dh});  // (B, Hkv, splits, Tk, Dh)
  if (need[2]) dvp = Tensor<T, D>::zeros(Shape{b, hkv, splits, tk, dh});  // (B, Hkv, splits, Tk, Dh)
  const index_t task_work = std::max<index_t>(1, tq * tk * std::max<index_t>(dh, 1) * (group / splits));
  cpu::parallel_for(pairs * splits, std::max<index_t>(1, (1 << 15) / task_work), [&](index_t lo, index_t hi) {
    Tensor<T, D> s = Tensor<T, D>::empty(Shape{blk * tk});   // (blk, Tk) probabilities
    Tensor<T, D> dp = Tensor<T, D>::empty(Shape{blk * tk});  // (blk, Tk) dP, then dS
    Tensor<T, D> delta = Tensor<T, D>::empty(Shape{tq});     // (Tq)
    for (index_t r = lo; r < hi; ++r) {
      const index_t pair = r / splits, part = r % splits, bb = pair / hkv, kvh = pair % hkv;
      const index_t h0 = kvh * group + part * group / splits, h1 = kvh * group + (part + 1) * group / splits;
      for (index_t h = h0; h < h1; ++h) {
        const index_t qr = bb * hq + h;  // (batch, query head) row of the head-major tensors
        attention_backward_head(qh.data() + qr * tq * dh, kh.data() + pair * tk * dh, vh.data() + pair * tk * dh,
                                oh.data() + qr * tq * dh, goh.data() + qr * tq * dh, lse.data() + qr * tq,
                                need[0] ? dqh.data() + qr * tq * dh : nullptr,
                                need[1] ? dkp.data() + r * tk * dh : nullptr,
                                need[2] ? dvp.data() + r * tk * dh : nullptr, tq, tk, dh, scale, s.data(), dp.data(),
                                delta.data());
      }
    }
  });
  // (B, Hkv, splits, Tk, Dh) -> (B, Tk, Hkv, Dh), summing the parts of split groups.
  const auto kv_grad = [&](const Tensor<T, D>& part) {
    if (splits == 1) return swap_axes_1_2(part.reshape(Shape{b, hkv, tk, dh}));
    Tensor<T, D> sum = Tensor<T, D>::zeros(Shape{b, hkv, tk, dh});  // (B, Hkv, Tk, Dh)
    const index_t chunk = tk * dh;
    cpu::parallel_for(pairs, 1, [&](index_t lo, index_t hi) {
      for (index_t p = lo; p < hi; ++p)
        for (index_t sp = 0; sp < splits; ++sp) {
          const T* src = part.data() + (p * splits + sp) * chunk;
          T* dst = sum.data() + p * chunk;
          for (index_t i = 0; i < chunk; ++i) dst[i] += src[i];
        }
    });
    return swap_axes_1_2(sum);
  };
  if (need[0]) grads[0] = swap_axes_1_2(dqh);  // (B, Tq, Hq, Dh)
  if (need[1]) grads[1] = kv_grad(dkp);         // (B, Tk, Hkv, Dh)
  if (need[2]) grads[2] = kv_grad(dvp);         // (B, Tk, Hkv, Dh)
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
  const index_t grain = std::max<index_t>(1, (1 << 15) / head_work);

  const Tensor<T, D> qh = detail::swap_axes_1_2(q.value());  // (B, Hq, Tq, Dh)
  const Tensor<T, D> kh = detail::swap_axes_1_2(k.value());  // (B, Hkv, Tk, Dh)
  const Tensor<T, D> vh = detail::swap_axes_1_2(v.value());  // (B, Hkv, Tk, Dh)
  Tensor<T, D> oh = Tensor<T, D>::empty(Shape{b, hq, tq, dh});  // (B, Hq, Tq, Dh)
  Tensor<T, D> lse = Tensor<T, D>::empty(Shape{b, hq, tq});     // (B, Hq, Tq)
  cpu::parallel_for(b * hq, grain, [&](index_t lo, index_t hi) {
    Tensor<T, D> s = Tensor<T, D>::empty(Shape{blk * tk});  // (blk, Tk) scores of one row block
    for (index_t r = lo; r < hi; ++r) {
      const index_t kvr = (r / hq) * hkv + (r % hq) / group;  // (batch, kv head) of query row r = (batch, head)
      detail::attention_forward_head(qh.data() + r * tq * dh, kh.data() + kvr * tk * dh, vh.data() + kvr * tk * dh,
                                     oh.data() + r * tq * dh, lse.data() + r * tq, tq, tk, dh, st, s.data());
    }
  });
  Tensor<T, D> out = detail::swap_axes_1_2(oh);  // (B, Tq, Hq, Dh)

  // The backward re-derives the head-major copies from the inputs' values (shared, not
  // copied), so the graph keeps no second copy of q, k, v or the output.
  return record(op, std::move(out), {q, k, v},
                [qv = q.value(), kv = k.value(), vv = v.value(), lse, st](autograd::BackwardContext<T, D>& ctx) {
                  const bool need[3] = {ctx.needs_grad(0), ctx.needs_grad(1), ctx.needs_grad(2)};
                  auto grads = detail::attention_backward(qv, kv, vv, ctx.output(), ctx.grad_out(), lse, st, need);
                  for (std::size_t i = 0; i < 3; ++i)
                    if (need[i]) ctx.accumulate(i, std::move(grads[i]));
                });
}

}  // namespace mixmoe
