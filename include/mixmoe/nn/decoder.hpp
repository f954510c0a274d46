// Decoder-only language model, composed from an attention type and an FFN type.
//
//   ids (B, T) -> embed (B, T, C) -> L x DecoderBlock -> RMSNorm -> head -> logits (B, T, V)
//   DecoderBlock (pre-norm): x += attn(norm1(x)); x += ffn(norm2(x) as (B*T, C))
//
// The FFN sees tokens as rows (N = B*T, C), which is what MoE routing wants; a
// dense FFN is indifferent. Any FFN type works that is constructible from
// (const ModelConfig&, Generator&) and callable on (N, C) -> (N, C). An FFN that is
// also callable as ffn(x, RouteContext) (the MoE layers) gets the token ids of the
// rows (hash routing needs them) and training = grad_enabled() (false under no_grad:
// evaluation and decoding).
//
// cfg.activations bf16 (float models, mixed precision): each block runs norm1, attention, norm2
// and a dense FFN on bf16 values (fp32 weights cast to bf16, fp32 compute); the residual stream
// x stays fp32, so each sublayer's output is added in fp32. An MoE FFN gets its rows in fp32
// (its routers run in fp32; moe.expert_precision bf16 runs its experts on bf16). The final norm
// and the output projection run in bf16 too, and the logits come out in fp32 for the loss. An
// attention or FFN type without a bf16 form runs in fp32 in such a model.
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/moe/routing.hpp"
#include "mixmoe/nn/attention.hpp"
#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

/// What a DecoderLM needs of its FFN type.
template <class F>
concept FeedForwardLayer = Module<F> && std::constructible_from<F, const ModelConfig&, Generator&> &&
    requires(const F& f, const Var<typename F::value_type, typename F::device_type>& x) {
      { f(x) } -> std::same_as<Var<typename F::value_type, typename F::device_type>>;
    };

template <class A>
concept AttentionLayer = Module<A> && std::constructible_from<A, const ModelConfig&, Generator&> &&
    requires(const A& a, const Var<typename A::value_type, typename A::device_type>& x,
             KVCache<typename A::value_type, typename A::device_type>* cache) {
      { a(x, cache) } -> std::same_as<Var<typename A::value_type, typename A::device_type>>;
    };

template <AttentionLayer Attn, FeedForwardLayer FFN>
struct DecoderBlock {
  using value_type = typename Attn::value_type;
  using device_type = typename Attn::device_type;
  using T = value_type;
  using D = device_type;
  static_assert(std::is_same_v<typename FFN::value_type, T> && std::is_same_v<typename FFN::device_type, D>,
                "DecoderBlock: the attention and FFN types must have the same scalar type and device");

  DecoderBlock(const ModelConfig& cfg, Generator& gen)
      : norm1(cfg.d_model, cfg.norm_eps),
        attn(cfg, gen),
        norm2(cfg.d_model, cfg.norm_eps),
        ffn(cfg, gen),
        bf16_activations(cfg.activations == ActivationPrecision::bf16) {
    MIXMOE_CHECK((!bf16_activations || std::is_same_v<T, float>), "DecoderBlock",
                 "activations bf16 needs a float model (got ", sizeof(T) * 8, "-bit)");
  }

  /// x (B, T, C) -> (B, T, C); route carries the (B*T) token ids for MoE FFNs.
  Var<T, D> operator()(const Var<T, D>& x, KVCache<T, D>* cache = nullptr, const RouteContext<D>* route = nullptr) const {
    if constexpr (std::is_same_v<T, float>)
      if (bf16_activations) return forward_bf16(x, cache, route);
    const index_t b = x.size(0), t = x.size(1), c = x.size(2);
    auto h = x + attn(norm1(x), cache);          // (B, T, C)
    auto rows = reshape(norm2(h), Shape{b * t, c});  // (B*T, C)
    return h + reshape(run_ffn(rows, route), Shape{b, t, c});
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    norm1.visit_parameters(visit, join_name(prefix, "norm1"));
    attn.visit_parameters(visit, join_name(prefix, "attn"));
    norm2.visit_parameters(visit, join_name(prefix, "norm2"));
    ffn.visit_parameters(visit, join_name(prefix, "ffn"));
  }

  RMSNorm<T, D> norm1;
  Attn attn;
  RMSNorm<T, D> norm2;
  FFN ffn;
  bool bf16_activations = false;  // cfg.activations (float models)

 private:
  Var<T, D> run_ffn(const Var<T, D>& rows, const RouteContext<D>* route) const {
    if constexpr (std::is_invocable_v<const FFN&, const Var<T, D>&, const RouteContext<D>&>)
      return route ? ffn(rows, *route) : ffn(rows);
    else
      return ffn(rows);
  }

