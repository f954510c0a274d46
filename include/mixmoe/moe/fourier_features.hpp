// Fourier-feature router (Mix-MoE): a base router's logits plus a learned projection of a
// fixed transform of each token's hidden vector.
//
//   h (N, C) token rows, C = d_model, E experts, F features of the transform
//   phi(h) (N, F), Wf (E, F) trainable, no bias
//   logits = base.logits(h) + phi(h) Wf^T (N, E), then base.select(logits, h, ctx)
//
// phi acts on each row alone (over the hidden axis C), so a token's routing uses only its
// own hidden vector: causal-safe and usable token by token in decoding. (A sequence-axis
// FFT, FNet style, would mix tokens: it is not offered here.)
//
// Transforms (policies in namespace transform; F for C = d_model):
//   FFTMagnitude<LogScale = true, Normalize = true>   F = C/2 + 1
//       m = |rfft(h)| = sqrt(re^2 + im^2 + eps) per frequency bin (unnormalised DFT; eps = 0
//       by default, > 0 keeps the gradient smooth where a bin vanishes), then log(1 + m) when
//       LogScale, then per token zero mean / unit variance over the F bins when Normalize
//       (layer_norm without weight, variance eps 1e-5). The log compresses the large DC and
//       low-frequency bins; the normalisation makes the term's scale independent of |h|.
//   FFTRealImag                                        F = 2 (C/2 + 1)
//       (re_0, im_0, re_1, im_1, ...) of rfft(h) / sqrt(C): the scaling makes the features
//       as large as h (Parseval), like the orthonormal transforms below. im_0 (and, for even
//       C, the Nyquist im) is always 0: those columns of Wf get no gradient.
//   DCT                                                F = C
//       orthonormal DCT-II, h B^T with B[k, n] = s_k cos(pi (2n + 1) k / (2C)), s_0 = sqrt(1/C),
//       s_k = sqrt(2/C): a fixed (C, C) matrix built once.
//   RandomProjection                                   F = C
//       h R^T with R (C, C) ~ N(0, 1/C), drawn once from the construction generator and never
//       trained (the paper's "random features" ablation).
//   None                                               F = 0
//       no extra term and no Wf: the base router alone (the ablation without features).
//
// The wrapper is itself a LogitRouter, so it can be wrapped again. In user code it is the
// policy FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, which binds the base router
// policy (or takes a concrete LogitRouter) and the transform policy to (T, D).
// Parameters: the base's under "base" ("base.weight"), Wf as "fourier.weight". The fixed
// DCT / random matrices are not parameters (never trained, rebuilt from the seed).
// Construction draws from the generator in order: the base router, the transform, Wf.
// Init: Wf ~ N(0, 0.1 / F), like the routers' weights; fourier_init_std = 0 gives Wf = 0,
// so the wrapped router starts out exactly as its base.
#pragma once

#include <cmath>
#include <concepts>
#include <numbers>
#include <string>
#include <type_traits>
#include <utility>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/router_check.hpp"
#include "mixmoe/moe/routing.hpp"
#include "mixmoe/moe/top_k_router.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/fft.hpp"
#include "mixmoe/ops/matmul.hpp"
#include "mixmoe/ops/norm.hpp"
#include "mixmoe/ops/shape_ops.hpp"
#include "mixmoe/ops/unary.hpp"

