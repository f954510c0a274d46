// Verbatim spans: the parts of a software message that a translation keeps as they are.
//
// Program messages are full of text that is not to be translated: printf and brace
// placeholders ("%s", "%1$d", "{name}"), command-line options ("--force", "-K"), numbers,
// paths and URLs ("/etc/login.defs", "https://..."), identifiers ("TIME_STYLE", "$HOME",
// "StateFile"). A small model spends much of its training learning to copy such strings
// piece by piece, and still breaks them. Localisation pipelines protect them instead: each
// span becomes a slot token before translation and goes back in after it.
//
//   mask_verbatim("Failed to open %s: --force needed")
//     -> {"Failed to open <v1>: <v2> needed", {"%s", "--force"}}
//   mask_like("%s: --force nötig", spans)    -> "<v1>: <v2> nötig"   (the training target)
//   unmask_verbatim("<v1> konnte nicht ...", spans) -> "%s konnte nicht ..."
//
// The slots are user symbols of the tokenizer (verbatim_symbols(n): "<v1>" ... "<vn>"), one
// token each. Equal spans share one slot; spans beyond the last slot stay in the text.
// What counts as verbatim is decided from the source alone (the target is unknown when
// translating), by rules each with its VerbatimOptions switch; docs/translation.md gives
// how often each kind is kept verbatim by the human translations of the corpus.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/data/corpus.hpp"

namespace mixmoe {

/// The kinds of verbatim span.
enum class VerbatimKind {
  placeholder,  ///< printf / Python / brace / ${x} placeholders, markup tags (find_placeholders)
  option,       ///< a command-line option: "-f", "--dry-run" (without "=VALUE": values get translated)
  number,       ///< digits with '.' or ',' between them: "42", "3.14", "0,1,2"
  identifier,   ///< a word with '_' or '$' or "::": "TIME_STYLE", "$HOME", "std::string"
  path,         ///< an absolute or home path: "/etc/login.defs", "~/.config"
  url,          ///< "scheme://..." or "user@host.domain"
  camel_case,   ///< a lower-case letter followed by an upper-case one in a word: "StateFile", "AppStream"
};

/// "placeholder", "option", ...
inline const char* verbatim_kind_name(VerbatimKind k) {
  switch (k) {
    case VerbatimKind::placeholder:
      return "placeholder";
    case VerbatimKind::option:
      return "option";
    case VerbatimKind::number:
      return "number";
    case VerbatimKind::identifier:
      return "identifier";
    case VerbatimKind::path:
      return "path";
    case VerbatimKind::url:
      return "url";
    case VerbatimKind::camel_case:
      return "camel_case";
  }
  return "?";
}

/// Which kinds are verbatim, and how many slots there are.
struct VerbatimOptions {
  int slots = 8;  ///< slot tokens <v1> ... <vN>; distinct spans beyond N stay in the text
  bool placeholders = true;
  bool options = true;
  bool numbers = true;
  bool identifiers = true;
  bool paths = true;
  bool urls = true;
  bool camel_case = true;
  /// translate(): the output holds every slot exactly as often as the source (decoding bans a
  /// slot at its count and the end of the sentence while one is missing).
  bool exact_slots = true;

