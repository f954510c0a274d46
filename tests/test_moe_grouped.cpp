// Grouped expert execution: grouped_linear and stack_weights (values, gradients, errors), the
// grouped forms of FeedForward and SwiGLU, and MixedMoE run grouped against the same layer run
// one expert at a time (every group mode, fused and per-group, dropless and capacity); the bf16
// expert GEMMs against double GEMMs of the rounded operands.
#include "moe_test_util.hpp"

#include <mixmoe/io/json_config.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/grouped_gemm.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/ops/matmul.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/train/optimizer.hpp>

#include <vector>

namespace test_moe_grouped {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Offsets = Tensor<index_t, Cpu>;

Tf to_float(const Td& t) {
  const std::vector<double> v = t.to_vector();
  return Tf::from(std::vector<float>(v.begin(), v.end()), t.shape());
}

Offsets offsets_of(std::vector<index_t> v) {
  const auto n = static_cast<index_t>(v.size());
  return Offsets::from(std::move(v), Shape{n});
}

/// y = per expert e, x[rows of e] w[e]^T, other rows 0: the reference of grouped_linear.
template <class T>
Tensor<T> per_expert_linear(const Tensor<T>& x, const Tensor<T>& w, const Offsets& off) {
  const index_t e = w.size(0), n = w.size(1);
  Tensor<T> y = Tensor<T>::zeros({x.size(0), n});
  for (index_t i = 0; i < e; ++i) {
    const index_t lo = off.data()[i], hi = off.data()[i + 1];
    if (lo == hi) continue;
    no_grad ng;
    const Tensor<T> part = matmul(Var<T>(x.slice(0, lo, hi).clone()), transpose(Var<T>(w[i].clone()), 0, 1)).value();
    for (index_t r = lo; r < hi; ++r)
      for (index_t j = 0; j < n; ++j) y(r, j) = part(r - lo, j);
  }
  return y;
}

template <class T>
using LM = ExpertGroup<SwiGLU<T>, tag::lm>;
template <class T>
using MT = ExpertGroup<SwiGLU<T>, tag::mt>;
template <class T>
using MTff = ExpertGroup<FeedForward<T>, tag::mt>;

/// The same layer built twice (same seed), once grouped and once per expert: outputs and every
/// gradient (of x and of each parameter) must agree.
template <class Layer>
void require_same_as_per_expert(const ModelConfig& cfg, double tol) {
  Generator g1(21), g2(21);
  Layer grouped(cfg, g1), single(cfg, g2);
  grouped.set_execution(ExpertExecution::grouped);
  single.set_execution(ExpertExecution::per_expert);
  REQUIRE(grouped.grouped());
  REQUIRE(!single.grouped());
  Generator gx(22);
  const Td x0 = Td::randn({9, cfg.d_model}, gx), r = Td::randn({9, cfg.d_model}, gx);
  Vd xa(x0.clone(), true), xb(x0.clone(), true);
  const Vd ya = grouped(xa), yb = single(xb);
  REQUIRE(max_abs_diff(ya.value(), yb.value()) < tol);
  sum(ya * Vd(r)).backward();
  sum(yb * Vd(r)).backward();
  REQUIRE(max_abs_diff(xa.grad(), xb.grad()) < tol);
  auto pa = named_parameters(grouped);
  auto pb = named_parameters(single);
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO("parameter " << pa[i].first);
    REQUIRE(pa[i].first == pb[i].first);
    REQUIRE(pa[i].second.grad().defined() == pb[i].second.grad().defined());
    if (pa[i].second.grad().defined()) REQUIRE(max_abs_diff(pa[i].second.grad(), pb[i].second.grad()) < tol);
  }
  // Same routing counts either way.
  REQUIRE(grouped.routing_records().size() == single.routing_records().size());
  for (std::size_t i = 0; i < grouped.routing_records().size(); ++i) {
    REQUIRE(grouped.routing_records()[i].kept() == single.routing_records()[i].kept());
    REQUIRE(grouped.routing_records()[i].dropped() == single.routing_records()[i].dropped());
  }
}

/// An expert type without a grouped form (one Linear).
template <Scalar T, Device D = Cpu>
struct OneLinear {
  using value_type = T;
  using device_type = D;
  OneLinear() = default;
  OneLinear(index_t d_model, index_t, Generator& gen) : w(d_model, d_model, false, gen) {}
  Var<T, D> operator()(const Var<T, D>& x) const { return w(x); }
  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    w.visit_parameters(visit, join_name(prefix, "w"));
  }
  Linear<T, D> w;
};

}  // namespace

