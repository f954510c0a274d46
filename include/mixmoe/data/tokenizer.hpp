// Subword tokenizer over SentencePiece: training a shared multilingual model from sentences in
// memory, encoding and decoding, language tags and the translation prompt.
//
//   Tokenizer::train(sentences, options, path) -> Tokenizer   (model written atomically)
//   Tokenizer::load(path), encode(text) -> ids, decode(ids) -> text
//
// Fixed ids of every model trained here: <pad> = 0, <unk> = 1, <s> = 2, </s> = 3 (control pieces:
// they decode to nothing), then the user symbols in the order given, then the learned pieces (and
// with byte_fallback the 256 byte pieces <0x00>..<0xFF>, so no text maps to <unk>).
//
// Language tags: "<2xx>" asks for a translation into language xx ("<2de>", "<2pt_BR>"); train with
// translation_symbols({"de", "fr", ...}) among the user symbols so that each tag is one token.
// Translation prompt (make_translation_example):
//   <2de> source-ids <sep> target-ids </s>       loss on target-ids and </s>
//
// Normalisation: the default here is "identity" with whitespace kept as it is, not SentencePiece's
// "nmt_nfkc": NFKC rewrites characters that UI strings use on purpose ("…" -> "...", full-width
// "：" and "（）" -> ASCII, tabs and newlines -> spaces), so decode(encode(s)) != s for them.
#pragma once

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/data/batching.hpp"
#include "mixmoe/io/atomic_file.hpp"

