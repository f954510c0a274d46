// Broadcasting binary ops (add, sub, mul, div), their scalar forms, neg and scale.
//
// Shapes follow numpy broadcasting: (B, T, C) + (C) adds a bias to every row.
// The backward of a broadcast input sums the output gradient over the axes it
// was broadcast along (sum_to_shape).
#pragma once

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

namespace detail {

/// Strides of `t` aligned to a broadcast result of rank `rank`: 0 on broadcast axes.
template <class T, class D>
Shape broadcast_strides(const Tensor<T, D>& t, const Shape& out) {
  Shape st = out;
  const int lead = out.rank() - t.dim();
  for (int i = 0; i < out.rank(); ++i) {
    const int a = i - lead;
    st[i] = (a < 0 || t.shape()[a] == 1) ? 0 : t.strides()[a];
  }
  return st;
}

/// out[i] = f(a[i], b[i]) with broadcasting; out is contiguous with the broadcast shape.
/// f is a function object of core/device_fn.hpp, so that a device can run it too.
template <class T, class D, class F>
Tensor<T, D> broadcast_map(const Tensor<T, D>& a, const Tensor<T, D>& b, const char* op, F f) {
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), op);
  Tensor<T, D> out = Tensor<T, D>::empty(shape);
  T* o = out.data();
  const index_t n = out.numel();
  if (n == 0) return out;
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    if (a.shape() == shape && b.shape() == shape && a.is_contiguous() && b.is_contiguous())
      DeviceOps<D>::map(o, n, f, a.data(), b.data());
    else
      DeviceOps<D>::map_broadcast(o, shape, a.data(), broadcast_strides(a, shape), b.data(), broadcast_strides(b, shape), f);
    return out;
  }
  if (a.shape() == shape && b.shape() == shape && a.is_contiguous() && b.is_contiguous()) {
    const T *pa = a.data(), *pb = b.data();
    cpu::parallel_for(n, 1 << 15, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) o[i] = f(pa[i], pb[i]);
    });
    return out;
  }
  if (b.numel() == 1 && a.shape() == shape && a.is_contiguous()) {
    const T *pa = a.data(), vb = b.data()[0];
    for (index_t i = 0; i < n; ++i) o[i] = f(pa[i], vb);
    return out;
  }
  // Trailing-suffix broadcast (bias rows): b's shape equals the last axes of a.
  if (a.shape() == shape && a.is_contiguous() && b.is_contiguous() && b.dim() <= a.dim() &&
      b.shape() == Shape(std::span<const index_t>(shape.begin() + (shape.rank() - b.dim()), shape.end()))) {
    const index_t inner = b.numel(), rows = inner ? n / inner : 0;
    const T *pa = a.data(), *pb = b.data();
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < inner; ++j) o[r * inner + j] = f(pa[r * inner + j], pb[j]);
    return out;
  }
  // General strided walk.
  const Shape sa = broadcast_strides(a, shape), sb = broadcast_strides(b, shape);
  const int r = shape.rank();
  index_t idx[kMaxDims] = {};
  const T *pa = a.data(), *pb = b.data();
  index_t oa = 0, ob = 0;
  for (index_t i = 0; i < n; ++i) {
    o[i] = f(pa[oa], pb[ob]);
    for (int ax = r - 1; ax >= 0; --ax) {
      oa += sa[ax];
      ob += sb[ax];
      if (++idx[ax] < shape[ax]) break;
      oa -= sa[ax] * shape[ax];
      ob -= sb[ax] * shape[ax];
      idx[ax] = 0;
    }
  }
  return out;
}

/// Sums g (a broadcast result) down to `target` (the shape of one broadcast input).
template <class T, class D>
Tensor<T, D> sum_to_shape(const Tensor<T, D>& g, const Shape& target) {
  if (g.shape() == target) return g;
  Tensor<T, D> out = Tensor<T, D>::zeros(target);
  const Shape& shape = g.shape();
  const Tensor<T, D> gc = g.contiguous();
  const Shape so = broadcast_strides(out, shape);
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::sum_to(out.data(), gc.data(), shape, so);
    return out;
  }
  const int r = shape.rank();
  index_t idx[kMaxDims] = {};
  const T* pg = gc.data();
  T* po = out.data();
  index_t off = 0;
  for (index_t i = 0, n = gc.numel(); i < n; ++i) {
    po[off] += pg[i];
    for (int ax = r - 1; ax >= 0; --ax) {
      off += so[ax];
      if (++idx[ax] < shape[ax]) break;
      off -= so[ax] * shape[ax];
      idx[ax] = 0;
    }
  }
  return out;
}

/// y[i] = f(x[i]) for a tensor of any layout (result contiguous); f as for broadcast_map.
template <class T, class D, class F>
Tensor<T, D> map(const Tensor<T, D>& x, F f) {
  const Tensor<T, D> xc = x.contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(x.shape());
  if constexpr (!Tensor<T, D>::on_host) {
    require_device_ops<D>();
    DeviceOps<D>::map(out.data(), out.numel(), f, xc.data());
    return out;
  }
  const T* px = xc.data();
  T* o = out.data();
  cpu::parallel_for(out.numel(), 1 << 15, [&](index_t lo, index_t hi) {
    for (index_t i = lo; i < hi; ++i) o[i] = f(px[i]);
  });
  return out;
}

}  // namespace detail

