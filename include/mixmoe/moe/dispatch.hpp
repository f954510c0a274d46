// Expert dispatch: sort a routing's assignments by expert, run every expert once on
// its contiguous block of rows (one GEMM per expert), and add the gated outputs back
// into the token rows.
//
//   N tokens, C channels, E experts, M assignments (token -> expert pairs),
//   M' kept assignments (M' = M when dropless; fewer in capacity mode)
//   DispatchPlan:       order (M') assignment of each sorted row, sorted_token (M'), offsets (E + 1)
//   dispatch_by_expert: x (N, C) -> x_sorted (M', C), row r = x[sorted_token[r]]
//   combine_by_expert:  y_sorted (M', C), gate_sorted (M') -> (N, C),
//                       out[sorted_token[r]] += gate_sorted[r] * y_sorted[r]
//   moe_forward:        x (N, C), Routing -> (N, C),
//                       out[token[m]] += gate[m] * expert[m](x[token[m]]) over the kept assignments m
//   moe_forward_grouped the same with every expert in one call on x_sorted (grouped GEMM)
//
// Order: the rows of one expert are in token order (ties, a token sent twice to the
// same expert, in assignment order). The plan is a counting sort, computed on one
// thread, so the order and every sum below are the same whatever the thread count.
//
// On a device (Cuda) the plan is computed there (a stable sort of the assignments by
// (expert, token), backend/cuda/moe.cuh) in the same order as on the CPU. A dropless plan
// reads nothing back: M' = M, and the expert offsets stay in device memory for the grouped
// GEMM (moe_forward_grouped). The per-expert counts come to the host in one small copy
// when something asks for them (moe_forward's per-expert blocks, routing statistics) or at
// once in capacity mode. dispatch_by_expert, combine_by_expert and the gate gather run as
// device kernels whose every output is summed by one thread in the plan's order (no
// atomics): deterministic. An assignment whose token or expert is out of range: on Cpu, and
// on a device in capacity mode, an error when the plan is made; in a dropless device plan,
// NaN in every output of combine_by_expert (checking would be a synchronisation) and the
// error at the first read of the counts.
//
// Capacity mode (capacity_factor > 0): capacity = ceil(capacity_factor * M / E); an
// expert keeps its first `capacity` assignments in token order and drops the rest.
// A dropped assignment reads nothing and adds nothing (its token keeps only what its
// other experts give, plus the residual around the layer); plan.dropped() counts them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

/// A host list of sizes or counts; it draws from the caching allocator, so a warm training
/// step does not call malloc for it.
using IndexList = std::vector<index_t, PoolAllocator<index_t>>;

namespace detail {

/// Assignment i's token t and expert x must be in [0, n) and [0, e): the plan's range check, on the
/// CPU for every assignment, on a device for the first bad one the kernels found.
inline void check_assignment(index_t i, Index t, Index x, index_t n, index_t e) {
  MIXMOE_CHECK(t >= 0 && t < n, "dispatch", "token ", t, " of assignment ", i, " is out of range for ", n, " tokens");
  MIXMOE_CHECK(x >= 0 && x < e, "dispatch", "expert ", x, " of assignment ", i, " is out of range for ", e,
               " experts");
}

/// The host side of a plan's counts, shared by the plan and the routing records made from it. On
/// Cpu it is filled when the plan is made. On a device it is read back from the plan's device meta
/// on first use (one small copy: a synchronisation), and that read also reports an assignment whose
/// token or expert is out of range, with the CPU's message.
template <Device D>
struct PlanCounts {
  IndexList routed;   // (E) assignments the router sent to each expert, dropped ones included
  IndexList offsets;  // (E + 1) kept rows of each expert: [offsets[e], offsets[e + 1])
  index_t dropped = 0;
  bool ready = false;
  // Device plans before the read: [first bad, routed (E), offsets (E + 1), ...] and the ids for the error.
  Tensor<std::int64_t, D> meta;
  Tensor<Index, D> token, expert;
  index_t num_tokens = 0, num_experts = 0, num_assignments = 0;

