// Causal self-attention with rotary positions, grouped-query heads and a KV cache.
//
//   x (B, T, C) -> (B, T, C); H query heads, Hkv key/value heads, Dh = C / H
//   (cfg.attn_bias adds biases to Wq, Wk, Wv, zero at initialisation, as Qwen2 has)
//   (cfg.qk_norm: q = q_norm(x Wq^T) over all C channels, k = k_norm(x Wk^T) over all
//   Hkv * Dh channels, RMSNorms with weights, before the heads are split and rope runs, as OLMoE has)
//   q = x Wq^T (B, T, H, Dh), k, v = x Wk^T, x Wv^T (B, T, Hkv, Dh), rope on q and k,
//   o = causal_attention(q, k, v) (B, T, H, Dh) -> Wo -> (B, T, C)
//
// With a KVCache (decoding, under no_grad), the new keys/values are appended and
// the new queries attend to everything cached: positions continue where the
// cache ends.
//
// A float layer also runs on bf16 activations (mixed precision): the projections are bf16 GEMMs
// of the fp32 weights cast to bf16, rope and attention compute in fp32 on bf16 values; a KV
// cache keeps the layer's scalar type.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/nn/config.hpp"
#include "mixmoe/nn/linear.hpp"
#include "mixmoe/ops/attention.hpp"
#include "mixmoe/ops/rope.hpp"
#include "mixmoe/ops/shape_ops.hpp"

namespace mixmoe {

/// Keys and values of one attention layer for incremental decoding.
template <Scalar T, Device D = Cpu>
struct KVCache {
  Tensor<T, D> k, v;  // (B, capacity, Hkv, Dh)
  index_t length = 0;  // tokens cached so far

  [[nodiscard]] index_t capacity() const { return k.defined() ? k.size(1) : 0; }
  void reset() { length = 0; }

  /// Appends new keys/values (B, T, Hkv, Dh), growing the buffers geometrically.
  void append(const Tensor<T, D>& k_new, const Tensor<T, D>& v_new) {
    const index_t t = k_new.size(1);
    if (!k.defined() || k.size(0) != k_new.size(0) || length + t > capacity()) {
      index_t cap = std::max<index_t>(64, 2 * capacity());
      while (cap < length + t) cap *= 2;
      const Shape s{k_new.size(0), cap, k_new.size(2), k_new.size(3)};
      auto nk = Tensor<T, D>::empty(s), nv = Tensor<T, D>::empty(s);
      if (length > 0) {
        nk.slice(1, 0, length).copy_from(k.slice(1, 0, length));
        nv.slice(1, 0, length).copy_from(v.slice(1, 0, length));
      }
      k = nk;
      v = nv;
    }
    k.slice(1, length, length + t).copy_from(k_new);
    v.slice(1, length, length + t).copy_from(v_new);
    length += t;
  }

  /// Keeps the cached batch rows `rows`, in that order (a row may repeat): row i becomes the old
  /// row rows[i]. Beam search calls it with the parent of each surviving beam.
  void reorder(const std::vector<index_t>& rows) {
    MIXMOE_CHECK(!rows.empty(), "KVCache::reorder", "no rows given");
    if (!k.defined()) return;  // nothing cached yet
    const index_t b = k.size(0);
    for (index_t r : rows)
      MIXMOE_CHECK(r >= 0 && r < b, "KVCache::reorder", "row ", r, " out of range for a cache of batch ", b);
    const Shape s{static_cast<index_t>(rows.size()), k.size(1), k.size(2), k.size(3)};
    auto nk = Tensor<T, D>::empty(s), nv = Tensor<T, D>::empty(s);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      nk[static_cast<index_t>(i)].slice(0, 0, length).copy_from(k[rows[i]].slice(0, 0, length));
      nv[static_cast<index_t>(i)].slice(0, 0, length).copy_from(v[rows[i]].slice(0, 0, length));
    }
    k = nk;
    v = nv;
  }
};

template <Scalar T, Device D = Cpu>
struct CausalSelfAttention {
  using value_type = T;
  using device_type = D;

