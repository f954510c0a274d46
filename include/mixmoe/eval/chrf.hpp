// chrF and chrF++ as sacreBLEU 2.x computes them (defaults: character n-grams up to 6, no word
// n-grams, beta 2, whitespace removed, no epsilon smoothing), on Unicode code points.
//
//   per segment and order n: hyp n-grams (0 when the reference has none of that order), ref
//     n-grams, clipped matches; with several references, those of the reference whose segment
//     F-score is highest (the first on a tie)
//   corpus: the three counts summed over segments, per order; then, over the orders where both
//     hyp and ref counts are > 0: P_n = match/hyp, R_n = match/ref, P = mean P_n, R = mean R_n,
//     chrF = 100 (1 + b^2) P R / (b^2 P + R)
//
// chrF++ (word_order = 2) adds word unigrams and bigrams after sacreBLEU's punctuation split
// (one punctuation character is split off the end, else off the start, of each word longer
// than one character). See docs/evaluation.md.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/eval/bleu.hpp"  // metric_text: UTF-8 and Python's whitespace

namespace mixmoe {

struct ChrfOptions {
  int char_order = 6;
  int word_order = 0;  // 2 = chrF++
  int beta = 2;        // recall is beta times as important as precision
  bool lowercase = false;
  bool whitespace = false;     // keep whitespace inside character n-grams
  bool eps_smoothing = false;  // sacreBLEU's --chrf-eps-smoothing: mean of per-order F-scores, 1e-16 for empty orders
};

/// The sufficient statistics of chrF: per order (characters 1..char_order, then words
/// 1..word_order) the triple hyp n-grams, ref n-grams, matches. They add up over segments.
struct ChrfStats {
  std::vector<std::int64_t> counts;  // 3 * (char_order + word_order)

  ChrfStats& operator+=(const ChrfStats& o) {
    if (counts.empty()) counts.assign(o.counts.size(), 0);
    MIXMOE_CHECK(counts.size() == o.counts.size(), "chrf", "statistics of different orders (", counts.size() / 3,
                 " and ", o.counts.size() / 3, ")");
    for (std::size_t i = 0; i < counts.size(); ++i) counts[i] += o.counts[i];
    return *this;
  }
};

struct ChrfScore {
  double score = 0;  // 0-100
  int char_order = 6, word_order = 0, beta = 2;
  ChrfStats stats;

