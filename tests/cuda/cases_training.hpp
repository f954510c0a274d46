// Parity cases of training (train/): one and two steps of AdamW and SGD (with and without momentum)
// on random parameters and gradients of edge sizes; the global gradient norm, clipping and the
// finiteness check (including NaN, inf and, in double, squares that overflow); the supervised
// logits of a prompt-masked batch; and the end-to-end run: a small Mix-MoE decoder LM (Fourier
// router features, LM and MT expert groups, a shared top-2 router) built with the same seed on the
// device, trained for 5 AdamW steps on a fixed random batch (the loss and gradient norm of every
// step, then every parameter), and train_loop itself for 3 steps with its checkpoint written on
// the device and loaded into a second model. Mixed precision: the same LM in float with bf16
// activations and bf16 experts for 3 AdamW steps, against its double twin on the host.
//
// The end-to-end run calls every family's ops (embedding, attention, rope, rfft, the MoE layer,
// cross-entropy, ...): on a GPU it passes only once all of them run on the device. A line is
// printed before each part so that a crash points at the part it happened in.
#pragma once

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include <mixmoe/loss/load_balance.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/moe_layer.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>
#include <mixmoe/ops/cross_entropy.hpp>
#include <mixmoe/train/checkpoint.hpp>
#include <mixmoe/train/clip.hpp>
#include <mixmoe/train/lm_loss.hpp>
#include <mixmoe/train/loop.hpp>
#include <mixmoe/train/optimizer.hpp>

#include "parity.hpp"

namespace mixmoe_parity {

namespace training {

inline void section(const char* device, const char* type, const char* what) {
  std::printf("  training cases on %s, %s: %s\n", device, type, what);
  std::fflush(stdout);
}

/// A one-element double tensor on the host (scalars such as a norm; any device's results go here).
inline mixmoe::Tensor<double> host_scalar(double v) { return mixmoe::Tensor<double>::from({v}, {1}); }

/// The parameter shapes of the optimizer and clipping cases: widths 1, 7, 33, 257, a (3, 1000)
/// matrix and 300000 elements (more than the 1024 x 256 threads of one reduction's blocks).
inline std::vector<mixmoe::Shape> param_shapes() { return {{1}, {7}, {33}, {257}, {3, 1000}, {600, 500}}; }

template <class T, class D>
std::vector<mixmoe::Var<T, D>> make_params(std::uint64_t seed) {
  std::vector<mixmoe::Var<T, D>> ps;
  for (const auto& s : param_shapes()) ps.push_back(mixmoe::Var<T, D>(randn<T, D>(s, ++seed), true));
  return ps;
}

/// Gives every parameter but the `skip`-th a fresh random gradient (the skipped one keeps none).
template <class T, class D>
void set_grads(const std::vector<mixmoe::Var<T, D>>& ps, std::uint64_t seed, double scale, std::size_t skip = 99) {
  for (std::size_t i = 0; i < ps.size(); ++i) {
    if (i == skip) {
      ps[i].zero_grad();
      continue;
    }
    ps[i].set_grad(randn<T, D>(ps[i].shape(), seed + i, scale));
  }
}

template <class T, class D>
void optimizer_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  section(D::name, t.c_str(), "optimizers");
  const double tl = tol<T>(2e-6, 1e-12);
  // AdamW: two steps (the second with nonzero moments and bias corrections of step 2); parameter 2
  // gets no gradient in the first step, and a frozen parameter is in the list.
  {
    auto ps = make_params<T, D>(1000);
    Var<T, D> frozen(randn<T, D>({5}, 1100), false);
    std::vector<Var<T, D>> all = ps;
    all.push_back(frozen);
    AdamW<T, D> opt(all, {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1});
    set_grads(ps, 1200, 1.0, 2);
    opt.step();
    set_grads(ps, 1300, 0.5);
    opt.step();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const std::string n = t + " adamw " + ps[i].shape().to_string();
      put(r, n + " w", ps[i].value(), tl);
      put(r, n + " m", opt.first_moments()[i], tl);
      put(r, n + " v", opt.second_moments()[i], tl);
    }
    put(r, t + " adamw frozen w", frozen.value(), 0.0);
    put(r, t + " adamw frozen has moments", host_scalar(opt.first_moments().back().defined() ? 1 : 0), 0.0);
  }
  // SGD with momentum and weight decay, two steps; and plain SGD.
  for (const double mu : {0.9, 0.0}) {
    auto ps = make_params<T, D>(2000);
    SGD<T, D> opt(ps, {.lr = 0.1, .momentum = mu, .weight_decay = 0.01});
    set_grads(ps, 2100, 1.0);
    opt.step();
    set_grads(ps, 2200, 1.0, 1);
    opt.step();
    for (const auto& p : ps)
      put(r, t + " sgd momentum " + std::to_string(mu) + " " + p.shape().to_string() + " w", p.value(), tl);
  }
}