  /// The block with bf16 sublayers around the fp32 residual stream.
  Var<T, D> forward_bf16(const Var<T, D>& x, KVCache<T, D>* cache, const RouteContext<D>* route) const {
    using B = Var<bf16, D>;
    const index_t b = x.size(0), t = x.size(1), c = x.size(2);
    Var<T, D> h;
    // add(fp32, bf16) widens the sublayer's output for the sum only: no fp32 copy of it is kept
    if constexpr (std::is_invocable_r_v<B, const Attn&, const B&, KVCache<T, D>*>)
      h = add(x, attn(norm1(cast<bf16>(x)), cache));  // (B, T, C)
    else
      h = x + attn(norm1(x), cache);
    const B rows = reshape(norm2(cast<bf16>(h)), Shape{b * t, c});  // (B*T, C)
    if constexpr (!std::is_invocable_v<const FFN&, const Var<T, D>&, const RouteContext<D>&> &&
                  std::is_invocable_r_v<B, const FFN&, const B&>)
      return add(h, reshape(ffn(rows), Shape{b, t, c}));  // a dense FFN on bf16
    else
      return h + reshape(run_ffn(cast<T>(rows), route), Shape{b, t, c});  // an MoE layer: fp32 rows for its routers
  }

};

/// Per-layer KV caches for incremental decoding with a DecoderLM.
template <Scalar T, Device D = Cpu>
struct DecodeState {
  std::vector<KVCache<T, D>> layers;
  [[nodiscard]] index_t length() const { return layers.empty() ? 0 : layers.front().length; }
  void reset() {
    for (auto& c : layers) c.reset();
  }
  /// Keeps batch rows `rows` of every layer's cache, in that order (see KVCache::reorder).
  void reorder(const std::vector<index_t>& rows) {
    for (auto& c : layers) c.reorder(rows);
  }
};

template <AttentionLayer Attn, FeedForwardLayer FFN>
struct DecoderLM {
  using Block = DecoderBlock<Attn, FFN>;
  using value_type = typename Block::value_type;
  using device_type = typename Block::device_type;
  using T = value_type;
  using D = device_type;

  explicit DecoderLM(const ModelConfig& cfg) : config(cfg) {
    cfg.validate();
    Generator gen(cfg.seed);
    embed = Embedding<T, D>(cfg.vocab, cfg.d_model, gen, cfg.init_std);
    blocks.reserve(static_cast<std::size_t>(cfg.layers));
    for (index_t i = 0; i < cfg.layers; ++i) blocks.emplace_back(cfg, gen);
    norm = RMSNorm<T, D>(cfg.d_model, cfg.norm_eps);
    if (!cfg.tie_embeddings) head = Linear<T, D>(cfg.d_model, cfg.vocab, false, gen, cfg.init_std);
  }

  /// Hidden states after the final norm: ids (B, T) -> (B, T, C).
  Var<T, D> hidden(const Tensor<Index, D>& ids, DecodeState<T, D>* state = nullptr) const {
    MIXMOE_CHECK(ids.dim() == 2, "DecoderLM", "token ids must be (B, T), got ", ids.shape());
    if (state && state->layers.size() != blocks.size()) state->layers.resize(blocks.size());
    auto x = embed(ids);  // (B, T, C)
    const Tensor<Index, D> flat_ids = ids.reshape(Shape{ids.numel()});  // (B*T), the FFN's rows
    const RouteContext<D> route{&flat_ids, grad_enabled()};
    for (std::size_t i = 0; i < blocks.size(); ++i) x = blocks[i](x, state ? &state->layers[i] : nullptr, &route);
    if constexpr (std::is_same_v<T, float>)
      if (bf16_activations()) return cast<T>(norm(cast<bf16>(x)));
    return norm(x);
  }

  /// The output projection of hidden states: (..., C) -> (..., V) (the tied embedding or `head`);
  /// a bf16 GEMM with fp32 accumulation under activations bf16, the logits fp32 either way.
  Var<T, D> logits(const Var<T, D>& h) const {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_activations()) {  // bf16 operands, fp32 logits (no bf16 copy of them)
        const Var<bf16, D> h16 = cast<bf16>(h);
        return config.tie_embeddings ? linear_fp32_out(h16, embed.weight) : linear_fp32_out(h16, head.weight, head.bias);
      }
    }
    return config.tie_embeddings ? linear(h, embed.weight) : head(h);
  }

  [[nodiscard]] bool bf16_activations() const { return config.activations == ActivationPrecision::bf16; }

  /// Logits over the vocabulary: ids (B, T) -> (B, T, V).
  Var<T, D> operator()(const Tensor<Index, D>& ids, DecodeState<T, D>* state = nullptr) const {
    return logits(hidden(ids, state));
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    embed.visit_parameters(visit, join_name(prefix, "embed"));
    for (std::size_t i = 0; i < blocks.size(); ++i)
      blocks[i].visit_parameters(visit, join_name(prefix, "layers." + std::to_string(i)));
    norm.visit_parameters(visit, join_name(prefix, "norm"));
    if (!config.tie_embeddings) head.visit_parameters(visit, join_name(prefix, "head"));
  }

  ModelConfig config;
  Embedding<T, D> embed;
  std::vector<Block> blocks;
  RMSNorm<T, D> norm;
  Linear<T, D> head;  // unused when the embeddings are tied
};

}  // namespace mixmoe
