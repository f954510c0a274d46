// HF MoE import (Mixtral, Qwen2-MoE, OLMoE): tiny checkpoints written here, loaded, and their
// logits checked against a naive reference forward written from the raw arrays; errors for
// missing tensors, wrong shapes, unsupported options and mismatched model types; the attention's
// q/k norm and the shared-expert layer by gradcheck; the SentencePiece tokenizer of a checkpoint.
#include "test_util.hpp"

#include <mixmoe/io/atomic_file.hpp>
#include <mixmoe/io/hf_moe_import.hpp>
#include <mixmoe/io/hf_tokenizer.hpp>
#include <mixmoe/io/safetensors.hpp>
#include <mixmoe/moe/shared_expert.hpp>

#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>
#include <string>
#include <unordered_map>

// Everything in a namespace of this file's own: the unity build compiles several test files
// as one translation unit, where helpers of the same name in anonymous namespaces would clash.
namespace test_hf_moe {

using namespace mixmoe;
using namespace mixmoe::test;
namespace fs = std::filesystem;
using nlohmann::json;


using Vec = std::vector<double>;

/// A tiny HF MoE checkpoint (random weights) and its reference forward.
struct HfMoE {
  std::string type;  // mixtral, qwen2_moe, olmoe
  index_t vocab = 17, hidden = 8, layers = 2, heads = 2, kv_heads = 1, experts = 4, top_k = 2, inter = 6,
          shared_inter = 10;
  double eps = 1e-5, theta = 5000.0;
  bool norm_topk = false, tied = false;
  std::map<std::string, Vec> w;
  std::map<std::string, Shape> shapes;

  explicit HfMoE(std::string t) : type(std::move(t)) { norm_topk = type == "mixtral"; }

  [[nodiscard]] std::string moe_prefix(index_t l) const {
    return "model.layers." + std::to_string(l) + (type == "mixtral" ? ".block_sparse_moe." : ".mlp.");
  }
  [[nodiscard]] std::string expert_name(index_t l, index_t e, const char* which) const {  // gate, up, down
    const std::string p = moe_prefix(l) + "experts." + std::to_string(e) + ".";
    if (type != "mixtral") return p + which + "_proj.weight";
    const std::string s(which);
    return p + (s == "gate" ? "w1" : s == "up" ? "w3" : "w2") + ".weight";
  }

