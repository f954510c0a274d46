// RA-MoE: routing capture, frequencies, task experts, cross-lingual similarity and the zone,
// cc/ci/ic/ii, the routing alignment loss (values by hand, gradchecks through real MoE
// layers) and the gap predictor.
#include "test_util.hpp"

#include <mixmoe/align/alignment_loss.hpp>
#include <mixmoe/align/categorize.hpp>
#include <mixmoe/align/gap_predictor.hpp>
#include <mixmoe/align/routing_capture.hpp>
#include <mixmoe/align/task_experts.hpp>

#include <cmath>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_align {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using MixedLayer = MixedMoE<TopK<>, ExpertGroup<SwiGLU<double>, tag::lm>, ExpertGroup<SwiGLU<double>, tag::mt>>;
using TinyLM = DecoderLM<CausalSelfAttention<double>, MixedMoE<TopK<>, ExpertGroup<SwiGLU<double>, tag::lm>>>;

ModelConfig layer_config() {
  ModelConfig cfg;
  cfg.vocab = 9;
  cfg.d_model = 6;
  cfg.layers = 1;
  cfg.heads = 2;
  cfg.d_ff = 8;
  cfg.init_std = 0.5;
  cfg.moe.experts_per_group = {3, 2};
  cfg.moe.top_k = 2;
  cfg.moe.expert_hidden = 4;
  cfg.moe.mix = GroupMix::group_gate;
  return cfg;
}

/// A routing with the given probs (N, E) and (token, expert) assignments.
Routing<double> make_routing(const std::vector<double>& probs, index_t n, index_t e,
                             const std::vector<std::pair<int, int>>& assign) {
  Routing<double> r;
  r.probs = Vd(Td::from(probs, {n, e}));
  r.logits = Vd(Td::zeros({n, e}));
  r.token = Tensor<Index>::empty({static_cast<index_t>(assign.size())});
  r.expert = Tensor<Index>::empty({static_cast<index_t>(assign.size())});
  for (std::size_t m = 0; m < assign.size(); ++m) {
    r.token.data()[m] = assign[m].first;
    r.expert.data()[m] = assign[m].second;
  }
  r.gate = Vd(Td::ones({static_cast<index_t>(assign.size())}));
  r.num_experts = e;
  r.num_tokens = n;
  return r;
}

std::vector<Vd> router_weights(MixedLayer& layer) {
  std::vector<Vd> out;
  for (auto& [name, v] : named_parameters(layer))
    if (name.rfind("router", 0) == 0) out.push_back(v);
  return out;
}

}  // namespace

TEST_CASE("row maps: padded mask, lengths, and the regions of a collated batch", "[align]") {
  const std::vector<unsigned char> mask = {1, 1, 0, 1, 0, 0};
  RowMap m = padded_row_map(2, 3, mask);
  CHECK(m.num_examples == 2);
  CHECK(m.example == std::vector<index_t>{0, 0, -1, 1, -1, -1});
  CHECK(m.tokens_per_example() == std::vector<index_t>{2, 1});
  CHECK(m.valid_rows() == 3);
  CHECK(padded_row_map(2, 2).example == std::vector<index_t>{0, 0, 1, 1});
  const std::vector<index_t> lengths = {3, 1};
  CHECK(length_row_map(3, lengths).example == std::vector<index_t>{0, 0, 0, 1, -1, -1});
  MIXMOE_REQUIRE_ERROR(padded_row_map(2, 3, std::vector<unsigned char>(5, 1)), "5 entries");

  // "<prompt> <prompt> <prompt> | <answer> <answer>": inputs are ids[0..3], the prompt ids[0..2].
  const std::vector<Example> ex = {{{5, 6, 7, 8, 9}, 3}, {{5, 6, 8}, 1}};
  const Batch batch = collate(ex);
  REQUIRE(batch.inputs.shape() == Shape{2, 4});
  CHECK(batch_row_map(batch, ex).example == std::vector<index_t>{0, 0, 0, 0, 1, 1, -1, -1});
  CHECK(batch_row_map(batch, ex, TokenRegion::prompt).example == std::vector<index_t>{0, 0, 0, -1, 1, -1, -1, -1});
  CHECK(batch_row_map(batch, ex, TokenRegion::answer).example == std::vector<index_t>{-1, -1, -1, 0, -1, 1, -1, -1});
}

