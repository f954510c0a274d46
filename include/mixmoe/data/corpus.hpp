// The translation corpus of the Mix-MoE pipeline, built from the gettext catalogs of named Debian
// packages (downloaded by scripts/fetch-catalogs.sh; see docs/data.md).
//
//   build_corpus(options)   reads <catalog_dir>/packages.tsv and every package's
//                           <catalog_dir>/<package>/usr/share/locale/<lang>/LC_MESSAGES/*.mo,
//                           makes English -> <lang> pairs, cleans them (clean_pair), splits them by
//                           catalog group (train / dev / test), de-duplicates, drops dev/test pairs
//                           whose English string occurs in train, and collects monolingual text.
//   write_corpus(c, dir)    train.<lang>.tsv, dev.<lang>.tsv, test.<lang>.tsv (group, en, target;
//                           no header), mono.<lang>.txt and mono.en.txt, manifest.json.
//   load_corpus(dir)        reads them back and checks them against the manifest.
//
// Everything is deterministic: the same catalogs and options give byte-identical files.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/data/mo_reader.hpp"
#include "mixmoe/data/text_io.hpp"

namespace mixmoe {

// ---- cleaning -------------------------------------------------------------------------------

/// Options of clean_pair. Lengths are in Unicode code points, checked on both sides.
struct CleaningOptions {
  std::size_t max_multiline_chars = 300;  ///< a message with a line break longer than this is dropped
  std::size_t max_chars = 1000;           ///< any message longer than this is dropped
  bool strip_accelerators = true;         ///< remove gettext/GTK mnemonic markers ("_Open", "開く(_O)")
  bool drop_placeholder_mismatch = true;  ///< drop pairs whose placeholder multisets differ
};

/// Why clean_pair kept or dropped a pair; the first rule that applies, in this order.
enum class CleanRule {
  kept,
  empty,                 ///< the English or the translation is empty (or only whitespace)
  too_long,              ///< longer than max_chars, or multi-line and longer than max_multiline_chars
  format_only,           ///< the English has no letter outside its placeholders ("%s", "%d: %s")
  no_letters,            ///< a side has no letter at all outside placeholders ("---", "42", "%s" translated as "-")
  untranslated,          ///< the translation equals the English
  placeholder_mismatch,  ///< the placeholder multisets differ
};

/// The name used in manifests and messages ("placeholder_mismatch").
inline const char* clean_rule_name(CleanRule r) {
  switch (r) {
    case CleanRule::kept:
      return "kept";
    case CleanRule::empty:
      return "empty";
    case CleanRule::too_long:
      return "too_long";
    case CleanRule::format_only:
      return "format_only";
    case CleanRule::no_letters:
      return "no_letters";
    case CleanRule::untranslated:
      return "untranslated";
    case CleanRule::placeholder_mismatch:
      return "placeholder_mismatch";
  }
  return "?";
}

/// A placeholder found in a message: byte position, length and its comparison key.
struct Placeholder {
  std::size_t pos = 0, len = 0;
  std::string key;  ///< "%s", "%lu", "%(name)s", "{0}", "${x}", "<b>", "</b>"
};

namespace detail {

inline bool ascii_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
inline bool ascii_digit(char c) { return c >= '0' && c <= '9'; }
inline bool ascii_alnum(char c) { return ascii_alpha(c) || ascii_digit(c); }
inline bool ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/// Decodes the code point at s[i] (valid UTF-8 assumed) and advances i.
inline char32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const std::size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (std::size_t k = 1; k < len && i + k < s.size(); ++k)
    cp = cp << 6 | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += len;
  return cp;
}

/// Letter test without Unicode tables: ASCII letters, and every non-ASCII code point outside the
/// punctuation, symbol, digit and private-use blocks listed here (good enough to tell "Fehler" or
/// "ファイル" from "—", "…", "１２").
inline bool is_letter(char32_t cp) {
  if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
  if (cp <= 0xBF || cp == 0xD7 || cp == 0xF7) return false;  // Latin-1 punctuation and signs
  if (cp >= 0x2000 && cp <= 0x2BFF) return false;            // punctuation, symbols, arrows, boxes
  if (cp >= 0x3000 && cp <= 0x3003) return false;            // CJK space and marks
  if (cp >= 0x3008 && cp <= 0x3020) return false;            // CJK brackets
  if (cp == 0x30FB) return false;                            // katakana middle dot
  if (cp >= 0xE000 && cp <= 0xF8FF) return false;            // private use
  if (cp >= 0xFE30 && cp <= 0xFE4F) return false;            // CJK compatibility forms
  if (cp >= 0xFF00 && cp <= 0xFF20) return false;            // fullwidth punctuation, digits
  if ((cp >= 0xFF3B && cp <= 0xFF40) || (cp >= 0xFF5B && cp <= 0xFF65)) return false;
  if (cp >= 0xFFF0) return false;  // specials, emoji planes
  return true;
}

inline bool has_letter(std::string_view s) {
  for (std::size_t i = 0; i < s.size();)
    if (is_letter(next_code_point(s, i))) return true;
  return false;
}

/// Length of a printf conversion starting at s[i] == '%' (0 if none); its key goes to `key`.
inline std::size_t printf_placeholder(std::string_view s, std::size_t i, std::string& key) {
  std::size_t j = i + 1;
  const auto digits = [&] {
    while (j < s.size() && ascii_digit(s[j])) ++j;
  };
  if (j < s.size() && s[j] == '(') {  // Python "%(name)s"
    const std::size_t close = s.find(')', j);
    if (close == std::string_view::npos || close == j + 1) return 0;
    for (std::size_t k = j + 1; k < close; ++k)
      if (!ascii_alnum(s[k]) && s[k] != '_') return 0;
    j = close + 1;
  } else {  // position "%1$"
    const std::size_t start = j;
    digits();
    if (!(j > start && j < s.size() && s[j] == '$'))
      j = start;
    else
      ++j;
  }
  while (j < s.size() && (s[j] == '-' || s[j] == '+' || s[j] == '#' || s[j] == '0' || s[j] == '\'' || s[j] == 'I')) ++j;
  if (j < s.size() && s[j] == '*') {
    ++j;
    const std::size_t st = j;
    digits();
    if (j > st && j < s.size() && s[j] == '$')
      ++j;
    else
      j = st;
  } else {
    digits();
  }
  if (j < s.size() && s[j] == '.') {
    ++j;
    if (j < s.size() && s[j] == '*') ++j;
    digits();
    if (j < s.size() && s[j] == '$') ++j;
  }
  const std::size_t len_start = j;
  if (j + 1 < s.size() && ((s[j] == 'h' && s[j + 1] == 'h') || (s[j] == 'l' && s[j + 1] == 'l')))
    j += 2;
  else if (j < s.size() && std::string_view("hlLqjzZt").find(s[j]) != std::string_view::npos)
    ++j;
  if (j < s.size() && s[j] == '<') {  // "%<PRIu64>" (system-dependent)
    const std::size_t close = s.find('>', j);
    if (close == std::string_view::npos || s.substr(j + 1, 3) != "PRI") return 0;
    key = "%" + std::string(s.substr(j, close + 1 - j));
    return close + 1 - i;
  }
  if (j >= s.size() || std::string_view("diouxXeEfFgGaAcspnmCS").find(s[j]) == std::string_view::npos) return 0;
  key = "%";
  if (s[i + 1] == '(') key += std::string(s.substr(i + 1, s.find(')', i + 1) - i));
  key += std::string(s.substr(len_start, j + 1 - len_start));
  return j + 1 - i;
}

/// Length of a markup tag of a known HTML/Pango kind at s[i] == '<' (0 if none); key "<b>", "</span>".
inline std::size_t tag_placeholder(std::string_view s, std::size_t i, std::string& key) {
  static constexpr std::string_view tags[] = {"a", "b",     "big",  "br",     "code", "em",  "i",  "li", "p",
                                              "s", "small", "span", "strong", "sub",  "sup", "tt", "u",  "ul"};
  std::size_t j = i + 1;
  const bool closing = j < s.size() && s[j] == '/';
  if (closing) ++j;
  const std::size_t name_start = j;
  while (j < s.size() && ascii_alpha(s[j])) ++j;
  const std::string_view name = s.substr(name_start, j - name_start);
  if (std::find(std::begin(tags), std::end(tags), name) == std::end(tags)) return 0;
  const std::size_t close = s.find('>', j);
  if (close == std::string_view::npos) return 0;
  if (close != j && s[j] != ' ' && s[j] != '/') return 0;  // "<bold>" is not "<b>"
  if (s.substr(j, close - j).find('<') != std::string_view::npos) return 0;
  key = std::string(closing ? "</" : "<") + std::string(name) + ">";
  return close + 1 - i;
}

/// Length of "{name}" / "{0}" / "{}" at s[i] == '{' (0 if none).
inline std::size_t brace_placeholder(std::string_view s, std::size_t i) {
  std::size_t j = i + 1;
  while (j < s.size() && (ascii_alnum(s[j]) || s[j] == '_')) ++j;
  return j < s.size() && s[j] == '}' ? j + 1 - i : 0;
}

}  // namespace detail

