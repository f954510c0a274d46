// The data layer: MO reader (msgfmt-compiled catalogs, both byte orders, every truncation, corrupt
// tables), text/TSV readers and writers, cleaning rules, and the corpus builder on a small catalog tree.
#include "test_util.hpp"

#include <mixmoe/data/corpus.hpp>
#include <mixmoe/data/mo_reader.hpp>
#include <mixmoe/data/text_io.hpp>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_data {

using namespace mixmoe;
using namespace mixmoe::test;
namespace fs = std::filesystem;

namespace {

std::string po_header(const std::string& lang, const std::string& charset = "UTF-8",
                      const std::string& plural = "nplurals=2; plural=(n != 1);") {
  return "msgid \"\"\nmsgstr \"\"\n\"Project-Id-Version: t 1\\n\"\n\"Language: " + lang +
         "\\n\"\n\"MIME-Version: 1.0\\n\"\n\"Content-Type: text/plain; charset=" + charset +
         "\\n\"\n\"Content-Transfer-Encoding: 8bit\\n\"\n\"Plural-Forms: " + plural + "\\n\"\n\n";
}

const MoEntry* find_entry(const MoCatalog& c, std::string_view msgid, std::string_view ctx = "") {
  for (const auto& e : c.entries)
    if (e.msgid == msgid && e.context == ctx) return &e;
  return nullptr;
}

const std::string kGermanPo = po_header("de") +
                              "msgid \"File\"\nmsgstr \"Datei\"\n\n"
                              "msgctxt \"menu\"\nmsgid \"Open\"\nmsgstr \"Öffnen\"\n\n"
                              "msgctxt \"verb\"\nmsgid \"Open\"\nmsgstr \"Aufmachen\"\n\n"
                              "msgid \"%d file\"\nmsgid_plural \"%d files\"\nmsgstr[0] \"%d Datei\"\n"
                              "msgstr[1] \"%d Dateien\"\n\n"
                              "msgid \"Line one\\nline two\"\nmsgstr \"Zeile eins\\nZeile zwei\"\n\n"
                              "#, fuzzy\nmsgid \"Fuzzy\"\nmsgstr \"Unscharf\"\n\n"
                              "msgid \"Untranslated\"\nmsgstr \"\"\n";

void check_german(const MoCatalog& c) {
  CHECK(c.language == "de");
  CHECK(c.charset == "UTF-8");
  CHECK(c.plural_forms == "nplurals=2; plural=(n != 1);");
  REQUIRE(c.entries.size() == 5);  // fuzzy and untranslated entries are not compiled by msgfmt
  const MoEntry* file = find_entry(c, "File");
  REQUIRE(file);
  CHECK(file->msgstr == std::vector<std::string>{"Datei"});
  CHECK(!file->is_plural());
  const MoEntry* menu = find_entry(c, "Open", "menu");
  const MoEntry* verb = find_entry(c, "Open", "verb");
  REQUIRE(menu);
  REQUIRE(verb);
  CHECK(menu->msgstr[0] == "Öffnen");
  CHECK(verb->msgstr[0] == "Aufmachen");
  const MoEntry* plural = find_entry(c, "%d file");
  REQUIRE(plural);
  CHECK(plural->msgid_plural == "%d files");
  CHECK(plural->msgstr == std::vector<std::string>{"%d Datei", "%d Dateien"});
  const MoEntry* lines = find_entry(c, "Line one\nline two");
  REQUIRE(lines);
  CHECK(lines->msgstr[0] == "Zeile eins\nZeile zwei");
}

/// A small MO file written by hand: little- or big-endian, with the given strings.
std::string make_mo(const std::vector<std::pair<std::string, std::string>>& strings, bool big_endian) {
  std::string out;
  const auto put = [&](std::uint32_t v) {
    for (int k = 0; k < 4; ++k) {
      const int shift = big_endian ? 24 - 8 * k : 8 * k;
      out += static_cast<char>((v >> shift) & 0xFF);
    }
  };
  const auto n = static_cast<std::uint32_t>(strings.size());
  put(0x950412de);
  put(0);
  put(n);
  put(28);
  put(28 + 8 * n);
  put(0);
  put(28 + 16 * n);
  std::uint32_t at = 28 + 16 * n;
  std::string data;
  std::vector<std::uint32_t> offs;
  for (int table = 0; table < 2; ++table)
    for (const auto& s : strings) {
      const std::string& str = table == 0 ? s.first : s.second;
      offs.push_back(at + static_cast<std::uint32_t>(data.size()));
      data += str;
      data += '\0';
    }
  for (std::uint32_t i = 0; i < 2 * n; ++i) {
    put(static_cast<std::uint32_t>((i < n ? strings[i].first : strings[i - n].second).size()));
    put(offs[i]);
  }
  return out + data;
}

}  // namespace

