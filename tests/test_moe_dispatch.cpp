// Expert dispatch: the counting-sort plan, capacity dropping, dispatch/combine and moe_forward.
#include "moe_test_util.hpp"

#include <mixmoe/moe/dispatch.hpp>
#include <mixmoe/nn/ffn.hpp>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_moe_dispatch {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

std::vector<Index> ints(const Tensor<Index>& t) { return t.to_vector(); }
std::vector<index_t> list(const IndexList& l) { return {l.begin(), l.end()}; }

// out[n] = sum over the kept assignments m of token n of gate[m] * expert[m](x[n]), one row at a time.
template <class T, class F>
Tensor<T> naive_moe(const Tensor<T>& x, const Routing<T>& r, const std::vector<bool>& kept, F&& expert) {
  const index_t n = x.size(0), c = x.size(1);
  Tensor<T> out = Tensor<T>::zeros({n, c});
  for (index_t m = 0; m < r.token.numel(); ++m) {
    if (!kept[static_cast<std::size_t>(m)]) continue;
    const index_t t = r.token.data()[m], e = r.expert.data()[m];
    const Tensor<T> y = expert(e, Var<T>(x.slice(0, t, t + 1).clone())).value();  // (1, C)
    for (index_t j = 0; j < c; ++j) out(t, j) += r.gate.value().data()[m] * y(0, j);
  }
  return out;
}

}  // namespace

TEST_CASE("dispatch plan: rows sorted by expert, token order within an expert", "[moe][dispatch]") {
  // 5 tokens, top-2 over 3 experts, token-major assignments.
  const std::vector<int> token{0, 0, 1, 1, 2, 2, 3, 3, 4, 4};
  const std::vector<int> expert{2, 0, 0, 1, 2, 1, 0, 2, 1, 0};
  auto r = make_routing<double>(token, expert, std::vector<double>(10, 1.0), 5, 3);
  const auto plan = make_dispatch_plan(r);
  REQUIRE(plan.num_rows() == 10);
  REQUIRE(plan.dropped() == 0);
  REQUIRE(plan.capacity == 0);
  REQUIRE(list(plan.offsets()) == std::vector<index_t>{0, 4, 7, 10});
  REQUIRE(list(plan.routed()) == std::vector<index_t>{4, 3, 3});
  // expert 0: assignments 1 (t0), 2 (t1), 6 (t3), 9 (t4); expert 1: 3, 5, 8; expert 2: 0, 4, 7
  REQUIRE(ints(plan.order) == std::vector<Index>{1, 2, 6, 9, 3, 5, 8, 0, 4, 7});
  REQUIRE(ints(plan.sorted_token) == std::vector<Index>{0, 1, 3, 4, 1, 2, 4, 0, 2, 3});
  // per token, its sorted rows in ascending order
  REQUIRE(ints(plan.token_offsets) == std::vector<Index>{0, 2, 4, 6, 8, 10});
  REQUIRE(ints(plan.token_rows) == std::vector<Index>{0, 7, 1, 4, 5, 8, 2, 9, 3, 6});
}

TEST_CASE("dispatch plan: assignments in any order come out in token order per expert", "[moe][dispatch]") {
  // Expert-choice style: the list is expert-major and the tokens are not sorted; token 2 goes twice to expert 1.
  const std::vector<int> token{3, 1, 0, 2, 2, 0};
  const std::vector<int> expert{1, 1, 0, 1, 1, 0};
  auto r = make_routing<double>(token, expert, std::vector<double>(6, 1.0), 4, 2);
  const auto plan = make_dispatch_plan(r);
  REQUIRE(list(plan.offsets()) == std::vector<index_t>{0, 2, 6});
  REQUIRE(ints(plan.sorted_token) == std::vector<Index>{0, 0, 1, 2, 2, 3});
  REQUIRE(ints(plan.order) == std::vector<Index>{2, 5, 1, 3, 4, 0});  // ties in assignment order
}

