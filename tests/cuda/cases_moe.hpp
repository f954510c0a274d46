// Parity cases of the MoE layers (moe/, loss/load_balance.hpp): the dispatch plan (dropless and
// with capacity), dispatch_by_expert / combine_by_expert and moe_forward forward and backward, every
// router, a MixedMoE layer (group_gate and shared_router, Fourier features) and a SharedExpertMoE
// with their auxiliary losses (experts run per expert and grouped), the losses on their own, the
// grouped GEMM against per-expert GEMMs (float, double, bf16 inputs) and grouped_linear's backward.
//
// Index results (the plan's order, rows, offsets, the routers' selections) must be equal exactly.
// The routers' inputs are random normal: two logits (or probabilities) close enough for the two
// devices' rounding to order them differently are practically impossible, so the top-k selections
// agree and the comparison of everything downstream makes sense. A failure of a selection entry
// (tolerance 0) with everything upstream passing would point at such a tie first.
#pragma once

#include <mixmoe/loss/load_balance.hpp>
#include <mixmoe/moe/dispatch.hpp>
#include <mixmoe/moe/expert_choice_router.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/grouped_gemm.hpp>
#include <mixmoe/moe/hash_router.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/routing_stats.hpp>
#include <mixmoe/moe/shared_expert.hpp>
#include <mixmoe/moe/switch_router.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/ops/elementwise.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/ops/shape_ops.hpp>
#include <mixmoe/ops/unary.hpp>

#include <string>
#include <vector>

#include "parity.hpp"

