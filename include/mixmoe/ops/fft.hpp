// Real FFT along the last axis (FFTW; cuFFT on a device, backend/cuda/attention.cuh), with gradients.
//
//   N  samples on the last (transform) axis
//   F  frequency bins, N/2 + 1 (DC, the interior bins, and the Nyquist bin when N is even)
//   R  rows: the product of all leading axes, transformed independently with one plan
//
//   rfft(x (..., N))                      -> (..., F, 2)  (re, im) of Y_k = sum_n x_n e^{-2 pi i k n / N}
//   rfft_magnitude(x (..., N), eps = 0)   -> (..., F)     sqrt(re^2 + im^2 + eps)
//
// Backward. Re Y_k = sum_n x_n cos(t_kn), Im Y_k = -sum_n x_n sin(t_kn) with t_kn = 2 pi k n / N, so for
// upstream gradients (gr_k, gi_k):  dL/dx_n = sum_{k<F} gr_k cos(t_kn) - gi_k sin(t_kn).
// An unnormalised c2r of Z_0..Z_{F-1} computes, by Hermitian symmetry,
//   x_n = Re Z_0 + 2 sum_{0<k<N/2} (Re Z_k cos(t_kn) - Im Z_k sin(t_kn)) + [N even] Re Z_{N/2} cos(pi n),
// i.e. it counts each interior bin twice and ignores the imaginary parts of DC and Nyquist. The
// adjoint is therefore c2r of Z with Z_0 = (gr_0, 0), Z_k = (gr_k, gi_k) / 2 for 0 < k < N/2, and
// Z_{N/2} = (gr_{N/2}, 0) for even N. Dropping gi_0 and gi_{N/2} is exact, not an approximation:
// sin(t_kn) vanishes for k = 0 and k = N/2, so those imaginary parts never depended on x. For odd N
// every k >= 1 is interior (k <= (N-1)/2 < N/2).
#pragma once

#include <algorithm>
#include <cmath>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/fftw.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail {

/// Rows per parallel chunk: a chunk should carry some 10^4 samples of work.
inline index_t fft_grain(index_t n) { return std::max<index_t>(1, (1 << 13) / std::max<index_t>(n, 1)); }

/// x (R, N) -> y (R, F, 2), both contiguous.
template <Scalar T>
void rfft_rows(const T* x, T* y, index_t rows, index_t n) {
  const auto plan = cpu::fft::PlanCache::instance().get<T>(cpu::fft::Transform::r2c, n);
  const index_t f2 = 2 * (n / 2 + 1);
  cpu::parallel_for(rows, fft_grain(n), [&](index_t lo, index_t hi) {
    for (index_t r = lo; r < hi; ++r) cpu::fft::execute_r2c<T>(plan, n, x + r * n, y + r * f2);
  });
}

/// gx (R, N) = the adjoint of rfft_rows applied to the upstream gradient of each row.
/// fill(r, z) writes row r's (gr_k, gi_k) for k < F into z (F, 2); the halving of the
/// interior bins and the DC/Nyquist imaginary parts are handled here.
template <Scalar T, Device D, class Fill>
Tensor<T, D> rfft_adjoint_rows(index_t rows, index_t n, const Shape& xshape, Fill fill) {
  require_host<D>();  // on a device: DeviceOps<D>::fft_rfft_adjoint, fft_magnitude_adjoint
  const auto plan = cpu::fft::PlanCache::instance().get<T>(cpu::fft::Transform::c2r, n);
  const index_t f = n / 2 + 1;
  Tensor<T, D> gx = Tensor<T, D>::empty(xshape);  // (..., N)
  T* pgx = gx.data();
  cpu::parallel_for(rows, fft_grain(n), [&](index_t lo, index_t hi) {
    // c2r overwrites its input, so each row is built in a per-thread scratch spectrum.
    T* z = cpu::fft::detail::staging<T, 2>(static_cast<std::size_t>(2 * f));  // (F, 2)
    for (index_t r = lo; r < hi; ++r) {
      fill(r, z);
      const index_t last_interior = (n % 2 == 0) ? f - 2 : f - 1;  // Nyquist (even N) is not interior
      for (index_t k = 1; k <= last_interior; ++k) {
        z[2 * k] *= T(0.5);
        z[2 * k + 1] *= T(0.5);
      }
      z[1] = T(0);
      if (n % 2 == 0) z[2 * (f - 1) + 1] = T(0);
      cpu::fft::execute_c2r<T>(plan, n, z, pgx + r * n);
    }
  });
  return gx;
}

/// Checks shared by rfft and rfft_magnitude; returns N.
template <Scalar T, Device D>
index_t rfft_check(const Var<T, D>& x, const char* op) {
  MIXMOE_CHECK(x.dim() >= 1, op, "needs at least one axis (the transform axis), got shape ", x.shape());
  MIXMOE_CHECK(x.size(-1) > 0, op, "empty last axis in shape ", x.shape(), ": nothing to transform");
  return x.size(-1);
}

}  // namespace detail

