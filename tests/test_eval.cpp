// Evaluation: BLEU and chrF against hand-worked examples and published sacreBLEU values;
// greedy decoding and beam search against full-forward references and exhaustive search.
#include "test_util.hpp"

#include <mixmoe/eval/bleu.hpp>
#include <mixmoe/eval/chrf.hpp>
#include <mixmoe/eval/decode.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/hash_router.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>

#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_eval {

using namespace mixmoe;
using namespace mixmoe::test;
using Strings = std::vector<std::string>;

// ---------------------------------------------------------------------------------------------
// BLEU
// ---------------------------------------------------------------------------------------------

TEST_CASE("13a tokenisation: punctuation, numbers, quotes, dashes, skipped markers", "[eval][bleu]") {
  // " Hello, world! ": '!' always splits (first rule); ',' after a non-digit splits (second rule)
  REQUIRE(tokenize_13a("Hello, world!") == Strings{"Hello", ",", "world", "!"});
  // '$' splits; "3,000.50" keeps its comma and period (digits on both sides); "m." splits;
  // the dash after the digit 5 splits, the comma/period rules leave "2.5" whole
  REQUIRE(tokenize_13a("It costs $3,000.50 or 2.5-3 km.") ==
          Strings{"It", "costs", "$", "3,000.50", "or", "2.5", "-", "3", "km", "."});
  // a period before a digit splits when a non-digit precedes it; after a digit it splits when a
  // non-digit follows
  REQUIRE(tokenize_13a("a.1 1.a") == Strings{"a", ".", "1", "1", ".", "a"});
  // &quot; and &amp; are unescaped first, then '"' and '&' split; the apostrophe does not
  REQUIRE(tokenize_13a("He said &quot;don't&quot; &amp; left.") ==
          Strings{"He", "said", "\"", "don't", "\"", "&", "left", "."});
  // a dash between letters stays; between digits it splits
  REQUIRE(tokenize_13a("well-known 1990-2000") == Strings{"well-known", "1990", "-", "2000"});
  // <skipped> vanishes, "-\n" joins the lines, other newlines are spaces
  REQUIRE(tokenize_13a("data-\nbase<skipped> next\nline") == Strings{"database", "next", "line"});
  // "e.g." : each period follows a letter
  REQUIRE(tokenize_13a("e.g.") == Strings{"e", ".", "g", "."});
  // code points, not bytes: umlauts stay inside words; a no-break space separates like Python's split
  REQUIRE(tokenize_13a("Grüße,\xC2\xA0Jürgen.") == Strings{"Grüße", ",", "Jürgen", "."});
  // the other tokenizers
  REQUIRE(bleu_tokens("Hello, world!", {.tokenize = BleuTokenize::none}) == Strings{"Hello,", "world!"});
  REQUIRE(bleu_tokens("猫が 好き", {.tokenize = BleuTokenize::character}) == Strings{"猫", "が", "好", "き"});
  REQUIRE(bleu_tokens("The CAT Ärger", {.lowercase = true}) == Strings{"the", "cat", "ärger"});
  REQUIRE(bleu_tokenize_from_name("char") == BleuTokenize::character);
  MIXMOE_REQUIRE_ERROR(bleu_tokenize_from_name("intl"), "[bleu] unknown tokenizer \"intl\" (known: 13a, none, char)");
}

TEST_CASE("BLEU: perfect match, no overlap, brevity penalty with exp smoothing", "[eval][bleu]") {
  // identical: every precision 100, BP 1
  auto s = corpus_bleu({"the cat sat on the mat"}, {{"the cat sat on the mat"}});
  REQUIRE(s.score == Approx(100.0));
  REQUIRE(s.format() == "BLEU = 100.00 100.0/100.0/100.0/100.0 (BP = 1.000 ratio = 1.000 hyp_len = 6 ref_len = 6)");

  // no common token: sacreBLEU returns 0 before any smoothing, precisions all 0
  s = corpus_bleu({"a b c d"}, {{"e f g h"}});
  REQUIRE(s.score == 0.0);
  REQUIRE(s.format() == "BLEU = 0.00 0.0/0.0/0.0/0.0 (BP = 1.000 ratio = 1.000 hyp_len = 4 ref_len = 4)");

  // hyp "the cat the dog" (4 tokens), ref "the cat sat on the mat" (6 tokens)
  //   1-grams: the x2 (ref has 2), cat, dog -> 3 of 4
  //   2-grams: "the cat" matches; "cat the", "the dog" do not -> 1 of 3
  //   3-grams: 0 of 2 -> exp smoothing, first zero order: 1 / (2 * 2) = 1/4
  //   4-grams: 0 of 1 -> second zero order: 1 / (4 * 1) = 1/4
  //   BP = exp(1 - 6/4) = exp(-0.5)
  const double expected = 100 * std::exp(-0.5) * std::pow(3.0 / 4 * 1.0 / 3 * 1.0 / 4 * 1.0 / 4, 0.25);
  s = corpus_bleu({"the cat the dog"}, {{"the cat sat on the mat"}});
  REQUIRE(s.score == Approx(expected).epsilon(1e-12));
  REQUIRE(s.bp == Approx(std::exp(-0.5)));
  REQUIRE(s.stats.matches == std::vector<std::int64_t>{3, 1, 0, 0});
  REQUIRE(s.stats.totals == std::vector<std::int64_t>{4, 3, 2, 1});
  REQUIRE(s.format() == "BLEU = 21.44 75.0/33.3/25.0/25.0 (BP = 0.607 ratio = 0.667 hyp_len = 4 ref_len = 6)");
}