  void make(std::uint64_t seed) {
    Generator g(seed);
    const index_t dh = hidden / heads;
    auto add = [&](const std::string& name, Shape s, double mean, double std) {
      Vec v(static_cast<std::size_t>(s.numel()));
      for (auto& x : v) x = static_cast<float>(g.normal(mean, std));  // the values an F32 file holds exactly
      w[name] = v;
      shapes[name] = s;
    };
    add("model.embed_tokens.weight", {vocab, hidden}, 0, 0.5);
    for (index_t i = 0; i < layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      add(p + "input_layernorm.weight", {hidden}, 1, 0.2);
      add(p + "post_attention_layernorm.weight", {hidden}, 1, 0.2);
      add(p + "self_attn.q_proj.weight", {heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.k_proj.weight", {kv_heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.v_proj.weight", {kv_heads * dh, hidden}, 0, 0.3);
      add(p + "self_attn.o_proj.weight", {hidden, heads * dh}, 0, 0.3);
      if (type == "qwen2_moe") {
        add(p + "self_attn.q_proj.bias", {heads * dh}, 0, 0.3);
        add(p + "self_attn.k_proj.bias", {kv_heads * dh}, 0, 0.3);
        add(p + "self_attn.v_proj.bias", {kv_heads * dh}, 0, 0.3);
      }
      if (type == "olmoe") {
        add(p + "self_attn.q_norm.weight", {heads * dh}, 1, 0.2);
        add(p + "self_attn.k_norm.weight", {kv_heads * dh}, 1, 0.2);
      }
      add(moe_prefix(i) + "gate.weight", {experts, hidden}, 0, 0.8);
      for (index_t e = 0; e < experts; ++e) {
        add(expert_name(i, e, "gate"), {inter, hidden}, 0, 0.3);
        add(expert_name(i, e, "up"), {inter, hidden}, 0, 0.3);
        add(expert_name(i, e, "down"), {hidden, inter}, 0, 0.3);
      }
      if (type == "qwen2_moe") {
        const std::string s = moe_prefix(i) + "shared_expert.";
        add(s + "gate_proj.weight", {shared_inter, hidden}, 0, 0.3);
        add(s + "up_proj.weight", {shared_inter, hidden}, 0, 0.3);
        add(s + "down_proj.weight", {hidden, shared_inter}, 0, 0.3);
        add(moe_prefix(i) + "shared_expert_gate.weight", {1, hidden}, 0, 0.5);
      }
    }
    add("model.norm.weight", {hidden}, 1, 0.2);
    if (!tied) add("lm_head.weight", {vocab, hidden}, 0, 0.3);
  }

  [[nodiscard]] json config() const {
    json j = {{"model_type", type},
              {"hidden_size", hidden},
              {"num_hidden_layers", layers},
              {"num_attention_heads", heads},
              {"num_key_value_heads", kv_heads},
              {"vocab_size", vocab},
              {"rms_norm_eps", eps},
              {"rope_theta", theta},
              {"hidden_act", "silu"},
              {"rope_scaling", nullptr},
              {"tie_word_embeddings", tied},
              {"num_experts_per_tok", top_k},
              {"torch_dtype", "bfloat16"}};
    if (type == "mixtral") {
      j["num_local_experts"] = experts;
      j["intermediate_size"] = inter;
      j["sliding_window"] = nullptr;
      j["router_jitter_noise"] = 0.0;
    } else if (type == "qwen2_moe") {
      j["num_experts"] = experts;
      j["moe_intermediate_size"] = inter;
      j["shared_expert_intermediate_size"] = shared_inter;
      j["intermediate_size"] = 3 * inter;  // dense MLP width, unused when every layer is MoE
      j["norm_topk_prob"] = norm_topk;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = json::array();
      j["use_sliding_window"] = false;
      j["sliding_window"] = 4096;
    } else {
      j["num_experts"] = experts;
      j["intermediate_size"] = inter;
      j["norm_topk_prob"] = norm_topk;
      j["clip_qkv"] = nullptr;
      j["attention_bias"] = false;
    }
    return j;
  }

  void save(const fs::path& dir, int shards = 1, const std::string& skip = "") const {
    fs::create_directories(dir);
    write_file_atomic(dir / "config.json", config().dump(2));
    std::vector<SafetensorsWriter> ws(static_cast<std::size_t>(shards));
    json weight_map = json::object();
    std::size_t k = 0;
    auto file = [&](std::size_t s) {
      return "model-0000" + std::to_string(s + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    };
    for (const auto& [name, v] : w) {
      if (name == skip) continue;
      const std::size_t s = k++ % ws.size();
      ws[s].add(name, Tensor<double>::from(v, shapes.at(name)), Dtype::F32);
      weight_map[name] = file(s);
    }
    if (shards == 1) {
      ws[0].write(dir / "model.safetensors");
      return;
    }
    for (std::size_t s = 0; s < ws.size(); ++s) ws[s].write(dir / file(s));
    write_file_atomic(dir / "model.safetensors.index.json", json{{"weight_map", weight_map}}.dump());
  }

  [[nodiscard]] const double* at(const std::string& name) const { return w.at(name).data(); }

  // y (n, out) = x (n, in) W^T (+ b)
  static Vec lin(const Vec& x, index_t n, index_t in, const double* W, index_t out, const double* b = nullptr) {
    Vec y(static_cast<std::size_t>(n * out));
    for (index_t r = 0; r < n; ++r)
      for (index_t o = 0; o < out; ++o) {
        double s = b ? b[o] : 0.0;
        for (index_t i = 0; i < in; ++i) s += x[static_cast<std::size_t>(r * in + i)] * W[o * in + i];
        y[static_cast<std::size_t>(r * out + o)] = s;
      }
    return y;
  }

  // RMSNorm of the rows (n, width) of x
  [[nodiscard]] Vec rms(const Vec& x, index_t n, index_t width, const double* wt) const {
    Vec y(x.size());
    for (index_t r = 0; r < n; ++r) {
      double ms = 0;
      for (index_t c = 0; c < width; ++c)
        ms += x[static_cast<std::size_t>(r * width + c)] * x[static_cast<std::size_t>(r * width + c)];
      const double inv = 1.0 / std::sqrt(ms / static_cast<double>(width) + eps);
      for (index_t c = 0; c < width; ++c)
        y[static_cast<std::size_t>(r * width + c)] = x[static_cast<std::size_t>(r * width + c)] * inv * wt[c];
    }
    return y;
  }

  // rotate_half RoPE on rows (T, nh * dh) in place.
  void rope(Vec& x, index_t t_len, index_t nh) const {
    const index_t dh = hidden / heads, half = dh / 2;
    for (index_t t = 0; t < t_len; ++t)
      for (index_t h = 0; h < nh; ++h)
        for (index_t i = 0; i < half; ++i) {
          const double a =
              static_cast<double>(t) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
          double& x1 = x[static_cast<std::size_t>(t * nh * dh + h * dh + i)];
          double& x2 = x[static_cast<std::size_t>(t * nh * dh + h * dh + i + half)];
          const double r1 = x1 * std::cos(a) - x2 * std::sin(a), r2 = x2 * std::cos(a) + x1 * std::sin(a);
          x1 = r1;
          x2 = r2;
        }
  }

  // SwiGLU of one row h (C): down(silu(gate h) * up h)
  [[nodiscard]] Vec swiglu(const Vec& h, const double* g, const double* u, const double* d, index_t width) const {
    const Vec gt = lin(h, 1, hidden, g, width);
    Vec up = lin(h, 1, hidden, u, width);
    for (std::size_t i = 0; i < up.size(); ++i) up[i] *= gt[i] / (1.0 + std::exp(-gt[i]));
    return lin(up, 1, width, d, hidden);
  }

  // The MoE block of layer l on one row h (C).
  [[nodiscard]] Vec moe(index_t l, const Vec& h) const {
    const Vec logits = lin(h, 1, hidden, at(moe_prefix(l) + "gate.weight"), experts);
    const double mx = *std::max_element(logits.begin(), logits.end());
    Vec p(logits.size());
    double z = 0;
    for (std::size_t e = 0; e < p.size(); ++e) z += (p[e] = std::exp(logits[e] - mx));
    for (auto& v : p) v /= z;
    std::vector<index_t> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](index_t a, index_t b) { return p[static_cast<std::size_t>(a)] > p[static_cast<std::size_t>(b)]; });
    double sum = 0;
    for (index_t k = 0; k < top_k; ++k) sum += p[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])];
    Vec y(static_cast<std::size_t>(hidden), 0.0);
    for (index_t k = 0; k < top_k; ++k) {
      const index_t e = order[static_cast<std::size_t>(k)];
      const double gate = p[static_cast<std::size_t>(e)] / (norm_topk ? sum : 1.0);
      const Vec o =
          swiglu(h, at(expert_name(l, e, "gate")), at(expert_name(l, e, "up")), at(expert_name(l, e, "down")), inter);
      for (index_t c = 0; c < hidden; ++c) y[static_cast<std::size_t>(c)] += gate * o[static_cast<std::size_t>(c)];
    }
    if (type == "qwen2_moe") {
      const std::string s = moe_prefix(l) + "shared_expert.";
      const Vec o =
          swiglu(h, at(s + "gate_proj.weight"), at(s + "up_proj.weight"), at(s + "down_proj.weight"), shared_inter);
      const double gl = lin(h, 1, hidden, at(moe_prefix(l) + "shared_expert_gate.weight"), 1)[0];
      const double sg = 1.0 / (1.0 + std::exp(-gl));
      for (index_t c = 0; c < hidden; ++c) y[static_cast<std::size_t>(c)] += sg * o[static_cast<std::size_t>(c)];
    }
    return y;
  }

  /// Logits (T, vocab) of one sequence.
  [[nodiscard]] Vec forward(const std::vector<int>& ids) const {
    const auto T = static_cast<index_t>(ids.size());
    const index_t dh = hidden / heads, rep = heads / kv_heads;
    Vec x(static_cast<std::size_t>(T * hidden));
    for (index_t t = 0; t < T; ++t)
      for (index_t c = 0; c < hidden; ++c)
        x[static_cast<std::size_t>(t * hidden + c)] =
            at("model.embed_tokens.weight")[ids[static_cast<std::size_t>(t)] * hidden + c];
    for (index_t l = 0; l < layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      auto bias = [&](const char* n) {
        return type == "qwen2_moe" ? at(p + "self_attn." + n + "_proj.bias") : nullptr;
      };
      const Vec h = rms(x, T, hidden, at(p + "input_layernorm.weight"));
      Vec q = lin(h, T, hidden, at(p + "self_attn.q_proj.weight"), heads * dh, bias("q"));
      Vec k = lin(h, T, hidden, at(p + "self_attn.k_proj.weight"), kv_heads * dh, bias("k"));
      const Vec v = lin(h, T, hidden, at(p + "self_attn.v_proj.weight"), kv_heads * dh, bias("v"));
      if (type == "olmoe") {  // over the whole projections, before the heads are split
        q = rms(q, T, heads * dh, at(p + "self_attn.q_norm.weight"));
        k = rms(k, T, kv_heads * dh, at(p + "self_attn.k_norm.weight"));
      }
      rope(q, T, heads);
      rope(k, T, kv_heads);
      Vec o(static_cast<std::size_t>(T * heads * dh), 0.0);
      for (index_t hh = 0; hh < heads; ++hh) {
        const index_t kh = hh / rep;
        for (index_t t = 0; t < T; ++t) {
          Vec s(static_cast<std::size_t>(t + 1));
          double mx = -INFINITY;
          for (index_t j = 0; j <= t; ++j) {
            double d = 0;
            for (index_t i = 0; i < dh; ++i)
              d += q[static_cast<std::size_t>(t * heads * dh + hh * dh + i)] *
                   k[static_cast<std::size_t>(j * kv_heads * dh + kh * dh + i)];
            s[static_cast<std::size_t>(j)] = d / std::sqrt(static_cast<double>(dh));
            mx = std::max(mx, s[static_cast<std::size_t>(j)]);
          }
          double z = 0;
          for (auto& e : s) z += (e = std::exp(e - mx));
          for (index_t j = 0; j <= t; ++j)
            for (index_t i = 0; i < dh; ++i)
              o[static_cast<std::size_t>(t * heads * dh + hh * dh + i)] +=
                  s[static_cast<std::size_t>(j)] / z * v[static_cast<std::size_t>(j * kv_heads * dh + kh * dh + i)];
        }
      }
      const Vec ao = lin(o, T, heads * dh, at(p + "self_attn.o_proj.weight"), hidden);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] += ao[i];
      const Vec h2 = rms(x, T, hidden, at(p + "post_attention_layernorm.weight"));
      for (index_t t = 0; t < T; ++t) {
        const Vec row(h2.begin() + t * hidden, h2.begin() + (t + 1) * hidden);
        const Vec y = moe(l, row);
        for (index_t c = 0; c < hidden; ++c)
          x[static_cast<std::size_t>(t * hidden + c)] += y[static_cast<std::size_t>(c)];
      }
    }
    const Vec hf = rms(x, T, hidden, at("model.norm.weight"));
    return lin(hf, T, hidden, at(tied ? "model.embed_tokens.weight" : "lm_head.weight"), vocab);
  }
};

