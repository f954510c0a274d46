// Import of Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, OLMoE) into DecoderLM models with
// MixedMoE feed-forward layers.
//
//   HFMoEInfo info = hf_moe_info(dir);        // dir/config.json: ModelConfig + routing options
//   HFMixtral<float> model(info.config);      // or HFQwen2MoE<float>, HFOLMoE<float> (hf_moe_config(dir))
//   load_hf_moe(model, dir);                  // model.safetensors, or the shards listed in
//                                             // model.safetensors.index.json
//
// Model types (every FFN is a MixedMoE with one group of SwiGLU experts tagged generic and one
// TopK router over all of them: one token's K experts, gates from the softmax over the E logits):
//   HFMixtral<T>                 gates renormalised over the top-K (Mixtral always does)
//   HFOLMoE<T, NormTopK = false> attention with q_norm/k_norm (ModelConfig::qk_norm)
//   HFQwen2MoE<T, NormTopK = false>  SharedExpertMoE: the routed layer + a sigmoid-gated shared
//                                SwiGLU expert of width d_ff (moe/shared_expert.hpp)
// NormTopK is the checkpoint's norm_topk_prob: true, the top-K gates are divided by their sum;
// false, they are the softmax probabilities themselves (not summing to 1). load_hf_moe refuses a
// model whose routers disagree with the checkpoint, naming the type to build.
//
// config.json (model_type "mixtral", "qwen2_moe" or "olmoe"):
//   hidden_size -> d_model, num_hidden_layers -> layers, num_attention_heads -> heads,
//   num_key_value_heads -> kv_heads, vocab_size, rms_norm_eps -> norm_eps, rope_theta,
//   tie_word_embeddings (default false), num_experts_per_tok -> moe.top_k; an absent field takes
//   the default of the architecture's transformers configuration class (num_key_value_heads 8 /
//   16 / the query heads, rms_norm_eps 1e-5 / 1e-6 / 1e-5, rope_theta 1e6 / 1e4 / 1e4 for
//   mixtral / qwen2_moe / olmoe);
//   mixtral:   num_local_experts -> moe.experts_per_group {E}; intermediate_size -> moe.expert_hidden
//              and d_ff; router_jitter_noise is ignored (HF applies it only in training mode)
//   qwen2_moe: num_experts; moe_intermediate_size -> moe.expert_hidden; shared_expert_intermediate_size
//              -> d_ff (the shared expert's width); q/k/v biases (attn_bias; qkv_bias false turns
//              them off); norm_topk_prob (default false)
//   olmoe:     num_experts; intermediate_size -> moe.expert_hidden and d_ff; qk_norm; norm_topk_prob
//              (default false)
// Refused (they would change the computation): rope_scaling; an activation other than silu; a
// head_dim other than hidden / heads; mixtral: a sliding_window (only null is accepted);
// qwen2_moe: use_sliding_window, decoder_sparse_step other than 1, a non-empty mlp_only_layers
// (dense MLP layers among the MoE ones), shared_expert_intermediate_size 0; olmoe:
// attention_bias, clip_qkv.
//
// Tensor names (HF -> mixmoe), layer i, expert j (attention and norms as the dense import,
// io/hf_import.hpp):
//   model.embed_tokens.weight                          -> embed.weight
//   model.layers.i.input_layernorm.weight              -> layers.i.norm1.weight
//   model.layers.i.self_attn.{q,k,v,o}_proj.weight     -> layers.i.attn.w{q,k,v,o}.weight
//   model.layers.i.self_attn.{q,k,v}_proj.bias         -> layers.i.attn.w{q,k,v}.bias      (qwen2_moe)
//   model.layers.i.self_attn.{q,k}_norm.weight         -> layers.i.attn.{q,k}_norm.weight  (olmoe)
//   model.layers.i.post_attention_layernorm.weight     -> layers.i.norm2.weight
//   mixtral:
//   model.layers.i.block_sparse_moe.gate.weight        -> layers.i.ffn.router.weight (E, C)
//   model.layers.i.block_sparse_moe.experts.j.w1.weight -> layers.i.ffn.generic.experts.j.w_gate.weight
//   model.layers.i.block_sparse_moe.experts.j.w3.weight -> layers.i.ffn.generic.experts.j.w_up.weight
//   model.layers.i.block_sparse_moe.experts.j.w2.weight -> layers.i.ffn.generic.experts.j.w_down.weight
//   qwen2_moe, olmoe:
//   model.layers.i.mlp.gate.weight                     -> layers.i.ffn.router.weight (E, C)
//   model.layers.i.mlp.experts.j.{gate,up,down}_proj.weight -> layers.i.ffn.generic.experts.j.w_{gate,up,down}.weight
//   qwen2_moe:
//   model.layers.i.mlp.shared_expert.{gate,up,down}_proj.weight -> layers.i.ffn.shared_expert.w_{gate,up,down}.weight
//   model.layers.i.mlp.shared_expert_gate.weight       -> layers.i.ffn.shared_expert_gate.weight (1, C)
//   model.norm.weight                                  -> norm.weight
//   lm_head.weight                                     -> head.weight (absent or ignored when tied)
// The weights are copied unchanged (F32, F64, F16, BF16 converted to T). The conventions agree:
// HF's routers compute softmax(x W^T) in float over the E experts and take the top-K
// probabilities (our TopKRouter: top-K logits, the same experts; ties aside), Mixtral and
// norm_topk_prob renormalise them; the experts are act(x W_gate^T) * (x W_up^T) -> W_down with
// act = silu (Mixtral's w1, w3, w2); the routed output is the gate-weighted sum of a token's K
// experts; Qwen2-MoE adds sigmoid(x w_g^T) * shared_expert(x); OLMoE's q_norm / k_norm are
// RMSNorms over the whole q (C) and k (Hkv * Dh) projections before the heads are split and
// the rotary embedding runs. Every MoE layer here is dropless (moe.capacity_factor 0), as HF's
// forward is.
#pragma once