TEST_CASE("grouped_linear equals per-expert matmuls; rows outside every range are 0", "[moe][grouped]") {
  Generator gen(1);
  const Td x = Td::randn({9, 4}, gen), w = Td::randn({3, 5, 4}, gen);
  for (const auto& v : {std::vector<index_t>{1, 3, 3, 8}, std::vector<index_t>{0, 4, 6, 9},
                        std::vector<index_t>{0, 0, 0, 9}, std::vector<index_t>{2, 2, 2, 2}}) {
    const Offsets off = offsets_of(v);
    const Vd y = grouped_linear(Vd(x), Vd(w), off);
    REQUIRE(y.shape() == Shape{9, 5});
    REQUIRE(max_abs_diff(y.value(), per_expert_linear(x, w, off)) < 1e-13);
  }
  // float, against double
  const Offsets off = offsets_of({1, 3, 3, 8});
  const Vf yf = grouped_linear(Vf(to_float(x)), Vf(to_float(w)), off);
  REQUIRE(max_abs_diff(yf.value(), to_float(per_expert_linear(x, w, off))) < 1e-5f);
  // rows 0 and 8 belong to no expert
  for (index_t j = 0; j < 5; ++j) {
    REQUIRE(yf.value()(0, j) == 0.0f);
    REQUIRE(yf.value()(8, j) == 0.0f);
  }
}

TEST_CASE("gradcheck: grouped_linear w.r.t. x and the stacked weights", "[moe][grouped][gradcheck]") {
  for (const auto& v : {std::vector<index_t>{1, 3, 3, 7}, std::vector<index_t>{0, 2, 5, 8}}) {
    const Offsets off = offsets_of(v);
    MIXMOE_REQUIRE_GRADCHECK([&](const std::vector<Vd>& in) { return grouped_linear(in[0], in[1], off); },
                             (std::vector<Vd>{rand_var({8, 3}, 2), rand_var({3, 4, 3}, 3)}));
  }
  // a frozen weight: only x gets a gradient
  const Offsets off = offsets_of({0, 3, 6});
  const Vd w = rand_var({2, 2, 3}, 4, false);
  MIXMOE_REQUIRE_GRADCHECK([&](const std::vector<Vd>& in) { return grouped_linear(in[0], w, off); },
                           (std::vector<Vd>{rand_var({6, 3}, 5)}));
}

TEST_CASE("stack_weights: values, gradient, errors", "[moe][grouped]") {
  const Vd a = rand_var({2, 3}, 6), b = rand_var({2, 3}, 7);
  const std::vector<Vd> ws{a, b};
  const Vd s = stack_weights(std::span<const Vd>(ws));
  REQUIRE(s.shape() == Shape{2, 2, 3});
  REQUIRE(max_abs_diff(s.value()[1].clone(), b.value()) == 0.0);
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) { return stack_weights(std::span<const Vd>(in)); },
      (std::vector<Vd>{rand_var({2, 3}, 8), rand_var({2, 3}, 9), rand_var({2, 3}, 10)}));
  const std::vector<Vd> one{a};
  REQUIRE(stack_weights(std::span<const Vd>(one)).shape() == Shape{1, 2, 3});
  const std::vector<Vd> mixed{a, rand_var({3, 3}, 11)};
  MIXMOE_REQUIRE_ERROR(stack_weights(std::span<const Vd>(mixed)),
                       "[stack_weights] weight 1 has shape (3, 3), weight 0 has (2, 3)");
  MIXMOE_REQUIRE_ERROR(stack_weights(std::span<const Vd>()), "[stack_weights] needs at least one weight");
}

TEST_CASE("grouped_linear errors", "[moe][grouped][errors]") {
  const Vd x = rand_var({9, 4}, 12), w = rand_var({2, 5, 4}, 13);
  MIXMOE_REQUIRE_ERROR(grouped_linear(x, w, offsets_of({0, 5, 3})),
                       "[grouped_linear] offsets[1..2] = 5..3 are not a range of the 9 rows");
  MIXMOE_REQUIRE_ERROR(grouped_linear(x, w, offsets_of({0, 5, 10})),
                       "[grouped_linear] offsets[1..2] = 5..10 are not a range of the 9 rows");
  MIXMOE_REQUIRE_ERROR(grouped_linear(x, w, offsets_of({0, 9})), "[grouped_linear] offsets must be (E + 1) = (3)");
  MIXMOE_REQUIRE_ERROR(grouped_linear(x, rand_var({2, 5, 3}, 14), offsets_of({0, 4, 9})),
                       "[grouped_linear] a (9, 4) and b (2, 5, 3) (transposed) differ in K");
}

