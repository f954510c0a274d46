// Verbatim spans (data/verbatim.hpp): which parts of a message are kept as they are, the slot
// masking of a source and of its translation, and the restoration of a model's output.
#include <mixmoe/data/tokenizer.hpp>
#include <mixmoe/data/verbatim.hpp>
#include <mixmoe/nn/attention.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/train/translation.hpp>

#include "test_util.hpp"

#include <string>
#include <vector>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_verbatim {

using namespace mixmoe;

namespace {

/// The span texts and kinds find_verbatim gives for `s`.
std::vector<std::pair<std::string, VerbatimKind>> spans_of(const std::string& s, const VerbatimOptions& o = {}) {
  std::vector<std::pair<std::string, VerbatimKind>> out;
  for (const auto& sp : find_verbatim(s, o)) out.emplace_back(s.substr(sp.pos, sp.len), sp.kind);
  return out;
}

using K = VerbatimKind;

}  // namespace

TEST_CASE("find_verbatim: each kind, with the punctuation around a word left out", "[verbatim]") {
  using V = std::vector<std::pair<std::string, VerbatimKind>>;
  CHECK(spans_of("Failed to open StateFile %s") == V{{"StateFile", K::camel_case}, {"%s", K::placeholder}});
  CHECK(spans_of("-K, --key KEY=VALUE override /etc/login.defs defaults") ==
        V{{"-K", K::option}, {"--key", K::option}, {"/etc/login.defs", K::path}});
  CHECK(spans_of("Ubuntu 10.10 'Maverick Meerkat'") == V{{"10.10", K::number}});
  CHECK(spans_of("See <https://example.org/a?b=c>.") == V{{"https://example.org/a?b=c", K::url}});
  CHECK(spans_of("Mail root@example.org or ~/.config/app") ==
        V{{"root@example.org", K::url}, {"~/.config/app", K::path}});
  CHECK(spans_of("Set TIME_STYLE and $HOME (see std::string).") ==
        V{{"TIME_STYLE", K::identifier}, {"$HOME", K::identifier}, {"std::string", K::identifier}});
  // Placeholders inside a word are spans of their own; the word around them is not one.
  CHECK(spans_of("Done(%d) «%1$s»: {name}") ==
        V{{"%d", K::placeholder}, {"%1$s", K::placeholder}, {"{name}", K::placeholder}});
  CHECK(spans_of("<b>Bold</b> text") == V{{"<b>", K::placeholder}, {"</b>", K::placeholder}});
  // Not verbatim: words translations translate.
  CHECK(spans_of("read/write KEY=VALUE e.g. iPhone's 3rd - -- 100% ... x86") == V{});
  CHECK(spans_of("") == V{});
  CHECK(spans_of("   ") == V{});
}

TEST_CASE("find_verbatim: every kind has its switch", "[verbatim]") {
  const std::string s = "Use --force on /tmp/x with %s, 42 FOO_BAR StateFile http://a.b";
  CHECK(spans_of(s).size() == 7);
  VerbatimOptions o;
  o.options = o.paths = o.numbers = o.identifiers = o.camel_case = o.urls = false;
  CHECK(spans_of(s, o) == std::vector<std::pair<std::string, VerbatimKind>>{{"%s", K::placeholder}});
  o.placeholders = false;
  CHECK(spans_of(s, o).empty());
  CHECK(std::string(verbatim_kind_name(K::camel_case)) == "camel_case");
}

TEST_CASE("mask_verbatim: slots in order of appearance, equal spans share one, the rest stay", "[verbatim]") {
  const MaskedText m = mask_verbatim("%s: cannot copy %s to /var/lib/x (--force)");
  CHECK(m.text == "<v1>: cannot copy <v1> to <v2> (<v3>)");
  CHECK(m.spans == std::vector<std::string>{"%s", "/var/lib/x", "--force"});
  const MaskedText two = mask_verbatim("-a -b -c -a", {.slots = 2});
  CHECK(two.text == "<v1> <v2> -c <v1>");
  CHECK(two.spans == std::vector<std::string>{"-a", "-b"});
  const MaskedText none = mask_verbatim("Nothing to keep here.");
  CHECK(none.text == "Nothing to keep here.");
  CHECK(none.spans.empty());
}

TEST_CASE("mask_like: the translation's copies of the spans, on word boundaries, longest first", "[verbatim]") {
  const MaskedText m = mask_verbatim("-K, --key KEY=VALUE override /etc/login.defs defaults");
  CHECK(mask_like("-K, --key SCHLÜSSEL=WERT Die Vorgabewerte in /etc/login.defs überschreiben", m.spans) ==
        "<v1>, <v2> SCHLÜSSEL=WERT Die Vorgabewerte in <v3> überschreiben");
  // "-f" is not inside "--force" nor "x-f"; "42" not inside "1420"; "%s" is everywhere it appears.
  CHECK(mask_like("--force x-f -f", {"-f", "--force"}) == "<v2> x-f <v1>");
  CHECK(mask_like("1420 42 42.", {"42"}) == "1420 <v1> <v1>.");
  CHECK(mask_like("StateFile-Datei, AppStreams", {"StateFile", "AppStream"}) == "<v1>-Datei, AppStreams");
  CHECK(mask_like("%s: Benutzer »%s« existiert", {"%s"}) == "<v1>: Benutzer »<v1>« existiert");
  CHECK(mask_like("%sの%s", {"%s"}) == "<v1>の<v1>");
  CHECK(mask_like("%pB: %p", {"%p"}) == "<v1>B: <v1>");  // a printf conversion ends where it ends
  // A span the translator changed stays as written.
  CHECK(mask_like("$<undefiniert>", {"$<undefined>"}) == "$<undefiniert>");
  CHECK(mask_like("", {"%s"}).empty());
}

