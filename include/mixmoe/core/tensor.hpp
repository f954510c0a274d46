// Tensor<T, Device>: a strided, row-major view of reference-counted storage.
// Copies are cheap (they share storage); reshape/transpose/permute/slice return
// views without copying where the layout allows; contiguous() and clone() copy.
//
// Tensors hold values only; gradients and the graph live in autograd::Var.
//
// Devices. Tensor<T, Cpu> is the host backend and needs nothing else. Any other device D
// (Cuda) is provided by a backend header that specialises detail::DeviceBackend<D> with its
// memory and a few element kernels (allocate, fill, copy between views, convert, upload and
// download); backend/cuda/tensor.cuh does it for Cuda and is included by CUDA translation
// units only. On such a device data() is a device pointer: the factories, clone(), fill_(),
// copy_from(), to<U>(), item() and to_vector() run on the device or copy through it, and
// operator() (a host reference to one element) is a compile error. to_device<D2>(t) copies a
// tensor between devices.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "mixmoe/core/allocator.hpp"
#include "mixmoe/core/device.hpp"
#include "mixmoe/core/device_fn.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/core/shape.hpp"

namespace mixmoe {

namespace detail {

/// The memory and element kernels of a device other than Cpu. A backend header specialises
/// it with `available = true` and the static functions Tensor calls (see backend/cuda/tensor.cuh).
template <class D>
struct DeviceBackend {
  static constexpr bool available = false;
};

template <class D>
inline constexpr bool is_host_device = std::is_same_v<D, Cpu>;

/// The kernels that autograd and the ops of ops/ call for a device other than Cpu (GEMM,
/// gradient accumulation, ...). A backend specialises it with `available = true`
/// (backend/cuda/cuda.cuh for Cuda); the CPU code paths never use it.
template <class D>
struct DeviceOps {
  static constexpr bool available = false;
};

/// Compile-time check, with a message, that device D's ops are included.
template <class D>
constexpr void require_device_ops() {
  static_assert(DeviceOps<D>::available,
                "mixmoe: this op on a device tensor needs the device's ops: include <mixmoe/backend/cuda/cuda.cuh> in a "
                "CUDA translation unit (CMake target mixmoe::cuda)");
}

/// Compile-time check that an op with host loops only is not instantiated for a device tensor
/// (it would read device memory on the host). docs/cuda.md lists the ops that run on Cuda.
template <class D>
constexpr void require_host() {
  static_assert(is_host_device<D>,
                "mixmoe: this op has no device implementation yet and runs on Cpu tensors only (docs/cuda.md lists the "
                "ops that run on Cuda)");
}

/// Memory of one device for `n` elements of T; returned to the device's cache on destruction.
template <class T, class D>
struct Storage {
  static_assert(is_host_device<D> || DeviceBackend<D>::available,
                "mixmoe: this device's backend is not included: include <mixmoe/backend/cuda/tensor.cuh> in a CUDA "
                "translation unit (CMake target mixmoe::cuda) to use Tensor<T, Cuda>");
  explicit Storage(std::size_t n) : size(n) {
    if constexpr (is_host_device<D>)
      ptr = static_cast<T*>(CachingHostAllocator::instance().allocate(n * sizeof(T)));
    else
      ptr = static_cast<T*>(DeviceBackend<D>::allocate(n * sizeof(T)));
  }
  ~Storage() {
    if constexpr (is_host_device<D>)
      CachingHostAllocator::instance().deallocate(ptr, size * sizeof(T));
    else
      DeviceBackend<D>::deallocate(ptr, size * sizeof(T));
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  T* ptr = nullptr;
  std::size_t size = 0;
};

}  // namespace detail

template <Element T, Device D = Cpu>
class Tensor {
 public:
  using value_type = T;
  using device_type = D;
  /// True for Tensor<T, Cpu>: its elements are host memory.
  static constexpr bool on_host = detail::is_host_device<D>;

  /// An empty (undefined) tensor: no storage, rank 0, defined() is false.
  Tensor() = default;

  // ---- factories ---------------------------------------------------------

  /// Uninitialised contiguous tensor.
  static Tensor empty(const Shape& shape) {
    for (index_t e : shape) MIXMOE_CHECK(e >= 0, "Tensor", "negative extent in shape ", shape);
    Tensor t;
    t.shape_ = shape;
    t.strides_ = contiguous_strides(shape);
    const auto n = static_cast<std::size_t>(shape.numel());
    t.storage_ = std::allocate_shared<detail::Storage<T, D>>(PoolAllocator<detail::Storage<T, D>>{}, n);
    return t;
  }
  static Tensor full(const Shape& shape, T value) {
    Tensor t = empty(shape);
    if constexpr (on_host)
      std::fill_n(t.data(), t.numel(), value);
    else
      detail::DeviceBackend<D>::fill(t.data(), t.numel(), value);
    return t;
  }
  static Tensor zeros(const Shape& shape) { return full(shape, T(0)); }
  static Tensor ones(const Shape& shape) { return full(shape, T(1)); }
  static Tensor scalar(T value) { return full(Shape{}, value); }

