// The ISO-code task: items from a hand-written iso-codes tree (JSON lists + msgfmt-compiled
// catalogs), per-language counts (identical, untranslated, ambiguous), common names and their
// fallback, the split (by item, seeded, independent of the languages), the TSV round trip and its
// errors, prompts and answer masks, and exact-match scoring with aligned correctness vectors.
#include "test_util.hpp"

#include <mixmoe/data/iso_task.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_iso_task {

using namespace mixmoe;
using namespace mixmoe::test;
namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// Compiles (msgid, msgstr) pairs into `mo` with msgfmt (a clear failure when msgfmt is missing).
void msgfmt(const std::vector<std::pair<std::string, std::string>>& messages, const fs::path& mo) {
  std::string po =
      "msgid \"\"\nmsgstr \"\"\n\"Content-Type: text/plain; charset=UTF-8\\n\"\n"
      "\"Content-Transfer-Encoding: 8bit\\n\"\n\n";
  for (const auto& [id, str] : messages) po += "msgid \"" + id + "\"\nmsgstr \"" + str + "\"\n\n";
  mixmoe::test::msgfmt(po, mo);
}

constexpr int kFillers = 40;  // extra countries without translations, for the split counts

/// root/usr/share/iso-codes/json + root/usr/share/locale/{de,fr,ja}: 8 countries with names that
/// exercise each rule, 2 with the same English name, kFillers untranslated ones, 2 languages with
/// ISO 639-1 codes (+1 without), 2 currencies.
void make_tree(const fs::path& root) {
  std::string countries =
      R"({"3166-1": [
  {"alpha_2": "DE", "alpha_3": "DEU", "name": "Germany", "numeric": "276", "official_name": "Federal Republic of Germany"},
  {"alpha_2": "FR", "alpha_3": "FRA", "name": "France", "numeric": "250", "official_name": "French Republic"},
  {"alpha_2": "AO", "alpha_3": "AGO", "name": "Angola", "numeric": "024"},
  {"alpha_2": "BO", "alpha_3": "BOL", "name": "Bolivia, Plurinational State of", "common_name": "Bolivia", "numeric": "068"},
  {"alpha_2": "JP", "alpha_3": "JPN", "name": "Japan", "numeric": "392"},
  {"alpha_2": "XA", "alpha_3": "XAA", "name": "Alpha Land", "numeric": "901"},
  {"alpha_2": "XB", "alpha_3": "XBB", "name": "Beta Land", "numeric": "902"},
  {"alpha_2": "XC", "alpha_3": "XCC", "name": "Twin", "numeric": "903"},
  {"alpha_2": "XD", "alpha_3": "XDD", "name": "Twin", "numeric": "904"},
  {"alpha_2": "XE", "alpha_3": "XEE", "name": "Gamma; Delta", "numeric": "905"})";
  for (int i = 0; i < kFillers; ++i) {  // codes ZA..ZZ, YA..YN
    const std::string code{i < 26 ? 'Z' : 'Y', static_cast<char>('A' + i % 26)};
    countries += ",\n  {\"alpha_2\": \"" + code + "\", \"name\": \"Filler " + std::to_string(100 + i) + "\"}";
  }
  countries += "\n]}\n";
  const fs::path json = root / "usr/share/iso-codes/json";
  write_file(json / "iso_3166-1.json", countries);
  write_file(json / "iso_639-2.json", R"({"639-2": [
  {"alpha_2": "de", "alpha_3": "ger", "bibliographic": "ger", "name": "German"},
  {"alpha_3": "gsw", "name": "Swiss German; Alemannic; Alsatian"},
  {"alpha_2": "ca", "alpha_3": "cat", "name": "Catalan; Valencian"}
]})");
  write_file(json / "iso_4217.json", R"({"4217": [
  {"alpha_3": "EUR", "name": "Euro", "numeric": "978"},
  {"alpha_3": "JPY", "name": "Yen", "numeric": "392"}
]})");
  const fs::path loc = root / "usr/share/locale";
  msgfmt({{"Germany", "Deutschland"},
          {"France", "Frankreich"},
          {"Angola", "Angola"},
          {"Bolivia, Plurinational State of", "Bolivien, Plurinationaler Staat"},
          {"Alpha Land", "Land"},
          {"Beta Land", "Land"},
          {"Gamma; Delta", "Gamma-DE; Delta-DE"},
          {"Federal Republic of Germany", "Bundesrepublik Deutschland"}},
         loc / "de/LC_MESSAGES/iso_3166-1.mo");
  msgfmt({{"Germany", "Allemagne"}, {"France", "France"}, {"Bolivia", "Bolivie"}, {"Japan", "Japon"}},
         loc / "fr/LC_MESSAGES/iso_3166-1.mo");
  msgfmt({{"Germany", "ドイツ"}, {"Japan", "日本"}}, loc / "ja/LC_MESSAGES/iso_3166-1.mo");
  msgfmt({{"German", "Deutsch"}, {"Catalan; Valencian", "Katalanisch; Valencianisch"}},
         loc / "de/LC_MESSAGES/iso_639-2.mo");
  msgfmt({{"Euro", "Euro"}, {"Yen", "Yen (Japan)"}}, loc / "de/LC_MESSAGES/iso_4217.mo");
}

