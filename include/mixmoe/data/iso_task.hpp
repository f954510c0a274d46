// The ISO-code task: a multilingual downstream task with checkable answers, parallel across
// languages, built from the `iso-codes` package (its JSON lists and its gettext catalogs).
//
//   item:     one ISO entry, e.g. country DE; its answer is the code ("DE"); it has a name in
//             English (the msgid of the catalogs) and in every target language whose catalog
//             translates that name ("Deutschland", "Allemagne", "Германия", "ドイツ", ...)
//   query:    (item, language): "what is the code of this name?"; the same item in English and in
//             a target language is a parallel pair (RA-MoE's cc / ci / ic / ii categories)
//   split:    by item (never by language) into train / dev / test, seeded, per kind
//
// Kinds (IsoKind), what is read and what the answer is:
//   country   iso_3166-1.json ("3166-1": alpha_2, name, common_name)  catalog iso_3166-1.mo  alpha_2 "DE"
//   language  iso_639-2.json  ("639-2": entries with an alpha_2)      catalog iso_639-2.mo   alpha_2 "de"
//   currency  iso_4217.json   ("4217": alpha_3, name)                 catalog iso_4217.mo    alpha_3 "EUR"
// File layout (IsoTaskOptions::under(root)): root/usr/share/iso-codes/json/<file>.json and
// root/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo, so root "/" is an installed iso-codes and
// root "data/catalogs/iso-codes" is the tree of scripts/fetch-catalogs.sh + scripts/fetch-iso-codes.sh.
//
// Names: the English name is the JSON "name" (a country's "common_name" when it has one and
// prefer_common_name is set: "Bolivia" rather than "Bolivia, Plurinational State of"; a language
// whose catalog lacks the common name's translation falls back to the translation of "name").
// With first_alternative, a name listing alternatives ("Catalan; Valencian") keeps the first one,
// in English and in the translation alike. A language keeps an item only when its catalog has a
// non-empty translation (counted as `untranslated` otherwise). A translation equal to the English
// name ("Angola" in German) is a correct name in that language: kept by default, and counted as
// `identical` (keep_identical = false drops it). A name given to two items of a kind with different
// codes has no single answer: those rows are dropped (`ambiguous`; in English: the whole item).
//
// Prompt (the translation prompt's form, with a task tag in place of the target-language tag):
//   <2iso3166> name-ids <sep> code-ids </s>        loss on code-ids and </s>
// The tags ("<2iso3166>", "<2iso639>", "<2iso4217>" by default) must be single tokens: train the
// tokenizer with iso_task_symbols() among its user symbols (next to translation_symbols()).
//
// Scoring: exact match of the generated text, trimmed of ASCII white space and upper-cased (ASCII),
// against the code upper-cased. score_iso_task gives per-language accuracy and, per language, the
// correctness of every scored item (1 right, 0 wrong, -1 not asked in that language), aligned across
// languages, which is what the cc/ci/ic/ii categorisation needs.
//
// The task set is written as TSV (write_iso_task_tsv / read_iso_task_tsv):
//   # languages: en de fr es ru ja zh_CN
//   # id<TAB>lang<TAB>name<TAB>code<TAB>split
//   country:DE<TAB>en<TAB>Germany<TAB>DE<TAB>train
//   country:DE<TAB>de<TAB>Deutschland<TAB>DE<TAB>train
// one row per (item, language that has a name), items in id order, languages in the header's order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/data/batching.hpp"
#include "mixmoe/data/mo_reader.hpp"
#include "mixmoe/data/text_io.hpp"
#include "mixmoe/data/tokenizer.hpp"