namespace mixmoe {

struct TokenizerOptions {
  int vocab_size = 8000;
  std::string model_type = "unigram";      // "unigram" or "bpe"
  double character_coverage = 0.9995;      // share of characters the vocabulary covers (< 1 for ja/zh)
  std::vector<std::string> user_symbols;   // always one token each: language tags, <sep> (no ',' in them)
  bool byte_fallback = true;               // characters outside the vocabulary become byte pieces, not <unk>
  int max_sentences = 0;                   // train on a seeded sample of this many sentences; 0: all
  std::uint64_t seed = 0;                  // of that sample
  int threads = 1;                         // trainer threads; the model depends on this number
  std::string normalization = "identity";  // SentencePiece rule: "identity", "nmt_nfkc", "nfkc", ...
  bool remove_extra_whitespaces = false;   // SentencePiece's squeezing of leading, trailing, double spaces
  bool hard_vocab_limit = true;            // false: a smaller vocabulary when the text is too small
  bool verbose = false;                    // SentencePiece's training log on stderr
};

namespace detail {

/// Byte offset of the first invalid UTF-8 sequence in s (overlong forms, surrogates and code
/// points above U+10FFFF are invalid), or npos when s is valid.
inline std::size_t utf8_invalid_at(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0, min = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1Fu, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0Fu, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

/// Throws "[where] <what> is not valid UTF-8: ..." naming the offset and the byte.
inline void check_utf8(std::string_view s, const char* where, const std::string& what) {
  const std::size_t at = utf8_invalid_at(s);
  if (at == std::string_view::npos) return;
  std::ostringstream byte;
  byte << "0x" << std::hex << static_cast<unsigned>(static_cast<unsigned char>(s[at]));
  fail(where, what, " is not valid UTF-8: bad sequence at byte ", at, " (", byte.str(), ")");
}

/// Hands SentencePiece's trainer the sentences one by one, without a temporary file.
class SentenceListIterator final : public sentencepiece::SentenceIterator {
 public:
  SentenceListIterator(const std::vector<std::string>& sentences, const std::vector<std::size_t>& pick)
      : sentences_(sentences), pick_(pick) {}
  bool done() const override { return at_ >= pick_.size(); }
  void Next() override { ++at_; }
  const std::string& value() const override { return sentences_[pick_[at_]]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& sentences_;
  const std::vector<std::size_t>& pick_;
  std::size_t at_ = 0;
};

inline std::string format_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

}  // namespace detail

class Tokenizer {
 public:
  /// No model: every query but loaded() and vocab_size() throws; use train() or load().
  Tokenizer() = default;

  static constexpr index_t kPadId = 0;
  static constexpr index_t kUnkId = 1;
  static constexpr index_t kBosId = 2;
  static constexpr index_t kEosId = 3;
  /// The piece between source and target in a translation prompt.
  static constexpr std::string_view kSeparator = "<sep>";

  /// "<2" + lang + ">": the tag that asks for a translation into `lang`.
  static std::string lang_tag(std::string_view lang) {
    MIXMOE_CHECK(!lang.empty(), "Tokenizer::lang_tag", "empty language code");
    for (char c : lang)
      MIXMOE_CHECK(c != '<' && c != '>' && c != ',' && c != ' ' && c != '\t' && c != '\n', "Tokenizer::lang_tag",
                   "language code '", lang, "' contains '", c, "'");
    return "<2" + std::string(lang) + ">";
  }

  /// The user symbols a translation model needs: one tag per target language, then <sep>.
  static std::vector<std::string> translation_symbols(const std::vector<std::string>& languages) {
    std::vector<std::string> out;
    for (const auto& l : languages) out.push_back(lang_tag(l));
    out.emplace_back(kSeparator);
    return out;
  }

  /// Trains a model on `sentences` (each a line of text, valid UTF-8), writes it to `model_path`
  /// atomically and returns it loaded. Same sentences and options: the same model bytes.
  static Tokenizer train(const std::vector<std::string>& sentences, const TokenizerOptions& opt,
                         const std::string& model_path) {
    Tokenizer tok = train_in_memory(sentences, opt);
    tok.name_ = model_path;
    write_file_atomic(model_path, tok.model_bytes());
    return tok;
  }

  /// train() without a file: the model's bytes are model_bytes().
  static Tokenizer train_in_memory(const std::vector<std::string>& sentences, const TokenizerOptions& opt) {
    constexpr const char* where = "Tokenizer::train";
    MIXMOE_CHECK(!sentences.empty(), where, "no sentences to train on");
    MIXMOE_CHECK(opt.model_type == "unigram" || opt.model_type == "bpe", where, "model_type '", opt.model_type,
                 "' is not \"unigram\" or \"bpe\"");
    MIXMOE_CHECK(opt.character_coverage > 0.0 && opt.character_coverage <= 1.0, where, "character_coverage ",
                 opt.character_coverage, " is outside (0, 1]");
    MIXMOE_CHECK(opt.threads >= 1, where, "threads ", opt.threads, " is not positive");
    MIXMOE_CHECK(opt.max_sentences >= 0, where, "max_sentences ", opt.max_sentences, " is negative");
    const int reserved = 4 + static_cast<int>(opt.user_symbols.size()) + (opt.byte_fallback ? 256 : 0);
    MIXMOE_CHECK(opt.vocab_size > reserved, where, "vocab_size ", opt.vocab_size,
                 " leaves no room for learned pieces: ", reserved, " ids are taken by <pad> <unk> <s> </s>, ",
                 opt.user_symbols.size(), " user symbols", (opt.byte_fallback ? " and 256 byte pieces" : ""));
    std::unordered_set<std::string> seen;
    std::string symbols;
    for (std::size_t i = 0; i < opt.user_symbols.size(); ++i) {
      const std::string& u = opt.user_symbols[i];
      MIXMOE_CHECK(!u.empty(), where, "user symbol ", i, " is empty");
      MIXMOE_CHECK(u.find(',') == std::string::npos, where, "user symbol '", u, "' contains ','");
      detail::check_utf8(u, where, "user symbol " + std::to_string(i));
      MIXMOE_CHECK(u != "<pad>" && u != "<unk>" && u != "<s>" && u != "</s>", where, "user symbol '", u,
                   "' is a reserved piece");
      MIXMOE_CHECK(seen.insert(u).second, where, "user symbol '", u, "' appears twice");
      symbols += (i ? "," : "") + u;
    }
    for (std::size_t i = 0; i < sentences.size(); ++i)
      detail::check_utf8(sentences[i], where, "sentence " + std::to_string(i));

    // A seeded sample (mixmoe's Generator: the same on every platform), kept in input order.
    std::vector<std::size_t> pick(sentences.size());
    for (std::size_t i = 0; i < pick.size(); ++i) pick[i] = i;
    if (opt.max_sentences > 0 && static_cast<std::size_t>(opt.max_sentences) < pick.size()) {
      Generator gen(opt.seed);
      const auto k = static_cast<std::size_t>(opt.max_sentences);
      for (std::size_t i = 0; i < k; ++i) std::swap(pick[i], pick[i + gen.below(pick.size() - i)]);
      pick.resize(k);
      std::sort(pick.begin(), pick.end());
    }

    const std::unordered_map<std::string, std::string> args = {
        {"vocab_size", std::to_string(opt.vocab_size)},
        {"model_type", opt.model_type},
        {"character_coverage", detail::format_double(opt.character_coverage)},
        {"byte_fallback", opt.byte_fallback ? "true" : "false"},
        {"user_defined_symbols", symbols},
        {"input_sentence_size", "0"},
        {"shuffle_input_sentence", "false"},
        {"num_threads", std::to_string(opt.threads)},
        {"normalization_rule_name", opt.normalization},
        {"remove_extra_whitespaces", opt.remove_extra_whitespaces ? "true" : "false"},
        {"hard_vocab_limit", opt.hard_vocab_limit ? "true" : "false"},
        {"pad_id", std::to_string(kPadId)},
        {"unk_id", std::to_string(kUnkId)},
        {"bos_id", std::to_string(kBosId)},
        {"eos_id", std::to_string(kEosId)},
        {"minloglevel", opt.verbose ? "0" : "1"},  // 1: no INFO lines (SentencePiece's global setting)
    };
    detail::SentenceListIterator it(sentences, pick);
    std::string bytes;
    const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &bytes);
    MIXMOE_CHECK(status.ok(), where, "SentencePiece training on ", pick.size(),
                 " sentences failed: ", status.message());
    return from_bytes(bytes, "<trained model>");
  }

  /// Loads a SentencePiece model file; errors name the path and what is wrong.
  static Tokenizer load(const std::string& path) {
    std::error_code ec;
    MIXMOE_CHECK(std::filesystem::exists(path, ec), "Tokenizer::load", "model file '", path, "' does not exist");
    return from_bytes(read_file(path), path);
  }

  /// A model from its serialized bytes; `name` appears in error messages.
  static Tokenizer from_bytes(std::string_view bytes, const std::string& name = "<memory>") {
    constexpr const char* where = "Tokenizer::load";
    MIXMOE_CHECK(!bytes.empty(), where, name, ": empty file, not a SentencePiece model");
    auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = sp->LoadFromSerializedProto(bytes);
    MIXMOE_CHECK(status.ok(), where, name, ": not a SentencePiece model (truncated or corrupt): ", status.message());
    MIXMOE_CHECK(sp->GetPieceSize() > 0, where, name, ": the model has no pieces");
    MIXMOE_CHECK(sp->unk_id() >= 0 && sp->eos_id() >= 0 && sp->pad_id() >= 0, where, name,
                 ": the model must define <unk>, </s> and <pad> (its ids: unk ", sp->unk_id(), ", eos ", sp->eos_id(),
                 ", pad ", sp->pad_id(), "); train it with pad_id set");
    Tokenizer tok;
    tok.sp_ = std::move(sp);
    tok.name_ = name;
    tok.bytes_ = std::string(bytes);
    return tok;
  }

  /// Token ids of `text` (valid UTF-8). User symbols in the text become their single tokens.
  [[nodiscard]] std::vector<index_t> encode(std::string_view text) const {
    require_model("Tokenizer::encode");
    detail::check_utf8(text, "Tokenizer::encode", "text");
    std::vector<int> ids;
    const auto status = sp_->Encode(text, &ids);
    MIXMOE_CHECK(status.ok(), "Tokenizer::encode", name_, ": ", status.message());
    return {ids.begin(), ids.end()};
  }

  /// Text of `ids`; the control pieces <pad> <s> </s> decode to nothing, user symbols to their text.
  [[nodiscard]] std::string decode(std::span<const index_t> ids) const {
    require_model("Tokenizer::decode");
    std::vector<int> v(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      MIXMOE_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "Tokenizer::decode", "id ", ids[i], " at position ", i,
                   " is outside the vocabulary of ", vocab_size());
      v[i] = static_cast<int>(ids[i]);
    }
    std::string text;
    const auto status = sp_->Decode(v, &text);
    MIXMOE_CHECK(status.ok(), "Tokenizer::decode", name_, ": ", status.message());
    return text;
  }