/// The tree, built once per process.
const fs::path& tree() {
  static TempDir dir;
  static const bool made = (make_tree(dir.path), true);
  (void)made;
  return dir.path;
}

IsoTaskOptions options() {
  IsoTaskOptions o = IsoTaskOptions::under(tree());
  o.languages = {"de", "fr", "ja"};
  return o;
}

std::map<std::string, std::string> names_of(const IsoTaskSet& s, std::string_view id) {
  return s.items[s.index_of(id)].names;
}

}  // namespace

TEST_CASE("iso task: items, names per language and the build counts", "[iso_task]") {
  const IsoTaskSet s = build_iso_task(options());
  CHECK(s.languages == std::vector<std::string>{"en", "de", "fr", "ja"});
  // 10 + kFillers countries, minus XC and XD (English "Twin" has two codes).
  REQUIRE(s.items.size() == 8 + kFillers);
  for (std::size_t i = 1; i < s.items.size(); ++i) CHECK(s.items[i - 1].id < s.items[i].id);
  CHECK_THROWS(s.index_of("country:XC"));
  CHECK_THROWS(s.index_of("country:XD"));

  using M = std::map<std::string, std::string>;
  CHECK(names_of(s, "country:DE") == M{{"en", "Germany"}, {"de", "Deutschland"}, {"fr", "Allemagne"}, {"ja", "ドイツ"}});
  CHECK(names_of(s, "country:FR") == M{{"en", "France"}, {"de", "Frankreich"}, {"fr", "France"}});
  CHECK(names_of(s, "country:AO") == M{{"en", "Angola"}, {"de", "Angola"}});
  // The common name in English; de has only the full name's translation (the fallback), fr the common name's.
  CHECK(names_of(s, "country:BO") ==
        M{{"en", "Bolivia"}, {"de", "Bolivien, Plurinationaler Staat"}, {"fr", "Bolivie"}});
  CHECK(names_of(s, "country:JP") == M{{"en", "Japan"}, {"fr", "Japon"}, {"ja", "日本"}});
  // "Land" names two items in de: dropped there, the items stay in English.
  CHECK(names_of(s, "country:XA") == M{{"en", "Alpha Land"}});
  CHECK(names_of(s, "country:XB") == M{{"en", "Beta Land"}});
  // First alternative, in English and in the translation.
  CHECK(names_of(s, "country:XE") == M{{"en", "Gamma"}, {"de", "Gamma-DE"}});
  const IsoItem& de = s.items[s.index_of("country:DE")];
  CHECK(de.code == "DE");
  CHECK(de.kind == IsoKind::country);
  CHECK(de.name("ja") == "ドイツ");
  CHECK_THROWS_WITH(s.items[s.index_of("country:AO")].name("fr"),
                    Catch::Contains("country:AO") && Catch::Contains("\"fr\""));

  CHECK(s.stats.at("en").kept == 8 + kFillers);
  CHECK(s.stats.at("en").ambiguous == 2);
  CHECK(s.stats.at("de").kept == 5);
  CHECK(s.stats.at("de").identical == 1);  // Angola
  CHECK(s.stats.at("de").ambiguous == 2);  // Alpha Land, Beta Land
  CHECK(s.stats.at("de").untranslated == 1 + kFillers);  // Japan + fillers
  CHECK(s.stats.at("fr").kept == 4);
  CHECK(s.stats.at("fr").identical == 1);  // France
  CHECK(s.stats.at("fr").untranslated == 4 + kFillers);  // AO XA XB XE + fillers
  CHECK(s.stats.at("ja").kept == 2);
  CHECK(s.stats.at("ja").untranslated == 6 + kFillers);
  // kept + untranslated + ambiguous (+ identical when dropped) = the English items, per language.
  for (const auto& l : {"de", "fr", "ja"}) {
    const auto& st = s.stats.at(l);
    CHECK(st.kept + st.untranslated + st.ambiguous == s.items.size());
  }
}