namespace mixmoe {

/// Which ISO list an item comes from.
enum class IsoKind { country, language, currency };

inline constexpr IsoKind kIsoKinds[] = {IsoKind::country, IsoKind::language, IsoKind::currency};

/// "country", "language", "currency" (the prefix of item ids).
inline const char* iso_kind_name(IsoKind k) {
  switch (k) {
    case IsoKind::country: return "country";
    case IsoKind::language: return "language";
    case IsoKind::currency: return "currency";
  }
  detail::fail("iso_task", "unknown IsoKind ", static_cast<int>(k));
}

/// The kind named `name` ("country", "language", "currency").
inline IsoKind parse_iso_kind(std::string_view name) {
  for (const IsoKind k : kIsoKinds)
    if (name == iso_kind_name(k)) return k;
  detail::fail("iso_task", "unknown kind \"", name, "\" (country, language or currency)");
}

/// What build_iso_task reads, which names it keeps and how it splits.
struct IsoTaskOptions {
  std::filesystem::path json_dir = "/usr/share/iso-codes/json";  ///< iso_3166-1.json, iso_639-2.json, iso_4217.json
  std::filesystem::path locale_dir = "/usr/share/locale";        ///< <lang>/LC_MESSAGES/iso_*.mo
  std::vector<std::string> languages = {"de", "fr", "es", "ru", "ja", "zh_CN"};  ///< targets; "en" is always there
  std::vector<IsoKind> kinds = {IsoKind::country};
  bool prefer_common_name = true;  ///< a country's common_name (when it has one) instead of its name
  bool first_alternative = true;   ///< "Catalan; Valencian" -> "Catalan" (English and translation)
  bool keep_identical = true;      ///< keep translations equal to the English name (always counted)
  double train_fraction = 0.6;     ///< of each kind's items; dev_fraction more go to dev, the rest to test
  double dev_fraction = 0.2;
  std::uint64_t seed = 0;  ///< of the split

  /// The options with json_dir and locale_dir under an iso-codes file tree rooted at `root`.
  static IsoTaskOptions under(const std::filesystem::path& root) {
    IsoTaskOptions o;
    o.json_dir = root / "usr/share/iso-codes/json";
    o.locale_dir = root / "usr/share/locale";
    return o;
  }
};

/// One ISO entry with its names. `names` maps a language ("en" always) to the item's name in it;
/// a language is absent when its catalog does not give the item a usable name.
struct IsoItem {
  std::string id;     ///< "<kind>:<code>", e.g. "country:DE", "language:de", "currency:EUR"
  IsoKind kind = IsoKind::country;
  std::string code;   ///< the answer, as ISO writes it
  std::string split;  ///< "train", "dev" or "test"
  std::map<std::string, std::string> names;

  [[nodiscard]] bool has(const std::string& lang) const { return names.count(lang) != 0; }
  [[nodiscard]] const std::string& name(const std::string& lang) const {
    const auto it = names.find(lang);
    MIXMOE_CHECK(it != names.end(), "iso_task", "item ", id, " has no name in \"", lang, "\"");
    return it->second;
  }
};

/// What building did per language (counts over the items of the chosen kinds).
struct IsoLanguageStats {
  std::size_t kept = 0;          ///< rows of this language in the task set
  std::size_t identical = 0;     ///< translations equal to the English name (kept unless keep_identical is off)
  std::size_t untranslated = 0;  ///< no (or an empty) translation in the catalog
  std::size_t ambiguous = 0;     ///< dropped: the same name belongs to another item with another code
};

/// The task: items in id order, the languages ("en" first), the per-language build counts.
struct IsoTaskSet {
  std::vector<std::string> languages;
  std::vector<IsoItem> items;
  std::map<std::string, IsoLanguageStats> stats;  ///< filled by build_iso_task (read_iso_task_tsv: kept, identical)