  void fetch();
  /// The counts, read from the device first if they are not on the host yet.
  const PlanCounts& host() {
    if (!ready) fetch();
    return *this;
  }
};

}  // namespace detail

/// Where every assignment of a routing goes: the rows sorted by expert, and per token the sorted
/// rows that add into it. Index tensors live on the plan's device.
///
/// The per-expert row counts (offsets(), routed(), dropped()) are host values. On Cpu they are
/// there from the start. On a device a dropless plan does not read them back when it is made:
/// everything the grouped expert path needs (num_rows() = M, device_offsets) is known without
/// waiting for the GPU, and the first call to offsets(), routed(), rows_of() or dropped() copies
/// them (the plan's one synchronisation, taken only by code that needs them: the per-expert path,
/// routing statistics). A capacity-mode plan reads them at once (its row count depends on them).
template <Device D = Cpu>
struct DispatchPlan {
  Tensor<Index, D> order;          // (M') assignment index of each sorted row
  Tensor<Index, D> sorted_token;   // (M') token (row of x) of each sorted row
  Tensor<Index, D> token_offsets;  // (N + 1) token n's rows are token_rows[token_offsets[n] .. token_offsets[n + 1])
  Tensor<Index, D> token_rows;     // (M') sorted rows grouped by token, ascending within a token
  Tensor<index_t, D> device_offsets;  // (E + 1) offsets() on the plan's device, for the grouped GEMM
  index_t num_tokens = 0;             // N
  index_t num_experts = 0;            // E
  index_t num_assignments = 0;        // M
  index_t capacity = 0;               // rows an expert may keep; 0 = dropless
  index_t rows = 0;                   // M', the rows of x_sorted
  std::shared_ptr<detail::PlanCounts<D>> counts = std::make_shared<detail::PlanCounts<D>>();

  /// M', the rows of x_sorted (a host value without a synchronisation).
  [[nodiscard]] index_t num_rows() const { return rows; }
  /// (E + 1) rows [offsets()[e], offsets()[e + 1]) belong to expert e.
  [[nodiscard]] const IndexList& offsets() const { return host().offsets; }
  /// (E) assignments the router sent to each expert, dropped ones included.
  [[nodiscard]] const IndexList& routed() const { return host().routed; }
  /// Assignments over capacity, M - M'.
  [[nodiscard]] index_t dropped() const { return host().dropped; }
  /// Rows kept for expert e.
  [[nodiscard]] index_t rows_of(index_t e) const { return offsets()[e + 1] - offsets()[e]; }
 private:
  const detail::PlanCounts<D>& host() const {
    MIXMOE_CHECK(counts != nullptr, "DispatchPlan", "the plan has no counts (default-constructed)");
    return counts->host();
  }
};

/// The capacity of one expert: ceil(capacity_factor * M / E), 0 (dropless) when capacity_factor is 0.
inline index_t expert_capacity(double capacity_factor, index_t num_assignments, index_t num_experts) {
  MIXMOE_CHECK(std::isfinite(capacity_factor) && capacity_factor >= 0, "dispatch", "capacity_factor must be >= 0, got ",
               capacity_factor);
  MIXMOE_CHECK(num_experts > 0, "dispatch", "needs at least one expert, got ", num_experts);
  if (capacity_factor == 0 || num_assignments == 0) return 0;
  // The small slack keeps an exact product such as 1.25 * 8 / 2 = 5 from rounding up to 6.
  const double c =
      std::ceil(capacity_factor * static_cast<double>(num_assignments) / static_cast<double>(num_experts) - 1e-9);
  return std::max<index_t>(1, static_cast<index_t>(c));
}