namespace mixmoe_parity {

namespace moe_cases {

using mixmoe::Index;

/// A host list (offsets, counts) as a tensor for put().
template <class List>
mixmoe::Tensor<std::int64_t, mixmoe::Cpu> host_list(const List& v) {
  std::vector<std::int64_t> out(v.begin(), v.end());
  return mixmoe::Tensor<std::int64_t, mixmoe::Cpu>::from(out, mixmoe::Shape{static_cast<index_t>(out.size())});
}

template <class D>
mixmoe::Tensor<Index, D> indices(const std::vector<int>& v) {
  return mixmoe::Tensor<Index, D>::from_indices(std::span<const int>(v), mixmoe::Shape{static_cast<index_t>(v.size())});
}

/// Random assignments: m (token, expert) pairs with tokens in [0, n), experts in [0, e_used) of e.
struct Assignments {
  std::vector<int> token, expert;
};
inline Assignments random_assignments(index_t m, index_t n, index_t e_used, std::uint64_t seed) {
  mixmoe::Generator gen(seed);
  Assignments a;
  for (index_t i = 0; i < m; ++i) {
    a.token.push_back(static_cast<int>(gen.below(static_cast<std::uint64_t>(n))));
    a.expert.push_back(static_cast<int>(gen.below(static_cast<std::uint64_t>(e_used))));
  }
  return a;
}
/// Token-major top-k style: token i's k experts (distinct) in random order.
inline Assignments token_major(index_t n, index_t k, index_t e, std::uint64_t seed) {
  mixmoe::Generator gen(seed);
  Assignments a;
  for (index_t i = 0; i < n; ++i) {
    std::vector<int> picked;
    while (static_cast<index_t>(picked.size()) < k) {
      const int x = static_cast<int>(gen.below(static_cast<std::uint64_t>(e)));
      bool seen = false;
      for (int p : picked) seen = seen || p == x;
      if (!seen) picked.push_back(x);
    }
    for (int x : picked) {
      a.token.push_back(static_cast<int>(i));
      a.expert.push_back(x);
    }
  }
  return a;
}

template <class T, class D>
void put_plan(Results& r, const std::string& name, const mixmoe::DispatchPlan<D>& plan) {
  put(r, name + " order", plan.order, 0);
  put(r, name + " sorted_token", plan.sorted_token, 0);
  put(r, name + " token_offsets", plan.token_offsets, 0);
  put(r, name + " token_rows", plan.token_rows, 0);
  put(r, name + " offsets", host_list(plan.offsets()), 0);
  put(r, name + " routed", host_list(plan.routed()), 0);
  put(r, name + " dropped/capacity", host_list(std::vector<index_t>{plan.dropped(), plan.capacity, plan.num_rows()}), 0);
  put(r, name + " device offsets", plan.device_offsets, 0);  // the offsets on the plan's device
}

/// The dispatch plan over several routings: random (with a token sent twice to one expert),
/// token-major, expert-major, empty experts, no assignments, a large one; dropless and capacity.
template <class T, class D>
void plan_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  struct Case {
    const char* name;
    Assignments a;
    index_t n, e;
  };
  std::vector<Case> cases;
  cases.push_back({"random", random_assignments(40, 7, 3, 11), 7, 3});
  cases.push_back({"token-major", token_major(257, 2, 8, 12), 257, 8});
  {
    Assignments ec;  // expert-major, as expert choice routes: expert j's tokens, in descending score (random here)
    mixmoe::Generator gen(13);
    for (int j = 0; j < 5; ++j)
      for (int q = 0; q < 9; ++q) {
        ec.expert.push_back(j);
        ec.token.push_back(static_cast<int>(gen.below(33)));
      }
    cases.push_back({"expert-major", ec, 33, 5});
  }
  cases.push_back({"empty experts", random_assignments(100, 50, 3, 14), 50, 7});  // experts 3..6 get nothing
  cases.push_back({"no assignments", Assignments{}, 4, 3});
  cases.push_back({"one expert", random_assignments(17, 1000, 1, 15), 1000, 1});
  cases.push_back({"large", token_major(20000, 2, 64, 16), 20000, 64});
  for (const Case& c : cases) {
    const auto tok = moe_cases::indices<D>(c.a.token), ex = moe_cases::indices<D>(c.a.expert);
    for (double factor : {0.0, 0.5, 1.25}) {
      const DispatchPlan<D> plan = make_dispatch_plan(tok, ex, c.n, c.e, factor);
      put_plan<T, D>(r, t + " plan " + c.name + " capacity_factor " + std::to_string(factor), plan);
    }
  }
}

/// dispatch_by_expert, combine_by_expert and moe_forward, forward and backward, over channel widths
/// 1 .. 1030, a strided x, dropless and capacity plans.
template <class T, class D>
void dispatch_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-6, 1e-12);
  std::uint64_t seed = 1000;
  for (index_t c : {index_t{1}, index_t{7}, index_t{33}, index_t{257}, index_t{1030}}) {
    const index_t n = c >= 257 ? 19 : 61, e = 6;
    for (double factor : {0.0, 0.75}) {
      const std::string name = t + " C " + std::to_string(c) + " capacity_factor " + std::to_string(factor);
      const Assignments a = random_assignments(n * 2, n, e, ++seed);
      const auto tok = moe_cases::indices<D>(a.token), ex = moe_cases::indices<D>(a.expert);
      const DispatchPlan<D> plan = make_dispatch_plan(tok, ex, n, e, factor);
      // dispatch alone, x a transposed (strided) view of a leaf
      {
        auto xt = leaf<T, D>({c, n}, ++seed);
        Var<T, D> x = transpose(xt, 0, 1);  // (N, C), strided
        Var<T, D> xs = dispatch_by_expert(x, plan);
        backward_random(xs, ++seed);
        put(r, name + " dispatch y", xs, 0);  // a row copy: exact
        put(r, name + " dispatch dx", xt.grad(), tl);
      }
      // combine alone, leaves y_sorted and gate_sorted
      {
        auto y = leaf<T, D>({plan.num_rows(), c}, ++seed);
        auto g = leaf<T, D>({plan.num_rows()}, ++seed);
        Var<T, D> out = combine_by_expert(y, g, plan, n);
        backward_random(out, ++seed);
        put(r, name + " combine out", out, tl);
        if (plan.num_rows() > 0) {
          put(r, name + " combine dy", y.grad(), tl);
          put(r, name + " combine dgate", g.grad(), tl);
        }
      }
      // moe_forward with a non-linear expert per e, gates a leaf over the assignments
      {
        Routing<T, D> routing;
        routing.token = tok;
        routing.expert = ex;
        routing.gate = leaf<T, D>({n * 2}, ++seed);
        routing.num_experts = e;
        routing.num_tokens = n;
        auto x = leaf<T, D>({n, c}, ++seed);
        DispatchPlan<D> used;
        Var<T, D> out = moe_forward(
            x, routing, e, factor,
            [](index_t ex_id, const Var<T, D>& rows) { return tanh(rows) * (1.0 + 0.5 * static_cast<double>(ex_id)); },
            &used);
        backward_random(out, ++seed);
        put(r, name + " moe_forward out", out, tl);
        put(r, name + " moe_forward dx", x.grad(), tl);
        put(r, name + " moe_forward dgate", routing.gate.grad(), tl);
        put(r, name + " moe_forward offsets", host_list(used.offsets()), 0);
      }
    }
  }
}