TEST_CASE("FeedForward and SwiGLU: grouped form equals one call per expert", "[moe][grouped]") {
  Generator gen(15);
  std::vector<SwiGLU<double>> sw;
  std::vector<FeedForward<double>> ff;
  for (int i = 0; i < 3; ++i) {
    sw.emplace_back(4, 5, gen);
    ff.emplace_back(4, 5, gen);
  }
  const Offsets off = offsets_of({1, 4, 4, 7});
  const Td x = Td::randn({8, 4}, gen);
  const std::vector<const SwiGLU<double>*> sp{&sw[0], &sw[1], &sw[2]};
  const std::vector<const FeedForward<double>*> fp{&ff[0], &ff[1], &ff[2]};
  const GroupedRows<Cpu> rows{off};
  const Td ys = SwiGLU<double>::grouped(std::span<const SwiGLU<double>* const>(sp), Vd(x), rows).value();
  const Td yf = FeedForward<double>::grouped(std::span<const FeedForward<double>* const>(fp), Vd(x), rows).value();
  for (index_t e = 0; e < 3; ++e) {
    const index_t lo = off.data()[e], hi = off.data()[e + 1];
    if (lo == hi) continue;
    const Vd rows(x.slice(0, lo, hi).clone());
    REQUIRE(max_abs_diff(ys.slice(0, lo, hi).clone(), sw[static_cast<std::size_t>(e)](rows).value()) < 1e-13);
    REQUIRE(max_abs_diff(yf.slice(0, lo, hi).clone(), ff[static_cast<std::size_t>(e)](rows).value()) < 1e-13);
  }
  REQUIRE(max_abs_diff(ys.slice(0, 0, 1).clone(), Td::zeros({1, 4})) == 0.0);
  REQUIRE(max_abs_diff(ys.slice(0, 7, 8).clone(), Td::zeros({1, 4})) == 0.0);
  // gradients w.r.t. x and every expert's weights
  std::vector<Vd> inputs{rand_var({8, 4}, 16)};
  for (auto& e : sw)
    for (auto& p : parameters(e)) inputs.push_back(p);
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        return SwiGLU<double>::grouped(std::span<const SwiGLU<double>* const>(sp), in[0], rows);
      },
      inputs);
}

TEST_CASE("grouped_linear in bf16: every GEMM on rounded operands, fp32 sums", "[moe][grouped][bf16]") {
  // Reference: the double GEMMs of the bf16-rounded operands. fp32 accumulation differs from it by
  // float rounding only (K terms), far below bf16's 2^-8.
  const auto round16 = [](const Td& t) {
    std::vector<double> v = t.to_vector();
    for (double& x : v) x = round_to_bf16(static_cast<float>(x));
    return Td::from(std::move(v), t.shape());
  };
  Generator gen(50);
  const Td x = Td::randn({11, 20}, gen), w = Td::randn({3, 7, 20}, gen), g = Td::randn({11, 7}, gen);
  const Offsets off = offsets_of({1, 5, 5, 10});
  Vf xf(to_float(x), true), wf(to_float(w), true);
  const Vf y = grouped_linear(xf, wf, off, MatmulPrecision::bf16);
  sum(y * Vf(to_float(g))).backward();
  // the same with the rounded operands in double, native precision
  const Td xr = round16(x), wr = round16(w), gr = round16(g);
  Vd xd(xr, true), wd(wr, true);
  const Vd yd = grouped_linear(xd, wd, off);
  sum(yd * Vd(gr)).backward();
  const auto close = [](const Tf& a, const Td& b) {
    const std::vector<float> av = a.to_vector();
    const std::vector<double> bv = b.to_vector();
    double err = 0, scale = 0;
    for (std::size_t i = 0; i < av.size(); ++i) {
      err = std::max(err, std::abs(static_cast<double>(av[i]) - bv[i]));
      scale = std::max(scale, std::abs(bv[i]));
    }
    return err / (1 + scale);
  };
  CHECK(close(y.value(), yd.value()) < 1e-6);
  CHECK(close(xf.grad(), xd.grad()) < 1e-6);  // dx: the rounded dy times the rounded w
  CHECK(close(wf.grad(), wd.grad()) < 1e-6);  // dw: the rounded dy^T times the rounded x
  // and it differs from the float GEMMs by about bf16's rounding, not more
  Vf x2(to_float(x), true), w2(to_float(w), true);
  const Vf y32 = grouped_linear(x2, w2, off);
  const double rel = close(y.value(), [&] {
    const std::vector<float> v = y32.value().to_vector();
    return Td::from(std::vector<double>(v.begin(), v.end()), y32.shape());
  }());
  CHECK(rel > 1e-5);
  CHECK(rel < 3e-2);
  MIXMOE_REQUIRE_ERROR(grouped_linear(xd, wd, off, MatmulPrecision::bf16), "[grouped_linear] bf16 precision needs float");
}