TEST_CASE("example_mean_routing: means over each example's tokens, and its gradient", "[align][gradcheck]") {
  // 2 examples x 3 positions, 2 experts; row 2 (padding of example 0) and row 5 do not count.
  const Vd probs(Td::from({0.9, 0.1, 0.5, 0.5, 0.0, 1.0, 0.2, 0.8, 0.4, 0.6, 1.0, 0.0}, {6, 2}), true);
  const RowMap rows = padded_row_map(2, 3, std::vector<unsigned char>{1, 1, 0, 1, 1, 0});
  const Vd m = example_mean_routing(probs, rows);
  const auto v = to_rows(m);
  REQUIRE(v.size() == 2);
  CHECK(v[0][0] == Approx(0.7));
  CHECK(v[0][1] == Approx(0.3));
  CHECK(v[1][0] == Approx(0.3));
  CHECK(v[1][1] == Approx(0.7));
  MIXMOE_REQUIRE_GRADCHECK([&](const std::vector<Vd>& in) { return example_mean_routing(in[0], rows); },
                           {rand_var({6, 2}, 3)});
  // An example without a counted token has no mean.
  MIXMOE_REQUIRE_ERROR(example_mean_routing(probs, padded_row_map(2, 3, std::vector<unsigned char>{1, 1, 1, 0, 0, 0})),
                       "example 1 has no counted token");
}