/// Real FFT of x (..., N) along its last axis: (..., N/2 + 1, 2) holding (re, im).
template <Scalar T, Device D>
Var<T, D> rfft(const Var<T, D>& x) {
  const index_t n = detail::rfft_check(x, "rfft");
  MIXMOE_CHECK(x.dim() < kMaxDims, "rfft", "input of shape ", x.shape(), " would give a result with more than ", kMaxDims,
               " axes");
  const index_t f = n / 2 + 1, rows = x.numel() / n;
  Shape oshape = x.shape().with(-1, f);
  oshape.push_back(2);
  const Tensor<T, D> xv = x.value().contiguous();  // (R, N)
  Tensor<T, D> out = Tensor<T, D>::empty(oshape);  // (..., F, 2)
  if constexpr (!Tensor<T, D>::on_host) {
    // cuFFT (backend/cuda/attention.cuh, fft.cuh): the same transform and the same adjoint.
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::fft_rfft_rows(xv.data(), out.data(), rows, n);
    return record("rfft", std::move(out), {x}, [xshape = x.shape(), rows, n](autograd::BackwardContext<T, D>& ctx) {
      if (!ctx.needs_grad(0)) return;
      Tensor<T, D> gx = Tensor<T, D>::empty(xshape);  // (..., N)
      detail::DeviceOps<D>::fft_rfft_adjoint(ctx.grad_out().data(), gx.data(), rows, n);
      ctx.accumulate(0, std::move(gx));
    });
  } else {
    detail::rfft_rows(xv.data(), out.data(), rows, n);
    return record("rfft", std::move(out), {x}, [xshape = x.shape(), rows, n, f](autograd::BackwardContext<T, D>& ctx) {
      if (!ctx.needs_grad(0)) return;
      const T* g = ctx.grad_out().data();  // (R, F, 2)
      ctx.accumulate(0, detail::rfft_adjoint_rows<T, D>(rows, n, xshape, [g, f](index_t r, T* z) {
                       std::copy(g + r * 2 * f, g + (r + 1) * 2 * f, z);
                     }));
    });
  }
}

/// |rfft(x)| along the last axis: x (..., N) -> (..., N/2 + 1) = sqrt(re^2 + im^2 + eps).
/// eps > 0 keeps the gradient finite where a bin is zero; with eps = 0 the gradient of a
/// bin of magnitude exactly zero is taken as zero (the minimum-norm subgradient).
template <Scalar T, Device D>
Var<T, D> rfft_magnitude(const Var<T, D>& x, double eps = 0.0) {
  const index_t n = detail::rfft_check(x, "rfft_magnitude");
  MIXMOE_CHECK(eps >= 0.0 && std::isfinite(eps), "rfft_magnitude", "eps must be finite and >= 0, got ", eps);
  const index_t f = n / 2 + 1, rows = x.numel() / n;
  const Tensor<T, D> xv = x.value().contiguous();                 // (R, N)
  Tensor<T, D> spec = Tensor<T, D>::empty(Shape{rows, f, 2});     // (R, F, 2)
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape().with(-1, f));  // (..., F)
  if constexpr (!Tensor<T, D>::on_host) {
    detail::require_device_ops<D>();
    detail::DeviceOps<D>::fft_rfft_rows(xv.data(), spec.data(), rows, n);
    detail::DeviceOps<D>::fft_magnitude(spec.data(), out.data(), rows * f, static_cast<T>(eps));
    return record("rfft_magnitude", out, {x},
                  [xshape = x.shape(), spec, out, rows, n](autograd::BackwardContext<T, D>& ctx) {
                    if (!ctx.needs_grad(0)) return;
                    Tensor<T, D> gx = Tensor<T, D>::empty(xshape);  // (..., N)
                    detail::DeviceOps<D>::fft_magnitude_adjoint(ctx.grad_out().data(), spec.data(), out.data(),
                                                                gx.data(), rows, n);
                    ctx.accumulate(0, std::move(gx));
                  });
  } else {
    detail::rfft_rows(xv.data(), spec.data(), rows, n);
    {
      const T* s = spec.data();
      T* o = out.data();
      const T e = static_cast<T>(eps);
      cpu::parallel_for(rows * f, 1 << 14, [&](index_t lo, index_t hi) {
        for (index_t i = lo; i < hi; ++i) o[i] = std::sqrt(s[2 * i] * s[2 * i] + s[2 * i + 1] * s[2 * i + 1] + e);
      });
    }
    return record("rfft_magnitude", out, {x},
                  [xshape = x.shape(), spec, out, rows, n, f](autograd::BackwardContext<T, D>& ctx) {
                    if (!ctx.needs_grad(0)) return;
                    const T* g = ctx.grad_out().data();  // (R, F)
                    const T* s = spec.data();
                    const T* m = out.data();
                    // d|Y_k|/d(re, im) = (re, im) / |Y_k|
                    ctx.accumulate(0, detail::rfft_adjoint_rows<T, D>(rows, n, xshape, [g, s, m, f](index_t r, T* z) {
                                     for (index_t k = 0; k < f; ++k) {
                                       const index_t i = r * f + k;
                                       const T w = m[i] > T(0) ? g[i] / m[i] : T(0);
                                       z[2 * k] = w * s[2 * i];
                                       z[2 * k + 1] = w * s[2 * i + 1];
                                     }
                                   }));
                  });
  }
}

}  // namespace mixmoe