// ---- MO reader ---------------------------------------------------------------------------------

TEST_CASE("mo: msgfmt catalogs with context and plurals, little- and big-endian", "[data][mo]") {
  TempDir tmp;
  msgfmt(kGermanPo, tmp.path / "le.mo", "--endianness=little");
  msgfmt(kGermanPo, tmp.path / "be.mo", "--endianness=big");
  const MoCatalog le = read_mo(tmp.path / "le.mo");
  const MoCatalog be = read_mo(tmp.path / "be.mo");
  CHECK(!le.big_endian);
  CHECK(be.big_endian);
  check_german(le);
  check_german(be);
  // The bytes differ (byte order) but the catalogs are the same.
  CHECK(read_file(tmp.path / "le.mo") != read_file(tmp.path / "be.mo"));
  CHECK(le.header == be.header);
  CHECK(le.header.find("Language: de") != std::string::npos);
}

TEST_CASE("mo: a hand-built file in both byte orders, and the std::byte overload", "[data][mo]") {
  const std::vector<std::pair<std::string, std::string>> strings = {
      {"", "Content-Type: text/plain; charset=UTF-8\nLanguage: fr\n"},
      {std::string("ctx\x04Save"), "Enregistrer"},
      {std::string("one\0many", 8), std::string("un\0plusieurs", 12)}};
  for (const bool big : {false, true}) {
    const std::string bytes = make_mo(strings, big);
    const MoCatalog c = parse_mo(std::span(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()), "hand.mo");
    CHECK(c.big_endian == big);
    CHECK(c.language == "fr");
    REQUIRE(c.entries.size() == 2);
    CHECK(c.entries[0].context == "ctx");
    CHECK(c.entries[0].msgid == "Save");
    CHECK(c.entries[0].msgstr == std::vector<std::string>{"Enregistrer"});
    CHECK(c.entries[1].msgid == "one");
    CHECK(c.entries[1].msgid_plural == "many");
    CHECK(c.entries[1].msgstr == std::vector<std::string>{"un", "plusieurs"});
  }
}

TEST_CASE("mo: a Latin-1 catalog is converted to UTF-8", "[data][mo]") {
  TempDir tmp;
  // "Größe" and "Schließen" in ISO-8859-1 bytes.
  const std::string po = po_header("de", "ISO-8859-1") + "msgid \"Size\"\nmsgstr \"Gr\xF6\xDF" + "e\"\n\n" +
                         "msgid \"Close\"\nmsgstr \"Schlie\xDF" + "en\"\n";
  msgfmt(po, tmp.path / "latin1.mo");
  const MoCatalog c = read_mo(tmp.path / "latin1.mo");
  CHECK(c.charset == "ISO-8859-1");
  REQUIRE(find_entry(c, "Size"));
  CHECK(find_entry(c, "Size")->msgstr[0] == "Größe");
  CHECK(find_entry(c, "Close")->msgstr[0] == "Schließen");
}

TEST_CASE("mo: every truncation and single-byte corruption parses or throws mixmoe::Error", "[data][mo]") {
  TempDir tmp;
  msgfmt(kGermanPo, tmp.path / "de.mo");
  const std::string full = read_file(tmp.path / "de.mo");
  REQUIRE(full.size() > 100);
  std::size_t parsed = 0, failed = 0;
  for (std::size_t len = 0; len < full.size(); ++len) {
    // A copy of exactly `len` bytes, so ASan sees any read past the end.
    const std::vector<char> prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    try {
      (void)parse_mo(std::string_view(prefix.data(), prefix.size()), "de/test.mo");
      ++parsed;
    } catch (const Error& e) {
      ++failed;
      CHECK(std::string(e.what()).starts_with("[mo] de/test.mo: "));
    }
  }
  // msgfmt puts the strings last: dropping even the final NUL breaks the last string.
  CHECK(parsed == 0);
  CHECK(failed == full.size());
  // Flipping each byte of the header and tables (and some of the strings) never crashes.
  for (std::size_t at = 0; at < full.size(); ++at) {
    for (const unsigned char x : {0x01, 0x80, 0xFF}) {
      std::string bad = full;
      bad[at] = static_cast<char>(static_cast<unsigned char>(bad[at]) ^ x);
      try {
        (void)parse_mo(bad, "de/test.mo");
      } catch (const Error&) {
      }
    }
  }
  MIXMOE_REQUIRE_ERROR(parse_mo(full.substr(0, 20), "de/x.mo"),
                       "[mo] de/x.mo: truncated: the header needs 28 bytes, the file has 20");
  MIXMOE_REQUIRE_ERROR(parse_mo(full.substr(0, full.size() - 1), "de/x.mo"),
                       "truncated or corrupt: translation 5 (9 bytes at byte 456) ends at byte 466 of 465");
  std::string no_nul = full;
  no_nul.back() = 'x';
  MIXMOE_REQUIRE_ERROR(parse_mo(no_nul, "de/x.mo"),
                       "corrupt: translation 5 (9 bytes at byte 456) is not followed by a NUL");
  MIXMOE_REQUIRE_ERROR(parse_mo(full.substr(0, 40), "de/x.mo"),
                       "table of 6 original strings at byte 28 ends at byte 76 of 40");
}