  /// Copies `values` (row-major) into a new tensor of `shape`.
  static Tensor from(std::span<const T> values, const Shape& shape) {
    MIXMOE_CHECK(static_cast<index_t>(values.size()) == shape.numel(), "Tensor::from", values.size(),
                 " values for shape ", shape, " of ", shape.numel(), " elements");
    Tensor t = empty(shape);
    if constexpr (on_host)
      std::copy(values.begin(), values.end(), t.data());
    else
      detail::DeviceBackend<D>::upload(t.data(), values.data(), values.size() * sizeof(T));
    return t;
  }
  static Tensor from(std::initializer_list<T> values, const Shape& shape) {
    return from(std::span<const T>(values.begin(), values.size()), shape);
  }
  static Tensor from(const std::vector<T>& values, const Shape& shape) { return from(std::span<const T>(values), shape); }

  /// Normal(mean, stddev) from a seeded generator. The values are drawn on the host on every
  /// device, so the same generator state gives the same tensor on the CPU and on a GPU.
  static Tensor randn(const Shape& shape, Generator& gen, double mean = 0.0, double stddev = 1.0) {
    return generated(shape, [&](index_t) { return static_cast<T>(gen.normal(mean, stddev)); });
  }
  /// Uniform in [lo, hi) from a seeded generator (drawn on the host, as randn).
  static Tensor uniform(const Shape& shape, Generator& gen, double lo = 0.0, double hi = 1.0) {
    return generated(shape, [&](index_t) { return static_cast<T>(gen.uniform(lo, hi)); });
  }
  /// Copies integer indices (token ids, positions) into a new tensor of `shape`.
  static Tensor from_indices(std::span<const int> values, const Shape& shape) {
    MIXMOE_CHECK(static_cast<index_t>(values.size()) == shape.numel(), "Tensor::from_indices", values.size(),
                 " values for shape ", shape);
    return generated(shape, [&](index_t i) { return static_cast<T>(values[static_cast<std::size_t>(i)]); });
  }

  /// 0, 1, ..., n-1 as a 1-D tensor.
  static Tensor arange(index_t n) {
    return generated(Shape{n}, [](index_t i) { return static_cast<T>(i); });
  }

  // ---- queries -----------------------------------------------------------

  [[nodiscard]] bool defined() const { return storage_ != nullptr; }
  [[nodiscard]] const Shape& shape() const { return shape_; }
  [[nodiscard]] const Shape& strides() const { return strides_; }
  [[nodiscard]] int dim() const { return shape_.rank(); }
  [[nodiscard]] index_t size(int axis) const { return shape_.size(axis); }
  [[nodiscard]] index_t stride(int axis) const { return strides_[shape_.axis(axis)]; }
  [[nodiscard]] index_t numel() const { return shape_.numel(); }
  [[nodiscard]] index_t offset() const { return offset_; }
  [[nodiscard]] bool is_contiguous() const {
    index_t expect = 1;
    for (int i = dim() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[i] != expect) return false;
      expect *= shape_[i];
    }
    return true;
  }
  /// True when no other tensor shares this storage (safe to modify in place).
  [[nodiscard]] bool is_unique() const { return storage_ && storage_.use_count() == 1; }
  /// True when both views share the same storage.
  [[nodiscard]] bool shares_storage(const Tensor& other) const { return storage_ && storage_ == other.storage_; }

  /// Pointer to the first element of this view (element i of a contiguous view is data()[i]);
  /// a device pointer on a device other than Cpu.
  [[nodiscard]] T* data() const {
    MIXMOE_CHECK(defined(), "Tensor::data", "the tensor is undefined (default-constructed)");
    return storage_->ptr + offset_;
  }

  /// Element access by full index (for tests and small host code; not for hot loops).
  template <class... I>
  [[nodiscard]] T& operator()(I... idx) const {
    static_assert((std::is_integral_v<I> && ...), "Tensor::operator(): indices must be integers");
    static_assert(on_host, "Tensor::operator(): a reference to one element exists for Cpu tensors only; on a device use "
                           "item() of a one-element view, to_vector(), or to_device<Cpu>()");
    MIXMOE_CHECK(static_cast<int>(sizeof...(I)) == dim(), "Tensor::operator()", sizeof...(I), " indices for shape ", shape_);
    const index_t ix[] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int a = 0; a < dim(); ++a) {
      MIXMOE_CHECK(ix[a] >= 0 && ix[a] < shape_[a], "Tensor::operator()", "index ", ix[a], " out of range on axis ", a,
                   " of shape ", shape_);
      off += ix[a] * strides_[a];
    }
    return storage_->ptr[offset_ + off];
  }