TEST_CASE("MixedMoE grouped equals per-expert: every mode, dropless and capacity", "[moe][grouped][layer]") {
  for (GroupMix mix : {GroupMix::shared_router, GroupMix::group_gate, GroupMix::fixed})
    for (double cf : {0.0, 0.5}) {
      const index_t k = mix == GroupMix::shared_router ? 2 : 1;
      INFO("mode " << mix_name(mix) << " capacity_factor " << cf);
      {
        INFO("two SwiGLU groups of one width (shared router: one fused call)");
        require_same_as_per_expert<MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>>>(
            small_layer_config(mix, cf, k, {2, 2}, 3), 1e-12);
      }
      {
        INFO("widths d_ff / E_g = 3 and 2 (one grouped call per group)");
        require_same_as_per_expert<MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>>>(
            small_layer_config(mix, cf, k, {2, 3}, 0), 1e-12);
      }
      {
        INFO("SwiGLU and FeedForward groups");
        require_same_as_per_expert<MixedMoE<SoftmaxTopKRoute, LM<double>, MTff<double>>>(
            small_layer_config(mix, cf, k, {2, 2}, 3), 1e-12);
      }
    }
  // one group (a plain MoE), float
  Generator g1(30), g2(30);
  const ModelConfig cfg = small_layer_config(GroupMix::shared_router, 0.0, 2, {4}, 3);
  MixedMoE<SoftmaxTopKRoute, ExpertGroup<SwiGLU<float>, tag::generic>> a(cfg, g1), b(cfg, g2);
  a.set_execution(ExpertExecution::grouped);
  b.set_execution(ExpertExecution::per_expert);
  const Tf x = Tf::randn({11, 4}, g1);
  REQUIRE(max_abs_diff(a(Vf(x)).value(), b(Vf(x)).value()) < 1e-5);
}

TEST_CASE("grouped and per-expert training agree when an expert gets no token", "[moe][grouped][layer]") {
  // 3 tokens, top-1 over 8 experts: most experts get no row. Both paths must give every expert a
  // (zero) gradient, so AdamW moves (momentum, weight decay) the same parameters either way.
  ModelConfig cfg = small_layer_config(GroupMix::shared_router, 0.0, 1, {4, 4}, 3);
  Generator g1(60), g2(60);
  MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>> a(cfg, g1), b(cfg, g2);
  a.set_execution(ExpertExecution::grouped);
  b.set_execution(ExpertExecution::per_expert);
  AdamW<double> oa(parameters(a), {.lr = 1e-2}), ob(parameters(b), {.lr = 1e-2});
  Generator gx(61);
  for (int step = 0; step < 3; ++step) {
    const Td x = Td::randn({3, 4}, gx);
    sum(a(Vd(x))).backward();
    sum(b(Vd(x))).backward();
    const auto pa = named_parameters(a), pb = named_parameters(b);
    for (std::size_t i = 0; i < pa.size(); ++i) {
      INFO("step " << step << " parameter " << pa[i].first);
      REQUIRE(pa[i].second.grad().defined());
      REQUIRE(pb[i].second.grad().defined());
    }
    index_t unused = 0;
    for (index_t k : a.routing_records()[0].kept()) unused += k == 0 ? 1 : 0;
    REQUIRE(unused >= 5);
    oa.step();
    ob.step();
    oa.zero_grad();
    ob.zero_grad();
  }
  const auto pa = named_parameters(a), pb = named_parameters(b);
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO("parameter " << pa[i].first);
    REQUIRE(max_abs_diff(pa[i].second.value(), pb[i].second.value()) < 1e-12);
  }
}

TEST_CASE("gradcheck: MixedMoE grouped w.r.t. x and every parameter", "[moe][grouped][gradcheck]") {
  for (double cf : {0.0, 0.5}) {
    INFO("capacity_factor " << cf);
    Generator gen(31);
    MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>> layer(small_layer_config(GroupMix::shared_router, cf, 2, {2, 2}, 3),
                                                            gen);
    layer.set_execution(ExpertExecution::grouped);
    auto inputs = with_params(rand_var({6, 4}, 32), layer);
    MIXMOE_REQUIRE_GRADCHECK([&](const std::vector<Vd>& in) { return layer(in[0]); }, inputs);
  }
}

