// mixmoe-translate: Mix-MoE multilingual translation end to end, on the gettext catalogs of a
// Debian machine.
//
//   mixmoe-translate corpus      build the English->X corpus from the downloaded catalogs
//   mixmoe-translate train       tokenizer, stage 0 (dense LM), stage 1 (upcycle + monolingual),
//                                stage 2 (parallel data), test-set BLEU/chrF table
//   mixmoe-translate translate   translate standard input or a file with a trained model
//   mixmoe-translate score       BLEU and chrF of a hypothesis file against a reference file
//
// `train --variant` picks the model of the comparison: mix-fft (Mix-MoE, the default), mix-dct,
// mix-random (the router ablations), mix-fft-nostage1, moe (vanilla MoE: one router over the
// same experts, no Fourier features, nothing frozen) and dense (full fine-tuning of the dense
// model: the interference baseline). The tokenizer and the stage-0 dense model are shared by
// all variants of one work directory. Every stage checkpoints and resumes; a finished stage is
// not trained again (--fresh starts the variant over).
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include <mixmoe/data/batching.hpp>
#include <mixmoe/data/corpus.hpp>
#include <mixmoe/data/iso_task.hpp>
#include <mixmoe/data/text_io.hpp>
#include <mixmoe/data/tokenizer.hpp>
#include <mixmoe/data/verbatim.hpp>
#include <mixmoe/eval/bleu.hpp>
#include <mixmoe/eval/chrf.hpp>
#include <mixmoe/io/atomic_file.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/routing_stats.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/moe/upcycle.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/train/checkpoint.hpp>
#include <mixmoe/train/freeze.hpp>
#include <mixmoe/train/loop.hpp>
#include <mixmoe/train/metrics_log.hpp>
#include <mixmoe/train/translation.hpp>

#include "models.hpp"

using namespace mixmoe;
namespace fs = std::filesystem;
using namespace mixmoe_examples;  // the model types of the comparison

namespace {

// ---- options -----------------------------------------------------------------------------------
struct TrainArgs {
  std::string variant = "mix-fft";
  std::string preset = "demo";
  fs::path corpus = "data/corpus";
  fs::path work = "runs";
  std::vector<std::string> langs;
  bool fresh = false;
  // sizes and budgets (0: the preset's)
  index_t vocab = 0, d_model = 0, layers = 0, d_ff = 0;
  std::int64_t steps0 = 0, steps1 = 0, steps2 = 0;
  double lr0 = 0, lr1 = 0, lr2 = 0;
  index_t token_budget = 0;
  int test_sentences = 0, beam = 0, show = 4;
  // Stage 2 of the Mix-MoE variants trains attention too (default), or keeps it frozen as the
  // paper's recipe does (--frozen-attention). A small model pretrained for minutes on monolingual
  // text has no attention pattern that reads a source to translate it; with it frozen, stage 2
  // learned far less (measured: docs/results.md, docs/translation.md).
  bool frozen_attention = false;
  // Verbatim spans (placeholders, options, numbers, paths, identifiers) go through slot tokens
  // <v1>..<v8> in every stage and come back in the translations (data/verbatim.hpp);
  // --no-verbatim trains on the raw text.
  bool verbatim = true;
  double copy_pretrain = 0.0;
  // Stage 2 of the Mix-MoE variants trains the token embeddings (tied with the output head) too
  // (default), or keeps them frozen as the paper's recipe does (--frozen-embeddings). At the demo's
  // size, stage 2 with frozen embeddings stayed below copying the source in BLEU; trained, it
  // passed it in every direction, for a larger rise of the monolingual loss (docs/results.md).
  bool frozen_embeddings = false;
  std::string mt_init = "random";  // the MT experts of an upcycled model: random, or copies of the LM experts
  std::uint64_t seed = 1;
};

struct Preset {
  std::vector<std::string> langs;
  index_t vocab, d_model, layers, heads, kv_heads, d_ff, lm_experts, mt_experts, top_k;
  index_t block_len, lm_batch, token_budget;
  std::int64_t steps0, steps1, steps2, eval_every;
  double lr0, lr1, lr2;
  int test_sentences, dev_bleu_sentences, beam;
  std::size_t tokenizer_sentences;
};

Preset preset_of(const std::string& name) {
  if (name == "demo")
    return {{"de", "fr", "es", "ru"}, 4000, 128, 4, 4, 2, 512, 4, 2, 2, 64, 16, 1536, 700, 250, 3000, 200,
            3e-3, 1e-3, 3e-3, 200, 16, 1, 150000};
  if (name == "long")
    return {{"de", "fr", "es", "ru", "ja", "zh_CN"}, 12000, 256, 6, 8, 4, 1024, 4, 4, 2, 128, 16, 4096, 6000, 3000,
            8000, 1000, 2e-3, 1e-3, 1e-3, 0, 32, 4, 400000};
  if (name == "tiny")  // the test of the example: seconds, not quality
    return {{"de", "fr"}, 600, 32, 2, 2, 1, 64, 2, 2, 1, 32, 4, 256, 12, 6, 12, 6, 3e-3, 1e-3, 1e-3, 12, 3, 1, 3000};
  throw Error("[mixmoe-translate] unknown preset '" + name + "' (demo, long, tiny)");
}

std::string now_hms() {
  const auto t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char buf[16];
  std::strftime(buf, sizeof buf, "%H:%M:%S", std::localtime(&t));
  return buf;
}

void say(const std::string& what) { std::cerr << "[" << now_hms() << "] " << what << std::endl; }

template <class T>
std::vector<T> take(const std::vector<T>& v, std::size_t n) {
  return std::vector<T>(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(n, v.size())));
}