// ---- binary ops with broadcasting ------------------------------------------

template <Scalar T, Device D>
Var<T, D> add(const Var<T, D>& a, const Var<T, D>& b) {
  auto out = detail::broadcast_map(a.value(), b.value(), "add", detail::fn::Add{});
  return record("add", std::move(out), {a, b}, [sa = a.shape(), sb = b.shape()](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, detail::sum_to_shape(ctx.grad_out(), sa));
    ctx.accumulate(1, detail::sum_to_shape(ctx.grad_out(), sb));
  });
}

template <Scalar T, Device D>
Var<T, D> sub(const Var<T, D>& a, const Var<T, D>& b) {
  auto out = detail::broadcast_map(a.value(), b.value(), "sub", detail::fn::Sub{});
  return record("sub", std::move(out), {a, b}, [sa = a.shape(), sb = b.shape()](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, detail::sum_to_shape(ctx.grad_out(), sa));
    if (ctx.needs_grad(1))
      ctx.accumulate(1, detail::map(detail::sum_to_shape(ctx.grad_out(), sb), detail::fn::Negate{}));
  });
}

template <Scalar T, Device D>
Var<T, D> mul(const Var<T, D>& a, const Var<T, D>& b) {
  auto out = detail::broadcast_map(a.value(), b.value(), "mul", detail::fn::Mul{});
  return record("mul", std::move(out), {a, b}, [va = a.value(), vb = b.value()](autograd::BackwardContext<T, D>& ctx) {
    const detail::fn::Mul mult;
    if (ctx.needs_grad(0))
      ctx.accumulate(0, detail::sum_to_shape(detail::broadcast_map(ctx.grad_out(), vb, "mul", mult), va.shape()));
    if (ctx.needs_grad(1))
      ctx.accumulate(1, detail::sum_to_shape(detail::broadcast_map(ctx.grad_out(), va, "mul", mult), vb.shape()));
  });
}

template <Scalar T, Device D>
Var<T, D> div(const Var<T, D>& a, const Var<T, D>& b) {
  auto out = detail::broadcast_map(a.value(), b.value(), "div", detail::fn::Div{});
  return record("div", out, {a, b}, [va = a.value(), vb = b.value(), out](autograd::BackwardContext<T, D>& ctx) {
    if (ctx.needs_grad(0))
      ctx.accumulate(0, detail::sum_to_shape(detail::broadcast_map(ctx.grad_out(), vb, "div", detail::fn::Div{}),
                                             va.shape()));
    if (ctx.needs_grad(1)) {
      // d(a/b)/db = -(a/b)/b = -out/b
      auto t = detail::broadcast_map(ctx.grad_out(), out, "div", detail::fn::NegMul{});
      ctx.accumulate(1, detail::sum_to_shape(detail::broadcast_map(t, vb, "div", detail::fn::Div{}), vb.shape()));
    }
  });
}

// ---- scalar forms -------------------------------------------------------------

/// x * s for a constant s.
template <Scalar T, Device D>
Var<T, D> scale(const Var<T, D>& x, double s) {
  const T k = static_cast<T>(s);
  auto out = detail::map(x.value(), detail::fn::Scale<T>{k});
  return record("scale", std::move(out), {x}, [k](autograd::BackwardContext<T, D>& ctx) {
    ctx.accumulate(0, detail::map(ctx.grad_out(), detail::fn::Scale<T>{k}));
  });
}

/// x + s for a constant s.
template <Scalar T, Device D>
Var<T, D> add_scalar(const Var<T, D>& x, double s) {
  const T k = static_cast<T>(s);
  auto out = detail::map(x.value(), detail::fn::AddC<T>{k});
  return record("add_scalar", std::move(out), {x},
                [](autograd::BackwardContext<T, D>& ctx) { ctx.accumulate(0, ctx.grad_out().clone()); });
}

template <Scalar T, Device D>
Var<T, D> neg(const Var<T, D>& x) {
  return scale(x, -1.0);
}

template <Scalar T, Device D> Var<T, D> operator+(const Var<T, D>& a, const Var<T, D>& b) { return add(a, b); }
template <Scalar T, Device D> Var<T, D> operator-(const Var<T, D>& a, const Var<T, D>& b) { return sub(a, b); }
template <Scalar T, Device D> Var<T, D> operator*(const Var<T, D>& a, const Var<T, D>& b) { return mul(a, b); }
template <Scalar T, Device D> Var<T, D> operator/(const Var<T, D>& a, const Var<T, D>& b) { return div(a, b); }
template <Scalar T, Device D> Var<T, D> operator-(const Var<T, D>& x) { return neg(x); }
template <Scalar T, Device D> Var<T, D> operator*(const Var<T, D>& x, double s) { return scale(x, s); }
template <Scalar T, Device D> Var<T, D> operator*(double s, const Var<T, D>& x) { return scale(x, s); }
template <Scalar T, Device D> Var<T, D> operator/(const Var<T, D>& x, double s) { return scale(x, 1.0 / s); }
template <Scalar T, Device D> Var<T, D> operator+(const Var<T, D>& x, double s) { return add_scalar(x, s); }
template <Scalar T, Device D> Var<T, D> operator+(double s, const Var<T, D>& x) { return add_scalar(x, s); }
template <Scalar T, Device D> Var<T, D> operator-(const Var<T, D>& x, double s) { return add_scalar(x, -s); }

}  // namespace mixmoe