#include <concepts>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"
#include "mixmoe/io/hf_import.hpp"
#include "mixmoe/io/safetensors.hpp"
#include "mixmoe/moe/expert_group.hpp"
#include "mixmoe/moe/mixed_moe.hpp"
#include "mixmoe/moe/shared_expert.hpp"
#include "mixmoe/moe/top_k_router.hpp"
#include "mixmoe/nn/attention.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/decoder.hpp"
#include "mixmoe/nn/ffn.hpp"

namespace mixmoe {

/// The routed MoE layer of the HF MoE models: one TopK router over one group of SwiGLU experts.
template <Scalar T, bool NormTopK>
using HFRoutedMoE = MixedMoE<TopK<0, NormTopK>, ExpertGroup<SwiGLU<T>, tag::generic>>;

template <Scalar T>
using HFMixtral = DecoderLM<CausalSelfAttention<T>, HFRoutedMoE<T, true>>;
template <Scalar T, bool NormTopK = false>
using HFOLMoE = DecoderLM<CausalSelfAttention<T>, HFRoutedMoE<T, NormTopK>>;
template <Scalar T, bool NormTopK = false>
using HFQwen2MoE = DecoderLM<CausalSelfAttention<T>, SharedExpertMoE<HFRoutedMoE<T, NormTopK>, SwiGLU<T>>>;

/// What config.json of an HF MoE checkpoint says.
struct HFMoEInfo {
  std::string model_type;      // "mixtral", "qwen2_moe" or "olmoe"
  ModelConfig config;          // for the model types above
  bool norm_topk_prob = true;  // top-K gates divided by their sum (always for mixtral)
  bool shared_expert = false;  // qwen2_moe: a sigmoid-gated shared expert of width config.d_ff
};

/// Reads dir/config.json of a Mixtral, Qwen2-MoE or OLMoE checkpoint; throws naming the field
/// for an unsupported model_type or option.
inline HFMoEInfo hf_moe_info(const std::filesystem::path& dir) {
  using namespace detail::hf;
  const auto path = dir / "config.json";
  const std::string where = path.string();
  const auto j = read_json(path);
  MIXMOE_CHECK(j.is_object(), "hf_import", where, ": expected a JSON object");
  HFMoEInfo info;
  info.model_type = get_string(j, "model_type", "", where);
  const std::string& type = info.model_type;
  MIXMOE_CHECK(type == "mixtral" || type == "qwen2_moe" || type == "olmoe", "hf_import", where,
               ": unsupported model_type '", type, "' (supported MoE types: mixtral, qwen2_moe, olmoe)");
  ModelConfig& c = info.config;
  c.vocab = get_size(j, "vocab_size", where);
  c.d_model = get_size(j, "hidden_size", where);
  c.layers = get_size(j, "num_hidden_layers", where);
  c.heads = get_size(j, "num_attention_heads", where);
  // Absent fields take the defaults of the architecture's configuration class in transformers
  // (MixtralConfig: 8 kv heads, eps 1e-5, theta 1e6; Qwen2MoeConfig: 16, 1e-6, 1e4; OlmoeConfig:
  // the query heads, 1e-5, 1e4); a null num_key_value_heads means one kv head per query head.
  const bool mixtral = type == "mixtral", qwen = type == "qwen2_moe";
  if (!j.contains("num_key_value_heads"))
    c.kv_heads = mixtral ? 8 : qwen ? 16 : c.heads;
  else
    c.kv_heads = j["num_key_value_heads"].is_null() ? c.heads : get_size(j, "num_key_value_heads", where);
  c.norm_eps = get_number(j, "rms_norm_eps", qwen ? 1e-6 : 1e-5, where);
  c.rope_theta = get_number(j, "rope_theta", mixtral ? 1e6 : 10000.0, where);
  c.tie_embeddings = get_flag(j, "tie_word_embeddings", false, where);
  MoEConfig& m = c.moe;
  m = MoEConfig{};
  m.top_k = get_size(j, "num_experts_per_tok", where);
  m.capacity_factor = 0.0;
  m.mix = GroupMix::shared_router;
  m.fixed_mix.clear();
  index_t experts = 0;
  if (type == "mixtral") {
    experts = get_size(j, "num_local_experts", where);
    m.expert_hidden = c.d_ff = get_size(j, "intermediate_size", where);
    info.norm_topk_prob = true;
    MIXMOE_CHECK(!j.contains("sliding_window") || j["sliding_window"].is_null(), "hf_import", where,
                 ": sliding_window ", j.contains("sliding_window") ? j["sliding_window"].dump() : "",
                 " is not supported (only null: full causal attention)");
  } else if (type == "qwen2_moe") {
    experts = get_size(j, "num_experts", where);
    m.expert_hidden = get_size(j, "moe_intermediate_size", where);
    MIXMOE_CHECK(!j.contains("shared_expert_intermediate_size") || !j["shared_expert_intermediate_size"].is_number() ||
                     j["shared_expert_intermediate_size"].get<double>() != 0,
                 "hf_import", where, ": shared_expert_intermediate_size 0 (no shared expert) is not supported");
    c.d_ff = get_size(j, "shared_expert_intermediate_size", where);
    info.shared_expert = true;
    info.norm_topk_prob = get_flag(j, "norm_topk_prob", false, where);
    c.attn_bias = get_flag(j, "qkv_bias", true, where);
    MIXMOE_CHECK(!get_flag(j, "use_sliding_window", false, where), "hf_import", where,
                 ": use_sliding_window is not supported");
    if (j.contains("decoder_sparse_step") && !j["decoder_sparse_step"].is_null())
      MIXMOE_CHECK(get_size(j, "decoder_sparse_step", where) == 1, "hf_import", where, ": decoder_sparse_step ",
                   j["decoder_sparse_step"].dump(),
                   " is not supported: it makes some layers dense MLPs (only 1, every layer MoE)");
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null())
      MIXMOE_CHECK(j["mlp_only_layers"].is_array() && j["mlp_only_layers"].empty(), "hf_import", where,
                   ": mlp_only_layers ", j["mlp_only_layers"].dump(),
                   " is not supported: dense MLP layers among the MoE layers (only [])");
  } else {  // olmoe
    experts = get_size(j, "num_experts", where);
    m.expert_hidden = c.d_ff = get_size(j, "intermediate_size", where);
    info.norm_topk_prob = get_flag(j, "norm_topk_prob", false, where);
    c.qk_norm = true;
    MIXMOE_CHECK(!get_flag(j, "attention_bias", false, where), "hf_import", where,
                 ": attention_bias is not supported for olmoe");
    MIXMOE_CHECK(!j.contains("clip_qkv") || j["clip_qkv"].is_null(), "hf_import", where, ": clip_qkv ",
                 j.contains("clip_qkv") ? j["clip_qkv"].dump() : "", " is not supported (only null)");
  }
  m.experts_per_group = {experts};
  MIXMOE_CHECK(m.top_k <= experts, "hf_import", where, ": num_experts_per_tok ", m.top_k, " exceeds the ", experts,
               " experts");
  detail::hf::check_common_and_validate(j, c, where);
  return info;
}

