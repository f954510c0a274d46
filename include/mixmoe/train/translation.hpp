// Translation with a decoder-only LM, as Mix-MoE trains it: the building blocks between the
// data layer (corpus, tokenizer, batching) and the training loop, for any model type.
//
//   translation_examples   corpus pairs -> prompt examples "<2xx> source <sep> target </s>"
//                          (the loss covers the target and </s> only)
//   lm_sentences           text -> token sequences for LMBlockStream (monolingual stages)
//   mean_loss              teacher-forced cross-entropy of a model over a batch source
//                          (validation loss of either kind, and the "monolingual loss" that
//                          measures how much translation training degraded the LM)
//   translate              one sentence, greedy or beam search with the KV cache; with
//                          VerbatimOptions, its verbatim spans go through slot tokens
//                          (data/verbatim.hpp) and come back in the translation
//   mask_verbatim_pairs    corpus pairs with the slots in both sides (training data of a
//                          model that translates with verbatim slots)
//   evaluate_direction     a test set of one direction: hypotheses, BLEU, chrF, and the
//                          copy-the-source baseline
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/data/batching.hpp"
#include "mixmoe/data/corpus.hpp"
#include "mixmoe/data/tokenizer.hpp"
#include "mixmoe/data/verbatim.hpp"
#include "mixmoe/eval/bleu.hpp"
#include "mixmoe/eval/chrf.hpp"
#include "mixmoe/eval/decode.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/ops/cross_entropy.hpp"
#include "mixmoe/train/lm_loss.hpp"

namespace mixmoe {

/// Prompt examples for every pair of `pairs` into `target_lang` (source: the English side).
inline std::vector<Example> translation_examples(const Tokenizer& tok, std::string_view target_lang,
                                                 const std::vector<CorpusPair>& pairs, std::size_t max_pairs = 0) {
  std::vector<Example> out;
  const std::size_t n = max_pairs > 0 ? std::min(max_pairs, pairs.size()) : pairs.size();
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) out.push_back(make_translation_example(tok, target_lang, pairs[i].en, pairs[i].target));
  return out;
}

/// The pairs with the verbatim spans of each English side as slots, in both sides
/// (mask_verbatim on the source, mask_like on the target).
inline std::vector<CorpusPair> mask_verbatim_pairs(const std::vector<CorpusPair>& pairs,
                                                   const VerbatimOptions& opt = {}) {
  std::vector<CorpusPair> out;
  out.reserve(pairs.size());
  for (const auto& p : pairs) {
    MaskedText m = mask_verbatim(p.en, opt);
    out.push_back({p.group, std::move(m.text), mask_like(p.target, m.spans)});
  }
  return out;
}

/// The lines with their verbatim spans as slots (monolingual text of a model that translates
/// with verbatim slots: it learns the slots in running text too).
inline std::vector<std::string> mask_verbatim_lines(const std::vector<std::string>& lines,
                                                    const VerbatimOptions& opt = {}) {
  std::vector<std::string> out;
  out.reserve(lines.size());
  for (const auto& l : lines) out.push_back(mask_verbatim(l, opt).text);
  return out;
}

/// Every line of text tokenized (empty lines left out), for LMBlockStream.
inline std::vector<std::vector<index_t>> lm_sentences(const Tokenizer& tok, const std::vector<std::string>& lines,
                                                      std::size_t max_lines = 0) {
  std::vector<std::vector<index_t>> out;
  const std::size_t n = max_lines > 0 ? std::min(max_lines, lines.size()) : lines.size();
  out.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    auto ids = tok.encode(lines[i]);
    if (!ids.empty()) out.push_back(std::move(ids));
  }
  return out;
}

/// Token-weighted mean cross-entropy (nats per target token) of `model` over `batches` batches
/// of `source` (no label smoothing, no gradient).
template <class Model, class Source>
double mean_loss(const Model& model, Source& source, std::size_t batches) {
  no_grad ng;
  double total = 0.0;
  double tokens = 0.0;
  CrossEntropyOptions opt;
  opt.reduction = Reduction::sum;
  for (std::size_t b = 0; b < batches; ++b) {
    const Batch batch = source.next();
    auto sup = supervised_logits(model, batch, opt.ignore_index);
    total += static_cast<double>(cross_entropy(sup.logits, sup.targets, opt).value().item());
    tokens += static_cast<double>(batch.target_tokens);
  }
  MIXMOE_CHECK(tokens > 0, "mean_loss", "the batches have no target tokens");
  return total / tokens;
}

