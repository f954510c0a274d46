// Indexing ops: index_select, gather, scatter_add (torch semantics).
//
// Index tensors are Tensor<Index> and are not differentiable. Every index is
// range-checked before any work, and the error names the bad value, its position
// in the index tensor and the extent it must stay below. The backward reads the
// index tensor it was given (shared, not copied): leave it unchanged until then.
//
//   index_select: x (..., N, ...), index (M)            -> (..., M, ...)
//                 out[..., j, ...] = x[..., index[j], ...]
//   gather:       x (d0, .., N, .., dr), index (e0, .., M, .., er), e_d <= d_d off the axis
//                 -> index's shape; out[.., j, ..] = x[.., index[.., j, ..], ..]
//   scatter_add:  x (d0, .., N, .., dr), index (e0, .., M, .., er), src (s0, .., sr), e_d <= s_d
//                 -> x's shape; out = x, then out[.., index[.., j, ..], ..] += src[.., j, ..]
//
// The backward of a repeated index accumulates. gather and scatter_add work on
// "lines" along the axis: lines at different positions off the axis touch
// different elements of x, so they run in parallel without races.
//
// On a device (Cuda) every op runs there, forward and backward (backend/cuda/index.cuh). How
// the range check runs there is the IndexCheck argument (the CPU checks at once in every case):
//   checked   (default) a kernel finds the first bad position, which is read back to the host:
//             one small copy, which synchronises the stream, per call; the error is the CPU's,
//             word for word, thrown by the call
//   deferred  the same kernel, but nothing waits: the first bad position and value are recorded
//             on the device and the next synchronisation of the stream (item(), to_vector(),
//             cuda::synchronize(), ...) throws the same error. Meanwhile the op reads NaN for a
//             bad index and drops its gradient. For indices from the data (token ids) in a
//             training step that should not wait for the device
//   trusted   no check: for indices in range by construction (top-k picks, a routing's tokens);
//             a bad one would still read NaN, not out of bounds
// The accumulations of repeated indices (the backwards, scatter_add's forward) use atomic adds:
// a float sum of a repeated index's terms may differ in its last bits from the CPU's.
#pragma once

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/backend/cpu/parallel.hpp"

namespace mixmoe {

/// How an index op range-checks its indices on a device (the CPU checks at once always), see above.
enum class IndexCheck { checked, deferred, trusted };

namespace detail {

/// The multi-index "(i, j, k)" of element `flat` of a row-major tensor of `shape`.
inline std::string index_position(const Shape& shape, index_t flat) {
  index_t coord[kMaxDims] = {};
  for (int d = shape.rank() - 1; d >= 0; --d) {
    coord[d] = shape[d] > 0 ? flat % shape[d] : 0;
    flat = shape[d] > 0 ? flat / shape[d] : 0;
  }
  std::string s = "(";
  for (int d = 0; d < shape.rank(); ++d) {
    if (d) s += ", ";
    s += std::to_string(coord[d]);
  }
  return s + ")";
}

/// Checks every value of a contiguous index tensor against [0, extent); a bad one throws
/// Error(message(position, value)), at once or, `deferred` on a device, at the next synchronisation.
template <class D, class Message>
void check_indices(const Tensor<Index, D>& ic, index_t extent, IndexCheck check, Message message) {
  if constexpr (!Tensor<Index, D>::on_host) {
    if (check == IndexCheck::trusted) return;
    require_device_ops<D>();
    if (check == IndexCheck::deferred) {
      DeviceOps<D>::index_check_deferred(ic.data(), ic.numel(), extent, std::move(message));
      return;
    }
    // The first bad position is found on the device and read back (a synchronisation): the price
    // of an error that names the bad index, as on the CPU, instead of NaN where it was used.
    const index_t bad = DeviceOps<D>::index_first_out_of_range(ic.data(), ic.numel(), extent);
    if (bad >= 0) throw Error(message(bad, ic.reshape(Shape{ic.numel()})[bad].item()));
    return;
  }
  const Index* p = ic.data();
  for (index_t i = 0, n = ic.numel(); i < n; ++i)
    if (p[i] < 0 || p[i] >= extent) [[unlikely]]
      throw Error(message(i, p[i]));
}

/// check_indices with the message of index_select, gather and scatter_add.
template <class D>
void check_index_range(const Tensor<Index, D>& ic, index_t extent, const char* op, int axis, const Shape& xshape,
                       IndexCheck check = IndexCheck::checked) {
  check_indices(ic, extent, check, [op, axis, extent, xshape, ishape = ic.shape()](long long at, long long v) {
    std::ostringstream os;
    os << '[' << op << "] index " << v << " at position " << index_position(ishape, at) << " is out of range for axis "
       << axis << " of extent " << extent << " (x of shape " << xshape << ")";
    return os.str();
  });
}

/// out[o, j, :] = x[o, index[j], :] for x (outer, n, inner) and out (outer, m, inner).
template <class T>
void select_rows(const T* x, index_t outer, index_t n, index_t inner, const Index* index, index_t m, T* out) {
  const index_t grain = std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, inner));
  cpu::parallel_for(outer * m, grain, [&](index_t lo, index_t hi) {
    for (index_t r = lo; r < hi; ++r) {
      const index_t o = r / m, j = r % m;
      std::memcpy(out + r * inner, x + (o * n + index[j]) * inner, static_cast<std::size_t>(inner) * sizeof(T));
    }
  });
}