TEST_CASE("dispatch plan: capacity keeps each expert's first tokens and counts the drops", "[moe][dispatch]") {
  const std::vector<int> token{0, 0, 1, 1, 2, 2, 3, 3, 4, 4};
  const std::vector<int> expert{2, 0, 0, 1, 2, 1, 0, 2, 1, 0};
  auto r = make_routing<double>(token, expert, std::vector<double>(10, 1.0), 5, 3);
  // capacity = ceil(0.6 * 10 / 3) = 2
  const auto plan = make_dispatch_plan(r, 0.6);
  REQUIRE(plan.capacity == 2);
  REQUIRE(list(plan.offsets()) == std::vector<index_t>{0, 2, 4, 6});
  REQUIRE(plan.dropped() == 4);
  REQUIRE(list(plan.routed()) == std::vector<index_t>{4, 3, 3});  // the router's choice, drops included
  REQUIRE(ints(plan.sorted_token) == std::vector<Index>{0, 1, 1, 2, 0, 2});
  REQUIRE(ints(plan.order) == std::vector<Index>{1, 2, 3, 5, 0, 4});
  // exact products do not round up; a large factor keeps everything
  REQUIRE(expert_capacity(1.25, 8, 2) == 5);
  REQUIRE(expert_capacity(1.0, 12, 4) == 3);
  REQUIRE(expert_capacity(0.01, 12, 4) == 1);
  REQUIRE(make_dispatch_plan(r, 10.0).dropped() == 0);
}

TEST_CASE("dispatch plan errors name the bad value", "[moe][dispatch][errors]") {
  auto r = make_routing<double>({0, 1, 2}, {0, 3, 1}, {1, 1, 1}, 3, 2);
  MIXMOE_REQUIRE_ERROR(make_dispatch_plan(r), "[dispatch] expert 3 of assignment 1 is out of range for 2 experts");
  auto r2 = make_routing<double>({0, 5, 2}, {0, 1, 1}, {1, 1, 1}, 3, 2);
  MIXMOE_REQUIRE_ERROR(make_dispatch_plan(r2), "[dispatch] token 5 of assignment 1 is out of range for 3 tokens");
  auto r3 = make_routing<double>({0, 1, 2}, {0, 1, 1}, {1, 1, 1}, 3, 2);
  MIXMOE_REQUIRE_ERROR(make_dispatch_plan(r3, -1.0), "[dispatch] capacity_factor must be >= 0, got -1");
  MIXMOE_REQUIRE_ERROR(make_dispatch_plan(r3.token, r3.expert.slice(0, 0, 2), 3, 2),
                       "[dispatch] token (3) and expert (2) must be 1-D of the same length M");
  MIXMOE_REQUIRE_ERROR(make_dispatch_plan(r3.token, r3.expert, 3, 0), "[dispatch] needs at least one expert, got 0");
}

TEST_CASE("dispatch_by_expert gathers the rows and combine_by_expert adds them back", "[moe][dispatch]") {
  const std::vector<int> token{0, 0, 1, 1, 2, 2};
  const std::vector<int> expert{1, 0, 0, 1, 1, 0};
  auto r = make_routing<double>(token, expert, {0.5, 0.25, 2.0, 1.0, -1.0, 3.0}, 3, 2);
  const auto plan = make_dispatch_plan(r);
  auto x = Vd(Td::from({1, 2, 10, 20, 100, 200}, {3, 2}));
  auto xs = dispatch_by_expert(x, plan);
  REQUIRE(xs.value().to_vector() == std::vector<double>{1, 2, 10, 20, 100, 200, 1, 2, 10, 20, 100, 200});
  // identity experts: out[n] = (sum of token n's gates) * x[n]
  auto gs = index_select(r.gate, 0, plan.order);
  auto out = combine_by_expert(xs, gs, plan, 3);
  REQUIRE(out.value().to_vector() == std::vector<double>{0.75, 1.5, 30, 60, 200, 400});

  MIXMOE_REQUIRE_ERROR(dispatch_by_expert(Vd(Td::zeros({4, 2})), plan),
                       "[dispatch_by_expert] x of shape (4, 2) has 4 rows, the plan was made for 3 tokens");
  MIXMOE_REQUIRE_ERROR(dispatch_by_expert(Vd(Td::zeros({3})), plan), "[dispatch_by_expert] x must be (N, C), got (3)");
  MIXMOE_REQUIRE_ERROR(combine_by_expert(Vd(Td::zeros({5, 2})), gs, plan, 3),
                       "[combine_by_expert] y_sorted must be (6, C) for a plan of 6 rows, got (5, 2)");
  MIXMOE_REQUIRE_ERROR(combine_by_expert(xs, Vd(Td::zeros({6, 1})), plan, 3),
                       "[combine_by_expert] gate_sorted must be (6), got (6, 1)");
  MIXMOE_REQUIRE_ERROR(combine_by_expert(xs, gs, plan, 4),
                       "[combine_by_expert] output of 4 tokens for a plan made for 3 tokens");
}

