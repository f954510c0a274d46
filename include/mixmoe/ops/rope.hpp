// Rotary position embedding (RoPE) in the "rotate_half" layout of LLaMA/Qwen2
// checkpoints: channel i is paired with channel i + Dh/2, and the pair of token t
// is rotated by the angle (position_offset + t) * theta^(-2i/Dh).
//
//   B batch, T time (tokens of this call), H heads, Dh head size (even)
//   rope: x (B, T, H, Dh) -> (B, T, H, Dh)
//
// A KV-cache decoder step passes the number of cached tokens as position_offset,
// so a token gets the same rotation whether it is processed alone or in a sequence.
// A rotation is orthogonal, so the backward is the inverse rotation of the gradient.
// On a device (Cuda) a kernel computes the cos/sin table by the same formula (angles in double,
// rounded to T), and another rotates the pairs (backend/cuda/attention.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail {

/// cos and sin of the rotation angles for positions [offset, offset + T), (T, Dh/2) row-major.
template <class T>
struct RopeTable {
  index_t t = 0, half = 0, offset = 0;
  double theta = 0;
  std::vector<T> cos, sin;  // (T, Dh/2)
};

/// The table for (T, Dh, offset, theta). The last table built on this thread is kept:
/// q and k of a layer (and its backward) use the same one, and per-thread reuse needs no lock.
template <class T>
std::shared_ptr<const RopeTable<T>> rope_table(index_t t, index_t dh, index_t offset, double theta) {
  thread_local std::shared_ptr<const RopeTable<T>> last;
  const index_t half = dh / 2;
  if (last && last->t == t && last->half == half && last->offset == offset && last->theta == theta) return last;
  auto tab = std::make_shared<RopeTable<T>>();
  tab->t = t;
  tab->half = half;
  tab->offset = offset;
  tab->theta = theta;
  tab->cos.resize(static_cast<std::size_t>(t * half));
  tab->sin.resize(static_cast<std::size_t>(t * half));
  std::vector<double> inv_freq(static_cast<std::size_t>(half));
  for (index_t i = 0; i < half; ++i)
    inv_freq[static_cast<std::size_t>(i)] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
  // Angles in double: positions reach 1e5 and more, where a float angle loses whole radians' digits.
  for (index_t p = 0; p < t; ++p)
    for (index_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(offset + p) * inv_freq[static_cast<std::size_t>(i)];
      tab->cos[static_cast<std::size_t>(p * half + i)] = static_cast<T>(std::cos(a));
      tab->sin[static_cast<std::size_t>(p * half + i)] = static_cast<T>(std::sin(a));
    }
  last = tab;
  return last;
}

/// Rotates each (i, i + Dh/2) pair of x (B, T, H, Dh) by the table's angles, or by
/// their negatives when `inverse` (the backward, and the way to undo a rotation).
template <class T, class D>
Tensor<T, D> rope_rotate(const Tensor<T, D>& x, const RopeTable<T>& tab, bool inverse) {
  require_host<D>();  // rope_rotate_device is the device's
  const Tensor<T, D> xc = x.contiguous();  // (B, T, H, Dh)
  const index_t b = x.size(0), t = x.size(1), h = x.size(2), half = tab.half;
  MIXMOE_CHECK(t == tab.t && x.size(3) == 2 * half, "rope", "input ", x.shape(), " does not match a table for T = ",
               tab.t, ", Dh = ", 2 * half);
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());  // (B, T, H, Dh)
  const T* px = xc.data();
  T* po = out.data();
  const T sign = inverse ? T(-1) : T(1);
  const index_t row = h * 2 * half;
  cpu::parallel_for(b * t, std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, row)), [&](index_t lo, index_t hi) {
    for (index_t r = lo; r < hi; ++r) {
      const index_t p = r % t;
      const T* c = tab.cos.data() + p * half;
      const T* s = tab.sin.data() + p * half;
      for (index_t hh = 0; hh < h; ++hh) {
        const T* xi = px + r * row + hh * 2 * half;
        T* oi = po + r * row + hh * 2 * half;
        for (index_t i = 0; i < half; ++i) {
          const T x1 = xi[i], x2 = xi[i + half], sn = sign * s[i];
          oi[i] = x1 * c[i] - x2 * sn;
          oi[i + half] = x2 * c[i] + x1 * sn;
        }
      }
    }
  });
  return out;
}