/// gx[o, index[j], :] += g[o, j, :]: the backward of select_rows. Repeated indices add
/// up, so threads split the work by outer slab or, with one slab, by column range:
/// no two threads touch the same element and the sum order is fixed (deterministic).
template <class T>
void select_rows_backward(const T* g, index_t outer, index_t n, index_t inner, const Index* index, index_t m, T* gx) {
  if (outer * m == 0 || inner == 0) return;
  if (outer > 1) {
    const index_t grain = std::max<index_t>(1, (1 << 15) / (m * inner));
    cpu::parallel_for(outer, grain, [&](index_t lo, index_t hi) {
      for (index_t o = lo; o < hi; ++o)
        for (index_t j = 0; j < m; ++j) {
          T* dst = gx + (o * n + index[j]) * inner;
          const T* src = g + (o * m + j) * inner;
          for (index_t i = 0; i < inner; ++i) dst[i] += src[i];
        }
    });
    return;
  }
  cpu::parallel_for(inner, std::max<index_t>(64, (1 << 15) / m), [&](index_t lo, index_t hi) {
    for (index_t j = 0; j < m; ++j) {
      T* dst = gx + index[j] * inner;
      const T* src = g + j * inner;
      for (index_t i = lo; i < hi; ++i) dst[i] += src[i];
    }
  });
}

/// The lines of an index tensor along `axis`: line l is the l-th position (row-major)
/// over the other axes. base() gives that position's offset under a set of strides.
struct AxisLines {
  AxisLines(const Shape& index_shape, int axis) : shape(index_shape), axis(axis), m(index_shape[axis]) {
    count = m > 0 ? index_shape.numel() / m : 0;
  }
  void coords(index_t l, index_t* c) const {
    for (int d = shape.rank() - 1; d >= 0; --d) {
      if (d == axis) {
        c[d] = 0;
        continue;
      }
      c[d] = l % shape[d];
      l /= shape[d];
    }
  }
  static index_t base(const index_t* c, const Shape& strides) {
    index_t off = 0;
    for (int d = 0; d < strides.rank(); ++d) off += c[d] * strides[d];
    return off;
  }
  [[nodiscard]] index_t grain() const { return std::max<index_t>(1, (1 << 14) / std::max<index_t>(1, m)); }

  Shape shape;
  int axis;
  index_t m;      // extent of the index along the axis
  index_t count;  // number of lines
};

}  // namespace detail

