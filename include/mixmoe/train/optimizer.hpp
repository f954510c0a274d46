// Optimizers over a list of parameters: SGD (momentum, weight decay) and AdamW
// (decoupled weight decay, bias correction). State tensors are created on the
// first step and reused, so steady-state steps allocate nothing.
//
//   AdamW opt(params, {.lr = 3e-4});
//   loss.backward(); opt.step(); opt.zero_grad();
//
// On a device (Var<T, Cuda>) each parameter's update is one fused element kernel
// (DeviceOps<D>::train_adamw_step / train_sgd_step, backend/cuda/train.cuh) with the same
// arithmetic in T; the step's bias corrections are computed on the host in double, as here.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "mixmoe/autograd/var.hpp"

namespace mixmoe {

/// Base: owns the parameter list; zero_grad() clears every gradient.
template <Scalar T, Device D>
class Optimizer {
 public:
  explicit Optimizer(std::vector<Var<T, D>> params) : params_(std::move(params)) {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      MIXMOE_CHECK(params_[i].defined() && params_[i].is_leaf(), "Optimizer", "parameter ", i, " is not a leaf Var");
    }
  }
  virtual ~Optimizer() = default;
  void zero_grad() {
    for (auto& p : params_) p.zero_grad();
  }
  [[nodiscard]] const std::vector<Var<T, D>>& parameters() const { return params_; }
  [[nodiscard]] std::int64_t steps() const { return step_; }
  virtual void step() = 0;

 protected:
  std::vector<Var<T, D>> params_;
  std::int64_t step_ = 0;
};

struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double weight_decay = 0.0;  // L2, added to the gradient
};

template <Scalar T, Device D = Cpu>
class SGD final : public Optimizer<T, D> {
 public:
  SGD(std::vector<Var<T, D>> params, SGDOptions opt) : Optimizer<T, D>(std::move(params)), opt_(opt) {
    velocity_.resize(this->params_.size());
  }
  void set_lr(double lr) { opt_.lr = lr; }

  void step() override {
    no_grad guard;
    for (std::size_t i = 0; i < this->params_.size(); ++i) {
      auto& p = this->params_[i];
      if (!p.requires_grad() || !p.grad().defined()) continue;
      T* w = p.value().data();
      const T* g = p.grad().data();
      const index_t n = p.numel();
      const T lr = static_cast<T>(opt_.lr), wd = static_cast<T>(opt_.weight_decay), mu = static_cast<T>(opt_.momentum);
      if (mu != T(0) && !velocity_[i].defined()) velocity_[i] = Tensor<T, D>::zeros(p.shape());
      if constexpr (!Tensor<T, D>::on_host) {
        detail::require_device_ops<D>();
        detail::DeviceOps<D>::train_sgd_step(w, g, mu != T(0) ? velocity_[i].data() : static_cast<T*>(nullptr), n, lr,
                                             wd, mu);
      } else if (mu != T(0)) {
        T* v = velocity_[i].data();
        for (index_t j = 0; j < n; ++j) {
          v[j] = mu * v[j] + g[j] + wd * w[j];
          w[j] -= lr * v[j];
        }
      } else {
        for (index_t j = 0; j < n; ++j) w[j] -= lr * (g[j] + wd * w[j]);
      }
    }
    ++this->step_;
  }

 private:
  SGDOptions opt_;
  std::vector<Tensor<T, D>> velocity_;
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // decoupled: w -= lr * wd * w
};

template <Scalar T, Device D = Cpu>
class AdamW final : public Optimizer<T, D> {
 public:
  AdamW(std::vector<Var<T, D>> params, AdamWOptions opt) : Optimizer<T, D>(std::move(params)), opt_(opt) {
    MIXMOE_CHECK(opt.beta1 >= 0 && opt.beta1 < 1 && opt.beta2 >= 0 && opt.beta2 < 1, "AdamW", "betas must be in [0, 1), got ",
                 opt.beta1, ", ", opt.beta2);
    m_.resize(this->params_.size());
    v_.resize(this->params_.size());
  }
  void set_lr(double lr) { opt_.lr = lr; }
  [[nodiscard]] const AdamWOptions& options() const { return opt_; }
  /// First and second moments, per parameter (undefined until that parameter's first update).
  [[nodiscard]] std::vector<Tensor<T, D>>& first_moments() { return m_; }
  [[nodiscard]] std::vector<Tensor<T, D>>& second_moments() { return v_; }
  void set_steps(std::int64_t s) { this->step_ = s; }

  void step() override {
    no_grad guard;
    ++this->step_;
    const double bc1 = 1 - std::pow(opt_.beta1, static_cast<double>(this->step_));
    const double bc2 = 1 - std::pow(opt_.beta2, static_cast<double>(this->step_));
    const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2), eps = static_cast<T>(opt_.eps);
    const T step_size = static_cast<T>(opt_.lr / bc1), inv_sqrt_bc2 = static_cast<T>(1.0 / std::sqrt(bc2));
    const T decay = static_cast<T>(1.0 - opt_.lr * opt_.weight_decay);
    for (std::size_t i = 0; i < this->params_.size(); ++i) {
      auto& p = this->params_[i];
      if (!p.requires_grad() || !p.grad().defined()) continue;
      if (!m_[i].defined()) {
        m_[i] = Tensor<T, D>::zeros(p.shape());
        v_[i] = Tensor<T, D>::zeros(p.shape());
      }
      T* w = p.value().data();
      const T* g = p.grad().data();
      T* m = m_[i].data();
      T* v = v_[i].data();
      if constexpr (!Tensor<T, D>::on_host) {
        detail::require_device_ops<D>();
        detail::DeviceOps<D>::train_adamw_step(w, g, m, v, p.numel(), b1, b2, eps, step_size, inv_sqrt_bc2, decay);
      } else {
        for (index_t j = 0, n = p.numel(); j < n; ++j) {
          m[j] = b1 * m[j] + (1 - b1) * g[j];
          v[j] = b2 * v[j] + (1 - b2) * g[j] * g[j];
          w[j] = w[j] * decay - step_size * m[j] / (std::sqrt(v[j]) * inv_sqrt_bc2 + eps);
        }
      }
    }
  }

 private:
  AdamWOptions opt_;
  std::vector<Tensor<T, D>> m_, v_;
};

}  // namespace mixmoe