// ---- shared inputs: corpus, tokenizer, data -----------------------------------------------------
struct Inputs {
  Corpus corpus;
  Tokenizer tok;
  fs::path tok_path;
  std::vector<std::string> langs;
  std::optional<VerbatimOptions> verbatim;  // set: the text goes through verbatim slots
};

/// Every line as the model sees it: with its verbatim spans as slots, or as it is.
std::vector<std::string> model_text(const Inputs& in, const std::vector<std::string>& lines) {
  return in.verbatim ? mask_verbatim_lines(lines, *in.verbatim) : lines;
}

Inputs load_inputs(const TrainArgs& a, const Preset& p) {
  Inputs in;
  in.langs = a.langs.empty() ? p.langs : a.langs;
  MIXMOE_CHECK(fs::exists(a.corpus / "manifest.json"), "mixmoe-translate", "no corpus in ", a.corpus.string(),
               ": build it with `mixmoe-translate corpus` (scripts/demo.sh does)");
  say("loading the corpus from " + a.corpus.string());
  in.corpus = load_corpus(a.corpus);
  for (const auto& l : in.langs) {
    MIXMOE_CHECK(!in.corpus.pairs("train", l).empty() && !in.corpus.pairs("test", l).empty(), "mixmoe-translate",
                 "the corpus has no train/test pairs for '", l, "' (its languages: ",
                 nlohmann::json(in.corpus.languages).dump(), ")");
    std::cerr << "  en-" << l << ": " << in.corpus.pairs("train", l).size() << " train, "
              << in.corpus.pairs("dev", l).size() << " dev, " << in.corpus.pairs("test", l).size() << " test pairs; "
              << in.corpus.mono.at(l).size() << " monolingual sentences\n";
  }
  const index_t vocab = a.vocab > 0 ? a.vocab : p.vocab;
  if (a.verbatim) in.verbatim = VerbatimOptions{};
  std::string lang_key;
  for (const auto& l : in.langs) lang_key += "-" + l;
  if (in.verbatim) lang_key += "-v" + std::to_string(in.verbatim->slots);  // other user symbols: another tokenizer
  in.tok_path = a.work / ("tokenizer-" + std::to_string(vocab) + lang_key + ".model");
  if (fs::exists(in.tok_path)) {
    in.tok = Tokenizer::load(in.tok_path.string());
  } else {
    // The shared model sees every language's monolingual text in equal measure, English included.
    std::vector<std::string> text;
    const std::size_t per_lang = p.tokenizer_sentences / (in.langs.size() + 1);
    for (const auto& l : in.langs) {
      const auto t = take(in.corpus.mono.at(l), per_lang);
      text.insert(text.end(), t.begin(), t.end());
    }
    const auto en = take(in.corpus.mono.at("en"), per_lang);
    text.insert(text.end(), en.begin(), en.end());
    text = model_text(in, text);
    TokenizerOptions to;
    to.vocab_size = static_cast<int>(vocab);
    to.user_symbols = Tokenizer::translation_symbols(in.langs);
    if (in.verbatim)
      for (const auto& sym : verbatim_symbols(in.verbatim->slots)) to.user_symbols.push_back(sym);
    // The task tags of the ISO-code task (data/iso_task.hpp), so that examples/ramoe can fine-tune
    // the translation models of this work directory on it.
    for (const auto& sym : iso_task_symbols({IsoKind::country, IsoKind::language, IsoKind::currency}))
      to.user_symbols.push_back(sym);
    to.hard_vocab_limit = false;
    fs::create_directories(a.work);
    say("training the tokenizer (" + std::to_string(vocab) + " pieces) on " + std::to_string(text.size()) +
        " sentences");
    in.tok = Tokenizer::train(text, to, in.tok_path.string());
  }
  say("tokenizer " + in.tok_path.string() + ": " + std::to_string(in.tok.vocab_size()) + " pieces");
  return in;
}

ModelConfig model_config(const TrainArgs& a, const Preset& p, const Tokenizer& tok) {
  ModelConfig c;
  c.vocab = tok.vocab_size();
  c.d_model = a.d_model > 0 ? a.d_model : p.d_model;
  c.layers = a.layers > 0 ? a.layers : p.layers;
  c.heads = p.heads;
  c.kv_heads = p.kv_heads;
  c.d_ff = a.d_ff > 0 ? a.d_ff : p.d_ff;
  c.seed = a.seed;
  c.moe.experts_per_group = {p.lm_experts, p.mt_experts};
  c.moe.expert_hidden = c.d_ff / p.lm_experts;  // LM experts are slices of the dense FFN; MT experts as wide
  c.moe.top_k = p.top_k;
  return c;
}

