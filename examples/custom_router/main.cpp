// A router written in user code, plugged into a mixed-MoE language model.
//
// CosineRouter scores experts by the cosine similarity of a token's hidden vector with
// one learned direction per expert, sharpened by a learned temperature (X-MoE style):
//
//   x (N, C) token rows, C = d_model, E experts, K experts per token, M = N K assignments
//   weight (E, C), log_scale (1)
//   logits = exp(log_scale) * normalise(x) normalise(weight)^T  (N, E), rows of unit length
//   probs  = softmax(logits) over E (N, E)
//   gate   = softmax over each token's K largest logits (M), token-major
//
// It is written with tensor ops only: the autodiff gives its gradient, which the program
// checks against finite differences before training. It models LogitRouter (logits() and
// select() besides the Router members), so FourierFeatures can wrap it.
//
// The program trains a small byte-level DecoderLM whose FFNs are MixedMoE layers with an
// LM and an MT expert group, each group routed by its own CosineRouter, on a licence text
// that every Debian system has; it prints the loss as it goes and the routing statistics
// of every layer at the end.
//
//   custom_router [--steps N] [--data FILE]
//
// Exit status: 0 when the router's gradient checks and the held-out loss went down.
#include <mixmoe/loss/load_balance.hpp>
#include <mixmoe/mixmoe.hpp>
#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/router_check.hpp>
#include <mixmoe/moe/routing_stats.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using namespace mixmoe;

template <Scalar T, Device D = Cpu>
struct CosineRouter {
  using value_type = T;
  using device_type = D;

  CosineRouter(const RouterShape& shape, Generator& gen) : k(shape.top_k) {
    MIXMOE_CHECK(shape.d_model > 0 && shape.num_experts > 0, "CosineRouter", "sizes must be positive, got d_model ",
                 shape.d_model, ", num_experts ", shape.num_experts);
    MIXMOE_CHECK(k >= 1 && k <= shape.num_experts, "CosineRouter", "top_k = ", k, " is out of range [1, ",
                 shape.num_experts, "]");
    // Only the directions matter: any scale of the initial weight gives the same logits.
    weight = parameter(Tensor<T, D>::randn({shape.num_experts, shape.d_model}, gen));
    // A temperature of 1/10 spreads unit cosines over a useful logit range from the start.
    log_scale = parameter(Tensor<T, D>::full({1}, static_cast<T>(std::log(10.0))));
  }

  [[nodiscard]] index_t num_experts() const { return weight.size(0); }

  /// x (N, C) -> (N, E)
  Var<T, D> logits(const Var<T, D>& x) const {
    MIXMOE_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "CosineRouter", "x must be token rows (N, ",
                 weight.size(1), "), got ", x.shape());
    const Var<T, D> cosine = linear(unit_rows(x), unit_rows(weight));  // (N, E)
    return cosine * exp(log_scale);                                    // (N, E) * (1)
  }

  /// The K largest of the given logits (N, E) per token; a wrapper may have added terms to them.
  Routing<T, D> select(const Var<T, D>& logits, const Var<T, D>& x, const RouteContext<D>& /*ctx*/) const {
    const index_t n = x.size(0), e = num_experts();
    MIXMOE_CHECK(logits.dim() == 2 && logits.size(0) == n && logits.size(1) == e, "CosineRouter", "logits must be (", n,
                 ", ", e, "), got ", logits.shape());
    Tensor<Index, D> picked;  // (N, K)
    {
      no_grad indices_only;  // which experts is a discrete choice: no gradient flows through it
      picked = topk(logits, k, -1).indices;
    }
    Routing<T, D> r;
    r.token = Tensor<Index, D>::empty({n * k});  // (M): token i's K assignments are i K .. i K + K - 1
    for (index_t m = 0; m < n * k; ++m) r.token.data()[m] = static_cast<Index>(m / k);
    r.expert = picked.reshape({n * k});                                      // (M)
    r.gate = reshape(softmax(gather(logits, 1, picked), -1), Shape{n * k});  // (M)
    r.probs = softmax(logits, -1);                                           // (N, E)
    r.logits = logits;
    r.num_experts = e;
    r.num_tokens = n;
    return r;
  }

  Routing<T, D> operator()(const Var<T, D>& x, const RouteContext<D>& ctx) const { return select(logits(x), x, ctx); }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    visit(join_name(prefix, "weight"), weight);
    visit(join_name(prefix, "log_scale"), log_scale);
  }

  Var<T, D> weight;     // (E, C) one direction per expert
  Var<T, D> log_scale;  // (1) log of the temperature's inverse
  index_t k = 1;

 private:
  /// Each row divided by its Euclidean norm; the epsilon keeps a zero row finite.
  static Var<T, D> unit_rows(const Var<T, D>& a) {
    return a / sqrt(sum(square(a), -1, true) + 1e-12);  // (R, C) / (R, 1)
  }
};