namespace detail {

template <Device D>
void PlanCounts<D>::fetch() {
  if (ready) return;
  const index_t e = num_experts;
  // [first bad assignment, routed (E), offsets (E + 1)]: the one device->host copy of a plan.
  const std::vector<std::int64_t> host = meta.slice(0, 0, 2 + 2 * e).to_vector();
  if (host[0] >= 0)  // the first assignment with an id out of range: the CPU's message
    check_assignment(host[0], token[host[0]].item(), expert[host[0]].item(), num_tokens, e);
  routed.assign(host.begin() + 1, host.begin() + 1 + e);
  offsets.assign(host.begin() + 1 + e, host.begin() + 2 + 2 * e);
  dropped = num_assignments - offsets.back();
  ready = true;
  meta = {};  // the device copy is still the plan's device_offsets (a view that keeps the storage)
  token = {};
  expert = {};
}

/// make_dispatch_plan on a device (token, expert contiguous; the sizes checked by the caller).
/// Dropless: no host synchronisation (M' = M); an out-of-range id makes the layer's output NaN
/// (combine_by_expert) and the first read of the counts throws the CPU's error. Capacity mode reads
/// the counts at once (they size M') and throws before any row is placed.
template <Device D>
DispatchPlan<D> make_dispatch_plan_on_device(const Tensor<Index, D>& tc, const Tensor<Index, D>& ec, index_t n,
                                             index_t e_count, index_t capacity) {
  require_device_ops<D>();
  using Ops = DeviceOps<D>;
  const index_t m = tc.numel();
  DispatchPlan<D> plan;
  plan.num_tokens = n;
  plan.num_experts = e_count;
  plan.num_assignments = m;
  plan.capacity = capacity;
  auto keys = Tensor<std::int64_t, D>::empty({m});                // (M) sort keys, sorted
  auto ids = Tensor<Index, D>::empty({m});                        // (M) assignment of each sorted key
  auto meta = Tensor<std::int64_t, D>::empty({2 + 3 * e_count});  // see MoEOps::moe_plan_count
  Ops::moe_plan_count(tc.data(), ec.data(), m, n, e_count, capacity, keys.data(), ids.data(), meta.data());
  PlanCounts<D>& counts = *plan.counts;
  counts.meta = meta;
  counts.token = tc;
  counts.expert = ec;
  counts.num_tokens = n;
  counts.num_experts = e_count;
  counts.num_assignments = m;
  plan.device_offsets = meta.slice(0, 1 + e_count, 2 + 2 * e_count);  // (E + 1), a view of meta
  if (capacity > 0) counts.fetch();  // throws on an out-of-range id
  const index_t rows = capacity > 0 ? counts.offsets.back() : m;
  plan.rows = rows;
  plan.order = Tensor<Index, D>::empty({rows});
  plan.sorted_token = Tensor<Index, D>::empty({rows});
  plan.token_offsets = Tensor<Index, D>::empty({n + 1});
  plan.token_rows = Tensor<Index, D>::empty({rows});
  Ops::moe_plan_place(keys.data(), ids.data(), meta.data(), m, n, e_count, rows, plan.order.data(),
                      plan.sorted_token.data(), plan.token_offsets.data(), plan.token_rows.data());
  return plan;
}

/// The device meta a combine checks for an out-of-range assignment (nullptr on Cpu, or once the
/// counts are on the host: an error would have been thrown then).
template <Device D>
const std::int64_t* plan_poison(const DispatchPlan<D>& plan) {
  if constexpr (Tensor<Index, D>::on_host) {
    return nullptr;
  } else {
    return plan.counts && !plan.counts->ready && plan.counts->meta.defined() ? plan.counts->meta.data() : nullptr;
  }
}

/// v[index[r]] for a 1-D v and DISTINCT indices (a plan's order), on a device: the backward adds
/// each gradient into its one source, no two rows share one (no atomics).
template <Scalar T, Device D>
Var<T, D> select_distinct_on_device(const Var<T, D>& v, const Tensor<Index, D>& index) {
  require_device_ops<D>();
  const Tensor<T, D> vc = v.value().contiguous();
  const index_t rows = index.numel();
  Tensor<T, D> out = Tensor<T, D>::empty({rows});
  DeviceOps<D>::moe_gather_rows(vc.data(), index.data(), rows, index_t{1}, out.data());
  return record("select_distinct", std::move(out), {v}, [index, rows](autograd::BackwardContext<T, D>& ctx) {
    DeviceOps<D>::moe_scatter_unique_add(ctx.grad_out().data(), index.data(), rows, index_t{1}, ctx.grad_in(0).data());
  });
}

}  // namespace detail