/// Monolingual sentences of the chosen languages and English, interleaved round robin so that
/// every block mixes languages; with copy_fraction > 0, that share of them (every 1/f-th) becomes
/// a copy prompt "<2xx> s <sep> s" (English ones without a tag): copying the source is a third of
/// a software message's translation, and this teaches the monolingual model to read a prompt.
std::vector<std::vector<index_t>> mono_text(const Inputs& in, bool dev, double copy_fraction = 0.0) {
  std::vector<const std::vector<std::string>*> sources;
  std::vector<std::vector<std::string>> dev_text;
  if (dev) {
    // Held-out monolingual text: both sides of the dev pairs.
    std::vector<std::string> en;
    for (const auto& l : in.langs) {
      std::vector<std::string> t;
      for (const auto& pr : in.corpus.pairs("dev", l)) {
        t.push_back(pr.target);
        if (l == in.langs.front()) en.push_back(pr.en);
      }
      dev_text.push_back(std::move(t));
    }
    dev_text.push_back(std::move(en));
    for (const auto& t : dev_text) sources.push_back(&t);
  } else {
    for (const auto& l : in.langs) sources.push_back(&in.corpus.mono.at(l));
    sources.push_back(&in.corpus.mono.at("en"));
  }
  std::vector<std::string> lines;
  std::vector<std::size_t> lang_of;  // index into in.langs; in.langs.size() for English
  std::size_t longest = 0;
  for (const auto* s : sources) longest = std::max(longest, s->size());
  for (std::size_t i = 0; i < longest; ++i)
    for (std::size_t j = 0; j < sources.size(); ++j)
      if (i < sources[j]->size()) {
        lines.push_back((*sources[j])[i]);
        lang_of.push_back(j);
      }
  lines = model_text(in, lines);
  std::vector<std::vector<index_t>> out;
  out.reserve(lines.size());
  double credit = 0.0;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    auto ids = in.tok.encode(lines[i]);
    if (ids.empty()) continue;
    credit += copy_fraction;
    if (credit >= 1.0) {
      credit -= 1.0;
      std::vector<index_t> c;
      if (lang_of[i] < in.langs.size()) c.push_back(in.tok.lang_tag_id(in.langs[lang_of[i]]));
      c.insert(c.end(), ids.begin(), ids.end());
      c.push_back(in.tok.sep_id());
      c.insert(c.end(), ids.begin(), ids.end());
      ids = std::move(c);
    }
    out.push_back(std::move(ids));
  }
  return out;
}

std::vector<Example> parallel_examples(const Inputs& in, const std::string& split, std::size_t per_lang = 0) {
  std::vector<Example> ex;
  for (const auto& l : in.langs) {
    // Only the pairs that are used go through the masking.
    const auto pairs = per_lang > 0 ? take(in.corpus.pairs(split, l), per_lang) : in.corpus.pairs(split, l);
    auto e = translation_examples(in.tok, l, in.verbatim ? mask_verbatim_pairs(pairs, *in.verbatim) : pairs);
    ex.insert(ex.end(), std::make_move_iterator(e.begin()), std::make_move_iterator(e.end()));
  }
  return ex;
}

// ---- one stage ---------------------------------------------------------------------------------
struct StageSpec {
  std::string name;
  std::int64_t steps;
  double lr;
  fs::path dir;
};

nlohmann::json extra_of(const Inputs& in, const TrainArgs& a, const std::string& variant) {
  nlohmann::json j = {{"tokenizer", in.tok_path.string()},
                      {"languages", in.langs},
                      {"variant", variant},
                      {"verbatim_slots", in.verbatim ? in.verbatim->slots : 0}};
  if (a.copy_pretrain > 0) j["copy_pretrain"] = a.copy_pretrain;  // the monolingual stages' data
  return j;
}

/// A checkpoint of the work directory that another tokenizer made would load (the shapes are the
/// same) and be wrong, and so would one trained on other monolingual data (--copy-pretrain): refused
/// by name.
void check_checkpoint_of(const fs::path& ckpt, const Inputs& in, const TrainArgs& a) {
  if (!fs::exists(ckpt / "config.json")) return;
  const ModelInfo info = read_model_info(ckpt, false);
  const nlohmann::json extra = info.extra.is_object() ? info.extra : nlohmann::json::object();
  const std::string t = extra.value("tokenizer", std::string{});
  // By file name: the name records what makes a tokenizer (vocabulary size, languages, slots), and a
  // work directory that was moved or copied keeps its checkpoints.
  MIXMOE_CHECK(t.empty() || fs::path(t).filename() == in.tok_path.filename(), "mixmoe-translate", ckpt.string(),
               " was trained with the tokenizer ", t, ", this run uses ", in.tok_path.string(),
               ": train in another --work directory, or remove that one (--fresh retrains a variant)");
  const double copy = extra.value("copy_pretrain", 0.0);
  MIXMOE_CHECK(copy == a.copy_pretrain, "mixmoe-translate", ckpt.string(), " was trained with --copy-pretrain ", copy,
               ", this run asks for ", a.copy_pretrain, ": use another --work directory");
}

/// Trains `model` on `data` for one stage (resuming or skipping what is done) and saves
/// <dir>/model. The evaluation gives the dev score (-loss) and metrics.
template <class Model, class Source>
LoopResult run_stage(Model& model, Source& data, const StageSpec& s, const Preset& p, const std::string& model_type,
                     const nlohmann::json& extra, const std::function<EvalResult(Model&)>& eval) {
  fs::create_directories(s.dir);
  auto params = trainable_parameters(model);
  AdamW<float> opt(params, {.lr = s.lr, .weight_decay = 0.01});
  MetricsLog log(s.dir / "metrics.jsonl");
  LoopOptions o;
  o.stage = s.name;
  o.steps = s.steps;
  o.schedule = {.peak_lr = s.lr, .min_lr = s.lr * 0.1, .warmup_steps = std::max<std::int64_t>(1, s.steps / 20),
                .total_steps = s.steps};
  o.label_smoothing = s.name == "stage0" || s.name == "stage1" ? 0.0 : 0.1;
  o.eval_every = p.eval_every;
  o.patience = 4;
  o.checkpoint_dir = s.dir / "ckpt";
  o.checkpoint_every = p.eval_every > 0 ? p.eval_every : 250;
  o.model_type = model_type;
  o.checkpoint_extra = extra;
  o.metrics = &log;
  const LoopResult r = train_loop(model, opt, data, o, eval);
  if (r.skipped_steps > 0) say(s.name + ": " + std::to_string(r.skipped_steps) + " non-finite steps were skipped");
  save_model(model, s.dir / "model", model_type, extra);
  return r;
}

