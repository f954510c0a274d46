// mixmoe-ramoe: routing-aligned fine-tuning (RA-MoE) of a Mix-MoE translation model on the
// ISO-code task, against plain SFT, Routing Steering (soft, hard) and RISE, over several seeds.
//
//   mixmoe-ramoe compare --model runs-ramoe/mix-fft/model --iso data/catalogs/iso-codes
//                        --corpus data/corpus --out runs-ramoe/ramoe [--seeds 1,2,3] ...
//
// The protocol (docs/ramoe.md), per seed:
//  1. the task base: the translation model fine-tuned on the English questions of every item
//     ("<2iso3166> Germany <sep>" -> "DE"), so that the English side of the task is known;
//  2. the base's answers on the train items in English and in each target language give the
//     cc/ci/ic/ii categories (ci: right in English, wrong in the target language: correctable);
//  3. routing statistics of the base: task experts of the alignment zone (middle layers) from
//     English task prompts against general English text (Δ of selection frequency), the
//     cross-lingual routing similarity per layer, per-language frequencies for RISE;
//  4. from the same base, on the same data (the train items in every language, plus the English
//     questions of the other items as rehearsal, so that no method is scored on forgetting what
//     the base knew; --no-rehearsal leaves them out) and budget:
//       sft     cross-entropy;
//       ramoe   cross-entropy + λ · routing alignment loss on the ci items (align/alignment_loss.hpp);
//       rise    cross-entropy, only the RISE-selected experts trainable (align/rise.hpp);
//     and, with no training, steering of the base at inference (soft and hard, align/steering.hpp);
//  5. exact-match accuracy per language on the test items.
// Then the gap predictor: per (seed, language), the gain of RA-MoE over the base against the
// language's ci proportion, with a least-squares line and R² (align/gap_predictor.hpp).
// Everything goes to <out>/results.json (scripts/ramoe_results.py makes the tables and plots).
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <mixmoe/align/alignment_loss.hpp>
#include <mixmoe/align/categorize.hpp>
#include <mixmoe/align/gap_predictor.hpp>
#include <mixmoe/align/rise.hpp>
#include <mixmoe/align/routing_capture.hpp>
#include <mixmoe/align/steering.hpp>
#include <mixmoe/align/task_experts.hpp>
#include <mixmoe/data/batching.hpp>
#include <mixmoe/data/corpus.hpp>
#include <mixmoe/data/iso_task.hpp>
#include <mixmoe/data/tokenizer.hpp>
#include <mixmoe/eval/decode.hpp>
#include <mixmoe/io/atomic_file.hpp>
#include <mixmoe/moe/upcycle.hpp>
#include <mixmoe/train/checkpoint.hpp>
#include <mixmoe/train/freeze.hpp>
#include <mixmoe/train/loop.hpp>

#include "../translate/models.hpp"

using namespace mixmoe;
using namespace mixmoe_examples;
namespace fs = std::filesystem;

namespace {

struct Args {
  fs::path model, iso, corpus = "data/corpus", out = "runs-ramoe/ramoe", tokenizer;
  std::vector<std::string> langs{"de", "fr", "es", "ru", "ja", "zh_CN"};
  std::vector<std::uint64_t> seeds{1, 2, 3};
  std::int64_t steps_en = 200, steps = 150;
  double lr = 1e-3;
  index_t token_budget = 1024;
  double lambda = 1.0, beta = 1.0, steer_lambda = 0.5;
  bool rehearsal = true;  // the English questions of the dev/test items join every method's data
  index_t top_m = 2;
  int general_sentences = 400;
};

void say(const std::string& what) {
  const auto t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char buf[16];
  std::strftime(buf, sizeof buf, "%H:%M:%S", std::localtime(&t));
  std::cerr << "[" << buf << "] " << what << std::endl;
}

std::string fixed(double v, int digits = 3) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(digits) << v;
  return os.str();
}