namespace mixmoe {

namespace transform {

namespace detail {

template <class T, class D>
void check_rows(const Var<T, D>& h, index_t d_model, const char* op) {
  MIXMOE_CHECK(h.defined() && h.dim() == 2 && h.size(1) == d_model, op,
               "h must be token rows (N, C) with C = d_model = ", d_model, ", got ",
               h.defined() ? h.shape().to_string() : std::string("an undefined Var"));
}

}  // namespace detail

/// log(1 + |rfft(h)|) over the hidden axis, per-token normalised (each step optional).
template <Scalar T, Device D, bool LogScale, bool Normalize>
struct FFTMagnitudeMap {
  using value_type = T;
  using device_type = D;
  FFTMagnitudeMap() = default;
  FFTMagnitudeMap(index_t c, Generator& /*gen*/) : d_model(c) {}
  [[nodiscard]] index_t features() const { return d_model / 2 + 1; }
  /// h (N, C) -> (N, C/2 + 1)
  Var<T, D> operator()(const Var<T, D>& h) const {
    detail::check_rows(h, d_model, "FFTMagnitude");
    Var<T, D> m = rfft_magnitude(h, eps);  // (N, F)
    if constexpr (LogScale) m = log(m + 1.0);
    if constexpr (Normalize) m = layer_norm(m, Var<T, D>(), Var<T, D>(), norm_eps);
    return m;
  }
  index_t d_model = 0;
  double eps = 0.0;        // inside the magnitude's square root
  double norm_eps = 1e-5;  // added to the variance of the normalisation
};

/// Real and imaginary parts of rfft(h) / sqrt(C), interleaved.
template <Scalar T, Device D>
struct FFTRealImagMap {
  using value_type = T;
  using device_type = D;
  FFTRealImagMap() = default;
  FFTRealImagMap(index_t c, Generator& /*gen*/) : d_model(c) {}
  [[nodiscard]] index_t features() const { return 2 * (d_model / 2 + 1); }
  /// h (N, C) -> (N, 2 (C/2 + 1))
  Var<T, D> operator()(const Var<T, D>& h) const {
    detail::check_rows(h, d_model, "FFTRealImag");
    const Var<T, D> y = rfft(h);  // (N, C/2 + 1, 2)
    return scale(reshape(y, Shape{h.size(0), features()}), 1.0 / std::sqrt(static_cast<double>(d_model)));
  }
  index_t d_model = 0;
};

/// h B^T for a fixed (C, C) matrix B (no gradient to B).
template <Scalar T, Device D>
struct FixedMatrixMap {
  using value_type = T;
  using device_type = D;
  [[nodiscard]] index_t features() const { return matrix.defined() ? matrix.size(0) : 0; }
  Var<T, D> apply(const Var<T, D>& h, const char* op) const {
    detail::check_rows(h, matrix.defined() ? matrix.size(1) : 0, op);
    return linear(h, matrix);  // (N, F)
  }
  Var<T, D> matrix;  // (F, C), constant
};

/// Orthonormal DCT-II over the hidden axis.
template <Scalar T, Device D>
struct DCTMap : FixedMatrixMap<T, D> {
  DCTMap() = default;
  DCTMap(index_t d_model, Generator& /*gen*/) {
    MIXMOE_CHECK(d_model > 0, "DCT", "d_model must be positive, got ", d_model);
    // Built on the host once, then copied to D (construction only).
    Tensor<T, Cpu> b = Tensor<T, Cpu>::empty({d_model, d_model});  // (C, C)
    const double c = static_cast<double>(d_model);
    for (index_t k = 0; k < d_model; ++k) {
      const double s = std::sqrt((k == 0 ? 1.0 : 2.0) / c);
      for (index_t n = 0; n < d_model; ++n)
        b.data()[k * d_model + n] =
            static_cast<T>(s * std::cos(std::numbers::pi * static_cast<double>((2 * n + 1) * k) / (2.0 * c)));
    }
    this->matrix = Var<T, D>(to_device<D>(b));
  }
  /// h (N, C) -> (N, C)
  Var<T, D> operator()(const Var<T, D>& h) const { return this->apply(h, "DCT"); }
};

/// A fixed Gaussian projection, N(0, 1/C) entries, drawn from the construction generator.
template <Scalar T, Device D>
struct RandomProjectionMap : FixedMatrixMap<T, D> {
  RandomProjectionMap() = default;
  RandomProjectionMap(index_t d_model, Generator& gen) {
    MIXMOE_CHECK(d_model > 0, "RandomProjection", "d_model must be positive, got ", d_model);
    this->matrix =
        Var<T, D>(Tensor<T, D>::randn({d_model, d_model}, gen, 0.0, 1.0 / std::sqrt(static_cast<double>(d_model))));
  }
  /// h (N, C) -> (N, C)
  Var<T, D> operator()(const Var<T, D>& h) const { return this->apply(h, "RandomProjection"); }
};

/// No features: the wrapper adds nothing.
template <Scalar T, Device D>
struct NoneMap {
  using value_type = T;
  using device_type = D;
  NoneMap() = default;
  NoneMap(index_t /*d_model*/, Generator& /*gen*/) {}
  [[nodiscard]] static constexpr index_t features() { return 0; }
  Var<T, D> operator()(const Var<T, D>& /*h*/) const { return Var<T, D>(); }
};

// ---- policies ------------------------------------------------------------------

template <bool LogScale = true, bool Normalize = true>
struct FFTMagnitude {
  template <Scalar T, Device D>
  using bind = FFTMagnitudeMap<T, D, LogScale, Normalize>;
};
struct FFTRealImag {
  template <Scalar T, Device D>
  using bind = FFTRealImagMap<T, D>;
};
struct DCT {
  template <Scalar T, Device D>
  using bind = DCTMap<T, D>;
};
struct RandomProjection {
  template <Scalar T, Device D>
  using bind = RandomProjectionMap<T, D>;
};
struct None {
  template <Scalar T, Device D>
  using bind = NoneMap<T, D>;
};

/// A transform policy's map for (T, D), or a concrete map used as is.
template <class P, class T, class D>
struct bind_transform {
  using type = P;
};
template <class P, class T, class D>
  requires requires { typename P::template bind<T, D>; }
struct bind_transform<P, T, D> {
  using type = typename P::template bind<T, D>;
};
template <class P, class T, class D>
using bind_transform_t = typename bind_transform<P, T, D>::type;

/// What the wrapper needs of a feature map.
template <class M, class T, class D>
concept FeatureMap = std::constructible_from<M, index_t, Generator&> && requires(const M& m, const Var<T, D>& h) {
  { m.features() } -> std::convertible_to<index_t>;
  { m(h) } -> std::same_as<Var<T, D>>;
};

}  // namespace transform

template <class R, class Phi>
struct FourierFeatureRouter {
  static_assert(check_logit_router<R>());
  using value_type = typename R::value_type;
  using device_type = typename R::device_type;
  using T = value_type;
  using D = device_type;
  static_assert(
      transform::FeatureMap<Phi, T, D>,
      "mixmoe: a Fourier feature transform needs a constructor `(index_t d_model, Generator&)`, "
      "`index_t features() const` and `Var<T, D> operator()(const Var<T, D>& h) const` for the router's T, D");
  using base_type = R;
  using transform_type = Phi;