/// The placeholders of a message in order: printf conversions ("%s", "%1$s" -> key "%s", "%-10lu"
/// -> "%lu"; "%%" is a literal), Python "%(name)s", "{0}" / "{name}", "${x}", and markup tags of
/// common HTML/Pango kinds ("<b>", "</span>"; attributes are not part of the key).
inline std::vector<Placeholder> find_placeholders(std::string_view s) {
  std::vector<Placeholder> out;
  std::string key;
  for (std::size_t i = 0; i < s.size();) {
    std::size_t len = 0;
    key.clear();
    if (s[i] == '%') {
      if (i + 1 < s.size() && s[i + 1] == '%') {
        i += 2;
        continue;
      }
      len = detail::printf_placeholder(s, i, key);
    } else if (s[i] == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      len = detail::brace_placeholder(s, i + 1);
      if (len) key = std::string(s.substr(i, ++len));
    } else if (s[i] == '{') {
      len = detail::brace_placeholder(s, i);
      if (len) key = std::string(s.substr(i, len));
    } else if (s[i] == '<') {
      len = detail::tag_placeholder(s, i, key);
    }
    if (len) {
      out.push_back({i, len, key});
      i += len;
    } else {
      ++i;
    }
  }
  return out;
}

/// The sorted placeholder keys of a message (the multiset compared by clean_pair).
inline std::vector<std::string> placeholder_keys(std::string_view s) {
  std::vector<std::string> keys;
  for (auto& p : find_placeholders(s)) keys.push_back(std::move(p.key));
  std::sort(keys.begin(), keys.end());
  return keys;
}