  /// sacreBLEU's name: "chrF2", "chrF2++" for word order 2.
  [[nodiscard]] std::string name() const {
    return "chrF" + std::to_string(beta) + std::string(static_cast<std::size_t>(word_order), '+');
  }
  /// sacreBLEU's line: "chrF2 = 52.31".
  [[nodiscard]] std::string format(int width = 2) const {
    char buf[64];
    std::snprintf(buf, sizeof buf, " = %.*f", width, score);
    return name() + buf;
  }
};

namespace detail {

using NgramCounts = std::unordered_map<std::u32string, std::int64_t>;

inline void check_chrf_options(const ChrfOptions& opt) {
  MIXMOE_CHECK(opt.char_order >= 0 && opt.word_order >= 0 && opt.char_order + opt.word_order > 0, "chrf",
               "orders must be >= 0 and not both 0, got char_order ", opt.char_order, ", word_order ", opt.word_order);
  MIXMOE_CHECK(opt.beta >= 0, "chrf", "beta must be >= 0, got ", opt.beta);
}

inline bool is_ascii_punct(char32_t c) {
  return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
}

/// sacreBLEU's chrF++ word split: one punctuation character off the end, else off the start.
inline std::vector<std::u32string> chrf_words(std::u32string_view s) {
  std::vector<std::u32string> out;
  for (auto& w : metric_text::split_whitespace(s)) {
    if (w.size() > 1 && is_ascii_punct(w.back())) {
      out.push_back(w.substr(0, w.size() - 1));
      out.push_back(w.substr(w.size() - 1));
    } else if (w.size() > 1 && is_ascii_punct(w.front())) {
      out.push_back(w.substr(0, 1));
      out.push_back(w.substr(1));
    } else {
      out.push_back(std::move(w));
    }
  }
  return out;
}

/// All n-gram counts of one segment: character orders 1..char_order, then word orders.
inline std::vector<NgramCounts> chrf_ngrams(std::u32string s, const ChrfOptions& opt) {
  std::vector<NgramCounts> all;
  if (opt.lowercase) s = metric_text::to_lower(s);
  std::u32string chars;
  if (opt.whitespace) {
    chars = s;
  } else {
    for (char32_t c : s)
      if (!metric_text::is_space(c)) chars.push_back(c);
  }
  for (std::size_t n = 1; n <= static_cast<std::size_t>(opt.char_order); ++n) {
    NgramCounts& c = all.emplace_back();
    for (std::size_t i = 0; i + n <= chars.size(); ++i) ++c[chars.substr(i, n)];
  }
  if (opt.word_order > 0) {
    const auto words = chrf_words(s);
    for (std::size_t n = 1; n <= static_cast<std::size_t>(opt.word_order); ++n) {
      NgramCounts& c = all.emplace_back();
      for (std::size_t i = 0; i + n <= words.size(); ++i) {
        std::u32string key = words[i];
        for (std::size_t k = 1; k < n; ++k) key += U' ' + words[i + k];
        ++c[key];
      }
    }
  }
  return all;
}

}  // namespace detail

/// The chrF score of (summed) statistics, as sacreBLEU's CHRF._compute_f_score.
inline double chrf_f_score(const ChrfStats& stats, const ChrfOptions& opt = {}) {
  detail::check_chrf_options(opt);
  const auto order = static_cast<std::size_t>(opt.char_order + opt.word_order);
  MIXMOE_CHECK(stats.counts.size() == 3 * order, "chrf", "statistics have ", stats.counts.size() / 3,
               " orders, the options ask for ", order);
  const double eps = 1e-16, factor = static_cast<double>(opt.beta) * opt.beta;
  double eps_sum = 0, avg_prec = 0, avg_rec = 0;
  int effective = 0;
  for (std::size_t n = 0; n < order; ++n) {
    const auto hyp = stats.counts[3 * n], ref = stats.counts[3 * n + 1], match = stats.counts[3 * n + 2];
    const double prec = hyp > 0 ? static_cast<double>(match) / static_cast<double>(hyp) : eps;
    const double rec = ref > 0 ? static_cast<double>(match) / static_cast<double>(ref) : eps;
    const double denom = factor * prec + rec;
    eps_sum += denom > 0 ? (1 + factor) * prec * rec / denom : eps;
    if (hyp > 0 && ref > 0) {
      avg_prec += prec;
      avg_rec += rec;
      ++effective;
    }
  }
  if (opt.eps_smoothing) return 100 * eps_sum / static_cast<double>(order);
  if (effective == 0) return 0.0;
  avg_prec /= effective;
  avg_rec /= effective;
  if (avg_prec + avg_rec == 0) return 0.0;
  return 100 * (1 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
}

/// The statistics of one segment against one or more references (the best reference's).
inline ChrfStats chrf_segment_stats(std::string_view hypothesis, const std::vector<std::string>& references,
                                    const ChrfOptions& opt = {}, std::size_t segment = 0) {
  detail::check_chrf_options(opt);
  MIXMOE_CHECK(!references.empty(), "chrf", "segment ", segment, ": no reference");
  const auto hyp = detail::chrf_ngrams(
      metric_text::utf8_decode(hypothesis, "chrf", "hypothesis of segment " + std::to_string(segment)), opt);
  ChrfStats best;
  double best_f = -1.0;
  for (std::size_t r = 0; r < references.size(); ++r) {
    const auto ref = detail::chrf_ngrams(
        metric_text::utf8_decode(references[r], "chrf",
                                 "reference " + std::to_string(r) + " of segment " + std::to_string(segment)),
        opt);
    ChrfStats st;
    st.counts.reserve(3 * hyp.size());
    for (std::size_t n = 0; n < hyp.size(); ++n) {
      std::int64_t hyp_count = 0, ref_count = 0, match = 0;
      for (const auto& [g, c] : hyp[n]) {
        hyp_count += c;
        if (auto it = ref[n].find(g); it != ref[n].end()) match += std::min(c, it->second);
      }
      for (const auto& [g, c] : ref[n]) ref_count += c;
      st.counts.push_back(ref[n].empty() ? 0 : hyp_count);  // sacreBLEU: no hyp n-grams where the ref has none
      st.counts.push_back(ref_count);
      st.counts.push_back(match);
    }
    const double f = chrf_f_score(st, opt);
    if (f > best_f) {
      best_f = f;
      best = std::move(st);
    }
  }
  return best;
}

/// Corpus chrF. references[k][i] is the k-th reference of segment i (sacreBLEU's layout).
inline ChrfScore corpus_chrf(const std::vector<std::string>& hypotheses,
                             const std::vector<std::vector<std::string>>& references, const ChrfOptions& opt = {}) {
  detail::check_chrf_options(opt);
  MIXMOE_CHECK(!references.empty(), "chrf", "no reference stream");
  for (std::size_t k = 0; k < references.size(); ++k)
    MIXMOE_CHECK(references[k].size() == hypotheses.size(), "chrf", "reference stream ", k, " has ",
                 references[k].size(), " segments, the hypotheses ", hypotheses.size());
  ChrfScore out{.score = 0, .char_order = opt.char_order, .word_order = opt.word_order, .beta = opt.beta, .stats = {}};
  out.stats.counts.assign(3 * static_cast<std::size_t>(opt.char_order + opt.word_order), 0);
  std::vector<std::string> refs(references.size());
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    for (std::size_t k = 0; k < references.size(); ++k) refs[k] = references[k][i];
    out.stats += chrf_segment_stats(hypotheses[i], refs, opt, i);
  }
  out.score = chrf_f_score(out.stats, opt);
  return out;
}

/// Sentence chrF (the same computation on one segment).
inline ChrfScore sentence_chrf(std::string_view hypothesis, const std::vector<std::string>& references,
                               const ChrfOptions& opt = {}) {
  ChrfScore out{.score = 0, .char_order = opt.char_order, .word_order = opt.word_order, .beta = opt.beta, .stats = {}};
  out.stats = chrf_segment_stats(hypothesis, references, opt);
  out.score = chrf_f_score(out.stats, opt);
  return out;
}

}  // namespace mixmoe
