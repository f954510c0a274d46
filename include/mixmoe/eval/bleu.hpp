// Corpus and sentence BLEU with the same tokenisation, n-gram statistics, smoothing and
// brevity penalty as sacreBLEU 2.x, so that scores printed here can be compared with
// published sacreBLEU scores (signature nrefs:N|case:mixed|eff:no|tok:13a|smooth:exp).
//
//   per segment: lowercase (optional) -> strip trailing whitespace -> tokenize ("13a", "none", "char")
//                -> clipped n-gram matches against the references (max count over references),
//                   hypothesis n-gram totals, hypothesis length, closest reference length
//   corpus:      sum of the segment statistics -> precisions, smoothing, brevity penalty -> score (0-100)
//
// Text is UTF-8; tokenisation works on code points and splits on the whitespace of Python's
// str.split(). The metric_text namespace holds the UTF-8 and whitespace helpers that chrf.hpp
// shares. See docs/evaluation.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

namespace metric_text {

/// Decodes strict UTF-8 into code points; `what` names the text in the error message
/// ("[bleu] hypothesis 3: invalid UTF-8 at byte 7").
inline std::u32string utf8_decode(std::string_view s, const char* where, std::string_view what) {
  std::u32string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    int extra = 0;
    char32_t cp = 0, min = 0;
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    } else if ((b0 & 0xE0) == 0xC0) {
      extra = 1, cp = b0 & 0x1F, min = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      extra = 2, cp = b0 & 0x0F, min = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      extra = 3, cp = b0 & 0x07, min = 0x10000;
    } else {
      detail::fail(where, what, ": invalid UTF-8 at byte ", i, " (byte ", static_cast<int>(b0),
                   " cannot start a character)");
    }
    MIXMOE_CHECK(i + static_cast<std::size_t>(extra) < s.size(), where, what, ": invalid UTF-8 at byte ", i,
                 " (the text ends inside a character)");
    for (int k = 1; k <= extra; ++k) {
      const auto b = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      MIXMOE_CHECK((b & 0xC0) == 0x80, where, what, ": invalid UTF-8 at byte ", i, " (bad continuation byte)");
      cp = (cp << 6) | (b & 0x3F);
    }
    MIXMOE_CHECK(cp >= min && cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF), where, what, ": invalid UTF-8 at byte ",
                 i, " (overlong form, surrogate or out of range)");
    out.push_back(cp);
    i += static_cast<std::size_t>(extra) + 1;
  }
  return out;
}

/// Encodes code points as UTF-8.
inline std::string utf8_encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) {
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

/// Whitespace as Python's str.isspace() (what str.split() and str.rstrip() use).
inline bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/// Python's str.split(): the runs of non-whitespace code points.
inline std::vector<std::u32string> split_whitespace(std::u32string_view s) {
  std::vector<std::u32string> out;
  std::size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && is_space(s[i])) ++i;
    const std::size_t begin = i;
    while (i < s.size() && !is_space(s[i])) ++i;
    if (i > begin) out.emplace_back(s.substr(begin, i - begin));
  }
  return out;
}

/// Python's str.rstrip(): drops trailing whitespace.
inline std::u32string rstrip(std::u32string s) {
  while (!s.empty() && is_space(s.back())) s.pop_back();
  return s;
}

