// train_loop: an interrupted and resumed run equals an uninterrupted one (losses, log, weights),
// evaluation / best checkpoint / early stopping, and a diverging run stops with the last good
// checkpoint intact; a prompt-masked decoder learns to copy its prompt (what a translation of
// software messages mostly is), through the batcher, the loop and greedy decoding.
#include "test_util.hpp"

#include <filesystem>
#include <fstream>
#include <random>

#include <mixmoe/data/batching.hpp>
#include <mixmoe/eval/decode.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/train/loop.hpp>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_train_loop {

using namespace mixmoe;
namespace fs = std::filesystem;

namespace {

using Expert = SwiGLU<float>;
using MoEFFN = MixedMoE<TopK<1>, ExpertGroup<Expert, tag::lm>, ExpertGroup<Expert, tag::mt>>;
using LoopLM = DecoderLM<CausalSelfAttention<float>, MoEFFN>;

ModelConfig loop_config() {
  ModelConfig c;
  c.vocab = 13;
  c.d_model = 16;
  c.layers = 2;
  c.heads = 2;
  c.d_ff = 32;
  c.seed = 5;
  c.moe.experts_per_group = {2, 2};
  c.moe.expert_hidden = 8;
  c.moe.top_k = 1;
  return c;
}

// Sentences of a little grammar: a counting pattern the model can learn.
std::vector<Example> loop_examples() {
  std::vector<Example> ex;
  for (int i = 0; i < 24; ++i) {
    Example e;
    const int len = 3 + i % 5;
    for (int p = 0; p < len; ++p) e.ids.push_back(4 + (i + p) % 9);
    e.target_begin = 1;
    ex.push_back(std::move(e));
  }
  return ex;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("mixmoe_test_loop_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct Run {
  LoopResult result;
  std::vector<float> weights;
  std::vector<nlohmann::json> log;
};

std::vector<float> flat_weights(LoopLM& m) {
  std::vector<float> w;
  for (const auto& p : parameters(m)) {
    const auto t = p.value().contiguous();
    w.insert(w.end(), t.data(), t.data() + t.numel());
  }
  return w;
}

// Trains for `steps` of a schedule of `total` steps, in `dir`.
using ExtraLoss = std::function<Var<float>(LoopLM&, const Batch&)>;

Run run_loop(const fs::path& dir, std::int64_t steps, std::int64_t total, const ExtraLoss& extra = {}) {
  LoopLM model(loop_config());
  AdamW<float> opt(parameters(model), {.lr = 1e-2});
  TokenBudgetBatcher data(loop_examples(), {.token_budget = 24, .max_len = 16, .seed = 9});
  MetricsLog log(dir / "metrics.jsonl");
  LoopOptions o;
  o.stage = "loop-test";
  o.steps = steps;
  o.schedule = {.peak_lr = 1e-2, .min_lr = 1e-3, .warmup_steps = 3, .total_steps = total};
  o.label_smoothing = 0.1;
  o.checkpoint_dir = dir / "ckpt";
  o.checkpoint_every = 4;
  o.log_every = 1;
  o.out = nullptr;
  o.metrics = &log;
  Run r;
  r.result = train_loop(model, opt, data, o, {}, extra);
  r.weights = flat_weights(model);
  r.log = read_metrics(dir / "metrics.jsonl");
  return r;
}

}  // namespace

TEST_CASE("train_loop: an extra loss is added to every step's loss and gradient", "[train][extra]") {
  const fs::path a = fresh_dir("x0"), b = fresh_dir("x1"), c = fresh_dir("x2");
  const Run plain = run_loop(a, 6, 6);
  // A constant: the same weights, every logged loss higher by exactly that constant.
  int calls = 0;
  const Run shifted = run_loop(b, 6, 6, [&](LoopLM& m, const Batch& batch) {
    ++calls;
    CHECK(batch.inputs.numel() > 0);
    return sum(m.embed.weight) * 0.0 + 0.25;
  });
  CHECK(calls == 6);
  REQUIRE(shifted.log.size() == plain.log.size());
  for (std::size_t i = 0; i < plain.log.size(); ++i) {
    CHECK(shifted.log[i]["loss"].get<double>() == Approx(plain.log[i]["loss"].get<double>() + 0.25).epsilon(1e-6));
    CHECK(shifted.log[i]["extra"].get<double>() == Approx(0.25));
    CHECK(shifted.log[i]["ce"].get<double>() == plain.log[i]["ce"].get<double>());
  }
  CHECK(std::memcmp(shifted.weights.data(), plain.weights.data(), plain.weights.size() * sizeof(float)) == 0);
  // A penalty on the embedding's squared norm: its gradient reaches the optimizer, the norm shrinks.
  const Run penalised = run_loop(c, 6, 6, [](LoopLM& m, const Batch&) {
    return sum(m.embed.weight * m.embed.weight) * 5.0;
  });
  LoopLM fresh(loop_config());
  const auto embed_norm = [](const std::vector<float>& w, std::size_t n) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += double(w[i]) * w[i];
    return s;
  };
  const std::size_t n_embed = static_cast<std::size_t>(fresh.embed.weight.value().numel());
  // parameters() visits the embedding first (checked: its size leads the flat vector).
  REQUIRE(flat_weights(fresh).size() == plain.weights.size());
  CHECK(embed_norm(penalised.weights, n_embed) < 0.8 * embed_norm(plain.weights, n_embed));
  for (const auto& d : {a, b, c}) fs::remove_all(d);
}