TEST_CASE("BLEU: clipping of repeated n-grams", "[eval][bleu]") {
  // hyp: "the" x7, ref "the cat is on the mat": "the" is clipped to the 2 of the reference
  //   p1 = 2/7; 2-, 3-, 4-grams ("the the"...) never match: 1/(2*6), 1/(4*5), 1/(8*4); hyp longer: BP 1
  const auto s = corpus_bleu({"the the the the the the the"}, {{"the cat is on the mat"}});
  REQUIRE(s.stats.matches == std::vector<std::int64_t>{2, 0, 0, 0});
  REQUIRE(s.score == Approx(100 * std::pow(2.0 / 7 / 12 / 20 / 32, 0.25)).epsilon(1e-12));
  REQUIRE(s.bp == 1.0);
  REQUIRE(s.format() == "BLEU = 7.81 28.6/8.3/5.0/3.1 (BP = 1.000 ratio = 1.167 hyp_len = 7 ref_len = 6)");
}

TEST_CASE("BLEU: several references, closest reference length", "[eval][bleu]") {
  // hyp "the cat is on the mat"; refs "the cat sat on the mat", "there is a cat on the mat"
  //   1-grams: the x2 (max over refs 2), cat, is (ref 2), on, mat -> 6/6
  //   2-grams: "the cat", "on the", "the mat" match; "cat is", "is on" not -> 3/5
  //   3-grams: only "on the mat" -> 1/4;  4-grams: none of 3 -> exp: 1/(2*3)
  //   closest reference length: 6 (|6-6| = 0) -> BP 1
  const auto multi =
      corpus_bleu({"the cat is on the mat"}, {{"the cat sat on the mat"}, {"there is a cat on the mat"}});
  REQUIRE(multi.stats.matches == std::vector<std::int64_t>{6, 3, 1, 0});
  REQUIRE(multi.ref_len == 6);
  REQUIRE(multi.score == Approx(100 * std::pow(1.0 * 3 / 5 / 4 / 6, 0.25)).epsilon(1e-12));
  // with the first reference alone "is" does not match: 5/6
  const auto single = corpus_bleu({"the cat is on the mat"}, {{"the cat sat on the mat"}});
  REQUIRE(single.score == Approx(100 * std::pow(5.0 / 6 * 3 / 5 / 4 / 6, 0.25)).epsilon(1e-12));
  // hyp length 6 between refs of 5 and 7: a tie, the shorter reference counts
  REQUIRE(bleu_segment_stats("a b c d e f", {"a b c d e", "a b c d e f g"}).ref_len == 5);
  // corpus statistics add up: ref_len and hyp_len are sums
  const auto two = corpus_bleu({"a b", "c d e"}, {{"a b c", "c d"}});
  REQUIRE(two.hyp_len == 5);
  REQUIRE(two.ref_len == 5);
}

TEST_CASE("sentence BLEU: effective order; lowercase; char tokenizer", "[eval][bleu]") {
  // hyp "the cat", ref "the cat sat": p1 = 2/2, p2 = 1/1, no 3- or 4-grams in the hypothesis
  //   sentence BLEU (effective order): exp((log 100 + log 100) / 2) * BP, BP = exp(1 - 3/2)
  REQUIRE(sentence_bleu("the cat", {"the cat sat"}).score == Approx(100 * std::exp(-0.5)).epsilon(1e-12));
  //   corpus BLEU (4 orders): the missing orders count as log 0 -> 0
  REQUIRE(corpus_bleu({"the cat"}, {{"the cat sat"}}).score == Approx(0.0).margin(1e-12));
  // "cat the" vs "the cat": p1 = 1, p2 = exp smoothing 1/(2*1): sqrt(100 * 50)
  REQUIRE(sentence_bleu("cat the", {"the cat"}).score == Approx(std::sqrt(100.0 * 50.0)).epsilon(1e-12));
  // lowercase
  REQUIRE(sentence_bleu("The Cat", {"the cat"}).score == 0.0);
  REQUIRE(sentence_bleu("The Cat", {"the cat"}, {.lowercase = true, .effective_order = true}).score == Approx(100.0));
  // characters: hyp 猫が好き (4), ref 猫が大好き (5): 4/4; 猫が, 好き of 3; 0 of 2 -> 1/(2*2); 0 of 1 -> 1/(4*1)
  const double chars = 100 * std::exp(1 - 5.0 / 4) * std::pow(1.0 * 2 / 3 / 4 / 4, 0.25);
  REQUIRE(
      sentence_bleu("猫が好き", {"猫が大好き"}, {.tokenize = BleuTokenize::character, .effective_order = true}).score ==
      Approx(chars).epsilon(1e-12));
  REQUIRE(sentence_bleu("猫が好き", {"猫が大好き"}).score == 0.0);  // 13a: one token each, no match
}