  FourierFeatureRouter() = default;
  /// Builds the base router, then the transform, then Wf ~ N(0, fourier_init_std^2)
  /// (default sqrt(0.1 / F); 0 gives zeros) from the same generator.
  FourierFeatureRouter(const RouterShape& shape, Generator& gen, double fourier_init_std = -1.0)
      : base(shape, gen), phi(shape.d_model, gen), d_model_(shape.d_model) {
    const index_t f = phi.features();
    if (f == 0) return;  // transform::None
    const double std = fourier_init_std >= 0 ? fourier_init_std : mixmoe::detail::router_init_std(f);
    fourier_weight = parameter(Tensor<T, D>::randn({base.num_experts(), f}, gen, 0.0, std));
  }

  [[nodiscard]] index_t num_experts() const { return base.num_experts(); }
  [[nodiscard]] index_t d_model() const { return d_model_; }
  [[nodiscard]] index_t features() const { return phi.features(); }

  /// h (N, C) -> phi(h) (N, F); undefined for transform::None.
  Var<T, D> feature_map(const Var<T, D>& h) const {
    mixmoe::detail::check_router_input(h, d_model_, "FourierFeatures");
    return phi(h);
  }

  /// h (N, C) -> base.logits(h) + phi(h) Wf^T (N, E)
  Var<T, D> logits(const Var<T, D>& h) const {
    mixmoe::detail::check_router_input(h, d_model_, "FourierFeatures");
    Var<T, D> z = base.logits(h);  // (N, E)
    if (!fourier_weight.defined()) return z;
    return z + linear(phi(h), fourier_weight);
  }

  /// The base router's selection on the given logits.
  Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& h, const RouteContext<D>& ctx) const {
    return base.select(logits, h, ctx);
  }

  Routing<T, D> operator()(const Var<T, D>& h, const RouteContext<D>& ctx) const { return select(logits(h), h, ctx); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    base.visit_parameters(visit, join_name(prefix, "base"));
    if (fourier_weight.defined()) visit(join_name(prefix, "fourier.weight"), fourier_weight);
  }

  R base;
  Phi phi;
  Var<T, D> fourier_weight;  // (E, F), undefined for transform::None

 private:
  index_t d_model_ = 0;
};

/// Policy: FourierFeatures<TopK<2>, transform::FFTMagnitude<>>. Base is a router policy or a
/// concrete LogitRouter (of the layer's T and D); Transform a policy from namespace transform.
template <class Base, class Transform>
struct FourierFeatures {
  template <Scalar T, Device D>
  using bind = FourierFeatureRouter<checked_router_t<Base, T, D>, transform::bind_transform_t<Transform, T, D>>;
};

static_assert(check_logit_router<bind_router_t<FourierFeatures<TopK<2>, transform::FFTMagnitude<>>, float, Cpu>>());
static_assert(LogitRouter<bind_router_t<FourierFeatures<TopKRouter<double>, transform::None>, double, Cpu>>);
// Wrapped again: the wrapper is a LogitRouter itself.
static_assert(LogitRouter<bind_router_t<
                  FourierFeatures<FourierFeatures<TopK<>, transform::DCT>, transform::RandomProjection>, float, Cpu>>);

}  // namespace mixmoe