  /// The piece of `id` ("▁Datei", "<2de>", "<0xE2>").
  [[nodiscard]] std::string piece(index_t id) const {
    require_model("Tokenizer::piece");
    MIXMOE_CHECK(id >= 0 && id < vocab_size(), "Tokenizer::piece", "id ", id, " is outside the vocabulary of ",
                 vocab_size());
    return sp_->IdToPiece(static_cast<int>(id));
  }

  /// The id of `piece`; throws when the vocabulary has no such piece.
  [[nodiscard]] index_t id(std::string_view piece) const {
    require_model("Tokenizer::id");
    const int i = sp_->PieceToId(piece);
    MIXMOE_CHECK(i != sp_->unk_id() || piece == sp_->IdToPiece(i), "Tokenizer::id", "no piece '", piece,
                 "' in the vocabulary of ", name_);
    return i;
  }

  /// Whether `piece` is in the vocabulary.
  [[nodiscard]] bool contains(std::string_view piece) const {
    require_model("Tokenizer::contains");
    const int i = sp_->PieceToId(piece);
    return i != sp_->unk_id() || piece == sp_->IdToPiece(i);
  }

  /// The token of the tag "<2" + lang + ">" (translate into lang).
  [[nodiscard]] index_t lang_tag_id(std::string_view lang) const {
    const std::string tag = lang_tag(lang);
    MIXMOE_CHECK(contains(tag), "Tokenizer::lang_tag_id", "unknown language tag ", tag, ": the model ", name_,
                 " was not trained with it among its user symbols");
    return id(tag);
  }