/// The policy form, bound by the MoE layer to its scalar type and device.
struct CosineTopK {
  template <Scalar T, Device D>
  using bind = CosineRouter<T, D>;
};

static_assert(check_logit_router<CosineRouter<float>>());
static_assert(LogitRouter<bind_router_t<FourierFeatures<CosineTopK, transform::FFTMagnitude<>>, double, Cpu>>);

using Expert = SwiGLU<float>;
using FFN = MixedMoE<CosineTopK, ExpertGroup<Expert, tag::lm>, ExpertGroup<Expert, tag::mt>>;
using Model = DecoderLM<CausalSelfAttention<float>, FFN>;

// ---- gradient check -------------------------------------------------------------

/// Max abs error of the router's gates and probabilities against finite differences, in
/// double, w.r.t. x and every parameter; prints it. R is a concrete router type.
template <class R>
bool check_router_gradient(const char* name) {
  Generator gen(7);
  R router(RouterShape{.d_model = 6, .num_experts = 4, .top_k = 2}, gen);
  const index_t n = 5;
  std::vector<Var<double>> inputs{Var<double>(Tensor<double>::randn({n, 6}, gen), true)};
  for (auto& p : parameters(router)) inputs.push_back(p);  // the router's own Vars: perturbed in place
  const auto fn = [&](const std::vector<Var<double>>& in) {
    const Routing<double> r = router(in[0], RouteContext<Cpu>{});
    return concat({r.gate, reshape(r.probs, Shape{n * 4})}, 0);  // (M + N E)
  };
  const GradcheckResult res = gradcheck(fn, inputs);
  std::printf("gradcheck %-30s max abs error %.2e  %s\n", name, res.max_abs_error, res.ok ? "ok" : "FAILED");
  if (!res) std::fputs(res.message.c_str(), stderr);
  return res.ok;
}

// ---- data -----------------------------------------------------------------------

std::string load_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return in ? std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()) : std::string();
}

/// `batch` windows of `len` + 1 bytes starting at the given offsets: ids and next-byte targets (B, T).
struct TextBatch {
  Tensor<Index> ids, targets;
};
TextBatch make_batch(const std::string& text, const std::vector<std::size_t>& starts, index_t len) {
  const auto b = static_cast<index_t>(starts.size());
  TextBatch out{Tensor<Index>::empty({b, len}), Tensor<Index>::empty({b, len})};
  for (index_t i = 0; i < b; ++i)
    for (index_t t = 0; t < len; ++t) {
      const std::size_t at = starts[static_cast<std::size_t>(i)] + static_cast<std::size_t>(t);
      out.ids(i, t) = static_cast<unsigned char>(text[at]);
      out.targets(i, t) = static_cast<unsigned char>(text[at + 1]);
    }
  return out;
}