template <class T, class D>
void clip_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  section(D::name, t.c_str(), "gradient norm and clipping");
  const double tl = tol<T>(1e-6, 1e-12);
  // Clipped (max_norm half the norm), with a parameter without gradient and a strided gradient.
  {
    auto ps = make_params<T, D>(3000);
    set_grads(ps, 3100, 0.3, 0);
    Var<T, D> strided(randn<T, D>({7, 33}, 3200), true);
    strided.set_grad(randn<T, D>({33, 7}, 3201).transpose(0, 1));  // a non-contiguous view
    ps.push_back(strided);
    const double norm = grad_norm(ps);
    put(r, t + " grad_norm", host_scalar(norm), tl);
    put(r, t + " grads_finite (finite)", host_scalar(grads_finite(ps) ? 1 : 0), 0.0);
    const GradNorm gn = clip_grad_norm(ps, 0.5 * norm);
    put(r, t + " clip norm", host_scalar(gn.norm), tl);
    put(r, t + " clip scale", host_scalar(gn.scale), tl);
    put(r, t + " clip clipped", host_scalar(gn.clipped ? 1 : 0), 0.0);
    for (std::size_t i = 1; i < ps.size(); ++i)
      put(r, t + " clipped grad " + std::to_string(i) + " " + ps[i].shape().to_string(), ps[i].grad(), tl);
    put(r, t + " norm after clipping", host_scalar(grad_norm(ps)), tl);
  }
  // Not clipped: max_norm above the norm, and max_norm 0 (off).
  for (const double max_norm : {1e6, 0.0}) {
    auto ps = make_params<T, D>(4000);
    set_grads(ps, 4100, 1.0);
    const GradNorm gn = clip_grad_norm(ps, max_norm);
    const std::string n = t + " clip max_norm " + std::to_string(max_norm);
    put(r, n + " norm", host_scalar(gn.norm), tl);
    put(r, n + " clipped", host_scalar(gn.clipped ? 1 : 0), 0.0);
    put(r, n + " grad", ps[4].grad(), 0.0);
  }
  // A NaN, then an inf, in one element of the large gradient: the norm says so, nothing is scaled.
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    auto ps = make_params<T, D>(5000);
    set_grads(ps, 5100, 1.0);
    std::vector<T> g = ps[5].grad().to_vector();
    g[123457] = static_cast<T>(bad);
    ps[5].set_grad(Tensor<T, D>::from(g, ps[5].shape()));
    const std::string n = t + (std::isnan(bad) ? " with a nan" : " with an inf");
    put(r, n + " grad_norm", host_scalar(grad_norm(ps)), tl);
    put(r, n + " grads_finite", host_scalar(grads_finite(ps) ? 1 : 0), 0.0);
    const GradNorm gn = clip_grad_norm(ps, 1.0);
    put(r, n + " clip norm", host_scalar(gn.norm), tl);
    put(r, n + " clip clipped", host_scalar(gn.clipped ? 1 : 0), 0.0);
    put(r, n + " grad 4 untouched", ps[4].grad(), 0.0);
  }
  // Double only: squares that overflow a double (the rescaled second pass).
  if constexpr (std::is_same_v<T, double>) {
    auto ps = make_params<T, D>(6000);
    set_grads(ps, 6100, 1e200);
    const double norm = grad_norm(ps);
    put(r, "f64 grad_norm of 1e200 gradients / 1e200", host_scalar(norm / 1e200), 1e-12);
    const GradNorm gn = clip_grad_norm(ps, 1.0);
    put(r, "f64 clip of 1e200 gradients: scale * 1e200", host_scalar(gn.scale * 1e200), 1e-12);
    put(r, "f64 clip of 1e200 gradients: grad 3", ps[3].grad(), 1e-12);
  }
  // clip_grad_norm_async on the same gradients: {norm, scale} left on the device, the same clipping.
  const auto async_case = [&](const std::string& n, std::uint64_t seed, double scale, double max_norm_factor,
                              double max_norm, double bad = 0.0) {
    auto ps = make_params<T, D>(seed);
    set_grads(ps, seed + 100, scale);
    if (bad != 0.0) {
      std::vector<T> g = ps[5].grad().to_vector();
      g[123457] = static_cast<T>(bad);
      ps[5].set_grad(Tensor<T, D>::from(g, ps[5].shape()));
    }
    const double m = max_norm_factor > 0 ? max_norm_factor * grad_norm(ps) : max_norm;
    const Tensor<double, D> ns = clip_grad_norm_async(ps, m);  // (2): norm, scale
    const std::vector<double> v = ns.to_vector();
    put(r, n + " async norm / scale", host_scalar(v[0] / scale), tl);
    put(r, n + " async scale * scale", host_scalar(v[1] * scale), tl);
    put(r, n + " async grad 3", ps[3].grad(), bad != 0.0 ? 0.0 : tl);
    put(r, n + " async grad 5", ps[5].grad(), bad != 0.0 ? 0.0 : tl);
  };
  async_case(t + " clip", 3000, 0.3, 0.5, 0.0);
  async_case(t + " clip max_norm 1e6", 4000, 1.0, 0.0, 1e6);
  async_case(t + " clip max_norm 0", 4000, 1.0, 0.0, 0.0);
  async_case(t + " clip with a nan", 5000, 1.0, 0.0, 1.0, std::numeric_limits<double>::quiet_NaN());
  async_case(t + " clip with an inf", 5000, 1.0, 0.0, 1.0, std::numeric_limits<double>::infinity());
  if constexpr (std::is_same_v<T, double>) async_case("f64 clip of 1e200 gradients", 6000, 1e200, 0.0, 1.0);
}