/// The message without its placeholders.
inline std::string strip_placeholders(std::string_view s) {
  std::string out;
  std::size_t at = 0;
  for (const auto& p : find_placeholders(s)) {
    out += s.substr(at, p.pos - at);
    at = p.pos + p.len;
  }
  out += s.substr(at);
  return out;
}

/// ASCII whitespace runs (TAB, LF, CR, ...) become one space; leading and trailing whitespace goes.
inline std::string normalise_whitespace(std::string_view s) {
  std::string out;
  bool pending = false;
  for (const char c : s) {
    if (detail::ascii_space(c)) {
      pending = !out.empty();
    } else {
      if (pending) out += ' ';
      pending = false;
      out += c;
    }
  }
  return out;
}

namespace detail {

/// Positions of '_' accelerator candidates: '_' followed by a letter or digit (or a non-ASCII
/// byte), not next to another '_', whose whitespace-delimited token does not occur in `other`
/// (so identifiers such as "max_connections" or "LC_ALL", kept verbatim in translations, are not
/// taken for accelerators).
inline std::vector<std::size_t> accelerator_candidates(std::string_view s, std::string_view other) {
  std::vector<std::size_t> out;
  for (std::size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] != '_') continue;
    const char next = s[i + 1];
    if (!(ascii_alnum(next) || static_cast<unsigned char>(next) >= 0x80)) continue;
    if (i > 0 && s[i - 1] == '_') continue;
    std::size_t a = i, b = i;
    while (a > 0 && !ascii_space(s[a - 1])) --a;
    while (b < s.size() && !ascii_space(s[b])) ++b;
    if (other.find(s.substr(a, b - a)) != std::string_view::npos) continue;
    out.push_back(i);
  }
  return out;
}

