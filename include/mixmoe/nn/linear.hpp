// Linear, Embedding and RMSNorm layers.
//
//   Linear:    x (..., in) -> (..., out), weight (out, in), optional bias (out)
//   Embedding: ids (...) -> (..., dim), weight (vocab, dim)
//   RMSNorm:   x (..., dim) -> (..., dim), weight (dim)
//
// Linear and RMSNorm of float also take bf16 inputs (mixed precision, ops/bf16.hpp): the fp32
// parameters are cast to bf16 for the op and their gradients flow back to them in fp32.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/bf16.hpp"
#include "mixmoe/ops/embedding.hpp"
#include "mixmoe/ops/matmul.hpp"
#include "mixmoe/ops/norm.hpp"

namespace mixmoe {

namespace detail {

/// The activation types a layer of scalar type T runs on: T, and bf16 for a float layer.
template <class X, class T>
concept ActivationOf = std::is_same_v<X, T> || (std::is_same_v<X, bf16> && std::is_same_v<T, float>);

}  // namespace detail

template <Scalar T, Device D = Cpu>
struct Linear {
  using value_type = T;
  using device_type = D;

  Linear() = default;
  /// Weights ~ N(0, init_std^2); init_std defaults to 1/sqrt(in) (variance preserving).
  Linear(index_t in, index_t out, bool bias, Generator& gen, double init_std = -1.0) {
    MIXMOE_CHECK(in > 0 && out > 0, "Linear", "sizes must be positive, got in=", in, " out=", out);
    const double std = init_std > 0 ? init_std : 1.0 / std::sqrt(static_cast<double>(in));
    weight = parameter(Tensor<T, D>::randn({out, in}, gen, 0.0, std));
    if (bias) this->bias = parameter(Tensor<T, D>::zeros({out}));
  }
  [[nodiscard]] index_t in_features() const { return weight.size(1); }
  [[nodiscard]] index_t out_features() const { return weight.size(0); }

  Var<T, D> operator()(const Var<T, D>& x) const { return linear(x, weight, bias); }
  /// bf16 activations, fp32 weights rounded for the GEMM (no bf16 copy kept): a bf16 GEMM with fp32
  /// accumulation, the weight gradients in fp32.
  Var<bf16, D> operator()(const Var<bf16, D>& x) const
    requires std::is_same_v<T, float>
  {
    return linear(x, weight, bias);
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
    if (bias.defined()) visit(join_name(prefix, "bias"), bias);
  }

  Var<T, D> weight;  // (out, in)
  Var<T, D> bias;    // (out) or undefined
};

template <Scalar T, Device D = Cpu>
struct Embedding {
  using value_type = T;
  using device_type = D;

  Embedding() = default;
  Embedding(index_t vocab, index_t dim, Generator& gen, double init_std = 0.02) {
    MIXMOE_CHECK(vocab > 0 && dim > 0, "Embedding", "sizes must be positive, got vocab=", vocab, " dim=", dim);
    weight = parameter(Tensor<T, D>::randn({vocab, dim}, gen, 0.0, init_std));
  }
  [[nodiscard]] index_t vocab() const { return weight.size(0); }
  [[nodiscard]] index_t dim() const { return weight.size(1); }

  Var<T, D> operator()(const Tensor<Index, D>& ids) const { return embedding(weight, ids, check); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
  }

  Var<T, D> weight;  // (vocab, dim)
  /// How a device checks the ids (the CPU checks at once): deferred, so that a training step does
  /// not wait for the device; a bad id is thrown by the next synchronisation (ops/index.hpp).
  IndexCheck check = IndexCheck::deferred;
};

template <Scalar T, Device D = Cpu>
struct RMSNorm {
  using value_type = T;
  using device_type = D;

  RMSNorm() = default;
  explicit RMSNorm(index_t dim, double eps = 1e-6) : eps(eps) {
    MIXMOE_CHECK(dim > 0, "RMSNorm", "dim must be positive, got ", dim);
    weight = parameter(Tensor<T, D>::ones({dim}));
  }

  Var<T, D> operator()(const Var<T, D>& x) const { return rms_norm(x, weight, eps); }
  /// bf16 activations, the fp32 weight cast for the op (fp32 statistics, bf16 result).
  Var<bf16, D> operator()(const Var<bf16, D>& x) const
    requires std::is_same_v<T, float>
  {
    return rms_norm(x, cast<bf16>(weight), eps);
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
  }

  Var<T, D> weight;  // (dim)
  double eps = 1e-6;
};

}  // namespace mixmoe