TEST_CASE("mo: bad magic, revision, absurd counts and offsets are named", "[data][mo]") {
  const std::string good = make_mo({{"", "Language: de\n"}, {"a", "b"}}, false);
  REQUIRE(parse_mo(good, "ok.mo").entries.size() == 1);
  std::string bad = good;
  bad[0] = 'X';
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"), "[mo] x.mo: not an MO file: bad magic number");
  MIXMOE_REQUIRE_ERROR(parse_mo(std::string(64, '\0'), "zero.mo"), "bad magic number 0x0");
  bad = good;
  bad[6] = 2;  // major revision 2
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"), "unsupported major revision 2");
  bad = good;
  bad[8] = bad[9] = bad[10] = bad[11] = '\xFF';  // N = 2^32 - 1
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"),
                       "table of 4294967295 original strings at byte 28 ends at byte 34359738388");
  bad = good;
  bad[16] = bad[17] = bad[18] = bad[19] = '\xFF';  // translation table at 2^32 - 1
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"), "table of 2 translations at byte 4294967295");
  bad = good;
  bad[28 + 8 + 4] = '\xF0';  // offset of original string 1 far outside
  bad[28 + 8 + 7] = '\x7F';
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"), "original string 1 (1 bytes at byte 2130706672) ends at byte");
  bad = good;
  bad[28 + 8] = bad[28 + 9] = bad[28 + 10] = bad[28 + 11] =
      '\xFF';  // length 2^32 - 1: offset + length overflows 32 bits
  MIXMOE_REQUIRE_ERROR(parse_mo(bad, "x.mo"), "original string 1 (4294967295 bytes");
  // Invalid UTF-8 in a UTF-8 catalog.
  const std::string bad_utf8 = make_mo({{"", "Content-Type: text/plain; charset=UTF-8\n"}, {"a", "\xC3("}}, false);
  MIXMOE_REQUIRE_ERROR(parse_mo(bad_utf8, "u.mo"), "[mo] u.mo: translation 1: invalid UTF-8 at byte 1");
  const std::string bad_cs = make_mo({{"", "Content-Type: text/plain; charset=NO-SUCH-CHARSET\n"}, {"a", "b"}}, false);
  MIXMOE_REQUIRE_ERROR(parse_mo(bad_cs, "c.mo"), "charset \"NO-SUCH-CHARSET\" is not supported by iconv");
  MIXMOE_REQUIRE_ERROR(read_mo("/nonexistent/dir/x.mo"), "cannot open for reading");
}

// ---- text readers and writers ------------------------------------------------------------------

TEST_CASE("text: UTF-8 validation", "[data][text]") {
  CHECK(is_valid_utf8("plain ASCII"));
  CHECK(is_valid_utf8("Größe 日本語 😀"));
  CHECK(find_invalid_utf8("ab\xC3(") == 2u);           // bad continuation
  CHECK(find_invalid_utf8("\xC0\xAF") == 0u);          // overlong '/'
  CHECK(find_invalid_utf8("x\xED\xA0\x80") == 1u);     // surrogate
  CHECK(find_invalid_utf8("\xF4\x90\x80\x80") == 0u);  // above U+10FFFF
  CHECK(find_invalid_utf8("ok\xE6\x97") == 2u);        // truncated sequence
  CHECK(utf8_length("Größe 日本") == 8u);
}