/// Sorts the assignments (token[m], expert[m]) by expert; see the header comment for the order and capacity.
template <Device D>
DispatchPlan<D> make_dispatch_plan(const Tensor<Index, D>& token, const Tensor<Index, D>& expert, index_t num_tokens,
                                   index_t num_experts, double capacity_factor = 0.0) {
  MIXMOE_CHECK(token.dim() == 1 && expert.dim() == 1 && token.numel() == expert.numel(), "dispatch", "token ",
               token.shape(), " and expert ", expert.shape(), " must be 1-D of the same length M");
  MIXMOE_CHECK(num_tokens >= 0, "dispatch", "negative token count ", num_tokens);
  const index_t m = token.numel(), n = num_tokens, e_count = num_experts;
  const index_t capacity = expert_capacity(capacity_factor, m, e_count);
  MIXMOE_CHECK(m <= std::numeric_limits<Index>::max() && n < std::numeric_limits<Index>::max(), "dispatch", m,
               " assignments over ", n, " tokens do not fit the 32-bit Index");
  const Tensor<Index, D> tc = token.contiguous(), ec = expert.contiguous();
  if constexpr (!Tensor<Index, D>::on_host) {
    return detail::make_dispatch_plan_on_device(tc, ec, n, e_count, capacity);
  }
  const Index* tok = tc.data();
  const Index* ex = ec.data();
  for (index_t i = 0; i < m; ++i) detail::check_assignment(i, tok[i], ex[i], n, e_count);

  DispatchPlan<D> plan;
  plan.num_tokens = n;
  plan.num_experts = e_count;
  plan.num_assignments = m;
  plan.capacity = capacity;

  // Pass 1: assignments in token order (stable counting sort by token).
  IndexList start(static_cast<std::size_t>(n) + 1, 0);
  for (index_t i = 0; i < m; ++i) ++start[static_cast<std::size_t>(tok[i]) + 1];
  for (index_t t = 0; t < n; ++t) start[t + 1] += start[t];
  std::vector<Index, PoolAllocator<Index>> by_token(static_cast<std::size_t>(m));
  for (index_t i = 0; i < m; ++i) by_token[static_cast<std::size_t>(start[tok[i]]++)] = static_cast<Index>(i);

  // Pass 2: stable by expert, so each expert's rows stay in token order; capacity keeps the first ones.
  detail::PlanCounts<D>& counts = *plan.counts;
  counts.routed.assign(static_cast<std::size_t>(e_count), 0);
  for (index_t i = 0; i < m; ++i) ++counts.routed[static_cast<std::size_t>(ex[i])];
  counts.offsets.assign(static_cast<std::size_t>(e_count) + 1, 0);
  for (index_t e = 0; e < e_count; ++e) {
    const index_t kept = capacity > 0 ? std::min(counts.routed[e], capacity) : counts.routed[e];
    counts.offsets[e + 1] = counts.offsets[e] + kept;
  }
  const index_t rows = counts.offsets.back();
  counts.dropped = m - rows;
  counts.ready = true;
  plan.rows = rows;
  plan.device_offsets = Tensor<index_t, D>::empty({e_count + 1});
  std::copy(counts.offsets.begin(), counts.offsets.end(), plan.device_offsets.data());
  plan.order = Tensor<Index, D>::empty({rows});
  plan.sorted_token = Tensor<Index, D>::empty({rows});
  {
    IndexList fill(static_cast<std::size_t>(e_count), 0);
    Index* ord = plan.order.data();
    Index* st = plan.sorted_token.data();
    for (const Index a : by_token) {
      const index_t e = ex[a];
      if (fill[e] == counts.offsets[e + 1] - counts.offsets[e]) continue;  // over capacity: dropped
      const index_t r = counts.offsets[e] + fill[e]++;
      ord[r] = a;
      st[r] = tok[a];
    }
  }

  // Per token, its sorted rows (CSR): combine sums them in this fixed order without races.
  plan.token_offsets = Tensor<Index, D>::zeros({n + 1});
  plan.token_rows = Tensor<Index, D>::empty({rows});
  {
    Index* to = plan.token_offsets.data();
    Index* tr = plan.token_rows.data();
    const Index* st = plan.sorted_token.data();
    for (index_t r = 0; r < rows; ++r) ++to[st[r] + 1];
    for (index_t t = 0; t < n; ++t) to[t + 1] += to[t];
    std::vector<Index, PoolAllocator<Index>> next(to, to + n);
    for (index_t r = 0; r < rows; ++r) tr[next[static_cast<std::size_t>(st[r])]++] = static_cast<Index>(r);
  }
  return plan;
}

