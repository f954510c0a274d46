// Gradient clipping and gradient health checks over a list of parameters.
//
//   loss.backward();
//   const GradNorm gn = clip_grad_norm(opt.parameters(), 1.0);   // global L2 norm, clipped to 1
//   if (guard.check(loss.item(), gn.norm)) opt.step();
//   opt.zero_grad();
//
// The global norm is sqrt(sum over every parameter's gradient of g^2), accumulated in
// double whatever the parameters' scalar type. Parameters without a gradient (frozen,
// or not reached by backward) are skipped.
//
// On a device (Var<T, Cuda>) the norm is a device reduction over all the gradients
// (DeviceOps<D>::train_sum_squares, backend/cuda/train.cuh) and the clipping scale is applied by
// a kernel; the norm comes back as a host double: one small device->host copy (a synchronisation)
// per grad_norm / clip_grad_norm call, and one flag per grads_finite call. clip_grad_norm_async
// does the same without the copy: the norm and scale stay on the device, to be read later with
// the step's other numbers (train_loop reads them with the loss, in one copy per step).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixmoe/autograd/var.hpp"

namespace mixmoe {

/// What clip_grad_norm() saw and did.
struct GradNorm {
  /// The global L2 norm of the gradients before clipping (inf or nan when a gradient is).
  double norm = 0.0;
  /// Whether the gradients were scaled down.
  bool clipped = false;
  /// The factor the gradients were multiplied by (1 when not clipped).
  double scale = 1.0;
};

namespace detail {

/// The gradient of p as a contiguous tensor; replaces a strided gradient by a contiguous copy first.
template <Scalar T, Device D>
const Tensor<T, D>* contiguous_grad(const Var<T, D>& p) {
  if (!p.defined() || !p.grad().defined()) return nullptr;
  if (!p.grad().is_contiguous()) p.set_grad(p.grad().contiguous());
  return &p.grad();
}

/// The device pointers and sizes of the parameters' gradients (made contiguous), for the device
/// reductions of DeviceOps<D> (P: const T* to read them, T* to scale them).
template <Scalar T, Device D, class P>
void device_grad_list(const std::vector<Var<T, D>>& params, std::vector<P>& xs, std::vector<index_t>& ns) {
  for (const auto& p : params) {
    const Tensor<T, D>* g = contiguous_grad(p);
    if (!g) continue;
    xs.push_back(g->data());
    ns.push_back(g->numel());
  }
}

/// grad_norm on a device: the same two passes as on the host, each a device reduction in double.
template <Scalar T, Device D>
double device_grad_norm(const std::vector<Var<T, D>>& params) {
  require_device_ops<D>();
  std::vector<const T*> xs;
  std::vector<index_t> ns;
  device_grad_list(params, xs, ns);
  const double sum = DeviceOps<D>::train_sum_squares(xs, ns);
  if (std::isfinite(sum) || std::isnan(sum)) return std::sqrt(sum);
  // Overflow or a true inf (a NaN anywhere would have made the sum NaN): rescale and sum again.
  const double amax = DeviceOps<D>::train_abs_max(xs, ns);
  if (std::isinf(amax)) return amax;
  return amax * std::sqrt(DeviceOps<D>::train_sum_scaled_squares(xs, ns, amax));
}

}  // namespace detail

/// Global L2 norm of the gradients, in double. Returns inf when a gradient holds inf, nan when one
/// holds nan; finite gradients whose squares overflow a double still give the right (finite) norm.
template <Scalar T, Device D>
double grad_norm(const std::vector<Var<T, D>>& params) {
  if constexpr (!Tensor<T, D>::on_host) {
    return detail::device_grad_norm(params);
  } else {
    double sum = 0.0;
    for (const auto& p : params) {
      const Tensor<T, D>* g = detail::contiguous_grad(p);
      if (!g) continue;
      const T* x = g->data();
      for (index_t i = 0, n = g->numel(); i < n; ++i) {
        const double v = static_cast<double>(x[i]);
        sum += v * v;
      }
    }
    if (std::isfinite(sum) || std::isnan(sum)) return std::sqrt(sum);
    // Overflow or a true inf: rescale by the largest magnitude and sum again.
    double amax = 0.0;
    for (const auto& p : params) {
      const Tensor<T, D>* g = detail::contiguous_grad(p);
      if (!g) continue;
      const T* x = g->data();
      for (index_t i = 0, n = g->numel(); i < n; ++i) {
        const double v = std::abs(static_cast<double>(x[i]));
        if (std::isnan(v)) return std::numeric_limits<double>::quiet_NaN();
        amax = std::max(amax, v);
      }
    }
    if (std::isinf(amax)) return amax;
    double scaled = 0.0;
    for (const auto& p : params) {
      const Tensor<T, D>* g = detail::contiguous_grad(p);
      if (!g) continue;
      const T* x = g->data();
      for (index_t i = 0, n = g->numel(); i < n; ++i) {
        const double v = static_cast<double>(x[i]) / amax;
        scaled += v * v;
      }
    }
    return amax * std::sqrt(scaled);
  }
}

/// True when every gradient element is finite (no nan, no inf). Parameters without a gradient count as finite.
template <Scalar T, Device D>
bool grads_finite(const std::vector<Var<T, D>>& params) {
  if constexpr (!Tensor<T, D>::on_host) {
    detail::require_device_ops<D>();
    std::vector<const T*> xs;
    std::vector<index_t> ns;
    detail::device_grad_list(params, xs, ns);
    return detail::DeviceOps<D>::train_all_finite(xs, ns);
  } else {
    for (const auto& p : params) {
      if (!p.defined() || !p.grad().defined()) continue;
      const Tensor<T, D> g = p.grad().contiguous();
      const T* x = g.data();
      for (index_t i = 0, n = g.numel(); i < n; ++i)
        if (!std::isfinite(static_cast<double>(x[i]))) return false;
    }
    return true;
  }
}

/// Scales every gradient in place by max_norm / norm when the global norm exceeds max_norm, so
/// that the clipped norm is max_norm (up to rounding in T). max_norm <= 0 disables clipping (the
/// norm is still computed). A non-finite norm is returned as it is and nothing is scaled: skip
/// that step (see StepGuard) rather than apply it.
template <Scalar T, Device D>
GradNorm clip_grad_norm(const std::vector<Var<T, D>>& params, double max_norm) {
  MIXMOE_CHECK(!std::isnan(max_norm), "clip_grad_norm", "max_norm is nan");
  GradNorm out;
  out.norm = grad_norm(params);
  if (max_norm <= 0 || !std::isfinite(out.norm) || out.norm <= max_norm) return out;
  out.scale = max_norm / out.norm;
  out.clipped = true;
  for (const auto& p : params) {
    const Tensor<T, D>* g = detail::contiguous_grad(p);
    if (!g) continue;
    T* x = g->data();
    if constexpr (!Tensor<T, D>::on_host) {
      detail::DeviceOps<D>::train_scale(x, g->numel(), out.scale);
    } else {
      for (index_t i = 0, n = g->numel(); i < n; ++i) x[i] = static_cast<T>(static_cast<double>(x[i]) * out.scale);
    }
  }
  return out;
}

/// clip_grad_norm without a host value: the same norm and the same clipping, and a (2) double
/// tensor on D holding {norm before clipping, scale applied} (scale 1: not clipped). On a device
/// nothing waits for the device; on the CPU it is clip_grad_norm's result as a tensor.
template <Scalar T, Device D>
Tensor<double, D> clip_grad_norm_async(const std::vector<Var<T, D>>& params, double max_norm) {
  MIXMOE_CHECK(!std::isnan(max_norm), "clip_grad_norm_async", "max_norm is nan");
  if constexpr (!Tensor<T, D>::on_host) {
    detail::require_device_ops<D>();
    std::vector<T*> xs;
    std::vector<index_t> ns;
    detail::device_grad_list(params, xs, ns);
    auto out = Tensor<double, D>::empty({2});
    detail::DeviceOps<D>::train_clip_norm(xs, ns, max_norm, out.data());
    return out;
  } else {
    const GradNorm gn = clip_grad_norm(params, max_norm);
    auto out = Tensor<double, D>::empty({2});
    out.data()[0] = gn.norm;
    out.data()[1] = gn.scale;
    return out;
  }
}

}  // namespace mixmoe