float evaluate(const Model& model, const TextBatch& batch) {
  no_grad ng;
  return cross_entropy(model(batch.ids), batch.targets).item();
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 200;
  std::string path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--data") == 0 && i + 1 < argc) {
      path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--data FILE]\n", argv[0]);
      return 2;
    }
  }
  if (steps < 1) {
    std::fprintf(stderr, "custom_router: --steps must be at least 1\n");
    return 2;
  }

  // 1. The router's gradient comes from the autodiff: check it, and the Fourier-wrapped form's.
  using Wrapped = bind_router_t<FourierFeatures<CosineTopK, transform::FFTMagnitude<>>, double, Cpu>;
  const bool plain_ok = check_router_gradient<CosineRouter<double>>("CosineRouter");
  const bool wrapped_ok = check_router_gradient<Wrapped>("FourierFeatures<CosineTopK, FFT>");
  const bool ok = plain_ok && wrapped_ok;

  // 2. Data: bytes of a licence text, the last tenth held out.
  std::string text;
  for (const char* candidate : {"/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"}) {
    if (!path.empty()) break;
    if (!load_text(candidate).empty()) path = candidate;
  }
  text = path.empty() ? std::string() : load_text(path);
  const index_t len = 32, batch = 8;
  if (text.size() < 20 * static_cast<std::size_t>(len)) {
    std::fprintf(stderr, "custom_router: no usable text in '%s' (pass --data FILE)\n", path.c_str());
    return 2;
  }
  const std::size_t split = text.size() * 9 / 10;
  std::printf("data: %s, %zu bytes (%zu for training)\n", path.c_str(), text.size(), split);

  // 3. A byte-level model: 2 layers, each FFN 4 LM + 4 MT experts, one CosineRouter per group.
  ModelConfig cfg;
  cfg.vocab = 256;
  cfg.d_model = 48;
  cfg.layers = 2;
  cfg.heads = 4;
  cfg.d_ff = 96;
  cfg.seed = 1;
  cfg.moe.experts_per_group = {4, 4};
  cfg.moe.expert_hidden = 32;
  cfg.moe.top_k = 1;                   // per group
  cfg.moe.mix = GroupMix::group_gate;  // groups mixed by a learned per-token gate
  Model model(cfg);
  std::printf("model: %lld parameters; router parameters of layer 0:", static_cast<long long>(count_parameters(model)));
  for (const auto& [name, p] : named_parameters(model))
    if (name.rfind("layers.0.ffn.router", 0) == 0) std::printf(" %s %s", name.c_str(), p.shape().to_string().c_str());
  std::printf("\n");

  Generator gen(3);
  std::vector<std::size_t> eval_starts;
  for (int i = 0; i < 16; ++i) eval_starts.push_back(split + gen.below(text.size() - split - len - 1));
  const TextBatch eval = make_batch(text, eval_starts, len);
  const float eval_before = evaluate(model, eval);
  std::printf("held-out loss before training %.4f (uniform over bytes: %.4f)\n", eval_before, std::log(256.0));

  // 4. Training: next-byte cross-entropy plus the two router regularisers.
  AdamW<float> opt(parameters(model), {.lr = 3e-3, .weight_decay = 0.0});
  const auto start = std::chrono::steady_clock::now();
  double window = 0;
  int in_window = 0;
  for (int step = 1; step <= steps; ++step) {
    std::vector<std::size_t> starts;
    for (index_t i = 0; i < batch; ++i) starts.push_back(gen.below(split - len - 1));
    const TextBatch b = make_batch(text, starts, len);
    auto ce = cross_entropy(model(b.ids), b.targets);
    auto loss = ce + 0.01 * load_balance_loss(model) + 0.001 * router_z_loss(model);
    loss.backward();
    opt.step();
    opt.zero_grad();
    window += ce.item();
    ++in_window;
    if (step % 10 == 0 || step == steps) {
      std::printf("step %4d  train loss %.4f\n", step, window / in_window);
      window = 0;
      in_window = 0;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const float eval_after = evaluate(model, eval);  // also leaves this batch's routing in the layers
  std::printf("held-out loss after %d steps %.4f (%.1f ms per step)\n", steps, eval_after, 1e3 * seconds / steps);

  // 5. How the routers use their experts, per layer, on the held-out batch.
  std::printf("\nrouting on the held-out batch:\n");
  print_routing_stats(std::cout, collect_routing_stats(model));
  for (std::size_t l = 0; l < model.blocks.size(); ++l) {
    std::printf("layer %zu temperatures:", l);
    for (const auto& r : model.blocks[l].ffn.routers) std::printf(" %.4f", 1.0 / std::exp(r.log_scale.item()));
    std::printf("\n");
  }

  if (!ok) std::fprintf(stderr, "custom_router: the router's gradient check FAILED\n");
  if (!(eval_after < eval_before)) std::fprintf(stderr, "custom_router: the held-out loss did not go down\n");
  return ok && eval_after < eval_before ? 0 : 1;
}