/// Removes a CJK-style "(_X)" / "（_X）" accelerator (and one space before it); true if found.
inline bool strip_paren_accelerator(std::string& t) {
  for (std::size_t i = 0; i + 3 < t.size(); ++i) {
    if (t[i] == '(' && t[i + 1] == '_' && ascii_alnum(t[i + 2]) && t[i + 3] == ')') {
      std::size_t from = i;
      if (from > 0 && t[from - 1] == ' ') --from;
      t.erase(from, i + 4 - from);
      return true;
    }
  }
  return false;
}

}  // namespace detail

/// Strips gettext/GTK mnemonic markers from a pair; true when it changed something. The policy:
/// only '_' is a marker ('&' is mostly literal in gettext catalogs: "AT&T", "&&", entities). The
/// English must have exactly one candidate (see detail::accelerator_candidates); it is removed, and
/// in the translation either a "(_X)" group (Japanese/Chinese style) or else its one candidate is
/// removed. A translator who dropped the marker leaves a translation without one, which is fine;
/// a translation with several candidates is left as is.
inline bool strip_accelerators(std::string& en, std::string& target) {
  const auto src = detail::accelerator_candidates(en, target);
  if (src.size() != 1) return false;
  const auto tgt = detail::accelerator_candidates(target, en);
  en.erase(src[0], 1);
  if (!detail::strip_paren_accelerator(target) && tgt.size() == 1) target.erase(tgt[0], 1);
  return true;
}

/// The result of cleaning one pair: the rule that decided, the cleaned strings (when kept) and
/// whether accelerators were stripped.
struct CleanResult {
  CleanRule rule = CleanRule::kept;
  std::string en, target;
  bool accelerator_stripped = false;

  [[nodiscard]] bool kept() const { return rule == CleanRule::kept; }
};

/// Cleans one English -> translation pair (valid UTF-8 expected): normalises whitespace, strips
/// accelerators (option), then applies the rules of CleanRule in order. Placeholders are never altered.
inline CleanResult clean_pair(std::string_view en, std::string_view target, const CleaningOptions& opt = {}) {
  CleanResult r;
  r.en = normalise_whitespace(en);
  r.target = normalise_whitespace(target);
  const auto drop = [&](CleanRule rule) {
    r.rule = rule;
    return r;
  };
  if (r.en.empty() || r.target.empty()) return drop(CleanRule::empty);
  const std::size_t len = std::max(utf8_length(en), utf8_length(target));
  const bool multiline = en.find('\n') != std::string_view::npos || target.find('\n') != std::string_view::npos;
  if (len > opt.max_chars || (multiline && len > opt.max_multiline_chars)) return drop(CleanRule::too_long);
  if (opt.strip_accelerators) r.accelerator_stripped = strip_accelerators(r.en, r.target);
  if (!detail::has_letter(strip_placeholders(r.en)))
    return drop(find_placeholders(r.en).empty() ? CleanRule::no_letters : CleanRule::format_only);
  if (!detail::has_letter(strip_placeholders(r.target))) return drop(CleanRule::no_letters);
  if (r.en == r.target) return drop(CleanRule::untranslated);
  if (opt.drop_placeholder_mismatch && placeholder_keys(r.en) != placeholder_keys(r.target))
    return drop(CleanRule::placeholder_mismatch);
  return r;
}

// ---- grouping and splitting ------------------------------------------------------------------