/// Translates `source` into `target_lang`: beam search when opt.beam_size > 1, else greedy.
/// Stops at </s>; at most opt.max_new_tokens tokens, and at most max_ratio times the source's
/// tokens plus 8 when max_ratio > 0 (a translation much longer than its source is a model
/// repeating itself). With `verbatim` (a model trained on mask_verbatim_pairs), the source's
/// verbatim spans are given to the model as slot tokens and put back into its output; with
/// verbatim->exact_slots, the output holds each slot exactly as often as the source does
/// (DecodeOptions::exact_counts), so no placeholder of the message is lost or repeated.
template <class Model>
std::string translate(const Model& model, const Tokenizer& tok, std::string_view target_lang, std::string_view source,
                      DecodeOptions opt = {}, double max_ratio = 2.0,
                      const std::optional<VerbatimOptions>& verbatim = std::nullopt) {
  if (verbatim) {
    const MaskedText m = mask_verbatim(source, *verbatim);
    DecodeOptions o = opt;
    for (int k = 1; k <= verbatim->slots; ++k) {
      const std::string sym = verbatim_symbol(k);
      MIXMOE_CHECK(tok.contains(sym), "translate", "the tokenizer ", tok.name(), " has no verbatim slot ", sym,
                   ": the model was trained without verbatim slots, or with fewer");
      if (!verbatim->exact_slots) continue;
      int n = 0;
      for (auto p = m.text.find(sym); p != std::string::npos; p = m.text.find(sym, p + sym.size())) ++n;
      o.exact_counts.emplace_back(static_cast<Index>(tok.id(sym)), n);
    }
    return unmask_verbatim(translate(model, tok, target_lang, m.text, o, max_ratio), m.spans);
  }
  no_grad ng;
  const auto p = translation_prompt(tok, target_lang, source);
  if (max_ratio > 0) {
    const auto cap = static_cast<int>(std::ceil(max_ratio * static_cast<double>(p.size() - 2))) + 8;
    opt.max_new_tokens = std::min(opt.max_new_tokens, cap);
  }
  const std::vector<Index> prompt(p.begin(), p.end());
  if (opt.stop_ids.empty()) opt.stop_ids = {static_cast<Index>(tok.eos_id())};
  Hypothesis h = opt.beam_size > 1 ? beam_search(model, prompt, opt).front() : greedy_decode(model, prompt, opt);
  if (h.finished && !h.tokens.empty()) h.tokens.pop_back();  // the stop id
  const std::vector<index_t> ids(h.tokens.begin(), h.tokens.end());
  return tok.decode(ids);
}

/// The scores of one translation direction on a test set.
struct DirectionResult {
  std::string lang;
  std::size_t sentences = 0;
  BleuScore bleu, copy_bleu;  // the model's, and copying the source
  ChrfScore chrf, copy_chrf;
  std::vector<std::string> sources, references, hypotheses;
};

/// Translates `max_sentences` pairs (0: all), evenly spaced over the set (a test set is ordered by
/// catalog: its first sentences would all come from one), and scores them against their references.
/// `on_sentence(done, total)` is called after each sentence (progress display), when given. With
/// `verbatim`, translate() protects the verbatim spans (the scores are of the restored text).
template <class Model>
DirectionResult evaluate_direction(const Model& model, const Tokenizer& tok, const std::string& lang,
                                   const std::vector<CorpusPair>& pairs, const DecodeOptions& opt,
                                   std::size_t max_sentences = 0,
                                   const std::function<void(std::size_t, std::size_t)>& on_sentence = {},
                                   const std::optional<VerbatimOptions>& verbatim = std::nullopt) {
  DirectionResult r;
  r.lang = lang;
  const std::size_t n = max_sentences > 0 ? std::min(max_sentences, pairs.size()) : pairs.size();
  MIXMOE_CHECK(n > 0, "evaluate_direction", "no test pairs for en-", lang);
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t i = k * pairs.size() / n;
    r.sources.push_back(pairs[i].en);
    r.references.push_back(pairs[i].target);
    r.hypotheses.push_back(translate(model, tok, lang, pairs[i].en, opt, 2.0, verbatim));
    if (on_sentence) on_sentence(k + 1, n);
  }
  r.sentences = n;
  release_routing_graphs(const_cast<Model&>(model));
  const std::vector<std::vector<std::string>> refs{r.references};
  r.bleu = corpus_bleu(r.hypotheses, refs);
  r.chrf = corpus_chrf(r.hypotheses, refs);
  r.copy_bleu = corpus_bleu(r.sources, refs);
  r.copy_chrf = corpus_chrf(r.sources, refs);
  return r;
}

}  // namespace mixmoe
