// Import of dense Hugging Face LLaMA and Qwen2 checkpoints into
// DecoderLM<CausalSelfAttention<T>, SwiGLU<T>>.
//
//   ModelConfig cfg = hf_config(dir);                 // from dir/config.json
//   DecoderLM<CausalSelfAttention<float>, SwiGLU<float>> model(cfg);
//   load_hf_dense(model, dir);                        // model.safetensors, or the shards listed
//                                                     // in model.safetensors.index.json
//
// config.json: model_type "llama" or "qwen2"; hidden_size -> d_model, intermediate_size -> d_ff,
// num_hidden_layers -> layers, num_attention_heads -> heads, num_key_value_heads -> kv_heads,
// vocab_size, rms_norm_eps -> norm_eps, rope_theta, tie_word_embeddings; qwen2 sets attn_bias.
// Refused (they would change the computation): rope_scaling, attention_bias or mlp_bias on
// llama, sliding windows, an activation other than silu, a head_dim other than hidden / heads.
//
// Tensor names (HF -> mixmoe), layer i:
//   model.embed_tokens.weight                        -> embed.weight          (vocab, C)
//   model.layers.i.input_layernorm.weight            -> layers.i.norm1.weight (C)
//   model.layers.i.self_attn.{q,k,v,o}_proj.weight   -> layers.i.attn.w{q,k,v,o}.weight
//   model.layers.i.self_attn.{q,k,v}_proj.bias       -> layers.i.attn.w{q,k,v}.bias (qwen2)
//   model.layers.i.post_attention_layernorm.weight   -> layers.i.norm2.weight
//   model.layers.i.mlp.{gate,up,down}_proj.weight    -> layers.i.ffn.w_{gate,up,down}.weight
//   model.norm.weight                                -> norm.weight
//   lm_head.weight                                   -> head.weight (absent or ignored when tied)
// The conventions agree, so the weights are copied unchanged (F32, F64, F16, BF16 converted to T):
// an HF Linear weight is (out, in) like ours; the q/k head layout is heads-major ((H, Dh) rows of
// q_proj), and HF's rotary embedding is the same "rotate_half" pairing of channel i with i + Dh/2
// with inv_freq theta^(-2i/Dh) (ops/rope.hpp); repeat_kv gives query head h the kv head
// h / (H / Hkv), as causal_attention does; RMSNorm multiplies the normalised x by its weight.
#pragma once

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/io/atomic_file.hpp"
#include "mixmoe/io/safetensors.hpp"
#include "mixmoe/nn/attention.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/decoder.hpp"
#include "mixmoe/nn/ffn.hpp"