// ---- the end-to-end model -----------------------------------------------------------------

template <class T, class D>
using MixLM = mixmoe::DecoderLM<
    mixmoe::CausalSelfAttention<T, D>,
    mixmoe::MixedMoE<mixmoe::FourierFeatures<mixmoe::TopK<>, mixmoe::transform::FFTMagnitude<>>,
                     mixmoe::ExpertGroup<mixmoe::SwiGLU<T, D>, mixmoe::tag::lm>,
                     mixmoe::ExpertGroup<mixmoe::SwiGLU<T, D>, mixmoe::tag::mt>>>;

inline mixmoe::ModelConfig mix_config(std::uint64_t seed) {
  mixmoe::ModelConfig c;
  c.vocab = 64;
  c.d_model = 32;
  c.layers = 2;
  c.heads = 2;
  c.d_ff = 64;
  c.init_std = 0.05;
  c.seed = seed;
  c.moe.experts_per_group = {2, 2};
  c.moe.expert_hidden = 32;
  c.moe.top_k = 2;
  c.moe.mix = mixmoe::GroupMix::shared_router;  // as mixmoe-translate builds it: top-2 of the 4 experts
  return c;
}

/// A random batch of (b, t) ids; with `prompt` > 0 the first `prompt` targets of each row are
/// ignore_index (-100), as in a translation batch.
inline mixmoe::Batch random_batch(index_t b, index_t t, index_t vocab, index_t prompt, std::uint64_t seed) {
  using namespace mixmoe;
  Generator gen(seed);
  std::vector<Index> in(static_cast<std::size_t>(b * t)), tg(in.size());
  Batch batch;
  for (index_t r = 0; r < b; ++r)
    for (index_t p = 0; p < t; ++p) {
      const auto i = static_cast<std::size_t>(r * t + p);
      in[i] = static_cast<Index>(gen.below(static_cast<std::uint64_t>(vocab)));
      tg[i] = p < prompt ? Index{-100} : static_cast<Index>(gen.below(static_cast<std::uint64_t>(vocab)));
      if (p >= prompt) ++batch.target_tokens;
    }
  batch.inputs = Tensor<Index>::from(in, {b, t});
  batch.targets = Tensor<Index>::from(tg, {b, t});
  batch.tokens = b * t;
  for (index_t r = 0; r < b; ++r) batch.example_ids.push_back(r);
  return batch;
}

