// Greedy decoding and beam search for decoder-only language models (DecoderLM with a dense or
// MoE FFN, or any type with the same call signature), with the per-layer KV cache.
//
//   prompt (P ids) -> one forward that fills the cache -> one token per step: the new token(s)
//   (B, 1) through the model, attending to the cache; a beam is a batch row, and when beams are
//   reselected the caches keep the rows of their parents (DecodeState::reorder).
//
// Scores: log_prob is the sum of the generated tokens' log-probabilities (the stop token
// included); score = log_prob / ((5 + len) / 6)^alpha (GNMT's length penalty, alpha =
// DecodeOptions::length_penalty, len = number of generated tokens; alpha 0 = plain log_prob).
//
// Beam search keeps `beam_size` slots: each step extends the live beams by every token and
// keeps the best (beam_size - finished) candidates by log_prob; a candidate ending in a stop id
// is finished and keeps its slot, so the beam narrows as hypotheses finish (beam_size 1 is greedy
// decoding). It stops early when no live beam can beat the best finished hypothesis even with no
// further loss of log-probability at any length up to max_new_tokens. See docs/evaluation.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/autograd/var.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/tensor.hpp"
#include "mixmoe/nn/decoder.hpp"

namespace mixmoe {

/// What the decoders need of a model: logits (B, T, V) from ids (B, T) with an incremental state.
template <class M>
concept DecodableLM = requires(const M& m, const Tensor<Index, typename M::device_type>& ids,
                               DecodeState<typename M::value_type, typename M::device_type>* state) {
  { m(ids, state) } -> std::same_as<Var<typename M::value_type, typename M::device_type>>;
  { m.config.vocab } -> std::convertible_to<index_t>;
};

struct DecodeOptions {
  int max_new_tokens = 64;        // generated tokens at most (a stop id included)
  std::vector<Index> stop_ids{};  // tokens that end a hypothesis (EOS)
  int beam_size = 1;              // beam_search only; 1 = greedy
  double length_penalty = 0.6;    // GNMT alpha: score = log_prob / ((5 + len) / 6)^alpha
  int no_repeat_ngram = 0;        // > 0: never repeat an n-gram of this size within the generated tokens
  // Tokens that a finished hypothesis holds an exact number of times, {id, count}: a token at its
  // count is banned, and while one is short of its count the stop ids are banned. The verbatim
  // slots of a source (data/verbatim.hpp) are the use: a translation of a message that drops or
  // repeats one of its placeholders is not a valid message.
  std::vector<std::pair<Index, int>> exact_counts{};
};

/// One decoded continuation.
struct Hypothesis {
  std::vector<Index> tokens;  // generated ids without the prompt; ends with the stop id when finished
  double log_prob = 0;        // sum of the log-probabilities of `tokens`
  double score = 0;           // log_prob / length penalty
  bool finished = false;      // ended with a stop id (false: max_new_tokens reached, or every token banned)
};

/// GNMT's length penalty ((5 + len) / 6)^alpha.
inline double length_penalty(std::size_t len, double alpha) {
  return std::pow((5.0 + static_cast<double>(len)) / 6.0, alpha);
}

namespace detail {

inline bool is_stop(Index t, const DecodeOptions& opt) {
  return std::find(opt.stop_ids.begin(), opt.stop_ids.end(), t) != opt.stop_ids.end();
}

inline void check_decode(const char* where, std::span<const Index> prompt, const DecodeOptions& opt, index_t vocab) {
  MIXMOE_CHECK(!prompt.empty(), where, "the prompt is empty: decoding starts from at least one token (e.g. BOS)");
  MIXMOE_CHECK(opt.max_new_tokens >= 0, where, "max_new_tokens must be >= 0, got ", opt.max_new_tokens);
  MIXMOE_CHECK(opt.beam_size >= 1, where, "beam_size must be at least 1, got ", opt.beam_size);
  MIXMOE_CHECK(opt.no_repeat_ngram >= 0, where, "no_repeat_ngram must be >= 0, got ", opt.no_repeat_ngram);
  for (std::size_t i = 0; i < prompt.size(); ++i)
    MIXMOE_CHECK(prompt[i] >= 0 && prompt[i] < vocab, where, "prompt token ", i, " is ", prompt[i],
                 ", outside the vocabulary of ", vocab);
  for (Index s : opt.stop_ids)
    MIXMOE_CHECK(s >= 0 && s < vocab, where, "stop id ", s, " is outside the vocabulary of ", vocab);
  for (const auto& [id, count] : opt.exact_counts) {
    MIXMOE_CHECK(id >= 0 && id < vocab, where, "exact_counts: token ", id, " is outside the vocabulary of ", vocab);
    MIXMOE_CHECK(count >= 0, where, "exact_counts: token ", id, " has a negative count ", count);
    MIXMOE_CHECK(!is_stop(id, opt), where, "exact_counts: token ", id, " is a stop id");
  }
}

/// Log-softmax of each row of the last position of logits (B, T, V), in double: (B * V).
template <class T, class D>
std::vector<double> last_log_probs(const Tensor<T, D>& logits) {
  const index_t b = logits.size(0), t = logits.size(1), v = logits.size(2);
  const Tensor<T, Cpu> last = to_device<Cpu>(logits.slice(1, t - 1, t).contiguous());  // decoding runs on the host
  std::vector<double> out(static_cast<std::size_t>(b * v));
  for (index_t r = 0; r < b; ++r) {
    const T* x = last.data() + r * v;
    double* y = out.data() + r * v;
    double m = -std::numeric_limits<double>::infinity();
    for (index_t i = 0; i < v; ++i) m = std::max(m, static_cast<double>(x[i]));
    double sum = 0;
    for (index_t i = 0; i < v; ++i) sum += std::exp(static_cast<double>(x[i]) - m);
    const double log_z = m + std::log(sum);
    for (index_t i = 0; i < v; ++i) y[i] = static_cast<double>(x[i]) - log_z;
  }
  return out;
}

/// Sets to -inf the tokens that would repeat an n-gram of `tokens` (n = opt.no_repeat_ngram).
inline void ban_repeats(const std::vector<Index>& tokens, const DecodeOptions& opt, double* log_probs) {
  const auto n = static_cast<std::size_t>(opt.no_repeat_ngram);
  if (n == 0 || tokens.size() + 1 < n) return;
  const std::size_t len = tokens.size();
  for (std::size_t i = 0; i + n <= len; ++i) {  // the earlier n-gram tokens[i, i + n)
    if (std::equal(tokens.begin() + static_cast<std::ptrdiff_t>(i),
                   tokens.begin() + static_cast<std::ptrdiff_t>(i + n - 1),
                   tokens.end() - static_cast<std::ptrdiff_t>(n - 1)))
      log_probs[tokens[i + n - 1]] = -std::numeric_limits<double>::infinity();
  }
}

/// Applies opt.exact_counts to the log-probabilities of the next token after `tokens`.
inline void apply_exact_counts(const std::vector<Index>& tokens, const DecodeOptions& opt, double* log_probs) {
  if (opt.exact_counts.empty()) return;
  bool short_of_count = false;
  for (const auto& [id, count] : opt.exact_counts) {
    const auto have = std::count(tokens.begin(), tokens.end(), id);
    if (have >= count) log_probs[id] = -std::numeric_limits<double>::infinity();
    short_of_count = short_of_count || have < count;
  }
  if (short_of_count)
    for (Index s : opt.stop_ids) log_probs[s] = -std::numeric_limits<double>::infinity();
}

template <class D>
Tensor<Index, D> ids_tensor(std::span<const Index> ids, index_t rows) {
  return Tensor<Index, D>::from(ids, Shape{rows, static_cast<index_t>(ids.size()) / rows});
}

}  // namespace detail

/// Greedy decoding: the most probable token at each step (the lowest id on a tie) until a stop
/// id or max_new_tokens. Runs under no_grad.
template <DecodableLM Model>
Hypothesis greedy_decode(const Model& model, const std::vector<Index>& prompt, const DecodeOptions& opt = {}) {
  using T = typename Model::value_type;
  using D = typename Model::device_type;
  const auto vocab = static_cast<index_t>(model.config.vocab);
  detail::check_decode("greedy_decode", prompt, opt, vocab);
  no_grad guard;
  Hypothesis h;
  if (opt.max_new_tokens == 0) return h;
  DecodeState<T, D> state;
  Tensor<T, D> logits = model(detail::ids_tensor<D>(prompt, 1), &state).value();
  for (int step = 0; step < opt.max_new_tokens; ++step) {
    auto lp = detail::last_log_probs(logits);
    detail::ban_repeats(h.tokens, opt, lp.data());
    detail::apply_exact_counts(h.tokens, opt, lp.data());
    const auto best = static_cast<Index>(std::max_element(lp.begin(), lp.end()) - lp.begin());
    if (std::isinf(lp[static_cast<std::size_t>(best)])) break;  // every token banned
    h.tokens.push_back(best);
    h.log_prob += lp[static_cast<std::size_t>(best)];
    if (detail::is_stop(best, opt)) {
      h.finished = true;
      break;
    }
    if (step + 1 < opt.max_new_tokens)
      logits = model(detail::ids_tensor<D>(std::span<const Index>(&best, 1), 1), &state).value();
  }
  h.score = h.log_prob / length_penalty(h.tokens.size(), opt.length_penalty);
  return h;
}

/// Beam search (see the top of this header). Returns the hypotheses best first by score: the
/// finished ones and those that reached max_new_tokens, at most beam_size; live beams dropped by
/// the early stop are not listed (they cannot beat the first). Runs under no_grad.
template <DecodableLM Model>
std::vector<Hypothesis> beam_search(const Model& model, const std::vector<Index>& prompt,
                                    const DecodeOptions& opt = {}) {
  using T = typename Model::value_type;
  using D = typename Model::device_type;
  const auto vocab = static_cast<index_t>(model.config.vocab);
  detail::check_decode("beam_search", prompt, opt, vocab);
  no_grad guard;
  std::vector<Hypothesis> done;
  if (opt.max_new_tokens == 0) return {Hypothesis{}};
  const auto max_len = static_cast<std::size_t>(opt.max_new_tokens);
  const auto beam = static_cast<std::size_t>(opt.beam_size);
  struct Candidate {
    double log_prob;
    std::size_t parent;
    Index token;
  };
  std::vector<Hypothesis> live(1);  // the empty continuation of the prompt
  DecodeState<T, D> state;
  Tensor<T, D> logits = model(detail::ids_tensor<D>(prompt, 1), &state).value();
  std::vector<Candidate> cands;
  for (std::size_t step = 0; step < max_len && !live.empty(); ++step) {
    auto lp = detail::last_log_probs(logits);  // (live, V)
    cands.clear();
    for (std::size_t b = 0; b < live.size(); ++b) {
      double* row = lp.data() + static_cast<std::ptrdiff_t>(b) * vocab;
      detail::ban_repeats(live[b].tokens, opt, row);
      detail::apply_exact_counts(live[b].tokens, opt, row);
      for (index_t v = 0; v < vocab; ++v)
        if (!std::isinf(row[v])) cands.push_back({live[b].log_prob + row[v], b, static_cast<Index>(v)});
    }
    const std::size_t width = std::min(beam - done.size(), cands.size());
    std::partial_sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(width), cands.end(),
                      [](const Candidate& a, const Candidate& b) {
                        if (a.log_prob != b.log_prob) return a.log_prob > b.log_prob;
                        return a.parent != b.parent ? a.parent < b.parent : a.token < b.token;
                      });
    std::vector<Hypothesis> next;
    std::vector<index_t> parents;
    std::vector<Index> next_tokens;
    for (std::size_t i = 0; i < width; ++i) {
      Hypothesis h{live[cands[i].parent].tokens, cands[i].log_prob, 0.0, false};
      h.tokens.push_back(cands[i].token);
      h.score = h.log_prob / length_penalty(h.tokens.size(), opt.length_penalty);
      if (detail::is_stop(cands[i].token, opt)) {
        h.finished = true;
        done.push_back(std::move(h));
      } else {
        parents.push_back(static_cast<index_t>(cands[i].parent));
        next_tokens.push_back(cands[i].token);
        next.push_back(std::move(h));
      }
    }
    live = std::move(next);
    if (live.empty()) break;
    if (step + 1 == max_len) {  // the length limit: the live beams are final, unfinished
      for (auto& h : live) done.push_back(std::move(h));
      live.clear();
      break;
    }
    if (!done.empty()) {  // early stop: can a live beam still beat the best finished hypothesis?
      double best = -std::numeric_limits<double>::infinity();
      for (const auto& h : done) best = std::max(best, h.score);
      const std::size_t len = live.front().tokens.size();  // all live beams have this length
      const double lp_max =
          std::max(length_penalty(len + 1, opt.length_penalty), length_penalty(max_len, opt.length_penalty));
      const bool hopeless =
          std::all_of(live.begin(), live.end(), [&](const Hypothesis& h) { return h.log_prob / lp_max <= best; });
      if (hopeless) break;
    }
    state.reorder(parents);
    logits = model(detail::ids_tensor<D>(next_tokens, static_cast<index_t>(next_tokens.size())), &state).value();
  }
  std::stable_sort(done.begin(), done.end(),
                   [](const Hypothesis& a, const Hypothesis& b) { return a.score > b.score; });
  if (done.empty()) done.push_back(Hypothesis{});  // every token banned from the start
  return done;
}

/// Greedy decoding of several prompts (of any lengths), one after the other.
template <DecodableLM Model>
std::vector<Hypothesis> greedy_decode_batch(const Model& model, const std::vector<std::vector<Index>>& prompts,
                                            const DecodeOptions& opt = {}) {
  std::vector<Hypothesis> out;
  out.reserve(prompts.size());
  for (const auto& p : prompts) out.push_back(greedy_decode(model, p, opt));
  return out;
}

/// Beam search over several prompts (of any lengths), one after the other.
template <DecodableLM Model>
std::vector<std::vector<Hypothesis>> beam_search_batch(const Model& model,
                                                       const std::vector<std::vector<Index>>& prompts,
                                                       const DecodeOptions& opt = {}) {
  std::vector<std::vector<Hypothesis>> out;
  out.reserve(prompts.size());
  for (const auto& p : prompts) out.push_back(beam_search(model, p, opt));
  return out;
}

}  // namespace mixmoe