/// The ModelConfig of an HF MoE checkpoint directory (hf_moe_info(dir).config).
inline ModelConfig hf_moe_config(const std::filesystem::path& dir) { return hf_moe_info(dir).config; }

/// HF tensor name -> mixmoe parameter name, for the checkpoint described by `info`.
inline std::map<std::string, std::string> hf_moe_name_map(const HFMoEInfo& info) {
  const ModelConfig& cfg = info.config;
  std::map<std::string, std::string> m;
  m["model.embed_tokens.weight"] = "embed.weight";
  const bool mixtral = info.model_type == "mixtral";
  const index_t experts = cfg.moe.experts_per_group.at(0);
  for (index_t i = 0; i < cfg.layers; ++i) {
    const std::string hf = "model.layers." + std::to_string(i) + ".", ours = "layers." + std::to_string(i) + ".";
    m[hf + "input_layernorm.weight"] = ours + "norm1.weight";
    m[hf + "post_attention_layernorm.weight"] = ours + "norm2.weight";
    for (const char* p : {"q", "k", "v", "o"}) {
      m[hf + "self_attn." + p + "_proj.weight"] = ours + "attn.w" + p + ".weight";
      if (cfg.attn_bias && std::string(p) != "o")
        m[hf + "self_attn." + p + "_proj.bias"] = ours + "attn.w" + p + ".bias";
    }
    if (cfg.qk_norm)
      for (const char* p : {"q", "k"}) m[hf + "self_attn." + p + "_norm.weight"] = ours + "attn." + p + "_norm.weight";
    const std::string moe = hf + (mixtral ? "block_sparse_moe." : "mlp.");
    m[moe + "gate.weight"] = ours + "ffn.router.weight";
    for (index_t e = 0; e < experts; ++e) {
      const std::string he = moe + "experts." + std::to_string(e) + ".",
                        oe = ours + "ffn.generic.experts." + std::to_string(e) + ".";
      if (mixtral) {
        m[he + "w1.weight"] = oe + "w_gate.weight";
        m[he + "w3.weight"] = oe + "w_up.weight";
        m[he + "w2.weight"] = oe + "w_down.weight";
      } else {
        for (const char* p : {"gate", "up", "down"}) m[he + p + "_proj.weight"] = oe + "w_" + p + ".weight";
      }
    }
    if (info.shared_expert) {
      for (const char* p : {"gate", "up", "down"})
        m[moe + "shared_expert." + p + "_proj.weight"] = ours + "ffn.shared_expert.w_" + p + ".weight";
      m[moe + "shared_expert_gate.weight"] = ours + "ffn.shared_expert_gate.weight";
    }
  }
  m["model.norm.weight"] = "norm.weight";
  if (!cfg.tie_embeddings) m["lm_head.weight"] = "head.weight";
  return m;
}