TEST_CASE("expert execution: automatic, configuration and errors", "[moe][grouped][errors]") {
  Generator gen(40);
  ModelConfig cfg = small_layer_config(GroupMix::shared_router, 0.0, 2, {2, 2}, 3);
  MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>> layer(cfg, gen);
  REQUIRE(layer.execution() == ExpertExecution::automatic);
  REQUIRE(!layer.grouped());  // automatic on Cpu: per expert
  cfg.moe.execution = ExpertExecution::grouped;
  REQUIRE(MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>>(cfg, gen).grouped());

  // an expert type without a grouped form
  using Plain = MixedMoE<SoftmaxTopKRoute, ExpertGroup<OneLinear<double>, tag::lm>, MT<double>>;
  MIXMOE_REQUIRE_ERROR(Plain(cfg, gen), "[MixedMoE] moe.execution is grouped, but an expert type of the groups (lm, mt)");
  cfg.moe.execution = ExpertExecution::automatic;
  Plain plain(cfg, gen);
  REQUIRE(!plain.grouped());
  MIXMOE_REQUIRE_ERROR(plain.set_execution(ExpertExecution::grouped),
                       "[MixedMoE::set_execution] an expert type of the groups (lm, mt) has no grouped form");
  REQUIRE(plain(rand_var({5, 4}, 41)).shape() == Shape{5, 4});

  // bf16 expert GEMMs: float models, grouped execution (automatic means grouped then)
  {
    ModelConfig c16 = small_layer_config(GroupMix::shared_router, 0.0, 2);
    c16.moe.expert_precision = MatmulPrecision::bf16;
    Generator g16(42), g32(42);
    MixedMoE<SoftmaxTopKRoute, LM<float>, MT<float>> l16(c16, g16);
    REQUIRE(l16.grouped());
    REQUIRE(l16.expert_precision() == MatmulPrecision::bf16);
    ModelConfig c32 = c16;
    c32.moe.expert_precision = MatmulPrecision::native;
    MixedMoE<SoftmaxTopKRoute, LM<float>, MT<float>> l32(c32, g32);
    const Tf x = Tf::randn({9, 4}, g16);
    const Tf y16 = l16(Vf(x)).value(), y32 = l32(Vf(x)).value();
    const double diff = max_abs_diff(y16, y32);
    CHECK(diff > 0.0);
    CHECK(diff < 2e-2);
    MIXMOE_REQUIRE_ERROR(l16.set_execution(ExpertExecution::per_expert),
                         "[MixedMoE::set_execution] moe.expert_precision bf16 needs grouped execution");
    l32.set_execution(ExpertExecution::per_expert);
    MIXMOE_REQUIRE_ERROR(l32.set_expert_precision(MatmulPrecision::bf16),
                         "[MixedMoE::set_expert_precision] moe.expert_precision bf16 needs grouped execution");
    MIXMOE_REQUIRE_ERROR((MixedMoE<SoftmaxTopKRoute, LM<double>, MT<double>>(c16, g16)),
                         "[MixedMoE] moe.expert_precision bf16 needs a float model (got 64-bit)");
    MIXMOE_REQUIRE_ERROR((MixedMoE<SoftmaxTopKRoute, ExpertGroup<OneLinear<float>, tag::lm>, MT<float>>(c16, g16)),
                         "moe.expert_precision bf16 runs the experts grouped, but an expert type of the groups (lm, mt)");
  }

  // JSON: written, read back, unknown values refused, missing means automatic
  MoEConfig m;
  m.execution = ExpertExecution::per_expert;
  const auto j = moe_config_to_json(m);
  REQUIRE(j.at("expert_execution") == "per_expert");
  REQUIRE(moe_config_from_json(j).execution == ExpertExecution::per_expert);
  auto bad = j;
  bad["expert_execution"] = "fast";
  MIXMOE_REQUIRE_ERROR(moe_config_from_json(bad),
                       "moe.expert_execution: unknown value 'fast' (auto, grouped or per_expert)");
  auto old = j;
  old.erase("expert_execution");
  REQUIRE(moe_config_from_json(old).execution == ExpertExecution::automatic);
  m.expert_precision = MatmulPrecision::bf16;
  REQUIRE(moe_config_to_json(m).at("expert_precision") == "bf16");
  REQUIRE(moe_config_from_json(moe_config_to_json(m)).expert_precision == MatmulPrecision::bf16);
  REQUIRE(moe_config_from_json(old).expert_precision == MatmulPrecision::native);
}

}  // namespace test_moe_grouped