// ---- the task data of one run --------------------------------------------------------------
struct TaskData {
  IsoTaskSet set;
  std::vector<std::string> langs;  // "en" first, then the targets
  // Training examples (train items, every language; with rehearsal also the English questions of
  // the other items) and, per example, its item and language.
  std::vector<Example> train;
  std::vector<IsoQuery> train_queries;
  // The English example of every item (index = item), for the alignment loss's English side.
  std::map<std::size_t, Example> english_of_item;
};

TaskData make_task(const Args& a, const Tokenizer& tok) {
  TaskData d;
  IsoTaskOptions o = IsoTaskOptions::under(a.iso);
  o.languages = a.langs;
  d.set = build_iso_task(o);
  d.langs = d.set.languages;
  d.train_queries = iso_queries(d.set, "train", d.langs);
  // Rehearsal: the base learnt the English questions of every item (step 1 of the protocol);
  // fine-tuning on the train items alone makes every method forget the English side of the test
  // items, and the comparison would measure that instead of the cross-lingual transfer. The
  // English rows are never ci, so the alignment loss does not see them.
  if (a.rehearsal)
    for (const IsoQuery& q : iso_queries(d.set, "", {"en"}))
      if (d.set.items[q.item].split != "train") d.train_queries.push_back(q);
  d.train = iso_examples(tok, d.set, d.train_queries);
  for (std::size_t i = 0; i < d.set.items.size(); ++i)
    if (d.set.items[i].has("en")) d.english_of_item.emplace(i, make_iso_example(tok, d.set.items[i], "en"));
  return d;
}

// ---- helpers over a model -----------------------------------------------------------------------
template <class Model>
std::vector<std::string> answer(const Model& model, const Tokenizer& tok, const TaskData& d,
                                const std::vector<IsoQuery>& qs) {
  no_grad ng;
  std::vector<std::string> out;
  out.reserve(qs.size());
  DecodeOptions opt;
  opt.max_new_tokens = 6;
  opt.stop_ids = {static_cast<Index>(tok.eos_id())};
  for (const auto& q : qs) {
    const IsoPrompt p = iso_prompt(tok, d.set.items[q.item], q.lang);
    Hypothesis h = greedy_decode(model, std::vector<Index>(p.ids.begin(), p.ids.end()), opt);
    if (h.finished && !h.tokens.empty()) h.tokens.pop_back();
    out.push_back(tok.decode(std::vector<index_t>(h.tokens.begin(), h.tokens.end())));
  }
  return out;
}

template <class Model>
IsoScore score(const Model& model, const Tokenizer& tok, const TaskData& d, const std::string& split) {
  const auto qs = iso_queries(d.set, split, d.langs);
  return score_iso_task(d.set, qs, answer(model, tok, d, qs));
}

/// Fine-tunes `model` (its trainable parameters) on `examples`; `extra` is an extra loss.
template <class Model>
void fine_tune(Model& model, std::vector<Example> examples, const Args& a, std::int64_t steps, std::uint64_t seed,
               const std::string& stage,
               const std::function<Var<float>(Model&, const Batch&)>& extra = {}) {
  TokenBudgetBatcher data(std::move(examples), {.token_budget = a.token_budget, .max_len = 48, .seed = seed});
  AdamW<float> opt(trainable_parameters(model), {.lr = a.lr, .weight_decay = 0.0});
  LoopOptions o;
  o.stage = stage;
  o.steps = steps;
  o.schedule = {.peak_lr = a.lr, .min_lr = a.lr * 0.1, .warmup_steps = std::max<std::int64_t>(1, steps / 10),
                .total_steps = steps};
  o.load_balance = 0.0;  // the task fine-tuning keeps the routing objective to the methods' own terms
  o.z_loss = 0.0;
  o.progress.log_fraction = 0.5;
  train_loop(model, opt, data, o, {}, extra);
}

// Frequencies over the prompts of `examples` (batches of 64).
template <class Model>
RoutingFrequencies prompt_frequencies(const Model& model, const std::vector<Example>& examples, TokenRegion region) {
  no_grad ng;
  RoutingFrequencies f;
  for (std::size_t at = 0; at < examples.size(); at += 64) {
    const std::span<const Example> part(examples.data() + at, std::min<std::size_t>(64, examples.size() - at));
    const Batch b = collate(part);
    (void)model(b.inputs);
    f.add(model, batch_row_map(b, part, region));
  }
  return f;
}