  /// Index of the item with id `id`; throws when there is none.
  [[nodiscard]] std::size_t index_of(std::string_view id) const {
    const auto it = std::lower_bound(items.begin(), items.end(), id,
                                     [](const IsoItem& a, std::string_view b) { return a.id < b; });
    MIXMOE_CHECK(it != items.end() && it->id == id, "iso_task", "no item \"", id, "\"");
    return static_cast<std::size_t>(it - items.begin());
  }
};

namespace detail {

/// The JSON list, its top-level key and the gettext domain of a kind.
struct IsoSource {
  const char* file;
  const char* key;
  const char* domain;
};

inline IsoSource iso_source(IsoKind k) {
  switch (k) {
    case IsoKind::country: return {"iso_3166-1.json", "3166-1", "iso_3166-1"};
    case IsoKind::language: return {"iso_639-2.json", "639-2", "iso_639-2"};
    case IsoKind::currency: return {"iso_4217.json", "4217", "iso_4217"};
  }
  fail("iso_task", "unknown IsoKind ", static_cast<int>(k));
}

inline std::string_view trim_ascii(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

/// The name as the task uses it: trimmed, and with first_alternative cut before the first ';'.
inline std::string iso_clean_name(std::string_view s, bool first_alternative) {
  if (first_alternative) s = s.substr(0, s.find(';'));
  return std::string(trim_ascii(s));
}

/// One entry of a JSON list: its code and English names.
struct IsoEntry {
  std::string code, name, common_name;
};

inline std::vector<IsoEntry> read_iso_json(const std::filesystem::path& dir, IsoKind kind) {
  const IsoSource src = iso_source(kind);
  const std::filesystem::path file = dir / src.file;
  MIXMOE_CHECK(std::filesystem::is_regular_file(file), "iso_task", file.string(),
               ": missing (the iso-codes JSON lists; scripts/fetch-iso-codes.sh fetches them)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(file, "iso_task"));
  } catch (const nlohmann::json::exception& e) {
    fail("iso_task", file.string(), ": not valid JSON: ", e.what());
  }
  MIXMOE_CHECK(j.is_object() && j.contains(src.key) && j[src.key].is_array(), "iso_task", file.string(),
               ": expected an object with an array \"", src.key, "\"");
  const char* code_field = kind == IsoKind::currency ? "alpha_3" : "alpha_2";
  const auto text = [&](const nlohmann::json& e, const char* field, std::size_t i) -> std::string {
    if (!e.contains(field)) return {};
    MIXMOE_CHECK(e[field].is_string(), "iso_task", file.string(), ": entry ", i, ": \"", field, "\" is not a string");
    return e[field].get<std::string>();
  };
  std::vector<IsoEntry> out;
  const auto& list = j[src.key];
  for (std::size_t i = 0; i < list.size(); ++i) {
    const auto& e = list[i];
    MIXMOE_CHECK(e.is_object(), "iso_task", file.string(), ": entry ", i, " is not an object");
    IsoEntry x{text(e, code_field, i), text(e, "name", i), text(e, "common_name", i)};
    if (x.code.empty() && kind == IsoKind::language) continue;  // a language without an ISO 639-1 code
    MIXMOE_CHECK(!x.code.empty(), "iso_task", file.string(), ": entry ", i, " has no \"", code_field, "\"");
    MIXMOE_CHECK(!x.name.empty(), "iso_task", file.string(), ": entry ", i, " (", x.code, ") has no \"name\"");
    MIXMOE_CHECK(x.code.find_first_of(" \t\n\r:") == std::string::npos, "iso_task", file.string(), ": entry ", i,
                 ": code \"", x.code, "\" contains white space or ':'");
    out.push_back(std::move(x));
  }
  return out;
}

/// msgid -> msgstr of a catalog's singular messages without context (empty translations left out).
inline std::map<std::string, std::string> read_iso_catalog(const std::filesystem::path& locale_dir,
                                                           const std::string& lang, IsoKind kind) {
  const std::filesystem::path file = locale_dir / lang / "LC_MESSAGES" / (std::string(iso_source(kind).domain) + ".mo");
  MIXMOE_CHECK(std::filesystem::is_regular_file(file), "iso_task", file.string(), ": missing (no ",
               iso_source(kind).domain, " catalog for language \"", lang, "\")");
  std::map<std::string, std::string> out;
  for (auto& e : read_mo(file).entries)
    if (e.context.empty() && !e.is_plural() && !e.msgstr.empty() && !e.msgstr[0].empty())
      out.emplace(std::move(e.msgid), std::move(e.msgstr[0]));
  return out;
}

}  // namespace detail

/// Assigns item splits: per kind, the items in id order are shuffled with a Generator seeded from
/// `seed` and the kind; the first round(n * train_fraction) go to train, the next
/// round(n * dev_fraction) to dev, the rest to test. Depends only on the item ids, so the split of
/// an item does not change with the target languages.
inline void assign_iso_splits(IsoTaskSet& set, double train_fraction, double dev_fraction, std::uint64_t seed) {
  MIXMOE_CHECK(train_fraction >= 0 && dev_fraction >= 0 && train_fraction + dev_fraction <= 1.0 + 1e-12, "iso_task",
               "split fractions train ", train_fraction, " and dev ", dev_fraction,
               " must be non-negative and sum to at most 1");
  for (const IsoKind k : kIsoKinds) {
    std::vector<std::size_t> idx;
    for (std::size_t i = 0; i < set.items.size(); ++i)
      if (set.items[i].kind == k) idx.push_back(i);
    std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return set.items[a].id < set.items[b].id; });
    Generator gen(seed + 0x9E3779B97F4A7C15ull * (static_cast<std::uint64_t>(k) + 1));
    detail::shuffle_in_place(idx, gen);
    const std::size_t n = idx.size();
    const auto round_share = [n](double f) { return std::min(n, static_cast<std::size_t>(static_cast<double>(n) * f + 0.5)); };
    const std::size_t n_train = round_share(train_fraction);
    const std::size_t n_dev = std::min(n - n_train, round_share(dev_fraction));
    for (std::size_t r = 0; r < n; ++r)
      set.items[idx[r]].split = r < n_train ? "train" : r < n_train + n_dev ? "dev" : "test";
  }
}