template <class Model>
double max_diff_to_reference(const HfMoE& ref, Model& model, const std::vector<int>& ids) {
  no_grad ng;
  const auto logits =
      model(Tensor<Index>::from_indices(ids, {1, static_cast<index_t>(ids.size())})).value().to_vector();
  const auto want = ref.forward(ids);
  REQUIRE(logits.size() == want.size());
  double m = 0;
  for (std::size_t i = 0; i < want.size(); ++i) m = std::max(m, std::abs(logits[i] - want[i]));
  return m;
}

const std::vector<int> kIds{3, 16, 0, 7, 7, 2, 9, 11};

/// Loads ref's checkpoint in `dir` into a fresh Model and checks the logits against the reference.
template <class Model>
void check_import(const HfMoE& ref, const fs::path& dir) {
  Model model(hf_moe_config(dir));
  REQUIRE(max_diff_to_reference(ref, model, kIds) > 1e-2);  // random init is far off
  load_hf_moe(model, dir);
  const double d = max_diff_to_reference(ref, model, kIds);
  INFO("max |logit difference| " << d);
  REQUIRE(d < 1e-10);
}

TEST_CASE("HF MoE import: Mixtral (renormalised top-2, sharded) matches a naive reference forward", "[hf][moe]") {
  TempDir dir("hfmoe_mixtral");
  HfMoE ref("mixtral");
  ref.make(21);
  ref.save(dir.path / "one");
  ref.save(dir.path / "sharded", 3);
  const HFMoEInfo info = hf_moe_info(dir.path / "one");
  REQUIRE(info.model_type == "mixtral");
  REQUIRE(info.norm_topk_prob);
  REQUIRE(!info.shared_expert);
  const ModelConfig& c = info.config;
  REQUIRE(c.d_model == 8);
  REQUIRE(c.kv_heads == 1);
  REQUIRE(c.d_ff == 6);
  REQUIRE(c.moe.expert_hidden == 6);
  REQUIRE(c.moe.experts_per_group == std::vector<index_t>{4});
  REQUIRE(c.moe.top_k == 2);
  REQUIRE(c.moe.capacity_factor == 0.0);
  REQUIRE(!c.attn_bias);
  REQUIRE(!c.qk_norm);
  REQUIRE(c.norm_eps == 1e-5);
  REQUIRE(c.rope_theta == 5000.0);
  const auto names = hf_moe_name_map(info);
  REQUIRE(names.at("model.layers.1.block_sparse_moe.experts.2.w1.weight") ==
          "layers.1.ffn.generic.experts.2.w_gate.weight");
  REQUIRE(names.at("model.layers.1.block_sparse_moe.experts.2.w3.weight") ==
          "layers.1.ffn.generic.experts.2.w_up.weight");
  REQUIRE(names.at("model.layers.0.block_sparse_moe.gate.weight") == "layers.0.ffn.router.weight");
  for (const char* sub : {"one", "sharded"}) {
    INFO(sub);
    check_import<HFMixtral<double>>(ref, dir.path / sub);
  }

  // Errors: a missing tensor, a wrong shape, an unexpected tensor, named.
  HFMixtral<double> model(hf_moe_config(dir.path / "one"));
  ref.save(dir.path / "missing", 1, "model.layers.1.block_sparse_moe.experts.3.w2.weight");
  MIXMOE_REQUIRE_ERROR(load_hf_moe(model, dir.path / "missing"),
                       "1 tensor(s) missing: model.layers.1.block_sparse_moe.experts.3.w2.weight");
  HfMoE wrong = ref;
  wrong.w["model.layers.0.block_sparse_moe.gate.weight"].resize(3 * 8);
  wrong.shapes["model.layers.0.block_sparse_moe.gate.weight"] = Shape{3, 8};
  wrong.save(dir.path / "shape");
  MIXMOE_REQUIRE_ERROR(load_hf_moe(model, dir.path / "shape"),
                       "tensor 'model.layers.0.block_sparse_moe.gate.weight' has shape (3, 8), expected (4, 8)");
  HfMoE extra = ref;
  extra.w["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = Vec(48, 0.0);
  extra.shapes["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = Shape{6, 8};
  extra.save(dir.path / "extra");
  MIXMOE_REQUIRE_ERROR(load_hf_moe(model, dir.path / "extra"),
                       "unexpected tensor 'model.layers.0.block_sparse_moe.experts.4.w1.weight' for a 2-layer mixtral "
                       "model with 4 experts");

  // Refused options.
  json cfg = ref.config();
  auto with_config = [&](const json& j) {
    write_file_atomic(dir.path / "one" / "config.json", j.dump());
    return hf_moe_info(dir.path / "one");
  };
  cfg["model_type"] = "deepseek_v2";
  MIXMOE_REQUIRE_ERROR(with_config(cfg),
                       "unsupported model_type 'deepseek_v2' (supported MoE types: mixtral, qwen2_moe, olmoe)");
  cfg = ref.config();
  cfg["sliding_window"] = 4096;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "sliding_window 4096 is not supported");
  cfg = ref.config();
  cfg["num_experts_per_tok"] = 5;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "num_experts_per_tok 5 exceeds the 4 experts");
  cfg = ref.config();
  cfg.erase("num_local_experts");
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "missing 'num_local_experts'");
  // Absent fields take MixtralConfig's defaults: 8 kv heads, eps 1e-5, theta 1e6.
  cfg = ref.config();
  cfg["num_attention_heads"] = 16;
  cfg["hidden_size"] = 32;
  for (const char* k : {"num_key_value_heads", "rms_norm_eps", "rope_theta"}) cfg.erase(k);
  {
    const ModelConfig c = with_config(cfg).config;
    REQUIRE(c.kv_heads == 8);
    REQUIRE(c.norm_eps == 1e-5);
    REQUIRE(c.rope_theta == 1e6);
  }
  // A model built with other sizes is refused before any tensor is read.
  cfg = ref.config();
  cfg["num_local_experts"] = 8;
  write_file_atomic(dir.path / "one" / "config.json", cfg.dump());
  MIXMOE_REQUIRE_ERROR(load_hf_moe(model, dir.path / "one"),
                       "the model was built with 4 experts, the checkpoint has 8");
}