/// Rows (slices) of x along `axis` picked by a 1-D index; indices may repeat.
template <Scalar T, Device D>
Var<T, D> index_select(const Var<T, D>& x, int axis, const Tensor<Index, D>& index,
                       IndexCheck check = IndexCheck::checked) {
  const Shape& s = x.shape();
  const int a = s.axis(axis, "index_select");
  MIXMOE_CHECK(index.dim() == 1, "index_select", "index must be 1-D, got shape ", index.shape());
  const Tensor<Index, D> ic = index.contiguous();  // (M)
  detail::check_index_range(ic, s[a], "index_select", axis, s, check);
  const index_t outer = s.prod(0, a), n = s[a], inner = s.prod(a + 1, s.rank()), m = ic.numel();
  const Tensor<T, D> xc = x.value().contiguous();
  Tensor<T, D> out = Tensor<T, D>::empty(s.with(a, m));  // (..., M, ...)
  // (check_index_range required the device's ops)
  if constexpr (!Tensor<T, D>::on_host)
    detail::DeviceOps<D>::index_select_rows(xc.data(), outer, n, inner, ic.data(), m, out.data());
  else
    detail::select_rows(xc.data(), outer, n, inner, ic.data(), m, out.data());
  return record("index_select", std::move(out), {x}, [ic, outer, n, inner, m](autograd::BackwardContext<T, D>& ctx) {
    if constexpr (!Tensor<T, D>::on_host)
      detail::DeviceOps<D>::index_select_rows_backward(ctx.grad_out().data(), outer, n, inner, ic.data(), m,
                                                       ctx.grad_in(0).data());
    else
      detail::select_rows_backward(ctx.grad_out().data(), outer, n, inner, ic.data(), m, ctx.grad_in(0).data());
  });
}

/// torch.gather: out has index's shape, out[.., j, ..] = x[.., index[.., j, ..], ..] along `axis`.
template <Scalar T, Device D>
Var<T, D> gather(const Var<T, D>& x, int axis, const Tensor<Index, D>& index, IndexCheck check = IndexCheck::checked) {
  const Shape& s = x.shape();
  const int a = s.axis(axis, "gather");
  MIXMOE_CHECK(index.dim() == s.rank(), "gather", "index of shape ", index.shape(),
               " must have the rank of x of shape ", s);
  for (int d = 0; d < s.rank(); ++d)
    MIXMOE_CHECK(d == a || index.shape()[d] <= s[d], "gather", "index of shape ", index.shape(),
                 " is larger than x of shape ", s, " on axis ", d, " (only the gather axis ", axis, " may be larger)");
  const Tensor<Index, D> ic = index.contiguous();
  detail::check_index_range(ic, s[a], "gather", axis, s, check);
  const Tensor<T, D> xc = x.value().contiguous();
  const Shape xs = contiguous_strides(s), is = contiguous_strides(ic.shape());
  const detail::AxisLines lines(ic.shape(), a);
  Tensor<T, D> out = Tensor<T, D>::empty(ic.shape());  // index's shape
  if constexpr (!Tensor<T, D>::on_host) {
    detail::DeviceOps<D>::index_gather_axis(out.data(), is, xc.data(), xs, ic.data(), ic.shape(), a, s[a]);
  } else {
    const T* px = xc.data();
    const Index* pi = ic.data();
    T* po = out.data();
    cpu::parallel_for(lines.count, lines.grain(), [&](index_t lo, index_t hi) {
      index_t c[kMaxDims];
      for (index_t l = lo; l < hi; ++l) {
        lines.coords(l, c);
        const index_t ib = lines.base(c, is), xb = lines.base(c, xs);
        for (index_t j = 0; j < lines.m; ++j) {
          const index_t at = ib + j * is[a];
          po[at] = px[xb + pi[at] * xs[a]];
        }
      }
    });
  }
  return record("gather", std::move(out), {x}, [ic, s, xs, is, lines, a](autograd::BackwardContext<T, D>& ctx) {
    Tensor<T, D> gx = Tensor<T, D>::zeros(s);
    if constexpr (!Tensor<T, D>::on_host) {
      detail::DeviceOps<D>::index_scatter_add_axis(gx.data(), xs, ctx.grad_out().data(), is, ic.data(), ic.shape(), a,
                                                   s[a]);
      ctx.accumulate(0, std::move(gx));
      return;
    }
    const T* g = ctx.grad_out().data();
    const Index* pi = ic.data();
    T* pgx = gx.data();
    cpu::parallel_for(lines.count, lines.grain(), [&](index_t lo, index_t hi) {
      index_t c[kMaxDims];
      for (index_t l = lo; l < hi; ++l) {
        lines.coords(l, c);
        const index_t ib = lines.base(c, is), xb = lines.base(c, xs);
        for (index_t j = 0; j < lines.m; ++j) {
          const index_t at = ib + j * is[a];
          pgx[xb + pi[at] * xs[a]] += g[at];
        }
      }
    });
    ctx.accumulate(0, std::move(gx));
  });
}