/// Builds the task from the iso-codes JSON lists and catalogs (see the header comment).
inline IsoTaskSet build_iso_task(const IsoTaskOptions& opt) {
  MIXMOE_CHECK(!opt.kinds.empty(), "iso_task", "no kind requested (country, language, currency)");
  IsoTaskSet set;
  set.languages.emplace_back("en");
  for (const auto& l : opt.languages) {
    MIXMOE_CHECK(!l.empty() && l.find_first_of("/\\. \t\n") == std::string::npos, "iso_task", "bad language \"", l,
                 "\" (a locale directory name such as de or zh_CN)");
    if (std::find(set.languages.begin(), set.languages.end(), l) == set.languages.end()) set.languages.push_back(l);
  }
  for (const auto& l : set.languages) set.stats[l];

  std::set<IsoKind> kinds(opt.kinds.begin(), opt.kinds.end());
  for (const IsoKind kind : kinds) {
    const auto entries = detail::read_iso_json(opt.json_dir, kind);
    // English names; an English name shared by entries with different codes makes them ambiguous.
    std::vector<IsoItem> items;
    std::vector<std::string> msgid_of;  // the msgid each item's English name comes from
    std::vector<std::string> fallback;  // "name", when that msgid is the common_name; else empty
    std::map<std::string, std::set<std::string>> codes_of;
    for (const auto& e : entries) {
      IsoItem it;
      it.kind = kind;
      it.code = e.code;
      it.id = std::string(iso_kind_name(kind)) + ":" + e.code;
      const bool common = kind == IsoKind::country && opt.prefer_common_name && !e.common_name.empty();
      it.names["en"] = detail::iso_clean_name(common ? e.common_name : e.name, opt.first_alternative);
      msgid_of.push_back(common ? e.common_name : e.name);
      fallback.push_back(common ? e.name : std::string());
      codes_of[it.names["en"]].insert(e.code);
      items.push_back(std::move(it));
    }
    std::vector<bool> keep(items.size(), true);
    for (std::size_t i = 0; i < items.size(); ++i)
      if (codes_of[items[i].names["en"]].size() > 1) {
        keep[i] = false;
        ++set.stats["en"].ambiguous;
      }
    std::set<std::string> seen_ids;
    for (std::size_t i = 0; i < items.size(); ++i)
      if (keep[i])
        MIXMOE_CHECK(seen_ids.insert(items[i].id).second, "iso_task", detail::iso_source(kind).file, ": code \"",
                     items[i].code, "\" appears twice");

    for (std::size_t li = 1; li < set.languages.size(); ++li) {
      const std::string& lang = set.languages[li];
      const auto catalog = detail::read_iso_catalog(opt.locale_dir, lang, kind);
      IsoLanguageStats& st = set.stats[lang];
      std::map<std::string, std::set<std::string>> lang_codes;
      std::vector<std::string> name(items.size());
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (!keep[i]) continue;
        auto it = catalog.find(msgid_of[i]);
        if (it == catalog.end() && !fallback[i].empty()) it = catalog.find(fallback[i]);
        if (it == catalog.end()) {
          ++st.untranslated;
          continue;
        }
        name[i] = detail::iso_clean_name(it->second, opt.first_alternative);
        if (name[i].empty()) {
          ++st.untranslated;
          continue;
        }
        lang_codes[name[i]].insert(items[i].code);
      }
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (name[i].empty()) continue;
        if (lang_codes[name[i]].size() > 1) {
          ++st.ambiguous;
          continue;
        }
        if (name[i] == items[i].names["en"]) {
          ++st.identical;
          if (!opt.keep_identical) continue;
        }
        items[i].names[lang] = name[i];
      }
    }
    for (std::size_t i = 0; i < items.size(); ++i)
      if (keep[i]) set.items.push_back(std::move(items[i]));
  }
  std::sort(set.items.begin(), set.items.end(), [](const IsoItem& a, const IsoItem& b) { return a.id < b.id; });
  for (const auto& it : set.items)
    for (const auto& [lang, n] : it.names) ++set.stats[lang].kept;
  assign_iso_splits(set, opt.train_fraction, opt.dev_fraction, opt.seed);
  return set;
}