TEST_CASE("BLEU: published sacreBLEU 2.x values", "[eval][bleu]") {
  // the example of sacreBLEU's README, and values of its test suite
  const Strings sys{"The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."};
  const std::vector<Strings> refs{{"The dog bit the man.", "It was not unexpected.", "The man bit him first."},
                                  {"The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."}};
  const auto s = corpus_bleu(sys, refs);
  REQUIRE(s.format() == "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)");
  REQUIRE(s.score == Approx(48.530827).margin(1e-6));
  REQUIRE(corpus_bleu(sys, refs, {.tokenize = BleuTokenize::none}).score == Approx(49.1919566).margin(1e-6));
  REQUIRE(corpus_bleu(sys, refs, {.smooth = BleuSmooth::none}).score == Approx(48.530827).margin(1e-6));
  const std::pair<int, const char*> by_order[] = {{1, "77.65"}, {2, "60.50"}, {3, "53.93"}, {5, "46.14"}, {6, "43.28"}};
  for (auto [order, text] : by_order) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%.2f", corpus_bleu(sys, refs, {.max_ngram_order = order}).score);
    REQUIRE(std::string(buf) == text);
  }
  REQUIRE(corpus_bleu({"", "", ""}, refs).score == 0.0);
  // one missing reference (an empty string): the README's variable-reference example
  auto refs_var = refs;
  refs_var[0][0] = "";
  REQUIRE(corpus_bleu(sys, refs_var).format() ==
          "BLEU = 29.44 82.4/42.9/27.3/12.5 (BP = 0.889 ratio = 0.895 hyp_len = 17 ref_len = 19)");
  // raw_corpus_bleu of the test suite: tokenizer none, floor smoothing 0.01, effective order
  const BleuOptions raw{
      .tokenize = BleuTokenize::none, .smooth = BleuSmooth::floor, .smooth_value = 0.01, .effective_order = true};
  REQUIRE(corpus_bleu({"this is a fest"}, {{"this is a test"}}, raw).score == Approx(22.3606797749979).margin(1e-8));
  REQUIRE(corpus_bleu({"test"}, {{"a test"}}, raw).score == Approx(36.78794411714425).margin(1e-8));
  REQUIRE(corpus_bleu({"a little test"}, {{"a test"}}, raw).score == Approx(3.218297948685433).margin(1e-8));
  auto raw_floor = raw;
  raw_floor.smooth_value = -1;  // the floor method's default, 0.1
  const auto st = corpus_bleu({"am I am a character sequence"}, {{"I am a symbol string sequence a a"}}, raw_floor);
  REQUIRE(st.stats.matches == std::vector<std::int64_t>{4, 2, 1, 0});
  REQUIRE(st.stats.totals == std::vector<std::int64_t>{6, 5, 4, 3});
  REQUIRE(st.score == Approx(15.55722182).margin(1e-6));
}

TEST_CASE("BLEU and chrF input errors", "[eval][bleu][chrf][errors]") {
  MIXMOE_REQUIRE_ERROR(corpus_bleu({"a", "b"}, {{"a"}}), "[bleu] reference stream 0 has 1 segments, the hypotheses 2");
  MIXMOE_REQUIRE_ERROR(corpus_bleu({"a"}, {}), "[bleu] no reference stream");
  MIXMOE_REQUIRE_ERROR(corpus_bleu({"ok", "a\xff"}, {{"ok", "a"}}),
                       "[bleu] hypothesis of segment 1: invalid UTF-8 at byte 1 (byte 255 cannot start a character)");
  MIXMOE_REQUIRE_ERROR(sentence_bleu("a", {"b\xC3"}),
                       "[bleu] reference 0 of segment 0: invalid UTF-8 at byte 1 (the text");
  MIXMOE_REQUIRE_ERROR(corpus_bleu({"a"}, {{"a"}}, {.max_ngram_order = 0}),
                       "[bleu] max_ngram_order must be at least 1");
  MIXMOE_REQUIRE_ERROR(corpus_chrf({"a"}, {{"a", "b"}}), "[chrf] reference stream 0 has 2 segments, the hypotheses 1");
  MIXMOE_REQUIRE_ERROR(sentence_chrf("\xE3\x81", {"a"}), "[chrf] hypothesis of segment 0: invalid UTF-8 at byte 0");
  MIXMOE_REQUIRE_ERROR(sentence_chrf("a", {"a"}, {.char_order = 0}), "[chrf] orders must be >= 0 and not both 0");
}