TEST_CASE("RoutingFrequencies, delta and task expert selection on hand-made routing", "[align]") {
  const std::vector<RouterSlot> slots = {{0, "router", 3}, {1, "router", 2}};
  // Task data: 4 tokens, the last one padding. Token 2 is sent to expert 2 twice: it counts once.
  const Routing<double> task0 = make_routing({0.7, 0.2, 0.1, 0.1, 0.6, 0.3, 0.3, 0.3, 0.4, 0.2, 0.2, 0.6}, 4, 3,
                                             {{0, 0}, {0, 1}, {1, 1}, {1, 2}, {2, 2}, {2, 2}, {3, 2}, {3, 1}});
  const RowMap task_rows = padded_row_map(1, 4, std::vector<unsigned char>{1, 1, 1, 0});
  const Routing<double> task1 = make_routing({0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, 4, 2, {{0, 0}, {1, 0}, {2, 1}});
  RoutingFrequencies task;
  task.bind_slots(slots);
  task.add(0, task0, task_rows);
  task.add(1, task1, task_rows);
  CHECK(task.tokens(0) == 3);
  const SlotValues sel = task.selection_frequency(), mass = task.probability_mass();
  CHECK(sel[0][0] == Approx(1.0 / 3));
  CHECK(sel[0][1] == Approx(2.0 / 3));
  CHECK(sel[0][2] == Approx(2.0 / 3));
  CHECK(mass[0][0] == Approx(1.1 / 3));
  CHECK(mass[0][1] == Approx(1.1 / 3));
  CHECK(mass[0][2] == Approx(0.8 / 3));
  CHECK(sel[1][0] == Approx(2.0 / 3));

  // General data: 2 tokens, both valid.
  RoutingFrequencies general;
  general.bind_slots(slots);
  general.add(0, make_routing({0.5, 0.25, 0.25, 0.4, 0.4, 0.2}, 2, 3, {{0, 0}, {1, 0}, {1, 1}}), padded_row_map(1, 2));
  general.add(1, make_routing({0.5, 0.5, 0.5, 0.5}, 2, 2, {{0, 0}, {1, 1}}), padded_row_map(1, 2));
  const SlotValues d = frequency_delta(task, general);
  CHECK(d[0][0] == Approx(1.0 / 3 - 1.0));
  CHECK(d[0][1] == Approx(2.0 / 3 - 0.5));
  CHECK(d[0][2] == Approx(2.0 / 3 - 0.0));

  const std::vector<index_t> zone = {0};  // slot 1 is outside the zone: empty set
  using S = TaskExpertSelect;
  CHECK(select_task_experts(task, general, zone, {.tau = 0.1}) == ExpertSets{{1, 2}, {}});
  CHECK(select_task_experts(task, general, zone, {.tau = 0.5}) == ExpertSets{{2}, {}});
  CHECK(select_task_experts(task, general, zone, {.tau = 0.7}) == ExpertSets{{}, {}});
  CHECK(select_task_experts(task, general, zone, {.select = S::top_m, .top_m = 1}) == ExpertSets{{2}, {}});
  CHECK(select_task_experts(task, general, zone, {.select = S::top_m, .top_m = 3}) == ExpertSets{{0, 1, 2}, {}});
  CHECK(select_task_experts(task, general, zone, {.select = S::top_m, .top_m = 3, .min_delta = 0.0}) ==
        ExpertSets{{1, 2}, {}});
  CHECK(select_task_experts(task, general, {0, 1}, {.tau = 0.0}) == ExpertSets{{1, 2}, {0}});  // slot 1: 2/3 - 1/2 > 0
  // By probability mass: delta = (1.1/3 - 0.45, 1.1/3 - 0.325, 0.8/3 - 0.225); experts 1 and 2 tie, top-1 takes 1.
  const SlotValues dm = frequency_delta(task, general, FrequencySource::probability_mass);
  CHECK(dm[0][1] == Approx(1.1 / 3 - 0.325));
  CHECK(dm[0][2] == Approx(0.8 / 3 - 0.225));
  CHECK(select_task_experts(task, general, zone,
                            {.select = S::top_m, .top_m = 1, .source = FrequencySource::probability_mass}) ==
        ExpertSets{{1}, {}});

  // merge = adding the same routings to one accumulator.
  RoutingFrequencies both = task;
  both.merge(general);
  CHECK(both.tokens(0) == 5);
  CHECK(both.selection_frequency()[0][0] == Approx(3.0 / 5));
  CHECK(format_task_experts(slots, select_task_experts(d, zone, {.tau = 0.1}), d).find("+0.667") != std::string::npos);

  MIXMOE_REQUIRE_ERROR(task.add(0, task1, task_rows), "has 3 experts, the routing has 2");
}

TEST_CASE("RoutingFrequencies and router slots of a real mixed-MoE layer", "[align]") {
  const ModelConfig cfg = layer_config();
  Generator gen(3);
  MixedLayer layer(cfg, gen);
  const auto before = router_slots(layer);  // from the routers: no forward yet
  REQUIRE(before.size() == 2);
  CHECK(before[0] == RouterSlot{0, "router.lm", 3});
  CHECK(before[1] == RouterSlot{0, "router.mt", 2});
  (void)layer(rand_var({8, 6}, 4, false));
  CHECK(router_slots(layer) == before);
  RoutingFrequencies f;
  const RowMap rows = padded_row_map(2, 4, std::vector<unsigned char>{1, 1, 1, 0, 1, 1, 0, 0});
  f.add(layer, rows);
  (void)layer(rand_var({8, 6}, 5, false));
  f.add(layer, rows);
  CHECK(f.tokens(0) == 10);
  const SlotValues sel = f.selection_frequency(), mass = f.probability_mass();
  // top-2 of 3 LM experts: every token selects 2; the MT router has 2 experts, so each is always chosen.
  CHECK(sel[0][0] + sel[0][1] + sel[0][2] == Approx(2.0));
  CHECK(sel[1][0] == Approx(1.0));
  CHECK(sel[1][1] == Approx(1.0));
  CHECK(mass[0][0] + mass[0][1] + mass[0][2] == Approx(1.0));
  CHECK(mass[1][0] + mass[1][1] == Approx(1.0));
  const auto cap = capture_example_routing(layer, rows);
  REQUIRE(cap.num_slots() == 2);
  CHECK(cap.num_examples() == 2);
  const auto vals = cap.values();
  CHECK(vals[0][1][0] + vals[0][1][1] + vals[0][1][2] == Approx(1.0));
}

TEST_CASE("cross-lingual similarity per slot and layer, and the alignment zone", "[align]") {
  // 3 layers; layer 1 has two routers. Two parallel items.
  const std::vector<RouterSlot> slots = {{0, "router", 2}, {1, "router.lm", 2}, {1, "router.mt", 2}, {2, "router", 2}};
  const ExampleValues en = {{{1, 0}, {0.5, 0.5}}, {{1, 0}, {1, 0}}, {{1, 0}, {0, 1}}, {{0.6, 0.8}, {1, 1}}};
  const ExampleValues tg = {{{0, 1}, {0.5, 0.5}}, {{1, 0}, {1, 0}}, {{1, 1}, {0, 1}}, {{0.8, 0.6}, {2, 2}}};
  RoutingSimilarity sim;
  sim.add(slots, en, tg);
  CHECK(sim.items() == 2);
  const auto ps = sim.per_slot();
  CHECK(ps[0] == Approx(0.5));                         // cos 0 and cos 1
  CHECK(ps[1] == Approx(1.0));
  CHECK(ps[2] == Approx((1 / std::sqrt(2.0) + 1) / 2));  // cos 45 degrees and 1
  CHECK(ps[3] == Approx((0.96 + 1) / 2));
  const auto pl = sim.per_layer();
  REQUIRE(pl.size() == 3);
  CHECK(pl[1] == Approx((ps[1] + ps[2]) / 2));

  CHECK(middle_layers(1) == std::vector<index_t>{0});
  CHECK(middle_layers(2) == std::vector<index_t>{0});
  CHECK(middle_layers(3) == std::vector<index_t>{1});
  CHECK(middle_layers(4) == std::vector<index_t>{1, 2});
  CHECK(middle_layers(5) == std::vector<index_t>{1, 2, 3});
  CHECK(middle_layers(6) == std::vector<index_t>{2, 3});
  CHECK(middle_layers(8) == std::vector<index_t>{2, 3, 4, 5});
  CHECK(middle_layers(24).size() == 12);
  CHECK(middle_layers(24).front() == 6);
  CHECK(middle_layers(8, 1.0).size() == 8);
  CHECK(middle_layers(8, 0.25) == std::vector<index_t>{3, 4});
  CHECK(most_similar_layers({0.2, 0.9, 0.5, 0.9}, 2) == std::vector<index_t>{1, 3});
  CHECK(most_similar_layers({0.2, 0.9, 0.5, 0.9}, 3) == std::vector<index_t>{1, 2, 3});
  CHECK(alignment_zone(slots) == std::vector<index_t>{1, 2});  // the middle layer's two slots
  CHECK(alignment_zone(slots, {.mode = ZoneMode::most_similar, .top_q = 1}, pl) == std::vector<index_t>{3});
  CHECK(alignment_zone(slots, {.mode = ZoneMode::most_similar, .top_q = 2}, pl) == std::vector<index_t>{1, 2, 3});
  const std::string plot = format_layer_similarity(pl, {2});
  CHECK(plot.find("*2") != std::string::npos);
  MIXMOE_REQUIRE_ERROR(alignment_zone(slots, {.mode = ZoneMode::most_similar}), "needs the similarity");
}

TEST_CASE("cc/ci/ic/ii: categories, counts, proportions and the table", "[align]") {
  const std::vector<bool> en = {true, true, true, false, false, true, true, false};
  const std::vector<bool> de = {true, false, false, true, false, true, false, false};
  const auto cats = categorize(en, de);
  CHECK(cats == std::vector<Category>{Category::cc, Category::ci, Category::ci, Category::ic, Category::ii,
                                      Category::cc, Category::ci, Category::ii});
  const CategoryCounts c = count_categories(cats, "de");
  CHECK(c[Category::cc] == 2);
  CHECK(c[Category::ci] == 3);
  CHECK(c[Category::ic] == 1);
  CHECK(c[Category::ii] == 2);
  CHECK(c.total() == 8);
  CHECK(c.proportion(Category::ci) == Approx(3.0 / 8));
  CHECK(c.english_accuracy() == Approx(5.0 / 8));
  CHECK(c.target_accuracy() == Approx(3.0 / 8));
  CHECK(c.gap() == Approx(2.0 / 8));
  CHECK(category_mask(cats) == std::vector<unsigned char>{0, 1, 1, 0, 0, 0, 1, 0});
  const std::string table = format_category_table({c, count_categories(categorize(std::vector<bool>{true}, std::vector<bool>{true}), "fr")});
  CHECK(table.find("de            8      2      3      1      2   25.0  37.5  12.5  25.0    62.5    37.5   25.0") !=
        std::string::npos);
  CHECK(table.find("fr            1      1      0") != std::string::npos);
  MIXMOE_REQUIRE_ERROR(categorize(std::vector<bool>{true, false}, std::vector<bool>{true}), "must be parallel");
}

TEST_CASE("routing alignment loss: value by hand", "[align]") {
  // 3 examples (1 is not ci), 3 slots of 3 experts. Slot 0: A = {0, 1}; slot 1: A = {2}; slot 2 is outside the zone.
  const Vd tgt0(Td::from({0.5, 0.2, 0.3, 0.3, 0.3, 0.4, 0.1, 0.1, 0.8}, {3, 3}), true);
  const Vd en0(Td::from({0.6, 0.3, 0.1, 0.2, 0.2, 0.6, 0.3, 0.6, 0.1}, {3, 3}));
  const Vd tgt1(Td::from({0.2, 0.3, 0.5, 0.1, 0.1, 0.8, 0.6, 0.2, 0.2}, {3, 3}), true);
  const Vd en1(Td::from({0.1, 0.1, 0.8, 0.5, 0.2, 0.3, 0.2, 0.3, 0.5}, {3, 3}));
  const Vd other(Td::from({1, 0, 0, 1, 0, 0, 1, 0, 0}, {3, 3}), true);
  const std::vector<unsigned char> ci = {1, 0, 1};
  const ExpertSets sets = {{0, 1}, {2}, {0, 1, 2}};
  const std::vector<index_t> zone = {0, 1};
  const double lambda = 0.5, beta = 2.0;
  // Slot 0, example 0: sums 0.7 vs 0.9; p = (2/3, 1/3), q = (5/7, 2/7).
  const double mass00 = 0.2 * 0.2, kl00 = 2.0 / 3 * std::log(14.0 / 15) + 1.0 / 3 * std::log(7.0 / 6);
  // Slot 0, example 2: sums 0.2 vs 0.9; p = (1/3, 2/3), q = (1/2, 1/2).
  const double mass02 = 0.7 * 0.7, kl02 = 1.0 / 3 * std::log(2.0 / 3) + 2.0 / 3 * std::log(4.0 / 3);
  // Slot 1 (one task expert: KL = 0): 0.5 vs 0.8 and 0.2 vs 0.5.
  const double mass10 = 0.3 * 0.3, mass12 = 0.3 * 0.3;
  const double sum = mass00 + beta * kl00 + mass02 + beta * kl02 + mass10 + mass12;
  const AlignmentLossOptions opt{.lambda = lambda, .beta = beta, .epsilon = 1e-12};
  Vd loss = routing_alignment_loss<double, Cpu>({tgt0, tgt1, other}, {en0, en1, other}, sets, zone, ci, opt);
  CHECK(loss.item() == Approx(lambda * sum / 2).epsilon(1e-9));
  AlignmentLossOptions all = opt;
  all.average = AlignmentAverage::all_examples;
  CHECK(routing_alignment_loss<double, Cpu>({tgt0, tgt1, other}, {en0, en1, other}, sets, zone, ci, all).item() ==
        Approx(lambda * sum / 3).epsilon(1e-9));
  // Gradient of slot 1 at example 0, expert 2: lambda / 2 * 2 (0.5 - 0.8); example 1 (not ci) gets none.
  loss.backward();
  const auto g1 = tgt1.grad().to_vector();
  CHECK(g1[2] == Approx(lambda / 2 * 2 * (0.5 - 0.8)));
  CHECK(g1[5] == 0.0);
  CHECK(g1[0] == 0.0);  // not a task expert of slot 1
  CHECK(tgt0.grad().to_vector()[3] == 0.0);
  CHECK_FALSE(other.grad().defined());  // outside the zone

  // No ci example, or no task expert in the zone: a constant 0.
  const std::vector<unsigned char> none = {0, 0, 0};
  const Vd zero = routing_alignment_loss<double, Cpu>({tgt0, tgt1, other}, {en0, en1, other}, sets, zone, none, opt);
  CHECK(zero.item() == 0.0);
  CHECK_FALSE(zero.requires_grad());
  CHECK(routing_alignment_loss<double, Cpu>({tgt0, tgt1, other}, {en0, en1, other}, {{}, {}, {0}}, zone, ci, opt)
            .item() == 0.0);
  // Identical routing: no loss.
  CHECK(routing_alignment_loss<double, Cpu>({tgt0}, {tgt0}, {{0, 1}}, {0}, ci, opt).item() == Approx(0.0).margin(1e-12));

  const auto call = [&](const ExpertSets& a, std::span<const unsigned char> mask, const AlignmentLossOptions& o) {
    return routing_alignment_loss<double, Cpu>({tgt0}, {en0}, a, {0}, mask, o);
  };
  MIXMOE_REQUIRE_ERROR(call({{0, 3}}, ci, opt), "task expert 3");
  MIXMOE_REQUIRE_ERROR(call({{0}}, ci, {.epsilon = 0}), "epsilon must be > 0");
  MIXMOE_REQUIRE_ERROR(call({{0}}, std::vector<unsigned char>{1, 0}, opt), "entries for 3 examples");
}

TEST_CASE("gradcheck: routing alignment loss w.r.t. the routing distributions", "[align][gradcheck]") {
  // Positive "probabilities" (rows need not sum to 1 for the loss).
  Generator gen(11);
  const auto positive = [&](const Shape& s) { return Td::uniform(s, gen, 0.05, 1.0); };
  const Vd en0(positive({4, 5})), en1(positive({4, 3}));
  const std::vector<unsigned char> ci = {1, 1, 0, 1};
  const ExpertSets sets = {{0, 2, 3}, {1, 2}};
  const AlignmentLossOptions opt{.lambda = 0.7, .beta = 1.5, .epsilon = 1e-3};
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        return routing_alignment_loss<double, Cpu>({in[0], in[1]}, {en0, en1}, sets, {0, 1}, ci, opt);
      },
      (std::vector<Vd>{Vd(positive({4, 5}), true), Vd(positive({4, 3}), true)}));
  // Through the per-example mean of per-token distributions (3 examples x 4 positions).
  const RowMap rows = padded_row_map(3, 4, std::vector<unsigned char>{1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0});
  const Vd en(positive({3, 5}));
  const std::vector<unsigned char> ci3 = {1, 0, 1};
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        return routing_alignment_loss<double, Cpu>({example_mean_routing(in[0], rows)}, {en}, {{1, 3, 4}}, {0}, ci3,
                                                   opt);
      },
      (std::vector<Vd>{Vd(positive({12, 5}), true)}));
}