TEST_CASE("HF MoE import: Qwen2-MoE (q/k/v biases, sigmoid-gated shared expert, gates not renormalised)", "[hf][moe]") {
  TempDir dir("hfmoe_qwen2moe");
  HfMoE ref("qwen2_moe");
  ref.tied = true;
  ref.make(22);
  ref.save(dir.path / "q");
  const HFMoEInfo info = hf_moe_info(dir.path / "q");
  REQUIRE(info.shared_expert);
  REQUIRE(!info.norm_topk_prob);
  REQUIRE(info.config.attn_bias);
  REQUIRE(info.config.tie_embeddings);
  REQUIRE(info.config.d_ff == 10);  // the shared expert's width
  REQUIRE(info.config.moe.expert_hidden == 6);
  check_import<HFQwen2MoE<double>>(ref, dir.path / "q");
  {
    HFQwen2MoE<double> model(hf_moe_config(dir.path / "q"));
    load_hf_moe(model, dir.path / "q");
    REQUIRE(model.blocks[1].ffn.shared_expert_gate.weight.value().to_vector()[3] ==
            ref.w.at("model.layers.1.mlp.shared_expert_gate.weight")[3]);
    REQUIRE(count_moe_layers(model) == 2);  // the routed layers are found inside the shared-expert FFN
  }
  // A qwen2_moe checkpoint into a type without the shared expert, and the reverse.
  {
    HFOLMoE<double> other(hf_moe_config(dir.path / "q"));
    MIXMOE_REQUIRE_ERROR(load_hf_moe(other, dir.path / "q"),
                         "a qwen2_moe checkpoint has a shared expert, the model has none; build a HFQwen2MoE<T>");
  }
  // Layouts with dense layers are refused.
  json cfg = ref.config();
  auto with_config = [&](const json& j) {
    write_file_atomic(dir.path / "q" / "config.json", j.dump());
    return hf_moe_info(dir.path / "q");
  };
  cfg["decoder_sparse_step"] = 2;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "decoder_sparse_step 2 is not supported");
  cfg = ref.config();
  cfg["mlp_only_layers"] = {1};
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "mlp_only_layers [1] is not supported");
  cfg = ref.config();
  cfg["use_sliding_window"] = true;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "use_sliding_window is not supported");
  cfg = ref.config();
  cfg["shared_expert_intermediate_size"] = 0;
  MIXMOE_REQUIRE_ERROR(with_config(cfg), "shared_expert_intermediate_size 0 (no shared expert) is not supported");
  // Absent fields take Qwen2MoeConfig's defaults: 16 kv heads, eps 1e-6, theta 1e4.
  cfg = ref.config();
  cfg["num_attention_heads"] = 16;
  cfg["hidden_size"] = 32;
  for (const char* k : {"num_key_value_heads", "rms_norm_eps", "rope_theta", "norm_topk_prob"}) cfg.erase(k);
  {
    const HFMoEInfo d = with_config(cfg);
    REQUIRE(d.config.kv_heads == 16);
    REQUIRE(d.config.norm_eps == 1e-6);
    REQUIRE(d.config.rope_theta == 10000.0);
    REQUIRE(!d.norm_topk_prob);
  }
}