TEST_CASE("train_loop: a resumed run is bit-identical to an uninterrupted one", "[train][resume]") {
  const fs::path a = fresh_dir("a"), b = fresh_dir("b");
  const Run whole = run_loop(a, 14, 14);
  REQUIRE(whole.result.steps == 14);
  REQUIRE(whole.log.size() == 14);
  // The loss goes down on this learnable data.
  REQUIRE(whole.log.back()["ce"].get<double>() < whole.log.front()["ce"].get<double>());

  // Interrupted after step 8 (the last checkpoint is at 8), then resumed to 14.
  const Run first = run_loop(b, 8, 14);
  REQUIRE(first.result.steps == 8);
  const Run resumed = run_loop(b, 14, 14);
  CHECK(resumed.result.resumed_from == 8);
  REQUIRE(resumed.result.steps == 14);
  REQUIRE(resumed.log.size() == whole.log.size());
  for (std::size_t i = 0; i < whole.log.size(); ++i) {
    INFO("log line " << i);
    CHECK(resumed.log[i]["step"] == whole.log[i]["step"]);
    CHECK(resumed.log[i]["loss"].get<double>() == whole.log[i]["loss"].get<double>());
    CHECK(resumed.log[i]["lr"].get<double>() == whole.log[i]["lr"].get<double>());
  }
  REQUIRE(resumed.weights.size() == whole.weights.size());
  CHECK(std::memcmp(resumed.weights.data(), whole.weights.data(), whole.weights.size() * sizeof(float)) == 0);

  // Interrupted off the checkpoint grid: a run's last step is always saved.
  const fs::path c = fresh_dir("c");
  (void)run_loop(c, 10, 14);  // checkpoints at 4, 8 and at its own end, 10
  const Run again = run_loop(c, 14, 14);
  CHECK(again.result.resumed_from == 10);
  CHECK(std::memcmp(again.weights.data(), whole.weights.data(), whole.weights.size() * sizeof(float)) == 0);
  for (const auto& d : {a, b, c}) fs::remove_all(d);
}

TEST_CASE("train_loop: evaluation, best checkpoint and early stopping", "[train][eval]") {
  const fs::path d = fresh_dir("eval");
  LoopLM model(loop_config());
  AdamW<float> opt(parameters(model), {.lr = 1e-2});
  TokenBudgetBatcher data(loop_examples(), {.token_budget = 24, .max_len = 16, .seed = 9});
  LoopOptions o;
  o.stage = "eval-test";
  o.steps = 40;
  o.eval_every = 2;
  o.patience = 3;
  o.checkpoint_dir = d / "ckpt";
  o.out = nullptr;
  // A score that improves twice and then never again: stops after 3 more evaluations.
  int calls = 0;
  const std::vector<double> scores{1.0, 2.0, 1.5, 1.9, 1.8, 5.0};
  auto eval = [&](LoopLM&) {
    const double s = scores.at(static_cast<std::size_t>(calls++));
    return EvalResult{s, {{"score", s}}};
  };
  const LoopResult r = train_loop(model, opt, data, o, std::function<EvalResult(LoopLM&)>(eval));
  CHECK(r.stopped_early);
  CHECK(calls == 5);
  CHECK(r.steps == 10);
  REQUIRE(r.best_score);
  CHECK(*r.best_score == 2.0);
  CHECK(r.best_step == 4);
  CHECK(open_checkpoint(d / "ckpt" / "best") == d / "ckpt" / "best");
  CHECK(read_model_info(d / "ckpt" / "best").extra["step"] == 4);
  // Resuming a run that stopped early does nothing more.
  LoopLM model2(loop_config());
  AdamW<float> opt2(parameters(model2), {.lr = 1e-2});
  const LoopResult r2 = train_loop(model2, opt2, data, o, std::function<EvalResult(LoopLM&)>(eval));
  CHECK(r2.steps == 10);
  CHECK(calls == 5);
  fs::remove_all(d);
}