template <class Model>
std::function<EvalResult(Model&)> lm_eval(LMBlockStream& dev, std::size_t batches) {
  return [&dev, batches](Model& m) {
    dev.set_state({});
    const double loss = mean_loss(m, dev, batches);
    return EvalResult{-loss, {{"dev_loss", loss}}};
  };
}

// ---- results -----------------------------------------------------------------------------------
struct VariantReport {
  std::string variant;
  std::vector<DirectionResult> directions;
  double mono_loss_before = NAN, mono_loss_after = NAN;
  double train_seconds = 0;
};

void print_table(std::ostream& os, const VariantReport& r) {
  os << "\n" << r.variant << ": test sets (" << (r.directions.empty() ? 0 : r.directions[0].sentences)
     << " sentences per direction, sacreBLEU-compatible 13a BLEU and chrF2)\n";
  os << "  direction      BLEU   chrF2   | copy-source BLEU  chrF2\n";
  for (const auto& d : r.directions)
    os << "  en-" << std::left << std::setw(8) << d.lang << std::right << std::fixed << std::setprecision(2)
       << std::setw(8) << d.bleu.score << std::setw(8) << d.chrf.score << "   | " << std::setw(16) << d.copy_bleu.score
       << std::setw(7) << d.copy_chrf.score << "\n";
  os << "  monolingual LM loss on held-out text: " << std::setprecision(3) << r.mono_loss_before
     << " before stage 2, " << r.mono_loss_after << " after (+" << (r.mono_loss_after - r.mono_loss_before) << ")\n";
}

nlohmann::json report_json(const VariantReport& r) {
  nlohmann::json j{{"variant", r.variant},
                   {"mono_loss_before_stage2", r.mono_loss_before},
                   {"mono_loss_after_stage2", r.mono_loss_after},
                   {"train_seconds", r.train_seconds}};
  for (const auto& d : r.directions)
    j["directions"].push_back({{"direction", "en-" + d.lang},
                               {"sentences", d.sentences},
                               {"bleu", d.bleu.score},
                               {"chrf", d.chrf.score},
                               {"copy_bleu", d.copy_bleu.score},
                               {"copy_chrf", d.copy_chrf.score},
                               {"bleu_detail", d.bleu.format()}});
  return j;
}

/// Routing of held-out text per language: assignments per expert per router per layer.
template <class Model>
nlohmann::json routing_by_language(const Model& model, const Inputs& in) {
  nlohmann::json out = nlohmann::json::object();
  if constexpr (!std::is_same_v<Model, DenseLM>) {
    no_grad ng;
    std::vector<std::string> all = in.langs;
    all.push_back("en");
    for (const auto& l : all) {
      std::vector<std::string> lines;
      const auto& src = in.corpus.pairs("dev", l == "en" ? in.langs.front() : l);
      for (std::size_t i = 0; i < std::min<std::size_t>(200, src.size()); ++i)
        lines.push_back(l == "en" ? src[i].en : src[i].target);
      LMBlockStream s(lm_sentences(in.tok, lines), {.block_len = 64, .batch_size = 8, .shuffle = false});
      std::map<std::string, std::vector<double>> counts;  // "layer/router" -> per expert
      for (std::size_t b = 0; b < std::min<std::size_t>(4, s.batches_per_epoch()); ++b) {
        (void)model(s.next().inputs);
        for (const auto& st : collect_routing_stats(model)) {
          auto& c = counts[std::to_string(st.layer) + "/" + st.router];
          c.resize(st.tokens_per_expert.size());
          for (std::size_t e = 0; e < c.size(); ++e) c[e] += static_cast<double>(st.tokens_per_expert[e]);
        }
      }
      release_routing_graphs(const_cast<Model&>(model));
      out[l] = counts;
    }
  }
  return out;
}

template <class Model>
VariantReport evaluate_model(const Model& model, const Inputs& in, const Preset& p, const TrainArgs& a,
                             const std::string& variant) {
  VariantReport r;
  r.variant = variant;
  DecodeOptions dopt;
  dopt.max_new_tokens = 64;
  dopt.beam_size = a.beam > 0 ? a.beam : p.beam;
  const std::size_t n = static_cast<std::size_t>(a.test_sentences > 0 ? a.test_sentences : p.test_sentences);
  for (const auto& l : in.langs) {
    ProgressOptions po;
    po.log_fraction = 0.5;
    Progress bar(static_cast<std::int64_t>(std::min(n, in.corpus.pairs("test", l).size())), "test en-" + l, std::cerr, po);
    r.directions.push_back(evaluate_direction(model, in.tok, l, in.corpus.pairs("test", l), dopt, n,
                                              [&](std::size_t done, std::size_t) {
                                                bar.update(static_cast<std::int64_t>(done));
                                              },
                                              in.verbatim));
    bar.finish();
  }
  return r;
}