/// Writes the task set as TSV (see the header comment); the file is written only if every name is valid.
inline void write_iso_task_tsv(const std::filesystem::path& path, const IsoTaskSet& set) {
  std::string text = "# languages:";
  for (const auto& l : set.languages) text += " " + l;
  text += "\n# id\tlang\tname\tcode\tsplit\n";
  std::size_t row = 2;
  for (const auto& it : set.items)
    for (const auto& l : set.languages) {
      const auto n = it.names.find(l);
      if (n == it.names.end()) continue;
      try {
        text += format_tsv_row({it.id, l, n->second, it.code, it.split}, TsvFieldPolicy::error, ++row);
      } catch (const Error& e) {
        detail::fail("iso_task", path.string(), ": item ", it.id, ": ", std::string_view(e.what()).substr(6));
      }
    }
  detail::write_text_file(path, text, "iso_task");
}

/// Parses the TSV text of write_iso_task_tsv; `name` prefixes errors ("name:line: problem").
inline IsoTaskSet parse_iso_task_tsv(std::string_view text, std::string_view name) {
  constexpr std::string_view kHead = "# languages:";
  MIXMOE_CHECK(text.starts_with(kHead), "iso_task", name, ":1: expected the header \"", kHead, " en ...\"");
  IsoTaskSet set;
  {
    std::istringstream head(std::string(text.substr(kHead.size(), text.find('\n') - kHead.size())));
    for (std::string l; head >> l;) {
      MIXMOE_CHECK(std::find(set.languages.begin(), set.languages.end(), l) == set.languages.end(), "iso_task", name,
                   ":1: language \"", l, "\" listed twice");
      set.languages.push_back(l);
    }
  }
  MIXMOE_CHECK(!set.languages.empty() && set.languages.front() == "en", "iso_task", name,
               ":1: the languages must start with en");
  for (const auto& l : set.languages) set.stats[l];
  TsvReadOptions t;
  t.min_columns = t.max_columns = 5;
  t.comments = true;
  std::map<std::string, std::size_t> at;  // id -> index in set.items
  for (auto& row : parse_tsv(text, name, t)) {
    auto& f = row.fields;
    const auto where = [&] { return std::string(name) + ":" + std::to_string(row.line); };
    const std::size_t colon = f[0].find(':');
    MIXMOE_CHECK(colon != std::string::npos, "iso_task", where(), ": id \"", f[0], "\" is not <kind>:<code>");
    const IsoKind kind = parse_iso_kind(std::string_view(f[0]).substr(0, colon));
    MIXMOE_CHECK(f[0].substr(colon + 1) == f[3], "iso_task", where(), ": code \"", f[3], "\" differs from the id \"",
                 f[0], "\"");
    MIXMOE_CHECK(std::find(set.languages.begin(), set.languages.end(), f[1]) != set.languages.end(), "iso_task",
                 where(), ": language \"", f[1], "\" is not in the header");
    MIXMOE_CHECK(f[4] == "train" || f[4] == "dev" || f[4] == "test", "iso_task", where(), ": split \"", f[4],
                 "\" is not train, dev or test");
    MIXMOE_CHECK(!f[2].empty(), "iso_task", where(), ": empty name");
    auto [pos, fresh] = at.emplace(f[0], set.items.size());
    if (fresh) {
      IsoItem it;
      it.id = f[0];
      it.kind = kind;
      it.code = f[3];
      it.split = f[4];
      set.items.push_back(std::move(it));
    }
    IsoItem& it = set.items[pos->second];
    MIXMOE_CHECK(it.split == f[4], "iso_task", where(), ": item ", it.id, " is in split ", f[4], " here and ", it.split,
                 " before");
    MIXMOE_CHECK(it.names.emplace(f[1], f[2]).second, "iso_task", where(), ": item ", it.id, " has a second \"", f[1],
                 "\" row");
  }
  std::sort(set.items.begin(), set.items.end(), [](const IsoItem& a, const IsoItem& b) { return a.id < b.id; });
  for (const auto& it : set.items) {
    MIXMOE_CHECK(it.has("en"), "iso_task", name, ": item ", it.id, " has no English row");
    for (const auto& [lang, n] : it.names) {
      ++set.stats[lang].kept;
      if (lang != "en" && n == it.names.at("en")) ++set.stats[lang].identical;
    }
  }
  return set;
}