/// A BatchSource (train/loop.hpp) cycling through fixed batches.
struct FixedBatches {
  std::vector<mixmoe::Batch> batches;
  std::uint64_t at = 0;
  mixmoe::Batch next() { return batches[static_cast<std::size_t>(at++ % batches.size())]; }
  [[nodiscard]] mixmoe::BatcherState state() const {
    mixmoe::BatcherState s;
    s.batch = at;
    return s;
  }
  void set_state(const mixmoe::BatcherState& s) { at = s.batch; }
};

template <class T, class D, class Model>
void put_parameters(Results& r, const std::string& prefix, Model& model, double tolerance) {
  for (auto& [name, p] : mixmoe::named_parameters(model)) put(r, prefix + " " + name, p.value(), tolerance);
}

template <class T, class D>
void end_to_end_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // f32: the GPU's reductions add in another order than the CPU's; 5 Adam steps keep that at the
  // level of float rounding (the case's f32 and f64 runs on the CPU agree to 1e-4: test_parity_cpu).
  const double loss_tol = tol<T>(1e-4, 1e-9);
  const double param_tol = tol<T>(1e-4, 1e-9);

  section(D::name, t.c_str(), "supervised_logits of a prompt-masked batch");
  {
    MixLM<T, D> model(mix_config(7));
    const Batch batch = random_batch(2, 12, 64, 5, 77);
    auto sup = supervised_logits(model, batch);
    put(r, t + " supervised logits", sup.logits, tol<T>(1e-5, 1e-10));
    put(r, t + " supervised targets", sup.targets, 0.0);
    release_routing_graphs(model);
  }

  section(D::name, t.c_str(), "5 AdamW steps of a Mix-MoE decoder LM");
  {
    MixLM<T, D> model(mix_config(11));
    const Batch batch = random_batch(2, 16, 64, 0, 111);
    const Tensor<Index, D> ids = to_device<D>(batch.inputs), targets = to_device<D>(batch.targets);
    const auto params = parameters(model);
    AdamW<T, D> opt(params, {.lr = 1e-3, .weight_decay = 0.01});
    std::vector<double> losses, norms;
    for (int step = 0; step < 5; ++step) {
      auto logits = model(ids);
      auto loss = cross_entropy(logits, targets) + load_balance_loss(model) * 0.01 + router_z_loss(model) * 0.001;
      losses.push_back(static_cast<double>(loss.item()));
      loss.backward();
      norms.push_back(clip_grad_norm(params, 1.0).norm);
      opt.step();
      opt.zero_grad();
      release_routing_graphs(model);
    }
    put(r, t + " e2e loss per step", Tensor<double>::from(losses, {5}), loss_tol);
    put(r, t + " e2e grad norm per step", Tensor<double>::from(norms, {5}), loss_tol);
    put_parameters<T, D>(r, t + " e2e param", model, param_tol);
  }

  section(D::name, t.c_str(), "train_loop, 3 steps, with its checkpoint");
  {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("mixmoe_parity_training_" + std::string(D::name) + "_" + t + "_" +
                                                      std::to_string(static_cast<long long>(::getpid())));
    std::error_code ec;
    fs::remove_all(dir, ec);
    MixLM<T, D> model(mix_config(13));
    AdamW<T, D> opt(parameters(model), {.lr = 1e-3, .weight_decay = 0.01});
    FixedBatches data;
    data.batches = {random_batch(2, 10, 64, 4, 131), random_batch(3, 8, 64, 0, 132)};
    LoopOptions o;
    o.stage = "parity";
    o.steps = 3;
    o.schedule.warmup_steps = 1;
    o.log_every = 1;
    o.checkpoint_dir = dir;
    o.out = nullptr;
    const LoopResult res = train_loop(model, opt, data, o);
    put(r, t + " loop last loss", host_scalar(res.last_loss), loss_tol);
    put(r, t + " loop steps and tokens",
        host_scalar(static_cast<double>(res.steps) * 1000 + static_cast<double>(res.tokens)), 0.0);
    put_parameters<T, D>(r, t + " loop param", model, param_tol);

    MixLM<T, D> loaded(mix_config(99));  // other initial weights: everything must come from the file
    AdamW<T, D> opt2(parameters(loaded), {.lr = 5.0, .weight_decay = 0.01});
    const TrainState st = load_training_state(dir / "last", loaded, opt2);
    double same = 1;
    const auto a = parameters(model), b = parameters(loaded);
    for (std::size_t i = 0; i < a.size(); ++i)
      if (a[i].value().to_vector() != b[i].value().to_vector()) same = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      const auto& m1 = opt.first_moments()[i];
      const auto& m2 = opt2.first_moments()[i];
      if (m1.defined() != m2.defined() || (m1.defined() && m1.to_vector() != m2.to_vector())) same = 0;
      const auto& v1 = opt.second_moments()[i];
      const auto& v2 = opt2.second_moments()[i];
      if (v1.defined() != v2.defined() || (v1.defined() && v1.to_vector() != v2.to_vector())) same = 0;
    }
    put(r, t + " checkpoint restores weights and moments exactly", host_scalar(same), 0.0);
    put(r, t + " checkpoint global step and optimizer steps",
        host_scalar(static_cast<double>(st.global_step) * 10 + static_cast<double>(opt2.steps())), 0.0);
    put(r, t + " checkpoint first moment 0", opt2.first_moments()[0], param_tol);
    fs::remove_all(dir, ec);
  }
}

