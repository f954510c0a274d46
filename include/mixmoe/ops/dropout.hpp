// Inverted dropout.
//
//   dropout(x (any shape), p, gen, training) -> x's shape
//
// In training each element is zeroed with probability p and the kept ones are
// scaled by 1 / (1 - p), so the expected value of every element is unchanged and
// evaluation needs no rescaling. The mask is drawn from the given seeded Generator,
// one uniform draw per element in row-major order (element i is kept when its draw
// is >= p): the same generator state gives the same mask, and the generator
// advances by exactly numel() draws. p = 0 or training = false return x itself
// (the same Var: no copy, no draw).
//
// The mask is saved as a tensor of 0 and 1 / (1 - p) (the forward's multiplier),
// so the backward is one multiply: dx = g * mask.
//
// On a device (Cuda) the mask is drawn there (backend/cuda/index.cuh): the generator gives one
// 64-bit draw, the key of a counter-based (Philox) stream, and element i is kept when the i-th
// uniform of that stream is >= p. The same generator state gives the same mask on the device,
// and the generator advances by exactly one draw; the mask is not the CPU's (another stream),
// only distributed like it.
#pragma once

#include <cstdint>

#include <Eigen/Core>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"
#include "mixmoe/core/random.hpp"

namespace mixmoe {

/// Inverted dropout with drop probability p in [0, 1); see the file comment.
template <Scalar T, Device D>
Var<T, D> dropout(const Var<T, D>& x, double p, Generator& gen, bool training = true) {
  MIXMOE_CHECK(x.defined(), "dropout", "the input is an undefined Var");
  // written so that NaN fails too
  MIXMOE_CHECK(p >= 0.0 && p < 1.0, "dropout", "p must be in [0, 1), got ", p);
  if (!training || p == 0.0) return x;
  using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
  using In = Eigen::Map<const Array>;
  const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
  if constexpr (!Tensor<T, D>::on_host) {
    detail::require_device_ops<D>();
    const Tensor<T, D> xc = x.value().contiguous();
    Tensor<T, D> mask = Tensor<T, D>::empty(x.shape());  // 0 or 1 / (1 - p)
    Tensor<T, D> out = Tensor<T, D>::empty(x.shape());
    const std::uint64_t key = gen.next_u64();  // the device stream's key: one draw
    detail::DeviceOps<D>::index_dropout(xc.data(), out.data(), mask.data(), xc.numel(), p, keep_scale, key);
    return record("dropout", std::move(out), {x}, [mask](autograd::BackwardContext<T, D>& ctx) {
      Tensor<T, D> gx = Tensor<T, D>::empty(mask.shape());
      detail::DeviceOps<D>::map(gx.data(), gx.numel(), detail::fn::Mul{}, ctx.grad_out().data(), mask.data());
      ctx.accumulate(0, std::move(gx));
    });
  }
  const Tensor<T, D> xc = x.value().contiguous();
  const index_t n = xc.numel();
  Tensor<T, D> mask = Tensor<T, D>::empty(x.shape());  // 0 or 1 / (1 - p)
  T* m = mask.data();
  // The draws are sequential: one generator stream defines the mask, whatever the thread count.
  for (index_t i = 0; i < n; ++i) m[i] = gen.uniform() >= p ? keep_scale : T(0);
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());
  const T* px = xc.data();
  T* po = out.data();
  cpu::parallel_for(n, 1 << 14, [&](index_t lo, index_t hi) {
    Eigen::Map<Array>(po + lo, hi - lo) = In(px + lo, hi - lo) * In(m + lo, hi - lo);
  });
  return record("dropout", std::move(out), {x}, [mask](autograd::BackwardContext<T, D>& ctx) {
    Tensor<T, D> gx = Tensor<T, D>::empty(mask.shape());
    const T* pg = ctx.grad_out().data();
    const T* pm = mask.data();
    T* o = gx.data();
    cpu::parallel_for(gx.numel(), 1 << 14, [&](index_t lo, index_t hi) {
      Eigen::Map<Array>(o + lo, hi - lo) = In(pg + lo, hi - lo) * In(pm + lo, hi - lo);
    });
    ctx.accumulate(0, std::move(gx));
  });
}

}  // namespace mixmoe