  [[nodiscard]] bool enabled(VerbatimKind k) const {
    switch (k) {
      case VerbatimKind::placeholder:
        return placeholders;
      case VerbatimKind::option:
        return options;
      case VerbatimKind::number:
        return numbers;
      case VerbatimKind::identifier:
        return identifiers;
      case VerbatimKind::path:
        return paths;
      case VerbatimKind::url:
        return urls;
      case VerbatimKind::camel_case:
        return camel_case;
    }
    return false;
  }
};

/// One verbatim span of a text: byte position and length.
struct VerbatimSpan {
  std::size_t pos = 0, len = 0;
  VerbatimKind kind = VerbatimKind::placeholder;
};

/// The slot token of slot k (1-based): "<v1>".
inline std::string verbatim_symbol(int k) { return "<v" + std::to_string(k) + ">"; }

/// The slot tokens <v1> ... <vn>, for the tokenizer's user symbols.
inline std::vector<std::string> verbatim_symbols(int n) {
  MIXMOE_CHECK(n >= 0 && n <= 99, "verbatim_symbols", "slot count ", n, " is outside [0, 99]");
  std::vector<std::string> out;
  for (int k = 1; k <= n; ++k) out.push_back(verbatim_symbol(k));
  return out;
}

namespace detail {

/// Bytes that open a word without belonging to it (quotes, brackets), ASCII and UTF-8.
inline std::size_t leading_punct(std::string_view w) {
  static constexpr std::string_view multi[] = {"«", "»", "“", "”", "„", "‘", "’", "‚", "‹", "›", "「", "『", "（"};
  for (std::size_t i = 0; i < w.size();) {
    if (std::string_view("\"'`([<").find(w[i]) != std::string_view::npos) {
      ++i;
      continue;
    }
    bool hit = false;
    for (const auto m : multi)
      if (w.substr(i, m.size()) == m) {
        i += m.size();
        hit = true;
        break;
      }
    if (!hit) return i;
  }
  return w.size();
}

/// Bytes that close a word without belonging to it (quotes, brackets, sentence punctuation).
inline std::size_t trailing_punct(std::string_view w) {
  static constexpr std::string_view multi[] = {"«", "»", "“", "”", "„", "‘", "’", "‹", "›", "…", "」", "』", "）", "。", "、", "："};
  std::size_t n = w.size();
  while (n > 0) {
    if (std::string_view("\"'`)]>,;:.!?").find(w[n - 1]) != std::string_view::npos) {
      --n;
      continue;
    }
    bool hit = false;
    for (const auto m : multi)
      if (n >= m.size() && w.substr(n - m.size(), m.size()) == m) {
        n -= m.size();
        hit = true;
        break;
      }
    if (!hit) break;
  }
  return w.size() - n;
}

inline bool word_char(char c) { return ascii_alnum(c) || c == '_' || c == '-'; }

/// The kind of a whole word (its surrounding punctuation removed), if it is verbatim.
inline bool verbatim_word_kind(std::string_view w, VerbatimKind& kind) {
  if (w.empty()) return false;
  bool alnum = false, alpha = false, digit = false;
  for (const char c : w) {
    alnum = alnum || ascii_alnum(c);
    alpha = alpha || ascii_alpha(c);
    digit = digit || ascii_digit(c);
  }
  if (!alnum) return false;
  // "-f", "--dry-run": a dash or two, then letters, digits, '-' and '_'.
  if (w[0] == '-') {
    std::size_t i = w.size() > 1 && w[1] == '-' ? 2 : 1;
    if (i < w.size() && ascii_alnum(w[i])) {
      while (i < w.size() && word_char(w[i])) ++i;
      if (i == w.size()) {
        kind = VerbatimKind::option;
        return true;
      }
    }
  }
  const auto has = [&](std::string_view x) { return w.find(x) != std::string_view::npos; };
  if (has("://")) {
    kind = VerbatimKind::url;
    return true;
  }
  const std::size_t at = w.find('@');
  if (at != std::string_view::npos && at > 0 && w.find('.', at) != std::string_view::npos &&
      w.find('/') == std::string_view::npos) {
    kind = VerbatimKind::url;
    return true;
  }
  if ((w[0] == '/' || w.substr(0, 2) == "~/") && alpha) {
    kind = VerbatimKind::path;
    return true;
  }
  if (has("/")) return false;  // "read/write": words that translations translate
  if (has("_") || has("$") || has("::")) {
    kind = VerbatimKind::identifier;
    return true;
  }
  if (has("=")) return false;  // "KEY=VALUE": the value names get translated
  if (digit && !alpha) {
    // Digits, with '.' or ',' only between them.
    bool ok = ascii_digit(w.front()) && ascii_digit(w.back());
    for (const char c : w) ok = ok && (ascii_digit(c) || c == '.' || c == ',');
    if (ok) {
      kind = VerbatimKind::number;
      return true;
    }
    return false;
  }
  for (std::size_t i = 0; i + 1 < w.size(); ++i)
    if (w[i] >= 'a' && w[i] <= 'z' && w[i + 1] >= 'A' && w[i + 1] <= 'Z') {
      for (const char c : w)  // ASCII letters and digits only: "iPhone's" stays a word of the text
        if (!ascii_alnum(c)) return false;
      kind = VerbatimKind::camel_case;
      return true;
    }
  return false;
}

}  // namespace detail

/// The verbatim spans of `text` in order, by the rules of `opt`. A whitespace-separated word,
/// without its surrounding quotes, brackets and sentence punctuation, is one span when it is an
/// option, a number, an identifier, a path, a URL or a camel-case word; otherwise each placeholder
/// inside it is a span ("(%d)" -> "%d").
inline std::vector<VerbatimSpan> find_verbatim(std::string_view text, const VerbatimOptions& opt = {}) {
  std::vector<VerbatimSpan> out;
  for (std::size_t i = 0; i < text.size();) {
    if (detail::ascii_space(text[i])) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < text.size() && !detail::ascii_space(text[j])) ++j;
    const std::string_view word = text.substr(i, j - i);
    const std::size_t lead = detail::leading_punct(word);
    const std::size_t trail = lead < word.size() ? detail::trailing_punct(word.substr(lead)) : 0;
    const std::string_view core = word.substr(lead, word.size() - lead - trail);
    const auto placeholders = find_placeholders(word);
    VerbatimKind kind{};
    if (placeholders.empty() && detail::verbatim_word_kind(core, kind)) {
      if (opt.enabled(kind)) out.push_back({i + lead, core.size(), kind});
    } else if (opt.placeholders) {
      for (const auto& p : placeholders) out.push_back({i + p.pos, p.len, VerbatimKind::placeholder});
    }
    i = j;
  }
  return out;
}

