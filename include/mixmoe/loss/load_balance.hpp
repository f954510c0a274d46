// Auxiliary router losses: load balance (Switch Transformer / GShard) and router z-loss (ST-MoE).
//
//   N tokens, E experts, M assignments; probs, logits (N, E)
//
//   load_balance_loss(routing) = E * sum_e f_e * P_e
//     f_e = (assignments routed to e) / M, a constant (the top-k choice has no gradient),
//     P_e = mean over tokens of probs[:, e], differentiable.
//     Perfectly uniform routing gives 1.0, whatever E and K; all tokens on one expert give E.
//     f counts the router's choices, dropped assignments included: the loss is about the
//     router's preference, not about what capacity let through.
//   router_z_loss(logits) = mean over tokens of logsumexp_e(logits[n, :])^2
//     keeps the logits small (one fused op with its own backward:
//     d/dlogits[n, e] = 2 z_n softmax(logits)[n, e] / N).
//
// Model-level forms: load_balance_loss(model) and router_z_loss(model) average over
// every router of every MoE layer found by visit_moe_layers (moe/moe_layer.hpp), from
// the layers' last forward call, so a balanced model gives 1.0 whatever its depth.
// A model without MoE layers gives a constant 0. Each reads a forward's routing once:
// a second call before the next forward is an error (it would be the previous step's
// loss, or the same term counted twice). So write
//   auto logits = model(ids);                                    // its own statement
//   auto loss = cross_entropy(logits, targets) + 0.01 * load_balance_loss(model);
// and not cross_entropy(model(ids), targets) + 0.01 * load_balance_loss(model), whose
// operands C++ may evaluate in either order.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/reduce.hpp"

namespace mixmoe {

/// Switch/GShard load-balance loss of one routing: E * sum_e f_e P_e (a scalar).
template <Scalar T, Device D>
Var<T, D> load_balance_loss(const Routing<T, D>& routing) {
  const Var<T, D>& probs = routing.probs;
  MIXMOE_CHECK(probs.defined() && probs.dim() == 2, "load_balance_loss", "routing.probs must be (N, E), got ",
               probs.defined() ? probs.shape().to_string() : std::string("an undefined Var"));
  const index_t n = probs.size(0), e_count = probs.size(1);
  MIXMOE_CHECK(n > 0 && e_count > 0, "load_balance_loss", "routing.probs ", probs.shape(), " is empty");
  MIXMOE_CHECK(routing.num_experts == 0 || routing.num_experts == e_count, "load_balance_loss", "routing.probs ",
               probs.shape(), " has ", e_count, " experts, the routing says ", routing.num_experts);
  MIXMOE_CHECK(routing.expert.defined() && routing.expert.dim() == 1, "load_balance_loss",
               "routing.expert must be a 1-D list of assignments, got ", routing.expert.shape());
  const Tensor<Index, D> ex = routing.expert.contiguous();
  const index_t m = ex.numel();
  Tensor<T, D> f = Tensor<T, D>::zeros({e_count});  // (E) fraction of assignments per expert
  if constexpr (!Tensor<T, D>::on_host) {
    // One block per expert counts its assignments. An expert id out of range makes every f NaN, so
    // the loss is NaN: visible without reading the ids back (the layer's dispatch plan has already
    // refused such a routing with a message).
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::moe_expert_fractions(ex.data(), m, e_count, f.data());
  } else {
    for (index_t i = 0; i < m; ++i) {
      const Index e = ex.data()[i];
      MIXMOE_CHECK(e >= 0 && e < e_count, "load_balance_loss", "expert ", e, " of assignment ", i,
                   " is out of range for ", e_count, " experts");
      f.data()[e] += T(1);
    }
    if (m > 0)
      for (index_t e = 0; e < e_count; ++e) f.data()[e] /= static_cast<T>(m);
  }
  const Var<T, D> p = mean(probs, 0);  // (E)
  return sum(p * Var<T, D>(f)) * static_cast<double>(e_count);
}

/// Router z-loss of logits (N, E): mean_n logsumexp(logits[n, :])^2 (a scalar).
template <Scalar T, Device D>
Var<T, D> router_z_loss(const Var<T, D>& logits) {
  MIXMOE_CHECK(logits.defined() && logits.dim() == 2, "router_z_loss", "logits must be (N, E), got ",
               logits.defined() ? logits.shape().to_string() : std::string("an undefined Var"));
  const index_t n = logits.size(0), e_count = logits.size(1);
  MIXMOE_CHECK(n > 0 && e_count > 0, "router_z_loss", "logits ", logits.shape(), " are empty");
  const Tensor<T, D> lv = logits.value().contiguous();  // (N, E)
  Tensor<double, D> z = Tensor<double, D>::empty({n});  // (N) logsumexp per token, in double
  if constexpr (!Tensor<T, D>::on_host) {
    // One warp per token for z, one block for the mean of z^2; the backward reads the output
    // gradient on the device (no item()).
    detail::require_device_ops<D>();
    using Ops = detail::DeviceOps<D>;
    auto out = Tensor<T, D>::empty(Shape{});
    Ops::moe_z_loss(lv.data(), n, e_count, z.data(), out.data());
    return record("router_z_loss", std::move(out), {logits}, [lv, z, n, e_count](autograd::BackwardContext<T, D>& ctx) {
      Ops::moe_z_loss_backward(lv.data(), z.data(), ctx.grad_out().data(), n, e_count, ctx.grad_in(0).data());
    });
  }
  {
    const T* pl = lv.data();
    double* pz = z.data();
    cpu::parallel_for(n, std::max<index_t>(1, (1 << 14) / e_count), [&](index_t lo, index_t hi) {
      for (index_t t = lo; t < hi; ++t) {
        const T* row = pl + t * e_count;
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t e = 0; e < e_count; ++e) mx = std::max(mx, static_cast<double>(row[e]));
        double s = 0;
        for (index_t e = 0; e < e_count; ++e) s += std::exp(static_cast<double>(row[e]) - mx);
        pz[t] = mx + std::log(s);
      }
    });
  }
  double acc = 0;
  for (index_t t = 0; t < n; ++t) acc += z.data()[t] * z.data()[t];
  auto out = Tensor<T, D>::scalar(static_cast<T>(acc / static_cast<double>(n)));
  return record("router_z_loss", std::move(out), {logits}, [lv, z, n, e_count](autograd::BackwardContext<T, D>& ctx) {
    const double g = static_cast<double>(ctx.grad_out().item()) * 2.0 / static_cast<double>(n);
    T* gl = ctx.grad_in(0).data();
    const T* pl = lv.data();
    const double* pz = z.data();
    cpu::parallel_for(n, std::max<index_t>(1, (1 << 14) / e_count), [&](index_t lo, index_t hi) {
      for (index_t t = lo; t < hi; ++t) {
        const double zt = pz[t];
        for (index_t e = 0; e < e_count; ++e) {
          // softmax = exp(logit - logsumexp)
          const double sm = std::exp(static_cast<double>(pl[t * e_count + e]) - zt);
          gl[t * e_count + e] += static_cast<T>(g * zt * sm);
        }
      }
    });
  });
}