/// Reads a task set written by write_iso_task_tsv (build counts other than kept and identical are not stored).
inline IsoTaskSet read_iso_task_tsv(const std::filesystem::path& path) {
  return parse_iso_task_tsv(detail::read_text_file(path, "iso_task"), path.string());
}

/// Markdown table of the rows per language and split, and the identical count.
inline std::string format_iso_task_counts(const IsoTaskSet& set) {
  std::ostringstream os;
  os << "| language | train | dev | test | all | identical to English |\n|---|---:|---:|---:|---:|---:|\n";
  for (const auto& l : set.languages) {
    std::map<std::string, std::size_t> n;
    std::size_t identical = 0;
    for (const auto& it : set.items)
      if (it.has(l)) {
        ++n[it.split];
        if (l != "en" && it.names.at(l) == it.names.at("en")) ++identical;
      }
    os << "| " << l << " | " << n["train"] << " | " << n["dev"] << " | " << n["test"] << " | "
       << n["train"] + n["dev"] + n["test"] << " | " << (l == "en" ? std::string("-") : std::to_string(identical))
       << " |\n";
  }
  return os.str();
}

// ---- prompts and training examples -------------------------------------------------------------

/// The task tags: the prompt of a kind starts with "<2" + tag + ">".
struct IsoPromptOptions {
  std::string country_tag = "iso3166";
  std::string language_tag = "iso639";
  std::string currency_tag = "iso4217";

  [[nodiscard]] const std::string& tag(IsoKind k) const {
    return k == IsoKind::country ? country_tag : k == IsoKind::language ? language_tag : currency_tag;
  }
};

/// The user symbols the tokenizer needs for these kinds (one "<2tag>" per kind).
inline std::vector<std::string> iso_task_symbols(const std::vector<IsoKind>& kinds = {IsoKind::country},
                                                 const IsoPromptOptions& opt = {}) {
  std::vector<std::string> out;
  for (const IsoKind k : kIsoKinds)
    if (std::find(kinds.begin(), kinds.end(), k) != kinds.end()) out.push_back(Tokenizer::lang_tag(opt.tag(k)));
  return out;
}

/// A query's prompt ids and the answer text.
struct IsoPrompt {
  std::vector<index_t> ids;  ///< <2tag> name-ids <sep>
  std::string answer;        ///< the code
};