  /// The single value of a one-element tensor.
  [[nodiscard]] T item() const {
    MIXMOE_CHECK(numel() == 1, "Tensor::item", "needs one element, shape is ", shape_);
    if constexpr (on_host) {
      return storage_->ptr[offset_];
    } else {
      T v{};
      detail::DeviceBackend<D>::download(&v, storage_->ptr + offset_, sizeof(T));
      return v;
    }
  }

  /// Row-major copy of the elements (any layout).
  [[nodiscard]] std::vector<T> to_vector() const {
    const Tensor c = contiguous();
    if constexpr (on_host) {
      return std::vector<T>(c.data(), c.data() + c.numel());
    } else {
      std::vector<T> v(static_cast<std::size_t>(c.numel()));
      if (!v.empty()) detail::DeviceBackend<D>::download(v.data(), c.data(), v.size() * sizeof(T));
      return v;
    }
  }

  // ---- views -------------------------------------------------------------

  /// Same elements, new shape; one extent may be -1 (inferred). A view when contiguous.
  [[nodiscard]] Tensor reshape(Shape s) const {
    int infer = -1;
    index_t known = 1;
    for (int i = 0; i < s.rank(); ++i) {
      if (s[i] == -1) {
        MIXMOE_CHECK(infer < 0, "reshape", "more than one -1 in ", s);
        infer = i;
      } else {
        known *= s[i];
      }
    }
    if (infer >= 0) {
      MIXMOE_CHECK(known > 0 && numel() % known == 0, "reshape", "cannot infer -1: shape ", shape_, " to ", s);
      s[infer] = numel() / known;
    }
    MIXMOE_CHECK(s.numel() == numel(), "reshape", "shape ", shape_, " (", numel(), " elements) cannot become ", s);
    Tensor t = is_contiguous() ? *this : contiguous();
    t.shape_ = s;
    t.strides_ = contiguous_strides(s);
    return t;
  }

  /// Swaps two axes (a view).
  [[nodiscard]] Tensor transpose(int a, int b) const {
    const int ra = shape_.axis(a, "transpose"), rb = shape_.axis(b, "transpose");
    Tensor t = *this;
    std::swap(t.shape_[ra], t.shape_[rb]);
    std::swap(t.strides_[ra], t.strides_[rb]);
    return t;
  }

  /// Reorders axes: result axis i is this axis order[i] (a view).
  [[nodiscard]] Tensor permute(std::initializer_list<int> order) const {
    MIXMOE_CHECK(static_cast<int>(order.size()) == dim(), "permute", order.size(), " axes given for shape ", shape_);
    Tensor t = *this;
    bool seen[kMaxDims] = {};
    int i = 0;
    for (int a : order) {
      const int ra = shape_.axis(a, "permute");
      MIXMOE_CHECK(!seen[ra], "permute", "axis ", a, " repeated");
      seen[ra] = true;
      t.shape_[i] = shape_[ra];
      t.strides_[i] = strides_[ra];
      ++i;
    }
    return t;
  }

  /// Elements [begin, end) along one axis (a view).
  [[nodiscard]] Tensor slice(int axis, index_t begin, index_t end) const {
    const int a = shape_.axis(axis, "slice");
    MIXMOE_CHECK(0 <= begin && begin <= end && end <= shape_[a], "slice", "range [", begin, ", ", end, ") out of bounds on axis ",
                 axis, " of shape ", shape_);
    Tensor t = *this;
    t.offset_ += begin * strides_[a];
    t.shape_[a] = end - begin;
    return t;
  }

  /// Index i along axis 0, dropping that axis (a view).
  [[nodiscard]] Tensor operator[](index_t i) const {
    MIXMOE_CHECK(dim() >= 1 && i >= 0 && i < shape_[0], "Tensor::operator[]", "index ", i, " out of range for shape ", shape_);
    Tensor t = *this;
    t.offset_ += i * strides_[0];
    t.shape_ = shape_.without(0);
    t.strides_ = strides_.without(0);
    return t;
  }

  // ---- copies ------------------------------------------------------------

  /// This tensor if contiguous, else a contiguous copy.
  [[nodiscard]] Tensor contiguous() const {
    if (!defined() || is_contiguous()) return *this;
    return clone();
  }

  /// A contiguous copy that owns new storage.
  [[nodiscard]] Tensor clone() const {
    Tensor out = empty(shape_);
    copy_strided(*this, out.data());
    return out;
  }