/// sum(a * ra) + sum(b * rb) for random constants ra, rb: one scalar whose gradient reaches both.
template <class T, class D>
mixmoe::Var<T, D> two_term_loss(const mixmoe::Var<T, D>& a, const mixmoe::Var<T, D>& b, std::uint64_t seed) {
  using namespace mixmoe;
  Var<T, D> ra(randn<T, D>(a.shape(), seed)), rb(randn<T, D>(b.shape(), seed + 1));
  return sum(a * ra) + sum(b * rb);
}

template <class T, class D>
void put_routing(Results& r, const std::string& name, const mixmoe::Routing<T, D>& routing, double tl) {
  put(r, name + " token", routing.token, 0);
  put(r, name + " expert", routing.expert, 0);
  put(r, name + " gate", routing.gate, tl);
  put(r, name + " probs", routing.probs, tl);
  put(r, name + " logits", routing.logits, tl);
}

/// Every router (and the Fourier wrappers), forward and the gradients of gate and probs.
template <class T, class D>
void router_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-5, 1e-11);
  const index_t n = 37, c = 32, e = 8;
  const RouterShape shape{c, e, 2, 100};
  const auto run = [&](const std::string& name, auto router, std::uint64_t seed) {
    auto x = leaf<T, D>({n, c}, seed);
    RouteContext<D> ctx;
    const Routing<T, D> routing = router(x, ctx);
    put_routing(r, t + " " + name, routing, tl);
    two_term_loss(routing.gate, routing.probs, seed + 1).backward();
    put(r, t + " " + name + " dx", x.grad(), tl);
    for (auto& [pname, p] : named_parameters(router)) put(r, t + " " + name + " d" + pname, p.grad(), tl);
  };
  Generator gen(500);
  run("top-2 renormalised", TopKRouter<T, D, 2, true>(shape, gen), 501);
  run("top-3 not renormalised", TopKRouter<T, D, 3, false>(shape, gen), 502);
  run("switch", SwitchRouter<T, D>(shape, gen), 503);
  run("expert choice", ExpertChoiceRouter<T, D>(shape, gen), 504);
  {
    ExpertChoiceRouter<T, D> ec(RouterShape{c, e, 1, 0}, gen);
    ec.capacity_factor = 2.5;  // c = ceil(37 * 2.5 / 8) = 12 tokens per expert
    run("expert choice capacity 2.5", ec, 505);
  }
  using FFT = bind_router_t<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, T, D>;
  run("fourier fft-magnitude top-2", FFT(shape, gen), 506);
  using DCTR = bind_router_t<FourierFeatures<Switch, transform::DCT>, T, D>;
  run("fourier dct switch", DCTR(shape, gen), 507);
  using RealImag = bind_router_t<FourierFeatures<TopK<2>, transform::FFTRealImag>, T, D>;
  run("fourier real-imag top-2", RealImag(shape, gen), 508);
  // hash routing: no parameters, no gradient; ids of a (B, T) batch
  for (index_t k : {index_t{1}, index_t{3}}) {
    HashRouter<T, D> hr(RouterShape{c, e, k, 100}, gen);
    hr.seed = 7;
    std::vector<int> ids;
    Generator g2(509);
    for (index_t i = 0; i < n; ++i) ids.push_back(static_cast<int>(g2.below(100)));
    const Tensor<Index, D> id_tensor = Tensor<Index, D>::from_indices(std::span<const int>(ids), Shape{1, n});
    RouteContext<D> ctx;
    ctx.token_ids = &id_tensor;
    const Routing<T, D> routing = hr(leaf<T, D>({n, c}, 510), ctx);
    put_routing(r, t + " hash k " + std::to_string(k), routing, 0);
  }
}