namespace detail::hf_moe {

/// The routed MoE layer type of an FFN: itself, or the MoE inside a SharedExpertMoE.
template <class FFN>
struct routed_of {
  using type = FFN;
};
template <class MoE, class Expert, bool Gated>
struct routed_of<SharedExpertMoE<MoE, Expert, Gated>> {
  using type = MoE;
};

template <class Want>
void check_same(const char* field, const Want& model, const Want& checkpoint, const std::string& where) {
  MIXMOE_CHECK(model == checkpoint, "hf_import", where, ": the model was built with ", field, " ", model,
               ", the checkpoint has ", checkpoint, " (build the model from hf_moe_config())");
}

}  // namespace detail::hf_moe

/// Loads the weights of an HF Mixtral / Qwen2-MoE / OLMoE checkpoint directory into a model of
/// the matching type (HFMixtral, HFQwen2MoE, HFOLMoE) built from hf_moe_config(dir). Every
/// expected tensor must be present with its shape, and every parameter of the model must get one;
/// an unexpected tensor is an error (rotary inv_freq buffers and a tied lm_head.weight are ignored).
template <class Attn, class FFN>
void load_hf_moe(DecoderLM<Attn, FFN>& model, const std::filesystem::path& dir) {
  using T = typename DecoderLM<Attn, FFN>::value_type;
  static_assert(std::is_same_v<typename DecoderLM<Attn, FFN>::device_type, Cpu>,
                "load_hf_moe: load into a Cpu model (then move it)");
  static_assert(std::is_same_v<Attn, CausalSelfAttention<T>>, "load_hf_moe: the attention must be CausalSelfAttention");
  constexpr bool has_shared = is_shared_expert_moe_v<FFN>;
  using Routed = typename detail::hf_moe::routed_of<FFN>::type;
  static_assert(is_mixed_moe_v<Routed> && Routed::num_groups == 1,
                "load_hf_moe: the FFN must be a MixedMoE with one expert group (HFMixtral, HFOLMoE) or a "
                "SharedExpertMoE over one (HFQwen2MoE)");
  static_assert(
      requires(const typename Routed::router_type& r) {
        { r.renormalize } -> std::convertible_to<bool>;
      },
      "load_hf_moe: the router must be a TopKRouter (TopK<0, NormTopK>)");

  const HFMoEInfo info = hf_moe_info(dir);
  const std::string where = dir.string();
  const std::string alias = info.model_type == "mixtral" ? "HFMixtral<T>"
                            : info.model_type == "olmoe"
                                ? (info.norm_topk_prob ? "HFOLMoE<T, true>" : "HFOLMoE<T>")
                                : (info.norm_topk_prob ? "HFQwen2MoE<T, true>" : "HFQwen2MoE<T>");
  MIXMOE_CHECK(has_shared == info.shared_expert, "hf_import", where, ": a ", info.model_type, " checkpoint ",
               info.shared_expert ? "has a shared expert" : "has no shared expert", ", the model ",
               has_shared ? "has one" : "has none", "; build a ", alias);
  const ModelConfig& mc = model.config;
  const ModelConfig& hc = info.config;
  using detail::hf_moe::check_same;
  check_same("vocab", mc.vocab, hc.vocab, where);
  check_same("d_model", mc.d_model, hc.d_model, where);
  check_same("layers", mc.layers, hc.layers, where);
  check_same("heads", mc.heads, hc.heads, where);
  check_same("kv_heads", mc.kv_head_count(), hc.kv_head_count(), where);
  check_same("d_ff", mc.d_ff, hc.d_ff, where);
  check_same("moe.expert_hidden", mc.moe.expert_hidden, hc.moe.expert_hidden, where);
  check_same("moe.top_k", mc.moe.top_k, hc.moe.top_k, where);
  check_same("moe.capacity_factor", mc.moe.capacity_factor, hc.moe.capacity_factor, where);
  check_same("norm_eps", mc.norm_eps, hc.norm_eps, where);
  check_same("rope_theta", mc.rope_theta, hc.rope_theta, where);
  check_same("attn_bias", mc.attn_bias, hc.attn_bias, where);
  check_same("qk_norm", mc.qk_norm, hc.qk_norm, where);
  check_same("tie_embeddings", mc.tie_embeddings, hc.tie_embeddings, where);
  MIXMOE_CHECK(mc.moe.experts_per_group == hc.moe.experts_per_group, "hf_import", where, ": the model was built with ",
               mc.moe.experts_per_group.size() == 1 ? std::to_string(mc.moe.experts_per_group[0]) : "other",
               " experts, the checkpoint has ", hc.moe.experts_per_group[0], " (build the model from hf_moe_config())");
  for (auto& block : model.blocks) {
    const Routed* layer = nullptr;
    if constexpr (has_shared)
      layer = &block.ffn.moe;
    else
      layer = &block.ffn;
    for (const auto& r : layer->routers) {
      MIXMOE_CHECK(r.renormalize == info.norm_topk_prob, "hf_import", where, ": the checkpoint's routing ",
                   info.norm_topk_prob ? "renormalises" : "does not renormalise",
                   " the top-k gates (norm_topk_prob), the model's router ", r.renormalize ? "does" : "does not",
                   "; build a ", alias);
    }
  }

  const auto names = hf_moe_name_map(info);
  std::map<std::string, Var<T, Cpu>*> params;
  model.visit_parameters([&](const std::string& name, Var<T, Cpu>& p) { params[name] = &p; }, "");
  std::set<std::string> targets;
  for (const auto& [hf, ours] : names) {
    MIXMOE_CHECK(params.count(ours), "hf_import", "the model has no parameter '", ours, "' for ", hf, " (build a ",
                 alias, " from hf_moe_config())");
    targets.insert(ours);
  }
  for (const auto& [name, p] : params)
    MIXMOE_CHECK(targets.count(name), "hf_import", "the model's parameter '", name, "' has no tensor in a ",
                 info.model_type, " checkpoint (build a ", alias, " from hf_moe_config())");
  detail::hf::load_tensors<T>(names, params, dir, hc.tie_embeddings,
                                  "a " + std::to_string(hc.layers) + "-layer " + info.model_type + " model with " +
                                      std::to_string(hc.moe.experts_per_group[0]) + " experts");
}

}  // namespace mixmoe