/// The plan of a Routing (its token and expert lists, N and E).
template <Scalar T, Device D>
DispatchPlan<D> make_dispatch_plan(const Routing<T, D>& routing, double capacity_factor = 0.0) {
  return make_dispatch_plan(routing.token, routing.expert, routing.num_tokens, routing.num_experts, capacity_factor);
}

/// x (N, C) -> x_sorted (M', C): the rows each expert reads, expert after expert.
template <Scalar T, Device D>
Var<T, D> dispatch_by_expert(const Var<T, D>& x, const DispatchPlan<D>& plan) {
  MIXMOE_CHECK(x.defined(), "dispatch_by_expert", "x is an undefined Var");
  MIXMOE_CHECK(x.dim() == 2, "dispatch_by_expert", "x must be (N, C), got ", x.shape());
  MIXMOE_CHECK(x.size(0) == plan.num_tokens, "dispatch_by_expert", "x of shape ", x.shape(), " has ", x.size(0),
               " rows, the plan was made for ", plan.num_tokens, " tokens");
  if constexpr (!Tensor<T, D>::on_host) {
    // Row gather; the backward sums each token's rows in token_rows order (the CPU's order), no atomics.
    detail::require_device_ops<D>();
    const index_t n = x.size(0), c = x.size(1), rows = plan.num_rows();
    const Tensor<T, D> xc = x.value().contiguous();
    Tensor<T, D> out = Tensor<T, D>::empty({rows, c});  // (M', C)
    detail::DeviceOps<D>::moe_gather_rows(xc.data(), plan.sorted_token.data(), rows, c, out.data());
    return record("dispatch_by_expert", std::move(out), {x},
                  [to = plan.token_offsets, tr = plan.token_rows, n, c](autograd::BackwardContext<T, D>& ctx) {
                    detail::DeviceOps<D>::moe_dispatch_backward(ctx.grad_out().data(), to.data(), tr.data(), n, c,
                                                                ctx.grad_in(0).data());
                  });
  }
  return index_select(x, 0, plan.sorted_token);
}