// ---------------------------------------------------------------------------------------------
// chrF
// ---------------------------------------------------------------------------------------------

namespace {

/// chrF from per-order (P_n, R_n) of the effective orders: F-beta of the mean P and mean R.
double chrf_of(const std::vector<std::pair<double, double>>& pr, double beta = 2) {
  double p = 0, r = 0;
  for (auto [pn, rn] : pr) p += pn, r += rn;
  p /= static_cast<double>(pr.size());
  r /= static_cast<double>(pr.size());
  return 100 * (1 + beta * beta) * p * r / (beta * beta * p + r);
}

}  // namespace

TEST_CASE("chrF: hand-worked examples on code points", "[eval][chrf]") {
  // identical text, and text equal up to whitespace (removed before counting): 100
  REQUIRE(sentence_chrf("Niemand hat die Absicht", {"Niemand hat die Absicht"}).score == Approx(100.0));
  REQUIRE(corpus_chrf({"a b c"}, {{"abc"}}).score == Approx(100.0));
  REQUIRE(sentence_chrf("abc", {"xyz"}).score == 0.0);

  // German, 2-byte ü and ß: hyp "Grüße" (5 code points) is a prefix of ref "Grüßen" (6)
  //   orders 1..5: every hyp n-gram matches: P_n = 1; R_n = (6-n)/(7-n) = 5/6, 4/5, 3/4, 2/3, 1/2
  //   order 6: the hypothesis has no 6-gram -> not an effective order
  auto s = sentence_chrf("Grüße", {"Grüßen"});
  REQUIRE(s.stats.counts == std::vector<std::int64_t>{5, 6, 5, 4, 5, 4, 3, 4, 3, 2, 3, 2, 1, 2, 1, 0, 1, 0});
  REQUIRE(s.score ==
          Approx(chrf_of({{1, 5.0 / 6}, {1, 4.0 / 5}, {1, 3.0 / 4}, {1, 2.0 / 3}, {1, 1.0 / 2}})).epsilon(1e-12));
  REQUIRE(s.format() == "chrF2 = 75.37");  // 100 * 5 * 0.71 / (4 + 0.71)

  // Japanese, 3-byte characters: hyp 猫が好き (4), ref 猫が大好き (5)
  //   1: 4 of 4 hyp, 4 of 5 ref;  2: 猫が, 好き: 2 of 3, 2 of 4;  3: 0 of 2, 0 of 3;  4: 0 of 1, 0 of 2
  s = sentence_chrf("猫が好き", {"猫が大好き"});
  REQUIRE(s.score == Approx(chrf_of({{1, 4.0 / 5}, {2.0 / 3, 2.0 / 4}, {0, 0}, {0, 0}})).epsilon(1e-12));

  // hyp n-grams of an order the reference lacks are not counted: "abcdefg" vs "ab"
  s = sentence_chrf("abcdefg", {"ab"});
  REQUIRE(s.stats.counts[3 * 2] == 0);  // order 3: hyp count 0 (the reference has no 3-gram)
  REQUIRE(s.score == Approx(chrf_of({{2.0 / 7, 1.0}, {1.0 / 6, 1.0}})).epsilon(1e-12));

  // several references: the reference with the best segment F-score ("abd") supplies the statistics
  //   "abc" vs "abd": 1: 2/3, 2/3; 2: "ab": 1/2, 1/2; 3: 0 of 1, 0 of 1
  s = sentence_chrf("abc", {"xyz", "abd"});
  REQUIRE(s.score == Approx(chrf_of({{2.0 / 3, 2.0 / 3}, {0.5, 0.5}, {0, 0}})).epsilon(1e-12));
  REQUIRE(s.stats.counts == sentence_chrf("abc", {"abd"}).stats.counts);

  // corpus level sums the counts first: ("a" | "a"), ("b" | "c"): order 1: 2 hyp, 2 ref, 1 match;
  // orders 2..6: no reference n-grams, so they are not effective orders -> P = R = 1/2
  const auto c = corpus_chrf({"a", "b"}, {{"a", "c"}});
  REQUIRE(c.stats.counts[0] == 2);
  REQUIRE(c.stats.counts[1] == 2);
  REQUIRE(c.stats.counts[2] == 1);
  REQUIRE(c.score == Approx(50.0));
  // segments of different lengths: ("abcd" | "abcd"), ("x" | "y")
  const auto c2 = corpus_chrf({"abcd", "x"}, {{"abcd", "y"}});
  //   order 1: hyp 5, ref 5, match 4; orders 2-4: all of "abcd"'s 3 + 2 + 1 n-grams match; 5, 6: none
  REQUIRE(c2.score == Approx(chrf_of({{4.0 / 5, 4.0 / 5}, {1, 1}, {1, 1}, {1, 1}})).epsilon(1e-12));
}

