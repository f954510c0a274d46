// The host model's WMMA (host_model.hpp): m16n16k16 fragments of bf16 operands and a float accumulator.
#pragma once

#include <cstdint>
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

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the host model has the m16n16k16 shape only");
  float v[16][16];  // element (row, column) of the tile, in every lane
};

namespace detail {
inline void check_pointer(const void* p, unsigned ldm, unsigned multiple) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) host_model::fail("WMMA pointer not aligned to 256 bits");
  if (ldm % multiple != 0) host_model::fail("WMMA leading dimension not a multiple of 16 bytes");
}
}  // namespace detail

/// Element (r, c) of an operand tile at p[r * ldm + c] (row_major) or p[r + c * ldm] (col_major).
template <class Use, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p, unsigned ldm) {
  detail::check_pointer(p, ldm, 8);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = __bfloat162float(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

/// d = a b + c, accumulated in float (d may be c).
template <class La, class Lb>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, La>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Lb>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int q = 0; q < 16; ++q) s += a.v[i][q] * b.v[q][j];
      out[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_pointer(p, ldm, 4);
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.v[r][c];
}

}  // namespace nvcuda::wmma