/// Router z-loss of one routing's logits.
template <Scalar T, Device D>
Var<T, D> router_z_loss(const Routing<T, D>& routing) {
  return router_z_loss(routing.logits);
}

namespace detail {

/// Mean of loss(record.routing) over every router record of every MoE layer of a model.
template <class Model, class Loss>
Var<typename Model::value_type, typename Model::device_type> mean_over_routers(const Model& model, const char* op,
                                                                               unsigned loss_bit, Loss&& loss) {
  using V = Var<typename Model::value_type, typename Model::device_type>;
  using Tn = Tensor<typename Model::value_type, typename Model::device_type>;
  // Check every layer before marking any, so a refused call leaves the records as they were.
  index_t layer = 0;
  visit_moe_layers(model, [&](const auto& moe) {
    MIXMOE_CHECK(!moe.routing_records().empty(), op, "MoE layer ", layer,
                 " has no recorded routing: run a forward pass before computing the loss (in its own statement: in "
                 "`cross_entropy(model(x), y) + loss(model)` C++ may evaluate the loss first)");
    for (const auto& rec : moe.routing_records()) {
      MIXMOE_CHECK(!rec.graph_released, op, "the routing graph of MoE layer ", layer, " (", rec.name,
                   ") was released (release_routing_graphs): run a forward pass first");
      MIXMOE_CHECK(!(rec.read_by_losses & loss_bit), op, "the routing of MoE layer ", layer, " (", rec.name,
                   ") was already used by this loss: run a forward pass first (in its own statement: in "
                   "`cross_entropy(model(x), y) + loss(model)` C++ may evaluate the loss first)");
    }
    ++layer;
  });
  V total;
  index_t count = 0;
  visit_moe_layers(model, [&](const auto& moe) {
    for (const auto& rec : moe.routing_records()) {
      rec.read_by_losses |= loss_bit;
      V l = loss(rec.routing);
      total = total.defined() ? total + l : l;
      ++count;
    }
  });
  if (count == 0) return V(Tn::scalar(0));
  return count == 1 ? total : total * (1.0 / static_cast<double>(count));
}

}  // namespace detail

/// Load-balance loss of a model: the mean over all routers of all its MoE layers (last forward).
template <Module Model>
Var<typename Model::value_type, typename Model::device_type> load_balance_loss(const Model& model) {
  return detail::mean_over_routers(model, "load_balance_loss", 1u, [](const auto& r) { return load_balance_loss(r); });
}

/// Router z-loss of a model: the mean over all routers of all its MoE layers (last forward).
template <Module Model>
Var<typename Model::value_type, typename Model::device_type> router_z_loss(const Model& model) {
  return detail::mean_over_routers(model, "router_z_loss", 2u, [](const auto& r) { return router_z_loss(r.logits); });
}

}  // namespace mixmoe