TEST_CASE("chrF++: word n-grams after the punctuation split", "[eval][chrf]") {
  // hyp "the cat." ref "the cat sat.", char order 2, word order 2
  //   chars "thecat." vs "thecatsat.": 1: 7 of 7, 7 of 10;  2: 6 of 6, 6 of 9 ("at" x1 of 2, "t." matches)
  //   words [the, cat, .] vs [the, cat, sat, .]: 1: 3 of 3, 3 of 4;  2: "the cat": 1 of 2, 1 of 3
  const auto s = sentence_chrf("the cat.", {"the cat sat."}, {.char_order = 2, .word_order = 2});
  REQUIRE(s.stats.counts == std::vector<std::int64_t>{7, 10, 7, 6, 9, 6, 3, 4, 3, 2, 3, 1});
  REQUIRE(s.score == Approx(chrf_of({{1, 7.0 / 10}, {1, 6.0 / 9}, {1, 3.0 / 4}, {0.5, 1.0 / 3}})).epsilon(1e-12));
  REQUIRE(s.format() == "chrF2++ = 65.16");
  // one punctuation mark comes off the end, else off the start: "(hi)" -> "(hi" ")", "(hi" -> "(" "hi"
  //   chars "(hi)" both: P = R = 1; words [(hi, )] vs [(, hi, )]: ")" matches: P = 1/2, R = 1/3
  const auto p = sentence_chrf("(hi)", {"(hi )"}, {.char_order = 1, .word_order = 1});
  REQUIRE(p.stats.counts == std::vector<std::int64_t>{4, 4, 4, 2, 3, 1});
  REQUIRE(p.score == Approx(chrf_of({{1, 1}, {0.5, 1.0 / 3}})).epsilon(1e-12));
}