TEST_CASE("train_loop: non-finite steps are skipped, then training stops with the last checkpoint intact",
          "[train][faults]") {
  const fs::path d = fresh_dir("nan");
  LoopLM model(loop_config());
  AdamW<float> opt(parameters(model), {.lr = 1e-2});
  TokenBudgetBatcher data(loop_examples(), {.token_budget = 24, .max_len = 16, .seed = 9});
  LoopOptions o;
  o.stage = "nan-test";
  o.steps = 4;
  o.checkpoint_dir = d / "ckpt";
  o.out = nullptr;
  (void)train_loop(model, opt, data, o);
  const std::vector<float> good = flat_weights(model);

  // Poison one weight: every later step has a nan loss; the guard gives up after 3 in a row.
  model.embed.weight.value().data()[0] = std::numeric_limits<float>::quiet_NaN();
  o.steps = 20;
  o.guard.max_consecutive = 3;
  std::ostringstream warnings;
  o.guard.warn = &warnings;
  o.out = &warnings;
  o.progress.mode = ProgressOptions::Mode::Log;
  o.resume = false;  // (resuming would load the good weights back)
  MIXMOE_REQUIRE_ERROR(train_loop(model, opt, data, o), "training diverged");
  CHECK(warnings.str().find("skipping step") != std::string::npos);
  // The checkpoint of the last good state is intact and loads.
  LoopLM restored(loop_config());
  AdamW<float> opt3(parameters(restored), {.lr = 1e-2});
  const TrainState st = load_training_state(d / "ckpt" / "last", restored, opt3);
  CHECK(st.global_step == 4);
  CHECK(flat_weights(restored) == good);
  fs::remove_all(d);
}

TEST_CASE("supervised_logits: projecting only the supervised positions gives the loss and gradients of the full "
          "projection", "[train][lm_loss]") {
  using LM = DecoderLM<CausalSelfAttention<double>, MixedMoE<TopK<1>, ExpertGroup<SwiGLU<double>, tag::lm>,
                                                          ExpertGroup<SwiGLU<double>, tag::mt>>>;
  for (const bool tied : {true, false}) {
    ModelConfig c = loop_config();
    c.tie_embeddings = tied;
    LM model(c);
    // Translation-like rows: prompts of different lengths (ignored targets) and right padding.
    std::vector<Example> ex;
    for (int i = 0; i < 5; ++i) {
      Example e;
      for (int p = 0; p < 4 + 2 * i; ++p) e.ids.push_back(3 + (5 * i + p) % 10);
      e.target_begin = 1 + i;
      ex.push_back(std::move(e));
    }
    const Batch batch = collate(ex);
    REQUIRE(batch.target_tokens > 0);
    REQUIRE(batch.target_tokens < batch.targets.numel());
    for (const double smoothing : {0.0, 0.1}) {
      CrossEntropyOptions opt;
      opt.label_smoothing = smoothing;
      auto grads_of = [&](bool sparse) {
        for (auto& p : parameters(model)) p.zero_grad();
        Var<double> loss = sparse ? [&] {
          auto sup = supervised_logits(model, batch, opt.ignore_index);
          CHECK(sup.logits.shape() == Shape{batch.target_tokens, c.vocab});
          return cross_entropy(sup.logits, sup.targets, opt);
        }()
                                  : cross_entropy(model(batch.inputs), batch.targets, opt);
        loss.backward();
        std::vector<double> g{loss.value().item()};
        for (const auto& p : parameters(model)) {
          const auto t = p.grad().contiguous();
          g.insert(g.end(), t.data(), t.data() + t.numel());
        }
        release_routing_graphs(model);
        return g;
      };
      const auto full = grads_of(false);
      const auto sparse = grads_of(true);
      REQUIRE(full.size() == sparse.size());
      double worst = 0, largest = 0;
      for (std::size_t i = 0; i < full.size(); ++i) {
        worst = std::max(worst, std::abs(full[i] - sparse[i]));
        largest = std::max(largest, std::abs(full[i]));
      }
      INFO("tied " << tied << ", label smoothing " << smoothing << ": loss " << full[0]);
      CHECK(largest > 1e-3);  // the gradients are not all zero
      CHECK(worst <= 1e-12 * (1 + largest));
    }
  }
}