TEST_CASE("gradcheck: routing alignment loss w.r.t. the router weights of a real mixed-MoE layer",
          "[align][gradcheck]") {
  const ModelConfig cfg = layer_config();
  Generator gen(7);
  MixedLayer layer(cfg, gen);
  // 3 items of padded length 3: English and target-language token rows.
  const RowMap rows = padded_row_map(3, 3, std::vector<unsigned char>{1, 1, 1, 1, 1, 0, 1, 0, 0});
  (void)layer(rand_var({9, 6}, 21, false));
  const auto en = capture_example_routing(layer, rows).detached();
  const Vd x = rand_var({9, 6}, 22, false);
  const std::vector<unsigned char> ci = {1, 0, 1};
  const ExpertSets sets = {{0, 2}, {1}};
  const AlignmentLossOptions opt{.lambda = 2.0, .beta = 0.5};
  auto fn = [&](const std::vector<Vd>&) {
    (void)layer(x);
    return routing_alignment_loss(layer, rows, en, sets, {0, 1}, ci, opt);
  };
  const std::vector<Vd> weights = router_weights(layer);
  REQUIRE(weights.size() == 2);
  MIXMOE_REQUIRE_GRADCHECK(fn, weights, GradcheckOptions{.eps = 1e-6, .atol = 1e-8, .rtol = 1e-5});

  // The model-level loss reads a forward once, and needs its graph.
  (void)layer(x);
  (void)routing_alignment_loss(layer, rows, en, sets, {0, 1}, ci, opt);
  MIXMOE_REQUIRE_ERROR(routing_alignment_loss(layer, rows, en, sets, {0, 1}, ci, opt), "already used by this loss");
  (void)layer(x);
  (void)load_balance_loss(layer);  // other losses' bits do not interfere
  CHECK(routing_alignment_loss(layer, rows, en, sets, {0, 1}, ci, opt).requires_grad());
  (void)layer(x);
  release_routing_graphs(layer);
  MIXMOE_REQUIRE_ERROR(routing_alignment_loss(layer, rows, en, sets, {0, 1}, ci, opt), "was released");
}