TEST_CASE("iso task: options (identical dropped, full names, all alternatives, kinds)", "[iso_task]") {
  IsoTaskOptions o = options();
  o.keep_identical = false;
  {
    const IsoTaskSet s = build_iso_task(o);
    CHECK(s.stats.at("de").kept == 4);
    CHECK(s.stats.at("de").identical == 1);
    CHECK(s.stats.at("fr").kept == 3);
    CHECK(!s.items[s.index_of("country:AO")].has("de"));
    CHECK(!s.items[s.index_of("country:FR")].has("fr"));
  }
  o = options();
  o.prefer_common_name = false;
  o.first_alternative = false;
  {
    const IsoTaskSet s = build_iso_task(o);
    CHECK(names_of(s, "country:BO") ==
          std::map<std::string, std::string>{{"en", "Bolivia, Plurinational State of"},
                                             {"de", "Bolivien, Plurinationaler Staat"}});
    CHECK(s.items[s.index_of("country:XE")].name("de") == "Gamma-DE; Delta-DE");
    CHECK(s.items[s.index_of("country:XE")].name("en") == "Gamma; Delta");
  }
  o = options();
  o.languages = {"de", "de"};  // duplicates collapse
  o.kinds = {IsoKind::currency, IsoKind::language};
  {
    const IsoTaskSet s = build_iso_task(o);
    CHECK(s.languages == std::vector<std::string>{"en", "de"});
    std::vector<std::string> ids;
    for (const auto& it : s.items) ids.push_back(it.id);
    // gsw has no alpha_2: not an item.
    CHECK(ids == std::vector<std::string>{"currency:EUR", "currency:JPY", "language:ca", "language:de"});
    CHECK(s.items[s.index_of("currency:JPY")].name("de") == "Yen (Japan)");
    CHECK(s.items[s.index_of("currency:EUR")].name("de") == "Euro");
    CHECK(s.items[s.index_of("language:ca")].name("en") == "Catalan");
    CHECK(s.items[s.index_of("language:ca")].name("de") == "Katalanisch");
    CHECK(s.items[s.index_of("language:de")].code == "de");
    CHECK(s.items[s.index_of("language:de")].kind == IsoKind::language);
    CHECK(s.stats.at("de").identical == 1);  // Euro
  }
  CHECK(parse_iso_kind("currency") == IsoKind::currency);
  CHECK(std::string(iso_kind_name(IsoKind::language)) == "language");
  CHECK_THROWS_WITH(parse_iso_kind("script"), Catch::Contains("unknown kind \"script\""));

  o = options();
  o.languages = {"it"};
  CHECK_THROWS_WITH(build_iso_task(o), Catch::Contains("it/LC_MESSAGES/iso_3166-1.mo") && Catch::Contains("missing"));
  o = options();
  o.languages = {"../de"};
  CHECK_THROWS_WITH(build_iso_task(o), Catch::Contains("bad language"));
  o = IsoTaskOptions::under(tree() / "nowhere");
  CHECK_THROWS_WITH(build_iso_task(o), Catch::Contains("iso_3166-1.json") && Catch::Contains("missing"));
  o = options();
  o.kinds.clear();
  CHECK_THROWS_WITH(build_iso_task(o), Catch::Contains("no kind"));
  o = options();
  o.train_fraction = 0.8;
  o.dev_fraction = 0.3;
  CHECK_THROWS_WITH(build_iso_task(o), Catch::Contains("sum to at most 1"));

  TempDir bad;
  write_file(bad.path / "usr/share/iso-codes/json/iso_3166-1.json", R"({"3166-1": [{"name": "Nowhere"}]})");
  CHECK_THROWS_WITH(build_iso_task(IsoTaskOptions::under(bad.path)), Catch::Contains("has no \"alpha_2\""));
  write_file(bad.path / "usr/share/iso-codes/json/iso_3166-1.json", R"({"3166-1": [{"alpha_2": "AA", "name": "A"},
    {"alpha_2": "AA", "name": "B"}]})");
  CHECK_THROWS_WITH(build_iso_task(IsoTaskOptions::under(bad.path)), Catch::Contains("\"AA\" appears twice"));
  write_file(bad.path / "usr/share/iso-codes/json/iso_3166-1.json", R"({"3166-1": [)");
  CHECK_THROWS_WITH(build_iso_task(IsoTaskOptions::under(bad.path)), Catch::Contains("not valid JSON"));
  write_file(bad.path / "usr/share/iso-codes/json/iso_3166-1.json", R"({"countries": []})");
  CHECK_THROWS_WITH(build_iso_task(IsoTaskOptions::under(bad.path)), Catch::Contains("array \"3166-1\""));
}