/// Lowercases like Python's str.lower() for the capitals of ASCII, Latin-1, Latin Extended-A,
/// Latin Extended Additional (Vietnamese), Greek and Cyrillic; other code points are unchanged.
/// Differences from Python: capitals of other blocks (Latin Extended-B, Armenian, ...) stay,
/// and Greek capital sigma always becomes σ (Python writes ς at the end of a word).
inline std::u32string to_lower(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (char32_t c : s) {
    if ((c >= U'A' && c <= U'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7)) {
      out.push_back(c + 0x20);
    } else if (c == 0x130) {  // capital I with dot above: i + combining dot above, as Python
      out.push_back(U'i');
      out.push_back(0x307);
    } else if (c == 0x178) {
      out.push_back(0xFF);
    } else if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) {
      out.push_back(c % 2 == 0 ? c + 1 : c);
    } else if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) {
      out.push_back(c % 2 == 1 ? c + 1 : c);
    } else if (c == 0x1E9E) {
      out.push_back(0xDF);
    } else if ((c >= 0x1E00 && c <= 0x1E95) || (c >= 0x1EA0 && c <= 0x1EFF)) {
      out.push_back(c % 2 == 0 ? c + 1 : c);
    } else if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) {
      out.push_back(c + 0x20);
    } else if (c == 0x386) {
      out.push_back(0x3AC);
    } else if (c >= 0x388 && c <= 0x38A) {
      out.push_back(c + 0x25);
    } else if (c == 0x38C) {
      out.push_back(0x3CC);
    } else if (c == 0x38E || c == 0x38F) {
      out.push_back(c + 0x3F);
    } else if (c >= 0x410 && c <= 0x42F) {
      out.push_back(c + 0x20);
    } else if (c >= 0x400 && c <= 0x40F) {
      out.push_back(c + 0x50);
    } else if ((c >= 0x460 && c <= 0x481) || (c >= 0x48A && c <= 0x4BF) || (c >= 0x4D0 && c <= 0x52F)) {
      out.push_back(c % 2 == 0 ? c + 1 : c);
    } else if (c == 0x4C0) {
      out.push_back(0x4CF);
    } else if (c >= 0x4C1 && c <= 0x4CE) {
      out.push_back(c % 2 == 1 ? c + 1 : c);
    } else {
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace metric_text

/// How BLEU splits a segment into tokens.
enum class BleuTokenize {
  v13a,       // sacreBLEU's "13a" (mteval-v13a): splits off punctuation; sacreBLEU's default for every language
  none,       // "none": split on whitespace only (text that is already tokenised)
  character,  // "char": every non-whitespace code point is a token (sacreBLEU's "char", for unsegmented scripts)
};

/// sacreBLEU's name of a tokenizer ("13a", "none", "char").
inline const char* bleu_tokenize_name(BleuTokenize t) {
  switch (t) {
    case BleuTokenize::v13a:
      return "13a";
    case BleuTokenize::none:
      return "none";
    case BleuTokenize::character:
      return "char";
  }
  return "?";
}

/// The tokenizer of a sacreBLEU name; throws for other names.
inline BleuTokenize bleu_tokenize_from_name(std::string_view name) {
  if (name == "13a") return BleuTokenize::v13a;
  if (name == "none") return BleuTokenize::none;
  if (name == "char") return BleuTokenize::character;
  detail::fail("bleu", "unknown tokenizer \"", name, "\" (known: 13a, none, char)");
}

/// What BLEU does for an n-gram order without matches (sacreBLEU's smooth_method).
enum class BleuSmooth {
  none,   // precision 0 (the score is 0)
  floor,  // precision = smooth_value / total (default 0.1)
  add_k,  // orders n > 1: matches and totals both + smooth_value (default 1)
  exp,    // NIST / mteval-v13a: the k-th order without matches gets 1 / (2^k * total); the default
};

struct BleuOptions {
  BleuTokenize tokenize = BleuTokenize::v13a;
  bool lowercase = false;  // sacreBLEU's -lc
  int max_ngram_order = 4;
  BleuSmooth smooth = BleuSmooth::exp;
  double smooth_value = -1.0;    // < 0: the method's default (floor 0.1, add-k 1)
  bool effective_order = false;  // average only over the orders the hypothesis has n-grams of (sentence BLEU)
};

/// The sufficient statistics of BLEU: they add up over segments.
struct BleuStats {
  std::int64_t hyp_len = 0, ref_len = 0;
  std::vector<std::int64_t> matches;  // clipped matching n-grams per order 1..N
  std::vector<std::int64_t> totals;   // hypothesis n-grams per order 1..N

  BleuStats& operator+=(const BleuStats& o) {
    if (matches.empty()) {
      matches.assign(o.matches.size(), 0);
      totals.assign(o.totals.size(), 0);
    }
    MIXMOE_CHECK(matches.size() == o.matches.size(), "bleu", "statistics of different n-gram orders (", matches.size(),
                 " and ", o.matches.size(), ")");
    hyp_len += o.hyp_len;
    ref_len += o.ref_len;
    for (std::size_t n = 0; n < matches.size(); ++n) {
      matches[n] += o.matches[n];
      totals[n] += o.totals[n];
    }
    return *this;
  }
};

struct BleuScore {
  double score = 0;                // 0-100
  std::vector<double> precisions;  // per order, in percent, after smoothing
  double bp = 0;                   // brevity penalty
  double ratio = 0;                // hyp_len / ref_len
  std::int64_t hyp_len = 0, ref_len = 0;
  BleuStats stats;

  /// sacreBLEU's line: "BLEU = 23.41 55.1/30.2/18.0/11.2 (BP = 1.000 ratio = 1.021 hyp_len = 1234 ref_len = 1209)".
  [[nodiscard]] std::string format(int width = 2) const {
    char buf[96];
    std::snprintf(buf, sizeof buf, "BLEU = %.*f ", width, score);
    std::string out = buf;
    for (std::size_t n = 0; n < precisions.size(); ++n) {
      std::snprintf(buf, sizeof buf, n == 0 ? "%.1f" : "/%.1f", precisions[n]);
      out += buf;
    }
    std::snprintf(buf, sizeof buf, " (BP = %.3f ratio = %.3f ", bp, ratio);
    out += buf;
    out += "hyp_len = " + std::to_string(hyp_len) + " ref_len = " + std::to_string(ref_len) + ")";
    return out;
  }
};

namespace detail {

inline std::u32string replace_all(std::u32string s, std::u32string_view from, std::u32string_view to) {
  std::u32string out;
  std::size_t i = 0;
  while (true) {
    const std::size_t j = s.find(from, i);
    if (j == std::u32string::npos) break;
    out.append(s, i, j - i);
    out.append(to);
    i = j + from.size();
  }
  out.append(s, i, std::u32string::npos);
  return out;
}

inline bool is_digit(char32_t c) { return c >= U'0' && c <= U'9'; }

/// The first regular expression of 13a: characters that always become tokens of their own.
inline bool is_13a_symbol(char32_t c) {
  return (c >= 0x7B && c <= 0x7E) || (c >= 0x5B && c <= 0x60) || (c >= 0x20 && c <= 0x26) || (c >= 0x28 && c <= 0x2B) ||
         (c >= 0x3A && c <= 0x40) || c == 0x2F;
}

inline std::vector<std::string> to_utf8(const std::vector<std::u32string>& words) {
  std::vector<std::string> out;
  out.reserve(words.size());
  for (const auto& w : words) out.push_back(metric_text::utf8_encode(w));
  return out;
}

}  // namespace detail

/// sacreBLEU's "13a" tokenisation of one line of code points (no lowercasing, no rstrip).
inline std::vector<std::u32string> tokenize_13a(std::u32string line) {
  using detail::is_digit;
  line = detail::replace_all(std::move(line), U"<skipped>", U"");
  line = detail::replace_all(std::move(line), U"-\n", U"");
  line = detail::replace_all(std::move(line), U"\n", U" ");
  if (line.find(U'&') != std::u32string::npos) {
    line = detail::replace_all(std::move(line), U"&quot;", U"\"");
    line = detail::replace_all(std::move(line), U"&amp;", U"&");
    line = detail::replace_all(std::move(line), U"&lt;", U"<");
    line = detail::replace_all(std::move(line), U"&gt;", U">");
  }
  std::u32string s = U" " + line + U" ", t;
  // Each step below is one regular-expression substitution, scanning left to right without
  // overlapping matches, as Python's re.sub does.
  for (char32_t c : s) {  // ([\{-\~\[-\` -\&\(-\+\:-\@\/]) -> " \1 "
    if (detail::is_13a_symbol(c)) {
      t += U' ';
      t += c;
      t += U' ';
    } else {
      t += c;
    }
  }
  s.swap(t);
  t.clear();
  for (std::size_t i = 0; i < s.size();) {  // ([^0-9])([\.,]) -> "\1 \2 ": period/comma not after a digit
    if (i + 1 < s.size() && !is_digit(s[i]) && (s[i + 1] == U'.' || s[i + 1] == U',')) {
      t += s[i];
      t += U' ';
      t += s[i + 1];
      t += U' ';
      i += 2;
    } else {
      t += s[i++];
    }
  }
  s.swap(t);
  t.clear();
  for (std::size_t i = 0; i < s.size();) {  // ([\.,])([^0-9]) -> " \1 \2": period/comma not before a digit
    if (i + 1 < s.size() && (s[i] == U'.' || s[i] == U',') && !is_digit(s[i + 1])) {
      t += U' ';
      t += s[i];
      t += U' ';
      t += s[i + 1];
      i += 2;
    } else {
      t += s[i++];
    }
  }
  s.swap(t);
  t.clear();
  for (std::size_t i = 0; i < s.size();) {  // ([0-9])(-) -> "\1 \2 ": a dash after a digit
    if (i + 1 < s.size() && is_digit(s[i]) && s[i + 1] == U'-') {
      t += s[i];
      t += U' ';
      t += s[i + 1];
      t += U' ';
      i += 2;
    } else {
      t += s[i++];
    }
  }
  return metric_text::split_whitespace(t);
}

/// sacreBLEU's "13a" tokenisation of a UTF-8 line.
inline std::vector<std::string> tokenize_13a(std::string_view line) {
  return detail::to_utf8(tokenize_13a(metric_text::utf8_decode(line, "bleu", "text")));
}

/// The tokens BLEU counts for one segment: optional lowercasing, trailing whitespace removed, tokenizer.
inline std::vector<std::string> bleu_tokens(std::string_view segment, const BleuOptions& opt = {},
                                            std::string_view what = "text") {
  std::u32string s = metric_text::utf8_decode(segment, "bleu", what);
  if (opt.lowercase) s = metric_text::to_lower(s);
  s = metric_text::rstrip(std::move(s));
  switch (opt.tokenize) {
    case BleuTokenize::v13a:
      return detail::to_utf8(tokenize_13a(std::move(s)));
    case BleuTokenize::none:
      return detail::to_utf8(metric_text::split_whitespace(s));
    case BleuTokenize::character: {
      std::vector<std::string> out;
      for (char32_t c : s)
        if (!metric_text::is_space(c)) out.push_back(metric_text::utf8_encode(std::u32string_view(&c, 1)));
      return out;
    }
  }
  return {};
}

namespace detail {

/// n-gram counts of orders 1..max_order; an n-gram's key is its tokens joined by 0xFF (never in UTF-8).
inline std::unordered_map<std::string, std::int64_t> bleu_ngrams(const std::vector<std::string>& tokens,
                                                                 int max_order) {
  std::unordered_map<std::string, std::int64_t> counts;
  const auto len = tokens.size();
  for (std::size_t n = 1; n <= static_cast<std::size_t>(max_order); ++n) {
    for (std::size_t i = 0; i + n <= len; ++i) {
      std::string key = tokens[i];
      for (std::size_t k = 1; k < n; ++k) {
        key += '\xff';
        key += tokens[i + k];
      }
      ++counts[key];
    }
  }
  return counts;
}

inline void check_bleu_options(const BleuOptions& opt) {
  MIXMOE_CHECK(opt.max_ngram_order >= 1, "bleu", "max_ngram_order must be at least 1, got ", opt.max_ngram_order);
}

}  // namespace detail

/// The statistics of one segment: hypothesis against one or more references. The reference
/// length is the one closest to the hypothesis length (the shorter one on a tie).
inline BleuStats bleu_segment_stats(std::string_view hypothesis, const std::vector<std::string>& references,
                                    const BleuOptions& opt = {}, std::size_t segment = 0) {
  detail::check_bleu_options(opt);
  MIXMOE_CHECK(!references.empty(), "bleu", "segment ", segment, ": no reference");
  const auto order = static_cast<std::size_t>(opt.max_ngram_order);
  std::unordered_map<std::string, std::int64_t> ref_max;
  std::vector<std::int64_t> ref_lens;
  for (std::size_t r = 0; r < references.size(); ++r) {
    const auto tokens =
        bleu_tokens(references[r], opt, "reference " + std::to_string(r) + " of segment " + std::to_string(segment));
    ref_lens.push_back(static_cast<std::int64_t>(tokens.size()));
    for (const auto& [key, count] : detail::bleu_ngrams(tokens, opt.max_ngram_order)) {
      auto& m = ref_max[key];
      m = std::max(m, count);
    }
  }
  const auto hyp = bleu_tokens(hypothesis, opt, "hypothesis of segment " + std::to_string(segment));
  BleuStats st;
  st.hyp_len = static_cast<std::int64_t>(hyp.size());
  std::int64_t best_diff = -1;
  for (std::int64_t len : ref_lens) {
    const std::int64_t diff = std::abs(st.hyp_len - len);
    if (best_diff < 0 || diff < best_diff || (diff == best_diff && len < st.ref_len)) {
      best_diff = diff;
      st.ref_len = len;
    }
  }
  st.matches.assign(order, 0);
  st.totals.assign(order, 0);
  for (const auto& [key, count] : detail::bleu_ngrams(hyp, opt.max_ngram_order)) {
    const auto n = static_cast<std::size_t>(std::count(key.begin(), key.end(), '\xff'));
    st.totals[n] += count;
    if (auto it = ref_max.find(key); it != ref_max.end()) st.matches[n] += std::min(count, it->second);
  }
  return st;
}

/// BLEU from (summed) statistics, as sacreBLEU's BLEU.compute_bleu.
inline BleuScore bleu_from_stats(const BleuStats& stats, const BleuOptions& opt = {}) {
  detail::check_bleu_options(opt);
  const auto order = static_cast<std::size_t>(opt.max_ngram_order);
  MIXMOE_CHECK(stats.matches.size() == order && stats.totals.size() == order, "bleu", "statistics have ",
               stats.matches.size(), " n-gram orders, the options ask for ", order);
  BleuScore r;
  r.stats = stats;
  r.hyp_len = stats.hyp_len;
  r.ref_len = stats.ref_len;
  r.ratio = stats.ref_len > 0 ? static_cast<double>(stats.hyp_len) / static_cast<double>(stats.ref_len) : 0.0;
  r.bp = 1.0;
  if (stats.hyp_len < stats.ref_len)
    r.bp = stats.hyp_len > 0 ? std::exp(1.0 - static_cast<double>(stats.ref_len) / static_cast<double>(stats.hyp_len))
                             : 0.0;
  r.precisions.assign(order, 0.0);
  // no match of any order: score 0, precisions 0, no smoothing (sacreBLEU's early exit)
  if (std::all_of(stats.matches.begin(), stats.matches.end(), [](std::int64_t m) { return m == 0; })) return r;
  double smooth_value = opt.smooth_value;
  if (smooth_value < 0) smooth_value = opt.smooth == BleuSmooth::floor ? 0.1 : 1.0;
  double exp_denominator = 1.0;
  std::size_t eff_order = order;
  for (std::size_t n = 0; n < order; ++n) {
    double correct = static_cast<double>(stats.matches[n]), total = static_cast<double>(stats.totals[n]);
    if (opt.smooth == BleuSmooth::add_k && n > 0) {
      correct += smooth_value;
      total += smooth_value;
    }
    if (total == 0) break;
    if (opt.effective_order) eff_order = n + 1;
    if (correct == 0) {
      if (opt.smooth == BleuSmooth::exp) {
        exp_denominator *= 2;
        r.precisions[n] = 100.0 / (exp_denominator * total);
      } else if (opt.smooth == BleuSmooth::floor) {
        r.precisions[n] = 100.0 * smooth_value / total;
      }
    } else {
      r.precisions[n] = 100.0 * correct / total;
    }
  }
  double log_sum = 0;
  for (std::size_t n = 0; n < eff_order; ++n)
    log_sum += r.precisions[n] > 0 ? std::log(r.precisions[n]) : -9999999999.0;
  r.score = r.bp * std::exp(log_sum / static_cast<double>(eff_order));
  return r;
}

/// Corpus BLEU. references[k][i] is the k-th reference of segment i (sacreBLEU's layout: one
/// stream per reference set, each as long as the hypotheses).
inline BleuScore corpus_bleu(const std::vector<std::string>& hypotheses,
                             const std::vector<std::vector<std::string>>& references, const BleuOptions& opt = {}) {
  MIXMOE_CHECK(!references.empty(), "bleu", "no reference stream");
  for (std::size_t k = 0; k < references.size(); ++k)
    MIXMOE_CHECK(references[k].size() == hypotheses.size(), "bleu", "reference stream ", k, " has ",
                 references[k].size(), " segments, the hypotheses ", hypotheses.size());
  BleuStats total;
  total.matches.assign(static_cast<std::size_t>(std::max(opt.max_ngram_order, 1)), 0);
  total.totals = total.matches;
  std::vector<std::string> refs(references.size());
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    for (std::size_t k = 0; k < references.size(); ++k) refs[k] = references[k][i];
    total += bleu_segment_stats(hypotheses[i], refs, opt, i);
  }
  return bleu_from_stats(total, opt);
}

/// Sentence BLEU: sacreBLEU's sentence_bleu defaults (exp smoothing, effective order on).
inline BleuScore sentence_bleu(std::string_view hypothesis, const std::vector<std::string>& references,
                               BleuOptions opt = {.effective_order = true}) {
  return bleu_from_stats(bleu_segment_stats(hypothesis, references, opt), opt);
}

}  // namespace mixmoe