/// 3 AdamW steps of the Mix-MoE LM: T = float with bf16 activations and bf16 experts ("bf16 ..."),
/// or its twin, T = double in full precision ("f64 ..."), which test_parity_cpu holds it against.
template <class T, class D>
void mixed_precision_case(Results& r) {
  using namespace mixmoe;
  const bool mixed = std::is_same_v<T, float>;
  const std::string t = mixed ? "bf16" : "f64";
  section(D::name, t.c_str(), "3 AdamW steps of a Mix-MoE decoder LM in mixed precision");
  ModelConfig cfg = mix_config(17);
  if (mixed) {
    cfg.activations = ActivationPrecision::bf16;
    cfg.moe.expert_precision = MatmulPrecision::bf16;
  }
  // bf16: the devices sum in other orders, and a value may round to the neighbouring bf16
  const double tl = mixed ? 1e-2 : 1e-9;
  MixLM<T, D> model(cfg);
  const Batch batch = random_batch(2, 12, 64, 3, 171);
  const Tensor<Index, D> ids = to_device<D>(batch.inputs), targets = to_device<D>(batch.targets);
  AdamW<T, D> opt(parameters(model), {.lr = 1e-3, .weight_decay = 0.01});
  std::vector<double> losses;
  for (int step = 0; step < 3; ++step) {
    auto logits = model(ids);  // its own statement: the load-balance loss reads its routing
    auto loss = cross_entropy(logits, targets) + load_balance_loss(model) * 0.01;
    losses.push_back(static_cast<double>(loss.item()));
    loss.backward();
    opt.step();
    opt.zero_grad();
    release_routing_graphs(model);
  }
  put(r, t + " mixed precision loss per step", Tensor<double>::from(losses, {3}), tl);
  put_parameters<T, D>(r, t + " mixed precision param", model, tl);
}

}  // namespace training

template <class T, class D>
void training_cases(Results& r) {
  training::optimizer_cases<T, D>(r);
  training::clip_cases<T, D>(r);
  training::end_to_end_cases<T, D>(r);
}

template <class D>
void cases_training(Results& r) {
  training_cases<float, D>(r);
  training_cases<double, D>(r);
  training::mixed_precision_case<float, D>(r);
  training::mixed_precision_case<double, D>(r);
}

}  // namespace mixmoe_parity