nlohmann::json accuracy_json(const IsoScore& s) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& l : s.languages) j[l] = s.accuracy(l);
  return j;
}

// ---- one seed ---------------------------------------------------------------------------------
template <class Model>
nlohmann::json run_seed(const Model& loaded, const Tokenizer& tok, const TaskData& d,
                        const std::vector<Example>& general, const Args& a, std::uint64_t seed) {
  nlohmann::json r;
  r["seed"] = seed;
  const std::vector<std::string> targets(d.langs.begin() + 1, d.langs.end());

  // 1. The task base: English questions of every item.
  // A copy of a model's weights in a new model of the same configuration.
  const auto copy_of = [](const Model& src) {
    Model m(src.config);
    copy_parameter_values(src, m);
    return m;
  };
  Model base = copy_of(loaded);
  set_requires_grad(base, [](std::string_view) { return true; }, true);
  {
    const auto qs = iso_queries(d.set, "", {"en"});
    say("seed " + std::to_string(seed) + ": English task fine-tuning on " + std::to_string(qs.size()) + " items");
    fine_tune(base, iso_examples(tok, d.set, qs), a, a.steps_en, seed, "task-en");
  }

  // 2. Categories of the train items from the base's answers.
  const IsoScore base_train = score(base, tok, d, "train");
  const IsoScore base_test = score(base, tok, d, "test");
  r["base"] = accuracy_json(base_test);
  r["base_train"] = accuracy_json(base_train);
  std::set<std::pair<std::size_t, std::string>> ci_items;  // (item, lang)
  std::vector<CategoryCounts> counts;
  for (const auto& l : targets) {
    std::vector<bool> en, tg;
    std::vector<std::size_t> items;
    for (std::size_t row = 0; row < base_train.items.size(); ++row) {
      const auto e = base_train.correct.at("en")[row], t = base_train.correct.at(l)[row];
      if (e < 0 || t < 0) continue;
      en.push_back(e == 1);
      tg.push_back(t == 1);
      items.push_back(base_train.items[row]);
    }
    const auto cats = categorize(en, tg);
    for (std::size_t i = 0; i < cats.size(); ++i)
      if (cats[i] == Category::ci) ci_items.insert({items[i], l});
    counts.push_back(count_categories(cats, l));
    const CategoryCounts& c = counts.back();
    r["categories"][l] = {{"cc", c[Category::cc]}, {"ci", c[Category::ci]}, {"ic", c[Category::ic]},
                          {"ii", c[Category::ii]}};
  }
  std::cerr << format_category_table(counts);

  // 3. Routing statistics of the base.
  std::vector<Example> en_train;
  for (const auto& [item, ex] : d.english_of_item)
    if (d.set.items[item].split == "train") en_train.push_back(ex);
  const RoutingFrequencies task_freq = prompt_frequencies(base, en_train, TokenRegion::prompt);
  const RoutingFrequencies general_freq = prompt_frequencies(base, general, TokenRegion::inputs);
  const std::vector<RouterSlot> slots = task_freq.slots();
  const index_t layers = num_slot_layers(slots);
  const std::vector<index_t> zone_layers = middle_layers(layers);
  const std::vector<index_t> zone = slots_of_layers(slots, zone_layers);
  TaskExpertOptions teo;
  teo.select = TaskExpertSelect::top_m;
  teo.top_m = a.top_m;
  teo.min_delta = 0.0;
  const ExpertSets task_sets = select_task_experts(task_freq, general_freq, zone, teo);
  std::cerr << format_task_experts(slots, task_sets, frequency_delta(task_freq, general_freq));
  r["zone_layers"] = zone_layers;
  r["slots"] = nlohmann::json::array();
  for (const auto& s : slots) r["slots"].push_back({{"layer", s.layer}, {"name", s.name}, {"experts", s.num_experts}});
  r["delta"] = frequency_delta(task_freq, general_freq);
  r["task_experts"] = task_sets;

  // Per-language frequencies (RISE) and cross-lingual similarity per layer, on the train items:
  // the examples of d.train by language (English's frequencies are the task statistics above).
  std::map<std::string, std::vector<std::size_t>> rows_of;  // language -> indices into d.train
  for (std::size_t i = 0; i < d.train_queries.size(); ++i) rows_of[d.train_queries[i].lang].push_back(i);
  LanguageFrequencies lang_freq{task_freq.selection_frequency()};
  for (const auto& l : targets) {
    std::vector<Example> ex;
    for (const std::size_t i : rows_of[l]) ex.push_back(d.train[i]);
    lang_freq.push_back(prompt_frequencies(base, ex, TokenRegion::prompt).selection_frequency());
  }
  for (const auto& l : targets) {
    RoutingSimilarity sim;
    std::vector<Example> en_ex, tg_ex;
    for (const std::size_t i : rows_of[l]) {
      const auto en = d.english_of_item.find(d.train_queries[i].item);
      if (en == d.english_of_item.end()) continue;
      en_ex.push_back(en->second);
      tg_ex.push_back(d.train[i]);
    }
    no_grad ng;
    for (std::size_t at = 0; at < en_ex.size(); at += 64) {
      const std::size_t n = std::min<std::size_t>(64, en_ex.size() - at);
      const std::span<const Example> pe(en_ex.data() + at, n), pt(tg_ex.data() + at, n);
      const Batch be = collate(pe), bt = collate(pt);
      (void)base(be.inputs);
      const auto re = capture_example_routing(base, batch_row_map(be, pe, TokenRegion::prompt)).detached();
      (void)base(bt.inputs);
      const auto rt = capture_example_routing(base, batch_row_map(bt, pt, TokenRegion::prompt)).detached();
      sim.add(re, rt);
    }
    r["similarity"][l] = sim.per_layer();
  }

  // 4. The methods, from the base, on the same data and budget.
  const auto evaluate = [&](const std::string& name, const Model& m) {
    const IsoScore s = score(m, tok, d, "test");
    r["methods"][name] = accuracy_json(s);
    std::cerr << name << ": " << format_iso_accuracy(s);
  };
  r["methods"]["base"] = r["base"];
  {  // steering at inference
    for (const SteeringMode mode : {SteeringMode::soft, SteeringMode::hard}) {
      Model m = copy_of(base);
      RoutingSteering spec;
      spec.experts = task_sets;
      spec.mode = mode;
      spec.lambda = a.steer_lambda;
      spec.layers = zone_layers;
      SteeringGuard guard(m, spec);
      evaluate(std::string("steer-") + steering_mode_name(mode), m);
    }
  }
  {  // plain SFT
    Model m = copy_of(base);
    set_requires_grad(m, [](std::string_view) { return true; }, true);
    fine_tune(m, d.train, a, a.steps, seed + 100, "sft");
    evaluate("sft", m);
  }
  {  // RA-MoE
    Model m = copy_of(base);
    set_requires_grad(m, [](std::string_view) { return true; }, true);
    const std::vector<Example>& ex = d.train;
    const std::function<Var<float>(Model&, const Batch&)> align = [&](Model& model, const Batch& b) {
      std::vector<Example> en;
      std::vector<unsigned char> ci;
      for (const index_t id : b.example_ids) {
        const IsoQuery& q = d.train_queries[static_cast<std::size_t>(id)];
        const auto it = d.english_of_item.find(q.item);
        en.push_back(it != d.english_of_item.end() ? it->second : ex[static_cast<std::size_t>(id)]);
        ci.push_back(q.lang != "en" && it != d.english_of_item.end() && ci_items.count({q.item, q.lang}) ? 1 : 0);
      }
      const Batch eb = collate(en);
      AlignmentLossOptions ao;
      ao.lambda = a.lambda;
      ao.beta = a.beta;
      return routing_alignment_loss_with_english_forward(model, batch_row_map(b, ex, TokenRegion::prompt), eb.inputs,
                                                         batch_row_map(eb, en, TokenRegion::prompt), task_sets, zone,
                                                         ci, ao);
    };
    fine_tune(m, d.train, a, a.steps, seed + 100, "ramoe", align);
    evaluate("ramoe", m);
  }
  {  // RISE: the union of the experts selected for each target language
    Model m = copy_of(base);
    const auto zones = slot_zones(m);
    ExpertSets chosen(slots.size());
    for (std::size_t t = 1; t < d.langs.size(); ++t) {
      const RiseSelection sel = rise_select(lang_freq, t, zones);
      for (std::size_t s = 0; s < slots.size(); ++s)
        for (const index_t e : sel.experts[s])
          if (std::find(chosen[s].begin(), chosen[s].end(), e) == chosen[s].end()) chosen[s].push_back(e);
    }
    const FreezeReport rep = apply_freeze_policy(m, experts_only_policy(m, chosen));
    say("rise: " + rep.summary());
    r["rise_experts"] = chosen;
    fine_tune(m, d.train, a, a.steps, seed + 100, "rise");
    evaluate("rise", m);
  }
  return r;
}