TEST_CASE("text: lines and parallel TSV with CRLF, BOM, extra columns and errors naming file:line", "[data][text]") {
  CHECK(parse_lines("\xEF\xBB\xBFone\r\ntwo\n\nthree", "m.txt") == std::vector<std::string>{"one", "two", "three"});
  LineReadOptions keep;
  keep.skip_empty = false;
  CHECK(parse_lines("a\n\nb\n", "m.txt", keep) == std::vector<std::string>{"a", "", "b"});
  MIXMOE_REQUIRE_ERROR(parse_lines("ok\nbad \xFF here\n", "m.txt"),
                       "[text] m.txt:2: invalid UTF-8 at byte 5 of the line");

  const auto pairs = parse_parallel_tsv("Hello\tHallo\r\n\nFile\tDatei\tgtk20\tx\n", "c.tsv");
  REQUIRE(pairs.size() == 2);
  CHECK(pairs[0].source == "Hello");
  CHECK(pairs[0].target == "Hallo");  // the CR is gone
  CHECK(pairs[0].line == 1);
  CHECK(pairs[1].extra == std::vector<std::string>{"gtk20", "x"});
  CHECK(pairs[1].line == 3);
  MIXMOE_REQUIRE_ERROR(parse_parallel_tsv("a\tb\nonly one\n", "c.tsv"),
                       "[tsv] c.tsv:2: expected 2 or more tab-separated columns, found 1");
  ParallelTsvOptions strict;
  strict.allow_extra_columns = false;
  MIXMOE_REQUIRE_ERROR(parse_parallel_tsv("a\tb\tc\n", "c.tsv", strict),
                       "c.tsv:1: expected 2 tab-separated columns, found 3");
  MIXMOE_REQUIRE_ERROR(parse_parallel_tsv("a\t\n", "c.tsv"), "c.tsv:1: empty target field");
  MIXMOE_REQUIRE_ERROR(parse_parallel_tsv("a\tb\n\xE6\x97\tc\n", "c.tsv"), "c.tsv:2: invalid UTF-8");
  TsvReadOptions t;
  t.min_columns = 2;
  t.max_columns = 3;
  t.comments = true;
  CHECK(parse_tsv("# comment\na\tb\n", "t.tsv", t).size() == 1);
  MIXMOE_REQUIRE_ERROR(parse_tsv("a\tb\tc\td\n", "t.tsv", t), "expected 2 to 3 tab-separated columns, found 4");
}

TEST_CASE("text: TSV and line writers round-trip; TAB/LF in a field is an error or a space", "[data][text]") {
  TempDir tmp;
  const std::vector<std::vector<std::string>> rows = {{"g", "Größe", "サイズ"}, {"h", "", "x"}};
  write_tsv(tmp.path / "a.tsv", rows);
  CHECK(read_file(tmp.path / "a.tsv") == "g\tGröße\tサイズ\nh\t\tx\n");
  const auto back = read_tsv(tmp.path / "a.tsv");
  REQUIRE(back.size() == 2);
  CHECK(back[0].fields == rows[0]);
  CHECK(back[1].fields == rows[1]);
  MIXMOE_REQUIRE_ERROR(write_tsv(tmp.path / "b.tsv", {{"a", "b"}, {"c", "d\te"}}),
                       "b.tsv: row 2 column 2: field contains a TAB");
  CHECK(!fs::exists(tmp.path / "b.tsv"));
  write_tsv(tmp.path / "b.tsv", {{"a", "line\none\ttab\r"}}, TsvFieldPolicy::replace_with_space);
  CHECK(read_file(tmp.path / "b.tsv") == "a\tline one tab \n");
  MIXMOE_REQUIRE_ERROR(format_tsv_row({"ok", "\xFF"}), "row 1 column 2: invalid UTF-8 at byte 1");
  write_lines(tmp.path / "m.txt", {"a\tb", "c"});
  CHECK(read_lines(tmp.path / "m.txt") == std::vector<std::string>{"a\tb", "c"});
  MIXMOE_REQUIRE_ERROR(write_lines(tmp.path / "n.txt", {"a", "b\nc"}),
                       "n.txt: row 2 column 1: field contains a line feed");
  MIXMOE_REQUIRE_ERROR(read_lines(tmp.path / "missing.txt"), "missing.txt: cannot open for reading");
}