/// A text with its verbatim spans replaced by slot tokens; spans[k] is the text of slot k + 1.
struct MaskedText {
  std::string text;
  std::vector<std::string> spans;
};

/// Replaces the verbatim spans of `source` by <v1>, <v2>, ... in order of first appearance;
/// equal spans get the same slot. Spans beyond opt.slots distinct ones stay as they are.
inline MaskedText mask_verbatim(std::string_view source, const VerbatimOptions& opt = {}) {
  MaskedText m;
  std::size_t at = 0;
  for (const auto& s : find_verbatim(source, opt)) {
    const std::string span(source.substr(s.pos, s.len));
    auto it = std::find(m.spans.begin(), m.spans.end(), span);
    if (it == m.spans.end()) {
      if (static_cast<int>(m.spans.size()) >= opt.slots) continue;
      m.spans.push_back(span);
      it = m.spans.end() - 1;
    }
    m.text.append(source.substr(at, s.pos - at));
    m.text += verbatim_symbol(static_cast<int>(it - m.spans.begin()) + 1);
    at = s.pos + s.len;
  }
  m.text.append(source.substr(at));
  return m;
}

/// Replaces, in `target` (a translation of the source that `spans` came from), every occurrence of
/// a span by its slot token: the training target that goes with the masked source. Longer spans
/// are matched first; a match must not continue a word ("-f" is not found inside "--force" or
/// "x-f", "42" not inside "1420"; a hyphen after it is fine: "StateFile-Datei"). Spans the translation changed stay as the translator wrote them.
inline std::string mask_like(std::string_view target, const std::vector<std::string>& spans) {
  std::vector<std::size_t> order(spans.size());
  for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return spans[a].size() > spans[b].size(); });
  struct Hit {
    std::size_t pos, len, slot;
  };
  std::vector<Hit> hits;
  std::vector<bool> taken(target.size(), false);
  for (const std::size_t k : order) {
    const std::string& s = spans[k];
    if (s.empty()) continue;
    const bool check_before = detail::word_char(s.front()) || s.front() == '-';
    // A printf conversion ends where it ends: "%p" of binutils' "%pB" is one.
    const bool check_after = (detail::ascii_alnum(s.back()) || s.back() == '_') && s.front() != '%';
    for (std::size_t p = target.find(s); p != std::string_view::npos; p = target.find(s, p + 1)) {
      const std::size_t e = p + s.size();
      if (check_before && p > 0 && detail::word_char(target[p - 1])) continue;
      // After a span, '-' may follow: "StateFile-Datei", "%s-Objekt".
      if (check_after && e < target.size() && (detail::ascii_alnum(target[e]) || target[e] == '_')) continue;
      if (std::any_of(taken.begin() + static_cast<std::ptrdiff_t>(p), taken.begin() + static_cast<std::ptrdiff_t>(e),
                      [](bool t) { return t; }))
        continue;
      std::fill(taken.begin() + static_cast<std::ptrdiff_t>(p), taken.begin() + static_cast<std::ptrdiff_t>(e), true);
      hits.push_back({p, s.size(), k});
    }
  }
  std::sort(hits.begin(), hits.end(), [](const Hit& a, const Hit& b) { return a.pos < b.pos; });
  std::string out;
  std::size_t at = 0;
  for (const auto& h : hits) {
    out.append(target.substr(at, h.pos - at));
    out += verbatim_symbol(static_cast<int>(h.slot) + 1);
    at = h.pos + h.len;
  }
  out.append(target.substr(at));
  return out;
}

/// Puts the spans back: every <vK> with 1 <= K <= spans.size() becomes spans[K - 1]; a slot token
/// without a span (a model may write one) is removed.
inline std::string unmask_verbatim(std::string_view text, const std::vector<std::string>& spans) {
  std::string out;
  for (std::size_t i = 0; i < text.size();) {
    if (text[i] == '<' && i + 2 < text.size() && text[i + 1] == 'v' && detail::ascii_digit(text[i + 2])) {
      std::size_t j = i + 2;
      int k = 0;
      while (j < text.size() && detail::ascii_digit(text[j]) && j < i + 4) k = k * 10 + (text[j++] - '0');
      if (j < text.size() && text[j] == '>' && k >= 1) {
        if (static_cast<std::size_t>(k) <= spans.size()) out += spans[static_cast<std::size_t>(k) - 1];
        i = j + 1;
        continue;
      }
    }
    out += text[i++];
  }
  return out;
}

}  // namespace mixmoe