/// Packages whose catalogs belong to one source and must share a split; others are their own group.
inline std::map<std::string, std::string> default_package_groups() {
  return {
      {"postgresql-15", "postgresql"},
      {"postgresql-client-15", "postgresql"},
      {"libpq5", "postgresql"},
      {"apt", "apt"},
      {"libapt-pkg6.0", "apt"},
      {"python-apt-common", "apt"},
      {"login", "shadow"},
      {"passwd", "shadow"},
      {"libpam-runtime", "linux-pam"},
      {"libpam-modules", "linux-pam"},
      {"dpkg", "dpkg"},
      {"libdpkg-perl", "dpkg"},
      {"gettext", "gettext"},
      {"gettext-base", "gettext"},
      {"libgstreamer1.0-0", "gstreamer"},
      {"libgstreamer-plugins-base1.0-0", "gstreamer"},
      {"libgdk-pixbuf2.0-common", "gtk"},
      {"libgtk2.0-common", "gtk"},
      {"libglib2.0-data", "gtk"},
      {"gsettings-desktop-schemas", "gtk"},
      {"at-spi2-common", "gtk"},
      {"libavahi-common-data", "avahi"},
      {"polkitd", "freedesktop"},
      {"packagekit", "freedesktop"},
      {"appstream", "freedesktop"},
      {"shared-mime-info", "freedesktop"},
      {"xdg-user-dirs", "freedesktop"},
  };
}

/// What build_corpus reads and how it cleans and splits.
struct CorpusOptions {
  std::filesystem::path catalog_dir = "data/catalogs";  ///< holds packages.tsv and <package>/usr/share/locale/...
  std::vector<std::string> languages = {"de", "fr", "es", "ru", "ja", "zh_CN"};  ///< locale directory names
  CleaningOptions cleaning;
  bool include_plural = true;  ///< a plural entry also gives (msgid_plural, msgstr[1] or msgstr[0])
  std::map<std::string, std::string> package_groups = default_package_groups();  ///< package -> group
  std::vector<std::string> test_groups = {"linux-pam", "apt", "shadow", "systemd"};
  std::vector<std::string> dev_groups = {"adduser", "avahi", "libgphoto2-port12", "make", "psmisc",
                                         "sed",     "wget",  "xz-utils"};
  bool drop_overlap = true;             ///< drop dev/test pairs whose English occurs in train (any language)
  std::ostream* progress = &std::cerr;  ///< one line per package; nullptr for silence
};

/// One corpus pair: its catalog group, the English message and its translation.
struct CorpusPair {
  std::string group, en, target;
};

/// The corpus in memory: pairs per split and language, monolingual text per language (and "en"),
/// and the manifest (what write_corpus stores as manifest.json).
struct Corpus {
  std::vector<std::string> languages;
  std::map<std::string, std::vector<CorpusPair>> train, dev, test;  ///< keyed by language
  std::map<std::string, std::vector<std::string>> mono;             ///< keyed by language, plus "en"
  nlohmann::ordered_json manifest;

  /// Pairs of split "train" / "dev" / "test" for a language (empty when the language has none).
  [[nodiscard]] const std::vector<CorpusPair>& pairs(std::string_view split, const std::string& lang) const {
    const auto& m = split == "train" ? train : split == "dev" ? dev : split == "test" ? test : bad_split(split);
    static const std::vector<CorpusPair> none;
    const auto it = m.find(lang);
    return it == m.end() ? none : it->second;
  }

 private:
  [[noreturn]] static const std::map<std::string, std::vector<CorpusPair>>& bad_split(std::string_view split) {
    detail::fail("corpus", "unknown split \"", split, "\" (train, dev or test)");
  }
};

/// One line of <catalog_dir>/packages.tsv.
struct CorpusPackage {
  std::string name, version, sha256;
};

/// Reads <dir>/packages.tsv ("package<TAB>version<TAB>sha256", '#' comments), as written by
/// scripts/fetch-catalogs.sh.
inline std::vector<CorpusPackage> read_package_list(const std::filesystem::path& dir) {
  const auto file = dir / "packages.tsv";
  MIXMOE_CHECK(std::filesystem::is_regular_file(file), "corpus", file.string(),
               ": missing (run scripts/fetch-catalogs.sh ", dir.string(), " first)");
  TsvReadOptions t;
  t.min_columns = t.max_columns = 3;
  t.comments = true;
  std::vector<CorpusPackage> out;
  std::set<std::string> seen;
  for (auto& row : read_tsv(file, t)) {
    MIXMOE_CHECK(seen.insert(row.fields[0]).second, "corpus", file.string(), ':', row.line, ": package \"",
                 row.fields[0], "\" listed twice");
    out.push_back({row.fields[0], row.fields[1], row.fields[2]});
  }
  return out;
}