/// The device's table: cos (T, Dh/2) stacked on sin (T, Dh/2), as (2, T, Dh/2), computed on the
/// device by rope_table's formula (the angles in double, then rounded to T), so that no host
/// table is uploaded (an upload waits for the device).
template <class T, class D>
Tensor<T, D> rope_table_device(index_t t, index_t dh, index_t offset, double theta) {
  require_device_ops<D>();
  const index_t half = dh / 2;
  Tensor<T, D> tab = Tensor<T, D>::empty(Shape{2, t, half});  // (2, T, Dh/2): cos, sin
  DeviceOps<D>::rope_angles(tab.data(), tab.data() + t * half, t, dh, offset, theta);
  return tab;
}

/// rope_rotate on a device, with a table of rope_table_device.
template <class T, class D>
Tensor<T, D> rope_rotate_device(const Tensor<T, D>& x, const Tensor<T, D>& tab, bool inverse) {
  require_device_ops<D>();
  const Tensor<T, D> xc = x.contiguous();  // (B, T, H, Dh)
  const index_t t = x.size(1), half = x.size(3) / 2;
  MIXMOE_CHECK(tab.dim() == 3 && tab.size(1) == t && tab.size(2) == half, "rope", "input ", x.shape(),
               " does not match a table of shape ", tab.shape());
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());  // (B, T, H, Dh)
  DeviceOps<D>::rope_apply(xc.data(), tab.data(), tab.data() + t * half, out.data(), x.size(0), t, x.size(2),
                           x.size(3), inverse);
  return out;
}

}  // namespace detail

/// Rotary embedding of x (B, T, H, Dh): token t sits at position position_offset + t.
template <Scalar T, Device D>
Var<T, D> rope(const Var<T, D>& x, index_t position_offset = 0, double theta = 10000.0) {
  MIXMOE_CHECK(x.dim() == 4, "rope", "input must be (B, T, H, Dh), got ", x.shape());
  MIXMOE_CHECK(x.size(3) % 2 == 0, "rope", "head size Dh = ", x.size(3), " must be even (input ", x.shape(), ")");
  MIXMOE_CHECK(position_offset >= 0, "rope", "position_offset ", position_offset, " must be >= 0");
  MIXMOE_CHECK(std::isfinite(theta) && theta > 0, "rope", "theta ", theta, " must be a positive number");
  if constexpr (!Tensor<T, D>::on_host) {
    auto tab = detail::rope_table_device<T, D>(x.size(1), x.size(3), position_offset, theta);  // (2, T, Dh/2)
    auto out = detail::rope_rotate_device(x.value(), tab, false);                              // (B, T, H, Dh)
    return record("rope", std::move(out), {x}, [tab](autograd::BackwardContext<T, D>& ctx) {
      if (ctx.needs_grad(0)) ctx.accumulate(0, detail::rope_rotate_device(ctx.grad_out(), tab, true));
    });
  } else {
    auto tab = detail::rope_table<T>(x.size(1), x.size(3), position_offset, theta);
    auto out = detail::rope_rotate(x.value(), *tab, false);  // (B, T, H, Dh)
    return record("rope", std::move(out), {x}, [tab](autograd::BackwardContext<T, D>& ctx) {
      if (ctx.needs_grad(0)) ctx.accumulate(0, detail::rope_rotate(ctx.grad_out(), *tab, true));
    });
  }
}

}  // namespace mixmoe