  /// Copies src's elements into this tensor (same shape; any layouts).
  void copy_from(const Tensor& src) const {
    MIXMOE_CHECK(src.shape() == shape_, "copy_from", "shape ", src.shape(), " into ", shape_);
    if constexpr (!on_host) {
      detail::DeviceBackend<D>::copy(src.storage_->ptr + src.offset_, src.strides_, storage_->ptr + offset_, strides_,
                                     shape_);
      return;
    }
    if (is_contiguous()) {
      copy_strided(src, data());
      return;
    }
    Tensor tmp = src.contiguous();
    for_each_offset(*this, [&, i = index_t{0}](index_t off) mutable { storage_->ptr[off] = tmp.data()[i++]; });
  }

  void fill_(T value) const {
    if constexpr (!on_host) {
      if (numel() > 0) detail::DeviceBackend<D>::fill_strided(storage_->ptr + offset_, strides_, shape_, value);
      return;
    }
    if (is_contiguous()) {
      std::fill_n(data(), numel(), value);
      return;
    }
    for_each_offset(*this, [&](index_t off) { storage_->ptr[off] = value; });
  }

  /// Converts the scalar type (a copy).
  template <Element U>
  [[nodiscard]] Tensor<U, D> to() const {
    const Tensor c = contiguous();
    auto out = Tensor<U, D>::empty(shape_);
    if constexpr (on_host) {
      for (index_t i = 0; i < numel(); ++i) out.data()[i] = static_cast<U>(c.data()[i]);
    } else if (numel() > 0) {
      detail::DeviceBackend<D>::convert(c.data(), out.data(), numel());
    }
    return out;
  }

 private:
  template <Element, Device>
  friend class Tensor;

  /// A new contiguous tensor with element i = f(i), f called in order on the host.
  template <class F>
  static Tensor generated(const Shape& shape, F&& f) {
    Tensor t = empty(shape);
    const index_t n = t.numel();
    if constexpr (on_host) {
      for (index_t i = 0; i < n; ++i) t.data()[i] = f(i);
    } else if (n > 0) {
      std::vector<T> host(static_cast<std::size_t>(n));
      for (index_t i = 0; i < n; ++i) host[static_cast<std::size_t>(i)] = f(i);
      detail::DeviceBackend<D>::upload(t.data(), host.data(), host.size() * sizeof(T));
    }
    return t;
  }

  template <class F>
  static void for_each_offset(const Tensor& t, F&& f) {
    const int r = t.dim();
    if (t.numel() == 0) return;
    index_t idx[kMaxDims] = {};
    index_t off = t.offset_;
    for (index_t n = 0, total = t.numel(); n < total; ++n) {
      f(off);
      for (int a = r - 1; a >= 0; --a) {
        off += t.strides_[a];
        if (++idx[a] < t.shape_[a]) break;
        off -= t.strides_[a] * t.shape_[a];
        idx[a] = 0;
      }
    }
  }

  static void copy_strided(const Tensor& src, T* dst) {
    if (src.numel() == 0) return;
    if constexpr (!on_host) {
      detail::DeviceBackend<D>::copy(src.storage_->ptr + src.offset_, src.strides_, dst,
                                     contiguous_strides(src.shape_), src.shape_);
      return;
    }
    if (src.is_contiguous()) {
      std::memcpy(dst, src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T));
      return;
    }
    const T* base = src.storage_->ptr;
    for_each_offset(src, [&, i = index_t{0}](index_t off) mutable { dst[i++] = base[off]; });
  }

  std::shared_ptr<detail::Storage<T, D>> storage_;
  Shape shape_;
  Shape strides_;
  index_t offset_ = 0;
};

/// A copy of `t` on device To (t itself, sharing storage, when it is already there). One of the
/// two devices must be Cpu; the other's backend header must be included.
template <Device To, Element T, Device From>
[[nodiscard]] Tensor<T, To> to_device(const Tensor<T, From>& t) {
  if constexpr (std::is_same_v<To, From>) {
    return t;
  } else {
    static_assert(detail::is_host_device<To> || detail::is_host_device<From>,
                  "to_device: copies between two non-host devices go through Cpu");
    const Tensor<T, From> c = t.contiguous();
    auto out = Tensor<T, To>::empty(t.shape());
    const auto bytes = static_cast<std::size_t>(t.numel()) * sizeof(T);
    if (bytes == 0) return out;
    if constexpr (detail::is_host_device<From>)
      detail::DeviceBackend<To>::upload(out.data(), c.data(), bytes);
    else
      detail::DeviceBackend<From>::download(out.data(), c.data(), bytes);
    return out;
  }
}

}  // namespace mixmoe