  /// The token of kSeparator.
  [[nodiscard]] index_t sep_id() const {
    MIXMOE_CHECK(contains(kSeparator), "Tokenizer::sep_id", "no ", kSeparator, " piece in ", name_,
                 ": train with translation_symbols() among the user symbols");
    return id(kSeparator);
  }

  [[nodiscard]] index_t vocab_size() const { return sp_ ? sp_->GetPieceSize() : 0; }
  [[nodiscard]] index_t pad_id() const {
    require_model("Tokenizer::pad_id");
    return sp_->pad_id();
  }
  [[nodiscard]] index_t unk_id() const {
    require_model("Tokenizer::unk_id");
    return sp_->unk_id();
  }
  /// -1 when the model has no <s> (possible for models trained elsewhere).
  [[nodiscard]] index_t bos_id() const {
    require_model("Tokenizer::bos_id");
    return sp_->bos_id();
  }
  [[nodiscard]] index_t eos_id() const {
    require_model("Tokenizer::eos_id");
    return sp_->eos_id();
  }
  [[nodiscard]] bool is_byte(index_t id) const { return sp_->IsByte(static_cast<int>(piece_checked(id))); }
  [[nodiscard]] bool is_control(index_t id) const { return sp_->IsControl(static_cast<int>(piece_checked(id))); }

  /// The serialized model (what train() wrote).
  [[nodiscard]] const std::string& model_bytes() const { return bytes_; }
  /// The path it was loaded from or written to.
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] bool loaded() const { return sp_ != nullptr; }

 private:
  void require_model(const char* where) const { MIXMOE_CHECK(sp_ != nullptr, where, "no model loaded"); }
  index_t piece_checked(index_t id) const {
    MIXMOE_CHECK(sp_ && id >= 0 && id < vocab_size(), "Tokenizer", "id ", id, " is outside the vocabulary of ",
                 vocab_size());
    return id;
  }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::string name_;
  std::string bytes_;
};

/// The prompt that asks for a translation of `source` into `target_lang`: <2xx> source <sep>.
inline std::vector<index_t> translation_prompt(const Tokenizer& tok, std::string_view target_lang,
                                               std::string_view source) {
  std::vector<index_t> ids{tok.lang_tag_id(target_lang)};
  const auto src = tok.encode(source);
  ids.insert(ids.end(), src.begin(), src.end());
  ids.push_back(tok.sep_id());
  return ids;
}

/// A training example: translation_prompt + target ids + </s>, the loss on the target and </s>.
inline Example make_translation_example(const Tokenizer& tok, std::string_view target_lang, std::string_view source,
                                        std::string_view target) {
  Example ex{translation_prompt(tok, target_lang, source), 0};
  ex.target_begin = static_cast<index_t>(ex.ids.size());
  const auto tgt = tok.encode(target);
  ex.ids.insert(ex.ids.end(), tgt.begin(), tgt.end());
  ex.ids.push_back(tok.eos_id());
  return ex;
}

}  // namespace mixmoe
