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
//
// Order: the rows of one expert are in token order (ties, a token sent twice to the
// same expert, in assignment order). The plan is a counting sort, computed on one
// thread, so the order and every sum below are the same whatever the thread count.
//
// On a device (Cuda) the plan is computed there (a stable sort of the assignments by
// (expert, token), backend/cuda/moe.cuh) in the same order as on the CPU; the expert
// offsets and routed counts come back to the host in one small copy per plan, the one
// synchronisation of the MoE layer (they size the per-expert GEMMs). dispatch_by_expert,
// combine_by_expert and the gate gather of moe_forward run as device kernels whose every
// output is summed by one thread in the plan's order (no atomics): deterministic.
//
// Capacity mode (capacity_factor > 0): capacity = ceil(capacity_factor * M / E); an
// expert keeps its first `capacity` assignments in token order and drops the rest.
// A dropped assignment reads nothing and adds nothing (its token keeps only what its
// other experts give, plus the residual around the layer); plan.dropped counts them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

/// Where every assignment of a routing goes: the rows sorted by expert, and per token
/// the sorted rows that add into it. Index tensors live on the device; the expert
/// offsets are host values because they size the per-expert GEMMs.
template <Device D = Cpu>
struct DispatchPlan {
  Tensor<Index, D> order;          // (M') assignment index of each sorted row
  Tensor<Index, D> sorted_token;   // (M') token (row of x) of each sorted row
  Tensor<Index, D> token_offsets;  // (N + 1) token n's rows are token_rows[token_offsets[n] .. token_offsets[n + 1])
  Tensor<Index, D> token_rows;     // (M') sorted rows grouped by token, ascending within a token
  IndexList offsets;               // (E + 1) rows [offsets[e], offsets[e + 1]) belong to expert e
  IndexList routed;                // (E) assignments the router sent to each expert, dropped ones included
  index_t num_tokens = 0;          // N
  index_t num_experts = 0;         // E
  index_t num_assignments = 0;     // M
  index_t capacity = 0;            // rows an expert may keep; 0 = dropless
  index_t dropped = 0;             // M - M'
  // (E + 1) the offsets in the device's memory, for kernels such as the grouped GEMM; set on
  // devices other than Cpu, undefined on Cpu.
  Tensor<index_t, D> device_offsets;