/// torch.Tensor.scatter_add: x with src[.., j, ..] added at x[.., index[.., j, ..], ..] along
/// `axis`, for every position of index (src may be larger than index; the rest is unused).
template <Scalar T, Device D>
Var<T, D> scatter_add(const Var<T, D>& x, int axis, const Tensor<Index, D>& index, const Var<T, D>& src,
                      IndexCheck check = IndexCheck::checked) {
  const Shape& s = x.shape();
  const int a = s.axis(axis, "scatter_add");
  MIXMOE_CHECK(index.dim() == s.rank() && src.dim() == s.rank(), "scatter_add", "x ", s, ", index ", index.shape(),
               " and src ", src.shape(), " must have the same rank");
  for (int d = 0; d < s.rank(); ++d) {
    MIXMOE_CHECK(index.shape()[d] <= src.shape()[d], "scatter_add", "index of shape ", index.shape(),
                 " is larger than src of shape ", src.shape(), " on axis ", d);
    MIXMOE_CHECK(d == a || index.shape()[d] <= s[d], "scatter_add", "index of shape ", index.shape(),
                 " is larger than x of shape ", s, " on axis ", d, " (only the scatter axis ", axis, " may be larger)");
  }
  const Tensor<Index, D> ic = index.contiguous();
  detail::check_index_range(ic, s[a], "scatter_add", axis, s, check);
  const Tensor<T, D> sc = src.value().contiguous();
  const Shape xs = contiguous_strides(s), is = contiguous_strides(ic.shape()), ss = contiguous_strides(sc.shape());
  const detail::AxisLines lines(ic.shape(), a);
  Tensor<T, D> out = x.value().clone();  // x's shape, contiguous
  if constexpr (!Tensor<T, D>::on_host) {
    detail::DeviceOps<D>::index_scatter_add_axis(out.data(), xs, sc.data(), ss, ic.data(), ic.shape(), a, s[a]);
  } else {
    const T* ps = sc.data();
    const Index* pi = ic.data();
    T* po = out.data();
    cpu::parallel_for(lines.count, lines.grain(), [&](index_t lo, index_t hi) {
      index_t c[kMaxDims];
      for (index_t l = lo; l < hi; ++l) {
        lines.coords(l, c);
        const index_t ib = lines.base(c, is), xb = lines.base(c, xs), sb = lines.base(c, ss);
        for (index_t j = 0; j < lines.m; ++j) po[xb + pi[ib + j * is[a]] * xs[a]] += ps[sb + j * ss[a]];
      }
    });
  }
  return record("scatter_add", std::move(out), {x, src},
                [ic, sshape = sc.shape(), xs, is, ss, lines, a, extent = s[a]](autograd::BackwardContext<T, D>& ctx) {
                  if (ctx.needs_grad(0)) ctx.accumulate(0, ctx.grad_out().clone());  // out = x + scattered src
                  if (!ctx.needs_grad(1)) return;
                  // Each used src element was added to exactly one output element: it reads that gradient.
                  Tensor<T, D> gs = Tensor<T, D>::zeros(sshape);
                  if constexpr (!Tensor<T, D>::on_host) {
                    detail::DeviceOps<D>::index_gather_axis(gs.data(), ss, ctx.grad_out().data(), xs, ic.data(),
                                                            ic.shape(), a, extent);
                    ctx.accumulate(1, std::move(gs));
                    return;
                  }
                  const T* g = ctx.grad_out().data();
                  const Index* pi = ic.data();
                  T* pgs = gs.data();
                  cpu::parallel_for(lines.count, lines.grain(), [&](index_t lo, index_t hi) {
                    index_t c[kMaxDims];
                    for (index_t l = lo; l < hi; ++l) {
                      lines.coords(l, c);
                      const index_t ib = lines.base(c, is), xb = lines.base(c, xs), sb = lines.base(c, ss);
                      for (index_t j = 0; j < lines.m; ++j) pgs[sb + j * ss[a]] = g[xb + pi[ib + j * is[a]] * xs[a]];
                    }
                  });
                  ctx.accumulate(1, std::move(gs));
                });
}

}  // namespace mixmoe