TEST_CASE("gradcheck: combine_by_expert w.r.t. rows and gates", "[moe][dispatch][gradcheck]") {
  struct Case {
    std::vector<int> token, expert;
    index_t n, e, c;
    double capacity_factor;
  };
  const std::vector<Case> cases = {
      {{0, 0, 1, 1, 2, 2}, {1, 0, 0, 1, 1, 0}, 3, 2, 4, 0.0},
      {{0, 1, 2, 3, 4}, {2, 2, 0, 2, 1}, 6, 3, 3, 0.0},                    // token 5 gets nothing
      {{0, 0, 1, 1, 2, 2, 3, 3}, {0, 1, 0, 1, 0, 2, 0, 1}, 4, 3, 5, 0.7},  // with drops
      {{3, 1, 0, 2, 2, 0}, {1, 1, 0, 1, 1, 0}, 4, 2, 1, 0.0},
  };
  for (const auto& cs : cases) {
    auto r = make_routing<double>(cs.token, cs.expert, std::vector<double>(cs.token.size(), 1.0), cs.n, cs.e);
    const auto plan = make_dispatch_plan(r, cs.capacity_factor);
    INFO("rows " << plan.num_rows() << " dropped " << plan.dropped());
    const auto n = cs.n;
    MIXMOE_REQUIRE_GRADCHECK([&plan, n](const std::vector<Vd>& in) { return combine_by_expert(in[0], in[1], plan, n); },
                             {rand_var({plan.num_rows(), cs.c}, 1), rand_var({plan.num_rows()}, 2)});
    // only one input differentiable
    MIXMOE_REQUIRE_GRADCHECK([&plan, n](const std::vector<Vd>& in) { return combine_by_expert(in[0], in[1], plan, n); },
                             {rand_var({plan.num_rows(), cs.c}, 3), rand_var({plan.num_rows()}, 4, false)});
  }
}

TEST_CASE("moe_forward equals a per-token loop over the experts", "[moe][dispatch]") {
  Generator gen(7);
  const index_t n = 9, c = 6, e = 4, hidden = 5;
  std::vector<SwiGLU<double>> experts;
  for (index_t i = 0; i < e; ++i) experts.emplace_back(c, hidden, gen);
  const auto expert = [&](index_t i, const Vd& rows) { return experts[static_cast<std::size_t>(i)](rows); };
  SoftmaxTopK<double> router(RouterShape{c, e, 2, 0}, gen);
  auto x = Vd(Td::randn({n, c}, gen));
  const auto r = router(x, RouteContext<Cpu>{});

  SECTION("dropless") {
    DispatchPlan<Cpu> plan;
    auto out = moe_forward(x, r, e, 0.0, expert, &plan);
    REQUIRE(plan.dropped() == 0);
    const auto ref = naive_moe(x.value(), r, std::vector<bool>(static_cast<std::size_t>(n * 2), true), expert);
    REQUIRE(max_abs_diff(out.value(), ref) < 1e-12);
  }
  SECTION("capacity: dropped assignments contribute nothing") {
    DispatchPlan<Cpu> plan;
    auto out = moe_forward(x, r, e, 0.5, expert, &plan);  // capacity ceil(0.5 * 18 / 4) = 3
    REQUIRE(plan.capacity == 3);
    REQUIRE(plan.dropped() > 0);
    // kept: an expert's first `capacity` assignments in token order (here the assignment order)
    std::vector<bool> kept(static_cast<std::size_t>(n * 2));
    std::vector<index_t> seen(static_cast<std::size_t>(e), 0);
    index_t dropped = 0;
    for (index_t m = 0; m < n * 2; ++m) {
      const auto ex = static_cast<std::size_t>(r.expert.data()[m]);
      kept[static_cast<std::size_t>(m)] = seen[ex]++ < 3;
      dropped += kept[static_cast<std::size_t>(m)] ? 0 : 1;
    }
    REQUIRE(plan.dropped() == dropped);
    const auto ref = naive_moe(x.value(), r, kept, expert);
    REQUIRE(max_abs_diff(out.value(), ref) < 1e-12);
  }
  SECTION("float") {
    Generator g2(7);
    std::vector<SwiGLU<float>> ef;
    for (index_t i = 0; i < e; ++i) ef.emplace_back(c, hidden, g2);
    const auto expert_f = [&](index_t i, const Vf& rows) { return ef[static_cast<std::size_t>(i)](rows); };
    SoftmaxTopK<float> rf(RouterShape{c, e, 2, 0}, g2);
    auto xf = Vf(Tf::randn({n, c}, g2));
    const auto routing = rf(xf, RouteContext<Cpu>{});
    auto out = moe_forward(xf, routing, e, 0.0, expert_f);
    const auto ref = naive_moe(xf.value(), routing, std::vector<bool>(static_cast<std::size_t>(n * 2), true), expert_f);
    REQUIRE(max_abs_diff(out.value(), ref) < 1e-5);
  }
}