namespace detail {

inline const char* const kSplits[] = {"train", "dev", "test"};

inline nlohmann::ordered_json corpus_options_json(const CorpusOptions& o) {
  nlohmann::ordered_json j;
  j["languages"] = o.languages;
  j["include_plural"] = o.include_plural;
  j["max_multiline_chars"] = o.cleaning.max_multiline_chars;
  j["max_chars"] = o.cleaning.max_chars;
  j["strip_accelerators"] = o.cleaning.strip_accelerators;
  j["drop_placeholder_mismatch"] = o.cleaning.drop_placeholder_mismatch;
  j["drop_overlap"] = o.drop_overlap;
  j["test_groups"] = o.test_groups;
  j["dev_groups"] = o.dev_groups;
  j["package_groups"] = nlohmann::ordered_json(o.package_groups);
  return j;
}

/// Adds pairs to `out` once per (en, target); returns the number of duplicates skipped.
struct PairDedup {
  std::unordered_set<std::string> seen;
  std::size_t add(std::vector<CorpusPair>& out, CorpusPair p) {
    std::string key = p.en;
    key += '\0';
    key += p.target;
    if (!seen.insert(std::move(key)).second) return 1;
    out.push_back(std::move(p));
    return 0;
  }
};

}  // namespace detail

/// Builds the corpus from the catalogs of the packages in <catalog_dir>/packages.tsv (see the top of
/// this file and docs/data.md). Catalogs named iso_* always go to train. Throws mixmoe::Error on a
/// bad catalog, a missing package directory, or a dev/test group that names no package.
inline Corpus build_corpus(const CorpusOptions& opt) {
  namespace fs = std::filesystem;
  const auto t0 = std::chrono::steady_clock::now();
  MIXMOE_CHECK(!opt.languages.empty(), "corpus", "no language requested");
  for (const auto& l : opt.languages)
    MIXMOE_CHECK(!l.empty() && l != "en" && l.find('/') == std::string::npos && l.find('.') == std::string::npos,
                 "corpus", "bad language \"", l, "\" (a locale directory name such as de or zh_CN, not en)");
  const auto packages = read_package_list(opt.catalog_dir);

  const auto group_of = [&](const std::string& pkg) {
    const auto it = opt.package_groups.find(pkg);
    return it == opt.package_groups.end() ? pkg : it->second;
  };
  std::map<std::string, std::string> split_of_group;
  for (const auto& p : packages) split_of_group[group_of(p.name)] = "train";
  for (const auto* which : {"test", "dev"}) {
    for (const auto& g : std::string_view(which) == "test" ? opt.test_groups : opt.dev_groups) {
      const auto it = split_of_group.find(g);
      MIXMOE_CHECK(it != split_of_group.end(), "corpus", which, " group \"", g, "\" has no package in ",
                   (opt.catalog_dir / "packages.tsv").string());
      MIXMOE_CHECK(it->second == "train", "corpus", "group \"", g, "\" is in both test_groups and dev_groups");
      it->second = which;
    }
  }

  Corpus c;
  c.languages = opt.languages;
  std::map<std::string, std::map<std::string, std::size_t>> clean_counts;  // lang -> rule -> n
  std::map<std::string, std::map<std::string, detail::PairDedup>> dedup;   // split -> lang
  std::map<std::string, std::map<std::string, std::size_t>> duplicates;    // split -> lang
  std::map<std::string, std::set<std::string>> group_catalogs;
  for (const auto* s : detail::kSplits)
    for (const auto& l : opt.languages) duplicates[s][l] = 0;
  for (const auto& l : opt.languages)
    for (const auto* rule : {"candidates", "plural_added", "kept", "empty", "too_long", "format_only", "no_letters",
                             "untranslated", "placeholder_mismatch", "accelerator_stripped", "catalogs"})
      clean_counts[l][rule] = 0;

  for (const auto& pkg : packages) {
    const fs::path root = opt.catalog_dir / pkg.name;
    MIXMOE_CHECK(fs::is_directory(root), "corpus", root.string(), ": missing package directory (listed in ",
                 (opt.catalog_dir / "packages.tsv").string(), ")");
    const std::string group = group_of(pkg.name);
    std::map<std::string, std::size_t> kept_here;
    std::size_t catalogs_here = 0;
    for (const auto& lang : opt.languages) {
      const fs::path dir = root / "usr/share/locale" / lang / "LC_MESSAGES";
      if (!fs::is_directory(dir)) continue;
      std::vector<fs::path> files;
      for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".mo" && e.is_regular_file() && !e.is_symlink()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
      for (const auto& f : files) {
        const std::string domain = f.stem().string();
        const std::string split = domain.starts_with("iso_") ? "train" : split_of_group.at(group);
        group_catalogs[group].insert(domain);
        const MoCatalog cat = read_mo(f, pkg.name + "/" + lang + "/" + f.filename().string());
        ++catalogs_here;
        auto& counts = clean_counts[lang];
        ++counts["catalogs"];
        auto& bucket = split == "train" ? c.train[lang] : split == "dev" ? c.dev[lang] : c.test[lang];
        const auto consider = [&](const std::string& en, const std::string& tgt) {
          ++counts["candidates"];
          CleanResult r = clean_pair(en, tgt, opt.cleaning);
          ++counts[clean_rule_name(r.rule)];
          if (!r.kept()) return;
          if (r.accelerator_stripped) ++counts["accelerator_stripped"];
          ++kept_here[lang];
          duplicates[split][lang] += dedup[split][lang].add(bucket, {group, std::move(r.en), std::move(r.target)});
        };
        for (const auto& e : cat.entries) {
          if (e.msgstr.empty()) continue;
          consider(e.msgid, e.msgstr[0]);
          if (opt.include_plural && e.is_plural()) {
            ++counts["plural_added"];
            consider(e.msgid_plural, e.msgstr.size() > 1 ? e.msgstr[1] : e.msgstr[0]);
          }
        }
      }
    }
    if (opt.progress) {
      *opt.progress << "[corpus] " << pkg.name << ' ' << pkg.version << " (group " << group << ", "
                    << split_of_group.at(group) << "): " << catalogs_here << " catalogs;";
      for (const auto& lang : opt.languages) *opt.progress << ' ' << lang << ' ' << kept_here[lang];
      *opt.progress << " pairs kept\n";
    }
  }

  // Dev/test pairs whose English occurs in train (in any language) are dropped.
  std::map<std::string, std::map<std::string, std::size_t>> overlap;
  std::unordered_set<std::string> train_en;
  for (const auto& l : opt.languages)
    for (const auto& p : c.train[l]) train_en.insert(p.en);
  for (auto* m : {&c.dev, &c.test}) {
    const std::string split = m == &c.dev ? "dev" : "test";
    for (const auto& l : opt.languages) {
      auto& v = (*m)[l];
      const std::size_t before = v.size();
      if (opt.drop_overlap) std::erase_if(v, [&](const CorpusPair& p) { return train_en.count(p.en) > 0; });
      overlap[split][l] = before - v.size();
    }
  }

  // Monolingual text: train targets per language; English: train sources over all languages.
  {
    std::unordered_set<std::string> seen_en;
    for (const auto& l : opt.languages) {
      std::unordered_set<std::string> seen;
      auto& mono = c.mono[l];
      for (const auto& p : c.train[l]) {
        if (seen.insert(p.target).second) mono.push_back(p.target);
        if (seen_en.insert(p.en).second) c.mono["en"].push_back(p.en);
      }
    }
  }

  // The manifest.
  auto& m = c.manifest;
  m["format"] = "mixmoe-corpus";
  m["version"] = 1;
  m["columns"] = {"group", "en", "target"};
  m["languages"] = opt.languages;
  m["packages"] = nlohmann::ordered_json::array();
  for (const auto& p : packages)
    m["packages"].push_back(
        {{"name", p.name}, {"version", p.version}, {"sha256", p.sha256}, {"group", group_of(p.name)}});
  for (const auto& [g, split] : split_of_group) {
    m["groups"][g]["split"] = split;
    m["groups"][g]["catalogs"] = group_catalogs[g];
  }
  for (const auto* s : detail::kSplits)
    for (const auto& l : opt.languages) m["counts"][s][l] = c.pairs(s, l).size();
  m["counts"]["mono"]["en"] = c.mono["en"].size();
  for (const auto& l : opt.languages) m["counts"]["mono"][l] = c.mono[l].size();
  for (const auto& l : opt.languages) m["cleaning"][l] = clean_counts[l];
  m["duplicates"] = duplicates;
  m["overlap_dropped"] = overlap;
  m["options"] = detail::corpus_options_json(opt);

  if (opt.progress) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    *opt.progress << "[corpus] built in " << secs << " s:";
    for (const auto& l : opt.languages)
      *opt.progress << ' ' << l << ' ' << c.train[l].size() << '/' << c.dev[l].size() << '/' << c.test[l].size();
    *opt.progress << " (train/dev/test pairs); mono en " << c.mono["en"].size() << '\n';
  }
  return c;
}