TEST_CASE("HF MoE import: OLMoE (q/k norms over the whole projections), with and without norm_topk_prob", "[hf][moe]") {
  TempDir dir("hfmoe_olmoe");
  HfMoE ref("olmoe");
  ref.make(23);
  ref.save(dir.path / "plain");
  HfMoE norm = ref;
  norm.norm_topk = true;
  norm.save(dir.path / "norm");
  const HFMoEInfo info = hf_moe_info(dir.path / "plain");
  REQUIRE(info.config.qk_norm);
  REQUIRE(!info.config.attn_bias);
  REQUIRE(!info.norm_topk_prob);
  REQUIRE(hf_moe_name_map(info).at("model.layers.1.self_attn.k_norm.weight") == "layers.1.attn.k_norm.weight");
  check_import<HFOLMoE<double>>(ref, dir.path / "plain");
  check_import<HFOLMoE<double, true>>(norm, dir.path / "norm");
  // The two routings differ on these weights: the gates' normalisation matters.
  {
    HFOLMoE<double, true> model(hf_moe_config(dir.path / "norm"));
    load_hf_moe(model, dir.path / "norm");
    REQUIRE(max_diff_to_reference(ref, model, kIds) > 1e-3);
    // A checkpoint whose routing does not renormalise, into a model that does: refused, naming the type.
    MIXMOE_REQUIRE_ERROR(load_hf_moe(model, dir.path / "plain"),
                         "does not renormalise the top-k gates (norm_topk_prob), the model's router does; build a "
                         "HFOLMoE<T>");
  }
  json cfg = ref.config();
  cfg["clip_qkv"] = 8.0;
  write_file_atomic(dir.path / "plain" / "config.json", cfg.dump());
  MIXMOE_REQUIRE_ERROR(hf_moe_info(dir.path / "plain"), "clip_qkv 8.0 is not supported");
  // Absent fields take OlmoeConfig's defaults: one kv head per query head (also for null), eps 1e-5, theta 1e4.
  cfg = ref.config();
  for (const char* k : {"num_key_value_heads", "rms_norm_eps", "rope_theta", "norm_topk_prob"}) cfg.erase(k);
  write_file_atomic(dir.path / "plain" / "config.json", cfg.dump());
  {
    const HFMoEInfo d = hf_moe_info(dir.path / "plain");
    REQUIRE(d.config.kv_heads == 2);
    REQUIRE(d.config.norm_eps == 1e-5);
    REQUIRE(d.config.rope_theta == 10000.0);
    REQUIRE(!d.norm_topk_prob);
  }
  cfg["num_key_value_heads"] = nullptr;
  write_file_atomic(dir.path / "plain" / "config.json", cfg.dump());
  REQUIRE(hf_moe_info(dir.path / "plain").config.kv_heads == 2);
}