TEST_CASE("text: a U+FEFF starting the first field of a file is refused or a space, since it reads as a BOM",
          "[data][text]") {
  TempDir tmp;
  const std::string bom = "\xEF\xBB\xBF";
  // The reader drops a byte-order mark at the start of the text, so the writer never starts a file with one.
  CHECK(parse_tsv(bom + "x\ty\n", "b.tsv")[0].fields == std::vector<std::string>{"x", "y"});
  MIXMOE_REQUIRE_ERROR(format_tsv_row({bom + "x", "y"}), "row 1 column 1: field starts with U+FEFF");
  MIXMOE_REQUIRE_ERROR(write_tsv(tmp.path / "b.tsv", {{bom + "x", "y"}, {"z", "w"}}),
                       "b.tsv: row 1 column 1: field starts with U+FEFF, which at the start of a file reads back as "
                       "a byte-order mark");
  CHECK(!fs::exists(tmp.path / "b.tsv"));
  MIXMOE_REQUIRE_ERROR(write_lines(tmp.path / "b.txt", {bom + "x"}), "b.txt: row 1 column 1: field starts with U+FEFF");
  CHECK(!fs::exists(tmp.path / "b.txt"));
  // With replace_with_space the mark becomes one space, as a TAB or LF would: what is written reads back.
  write_tsv(tmp.path / "s.tsv", {{bom + "x", "y"}}, TsvFieldPolicy::replace_with_space);
  CHECK(read_file(tmp.path / "s.tsv") == " x\ty\n");
  CHECK(read_tsv(tmp.path / "s.tsv")[0].fields == std::vector<std::string>{" x", "y"});
  write_lines(tmp.path / "s.txt", {bom + bom + "x", bom}, TsvFieldPolicy::replace_with_space);
  CHECK(read_file(tmp.path / "s.txt") == " " + bom + "x\n" + bom + "\n");
  CHECK(read_lines(tmp.path / "s.txt") == std::vector<std::string>{" " + bom + "x", bom});
  // Anywhere else U+FEFF is an ordinary character, written as it is, and every row reads back the same.
  const std::vector<std::vector<std::string>> rows = {{"a", bom + "b"}, {bom + "c", "d" + bom}};
  write_tsv(tmp.path / "o.tsv", rows);
  const auto back = read_tsv(tmp.path / "o.tsv");
  REQUIRE(back.size() == 2);
  CHECK(back[0].fields == rows[0]);
  CHECK(back[1].fields == rows[1]);
  CHECK(format_tsv_row({bom + "c"}, TsvFieldPolicy::error, 2) == bom + "c\n");
  write_lines(tmp.path / "o.txt", {"a", bom + "b"});
  CHECK(read_lines(tmp.path / "o.txt") == std::vector<std::string>{"a", bom + "b"});
}

// ---- cleaning --------------------------------------------------------------------------------

TEST_CASE("corpus: placeholders", "[data][corpus]") {
  CHECK(placeholder_keys("%s of %d (%.1f%%)") == std::vector<std::string>{"%d", "%f", "%s"});  // no precision
  CHECK(placeholder_keys("%2$s: %1$lu") == std::vector<std::string>{"%lu", "%s"});
  CHECK(placeholder_keys("%-10s|%*d|%'lld") == std::vector<std::string>{"%d", "%lld", "%s"});
  CHECK(placeholder_keys("%(name)s and {0} and ${HOME} and <b>x</b> <span weight=\"bold\">") ==
        std::vector<std::string>{"$"
                                 "{HOME}",
                                 "%(name)s", "</b>", "<b>", "<span>", "{0}"});
  CHECK(placeholder_keys("100% sure, <file> and {not closed").empty());
  CHECK(strip_placeholders("%s: %d files") == ":  files");
}