TEST_CASE("routing alignment loss: the English side gets no gradient", "[align]") {
  const ModelConfig cfg = layer_config();
  Generator gen(9);
  MixedLayer layer(cfg, gen);
  const RowMap rows = padded_row_map(2, 3);
  const std::vector<unsigned char> ci = {1, 1};
  const ExpertSets sets = {{0, 1}, {0}};
  const Vd x_en = rand_var({6, 6}, 31, false), x_tgt = rand_var({6, 6}, 32, false);
  const auto weights = router_weights(layer);

  // English captured WITH its graph (a forward with grad enabled), then the target forward.
  (void)layer(x_en);
  const auto en_graph = capture_example_routing(layer, rows);
  REQUIRE(en_graph.mean[0].requires_grad());
  (void)layer(x_tgt);
  zero_grad(layer);
  routing_alignment_loss(layer, rows, en_graph, sets, {0, 1}, ci).backward();
  std::vector<Td> with_graph;
  for (const auto& w : weights) with_graph.push_back(w.grad().clone());

  // The same with the English side detached: identical router gradients.
  const auto en_values = en_graph.detached();
  (void)layer(x_tgt);
  zero_grad(layer);
  routing_alignment_loss(layer, rows, en_values, sets, {0, 1}, ci).backward();
  for (std::size_t i = 0; i < weights.size(); ++i) {
    INFO("router weight " << i);
    CHECK(max_abs_diff(weights[i].grad(), with_graph[i]) == 0.0);
  }
  CHECK(max_abs_diff(weights[0].grad(), Td::zeros(weights[0].shape())) > 0);

  // English leaves that require grad receive none.
  const Vd en_leaf(en_values.mean[0].value().clone(), true), en_leaf1(en_values.mean[1].value().clone(), true);
  const Vd tgt_leaf(capture_example_routing(layer, rows).mean[0].value().clone(), true);
  const Vd tgt_leaf1(capture_example_routing(layer, rows).mean[1].value().clone(), true);
  routing_alignment_loss<double, Cpu>({tgt_leaf, tgt_leaf1}, {en_leaf, en_leaf1}, sets, {0, 1}, ci).backward();
  CHECK(tgt_leaf.grad().defined());
  CHECK_FALSE(en_leaf.grad().defined());
  CHECK_FALSE(en_leaf1.grad().defined());
}