// ---- the pipeline ------------------------------------------------------------------------------
DenseLM stage0(const Inputs& in, const Preset& p, const TrainArgs& a, const ModelConfig& cfg) {
  const fs::path dir = a.work / "stage0";
  check_checkpoint_of(dir / "model", in, a);
  check_checkpoint_of(dir / "ckpt" / "last", in, a);
  DenseLM dense(cfg);
  if (fs::exists(dir / "model") && open_checkpoint(dir / "model") == dir / "model") {
    load_model(dense, dir / "model");
    say("stage 0: reusing the pretrained dense LM in " + (dir / "model").string());
    return dense;
  }
  say("stage 0: pretraining a dense LM (" + std::to_string(count_parameters(dense)) +
      " parameters) on monolingual text of " + std::to_string(in.langs.size() + 1) + " languages");
  LMBlockStream data(mono_text(in, false, a.copy_pretrain),
                     {.block_len = p.block_len, .batch_size = p.lm_batch, .seed = a.seed});
  LMBlockStream dev(mono_text(in, true), {.block_len = p.block_len, .batch_size = p.lm_batch, .shuffle = false});
  const std::size_t dev_batches = std::min<std::size_t>(dev.batches_per_epoch(), 16);
  const std::int64_t steps = a.steps0 > 0 ? a.steps0 : p.steps0;
  run_stage(dense, data, {"stage0", steps, p.lr0, dir}, p, "dense", extra_of(in, a, "dense"),
            lm_eval<DenseLM>(dev, dev_batches));
  return dense;
}

template <class Model>
int run_variant(const Inputs& in, const Preset& p, const TrainArgs& a, const ModelConfig& cfg, const DenseLM& dense,
                const std::string& model_type) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string v = a.variant + (a.frozen_attention ? "-frozen-attn" : "") + (a.mt_init == "copy" ? "-mtcopy" : "") +
                        (a.frozen_embeddings ? "-frozen-emb" : "");
  const fs::path dir = a.work / v;
  if (a.fresh) fs::remove_all(dir);
  for (const fs::path& c : {dir / "stage1" / "ckpt" / "last", dir / "stage2" / "ckpt" / "last", dir / "model"})
    check_checkpoint_of(c, in, a);
  fs::create_directories(dir);
  const nlohmann::json extra = extra_of(in, a, v);

  LMBlockStream mono_dev(mono_text(in, true), {.block_len = p.block_len, .batch_size = p.lm_batch, .shuffle = false});
  const std::size_t mono_dev_batches = std::min<std::size_t>(mono_dev.batches_per_epoch(), 16);
  TokenBudgetBatcher para(parallel_examples(in, "train"),
                          {.token_budget = p.token_budget, .max_len = 128, .seed = a.seed + 2});
  TokenBudgetBatcher para_dev(parallel_examples(in, "dev", 150),
                              {.token_budget = p.token_budget, .max_len = 128, .shuffle = false});
  say(v + ": " + std::to_string(para.examples().size()) + " training prompts (" +
      std::to_string(para.batches_per_epoch()) + " batches an epoch), " + std::to_string(para.stats().dropped) +
      " longer than 128 tokens left out");

  // The model: the dense LM itself, or upcycled from it.
  std::optional<Model> holder;
  if constexpr (std::is_same_v<Model, DenseLM>) {
    holder.emplace(dense.config);
    copy_parameter_values(dense, *holder);
  } else {
    using FFN = std::remove_cvref_t<decltype(std::declval<Model&>().blocks[0].ffn)>;
    holder.emplace(upcycle_model<FFN>(
        dense, cfg,
        {.mode = UpcycleMode::split,
         .other_groups = a.mt_init == "copy" ? NewExpertInit::copy_lm : NewExpertInit::random}));
  }
  Model& model = *holder;
  const std::int64_t steps1 = a.steps1 > 0 ? a.steps1 : p.steps1;
  const std::int64_t steps2 = a.steps2 > 0 ? a.steps2 : p.steps2;
  const bool mixed = v.rfind("mix-", 0) == 0;
  const bool stage1 = !std::is_same_v<Model, DenseLM> && v.find("nostage1") == std::string::npos;

  // Stage 1: monolingual post-pretraining of the MoE (LM experts and routers).
  if (stage1) {
    if (mixed) {
      say("stage 1: " + apply_freeze_policy(model, stage1_policy()).summary());
    } else {
      FreezePolicy fp;
      fp.otherwise_freeze().train("ffn");
      say("stage 1: " + apply_freeze_policy(model, fp).summary());
    }
    // Tokenized here, only for the variants that have a stage 1 (the dense and no-stage-1 ones never read it).
    LMBlockStream mono(mono_text(in, false, a.copy_pretrain),
                       {.block_len = p.block_len, .batch_size = p.lm_batch, .seed = a.seed + 1});
    run_stage(model, mono, {"stage1", steps1, p.lr1, dir / "stage1"}, p, model_type, extra,
              lm_eval<Model>(mono_dev, mono_dev_batches));
  }

  // Monolingual loss before stage 2: what parallel training should not destroy.
  mono_dev.set_state({});
  VariantReport report;
  report.mono_loss_before = mean_loss(model, mono_dev, mono_dev_batches);

  // Stage 2: parallel data as translation prompts.
  if (mixed) {
    FreezePolicy fp = stage2_policy();
    if (!a.frozen_attention) fp.train("attn");
    if (!a.frozen_embeddings) fp.train("embed").train("head");
    say("stage 2: " + apply_freeze_policy(model, fp).summary());
  } else {
    set_requires_grad(model, [](std::string_view) { return true; }, true);
    say("stage 2: full fine-tuning, " + std::to_string(count_parameters(model)) + " parameters");
  }
  std::vector<CorpusPair> dev_bleu_pairs;
  const auto eval2 = [&](Model& m) {
    para_dev.set_state({});
    const double loss = mean_loss(m, para_dev, para_dev.batches_per_epoch());
    double bleu = 0;
    for (const auto& l : in.langs)
      bleu += evaluate_direction(m, in.tok, l, in.corpus.pairs("dev", l), DecodeOptions{.max_new_tokens = 48},
                                 static_cast<std::size_t>(p.dev_bleu_sentences), {}, in.verbatim)
                  .bleu.score;
    return EvalResult{-loss, {{"dev_loss", loss}, {"dev_bleu", bleu / static_cast<double>(in.langs.size())}}};
  };
  run_stage(model, para, {"stage2", steps2, p.lr2, dir / "stage2"}, p, model_type, extra,
            std::function<EvalResult(Model&)>(eval2));
  // The best model of stage 2 by dev loss.
  if (fs::exists(dir / "stage2" / "ckpt" / "best")) load_model(model, dir / "stage2" / "ckpt" / "best");
  save_model(model, dir / "model", model_type, extra);

  mono_dev.set_state({});
  report.mono_loss_after = mean_loss(model, mono_dev, mono_dev_batches);
  report.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  say(v + ": translating the test sets");
  const VariantReport tested = evaluate_model(model, in, p, a, v);
  report.directions = tested.directions;
  report.variant = v;
  print_table(std::cout, report);

  nlohmann::json j = report_json(report);
  j["routing"] = routing_by_language(model, in);
  j["config"] = nlohmann::json::parse(read_file(open_checkpoint(dir / "model") / "config.json"));
  write_file_atomic(dir / "results.json", j.dump(2) + "\n");
  // The test sentences, references and translations, line by line (`mixmoe-translate score -r ... -i ...`).
  for (const auto& d : report.directions) {
    std::ofstream src(dir / ("test.en-" + d.lang + ".src")), ref(dir / ("test.en-" + d.lang + ".ref")),
        hyp(dir / ("test.en-" + d.lang + ".hyp"));
    for (std::size_t i = 0; i < d.sentences; ++i) {
      src << d.sources[i] << '\n';
      ref << d.references[i] << '\n';
      hyp << d.hypotheses[i] << '\n';
    }
  }

  std::cout << "\nsome held-out sentences (test set):\n";
  for (const auto& d : report.directions)
    for (std::size_t i = 0; i < std::min<std::size_t>(static_cast<std::size_t>(a.show), d.sentences); ++i)
      std::cout << "  en: " << d.sources[i] << "\n  " << d.lang << " (model):     " << d.hypotheses[i] << "\n  "
                << d.lang << " (reference): " << d.references[i] << "\n";
  std::cout << "\nresults: " << (dir / "results.json").string() << ", model: " << (dir / "model").string() << "\n";
  // Clearly above the copy baseline in every direction?
  int below = 0;
  for (const auto& d : report.directions)
    if (d.bleu.score <= d.copy_bleu.score && d.chrf.score <= d.copy_chrf.score) ++below;
  if (below > 0) std::cout << "note: " << below << " direction(s) not above the copy-the-source baseline\n";
  return 0;
}