TEST_CASE("corpus: cleaning rules on hand-made pairs", "[data][corpus]") {
  const auto rule = [](std::string_view en, std::string_view tgt) { return clean_pair(en, tgt).rule; };
  CHECK(rule("", "x") == CleanRule::empty);
  CHECK(rule("File", "  \n") == CleanRule::empty);
  CHECK(rule("%s", "%s") == CleanRule::format_only);
  CHECK(rule("%d: %s", "%d : %s") == CleanRule::format_only);
  CHECK(rule("---", "---") == CleanRule::no_letters);
  CHECK(rule("42", "42") == CleanRule::no_letters);
  CHECK(rule("(%s)", "（%s）") == CleanRule::format_only);
  CHECK(rule("Done", "…") == CleanRule::no_letters);
  CHECK(rule("GNU", "GNU") == CleanRule::untranslated);
  CHECK(rule("Cannot open %s", "Kann nicht öffnen") == CleanRule::placeholder_mismatch);
  CHECK(rule("%s of %d", "%2$d von %1$s") == CleanRule::kept);  // reordering keeps the multiset
  CHECK(rule("<b>Bold</b>", "<b>Fett") == CleanRule::placeholder_mismatch);
  CHECK(rule("%d%% done", "%d %% fertig") == CleanRule::kept);
  CHECK(rule("日本", "Japan") == CleanRule::kept);  // letters outside ASCII count
  // Length limits: multi-line messages over 300 code points, any message over 1000.
  const std::string long_line(400, 'a'), longer(1001, 'a');
  CHECK(rule(long_line, long_line + "b") == CleanRule::kept);
  CHECK(rule(long_line + "\nx", "y") == CleanRule::too_long);
  CHECK(rule(longer, "y") == CleanRule::too_long);
  CleaningOptions opt;
  opt.drop_placeholder_mismatch = false;
  CHECK(clean_pair("Cannot open %s", "Öffnen unmöglich", opt).kept());
  // Whitespace is normalised, placeholders are left intact.
  const CleanResult ws =
      clean_pair("  Usage: %s [OPTION]...\n\tList   files ", "Aufruf: %s [OPTION]...\nDateien  auflisten");
  REQUIRE(ws.kept());
  CHECK(ws.en == "Usage: %s [OPTION]... List files");
  CHECK(ws.target == "Aufruf: %s [OPTION]... Dateien auflisten");
}

TEST_CASE("corpus: accelerator markers", "[data][corpus]") {
  const auto strip = [](std::string en, std::string tgt) {
    const bool changed = strip_accelerators(en, tgt);
    return std::make_tuple(changed, en, tgt);
  };
  CHECK(strip("_Open", "Ö_ffnen") == std::make_tuple(true, std::string("Open"), std::string("Öffnen")));
  CHECK(strip("_Open", "開く(_O)") == std::make_tuple(true, std::string("Open"), std::string("開く")));
  CHECK(strip("Save _As", "Enregistrer _sous") ==
        std::make_tuple(true, std::string("Save As"), std::string("Enregistrer sous")));
  CHECK(strip("_Quit", "Beenden") == std::make_tuple(true, std::string("Quit"), std::string("Beenden")));
  CHECK(strip("_File", "文件 (_F)") == std::make_tuple(true, std::string("File"), std::string("文件")));
  // Identifiers kept verbatim in the translation are not accelerators.
  CHECK(!std::get<0>(strip("Set max_connections", "max_connections setzen")));
  CHECK(!std::get<0>(strip("LC_ALL is set", "LC_ALL ist gesetzt")));
  // Two candidates in the English: ambiguous, left alone; '&' is never a marker.
  CHECK(!std::get<0>(strip("_a and _b", "_a und _b x")));
  CHECK(!std::get<0>(strip("&Open", "Ö&ffnen")));
  const CleanResult r = clean_pair("_Open", "_Öffnen");
  CHECK(r.kept());
  CHECK(r.accelerator_stripped);
  CHECK(r.target == "Öffnen");
  CleaningOptions off;
  off.strip_accelerators = false;
  CHECK(clean_pair("_Open", "_Öffnen", off).en == "_Open");
}

// ---- corpus builder ----------------------------------------------------------------------------