TEST_CASE("gradcheck: routing alignment loss through a tiny DecoderLM with MoE FFNs", "[align][gradcheck]") {
  ModelConfig cfg;
  cfg.vocab = 9;
  cfg.d_model = 8;
  cfg.layers = 3;
  cfg.heads = 2;
  cfg.d_ff = 8;
  cfg.init_std = 0.3;
  cfg.seed = 5;
  cfg.moe.experts_per_group = {4};
  cfg.moe.top_k = 2;
  cfg.moe.expert_hidden = 4;
  TinyLM model(cfg);
  const auto slots = router_slots(model);
  REQUIRE(slots.size() == 3);
  const auto zone = alignment_zone(slots);  // the middle layer of 3
  REQUIRE(zone == std::vector<index_t>{1});
  // English "item" and its target-language version: 2 items of padded length 4.
  const std::vector<Example> en_ex = {{{1, 2, 3, 4, 5}, 3}, {{2, 6, 4}, 2}};
  const std::vector<Example> tg_ex = {{{7, 2, 8, 4, 5}, 3}, {{3, 6, 1, 4, 0}, 3}};
  const Batch en_batch = collate(en_ex), tg_batch = collate(tg_ex);
  const RowMap en_rows = batch_row_map(en_batch, en_ex, TokenRegion::prompt);
  const RowMap tg_rows = batch_row_map(tg_batch, tg_ex, TokenRegion::prompt);
  const auto en = english_reference_routing(model, en_batch.inputs, en_rows);
  CHECK_FALSE(en.mean[0].requires_grad());
  const ExpertSets sets = {{0, 1}, {1, 2, 3}, {3}};
  const std::vector<unsigned char> ci = {1, 1};
  auto fn = [&](const std::vector<Vd>&) {
    auto logits = model(tg_batch.inputs);
    return cross_entropy(logits, tg_batch.targets) +
           routing_alignment_loss(model, tg_rows, en, sets, zone, ci, {.lambda = 3.0, .beta = 1.0});
  };
  {
    // The alignment term is not zero here, so the gradcheck exercises it.
    (void)model(tg_batch.inputs);
    CHECK(routing_alignment_loss(model, tg_rows, en, sets, zone, ci).item() > 1e-6);
  }
  MIXMOE_REQUIRE_GRADCHECK(fn, parameters(model), GradcheckOptions{.eps = 1e-6, .atol = 1e-7, .rtol = 1e-5});

  // The English forward after the target-language one (a training loop's extra loss) gives the
  // same loss and the same gradients as the English forward first.
  const AlignmentLossOptions opt{.lambda = 3.0};
  (void)model(tg_batch.inputs);
  zero_grad(model);
  Vd first = routing_alignment_loss(model, tg_rows, en, sets, zone, ci, opt);
  first.backward();
  std::vector<Td> g_first;
  for (auto& p : parameters(model)) g_first.push_back(p.grad().defined() ? p.grad().clone() : Td::zeros(p.shape()));
  (void)model(tg_batch.inputs);
  zero_grad(model);
  Vd after = routing_alignment_loss_with_english_forward(model, tg_rows, en_batch.inputs, en_rows, sets, zone, ci, opt);
  after.backward();
  CHECK(after.item() == Approx(first.item()).epsilon(1e-12));
  const auto params = parameters(model);
  double moved = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Td g = params[i].grad().defined() ? params[i].grad() : Td::zeros(params[i].shape());
    CHECK(max_abs_diff(g, g_first[i]) < 1e-12);
    moved += max_abs_diff(g, Td::zeros(g.shape()));
  }
  CHECK(moved > 0);
  // No ci example: 0, and no English forward (the records stay the target-language forward's).
  (void)model(tg_batch.inputs);
  const Vd none = routing_alignment_loss_with_english_forward(model, tg_rows, en_batch.inputs, en_rows, sets, zone,
                                                              std::vector<unsigned char>{0, 0}, opt);
  CHECK(none.item() == 0.0);
  CHECK(capture_example_routing(model, tg_rows).mean[0].requires_grad());
}