TEST_CASE("unmask_verbatim: the round trip, unknown slots removed, other text untouched", "[verbatim]") {
  const std::vector<std::string> sources = {
      "%s: cannot copy %s to /var/lib/x (--force)", "Ubuntu 10.10 'Maverick Meerkat'",
      "Done(%d) «%1$s»: {name} and <b>bold</b>", "Use --force on /tmp/x with %s, 42 FOO_BAR StateFile http://a.b",
      "No spans at all"};
  for (const auto& s : sources) {
    const MaskedText m = mask_verbatim(s);
    CHECK(unmask_verbatim(m.text, m.spans) == s);
    CHECK(mask_like(s, m.spans) == m.text);  // the source as its own translation
  }
  CHECK(unmask_verbatim("<v2> vor <v1>, <v9> weg", {"%s", "%d"}) == "%d vor %s,  weg");
  CHECK(unmask_verbatim("<v> <vx> <v0> <v1", {"%s"}) == "<v> <vx> <v0> <v1");
  CHECK(verbatim_symbols(3) == std::vector<std::string>{"<v1>", "<v2>", "<v3>"});
  CHECK_THROWS_WITH(verbatim_symbols(100), Catch::Contains("outside [0, 99]"));
}

TEST_CASE("verbatim slots are one token each of a tokenizer that has them as user symbols", "[verbatim][tokenizer]") {
  test::TempDir dir("verbatim");
  std::vector<std::string> text;
  for (int i = 0; i < 200; ++i)
    text.push_back(mask_verbatim("Could not open file " + std::to_string(i) + " in /tmp/dir" + std::to_string(i % 7) +
                                 " with --force and %s")
                       .text);
  TokenizerOptions to;
  to.vocab_size = 400;
  to.hard_vocab_limit = false;
  to.user_symbols = Tokenizer::translation_symbols({"de"});
  for (const auto& s : verbatim_symbols(8)) to.user_symbols.push_back(s);
  const Tokenizer tok = Tokenizer::train(text, to, (dir.path / "v.model").string());
  const MaskedText m = mask_verbatim("Copy %s to /etc/x: --force, then 7");
  REQUIRE(m.text == "Copy <v1> to <v2>: <v3>, then <v4>");
  const auto ids = tok.encode(m.text);
  for (int k = 1; k <= 4; ++k) CHECK(std::count(ids.begin(), ids.end(), tok.id(verbatim_symbol(k))) == 1);
  CHECK(unmask_verbatim(tok.decode(ids), m.spans) == "Copy %s to /etc/x: --force, then 7");

  // translate() with verbatim slots, on an untrained model: whatever it writes holds no span more
  // often than the source and no slot token (exact counts at the end of a translation are checked
  // on the decoder itself, test_eval's exact_counts case).
  ModelConfig c;
  c.vocab = tok.vocab_size();
  c.d_model = 16;
  c.layers = 1;
  c.heads = 2;
  c.kv_heads = 1;
  c.d_ff = 32;
  c.init_std = 0.5;
  for (std::uint64_t seed = 1; seed <= 8; ++seed) {
    c.seed = seed;
    const DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> model(c);
    for (const int beam : {1, 3}) {
      const std::string src = "Copy %s to /etc/x with --force and %s";
      const std::string out = translate(model, tok, "de", src, {.max_new_tokens = 60, .beam_size = beam}, 0.0,
                                        VerbatimOptions{});
      INFO("seed " << seed << ", beam " << beam << ": " << out);
      CHECK(out.find("<v") == std::string::npos);
      const auto count = [&](const std::string& x) {
        int n = 0;
        for (auto p = out.find(x); p != std::string::npos; p = out.find(x, p + 1)) ++n;
        return n;
      };
      CHECK(count("%s") <= 2);
      CHECK(count("/etc/x") <= 1);
      CHECK(count("--force") <= 1);
    }
  }
  // A tokenizer without the slots is refused by name.
  TokenizerOptions plain = to;
  plain.user_symbols = Tokenizer::translation_symbols({"de"});
  const Tokenizer no_slots = Tokenizer::train(text, plain, (dir.path / "plain.model").string());
  c.vocab = no_slots.vocab_size();
  const DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> model(c);
  CHECK_THROWS_WITH(translate(model, no_slots, "de", "Copy %s", {}, 2.0, VerbatimOptions{}),
                    Catch::Contains("has no verbatim slot <v1>"));
}

}  // namespace test_verbatim