namespace {

/// A catalog tree of three packages in two languages: "tools" (train, also an iso_ catalog),
/// "gui" + "gui-data" (one group "gui", test) and "small" (dev).
void make_tree(const fs::path& dir) {
  const auto po = [](const std::string& lang, const std::vector<std::pair<std::string, std::string>>& pairs) {
    std::string s = po_header(lang, "UTF-8", lang == "de" ? "nplurals=2; plural=(n != 1);" : "nplurals=1; plural=0;");
    for (const auto& [id, str] : pairs) s += "msgid \"" + id + "\"\nmsgstr \"" + str + "\"\n\n";
    return s;
  };
  const auto mo = [&](const std::string& pkg, const std::string& lang, const std::string& domain) {
    return dir / pkg / "usr/share/locale" / lang / "LC_MESSAGES" / (domain + ".mo");
  };
  msgfmt(po("de", {{"Cancel", "Abbrechen"},
                   {"Copy file", "Datei kopieren"},
                   {"%s", "%s"},
                   {"GNU", "GNU"},
                   {"Remove %s", "Entfernen"}}) +
             "msgid \"%d byte\"\nmsgid_plural \"%d bytes\"\nmsgstr[0] \"%d Byte\"\nmsgstr[1] \"%d Bytes\"\n",
         mo("tools", "de", "tools"));
  msgfmt(po("ja", {{"Cancel", "キャンセル"}, {"Copy file", "ファイルをコピー"}}), mo("tools", "ja", "tools"));
  msgfmt(po("de", {{"Germany", "Deutschland"}}), mo("tools", "de", "iso_3166-1"));
  msgfmt(po("de", {{"Cancel", "Abbrechen"}, {"_Open", "Ö_ffnen"}, {"Close window", "Fenster schließen"}}),
         mo("gui", "de", "gui"));
  msgfmt(po("de", {{"Close window", "Fenster schließen"}, {"Width", "Breite"}}), mo("gui-data", "de", "gui-props"));
  msgfmt(po("ja", {{"_Open", "開く(_O)"}, {"Width", "幅"}}), mo("gui", "ja", "gui"));
  msgfmt(po("de", {{"Kill process", "Prozess beenden"}, {"Copy file", "Datei kopieren"}}), mo("small", "de", "small"));
  msgfmt(po("fr", {{"Kill process", "Tuer le processus"}}), mo("small", "fr", "small"));  // fr is not requested
  fs::create_symlink("tools.mo", mo("tools", "de", "tools-link"));                        // symbolic links are skipped
  write_file(
      dir / "packages.tsv",
      "# package\tversion\tsha256\ntools\t1.0\taaaa\ngui\t2.0-1\tbbbb\ngui-data\t2.0-1\tcccc\nsmall\t0.1\tdddd\n");
}

CorpusOptions tree_options(const fs::path& dir) {
  CorpusOptions o;
  o.catalog_dir = dir;
  o.languages = {"de", "ja"};
  o.package_groups = {{"gui", "gui"}, {"gui-data", "gui"}};
  o.test_groups = {"gui"};
  o.dev_groups = {"small"};
  o.progress = nullptr;
  return o;
}

std::vector<std::string> pair_strings(const std::vector<CorpusPair>& v) {
  std::vector<std::string> out;
  for (const auto& p : v) out.push_back(p.group + "|" + p.en + "|" + p.target);
  return out;
}

}  // namespace