TEST_CASE("gap predictor: least-squares line and R^2", "[align]") {
  // Exact line: gain = 0.1 + 2 ci.
  const std::vector<GapPoint> exact = {{"a", 0.1, 0.3}, {"b", 0.2, 0.5}, {"c", 0.4, 0.9}};
  const LinearFit f = fit_gap_predictor(exact);
  CHECK(f.intercept == Approx(0.1));
  CHECK(f.slope == Approx(2.0));
  CHECK(f.r2 == Approx(1.0));
  CHECK(f.rmse == Approx(0.0).margin(1e-12));
  CHECK(f.predict(0.3) == Approx(0.7));
  // x = 0..3, y = 1, 3, 2, 5: S_xx = 5, S_xy = 5.5, S_yy = 8.75 -> b = 1.1, a = 1.1, R^2 = 5.5^2 / (5 * 8.75).
  const LinearFit g = fit_line({0, 1, 2, 3}, {1, 3, 2, 5});
  CHECK(g.slope == Approx(1.1));
  CHECK(g.intercept == Approx(1.1));
  CHECK(g.r2 == Approx(30.25 / 43.75));
  CHECK(g.points == 4);
  CHECK(format_gap_predictor(exact, f).find("gain = 0.1000 + 2.0000 * ci   (R^2 = 1.0000") != std::string::npos);
  // A falling line prints its sign once: gain = 1 - 0.5 ci.
  const std::vector<GapPoint> falling = {{"a", 0.0, 1.0}, {"b", 1.0, 0.5}};
  CHECK(format_gap_predictor(falling, fit_gap_predictor(falling)).find("gain = 1.0000 - 0.5000 * ci") !=
        std::string::npos);
  MIXMOE_REQUIRE_ERROR(fit_line({1, 1}, {0, 2}), "same x");
  MIXMOE_REQUIRE_ERROR(fit_line({1}, {0}), "at least 2 points");
}
}  // namespace test_align