template <class T, class D>
using LM = mixmoe::ExpertGroup<mixmoe::SwiGLU<T, D>, mixmoe::tag::lm>;
template <class T, class D>
using MT = mixmoe::ExpertGroup<mixmoe::SwiGLU<T, D>, mixmoe::tag::mt>;
using FourierRoute = mixmoe::FourierFeatures<mixmoe::TopK<2>, mixmoe::transform::FFTMagnitude<>>;
template <class T, class D>
using MixLayer = mixmoe::MixedMoE<FourierRoute, LM<T, D>, MT<T, D>>;

/// The layers' sizes: d_model 32, 2 LM + 2 MT experts of width 24, top-2.
inline mixmoe::ModelConfig layer_config() {
  mixmoe::ModelConfig cfg;
  cfg.vocab = 64;
  cfg.d_model = 32;
  cfg.heads = 2;
  cfg.layers = 2;
  cfg.d_ff = 48;
  cfg.moe.experts_per_group = {2, 2};
  cfg.moe.expert_hidden = 24;
  cfg.moe.top_k = 2;
  return cfg;
}

/// Output, input gradient and every parameter gradient of a layer on sum(out * g) plus its
/// auxiliary losses; the losses' values and the routing records' counts.
template <class T, class D, class Layer>
void layer_case(Results& r, const std::string& name, Layer& layer, index_t n, index_t c, double tl,
                std::uint64_t seed) {
  using namespace mixmoe;
  auto x = leaf<T, D>({n, c}, seed);
  Var<T, D> out = layer(x);
  Var<T, D> lb = load_balance_loss(layer), z = router_z_loss(layer);
  Var<T, D> g(randn<T, D>(out.shape(), seed + 1));
  Var<T, D> total = sum(out * g) + lb * 0.1 + z * 0.01;
  total.backward();
  put(r, name + " out", out, tl);
  put(r, name + " load_balance", lb, tl);
  put(r, name + " z_loss", z, tl);
  put(r, name + " dx", x.grad(), tl);
  for (auto& [pname, p] : named_parameters(layer)) put(r, name + " d" + pname, p.grad(), tl);
  visit_moe_layers(layer, [&](const auto& moe) {
    for (const auto& rec : moe.routing_records()) {
      put(r, name + " " + rec.name + " routed", host_list(rec.routed()), 0);
      put(r, name + " " + rec.name + " kept", host_list(rec.kept()), 0);
      put(r, name + " " + rec.name + " expert", rec.routing.expert, 0);
      const RoutingStats st = routing_stats(rec);
      put(r, name + " " + rec.name + " stats", host_list(std::vector<index_t>{st.dropped, st.num_assignments}), 0);
    }
  });
}

/// MixedMoE (d_model 32, 2 LM + 2 MT SwiGLU experts, top-2, Fourier FFT-magnitude router features)
/// in group_gate and shared_router mixes, dropless and with capacity, and a SharedExpertMoE.
template <class T, class D>
void layer_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(5e-5, 1e-10);
  ModelConfig cfg = layer_config();
  const index_t n = 29;
  std::uint64_t seed = 700;
  for (GroupMix mix : {GroupMix::group_gate, GroupMix::shared_router}) {
    for (double factor : {0.0, 1.0}) {
      cfg.moe.mix = mix;
      cfg.moe.capacity_factor = factor;
      Generator gen(++seed);
      MixLayer<T, D> layer(cfg, gen);
      const std::string name = t + " mixed_moe " + (mix == GroupMix::group_gate ? "group_gate" : "shared_router") +
                               " capacity_factor " + std::to_string(factor);
      layer_case<T, D>(r, name, layer, n, cfg.d_model, tl, ++seed);
    }
  }
  // Explicit execution on both devices (automatic is per_expert on Cpu and grouped on a device, so
  // the cases above already compare the two paths across devices): fused shared-router groups and
  // per-group calls over widths 24 and 16.
  for (ExpertExecution ex : {ExpertExecution::grouped, ExpertExecution::per_expert})
    for (index_t hidden : {index_t{24}, index_t{0}}) {
      cfg.moe.mix = GroupMix::shared_router;
      cfg.moe.capacity_factor = 0;
      cfg.moe.execution = ex;
      cfg.moe.expert_hidden = hidden;
      cfg.moe.experts_per_group = hidden == 0 ? std::vector<index_t>{2, 3} : std::vector<index_t>{2, 2};
      Generator gen(++seed);
      MixLayer<T, D> layer(cfg, gen);
      const std::string name = t + " mixed_moe shared_router " +
                               (ex == ExpertExecution::grouped ? "grouped" : "per_expert") + " hidden " +
                               std::to_string(hidden);
      layer_case<T, D>(r, name, layer, n, cfg.d_model, tl, ++seed);
    }
  cfg.moe.execution = ExpertExecution::automatic;
  cfg.moe.expert_hidden = 24;
  cfg.moe.experts_per_group = {2, 2};
  {  // bf16 expert GEMMs (a float layer for both T; the f64 entry repeats it)
    cfg.moe.mix = GroupMix::group_gate;
    cfg.moe.expert_precision = MatmulPrecision::bf16;
    Generator gen(++seed);
    MixLayer<float, D> layer(cfg, gen);
    layer_case<float, D>(r, t + " mixed_moe group_gate bf16 experts", layer, n, cfg.d_model, 5e-5, ++seed);
    cfg.moe.expert_precision = MatmulPrecision::native;
  }
  {
    cfg.moe.mix = GroupMix::fixed;
    cfg.moe.capacity_factor = 0;
    Generator gen(++seed);
    SharedExpertMoE<MixLayer<T, D>, SwiGLU<T, D>> layer(cfg, gen);
    layer_case<T, D>(r, t + " shared_expert fixed", layer, n, cfg.d_model, tl, ++seed);
  }
}

