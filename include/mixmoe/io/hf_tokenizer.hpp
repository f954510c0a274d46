// The SentencePiece tokenizer of an HF checkpoint directory (dir/tokenizer.model: LLaMA,
// Mistral, Mixtral).
//
//   HFSentencePiece tok = load_hf_sentencepiece(dir);
//   std::vector<index_t> ids = tok.encode("Hello");   // plain SentencePiece pieces, no <s>
//   ids.insert(ids.begin(), tok.bos_id());            // HF's LlamaTokenizer adds <s> by default
//
// Supported: tokenizer.model only, encoded and decoded by SentencePiece itself. That equals HF's
// slow LlamaTokenizer (legacy mode) on text without special tokens: HF's splitting of special
// tokens written in the text ("<s>" as one token), its add_bos_token / add_eos_token and the
// chat template are not applied; add <s> yourself. Not supported: tokenizer.json without a
// tokenizer.model (the byte-level BPE of Qwen2-MoE and OLMoE): load_hf_sentencepiece says so.
//
// Why not Tokenizer (data/tokenizer.hpp): it requires a <pad> piece, and LLaMA-family models
// have none (pad_id -1). A model that has one loads with Tokenizer::load(dir / "tokenizer.model").
#pragma once

#include <sentencepiece_processor.h>

#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/io/atomic_file.hpp"

namespace mixmoe {

/// An HF checkpoint's SentencePiece model.
class HFSentencePiece {
 public:
  HFSentencePiece() = default;

  /// From the serialized model; `name` appears in errors.
  static HFSentencePiece from_bytes(std::string_view bytes, const std::string& name) {
    constexpr const char* where = "hf_tokenizer";
    MIXMOE_CHECK(!bytes.empty(), where, name, ": empty file, not a SentencePiece model");
    auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto status = sp->LoadFromSerializedProto(bytes);
    MIXMOE_CHECK(status.ok(), where, name, ": not a SentencePiece model (truncated or corrupt): ", status.message());
    MIXMOE_CHECK(sp->GetPieceSize() > 0, where, name, ": the model has no pieces");
    HFSentencePiece t;
    t.sp_ = std::move(sp);
    t.name_ = name;
    return t;
  }

  /// Token ids of `text` (no <s> or </s> added).
  [[nodiscard]] std::vector<index_t> encode(std::string_view text) const {
    require("encode");
    std::vector<int> ids;
    const auto status = sp_->Encode(text, &ids);
    MIXMOE_CHECK(status.ok(), "hf_tokenizer", name_, ": ", status.message());
    return {ids.begin(), ids.end()};
  }

  /// Text of `ids`; control pieces (<s>, </s>) decode to nothing.
  [[nodiscard]] std::string decode(std::span<const index_t> ids) const {
    require("decode");
    std::vector<int> v(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      MIXMOE_CHECK(ids[i] >= 0 && ids[i] < vocab_size(), "hf_tokenizer", "id ", ids[i], " at position ", i,
                   " is outside the vocabulary of ", vocab_size());
      v[i] = static_cast<int>(ids[i]);
    }
    std::string text;
    const auto status = sp_->Decode(v, &text);
    MIXMOE_CHECK(status.ok(), "hf_tokenizer", name_, ": ", status.message());
    return text;
  }

  [[nodiscard]] std::string piece(index_t id) const {
    require("piece");
    MIXMOE_CHECK(id >= 0 && id < vocab_size(), "hf_tokenizer", "id ", id, " is outside the vocabulary of ",
                 vocab_size());
    return sp_->IdToPiece(static_cast<int>(id));
  }
  [[nodiscard]] index_t vocab_size() const { return sp_ ? sp_->GetPieceSize() : 0; }
  /// -1 where the model has no such piece.
  [[nodiscard]] index_t bos_id() const { return sp_ ? sp_->bos_id() : -1; }
  [[nodiscard]] index_t eos_id() const { return sp_ ? sp_->eos_id() : -1; }
  [[nodiscard]] index_t unk_id() const { return sp_ ? sp_->unk_id() : -1; }
  [[nodiscard]] index_t pad_id() const { return sp_ ? sp_->pad_id() : -1; }
  [[nodiscard]] bool loaded() const { return sp_ != nullptr; }
  [[nodiscard]] const std::string& name() const { return name_; }
  /// The SentencePiece processor itself, for what is not wrapped here.
  [[nodiscard]] const sentencepiece::SentencePieceProcessor& processor() const {
    require("processor");
    return *sp_;
  }

 private:
  void require(const char* what) const { MIXMOE_CHECK(sp_ != nullptr, "hf_tokenizer", what, ": no model loaded"); }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::string name_;
};

/// Loads dir/tokenizer.model; a directory with only tokenizer.json (byte-level BPE) is refused.
inline HFSentencePiece load_hf_sentencepiece(const std::filesystem::path& dir) {
  const auto path = dir / "tokenizer.model";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    MIXMOE_CHECK(!std::filesystem::exists(dir / "tokenizer.json", ec), "hf_tokenizer", dir.string(),
                 ": only tokenizer.json (a Hugging Face tokenizers model, e.g. byte-level BPE) and no tokenizer.model: "
                 "not supported, only SentencePiece models are");
    detail::fail("hf_tokenizer", dir.string(), ": no tokenizer.model");
  }
  return HFSentencePiece::from_bytes(read_file(path), path.string());
}

}  // namespace mixmoe