  /// M', the rows of x_sorted.
  [[nodiscard]] index_t num_rows() const { return offsets.empty() ? 0 : offsets.back(); }
  /// Rows kept for expert e.
  [[nodiscard]] index_t rows_of(index_t e) const { return offsets[e + 1] - offsets[e]; }
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

/// make_dispatch_plan on a device (token, expert contiguous; the sizes checked by the caller).
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
  IndexList host(static_cast<std::size_t>(2 + 2 * e_count), 0);   // first bad, routed (E), offsets (E + 1)
  // The one device->host copy of the plan (offsets and routed, with the range check's result).
  Ops::moe_plan_count(tc.data(), ec.data(), m, n, e_count, capacity, keys.data(), ids.data(), meta.data(), host.data());
  if (host[0] >= 0) {  // the first assignment with an id out of range: the CPU's message (error path only)
    const index_t i = host[0];
    const Index t = tc[i].item(), x = ec[i].item();
    MIXMOE_CHECK(t >= 0 && t < n, "dispatch", "token ", t, " of assignment ", i, " is out of range for ", n, " tokens");
    MIXMOE_CHECK(x >= 0 && x < e_count, "dispatch", "expert ", x, " of assignment ", i, " is out of range for ",
                 e_count, " experts");
  }
  plan.routed.assign(host.begin() + 1, host.begin() + 1 + e_count);
  plan.offsets.assign(host.begin() + 1 + e_count, host.begin() + 2 + 2 * e_count);
  const index_t rows = plan.offsets.back();
  plan.dropped = m - rows;
  plan.order = Tensor<Index, D>::empty({rows});
  plan.sorted_token = Tensor<Index, D>::empty({rows});
  plan.token_offsets = Tensor<Index, D>::empty({n + 1});
  plan.token_rows = Tensor<Index, D>::empty({rows});
  Ops::moe_plan_place(keys.data(), ids.data(), meta.data(), m, n, e_count, rows, plan.order.data(),
                      plan.sorted_token.data(), plan.token_offsets.data(), plan.token_rows.data());
  plan.device_offsets = meta.slice(0, 1 + e_count, 2 + 2 * e_count);  // (E + 1), a view of meta
  return plan;
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
  for (index_t i = 0; i < m; ++i) {
    MIXMOE_CHECK(tok[i] >= 0 && tok[i] < n, "dispatch", "token ", tok[i], " of assignment ", i, " is out of range for ",
                 n, " tokens");
    MIXMOE_CHECK(ex[i] >= 0 && ex[i] < e_count, "dispatch", "expert ", ex[i], " of assignment ", i,
                 " is out of range for ", e_count, " experts");
  }

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
  plan.routed.assign(static_cast<std::size_t>(e_count), 0);
  for (index_t i = 0; i < m; ++i) ++plan.routed[static_cast<std::size_t>(ex[i])];
  plan.offsets.assign(static_cast<std::size_t>(e_count) + 1, 0);
  for (index_t e = 0; e < e_count; ++e) {
    const index_t kept = capacity > 0 ? std::min(plan.routed[e], capacity) : plan.routed[e];
    plan.offsets[e + 1] = plan.offsets[e] + kept;
  }
  const index_t rows = plan.offsets.back();
  plan.dropped = m - rows;
  plan.order = Tensor<Index, D>::empty({rows});
  plan.sorted_token = Tensor<Index, D>::empty({rows});
  {
    IndexList fill(static_cast<std::size_t>(e_count), 0);
    Index* ord = plan.order.data();
    Index* st = plan.sorted_token.data();
    for (const Index a : by_token) {
      const index_t e = ex[a];
      if (fill[e] == plan.offsets[e + 1] - plan.offsets[e]) continue;  // over capacity: dropped
      const index_t r = plan.offsets[e] + fill[e]++;
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
    Ops::moe_combine(yv.data(), gv.data(), to.data(), tr.data(), n, c, dout.data());
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

/// The MoE FFN over a routing: sorts the rows by expert, calls expert_fn(e, x_block (n_e, C)) -> (n_e, C)
/// once per expert with rows (in expert order), and combines the outputs weighted by routing.gate.
/// x (N, C) -> (N, C). When plan_out is given, the plan is stored there (dropped counts, loads).
template <Scalar T, Device D, class ExpertFn>
Var<T, D> moe_forward(const Var<T, D>& x, const Routing<T, D>& routing, index_t num_experts, double capacity_factor,
                      ExpertFn&& expert_fn, DispatchPlan<D>* plan_out = nullptr) {
  static_assert(std::is_invocable_r_v<Var<T, D>, ExpertFn&, index_t, const Var<T, D>&>,
                "moe_forward: expert_fn must be callable as expert_fn(index_t expert, const Var<T, D>& rows (n, C)) "
                "and return Var<T, D> rows (n, C)");
  MIXMOE_CHECK(x.defined() && x.dim() == 2, "moe_forward", "x must be (N, C), got ",
               x.defined() ? x.shape().to_string() : std::string("an undefined Var"));
  const index_t n = x.size(0), c = x.size(1);
  MIXMOE_CHECK(routing.num_experts == 0 || routing.num_experts == num_experts, "moe_forward", "the routing is over ",
               routing.num_experts, " experts, the layer has ", num_experts);
  MIXMOE_CHECK(routing.num_tokens == 0 || routing.num_tokens == n, "moe_forward", "the routing is over ",
               routing.num_tokens, " tokens, x of shape ", x.shape(), " has ", n);
  MIXMOE_CHECK(routing.gate.defined() && routing.gate.dim() == 1 && routing.gate.size(0) == routing.token.numel(),
               "moe_forward", "routing.gate must be (M) with M = ", routing.token.numel(), " assignments, got ",
               routing.gate.defined() ? routing.gate.shape().to_string() : std::string("an undefined Var"));
  DispatchPlan<D> plan = make_dispatch_plan(routing.token, routing.expert, n, num_experts, capacity_factor);
  Var<T, D> out;
  if (plan.num_rows() == 0) {
    out = Var<T, D>(Tensor<T, D>::zeros({n, c}));  // nothing routed (or everything dropped)
  } else {
    const Var<T, D> x_sorted = dispatch_by_expert(x, plan);  // (M', C)
    std::vector<Var<T, D>, PoolAllocator<Var<T, D>>> blocks;
    blocks.reserve(static_cast<std::size_t>(num_experts));
    for (index_t e = 0; e < num_experts; ++e) {
      const index_t lo = plan.offsets[e], hi = plan.offsets[e + 1];
      if (lo == hi) continue;
      const bool whole = lo == 0 && hi == plan.num_rows();
      Var<T, D> y = expert_fn(e, whole ? x_sorted : slice(x_sorted, 0, lo, hi));  // (n_e, C)
      MIXMOE_CHECK(y.defined() && y.dim() == 2 && y.size(0) == hi - lo && y.size(1) == c, "moe_forward", "expert ", e,
                   " returned ", y.defined() ? y.shape().to_string() : std::string("an undefined Var"),
                   " for a block of (", hi - lo, ", ", c, ")");
      blocks.push_back(std::move(y));
    }
    const Var<T, D> y_sorted =
        blocks.size() == 1 ? blocks.front() : concat(std::span<const Var<T, D>>(blocks.data(), blocks.size()), 0);
    Var<T, D> gate_sorted;  // (M')
    if constexpr (Tensor<T, D>::on_host)
      gate_sorted = index_select(routing.gate, 0, plan.order);
    else  // plan.order holds each assignment at most once: a gather without a range check or atomics
      gate_sorted = detail::select_distinct_on_device(routing.gate, plan.order);
    out = combine_by_expert(y_sorted, gate_sorted, plan, n);
  }
  if (plan_out) *plan_out = std::move(plan);
  return out;
}

}  // namespace mixmoe