TEST_CASE("iso task: the split is by item, seeded, and independent of the languages", "[iso_task]") {
  const IsoTaskSet a = build_iso_task(options());
  const IsoTaskSet b = build_iso_task(options());
  std::map<std::string, std::size_t> n;
  for (std::size_t i = 0; i < a.items.size(); ++i) {
    CHECK(a.items[i].split == b.items[i].split);
    ++n[a.items[i].split];
  }
  // 48 items: round(28.8) = 29 train, round(9.6) = 10 dev, 9 test.
  CHECK(n == std::map<std::string, std::size_t>{{"train", 29}, {"dev", 10}, {"test", 9}});

  IsoTaskOptions o = options();
  o.languages = {"ja"};
  const IsoTaskSet c = build_iso_task(o);
  REQUIRE(c.items.size() == a.items.size());
  for (std::size_t i = 0; i < a.items.size(); ++i) CHECK(a.items[i].split == c.items[i].split);

  o = options();
  o.seed = 1;
  const IsoTaskSet d = build_iso_task(o);
  std::size_t moved = 0;
  for (std::size_t i = 0; i < a.items.size(); ++i) moved += a.items[i].split != d.items[i].split;
  CHECK(moved > 0);

  // assign_iso_splits alone: fractions 1/0 and 0/0.
  IsoTaskSet e = a;
  assign_iso_splits(e, 1.0, 0.0, 5);
  for (const auto& it : e.items) CHECK(it.split == "train");
  assign_iso_splits(e, 0.0, 0.0, 5);
  for (const auto& it : e.items) CHECK(it.split == "test");

  // Queries of a split: every language of an item, items in id order; never an item of another split.
  const auto q = iso_queries(a, "test");
  std::set<std::size_t> items;
  std::size_t expected = 0;
  for (std::size_t i = 0; i < a.items.size(); ++i)
    if (a.items[i].split == "test") expected += a.items[i].names.size();
  CHECK(q.size() == expected);
  for (std::size_t k = 0; k < q.size(); ++k) {
    CHECK(a.items[q[k].item].split == "test");
    if (k) CHECK(q[k - 1].item <= q[k].item);
  }
  const auto qde = iso_queries(a, "", {"de", "en"});
  CHECK(qde.size() == a.items.size() + a.stats.at("de").kept);
  const std::size_t de_at = a.index_of("country:DE");
  std::vector<std::string> de_langs;
  for (const auto& x : qde)
    if (x.item == de_at) de_langs.push_back(x.lang);
  CHECK(de_langs == std::vector<std::string>{"de", "en"});
  CHECK_THROWS_WITH(iso_queries(a, "valid"), Catch::Contains("unknown split"));
  CHECK_THROWS_WITH(iso_queries(a, "", {"it"}), Catch::Contains("\"it\" is not in the task set"));
}