TEST_CASE("supervised_logits: a batch whose target count is wrong is an error naming both counts", "[train][lm_loss]") {
  LoopLM model(loop_config());
  Batch batch = collate(loop_examples());
  batch.target_tokens -= 1;
  CHECK_THROWS_WITH(supervised_logits(model, batch), Catch::Contains("target_tokens"));
}

// The capability that translation needs first: reading the prompt. Random sequences,
// "<1> x <2> x </3>", the loss on the copy only; a model that cannot attend back (a broken mask,
// position encoding or prompt offset) stays near chance, 1 in 20 per token.
TEST_CASE("a decoder LM learns to copy its prompt through the batcher, the loop and greedy decoding", "[train]") {
  ModelConfig c;
  c.vocab = 24;
  c.d_model = 64;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.d_ff = 256;
  c.seed = 1;
  DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> model(c);
  std::mt19937_64 g(7);
  const auto make = [&](int n) {
    std::vector<Example> v;
    for (int i = 0; i < n; ++i) {
      std::vector<index_t> x(3 + g() % 6);
      for (auto& t : x) t = static_cast<index_t>(4 + g() % 20);
      Example e;
      e.ids.push_back(1);
      e.ids.insert(e.ids.end(), x.begin(), x.end());
      e.ids.push_back(2);
      e.target_begin = static_cast<index_t>(e.ids.size());
      e.ids.insert(e.ids.end(), x.begin(), x.end());
      e.ids.push_back(3);
      v.push_back(std::move(e));
    }
    return v;
  };
  const std::vector<Example> test = make(100);
  const auto accuracy = [&] {  // per token of the copies, and whole copies exactly right
    DecodeOptions o;
    o.max_new_tokens = 12;
    o.stop_ids = {3};
    double tokens = 0, right = 0, exact = 0;
    for (const auto& e : test) {
      const std::vector<Index> prompt(e.ids.begin(), e.ids.begin() + e.target_begin);
      const Hypothesis h = greedy_decode(model, prompt, o);
      const std::vector<Index> want(e.ids.begin() + e.target_begin, e.ids.end());
      exact += h.tokens == want ? 1 : 0;
      for (std::size_t k = 0; k < want.size(); ++k) {
        tokens += 1;
        right += k < h.tokens.size() && h.tokens[k] == want[k] ? 1 : 0;
      }
    }
    return std::pair{right / tokens, exact / static_cast<double>(test.size())};
  };
  const auto [token0, exact0] = accuracy();
  TokenBudgetBatcher data(make(20000), {.token_budget = 512, .max_len = 32, .seed = 3});
  AdamW<float> opt(trainable_parameters(model), {.lr = 3e-3, .weight_decay = 0.01});
  LoopOptions o;
  o.steps = 500;
  o.schedule = {.peak_lr = 3e-3, .min_lr = 3e-4, .warmup_steps = 25, .total_steps = 500};
  o.out = nullptr;
  train_loop(model, opt, data, o, {});
  const auto [token1, exact1] = accuracy();
  INFO("token accuracy " << token0 << " -> " << token1 << ", exact copies " << exact0 << " -> " << exact1);
  CHECK(token0 < 0.2);
  CHECK(token1 > 0.75);
  CHECK(exact1 > 0.4);
}

}  // namespace test_train_loop