TEST_CASE("chrF: published sacreBLEU 2.x values", "[eval][chrf]") {
  const Strings sys{"The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."};
  const std::vector<Strings> refs{{"The dog bit the man.", "It was not unexpected.", "The man bit him first."},
                                  {"The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."}};
  REQUIRE(corpus_chrf(sys, refs).format() == "chrF2 = 59.73");
  // values of sacreBLEU's test suite (beta 3)
  const ChrfOptions b3{.beta = 3};
  REQUIRE(corpus_chrf({"aa"}, {{"ab"}}, b3).score == Approx(25.0).margin(1e-4));
  REQUIRE(corpus_chrf({"aa"}, {{"ab"}}, {.beta = 3, .eps_smoothing = true}).score == Approx(8.3333).margin(1e-4));
  REQUIRE(corpus_chrf({"a"}, {{"a"}}, {.beta = 3, .eps_smoothing = true}).score == Approx(16.6667).margin(1e-4));
  REQUIRE(corpus_chrf({"Die Beziehung zwischen Obama und Netanjahu ist nicht gerade freundlich."},
                      {{"Das Verhältnis zwischen Obama und Netanyahu ist nicht gerade freundschaftlich."}},
                      {.beta = 3, .whitespace = true})
              .score == Approx(67.3481606).margin(1e-4));
  REQUIRE(corpus_chrf({" Die    Beziehung zwischen  Obama und Netanjahu ist nicht gerade  freundlich. "},
                      {{"Das Verhältnis zwischen Obama und Netanyahu ist nicht gerade freundschaftlich."}},
                      {.beta = 3, .eps_smoothing = true})
              .score == Approx(64.1302698).margin(1e-4));
  REQUIRE(sentence_chrf("Co nás nejvíc trápí, protože lékaři si vybírají, kdo bude žít a kdo zemře.",
                        {"Nejvíce smutní jsme z toho, že musíme rozhodovat o tom, kdo bude žít a kdo zemře."},
                        {.eps_smoothing = true})
              .score == Approx(39.14078509).margin(1e-4));
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

namespace {

ModelConfig decode_config(index_t vocab) {
  ModelConfig c;
  c.vocab = vocab;
  c.d_model = 16;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.d_ff = 32;
  c.seed = 11;
  c.init_std = 0.6;  // peaked next-token distributions
  c.moe.experts_per_group = {4};
  c.moe.top_k = 1;
  c.moe.expert_hidden = 8;
  return c;
}

/// Log-probabilities of the next token after `seq`, from a full forward without cache.
template <class Model>
std::vector<double> next_log_probs(const Model& model, const std::vector<Index>& seq) {
  no_grad ng;
  const auto ids = Tensor<Index>::from(seq, {1, static_cast<index_t>(seq.size())});
  const auto logits = model(ids).value();
  const index_t v = logits.size(2), t = logits.size(1);
  std::vector<double> row(static_cast<std::size_t>(v));
  double m = -1e300, z = 0;
  for (index_t i = 0; i < v; ++i) m = std::max(m, static_cast<double>(logits(0, t - 1, i)));
  for (index_t i = 0; i < v; ++i) z += std::exp(static_cast<double>(logits(0, t - 1, i)) - m);
  for (index_t i = 0; i < v; ++i)
    row[static_cast<std::size_t>(i)] = static_cast<double>(logits(0, t - 1, i)) - m - std::log(z);
  return row;
}

/// Greedy decoding that re-runs the whole sequence each step (no cache); bans seen tokens when
/// ban_seen (no_repeat_ngram = 1).
template <class Model>
Hypothesis reference_greedy(const Model& model, std::vector<Index> seq, int max_new, const std::vector<Index>& stops,
                            bool ban_seen = false) {
  Hypothesis h;
  for (int step = 0; step < max_new; ++step) {
    auto lp = next_log_probs(model, seq);
    if (ban_seen)
      for (Index t : h.tokens) lp[static_cast<std::size_t>(t)] = -INFINITY;
    const auto best = static_cast<Index>(std::max_element(lp.begin(), lp.end()) - lp.begin());
    h.tokens.push_back(best);
    h.log_prob += lp[static_cast<std::size_t>(best)];
    seq.push_back(best);
    if (std::find(stops.begin(), stops.end(), best) != stops.end()) {
      h.finished = true;
      break;
    }
  }
  return h;
}

/// Every continuation of `prompt` that ends with the stop id 0 or reaches `max_new` tokens, with its
/// log-probability from full forwards: tokens -> (log_prob, finished).
template <class Model>
std::map<std::vector<Index>, std::pair<double, bool>> all_continuations(const Model& model,
                                                                        const std::vector<Index>& prompt,
                                                                        Index vocab, std::size_t max_new) {
  std::map<std::vector<Index>, std::pair<double, bool>> all;
  std::function<void(const std::vector<Index>&, double)> expand = [&](const std::vector<Index>& gen, double lp) {
    std::vector<Index> seq = prompt;
    seq.insert(seq.end(), gen.begin(), gen.end());
    const auto next = next_log_probs(model, seq);
    for (Index v = 0; v < vocab; ++v) {
      auto g = gen;
      g.push_back(v);
      const double l = lp + next[static_cast<std::size_t>(v)];
      if (v == 0 || g.size() == max_new)
        all[g] = {l, v == 0};
      else
        expand(g, l);
    }
  };
  expand({}, 0.0);
  return all;
}

using DenseLMf = DecoderLM<CausalSelfAttention<float>, SwiGLU<float>>;
using DenseLMd = DecoderLM<CausalSelfAttention<double>, SwiGLU<double>>;
using HashLMf = DecoderLM<CausalSelfAttention<float>, MixedMoE<HashRouting, ExpertGroup<SwiGLU<float>, tag::generic>>>;

}  // namespace

TEST_CASE("KVCache::reorder keeps the chosen batch rows", "[eval][decode]") {
  DenseLMd model(decode_config(17));
  no_grad ng;
  DecodeState<double> state;
  (void)model(Tensor<Index>::from(std::vector<Index>{1, 2, 3, 4, 5, 6}, {2, 3}), &state);  // rows [1 2 3], [4 5 6]
  state.reorder({1, 0, 1});
  const auto step = model(Tensor<Index>::from(std::vector<Index>{7, 8, 9}, {3, 1}), &state).value();  // (3, 1, V)
  const std::vector<std::vector<Index>> full{{4, 5, 6, 7}, {1, 2, 3, 8}, {4, 5, 6, 9}};
  for (std::size_t r = 0; r < 3; ++r) {
    const auto ref = model(Tensor<Index>::from(full[r], {1, 4})).value();
    REQUIRE(max_abs_diff(Td(step.slice(0, static_cast<index_t>(r), static_cast<index_t>(r) + 1).contiguous()),
                         Td(ref.slice(1, 3, 4).contiguous())) < 1e-12);
  }
  REQUIRE(state.length() == 4);
  MIXMOE_REQUIRE_ERROR(state.reorder({3}), "[KVCache::reorder] row 3 out of range for a cache of batch 3");
}

TEST_CASE("greedy decoding with the KV cache equals re-running the full sequence", "[eval][decode]") {
  const std::vector<Index> prompt{3, 1, 4, 1, 5};
  DenseLMf dense(decode_config(17));
  const auto ref = reference_greedy(dense, prompt, 12, {});
  const auto got = greedy_decode(dense, prompt, {.max_new_tokens = 12});
  REQUIRE(got.tokens == ref.tokens);
  REQUIRE(got.tokens.size() == 12);
  REQUIRE_FALSE(got.finished);
  REQUIRE(got.log_prob == Approx(ref.log_prob).epsilon(1e-5));
  REQUIRE(got.score == Approx(ref.log_prob / std::pow((5.0 + 12) / 6, 0.6)).epsilon(1e-5));

  // a stop id ends the hypothesis: stop at the token greedy emits third
  const Index stop = ref.tokens[2];
  const auto stopped = greedy_decode(dense, prompt, {.max_new_tokens = 12, .stop_ids = {16, stop}});
  const auto first_stop = std::find(ref.tokens.begin(), ref.tokens.end(), stop) - ref.tokens.begin();
  REQUIRE(stopped.finished);
  REQUIRE(stopped.tokens == std::vector<Index>(ref.tokens.begin(), ref.tokens.begin() + first_stop + 1));

  // no_repeat_ngram = 1: no token twice, as the reference that bans seen tokens
  const auto norep = greedy_decode(dense, prompt, {.max_new_tokens = 10, .no_repeat_ngram = 1});
  REQUIRE(norep.tokens == reference_greedy(dense, prompt, 10, {}, true).tokens);

  // an MoE FFN (hash routing on the token ids) decodes the same way
  HashLMf moe(decode_config(17));
  REQUIRE(greedy_decode(moe, prompt, {.max_new_tokens = 8}).tokens == reference_greedy(moe, prompt, 8, {}).tokens);

  // prompts of different lengths, one after the other
  const auto batch = greedy_decode_batch(dense, {{2}, prompt}, {.max_new_tokens = 4});
  REQUIRE(batch.size() == 2);
  REQUIRE(batch[0].tokens == reference_greedy(dense, {2}, 4, {}).tokens);
  REQUIRE(batch[1].tokens == std::vector<Index>(ref.tokens.begin(), ref.tokens.begin() + 4));
}

TEST_CASE("beam search: beam size 1 is greedy; a wide beam finds the exhaustive optimum", "[eval][decode]") {
  {
    DenseLMf model(decode_config(17));
    const std::vector<Index> prompt{7, 2, 9};
    for (const std::vector<Index>& stops : {std::vector<Index>{}, std::vector<Index>{0, 5, 11}}) {
      const DecodeOptions opt{.max_new_tokens = 10, .stop_ids = stops, .beam_size = 1};
      const auto greedy = greedy_decode(model, prompt, opt);
      const auto beams = beam_search(model, prompt, opt);
      REQUIRE(beams.size() == 1);
      REQUIRE(beams[0].tokens == greedy.tokens);
      REQUIRE(beams[0].finished == greedy.finished);
      REQUIRE(beams[0].log_prob == Approx(greedy.log_prob).epsilon(1e-9));
    }
  }
  // vocab 4, stop id 0, at most 3 new tokens: 1 + 3 + 9 finished sequences and 27 unfinished ones.
  // Their log-probabilities from full forwards; the best by length-normalised score must be the
  // first beam of a beam wide enough never to prune. Several random models, three length penalties.
  int differs_from_greedy = 0;
  for (std::uint64_t seed = 1; seed <= 6; ++seed) {
    auto cfg = decode_config(4);
    cfg.seed = seed;
    cfg.init_std = 0.3;  // flatter distributions: greedy is often not optimal
    DenseLMd model(cfg);
    const std::vector<Index> prompt{1, 3};
    const auto all = all_continuations(model, prompt, 4, 3);  // tokens -> (log_prob, finished)
    REQUIRE(all.size() == 1 + 3 + 9 + 27);
    for (double alpha : {0.0, 0.6, 2.0}) {
      std::vector<Index> best_tokens;
      double best = -INFINITY;
      for (const auto& [g, v] : all) {
        const double score = v.first / std::pow((5.0 + static_cast<double>(g.size())) / 6, alpha);
        if (score > best) best = score, best_tokens = g;
      }
      const DecodeOptions opt{.max_new_tokens = 3, .stop_ids = {0}, .beam_size = 64, .length_penalty = alpha};
      const auto beams = beam_search(model, prompt, opt);
      INFO("seed " << seed << ", alpha " << alpha);
      REQUIRE(beams.front().tokens == best_tokens);
      REQUIRE(beams.front().score == Approx(best).epsilon(1e-10));
      for (std::size_t i = 0; i < beams.size(); ++i) {  // every listed hypothesis has its exhaustive log-prob
        const auto it = all.find(beams[i].tokens);
        REQUIRE(it != all.end());
        REQUIRE(beams[i].log_prob == Approx(it->second.first).epsilon(1e-10));
        REQUIRE(beams[i].finished == it->second.second);
        REQUIRE(beams[i].finished == (beams[i].tokens.back() == 0));
        if (i > 0) REQUIRE(beams[i - 1].score >= beams[i].score);
      }
      // a narrow beam never beats the optimum
      REQUIRE(
          beam_search(model, prompt, {.max_new_tokens = 3, .stop_ids = {0}, .beam_size = 2, .length_penalty = alpha})
              .front()
              .score <= best + 1e-12);
      if (greedy_decode(model, prompt, opt).tokens != best_tokens) ++differs_from_greedy;
    }
  }
  INFO("cases where the optimum is not the greedy sequence: " << differs_from_greedy << " of 18");
  REQUIRE(differs_from_greedy > 0);  // the search is not greedy in disguise
  // timing-free sanity of the length penalty
  REQUIRE(length_penalty(1, 0.6) == 1.0);
  REQUIRE(length_penalty(7, 1.0) == Approx(2.0));
}

TEST_CASE("exact_counts: greedy and beam keep the counts; beam finds the best valid sequence", "[eval][decode]") {
  // vocab 5, stop id 0, at most 4 new tokens; token 2 exactly once, token 3 never.
  const std::vector<std::pair<Index, int>> counts{{2, 1}, {3, 0}};
  const auto valid = [](const std::vector<Index>& g) {
    return std::count(g.begin(), g.end(), Index{2}) == 1 && std::count(g.begin(), g.end(), Index{3}) == 0;
  };
  const auto body = [](const Hypothesis& h) {  // the tokens without the stop id
    std::vector<Index> t = h.tokens;
    if (h.finished && !t.empty()) t.pop_back();
    return t;
  };
  int greedy_would_break = 0;
  for (std::uint64_t seed = 1; seed <= 6; ++seed) {
    auto cfg = decode_config(5);
    cfg.seed = seed;
    cfg.init_std = 0.3;
    DenseLMd model(cfg);
    const std::vector<Index> prompt{1, 4};
    // Every sequence the constraint allows, finished (token 2 once, no 3) or cut at the length
    // limit (token 2 at most once, no 3), and its log-probability from full forwards.
    std::map<std::vector<Index>, double> finished;
    for (const auto& [g, v] : all_continuations(model, prompt, 5, 4)) {
      std::vector<Index> b = g;  // without the stop id
      if (v.second) b.pop_back();
      const bool allowed = v.second ? valid(b)
                                    : std::count(b.begin(), b.end(), Index{2}) <= 1 &&
                                          std::count(b.begin(), b.end(), Index{3}) == 0;
      if (allowed) finished[g] = v.first;
    }
    REQUIRE(!finished.empty());
    std::vector<Index> best_tokens;
    double best = -INFINITY;
    for (const auto& [g, l] : finished) {
      const double score = l / std::pow((5.0 + static_cast<double>(g.size())) / 6, 0.6);
      if (score > best) best = score, best_tokens = g;
    }
    DecodeOptions opt{.max_new_tokens = 4, .stop_ids = {0}, .beam_size = 64};
    opt.exact_counts = counts;
    const auto beams = beam_search(model, prompt, opt);
    INFO("seed " << seed);
    REQUIRE(beams.front().tokens == best_tokens);
    REQUIRE(beams.front().score == Approx(best).epsilon(1e-10));
    for (const auto& h : beams)
      if (h.finished) REQUIRE(valid(body(h)));
    opt.beam_size = 1;
    const auto g = greedy_decode(model, prompt, opt);
    if (g.finished) REQUIRE(valid(body(g)));
    REQUIRE(std::count(g.tokens.begin(), g.tokens.end(), Index{3}) == 0);
    REQUIRE(std::count(g.tokens.begin(), g.tokens.end(), Index{2}) <= 1);
    const auto free_greedy = greedy_decode(model, prompt, {.max_new_tokens = 4, .stop_ids = {0}});
    if (!(free_greedy.finished && valid(body(free_greedy))))
      ++greedy_would_break;
  }
  REQUIRE(greedy_would_break > 0);  // the models are such that the constraint matters
  DenseLMd model(decode_config(5));
  REQUIRE_THROWS_WITH(greedy_decode(model, {1}, {.stop_ids = {0}, .exact_counts = {{0, 1}}}),
                      Catch::Contains("is a stop id"));
  REQUIRE_THROWS_WITH(greedy_decode(model, {1}, {.exact_counts = {{7, 1}}}), Catch::Contains("outside the vocabulary"));
  REQUIRE_THROWS_WITH(greedy_decode(model, {1}, {.exact_counts = {{2, -1}}}), Catch::Contains("negative count"));
}

TEST_CASE("decoding errors", "[eval][decode][errors]") {
  DenseLMf model(decode_config(17));
  MIXMOE_REQUIRE_ERROR(greedy_decode(model, {}), "[greedy_decode] the prompt is empty");
  MIXMOE_REQUIRE_ERROR(beam_search(model, {1}, {.beam_size = 0}), "[beam_search] beam_size must be at least 1, got 0");
  MIXMOE_REQUIRE_ERROR(beam_search(model, {1, 17}), "[beam_search] prompt token 1 is 17, outside the vocabulary of 17");
  MIXMOE_REQUIRE_ERROR(greedy_decode(model, {1}, {.stop_ids = {-1}}),
                       "[greedy_decode] stop id -1 is outside the vocabulary");
  MIXMOE_REQUIRE_ERROR(greedy_decode(model, {1}, {.max_new_tokens = -1}),
                       "[greedy_decode] max_new_tokens must be >= 0");
  REQUIRE(beam_search(model, {1}, {.max_new_tokens = 0, .beam_size = 3}).front().tokens.empty());
}
}  // namespace test_eval