  CausalSelfAttention() = default;
  CausalSelfAttention(const ModelConfig& cfg, Generator& gen)
      : wq(cfg.d_model, cfg.d_model, cfg.attn_bias, gen),
        wk(cfg.d_model, cfg.kv_head_count() * cfg.head_dim(), cfg.attn_bias, gen),
        wv(cfg.d_model, cfg.kv_head_count() * cfg.head_dim(), cfg.attn_bias, gen),
        wo(cfg.d_model, cfg.d_model, false, gen, cfg.init_std / std::sqrt(2.0 * static_cast<double>(cfg.layers))),
        heads(cfg.heads),
        kv_heads(cfg.kv_head_count()),
        head_dim(cfg.head_dim()),
        rope_theta(cfg.rope_theta) {
    cfg.validate();
    if (cfg.qk_norm) {
      q_norm = RMSNorm<T, D>(cfg.d_model, cfg.norm_eps);
      k_norm = RMSNorm<T, D>(cfg.kv_head_count() * cfg.head_dim(), cfg.norm_eps);
    }
  }

  /// x (B, T, C); with a cache, T new tokens after cache->length cached ones. x in T, or in bf16
  /// for a float layer.
  template <detail::ActivationOf<T> X>
  Var<X, D> operator()(const Var<X, D>& x, KVCache<T, D>* cache = nullptr) const {
    MIXMOE_CHECK(x.dim() == 3 && x.size(2) == heads * head_dim, "CausalSelfAttention", "input must be (B, T, ",
                 heads * head_dim, "), got ", x.shape());
    const index_t b = x.size(0), t = x.size(1);
    const index_t offset = cache ? cache->length : 0;
    const bool qk = q_norm.weight.defined();  // cfg.qk_norm
    auto q = rope(reshape(qk ? q_norm(wq(x)) : wq(x), Shape{b, t, heads, head_dim}), offset, rope_theta);  // (B,T,H,Dh)
    auto k = rope(reshape(qk ? k_norm(wk(x)) : wk(x), Shape{b, t, kv_heads, head_dim}), offset, rope_theta);
    auto v = reshape(wv(x), Shape{b, t, kv_heads, head_dim});  // (B, T, Hkv, Dh)
    Var<X, D> o;
    if (cache) {
      MIXMOE_CHECK(!grad_enabled() || !x.requires_grad(), "CausalSelfAttention",
                   "the KV cache is for decoding: run it under no_grad");
      // the cache in T: bf16 keys and values are widened into it and rounded back out (exact)
      const auto in_cache = [](const Tensor<X, D>& kv) {
        if constexpr (std::is_same_v<X, T>) return kv;
        else return kv.template to<T>();
      };
      const auto from_cache = [](const Tensor<T, D>& kv) {
        if constexpr (std::is_same_v<X, T>) return kv;  // a view of the filled part: no copy
        else return kv.template to<X>();
      };
      cache->append(in_cache(k.value()), in_cache(v.value()));
      const Var<X, D> k_all(from_cache(cache->k.slice(1, 0, cache->length))),
          v_all(from_cache(cache->v.slice(1, 0, cache->length)));
      o = causal_attention(q, k_all, v_all);  // (B, T, H, Dh)
    } else {
      o = causal_attention(q, k, v);
    }
    return wo(reshape(o, Shape{b, t, heads * head_dim}));
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    wq.visit_parameters(visit, join_name(prefix, "wq"));
    wk.visit_parameters(visit, join_name(prefix, "wk"));
    wv.visit_parameters(visit, join_name(prefix, "wv"));
    wo.visit_parameters(visit, join_name(prefix, "wo"));
    if (q_norm.weight.defined()) {
      q_norm.visit_parameters(visit, join_name(prefix, "q_norm"));
      k_norm.visit_parameters(visit, join_name(prefix, "k_norm"));
    }
  }

  Linear<T, D> wq, wk, wv, wo;
  RMSNorm<T, D> q_norm, k_norm;  // cfg.qk_norm only: (C) and (Hkv * Dh) weights
  index_t heads = 0, kv_heads = 0, head_dim = 0;
  double rope_theta = 10000.0;
};

}  // namespace mixmoe