/// The prompt asking for the code of `item` named in `lang`, and its answer.
inline IsoPrompt iso_prompt(const Tokenizer& tok, const IsoItem& item, const std::string& lang,
                            const IsoPromptOptions& opt = {}) {
  IsoPrompt p;
  p.ids.push_back(tok.lang_tag_id(opt.tag(item.kind)));
  const auto name = tok.encode(item.name(lang));
  p.ids.insert(p.ids.end(), name.begin(), name.end());
  p.ids.push_back(tok.sep_id());
  p.answer = item.code;
  return p;
}

/// A training example: the prompt, the code's ids and </s>; the loss on the code and </s>.
inline Example make_iso_example(const Tokenizer& tok, const IsoItem& item, const std::string& lang,
                                const IsoPromptOptions& opt = {}) {
  IsoPrompt p = iso_prompt(tok, item, lang, opt);
  Example ex{std::move(p.ids), 0};
  ex.target_begin = static_cast<index_t>(ex.ids.size());
  const auto code = tok.encode(p.answer);
  ex.ids.insert(ex.ids.end(), code.begin(), code.end());
  ex.ids.push_back(tok.eos_id());
  return ex;
}

/// One question: an item (index into IsoTaskSet::items) asked in a language.
struct IsoQuery {
  std::size_t item = 0;
  std::string lang;
};

/// The queries of a split ("" = all splits) in the languages `langs` (empty = all of the set's),
/// item by item in id order, languages in the given order; an item without a name in a language
/// gives no query for it.
inline std::vector<IsoQuery> iso_queries(const IsoTaskSet& set, std::string_view split,
                                         std::vector<std::string> langs = {}) {
  MIXMOE_CHECK(split.empty() || split == "train" || split == "dev" || split == "test", "iso_task", "unknown split \"",
               split, "\" (train, dev, test, or empty for all)");
  if (langs.empty()) langs = set.languages;
  for (const auto& l : langs)
    MIXMOE_CHECK(std::find(set.languages.begin(), set.languages.end(), l) != set.languages.end(), "iso_task",
                 "language \"", l, "\" is not in the task set");
  std::vector<IsoQuery> out;
  for (std::size_t i = 0; i < set.items.size(); ++i) {
    if (!split.empty() && set.items[i].split != split) continue;
    for (const auto& l : langs)
      if (set.items[i].has(l)) out.push_back({i, l});
  }
  return out;
}

/// Training examples of the queries (make_iso_example each, in order).
inline std::vector<Example> iso_examples(const Tokenizer& tok, const IsoTaskSet& set, std::span<const IsoQuery> queries,
                                         const IsoPromptOptions& opt = {}) {
  std::vector<Example> out;
  out.reserve(queries.size());
  for (const auto& q : queries) {
    MIXMOE_CHECK(q.item < set.items.size(), "iso_task", "query item ", q.item, " is outside the ", set.items.size(),
                 " items");
    out.push_back(make_iso_example(tok, set.items[q.item], q.lang, opt));
  }
  return out;
}

// ---- scoring -----------------------------------------------------------------------------------

/// The generated text as compared: ASCII white space trimmed, ASCII letters upper-cased.
inline std::string normalise_iso_answer(std::string_view generated) {
  std::string s(detail::trim_ascii(generated));
  for (char& c : s)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  return s;
}

/// Exact match of the normalised generated text with the normalised code.
inline bool iso_answer_correct(std::string_view generated, std::string_view code) {
  return normalise_iso_answer(generated) == normalise_iso_answer(code);
}

/// Scores of a set of queries. `correct[lang][r]` is about item `items[r]`: 1 right, 0 wrong,
/// -1 not asked in that language; rows are aligned across languages (parallel items).
struct IsoScore {
  std::vector<std::string> languages;  ///< the queries' languages, in the set's order
  std::vector<std::size_t> items;      ///< indices into IsoTaskSet::items, ascending
  std::vector<std::string> item_ids;   ///< their ids
  std::map<std::string, std::vector<std::int8_t>> correct;