TEST_CASE("CausalSelfAttention with qk_norm: RMSNorm over the whole q and k projections, gradients", "[nn][hf]") {
  ModelConfig cfg;
  cfg.vocab = 5;
  cfg.d_model = 8;
  cfg.heads = 2;
  cfg.kv_heads = 1;
  cfg.layers = 1;
  cfg.d_ff = 4;
  cfg.qk_norm = true;
  cfg.norm_eps = 0.0;  // exact scale invariance below
  Generator gen(5);
  const CausalSelfAttention<double> base(cfg, gen);
  std::vector<std::string> names;
  CausalSelfAttention<double> probe = base;
  probe.visit_parameters([&](const std::string& n, Vd&) { names.push_back(n); }, "attn");
  REQUIRE(std::count(names.begin(), names.end(), "attn.q_norm.weight") == 1);
  REQUIRE(std::count(names.begin(), names.end(), "attn.k_norm.weight") == 1);
  REQUIRE(base.q_norm.weight.shape() == Shape{8});
  REQUIRE(base.k_norm.weight.shape() == Shape{4});
  // Without the option there are no such parameters.
  ModelConfig plain = cfg;
  plain.qk_norm = false;
  Generator gen2(5);
  const CausalSelfAttention<double> without(plain, gen2);
  REQUIRE(!without.q_norm.weight.defined());

  // Gradients w.r.t. x and both norm weights.
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        CausalSelfAttention<double> a = base;
        a.q_norm.weight = in[1];
        a.k_norm.weight = in[2];
        return a(in[0]);
      },
      (std::vector<Vd>{rand_var({2, 3, 8}, 1), rand_var({8}, 2), rand_var({4}, 3)}));

  // q_norm scales q per channel: with unit weights a scaled x gives the same output (q and k are
  // scale-free), which the plain attention does not.
  no_grad ng;
  CausalSelfAttention<double> a = base;
  const Vd x = rand_var({1, 4, 8}, 7, false);
  const auto y1 = a(x).value(), y2 = a(x * 3.0).value();
  // v is linear in x: out(3x) = 3 out(x) exactly when the attention weights do not change.
  REQUIRE(max_abs_diff(y2, (Vd(y1) * 3.0).value()) < 1e-9);
}