/// The auxiliary losses on their own: load balance of a router's routing, z-loss over widths.
template <class T, class D>
void loss_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  const double tl = tol<T>(1e-5, 1e-11);
  {
    Generator gen(800);
    TopKRouter<T, D, 2> router(RouterShape{16, 7, 2, 0}, gen);
    auto x = leaf<T, D>({45, 16}, 801);
    const Routing<T, D> routing = router(x, RouteContext<D>{});
    Var<T, D> lb = load_balance_loss(routing);
    lb.backward();
    put(r, t + " load_balance value", lb, tl);
    put(r, t + " load_balance dx", x.grad(), tl);
    put(r, t + " load_balance dweight", router.weight.grad(), tl);
  }
  std::uint64_t seed = 810;
  for (index_t e : {index_t{1}, index_t{7}, index_t{33}, index_t{257}, index_t{1030}}) {
    auto logits = leaf<T, D>({e > 200 ? index_t{9} : index_t{70}, e}, ++seed, 3.0);
    Var<T, D> z = router_z_loss(logits);
    z.backward();
    put(r, t + " z_loss E " + std::to_string(e) + " value", z, tl);
    put(r, t + " z_loss E " + std::to_string(e) + " dlogits", logits.grad(), tl);
  }
}

/// The grouped GEMM against one cpu::gemm per expert (the Cpu path), float / double and bf16.
template <class T, class D>
void grouped_gemm_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  struct Case {
    std::vector<index_t> rows;  // per expert; 0 = an empty expert
    index_t k, n;
  };
  const std::vector<Case> cases = {
      {{0, 70, 1, 0, 130}, 33, 65},            // empty experts, rows not a multiple of the 64-row tile
      {{64, 64}, 16, 64},                      // exact tiles
      {{5, 0, 0}, 1, 1},                       // K = 1, N = 1, empty experts at the end
      {{3, 200, 17, 64, 1, 90, 300}, 100, 7},  // many tiles, K past several 16-deep steps
  };
  std::uint64_t seed = 900;
  for (const Case& c : cases) {
    const index_t e = static_cast<index_t>(c.rows.size());
    std::vector<index_t> off(1, 0);
    for (index_t rows : c.rows) off.push_back(off.back() + rows);
    const index_t m = off.back();
    const auto offsets = Tensor<index_t, D>::from(off, Shape{e + 1});
    std::string sizes = "rows";
    for (index_t rows : c.rows) {
      sizes += ' ';
      sizes += std::to_string(rows);
    }
    sizes += " K ";
    sizes += std::to_string(c.k);
    sizes += " N ";
    sizes += std::to_string(c.n);
    for (bool trans_b : {false, true}) {
      const std::string name = t + " grouped_gemm " + sizes + (trans_b ? " B^T" : "");
      const Tensor<T, D> a = randn<T, D>({m, c.k}, ++seed);
      const Tensor<T, D> b = randn<T, D>(trans_b ? Shape{e, c.n, c.k} : Shape{e, c.k, c.n}, ++seed);
      put(r, name, grouped_matmul(a, b, offsets, trans_b), tol<T>(1e-5, 1e-12));
      // bf16 operands, fp32 accumulation: the same float inputs for both T (the f64 entry repeats it)
      const Tensor<float, D> af = randn<float, D>({m, c.k}, seed + 100);
      const Tensor<float, D> bf = randn<float, D>(trans_b ? Shape{e, c.n, c.k} : Shape{e, c.k, c.n}, seed + 101);
      put(r, name + " bf16", grouped_matmul_bf16(af, bf, offsets, trans_b), 1e-5);
    }
  }
  // grouped_linear forward and backward (dx through the untransposed grouped GEMM, dw through the
  // weight-gradient kernel), with rows outside every range (first and last rows) and empty experts
  for (const std::vector<index_t>& off : {std::vector<index_t>{3, 10, 10, 40}, std::vector<index_t>{0, 0, 129, 200},
                                          std::vector<index_t>{0, 1, 2, 3, 70}}) {
    const index_t e = static_cast<index_t>(off.size()) - 1, m = off.back() + 5;
    for (const auto& [k, n] : {std::pair<index_t, index_t>{33, 65}, std::pair<index_t, index_t>{16, 1}}) {
      const std::string name = t + " grouped_linear E " + std::to_string(e) + " M " + std::to_string(m) + " K " +
                               std::to_string(k) + " N " + std::to_string(n);
      const auto offsets = Tensor<index_t, D>::from(off, Shape{e + 1});
      auto x = leaf<T, D>({m, k}, ++seed);
      auto w = leaf<T, D>({e, n, k}, ++seed);
      Var<T, D> y = grouped_linear(x, w, offsets);
      sum(y * Var<T, D>(randn<T, D>({m, n}, ++seed))).backward();
      put(r, name + " y", y, tol<T>(1e-5, 1e-12));
      put(r, name + " dx", x.grad(), tol<T>(1e-5, 1e-12));
      put(r, name + " dw", w.grad(), tol<T>(1e-5, 1e-12));
      // bf16 operands, fp32 sums: float inputs for both T (the f64 entry repeats it)
      auto xf = leaf<float, D>({m, k}, seed + 100);
      auto wf = leaf<float, D>({e, n, k}, seed + 101);
      Var<float, D> yf = grouped_linear(xf, wf, offsets, MatmulPrecision::bf16);
      sum(yf * Var<float, D>(randn<float, D>({m, n}, seed + 102))).backward();
      put(r, name + " bf16 y", yf, 1e-5);
      put(r, name + " bf16 dx", xf.grad(), 1e-5);
      put(r, name + " bf16 dw", wf.grad(), 1e-5);
    }
  }
  // offsets from a dispatch plan (DispatchPlan::device_offsets on a device): stacked expert weights
  {
    const Assignments a = token_major(150, 2, 6, 950);
    const DispatchPlan<D> plan =
        make_dispatch_plan(moe_cases::indices<D>(a.token), moe_cases::indices<D>(a.expert), 150, 6, 0.0);
    const Tensor<index_t, D> offsets = plan.device_offsets;
    const Tensor<T, D> xs = randn<T, D>({plan.num_rows(), 40}, 951);
    const Tensor<T, D> w = randn<T, D>({6, 24, 40}, 952);  // (E, out, in): Linear weights
    put(r, t + " grouped_gemm plan offsets B^T", grouped_matmul(xs, w, offsets, true), tol<T>(1e-5, 1e-12));
  }
}

}  // namespace moe_cases

template <class T, class D>
void moe_cases_all(Results& r) {
  moe_cases::plan_cases<T, D>(r);
  moe_cases::dispatch_cases<T, D>(r);
  moe_cases::router_cases<T, D>(r);
  moe_cases::layer_cases<T, D>(r);
  moe_cases::loss_cases<T, D>(r);
  moe_cases::grouped_gemm_cases<T, D>(r);
}

template <class D>
void cases_moe(Results& r) {
  moe_cases_all<float, D>(r);
  moe_cases_all<double, D>(r);
}

}  // namespace mixmoe_parity