TEST_CASE("moe_forward calls each expert once on its contiguous block", "[moe][dispatch]") {
  // expert 1 gets nothing (called on 0 rows); expert 2 gets tokens 0, 2, 3 (in token order)
  auto r = make_routing<double>({3, 0, 2, 1}, {2, 2, 2, 0}, {1, 1, 1, 1}, 4, 3);
  auto x = Vd(Td::arange(8).reshape({4, 2}));
  std::vector<std::pair<index_t, std::vector<double>>> calls;
  auto out = moe_forward(x, r, 3, 0.0, [&](index_t e, const Vd& rows) {
    calls.emplace_back(e, rows.value().to_vector());
    return rows * static_cast<double>(e + 1);
  });
  REQUIRE(calls.size() == 3);
  REQUIRE(calls[0].first == 0);
  REQUIRE(calls[0].second == std::vector<double>{2, 3});
  REQUIRE(calls[1].first == 1);
  REQUIRE(calls[1].second.empty());
  REQUIRE(calls[2].first == 2);
  REQUIRE(calls[2].second == std::vector<double>{0, 1, 4, 5, 6, 7});
  REQUIRE(out.value().to_vector() == std::vector<double>{0, 3, 2, 3, 12, 15, 18, 21});
  // everything dropped or nothing routed: zeros
  auto none = make_routing<double>({}, {}, {}, 4, 3);
  REQUIRE(moe_forward(x, none, 3, 0.0, [](index_t, const Vd& rows) { return rows; }).value().to_vector() ==
          std::vector<double>(8, 0.0));
}

TEST_CASE("gradcheck: moe_forward w.r.t. x, gates and expert weights", "[moe][dispatch][gradcheck]") {
  Generator gen(3);
  const index_t n = 6, c = 4, e = 3, hidden = 3;
  std::vector<SwiGLU<double>> experts;
  for (index_t i = 0; i < e; ++i) experts.emplace_back(c, hidden, gen);
  for (double cf : {0.0, 0.6}) {
    INFO("capacity_factor " << cf);
    auto r = make_routing<double>({0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5}, {0, 1, 1, 2, 0, 2, 1, 0, 2, 1, 0, 1},
                                  std::vector<double>(12, 1.0), n, e);
    std::vector<Vd> inputs{rand_var({n, c}, 10), rand_var({12}, 11)};
    for (auto& ex : experts)
      for (auto& p : parameters(ex)) inputs.push_back(p);
    MIXMOE_REQUIRE_GRADCHECK(
        [&](const std::vector<Vd>& in) {
          Routing<double> rr = r;
          rr.gate = in[1];
          return moe_forward(in[0], rr, e, cf,
                             [&](index_t i, const Vd& rows) { return experts[static_cast<std::size_t>(i)](rows); });
        },
        inputs);
  }
}

TEST_CASE("moe_forward errors", "[moe][dispatch][errors]") {
  auto r = make_routing<double>({0, 1}, {0, 1}, {1, 1}, 2, 2);
  auto x = Vd(Td::zeros({2, 3}));
  const auto id = [](index_t, const Vd& rows) { return rows; };
  MIXMOE_REQUIRE_ERROR(moe_forward(x, r, 3, 0.0, id), "[moe_forward] the routing is over 2 experts, the layer has 3");
  MIXMOE_REQUIRE_ERROR(moe_forward(Vd(Td::zeros({4, 3})), r, 2, 0.0, id),
                       "[moe_forward] the routing is over 2 tokens, x of shape (4, 3) has 4");
  MIXMOE_REQUIRE_ERROR(moe_forward(Vd(Td::zeros({6})), r, 2, 0.0, id), "[moe_forward] x must be (N, C), got (6)");
  MIXMOE_REQUIRE_ERROR(moe_forward(x, r, 2, 0.0, [](index_t, const Vd& rows) { return slice(rows, 1, 0, 2); }),
                       "[moe_forward] expert 0 returned (1, 2) for a block of (1, 3)");
  auto bad_gate = r;
  bad_gate.gate = Vd(Td::ones({3}));
  MIXMOE_REQUIRE_ERROR(moe_forward(x, bad_gate, 2, 0.0, id),
                       "[moe_forward] routing.gate must be (M) with M = 2 assignments, got (3)");
}
}  // namespace test_moe_dispatch