int cmd_train(const TrainArgs& a) {
  Preset p = preset_of(a.preset);
  if (a.lr0 > 0) p.lr0 = a.lr0;
  if (a.lr1 > 0) p.lr1 = a.lr1;
  if (a.lr2 > 0) p.lr2 = a.lr2;
  if (a.token_budget > 0) p.token_budget = a.token_budget;
  const Inputs in = load_inputs(a, p);
  const ModelConfig cfg = model_config(a, p, in.tok);
  const DenseLM dense = stage0(in, p, a, cfg);
  if (a.variant == "dense") return run_variant<DenseLM>(in, p, a, cfg, dense, "dense");
  if (a.variant == "moe") {
    ModelConfig c = cfg;
    c.moe.mix = GroupMix::shared_router;
    return run_variant<VanillaMoE>(in, p, a, c, dense, "moe");
  }
  if (a.variant == "mix-fft" || a.variant == "mix-fft-nostage1") return run_variant<MixFFT>(in, p, a, cfg, dense, "mix-fft");
  if (a.variant == "mix-dct") return run_variant<MixDCT>(in, p, a, cfg, dense, "mix-dct");
  if (a.variant == "mix-random") return run_variant<MixRandom>(in, p, a, cfg, dense, "mix-random");
  throw Error("[mixmoe-translate] unknown variant '" + a.variant +
              "' (mix-fft, mix-dct, mix-random, mix-fft-nostage1, moe, dense)");
}

// ---- translate ---------------------------------------------------------------------------------
struct TranslateArgs {
  fs::path model;
  std::string src = "en", tgt;
  fs::path input, tokenizer;
  int beam = 4;
  int max_tokens = 128;
  int no_repeat_ngram = 0;
  double length_penalty = 0.6;
};