/// y_sorted (M', C) and gate_sorted (M') -> (N, C): out[n] = sum over the sorted rows r of token n of
/// gate_sorted[r] * y_sorted[r]. One op: each output row is summed by one thread in the plan's order.
template <Scalar T, Device D>
Var<T, D> combine_by_expert(const Var<T, D>& y_sorted, const Var<T, D>& gate_sorted, const DispatchPlan<D>& plan,
                            index_t num_tokens) {
  MIXMOE_CHECK(y_sorted.defined() && gate_sorted.defined(), "combine_by_expert",
               "y_sorted and gate_sorted must be defined");
  MIXMOE_CHECK(y_sorted.dim() == 2 && y_sorted.size(0) == plan.num_rows(), "combine_by_expert", "y_sorted must be (",
               plan.num_rows(), ", C) for a plan of ", plan.num_rows(), " rows, got ", y_sorted.shape());
  MIXMOE_CHECK(gate_sorted.dim() == 1 && gate_sorted.size(0) == plan.num_rows(), "combine_by_expert",
               "gate_sorted must be (", plan.num_rows(), "), got ", gate_sorted.shape());
  MIXMOE_CHECK(num_tokens == plan.num_tokens, "combine_by_expert", "output of ", num_tokens,
               " tokens for a plan made for ", plan.num_tokens, " tokens");
  const index_t n = num_tokens, c = y_sorted.size(1), rows = plan.num_rows();
  const Tensor<T, D> yv = y_sorted.value().contiguous();     // (M', C)
  const Tensor<T, D> gv = gate_sorted.value().contiguous();  // (M')
  const Tensor<Index, D> st = plan.sorted_token, to = plan.token_offsets, tr = plan.token_rows;
  if constexpr (!Tensor<T, D>::on_host) {
    // One block per token adds its rows in token_rows order; the backward: dy per element, dgate one
    // warp per sorted row (a dot product in double). No atomics.
    detail::require_device_ops<D>();
    using Ops = detail::DeviceOps<D>;
    Tensor<T, D> dout = Tensor<T, D>::empty({n, c});  // (N, C)
    Ops::moe_combine(yv.data(), gv.data(), to.data(), tr.data(), n, c, detail::plan_poison(plan), dout.data());
    return record("combine_by_expert", std::move(dout), {y_sorted, gate_sorted},
                  [yv, gv, st, rows, c](autograd::BackwardContext<T, D>& ctx) {
                    const T* g = ctx.grad_out().data();  // (N, C)
                    if (ctx.needs_grad(0))
                      Ops::moe_combine_backward_y(g, gv.data(), st.data(), rows, c, ctx.grad_in(0).data());
                    if (ctx.needs_grad(1))
                      Ops::moe_combine_backward_gate(g, yv.data(), st.data(), rows, c, ctx.grad_in(1).data());
                  });
  }
  Tensor<T, D> out = Tensor<T, D>::zeros({n, c});  // (N, C)
  {
    const T* py = yv.data();
    const T* pg = gv.data();
    const Index* pto = to.data();
    const Index* ptr = tr.data();
    T* po = out.data();
    cpu::parallel_for(n, std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, c)), [&](index_t lo, index_t hi) {
      for (index_t t = lo; t < hi; ++t) {
        T* dst = po + t * c;
        for (Index j = pto[t]; j < pto[t + 1]; ++j) {
          const index_t r = ptr[j];
          const T g = pg[r];
          const T* src = py + r * c;
          for (index_t i = 0; i < c; ++i) dst[i] += g * src[i];
        }
      }
    });
  }
  return record("combine_by_expert", std::move(out), {y_sorted, gate_sorted},
                [yv, gv, st, rows, c](autograd::BackwardContext<T, D>& ctx) {
                  const T* g = ctx.grad_out().data();  // (N, C)
                  const Index* pst = st.data();
                  const index_t grain = std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, c));
                  // Each sorted row reads its token's output gradient: no two rows write the same place.
                  if (ctx.needs_grad(0)) {  // dy[r] = gate[r] * dout[token[r]]
                    T* gy = ctx.grad_in(0).data();
                    const T* pg = gv.data();
                    cpu::parallel_for(rows, grain, [&](index_t lo, index_t hi) {
                      for (index_t r = lo; r < hi; ++r) {
                        const T* src = g + static_cast<index_t>(pst[r]) * c;
                        T* dst = gy + r * c;
                        for (index_t i = 0; i < c; ++i) dst[i] += pg[r] * src[i];
                      }
                    });
                  }
                  if (ctx.needs_grad(1)) {  // dgate[r] = <y[r], dout[token[r]]>
                    T* gg = ctx.grad_in(1).data();
                    const T* py = yv.data();
                    cpu::parallel_for(rows, grain, [&](index_t lo, index_t hi) {
                      for (index_t r = lo; r < hi; ++r) {
                        const T* src = g + static_cast<index_t>(pst[r]) * c;
                        const T* y = py + r * c;
                        double acc = 0;
                        for (index_t i = 0; i < c; ++i) acc += static_cast<double>(y[i]) * static_cast<double>(src[i]);
                        gg[r] += static_cast<T>(acc);
                      }
                    });
                  }
                });
}

