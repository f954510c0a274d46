// The host model's WMMA (host_model.hpp): m16n16k16 fragments of bf16 operands, m16n16k8 fragments
// of TF32 operands (stored as float), and float accumulators.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "host_model.hpp"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

/// float rounded to TF32, as the device's conversion (host_model::round_tf32).
inline float __float_to_tf32(float f) { return host_model::round_tf32(f); }

/// A fragment: the whole tile in every lane, element (r, c) at x[r * 16 + c] (rows of an operand
/// tile: 16 for matrix_a and the accumulator, K for matrix_b; columns: K for matrix_a, else 16).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "the host model has m16n16k16 and m16n16k8 only");
  static constexpr int num_elements = 256;
  float x[256];
  float& at(int r, int c) { return x[r * 16 + c]; }
  float at(int r, int c) const { return x[r * 16 + c]; }
};

namespace detail {
inline void check_pointer(const void* p, unsigned ldm, unsigned multiple) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) host_model::fail("WMMA pointer not aligned to 256 bits");
  if (ldm % multiple != 0) host_model::fail("WMMA leading dimension not a multiple of 16 bytes");
}
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float value(float v) { return v; }
}  // namespace detail

/// Element (r, c) of an operand tile at p[r * ldm + c] (row_major) or p[r + c * ldm] (col_major):
/// matrix_a is 16 x K, matrix_b K x 16. bf16 fragments load bf16, TF32 fragments load float.
template <class Use, int K, class T, class Layout, class E>
void load_matrix_sync(fragment<Use, 16, 16, K, T, Layout>& f, const E* p, unsigned ldm) {
  static_assert(std::is_same_v<T, precision::tf32> ? std::is_same_v<E, float> : std::is_same_v<E, T>,
                "a fragment loads its own element type");
  detail::check_pointer(p, ldm, 16 / sizeof(E));
  const int rows = std::is_same_v<Use, matrix_a> ? 16 : K, cols = std::is_same_v<Use, matrix_a> ? K : 16;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      f.at(r, c) = detail::value(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm]);
}

template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float value) {
  for (float& v : f.x) v = value;
}

/// d = a b + c, accumulated in float (d may be c). TF32 operands count with their top 19 bits, as
/// the tensor cores do.
template <int K, class T, class La, class Lb>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, La>& a,
              const fragment<matrix_b, 16, 16, K, T, Lb>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  const auto operand = [](float v) {
    if constexpr (!std::is_same_v<T, precision::tf32>) return v;
    std::uint32_t u = 0;
    std::memcpy(&u, &v, sizeof u);
    u &= 0xffffe000u;
    float r = 0;
    std::memcpy(&r, &u, sizeof r);
    return r;
  };
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.at(i, j);
      for (int q = 0; q < K; ++q) s += operand(a.at(i, q)) * operand(b.at(q, j));
      out[i * 16 + j] = s;
    }
  for (int t = 0; t < 256; ++t) d.x[t] = out[t];
}

template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check_pointer(p, ldm, 4);
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.at(r, c);
}

}  // namespace nvcuda::wmma