TEST_CASE("corpus: build_corpus on a small catalog tree: groups, split, overlap, mono, files", "[data][corpus]") {
  TempDir tmp;
  const fs::path cat = tmp.path / "catalogs";
  make_tree(cat);
  const Corpus c = build_corpus(tree_options(cat));

  // Train: tools (de: plural adds "%d bytes"; "%s" format-only, "GNU" untranslated, "Remove %s"
  // placeholder mismatch), plus the iso_ catalog; catalogs sorted by name: iso_3166-1 before tools.
  CHECK(pair_strings(c.train.at("de")) == std::vector<std::string>{"tools|Germany|Deutschland", "tools|%d byte|%d Byte",
                                                                   "tools|%d bytes|%d Bytes", "tools|Cancel|Abbrechen",
                                                                   "tools|Copy file|Datei kopieren"});
  CHECK(pair_strings(c.train.at("ja")) ==
        std::vector<std::string>{"tools|Cancel|キャンセル", "tools|Copy file|ファイルをコピー"});
  // Test: the whole "gui" group (two packages), "Close window" once, "Cancel" dropped (in train).
  CHECK(pair_strings(c.test.at("de")) ==
        std::vector<std::string>{"gui|Close window|Fenster schließen", "gui|Open|Öffnen", "gui|Width|Breite"});
  CHECK(pair_strings(c.test.at("ja")) ==
        std::vector<std::string>{"gui|Width|幅", "gui|Open|開く"});  // msgfmt sorts: 'W' < '_'
  // Dev: "Copy file" occurs in train and is dropped.
  CHECK(pair_strings(c.dev.at("de")) == std::vector<std::string>{"small|Kill process|Prozess beenden"});
  CHECK(c.dev.at("ja").empty());
  // Mono: train targets per language; English from train of all languages, de-duplicated.
  CHECK(c.mono.at("de") ==
        std::vector<std::string>{"Deutschland", "%d Byte", "%d Bytes", "Abbrechen", "Datei kopieren"});
  CHECK(c.mono.at("en") == std::vector<std::string>{"Germany", "%d byte", "%d bytes", "Cancel", "Copy file"});

  const auto& m = c.manifest;
  CHECK(m["counts"]["train"]["de"] == 5);
  CHECK(m["counts"]["test"]["de"] == 3);
  CHECK(m["overlap_dropped"]["test"]["de"] == 1);
  CHECK(m["overlap_dropped"]["dev"]["de"] == 1);
  CHECK(m["duplicates"]["test"]["de"] == 1);
  CHECK(m["cleaning"]["de"]["format_only"] == 1);
  CHECK(m["cleaning"]["de"]["untranslated"] == 1);
  CHECK(m["cleaning"]["de"]["placeholder_mismatch"] == 1);
  CHECK(m["cleaning"]["de"]["plural_added"] == 1);
  CHECK(m["cleaning"]["de"]["accelerator_stripped"] == 1);
  CHECK(m["cleaning"]["de"]["catalogs"] == 5);  // the symbolic link is not read
  CHECK(m["groups"]["gui"]["split"] == "test");
  CHECK(m["groups"]["gui"]["catalogs"] == nlohmann::json({"gui", "gui-props"}));
  CHECK(m["groups"]["small"]["split"] == "dev");
  CHECK(m["groups"]["tools"]["split"] == "train");
  CHECK(m["packages"][1]["version"] == "2.0-1");

  // Written files, read back; a second build writes byte-identical files.
  write_corpus(c, tmp.path / "out1");
  CHECK(read_file(tmp.path / "out1/test.de.tsv") ==
        "gui\tClose window\tFenster schließen\ngui\tOpen\tÖffnen\ngui\tWidth\tBreite\n");
  CHECK(read_file(tmp.path / "out1/mono.ja.txt") == "キャンセル\nファイルをコピー\n");
  const Corpus back = load_corpus(tmp.path / "out1");
  CHECK(back.languages == c.languages);
  for (const auto* s : {"train", "dev", "test"})
    for (const auto& l : c.languages) CHECK(pair_strings(back.pairs(s, l)) == pair_strings(c.pairs(s, l)));
  CHECK(back.mono == c.mono);
  write_corpus(build_corpus(tree_options(cat)), tmp.path / "out2");
  for (const auto& e : fs::directory_iterator(tmp.path / "out1"))
    CHECK(read_file(e.path()) == read_file(tmp.path / "out2" / e.path().filename()));
  CHECK(std::distance(fs::directory_iterator(tmp.path / "out1"), fs::directory_iterator()) == 10);

  // load_corpus checks the files against the manifest.
  write_file(tmp.path / "out2/dev.de.tsv", "small\ta\tb\nsmall\tc\td\n");
  MIXMOE_REQUIRE_ERROR(load_corpus(tmp.path / "out2"), "dev.de.tsv: manifest says 1 pairs, the file has 2");
  write_file(tmp.path / "out2/dev.de.tsv", "small\ta\n");
  MIXMOE_REQUIRE_ERROR(load_corpus(tmp.path / "out2"), "dev.de.tsv:1: expected 3 tab-separated columns, found 2");
  write_file(tmp.path / "out2/manifest.json", "{\"format\": \"other\"}");
  MIXMOE_REQUIRE_ERROR(load_corpus(tmp.path / "out2"), "not a mixmoe corpus manifest");
}

TEST_CASE("corpus: option and catalog errors are named", "[data][corpus]") {
  TempDir tmp;
  const fs::path cat = tmp.path / "catalogs";
  make_tree(cat);
  CorpusOptions o = tree_options(cat);
  o.test_groups = {"gui", "nosuch"};
  MIXMOE_REQUIRE_ERROR(build_corpus(o), "test group \"nosuch\" has no package in");
  o = tree_options(cat);
  o.dev_groups = {"gui"};
  MIXMOE_REQUIRE_ERROR(build_corpus(o), "group \"gui\" is in both test_groups and dev_groups");
  o = tree_options(cat);
  o.languages = {"en"};
  MIXMOE_REQUIRE_ERROR(build_corpus(o), "bad language \"en\"");
  o = tree_options(tmp.path / "empty");
  MIXMOE_REQUIRE_ERROR(build_corpus(o), "packages.tsv: missing (run scripts/fetch-catalogs.sh");
  // A corrupt catalog names the package, language and file.
  write_file(cat / "small/usr/share/locale/de/LC_MESSAGES/small.mo", "garbage that is long enough to have a header");
  MIXMOE_REQUIRE_ERROR(build_corpus(tree_options(cat)), "[mo] small/de/small.mo: not an MO file");
  fs::remove_all(cat / "small");
  MIXMOE_REQUIRE_ERROR(build_corpus(tree_options(cat)), "small: missing package directory");
}
}  // namespace test_data