namespace detail {

/// The frame of moe_forward and moe_forward_grouped: checks, plan, dispatch, the experts
/// (run(x_sorted, plan) -> y_sorted (M', C)), the gate gather and the weighted combine.
template <Scalar T, Device D, class Run>
Var<T, D> moe_forward_frame(const char* op, const Var<T, D>& x, const Routing<T, D>& routing, index_t num_experts,
                            double capacity_factor, Run&& run, DispatchPlan<D>* plan_out) {
  MIXMOE_CHECK(x.defined() && x.dim() == 2, op, "x must be (N, C), got ",
               x.defined() ? x.shape().to_string() : std::string("an undefined Var"));
  const index_t n = x.size(0), c = x.size(1);
  MIXMOE_CHECK(routing.num_experts == 0 || routing.num_experts == num_experts, op, "the routing is over ",
               routing.num_experts, " experts, the layer has ", num_experts);
  MIXMOE_CHECK(routing.num_tokens == 0 || routing.num_tokens == n, op, "the routing is over ", routing.num_tokens,
               " tokens, x of shape ", x.shape(), " has ", n);
  MIXMOE_CHECK(routing.gate.defined() && routing.gate.dim() == 1 && routing.gate.size(0) == routing.token.numel(), op,
               "routing.gate must be (M) with M = ", routing.token.numel(), " assignments, got ",
               routing.gate.defined() ? routing.gate.shape().to_string() : std::string("an undefined Var"));
  DispatchPlan<D> plan = make_dispatch_plan(routing.token, routing.expert, n, num_experts, capacity_factor);
  Var<T, D> out;
  if (plan.num_rows() == 0 || n == 0) {
    if (n == 0) (void)plan.dropped();  // no token to poison: an out-of-range id is reported here
    out = Var<T, D>(Tensor<T, D>::zeros({n, c}));  // nothing routed (or everything dropped)
  } else {
    const Var<T, D> x_sorted = dispatch_by_expert(x, plan);  // (M', C)
    const Var<T, D> y_sorted = run(x_sorted, plan);
    MIXMOE_CHECK(y_sorted.defined() && y_sorted.dim() == 2 && y_sorted.size(0) == plan.num_rows() &&
                     y_sorted.size(1) == c,
                 op, "the experts returned ", y_sorted.defined() ? y_sorted.shape().to_string() : "an undefined Var",
                 " for the sorted rows (", plan.num_rows(), ", ", c, ")");
    Var<T, D> gate_sorted;  // (M')
    if constexpr (Tensor<T, D>::on_host)
      gate_sorted = index_select(routing.gate, 0, plan.order);
    else  // plan.order holds each assignment at most once: a gather without a range check or atomics
      gate_sorted = select_distinct_on_device(routing.gate, plan.order);
    out = combine_by_expert(y_sorted, gate_sorted, plan, n);
  }
  if (plan_out) *plan_out = std::move(plan);
  return out;
}

}  // namespace detail