/// Writes the corpus files and manifest.json into `dir` (created if needed).
inline void write_corpus(const Corpus& c, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  for (const auto* s : detail::kSplits)
    for (const auto& l : c.languages) {
      std::vector<std::vector<std::string>> rows;
      for (const auto& p : c.pairs(s, l)) rows.push_back({p.group, p.en, p.target});
      write_tsv(dir / (std::string(s) + "." + l + ".tsv"), rows);
    }
  for (const auto& [l, lines] : c.mono) write_lines(dir / ("mono." + l + ".txt"), lines);
  detail::write_text_file(dir / "manifest.json", c.manifest.dump(2) + "\n", "corpus");
}

/// Reads a corpus written by write_corpus and checks every file against manifest.json.
inline Corpus load_corpus(const std::filesystem::path& dir) {
  const auto mf = dir / "manifest.json";
  Corpus c;
  try {
    c.manifest = nlohmann::ordered_json::parse(detail::read_text_file(mf, "corpus"));
  } catch (const nlohmann::json::exception& e) {
    detail::fail("corpus", mf.string(), ": not valid JSON: ", e.what());
  }
  const auto& m = c.manifest;
  MIXMOE_CHECK(m.is_object() && m.value("format", "") == "mixmoe-corpus", "corpus", mf.string(),
               ": not a mixmoe corpus manifest (\"format\" is not \"mixmoe-corpus\")");
  MIXMOE_CHECK(m.value("version", 0) == 1, "corpus", mf.string(), ": unsupported version ", m.value("version", 0));
  MIXMOE_CHECK(m.contains("languages") && m["languages"].is_array() && m.contains("counts"), "corpus", mf.string(),
               ": \"languages\" or \"counts\" missing");
  c.languages = m["languages"].get<std::vector<std::string>>();
  const auto expected = [&](const std::string& s, const std::string& l) -> std::size_t {
    const auto& counts = m["counts"];
    MIXMOE_CHECK(counts.contains(s) && counts[s].contains(l) && counts[s][l].is_number_unsigned(), "corpus",
                 mf.string(), ": counts.", s, '.', l, " missing");
    return counts[s][l].get<std::size_t>();
  };
  TsvReadOptions t;
  t.min_columns = t.max_columns = 3;
  for (const auto* s : detail::kSplits)
    for (const auto& l : c.languages) {
      const auto file = dir / (std::string(s) + "." + l + ".tsv");
      auto& v = std::string_view(s) == "train" ? c.train[l] : std::string_view(s) == "dev" ? c.dev[l] : c.test[l];
      for (auto& row : read_tsv(file, t))
        v.push_back({std::move(row.fields[0]), std::move(row.fields[1]), std::move(row.fields[2])});
      MIXMOE_CHECK(v.size() == expected(s, l), "corpus", file.string(), ": manifest says ", expected(s, l),
                   " pairs, the file has ", v.size());
    }
  std::vector<std::string> mono_langs = c.languages;
  mono_langs.push_back("en");
  for (const auto& l : mono_langs) {
    const auto file = dir / ("mono." + l + ".txt");
    c.mono[l] = read_lines(file);
    MIXMOE_CHECK(c.mono[l].size() == expected("mono", l), "corpus", file.string(), ": manifest says ",
                 expected("mono", l), " lines, the file has ", c.mono[l].size());
  }
  return c;
}

}  // namespace mixmoe