template <class Model>
int compare(const Args& a, const ModelInfo& info, const Tokenizer& tok) {
  Model loaded(info.config);
  load_model(loaded, a.model);
  const TaskData d = make_task(a, tok);
  say("task: " + std::to_string(d.set.items.size()) + " items, " + std::to_string(d.train.size()) +
      " training questions in " + std::to_string(d.langs.size()) + " languages");
  // General text: English sentences of the corpus's monolingual text (LM examples, no prompt).
  const Corpus corpus = load_corpus(a.corpus);
  std::vector<Example> general;
  const auto& mono = corpus.mono.at("en");
  for (std::size_t i = 0; i < mono.size() && general.size() < static_cast<std::size_t>(a.general_sentences); i += 37) {
    auto ids = tok.encode(mono[i]);
    if (ids.size() < 2) continue;
    if (ids.size() > 48) ids.resize(48);
    general.push_back(Example{ids, 1});
  }
  nlohmann::json all;
  all["model"] = a.model.string();
  all["languages"] = d.langs;
  all["items"] = {{"train", iso_queries(d.set, "train", {"en"}).size()}, {"test", iso_queries(d.set, "test", {"en"}).size()}};
  all["options"] = {{"steps_en", a.steps_en}, {"steps", a.steps},     {"lr", a.lr},         {"lambda", a.lambda},
                    {"beta", a.beta},         {"top_m", a.top_m},     {"steer_lambda", a.steer_lambda},
                    {"token_budget", a.token_budget}, {"rehearsal", a.rehearsal}};
  fs::create_directories(a.out);
  for (const auto seed : a.seeds) {
    all["runs"].push_back(run_seed(loaded, tok, d, general, a, seed));
    write_file_atomic(a.out / "results.json", all.dump(2) + "\n");  // after every seed: nothing lost
  }

  // Summary: mean and spread over seeds, and the gap predictor.
  std::cout << "\nTest accuracy (%) per language, mean ± std over " << a.seeds.size() << " seeds\n";
  const std::vector<std::string> methods{"base", "sft", "steer-soft", "steer-hard", "rise", "ramoe"};
  std::cout << std::left << std::setw(12) << "method";
  for (const auto& l : d.langs) std::cout << std::setw(14) << l;
  std::cout << '\n';
  for (const auto& m : methods) {
    std::cout << std::setw(12) << m;
    for (const auto& l : d.langs) {
      std::vector<double> v;
      for (const auto& run : all["runs"]) v.push_back(100.0 * run["methods"][m][l].get<double>());
      const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
      double var = 0;
      for (double x : v) var += (x - mean) * (x - mean);
      const double sd = v.size() > 1 ? std::sqrt(var / static_cast<double>(v.size() - 1)) : 0.0;
      std::cout << std::setw(14) << (fixed(mean, 1) + " ± " + fixed(sd, 1));
    }
    std::cout << '\n';
  }
  std::vector<GapPoint> points;
  for (const auto& run : all["runs"])
    for (std::size_t t = 1; t < d.langs.size(); ++t) {
      const std::string& l = d.langs[t];
      const auto& c = run["categories"][l];
      const double n = c["cc"].get<double>() + c["ci"].get<double>() + c["ic"].get<double>() + c["ii"].get<double>();
      GapPoint p;
      p.label = l + "/" + std::to_string(run["seed"].get<std::uint64_t>());
      p.ci_proportion = n > 0 ? c["ci"].get<double>() / n : 0.0;
      p.gain = run["methods"]["ramoe"][l].get<double>() - run["methods"]["base"][l].get<double>();
      points.push_back(p);
    }
  bool fitted = false;
  for (std::size_t i = 1; i < points.size() && !fitted; ++i) fitted = points[i].ci_proportion != points[0].ci_proportion;
  if (fitted) {
    const LinearFit f = fit_gap_predictor(points);
    std::cout << "\nGap predictor (RA-MoE gain over the base against the ci proportion, per seed and language):\n"
              << format_gap_predictor(points, f);
    all["predictor"] = {{"intercept", f.intercept}, {"slope", f.slope}, {"r2", f.r2}, {"points", f.points}};
  } else {
    std::cout << "\nGap predictor: every language has the same ci proportion; no line to fit\n";
  }
  write_file_atomic(a.out / "results.json", all.dump(2) + "\n");
  std::cout << "results: " << (a.out / "results.json").string() << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mixmoe-ramoe: routing-aligned fine-tuning of a Mix-MoE model on the ISO-code task"};
  app.require_subcommand(1);
  Args a;
  auto* cmp = app.add_subcommand("compare", "base, SFT, steering (soft, hard), RISE and RA-MoE over seeds");
  cmp->add_option("--model", a.model, "a mixmoe-translate checkpoint (e.g. runs-ramoe/mix-fft/model)")->required();
  cmp->add_option("--iso", a.iso, "root of the iso-codes tree (scripts/fetch-iso-codes.sh), e.g. data/catalogs/iso-codes")
      ->required();
  cmp->add_option("--corpus", a.corpus, "corpus directory (general English text)")->capture_default_str();
  cmp->add_option("--out", a.out, "output directory")->capture_default_str();
  cmp->add_option("--tokenizer", a.tokenizer, "tokenizer model (default: the one the checkpoint names)");
  cmp->add_option("--langs", a.langs, "target languages")->delimiter(',')->capture_default_str();
  cmp->add_option("--seeds", a.seeds, "seeds")->delimiter(',')->capture_default_str();
  cmp->add_option("--steps-en", a.steps_en, "steps of the English task fine-tuning")->capture_default_str();
  cmp->add_option("--steps", a.steps, "steps of each method's fine-tuning")->capture_default_str();
  cmp->add_option("--lr", a.lr, "peak learning rate")->capture_default_str();
  cmp->add_option("--token-budget", a.token_budget, "tokens per batch")->capture_default_str();
  cmp->add_option("--lambda", a.lambda, "weight of the routing alignment loss")->capture_default_str();
  cmp->add_option("--beta", a.beta, "weight of its allocation term")->capture_default_str();
  cmp->add_flag("--rehearsal,!--no-rehearsal", a.rehearsal,
                "add the English questions of the dev/test items to every method's data (default on)");
  cmp->add_option("--top-m", a.top_m, "task experts per router slot of the zone")->capture_default_str();
  cmp->add_option("--steer-lambda", a.steer_lambda, "soft steering: shift in logit standard deviations")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    const ModelInfo info = read_model_info(a.model);
    fs::path tp = a.tokenizer;
    if (tp.empty()) {
      MIXMOE_CHECK(info.extra.contains("tokenizer"), "mixmoe-ramoe", a.model.string(),
                   " does not name its tokenizer: give --tokenizer");
      tp = info.extra["tokenizer"].get<std::string>();
    }
    const Tokenizer tok = Tokenizer::load(tp.string());
    if (info.model_type == "mix-fft") return compare<MixFFT>(a, info, tok);
    throw Error("[mixmoe-ramoe] " + a.model.string() + " holds a model of type '" + info.model_type +
                "'; this program is built for mix-fft (add a line here for another MoE type)");
  } catch (const std::exception& e) {
    std::cerr << "mixmoe-ramoe: " << e.what() << '\n';
    return 1;
  }
}