/// The MoE FFN over a routing: sorts the rows by expert, calls expert_fn(e, x_block (n_e, C)) -> (n_e, C)
/// once per expert, in expert order (an expert without rows on a (0, C) block, so that every expert's
/// parameters get a gradient, zero for that one), and combines the outputs weighted by routing.gate.
/// x (N, C) -> (N, C). When plan_out is given, the plan is stored there (dropped counts, loads).
/// On a device the per-expert blocks need the plan's counts on the host: one synchronisation per
/// call (moe_forward_grouped avoids it).
template <Scalar T, Device D, class ExpertFn>
Var<T, D> moe_forward(const Var<T, D>& x, const Routing<T, D>& routing, index_t num_experts, double capacity_factor,
                      ExpertFn&& expert_fn, DispatchPlan<D>* plan_out = nullptr) {
  static_assert(std::is_invocable_r_v<Var<T, D>, ExpertFn&, index_t, const Var<T, D>&>,
                "moe_forward: expert_fn must be callable as expert_fn(index_t expert, const Var<T, D>& rows (n, C)) "
                "and return Var<T, D> rows (n, C)");
  auto run = [&](const Var<T, D>& x_sorted, const DispatchPlan<D>& plan) {
    const index_t c = x_sorted.size(1);
    const IndexList& off = plan.offsets();
    std::vector<Var<T, D>, PoolAllocator<Var<T, D>>> blocks;
    blocks.reserve(static_cast<std::size_t>(num_experts));
    for (index_t e = 0; e < num_experts; ++e) {
      // An expert without rows is called too, on a (0, C) block: its parameters then get a (zero)
      // gradient, as in grouped execution, so an optimizer treats it the same either way (AdamW's
      // momentum and weight decay still apply to it).
      const index_t lo = off[e], hi = off[e + 1];
      const bool whole = lo == 0 && hi == plan.num_rows();
      Var<T, D> y = expert_fn(e, whole ? x_sorted : slice(x_sorted, 0, lo, hi));  // (n_e, C)
      MIXMOE_CHECK(y.defined() && y.dim() == 2 && y.size(0) == hi - lo && y.size(1) == c, "moe_forward", "expert ", e,
                   " returned ", y.defined() ? y.shape().to_string() : std::string("an undefined Var"),
                   " for a block of (", hi - lo, ", ", c, ")");
      blocks.push_back(std::move(y));
    }
    return blocks.size() == 1 ? blocks.front() : concat(std::span<const Var<T, D>>(blocks.data(), blocks.size()), 0);
  };
  return detail::moe_forward_frame("moe_forward", x, routing, num_experts, capacity_factor, run, plan_out);
}

/// The MoE FFN with all experts in one call: grouped_fn(x_sorted (M', C), plan) -> y_sorted (M', C),
/// where expert e's rows are [offsets[e], offsets[e + 1]) of plan.device_offsets (typically
/// grouped_linear over the experts' stacked weights, moe/grouped_gemm.hpp). On a device nothing is
/// read back in a dropless layer: no host synchronisation from routing to combine.
template <Scalar T, Device D, class GroupedFn>
Var<T, D> moe_forward_grouped(const Var<T, D>& x, const Routing<T, D>& routing, index_t num_experts,
                              double capacity_factor, GroupedFn&& grouped_fn, DispatchPlan<D>* plan_out = nullptr) {
  static_assert(std::is_invocable_r_v<Var<T, D>, GroupedFn&, const Var<T, D>&, const DispatchPlan<D>&>,
                "moe_forward_grouped: grouped_fn must be callable as grouped_fn(const Var<T, D>& x_sorted, "
                "const DispatchPlan<D>& plan) and return Var<T, D> rows (M', C)");
  return detail::moe_forward_frame("moe_forward_grouped", x, routing, num_experts, capacity_factor, grouped_fn,
                                   plan_out);
}

}  // namespace mixmoe