TEST_CASE("SharedExpertMoE: routed layer plus sigmoid-gated shared expert, gradients", "[moe][hf]") {
  ModelConfig cfg;
  cfg.vocab = 5;
  cfg.d_model = 6;
  cfg.heads = 2;
  cfg.layers = 1;
  cfg.d_ff = 5;  // the shared expert's width
  cfg.moe.experts_per_group = {3};
  cfg.moe.expert_hidden = 4;
  cfg.moe.top_k = 2;
  Generator gen(9);
  using Layer = SharedExpertMoE<HFRoutedMoE<double, false>, SwiGLU<double>>;
  const Layer base(cfg, gen);
  REQUIRE(base.shared_expert.hidden() == 5);
  REQUIRE(base.moe.group<0>()[0].hidden() == 4);
  std::vector<std::string> names;
  Layer probe = base;
  probe.visit_parameters([&](const std::string& n, Vd&) { names.push_back(n); }, "ffn");
  REQUIRE(std::count(names.begin(), names.end(), "ffn.shared_expert_gate.weight") == 1);
  REQUIRE(std::count(names.begin(), names.end(), "ffn.shared_expert.w_down.weight") == 1);
  REQUIRE(std::count(names.begin(), names.end(), "ffn.router.weight") == 1);

  // y = moe(x) + sigmoid(x w^T) * shared(x), checked row by row.
  {
    no_grad ng;
    const Vd x = rand_var({4, 6}, 3, false);
    const auto y = base(x).value().to_vector();
    const auto routed = base.moe(x).value().to_vector();
    const auto shared = base.shared_expert(x).value().to_vector();
    const auto g = base.shared_expert_gate(x).value().to_vector();
    double m = 0;
    for (index_t r = 0; r < 4; ++r)
      for (index_t c = 0; c < 6; ++c) {
        const auto i = static_cast<std::size_t>(r * 6 + c);
        m = std::max(m, std::abs(y[i] - (routed[i] + shared[i] / (1.0 + std::exp(-g[static_cast<std::size_t>(r)])))));
      }
    REQUIRE(m < 1e-12);
  }
  MIXMOE_REQUIRE_GRADCHECK(
      [&](const std::vector<Vd>& in) {
        Layer l = base;
        l.shared_expert_gate.weight = in[1];
        return l(in[0]);
      },
      (std::vector<Vd>{rand_var({4, 6}, 4), rand_var({1, 6}, 5)}));
}