template <class Model>
int translate_with(const TranslateArgs& a, const ModelInfo& info, const Tokenizer& tok) {
  // A model trained with verbatim slots gets them when it translates too.
  std::optional<VerbatimOptions> verbatim;
  const int slots = info.extra.is_object() ? info.extra.value("verbatim_slots", 0) : 0;
  if (slots > 0) verbatim = VerbatimOptions{.slots = slots};
  Model model(info.config);
  load_model(model, a.model);
  DecodeOptions o;
  o.beam_size = a.beam;
  o.max_new_tokens = a.max_tokens;
  o.no_repeat_ngram = a.no_repeat_ngram;
  o.length_penalty = a.length_penalty;
  std::ifstream file;
  if (!a.input.empty()) {
    file.open(a.input);
    MIXMOE_CHECK(file.is_open(), "mixmoe-translate", "cannot open '", a.input.string(), "'");
  }
  std::istream& is = a.input.empty() ? std::cin : file;
  std::string line;
  std::size_t n = 0;
  while (std::getline(is, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    MIXMOE_CHECK(is_valid_utf8(line), "mixmoe-translate", "line ", n, " of the input is not valid UTF-8");
    std::cout << (line.empty() ? std::string{} : translate(model, tok, a.tgt, line, o, 2.0, verbatim)) << '\n' << std::flush;
  }
  return 0;
}

int cmd_translate(const TranslateArgs& a) {
  MIXMOE_CHECK(a.src == "en", "mixmoe-translate", "the models translate from English (--src en), not from '", a.src,
               "'");
  const ModelInfo info = read_model_info(a.model);
  fs::path tp = a.tokenizer;
  if (tp.empty()) {
    MIXMOE_CHECK(info.extra.contains("tokenizer"), "mixmoe-translate", a.model.string(),
                 " does not name its tokenizer: give --tokenizer");
    tp = info.extra["tokenizer"].get<std::string>();
  }
  const Tokenizer tok = Tokenizer::load(tp.string());
  (void)tok.lang_tag_id(a.tgt);  // an unknown target language fails here, naming it
  const std::string& t = info.model_type;
  if (t == "dense") return translate_with<DenseLM>(a, info, tok);
  if (t == "moe") return translate_with<VanillaMoE>(a, info, tok);
  if (t == "mix-fft") return translate_with<MixFFT>(a, info, tok);
  if (t == "mix-dct") return translate_with<MixDCT>(a, info, tok);
  if (t == "mix-random") return translate_with<MixRandom>(a, info, tok);
  throw Error("[mixmoe-translate] " + a.model.string() + " holds a model of type '" + t +
              "', which this program does not build");
}

// ---- score -------------------------------------------------------------------------------------
struct ScoreArgs {
  std::vector<fs::path> refs;
  fs::path hyp;
  std::string tokenize = "13a";
  bool lowercase = false;
};

int cmd_score(const ScoreArgs& a) {
  // Line i of every file is sentence i: an empty line is an empty sentence (a model may output
  // nothing), not a line to skip, as sacreBLEU reads them.
  const LineReadOptions keep_empty{.skip_empty = false};
  const auto hyps = a.hyp.empty() ? parse_lines(std::string((std::istreambuf_iterator<char>(std::cin)), {}), "<stdin>",
                                                keep_empty)
                                  : read_lines(a.hyp, keep_empty);
  std::vector<std::vector<std::string>> refs;
  for (const auto& r : a.refs) {
    refs.push_back(read_lines(r, keep_empty));
    MIXMOE_CHECK(refs.back().size() == hyps.size(), "score", r.string(), " has ", refs.back().size(),
                 " lines, the hypotheses ", hyps.size());
  }
  BleuOptions bo;
  bo.tokenize = bleu_tokenize_from_name(a.tokenize);
  bo.lowercase = a.lowercase;
  std::cout << corpus_bleu(hyps, refs, bo).format() << "\n" << corpus_chrf(hyps, refs).format() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Mix-MoE multilingual translation on the machine's gettext catalogs"};
  app.require_subcommand(1);
  // An option given twice takes its last value: scripts/demo.sh puts its defaults before the user's options.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);

  std::string catalogs = "data/catalogs", corpus_out = "data/corpus";
  std::vector<std::string> corpus_langs, test_groups, dev_groups;
  auto* corpus = app.add_subcommand("corpus", "build the English->X corpus from downloaded catalogs");
  corpus->add_option("--catalogs", catalogs, "catalog directory (scripts/fetch-catalogs.sh)")->capture_default_str();
  corpus->add_option("--out", corpus_out, "corpus directory")->capture_default_str();
  corpus->add_option("--langs", corpus_langs, "languages (default: de fr es ru ja zh_CN)")->delimiter(',');
  corpus->add_option("--test-groups", test_groups, "catalog groups of the test split (default: linux-pam,apt,shadow,systemd)")
      ->delimiter(',');
  corpus->add_option("--dev-groups", dev_groups, "catalog groups of the dev split (default: see docs/data.md)")
      ->delimiter(',');

  TrainArgs ta;
  auto* train = app.add_subcommand("train", "train a translation model through all stages and test it");
  train->add_option("--variant", ta.variant, "mix-fft, mix-dct, mix-random, mix-fft-nostage1, moe, dense")
      ->capture_default_str();
  train->add_option("--preset", ta.preset, "demo (about 12 min of training on 2 idle cores), long, tiny")->capture_default_str();
  train->add_option("--corpus", ta.corpus, "corpus directory")->capture_default_str();
  train->add_option("--work", ta.work, "work directory: tokenizer, stage 0, one directory per variant")
      ->capture_default_str();
  train->add_option("--langs", ta.langs, "target languages (default: the preset's)")->delimiter(',');
  train->add_flag("--fresh", ta.fresh, "train the variant from scratch (stage 0 and the tokenizer are kept)");
  train->add_option("--vocab", ta.vocab, "tokenizer pieces");
  train->add_option("--d-model", ta.d_model, "model width");
  train->add_option("--layers", ta.layers, "layers");
  train->add_option("--d-ff", ta.d_ff, "dense FFN width (LM experts are slices of it)");
  train->add_option("--steps0", ta.steps0, "stage 0 steps");
  train->add_option("--steps1", ta.steps1, "stage 1 steps");
  train->add_option("--steps2", ta.steps2, "stage 2 steps");
  train->add_option("--lr0", ta.lr0, "stage 0 peak learning rate");
  train->add_option("--lr1", ta.lr1, "stage 1 peak learning rate");
  train->add_option("--lr2", ta.lr2, "stage 2 peak learning rate");
  train->add_option("--token-budget", ta.token_budget, "stage 2 batch size in tokens (prompt and target)");
  train->add_option("--test-sentences", ta.test_sentences, "test sentences per direction");
  train->add_option("--beam", ta.beam, "beam size of the test translations (1: greedy)");
  train->add_option("--show", ta.show, "held-out translations to print per direction")->capture_default_str();
  train->add_flag("--frozen-attention", ta.frozen_attention,
                  "stage 2 of the Mix-MoE variants keeps attention frozen, as the paper's recipe (default: trains it)");
  train->add_flag("--verbatim,!--no-verbatim", ta.verbatim,
                  "verbatim spans (placeholders, options, numbers, paths, identifiers) as slot tokens <v1>..<v8> "
                  "(default: on; --no-verbatim trains on the raw text)");
  train->add_flag("--frozen-embeddings", ta.frozen_embeddings,
                  "stage 2 of the Mix-MoE variants keeps the embeddings and output head frozen, as the paper's recipe "
                  "(default: trains them; the variant directory gets -frozen-emb)");
  train->add_option("--mt-init", ta.mt_init,
                    "MT experts of the upcycled model: random, or copy (of the LM experts; the variant directory "
                    "gets -mtcopy)")
      ->check(CLI::IsMember({"random", "copy"}))
      ->capture_default_str();
  train->add_option("--copy-pretrain", ta.copy_pretrain,
                    "fraction of the stage 0/1 monolingual sentences given as copy prompts <2xx> s <sep> s "
                    "(measured: no gain on the demo; docs/translation.md)")
      ->check(CLI::Range(0.0, 1.0));
  train->add_option("--seed", ta.seed, "seed of initialisation and data order")->capture_default_str();

  TranslateArgs tr;
  auto* translate_cmd = app.add_subcommand("translate", "translate lines of standard input (or --input)");
  translate_cmd->add_option("--model", tr.model, "model directory (e.g. runs/mix-fft/model)")->required();
  translate_cmd->add_option("--src", tr.src, "source language (en)")->capture_default_str();
  translate_cmd->add_option("--tgt", tr.tgt, "target language, e.g. de")->required();
  translate_cmd->add_option("-i,--input", tr.input, "input file (default: standard input)");
  translate_cmd->add_option("--tokenizer", tr.tokenizer, "tokenizer model (default: the one the model names)");
  translate_cmd->add_option("--beam", tr.beam, "beam size (1: greedy)")->capture_default_str();
  translate_cmd->add_option("--max-tokens", tr.max_tokens, "tokens per translation at most")->capture_default_str();
  translate_cmd->add_option("--no-repeat-ngram", tr.no_repeat_ngram,
                            "never repeat an n-gram of this many tokens within a translation (0: off)")
      ->capture_default_str();
  translate_cmd->add_option("--length-penalty", tr.length_penalty,
                            "beam search: GNMT length penalty alpha (higher favours longer translations)")
      ->capture_default_str();

  ScoreArgs sc;
  auto* score = app.add_subcommand("score", "BLEU and chrF2 of hypotheses against references, as sacreBLEU");
  score->add_option("-r,--ref", sc.refs, "reference file(s), one segment a line")->required();
  score->add_option("-i,--input", sc.hyp, "hypothesis file (default: standard input)");
  score->add_option("--tokenize", sc.tokenize, "BLEU tokenizer: 13a, none, char")->capture_default_str();
  score->add_flag("--lowercase", sc.lowercase, "case-insensitive BLEU");

  CLI11_PARSE(app, argc, argv);
  try {
    if (*corpus) {
      CorpusOptions o;
      o.catalog_dir = catalogs;
      if (!corpus_langs.empty()) o.languages = corpus_langs;
      if (!test_groups.empty()) o.test_groups = test_groups;
      if (!dev_groups.empty()) o.dev_groups = dev_groups;
      const Corpus c = build_corpus(o);
      write_corpus(c, corpus_out);
      say("corpus written to " + corpus_out);
      return 0;
    }
    if (*train) return cmd_train(ta);
    if (*translate_cmd) return cmd_translate(tr);
    if (*score) return cmd_score(sc);
  } catch (const std::exception& e) {
    std::cerr << "mixmoe-translate: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