namespace mixmoe {

namespace detail::hf {

inline nlohmann::json read_json(const std::filesystem::path& p) {
  try {
    return nlohmann::json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    fail("hf_import", p.string(), ": not valid JSON: ", e.what());
  }
}

inline index_t get_size(const nlohmann::json& j, const char* key, const std::string& where) {
  MIXMOE_CHECK(j.contains(key), "hf_import", where, ": missing '", key, "'");
  MIXMOE_CHECK(j[key].is_number_integer() && j[key].get<std::int64_t>() > 0, "hf_import", where, ": '", key,
               "' must be a positive integer, got ", j[key].dump());
  return j[key].get<index_t>();
}

inline double get_number(const nlohmann::json& j, const char* key, double fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  MIXMOE_CHECK(j[key].is_number(), "hf_import", where, ": '", key, "' must be a number, got ", j[key].dump());
  return j[key].get<double>();
}

inline bool get_flag(const nlohmann::json& j, const char* key, bool fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  MIXMOE_CHECK(j[key].is_boolean(), "hf_import", where, ": '", key, "' must be true or false, got ", j[key].dump());
  return j[key].get<bool>();
}

inline std::string get_string(const nlohmann::json& j, const char* key, const std::string& fallback,
                              const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  MIXMOE_CHECK(j[key].is_string(), "hf_import", where, ": '", key, "' must be a string, got ", j[key].dump());
  return j[key].get<std::string>();
}

/// The checks every supported HF architecture shares, then ModelConfig::validate(): no
/// rope_scaling, silu activation, head_dim (when given) = hidden_size / num_attention_heads.
inline void check_common_and_validate(const nlohmann::json& j, ModelConfig& c, const std::string& where) {
  MIXMOE_CHECK(!j.contains("rope_scaling") || j["rope_scaling"].is_null(), "hf_import", where, ": rope_scaling ",
               j.contains("rope_scaling") ? j["rope_scaling"].dump() : "", " is not supported");
  const std::string act = get_string(j, "hidden_act", "silu", where);
  MIXMOE_CHECK(act == "silu", "hf_import", where, ": hidden_act '", act, "' is not supported (silu only)");
  if (j.contains("head_dim") && !j["head_dim"].is_null())
    MIXMOE_CHECK(get_size(j, "head_dim", where) == c.d_model / c.heads, "hf_import", where, ": head_dim ",
                 j["head_dim"].dump(), " differs from hidden_size / num_attention_heads = ", c.d_model / c.heads);
  try {
    c.validate();
  } catch (const Error& e) {
    detail::fail("hf_import", where, ": ", e.what());
  }
}

}  // namespace detail::hf

/// The ModelConfig of an HF LLaMA / Qwen2 checkpoint directory (its config.json); throws naming
/// the field for an unsupported model_type or option.
inline ModelConfig hf_config(const std::filesystem::path& dir) {
  using namespace detail::hf;
  const auto path = dir / "config.json";
  const std::string where = path.string();
  const auto j = read_json(path);
  MIXMOE_CHECK(j.is_object(), "hf_import", where, ": expected a JSON object");
  const std::string type = get_string(j, "model_type", "", where);
  MIXMOE_CHECK(type == "llama" || type == "qwen2", "hf_import", where, ": unsupported model_type '", type,
               "' (supported: llama, qwen2)");
  ModelConfig c;
  c.vocab = get_size(j, "vocab_size", where);
  c.d_model = get_size(j, "hidden_size", where);
  c.d_ff = get_size(j, "intermediate_size", where);
  c.layers = get_size(j, "num_hidden_layers", where);
  c.heads = get_size(j, "num_attention_heads", where);
  c.kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                   ? get_size(j, "num_key_value_heads", where)
                   : c.heads;
  c.norm_eps = get_number(j, "rms_norm_eps", 1e-6, where);
  c.rope_theta = get_number(j, "rope_theta", 10000.0, where);
  c.tie_embeddings = get_flag(j, "tie_word_embeddings", false, where);
  c.attn_bias = type == "qwen2";
  c.moe = MoEConfig{};
  if (type == "llama") {
    MIXMOE_CHECK(!get_flag(j, "attention_bias", false, where), "hf_import", where,
                 ": attention_bias (biases on q, k, v and o) is not supported for llama");
    MIXMOE_CHECK(!get_flag(j, "mlp_bias", false, where), "hf_import", where, ": mlp_bias is not supported");
  }
  MIXMOE_CHECK(!get_flag(j, "use_sliding_window", false, where), "hf_import", where,
               ": use_sliding_window is not supported");
  detail::hf::check_common_and_validate(j, c, where);
  return c;
}

/// HF tensor name -> mixmoe parameter name, for a model of configuration `cfg`.
inline std::map<std::string, std::string> hf_dense_name_map(const ModelConfig& cfg) {
  std::map<std::string, std::string> m;
  m["model.embed_tokens.weight"] = "embed.weight";
  for (index_t i = 0; i < cfg.layers; ++i) {
    const std::string hf = "model.layers." + std::to_string(i) + ".", ours = "layers." + std::to_string(i) + ".";
    m[hf + "input_layernorm.weight"] = ours + "norm1.weight";
    m[hf + "post_attention_layernorm.weight"] = ours + "norm2.weight";
    for (const char* p : {"q", "k", "v", "o"}) {
      m[hf + "self_attn." + p + "_proj.weight"] = ours + "attn.w" + p + ".weight";
      if (cfg.attn_bias && std::string(p) != "o")
        m[hf + "self_attn." + p + "_proj.bias"] = ours + "attn.w" + p + ".bias";
    }
    for (const char* p : {"gate", "up", "down"}) m[hf + "mlp." + p + "_proj.weight"] = ours + "ffn.w_" + p + ".weight";
  }
  m["model.norm.weight"] = "norm.weight";
  if (!cfg.tie_embeddings) m["lm_head.weight"] = "head.weight";
  return m;
}

namespace detail::hf {

/// Copies the tensors of `names` (HF -> ours) from the safetensors of dir (model.safetensors or
/// the shards of model.safetensors.index.json) into `params`; every one must be there, no other
/// (rotary inv_freq buffers and, when `tied`, lm_head.weight are skipped).
template <Scalar T>
void load_tensors(const std::map<std::string, std::string>& names, const std::map<std::string, Var<T, Cpu>*>& params,
                  const std::filesystem::path& dir, bool tied, const std::string& what) {
  namespace fs = std::filesystem;
  std::map<std::string, std::vector<std::string>> by_file;  // file -> HF names the index lists in it
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    const auto j = detail::hf::read_json(index);
    MIXMOE_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), "hf_import", index.string(),
                 ": no weight_map object");
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      MIXMOE_CHECK(it.value().is_string(), "hf_import", index.string(), ": weight_map entry of '", it.key(),
                   "' is not a file name");
      const auto file = it.value().get<std::string>();
      MIXMOE_CHECK(file.find('/') == std::string::npos && file.find("..") == std::string::npos, "hf_import",
                   index.string(), ": shard name '", file, "' must be a plain file name");
      by_file[file].push_back(it.key());
    }
  } else {
    MIXMOE_CHECK(fs::exists(dir / "model.safetensors"), "hf_import", dir.string(),
                 ": neither model.safetensors nor model.safetensors.index.json");
    by_file["model.safetensors"] = {};
  }
  std::set<std::string> loaded;
  for (const auto& [file, listed] : by_file) {
    const SafetensorsFile f = SafetensorsFile::open(dir / file);  // one shard in memory at a time
    for (const auto& n : listed)
      MIXMOE_CHECK(f.contains(n), "hf_import", f.origin(), ": tensor '", n, "' is listed in the index but absent");
    for (const auto& n : f.names()) {
      const auto it = names.find(n);
      if (it == names.end()) {
        const bool ignorable = n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight");
        MIXMOE_CHECK(ignorable, "hf_import", f.origin(), ": unexpected tensor '", n, "' for ", what);
        continue;
      }
      MIXMOE_CHECK(!loaded.count(n), "hf_import", f.origin(), ": tensor '", n, "' appears in two shards");
      Var<T, Cpu>& p = *params.at(it->second);
      p.value().copy_from(f.get<T>(n, p.shape()));
      loaded.insert(n);
    }
  }
  std::vector<std::string> missing;
  for (const auto& [hf, ours] : names)
    if (!loaded.count(hf)) missing.push_back(hf);
  if (!missing.empty()) {
    std::string list;
    for (std::size_t i = 0; i < missing.size() && i < 5; ++i) list += (i ? ", " : "") + missing[i];
    detail::fail("hf_import", dir.string(), ": ", missing.size(), " tensor(s) missing: ", list,
                 missing.size() > 5 ? ", ..." : "");
  }
}

}  // namespace detail::hf

/// Loads the weights of an HF LLaMA / Qwen2 checkpoint directory into a dense DecoderLM built
/// from hf_config(dir). Every expected tensor must be present with its shape; an unexpected
/// tensor is an error (rotary inv_freq buffers and a tied lm_head.weight are ignored).
template <Scalar T>
void load_hf_dense(DecoderLM<CausalSelfAttention<T>, SwiGLU<T>>& model, const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const ModelConfig& cfg = model.config;
  const auto names = hf_dense_name_map(cfg);
  std::map<std::string, Var<T, Cpu>*> params;
  model.visit_parameters([&](const std::string& name, Var<T, Cpu>& p) { params[name] = &p; }, "");
  for (const auto& [hf, ours] : names)
    MIXMOE_CHECK(params.count(ours), "hf_import", "the model has no parameter '", ours, "' for ", hf,
                 " (build it from hf_config())");

  detail::hf::load_tensors<T>(names, params, dir, cfg.tie_embeddings,
                              "a " + std::to_string(cfg.layers) + "-layer " + (cfg.attn_bias ? "qwen2" : "llama") +
                                  " model");
}

}  // namespace mixmoe