TEST_CASE("HF tokenizer: a LLaMA-style SentencePiece model (no <pad>) loads, round trips", "[hf][tokenizer]") {
  TempDir dir("hfmoe_tok");
  std::vector<std::string> lines;
  for (int i = 0; i < 60; ++i)
    lines.push_back("the quick brown fox " + std::to_string(i) + " jumps over the lazy dog and the cat");
  const std::unordered_map<std::string, std::string> args = {{"vocab_size", "60"},
                                                             {"model_type", "bpe"},
                                                             {"character_coverage", "1.0"},
                                                             {"byte_fallback", "false"},
                                                             {"hard_vocab_limit", "false"},
                                                             {"unk_id", "0"},
                                                             {"bos_id", "1"},
                                                             {"eos_id", "2"},
                                                             {"pad_id", "-1"},
                                                             {"minloglevel", "1"},
                                                             {"num_threads", "1"}};
  struct Lines final : sentencepiece::SentenceIterator {
    const std::vector<std::string>* v;
    std::size_t i = 0;
    explicit Lines(const std::vector<std::string>* s) : v(s) {}
    bool done() const override { return i >= v->size(); }
    void Next() override { ++i; }
    const std::string& value() const override { return (*v)[i]; }
    sentencepiece::util::Status status() const override { return {}; }
  } it(&lines);
  std::string bytes;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &bytes);
  INFO(status.message());
  REQUIRE(status.ok());
  write_file_atomic(dir.path / "tokenizer.model", bytes);

  const HFSentencePiece tok = load_hf_sentencepiece(dir.path);
  REQUIRE(tok.bos_id() == 1);
  REQUIRE(tok.eos_id() == 2);
  REQUIRE(tok.unk_id() == 0);
  REQUIRE(tok.pad_id() == -1);
  REQUIRE(tok.piece(1) == "<s>");
  const std::string text = "the lazy fox jumps";
  const auto ids = tok.encode(text);
  REQUIRE(!ids.empty());
  REQUIRE(tok.decode(ids) == text);
  REQUIRE(std::find(ids.begin(), ids.end(), tok.bos_id()) == ids.end());  // no <s> added
  // The library's Tokenizer needs a <pad> piece, so this model is not one it loads.
  MIXMOE_REQUIRE_ERROR(Tokenizer::from_bytes(bytes, "llama-style"), "must define <unk>, </s> and <pad>");

  // A directory with only tokenizer.json, or nothing.
  TempDir bpe("hfmoe_tokjson");
  MIXMOE_REQUIRE_ERROR(load_hf_sentencepiece(bpe.path), "no tokenizer.model");
  write_file_atomic(bpe.path / "tokenizer.json", "{}");
  MIXMOE_REQUIRE_ERROR(load_hf_sentencepiece(bpe.path), "only tokenizer.json");
  write_file_atomic(bpe.path / "tokenizer.model", "not a model");
  MIXMOE_REQUIRE_ERROR(load_hf_sentencepiece(bpe.path), "not a SentencePiece model");
}

}  // namespace test_hf_moe