TEST_CASE("iso task: TSV round trip and errors", "[iso_task]") {
  const IsoTaskSet a = build_iso_task(options());
  TempDir dir;
  const fs::path file = dir.path / "iso.tsv";
  write_iso_task_tsv(file, a);
  const std::string text = slurp(file);
  const std::string de_split = a.items[a.index_of("country:DE")].split;
  CHECK(text.starts_with("# languages: en de fr ja\n# id\tlang\tname\tcode\tsplit\n"));
  CHECK(text.find("country:DE\ten\tGermany\tDE\t" + de_split + "\ncountry:DE\tde\tDeutschland\tDE\t" + de_split +
                  "\ncountry:DE\tfr\tAllemagne\tDE\t" + de_split + "\ncountry:DE\tja\tドイツ\tDE\t" + de_split + "\n") !=
        std::string::npos);
  std::size_t rows = 0;
  for (const auto& [l, st] : a.stats) rows += st.kept;
  CHECK(static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n')) == rows + 2);

  const IsoTaskSet b = read_iso_task_tsv(file);
  CHECK(b.languages == a.languages);
  REQUIRE(b.items.size() == a.items.size());
  for (std::size_t i = 0; i < a.items.size(); ++i) {
    CHECK(b.items[i].id == a.items[i].id);
    CHECK(b.items[i].kind == a.items[i].kind);
    CHECK(b.items[i].code == a.items[i].code);
    CHECK(b.items[i].split == a.items[i].split);
    CHECK(b.items[i].names == a.items[i].names);
  }
  for (const auto& l : a.languages) {
    CHECK(b.stats.at(l).kept == a.stats.at(l).kept);
    CHECK(b.stats.at(l).identical == a.stats.at(l).identical);
  }
  // Written again: the same bytes.
  write_iso_task_tsv(dir.path / "again.tsv", b);
  CHECK(slurp(dir.path / "again.tsv") == text);
  const std::string counts = format_iso_task_counts(b);
  CHECK(counts.find("| en | 29 | 10 | 9 | 48 | - |") != std::string::npos);
  CHECK(counts.find("| fr |") != std::string::npos);

  const std::string head = "# languages: en de\n";
  const auto parse = [&](const std::string& body) { return parse_iso_task_tsv(head + body, "t.tsv"); };
  CHECK(parse("country:DE\ten\tGermany\tDE\ttrain\ncountry:DE\tde\tDeutschland\tDE\ttrain\n").items.size() == 1);
  CHECK_THROWS_WITH(parse("country:DE\ten\tGermany\tDE\ttrain\ncountry:DE\tde\tDeutschland\tDE\ttest\n"),
                    Catch::Contains("t.tsv:3") && Catch::Contains("split test here and train before"));
  CHECK_THROWS_WITH(parse("country:DE\ten\tGermany\tDEU\ttrain\n"), Catch::Contains("differs from the id"));
  CHECK_THROWS_WITH(parse("country:DE\tfr\tAllemagne\tDE\ttrain\n"), Catch::Contains("not in the header"));
  CHECK_THROWS_WITH(parse("country:DE\tde\tDeutschland\tDE\ttrain\n"), Catch::Contains("has no English row"));
  CHECK_THROWS_WITH(parse("country:DE\ten\tGermany\tDE\tvalid\n"), Catch::Contains("not train, dev or test"));
  CHECK_THROWS_WITH(parse("planet:MA\ten\tMars\tMA\ttrain\n"), Catch::Contains("unknown kind \"planet\""));
  CHECK_THROWS_WITH(parse("country:DE\ten\tGermany\tDE\ttrain\ncountry:DE\ten\tGermany\tDE\ttrain\n"),
                    Catch::Contains("second \"en\" row"));
  CHECK_THROWS_WITH(parse("country:DE\ten\tGermany\tDE\n"), Catch::Contains("t.tsv:2: expected 5"));
  CHECK_THROWS_WITH(parse_iso_task_tsv("id\tlang\n", "t.tsv"), Catch::Contains("t.tsv:1"));
  CHECK_THROWS_WITH(parse_iso_task_tsv("# languages: de en\n", "t.tsv"), Catch::Contains("start with en"));

  IsoTaskSet tabbed = a;
  tabbed.items[0].names["en"] = "A\tB";
  CHECK_THROWS_WITH(write_iso_task_tsv(dir.path / "bad.tsv", tabbed), Catch::Contains(tabbed.items[0].id));
  CHECK(!fs::exists(dir.path / "bad.tsv"));
}

TEST_CASE("iso task: prompts and training examples", "[iso_task]") {
  const IsoTaskSet s = build_iso_task(options());
  TokenizerOptions to;
  to.vocab_size = 400;
  to.hard_vocab_limit = false;
  to.user_symbols = Tokenizer::translation_symbols({"de", "fr", "ja", "en"});
  const auto iso_syms = iso_task_symbols({IsoKind::country, IsoKind::currency});
  CHECK(iso_syms == std::vector<std::string>{"<2iso3166>", "<2iso4217>"});
  to.user_symbols.insert(to.user_symbols.end(), iso_syms.begin(), iso_syms.end());
  std::vector<std::string> sentences;
  for (const auto& it : s.items)
    for (const auto& [l, n] : it.names) sentences.push_back(n + " " + it.code);
  const Tokenizer tok = Tokenizer::train_in_memory(sentences, to);

  const IsoItem& de = s.items[s.index_of("country:DE")];
  const IsoPrompt p = iso_prompt(tok, de, "fr");
  CHECK(p.answer == "DE");
  REQUIRE(p.ids.size() >= 3);
  CHECK(p.ids.front() == tok.lang_tag_id("iso3166"));
  CHECK(p.ids.back() == tok.sep_id());
  const auto name = tok.encode("Allemagne");
  CHECK(std::vector<index_t>(p.ids.begin() + 1, p.ids.end() - 1) == name);

  const Example ex = make_iso_example(tok, de, "ja");
  const IsoPrompt pj = iso_prompt(tok, de, "ja");
  CHECK(ex.target_begin == static_cast<index_t>(pj.ids.size()));
  CHECK(std::vector<index_t>(ex.ids.begin(), ex.ids.begin() + ex.target_begin) == pj.ids);
  const auto code = tok.encode("DE");
  CHECK(std::vector<index_t>(ex.ids.begin() + ex.target_begin, ex.ids.end() - 1) == code);
  CHECK(ex.ids.back() == tok.eos_id());
  CHECK(tok.decode(std::span<const index_t>(ex.ids).subspan(static_cast<std::size_t>(ex.target_begin),
                                                            code.size())) == "DE");

  // The loss mask: only the code's ids and </s> are targets.
  const Batch b = collate(std::span<const Example>(&ex, 1));
  CHECK(b.target_tokens == static_cast<index_t>(code.size()) + 1);
  const Index* tg = b.targets.data();
  for (index_t t = 0; t + 1 < static_cast<index_t>(ex.ids.size()); ++t) {
    if (t + 1 < ex.target_begin)
      CHECK(tg[t] == -100);
    else
      CHECK(tg[t] == static_cast<Index>(ex.ids[static_cast<std::size_t>(t + 1)]));
  }

  // Other tags; a kind whose tag the tokenizer lacks fails with the tag's name.
  IsoPromptOptions po;
  po.country_tag = "iso4217";
  CHECK(iso_prompt(tok, de, "en", po).ids.front() == tok.lang_tag_id("iso4217"));
  IsoItem lang_item = de;
  lang_item.kind = IsoKind::language;
  CHECK_THROWS_WITH(iso_prompt(tok, lang_item, "en"), Catch::Contains("<2iso639>"));
  CHECK_THROWS_WITH(iso_prompt(tok, s.items[s.index_of("country:AO")], "fr"), Catch::Contains("no name in \"fr\""));

  const auto q = iso_queries(s, "", {"ja"});
  REQUIRE(q.size() == 2);
  const auto exs = iso_examples(tok, s, q);
  REQUIRE(exs.size() == 2);
  CHECK(exs[0].ids == make_iso_example(tok, s.items[q[0].item], "ja").ids);
  CHECK(exs[1].ids == make_iso_example(tok, s.items[q[1].item], "ja").ids);
  const std::vector<IsoQuery> outside{{s.items.size(), "en"}};
  CHECK_THROWS_WITH(iso_examples(tok, s, outside), Catch::Contains("outside"));
}

TEST_CASE("iso task: exact-match scoring and aligned correctness", "[iso_task]") {
  CHECK(normalise_iso_answer("  de\n") == "DE");
  CHECK(normalise_iso_answer("\teur ") == "EUR");
  CHECK(normalise_iso_answer("Ä b") == "Ä B");  // only ASCII letters change case
  CHECK(iso_answer_correct(" de ", "DE"));
  CHECK(iso_answer_correct("ca", "ca"));  // language codes are lower case in ISO 639
  CHECK(!iso_answer_correct("DEU", "DE"));
  CHECK(!iso_answer_correct("D E", "DE"));
  CHECK(!iso_answer_correct("", "DE"));
  CHECK(!iso_answer_correct("DE.", "DE"));

  const IsoTaskSet s = build_iso_task(options());
  const std::size_t de = s.index_of("country:DE"), fr = s.index_of("country:FR"), jp = s.index_of("country:JP");
  const std::vector<IsoQuery> q{{jp, "ja"}, {de, "en"}, {de, "ja"}, {fr, "en"}, {jp, "en"}, {fr, "de"}, {de, "de"}};
  const std::vector<std::string> out{"jp", "DE", "JA", " fr\n", "JPN", "FR", "GE"};
  const IsoScore sc = score_iso_task(s, q, out);
  CHECK(sc.languages == std::vector<std::string>{"en", "de", "ja"});
  std::vector<std::size_t> rows{de, fr, jp};
  std::sort(rows.begin(), rows.end());
  CHECK(sc.items == rows);
  std::vector<std::string> ids;
  for (const std::size_t i : rows) ids.push_back(s.items[i].id);
  CHECK(sc.item_ids == ids);
  // Rows in id order: country:DE, country:FR, country:JP.
  REQUIRE(ids == std::vector<std::string>{"country:DE", "country:FR", "country:JP"});
  CHECK(sc.correct.at("en") == std::vector<std::int8_t>{1, 1, 0});
  CHECK(sc.correct.at("de") == std::vector<std::int8_t>{0, 1, -1});
  CHECK(sc.correct.at("ja") == std::vector<std::int8_t>{0, -1, 1});
  CHECK(sc.asked("en") == 3);
  CHECK(sc.right("en") == 2);
  CHECK(sc.accuracy("en") == Approx(2.0 / 3.0));
  CHECK(sc.accuracy("de") == Approx(0.5));
  CHECK(sc.accuracy("ja") == Approx(0.5));
  CHECK_THROWS_WITH(sc.accuracy("fr"), Catch::Contains("no scores for language \"fr\""));
  CHECK(format_iso_accuracy(sc) ==
        "| language | asked | right | accuracy |\n|---|---:|---:|---:|\n| en | 3 | 2 | 66.7% |\n"
        "| de | 2 | 1 | 50.0% |\n| ja | 2 | 1 | 50.0% |\n");
  const auto j = iso_score_json(sc);
  CHECK(j.dump() ==
        R"({"languages":{"en":{"asked":3,"right":2,"accuracy":0.6666666666666666},"de":{"asked":2,"right":1,"accuracy":0.5},)"
        R"("ja":{"asked":2,"right":1,"accuracy":0.5}},"items":["country:DE","country:FR","country:JP"],)"
        R"("correct":{"en":[1,1,0],"de":[0,1,-1],"ja":[0,-1,1]}})");

  // Errors: sizes, a query twice, a language the item has no name in.
  CHECK_THROWS_WITH(score_iso_task(s, q, std::span<const std::string>(out).first(3)),
                    Catch::Contains("7 queries but 3 outputs"));
  const std::vector<IsoQuery> twice{{de, "en"}, {de, "en"}};
  const std::vector<std::string> two{"DE", "DE"};
  CHECK_THROWS_WITH(score_iso_task(s, twice, two), Catch::Contains("asked twice"));
  const std::vector<IsoQuery> unnamed{{s.index_of("country:AO"), "fr"}};
  CHECK_THROWS_WITH(score_iso_task(s, unnamed, std::span<const std::string>(out).first(1)),
                    Catch::Contains("no name in \"fr\""));
  // Nothing asked: empty tables, not an error.
  const IsoScore none = score_iso_task(s, {}, {});
  CHECK(none.languages.empty());
  CHECK(none.items.empty());
}
}  // namespace test_iso_task