  [[nodiscard]] std::size_t asked(const std::string& lang) const { return count(lang, [](std::int8_t v) { return v >= 0; }); }
  [[nodiscard]] std::size_t right(const std::string& lang) const { return count(lang, [](std::int8_t v) { return v == 1; }); }
  /// right / asked; 0 when nothing was asked.
  [[nodiscard]] double accuracy(const std::string& lang) const {
    const std::size_t n = asked(lang);
    return n ? static_cast<double>(right(lang)) / static_cast<double>(n) : 0.0;
  }

 private:
  template <class Pred>
  std::size_t count(const std::string& lang, Pred pred) const {
    const auto it = correct.find(lang);
    MIXMOE_CHECK(it != correct.end(), "iso_task", "no scores for language \"", lang, "\"");
    return static_cast<std::size_t>(std::count_if(it->second.begin(), it->second.end(), pred));
  }
};

/// Scores `outputs[i]` (the generated text) as the answer to `queries[i]`.
inline IsoScore score_iso_task(const IsoTaskSet& set, std::span<const IsoQuery> queries,
                               std::span<const std::string> outputs) {
  MIXMOE_CHECK(queries.size() == outputs.size(), "iso_task", queries.size(), " queries but ", outputs.size(),
               " outputs");
  IsoScore s;
  std::set<std::string> langs;
  std::set<std::size_t> items;
  for (const auto& q : queries) {
    MIXMOE_CHECK(q.item < set.items.size(), "iso_task", "query item ", q.item, " is outside the ", set.items.size(),
                 " items");
    MIXMOE_CHECK(set.items[q.item].has(q.lang), "iso_task", "item ", set.items[q.item].id, " has no name in \"", q.lang,
                 "\"");
    langs.insert(q.lang);
    items.insert(q.item);
  }
  for (const auto& l : set.languages)
    if (langs.count(l)) s.languages.push_back(l);
  s.items.assign(items.begin(), items.end());
  for (const std::size_t i : s.items) s.item_ids.push_back(set.items[i].id);
  for (const auto& l : s.languages) s.correct[l].assign(s.items.size(), std::int8_t{-1});
  for (std::size_t i = 0; i < queries.size(); ++i) {
    const auto row = static_cast<std::size_t>(std::lower_bound(s.items.begin(), s.items.end(), queries[i].item) -
                                              s.items.begin());
    std::int8_t& v = s.correct[queries[i].lang][row];
    MIXMOE_CHECK(v < 0, "iso_task", "item ", set.items[queries[i].item].id, " is asked twice in \"", queries[i].lang,
                 "\"");
    v = iso_answer_correct(outputs[i], set.items[queries[i].item].code) ? 1 : 0;
  }
  return s;
}

/// Markdown table: language, asked, right, accuracy (in percent, one decimal).
inline std::string format_iso_accuracy(const IsoScore& s) {
  std::ostringstream os;
  os << "| language | asked | right | accuracy |\n|---|---:|---:|---:|\n";
  for (const auto& l : s.languages) {
    char acc[32];
    std::snprintf(acc, sizeof acc, "%.1f%%", 100.0 * s.accuracy(l));
    os << "| " << l << " | " << s.asked(l) << " | " << s.right(l) << " | " << acc << " |\n";
  }
  return os.str();
}

/// The scores as JSON: {"languages": {lang: {asked, right, accuracy}}, "items": [ids],
/// "correct": {lang: [1, 0, -1, ...]}}.
inline nlohmann::ordered_json iso_score_json(const IsoScore& s) {
  nlohmann::ordered_json j;
  j["languages"] = nlohmann::ordered_json::object();
  for (const auto& l : s.languages)
    j["languages"][l] = {{"asked", s.asked(l)}, {"right", s.right(l)}, {"accuracy", s.accuracy(l)}};
  j["items"] = s.item_ids;
  j["correct"] = nlohmann::ordered_json::object();
  for (const auto& l : s.languages) {
    auto& a = j["correct"][l] = nlohmann::ordered_json::array();
    for (const std::int8_t v : s.correct.at(l)) a.push_back(static_cast<int>(v));
  }
  return j;
}

}  // namespace mixmoe
