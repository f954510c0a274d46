// Shape: the extents of a row-major tensor, up to kMaxDims axes, held inline
// (no heap allocation, so shapes are free to copy in hot paths).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <string>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

using index_t = std::int64_t;

inline constexpr int kMaxDims = 6;

class Shape {
 public:
  constexpr Shape() = default;
  Shape(std::initializer_list<index_t> extents) { assign(extents.begin(), extents.size()); }
  explicit Shape(std::span<const index_t> extents) { assign(extents.data(), extents.size()); }

  [[nodiscard]] constexpr int rank() const { return rank_; }
  [[nodiscard]] constexpr index_t operator[](int axis) const { return d_[axis]; }
  constexpr index_t& operator[](int axis) { return d_[axis]; }
  [[nodiscard]] constexpr const index_t* begin() const { return d_.data(); }
  [[nodiscard]] constexpr const index_t* end() const { return d_.data() + rank_; }

  /// Product of all extents (1 for a rank-0 scalar).
  [[nodiscard]] constexpr index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= d_[i];
    return n;
  }

  /// Normalises a possibly negative axis (-1 = last), throwing for out-of-range axes.
  [[nodiscard]] int axis(int a, const char* where = "shape") const {
    const int r = a < 0 ? a + rank_ : a;
    MIXMOE_CHECK(r >= 0 && r < rank_, where, "axis ", a, " out of range for shape ", to_string());
    return r;
  }

  /// Extent of an axis, negative axes counted from the end.
  [[nodiscard]] index_t size(int a) const { return d_[axis(a)]; }

  void push_back(index_t extent) {
    MIXMOE_CHECK(rank_ < kMaxDims, "shape", "more than ", kMaxDims, " axes");
    // -1 is allowed as the "infer this extent" placeholder of reshape; tensors reject it.
    MIXMOE_CHECK(extent >= -1, "shape", "negative extent ", extent);
    d_[rank_++] = extent;
  }

  /// The shape without axis a.
  [[nodiscard]] Shape without(int a) const {
    const int r = axis(a);
    Shape s;
    for (int i = 0; i < rank_; ++i)
      if (i != r) s.push_back(d_[i]);
    return s;
  }

  /// The same shape with axis a set to extent.
  [[nodiscard]] Shape with(int a, index_t extent) const {
    Shape s = *this;
    s.d_[axis(a)] = extent;
    return s;
  }

  /// Product of extents in [first, last).
  [[nodiscard]] index_t prod(int first, int last) const {
    index_t n = 1;
    for (int i = first; i < last; ++i) n *= d_[i];
    return n;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.d_[i] != b.d_[i]) return false;
    return true;
  }

  [[nodiscard]] std::string to_string() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(d_[i]);
    }
    return s + ")";
  }

  friend std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.to_string(); }

 private:
  void assign(const index_t* p, std::size_t n) {
    MIXMOE_CHECK(n <= static_cast<std::size_t>(kMaxDims), "shape", "rank ", n, " exceeds the maximum of ", kMaxDims);
    for (std::size_t i = 0; i < n; ++i) push_back(p[i]);
  }

  std::array<index_t, kMaxDims> d_{};
  int rank_ = 0;
};

/// Row-major (contiguous) strides for a shape, in elements.
inline Shape contiguous_strides(const Shape& s) {
  Shape st = s;
  index_t acc = 1;
  for (int i = s.rank() - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

/// Numpy broadcasting of two shapes; throws naming both when they do not broadcast.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const char* where) {
  const int r = a.rank() > b.rank() ? a.rank() : b.rank();
  Shape out;
  for (int i = 0; i < r; ++i) {
    const int ia = i - (r - a.rank()), ib = i - (r - b.rank());
    const index_t ea = ia >= 0 ? a[ia] : 1, eb = ib >= 0 ? b[ib] : 1;
    MIXMOE_CHECK(ea == eb || ea == 1 || eb == 1, where, "shapes ", a, " and ", b, " do not broadcast (axis ", i, ")");
    out.push_back(ea == 1 ? eb : ea);
  }
  return out;
}

}  // namespace mixmoe
