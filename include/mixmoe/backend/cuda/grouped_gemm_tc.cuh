// Tensor-core kernels of the MoE experts' grouped GEMMs with bf16 operands and fp32 accumulation
// (WMMA, 16 x 16 x 16 bf16 fragments; compute capability 8.0 and newer). They do what the SIMT
// kernels of moe.cuh do for bf16 (grouped_gemm_tiles, grouped_gemm_wgrad_tiles), on the same
// expert-aligned tiling and with the same arguments, so moe.cuh chooses between the two at launch
// (cuda::set_grouped_gemm_tensor_cores):
//
//   grouped_gemm_bf16_tc        C[rows of x] (+)= A[rows of x] op(B_x), a 64 x 64 tile of C per
//                               block, blockIdx.y walking the expert-aligned row tiles of tile_start
//   grouped_gemm_wgrad_bf16_tc  dw[x] (n, k) += dy[rows of x]^T a[rows of x], a 64 x 64 tile of
//                               one expert's dw per block (blockIdx.z: the expert)
//
// A block is 4 warps; each warp owns a 32 x 32 quarter of the tile (2 x 2 fragments). Operand tiles
// go through shared memory, 32 deep in K, zero-filled outside the expert's rows, past n and past k,
// so any shape works; the rows are padded (leading dimensions 40 and 72 bf16, 68 floats: multiples
// of 8 and 4 as WMMA needs, and rows that start in different banks). The fp32 tile is staged in
// shared memory and written (or added) element by element with the bounds checks.
//
// The header needs only the CUDA bf16 and WMMA headers and index_t; tests/cuda/host_model runs these
// kernels on the CPU under a model of those headers, against a reference, in CI.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

#include "mixmoe/core/shape.hpp"

namespace mixmoe::cuda::kernels {

inline constexpr int kTcThreads = 128;        // 4 warps
inline constexpr int kTcBM = 64, kTcBN = 64;  // the output tile (kTcBM: moe.cuh's row tiling)
inline constexpr int kTcBK = 32;              // K (or rows, for the weight gradient) per stage
inline constexpr int kTcLdA = kTcBK + 8;      // A tile (kTcBM x kTcBK), row-major
inline constexpr int kTcLdB = kTcBN + 8;      // B tile (kTcBK x kTcBN), row-major
inline constexpr int kTcLdC = kTcBN + 4;      // the fp32 result tile (kTcBM x kTcBN)

/// The expert of row tile t: the largest x in [0, e) with tile_start[x] <= t (tile_start[0] = 0).
__device__ inline index_t tc_expert_of(const long long* tile_start, index_t e, long long t) {
  index_t lo = 0, hi = e;
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (tile_start[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

/// For every expert x: C[r, :] (+)= A[r, :] op(B_x) over the rows r in [offsets[x], offsets[x + 1])
/// (clamped to [0, m)); A (m, k) bf16 row-major (lda); B_x = b + x * stride_b, (k, n) row-major
/// (ldb), or (n, k) when trans_b; C (m, n) fp32 (ldc). tile_start (e + 1) as moe_gemm_tile_starts
/// makes it (kTcBM-row tiles). Launch: grid (ceil(n / kTcBN), min(tile_bound, 65535)), kTcThreads.
template <int = 0>
__global__ void __launch_bounds__(kTcThreads)
    grouped_gemm_bf16_tc(index_t m, index_t n, index_t k, index_t e, const index_t* offsets,
                         const long long* tile_start, index_t tile_bound, const __nv_bfloat16* a, index_t lda,
                         const __nv_bfloat16* b, index_t ldb, index_t stride_b, bool trans_b, float* c, index_t ldc,
                         bool accumulate) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __nv_bfloat16 as[kTcBM * kTcLdA];
  __shared__ __align__(32) __nv_bfloat16 bs[kTcBK * kTcLdB];
  __shared__ __align__(32) float cs[kTcBM * kTcLdC];
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // the warp's quarter of the tile
  const index_t col0 = static_cast<index_t>(blockIdx.x) * kTcBN;
  const long long total_tiles = tile_start[e];
  for (long long t = blockIdx.y; t < tile_bound && t < total_tiles; t += gridDim.y) {
    const index_t x = tc_expert_of(tile_start, e, t);
    const index_t first = offsets[x] < 0 ? 0 : offsets[x];
    const index_t row_begin = first + (t - tile_start[x]) * kTcBM;
    const index_t row_end = offsets[x + 1] > m ? m : offsets[x + 1];
    const __nv_bfloat16* bx = b + x * stride_b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (index_t k0 = 0; k0 < k; k0 += kTcBK) {
      for (int idx = static_cast<int>(threadIdx.x); idx < kTcBM * kTcBK; idx += kTcThreads) {
        const int r = idx / kTcBK, kk = idx % kTcBK;
        const index_t row = row_begin + r, kc = k0 + kk;
        as[r * kTcLdA + kk] = row < row_end && kc < k ? a[row * lda + kc] : zero;
      }
      for (int idx = static_cast<int>(threadIdx.x); idx < kTcBK * kTcBN; idx += kTcThreads) {
        // consecutive threads read consecutive addresses: along k when B_x is (n, k), else along n
        const int cc = trans_b ? idx / kTcBK : idx % kTcBN;
        const int kk = trans_b ? idx % kTcBK : idx / kTcBN;
        const index_t col = col0 + cc, kc = k0 + kk;
        bs[kk * kTcLdB + cc] = col < n && kc < k ? (trans_b ? bx[col * ldb + kc] : bx[kc * ldb + col]) : zero;
      }
      __syncthreads();
      for (int ks = 0; ks < kTcBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], as + (wr + 16 * i) * kTcLdA + ks, kTcLdA);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs + ks * kTcLdB + wc + 16 * j, kTcLdB);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();  // the operand tiles are rewritten by the next stage
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cs + (wr + 16 * i) * kTcLdC + wc + 16 * j, acc[i][j], kTcLdC, wmma::mem_row_major);
    __syncthreads();
    for (int idx = static_cast<int>(threadIdx.x); idx < kTcBM * kTcBN; idx += kTcThreads) {
      const int r = idx / kTcBN, cc = idx % kTcBN;
      const index_t row = row_begin + r, col = col0 + cc;
      if (row < row_end && col < n) {
        float* dst = c + row * ldc + col;
        const float v = cs[r * kTcLdC + cc];
        *dst = accumulate ? *dst + v : v;
      }
    }
    __syncthreads();  // cs is rewritten by the block's next tile
  }
#endif
}

/// dw[x] (n, k) += dy[rows of x]^T a[rows of x] for every expert x, dy (m, n) and a (m, k) bf16
/// row-major, the rows [offsets[x], offsets[x + 1]) clamped to [0, m); dw fp32. Each block owns one
/// 64 x 64 tile of one expert's dw (no atomics). Launch: grid (ceil(k / kTcBN), ceil(n / kTcBM), e),
/// kTcThreads.
template <int = 0>
__global__ void __launch_bounds__(kTcThreads)
    grouped_gemm_wgrad_bf16_tc(index_t m, index_t n, index_t k, const index_t* offsets, const __nv_bfloat16* dy,
                               const __nv_bfloat16* a, float* dw) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __nv_bfloat16 gs[kTcBK * kTcLdB];  // gs[r][i] = dy[r0 + r, n0 + i]
  __shared__ __align__(32) __nv_bfloat16 as[kTcBK * kTcLdB];  // as[r][j] = a[r0 + r, k0 + j]
  __shared__ __align__(32) float cs[kTcBM * kTcLdC];
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
  const index_t x = blockIdx.z;
  const index_t n0 = static_cast<index_t>(blockIdx.y) * kTcBM, k0 = static_cast<index_t>(blockIdx.x) * kTcBN;
  const index_t lo = offsets[x] < 0 ? 0 : (offsets[x] > m ? m : offsets[x]);
  const index_t hi = offsets[x + 1] < lo ? lo : (offsets[x + 1] > m ? m : offsets[x + 1]);
  if (lo == hi) return;  // no rows: dw[x] gets nothing (the whole block returns)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (index_t r0 = lo; r0 < hi; r0 += kTcBK) {
    for (int idx = static_cast<int>(threadIdx.x); idx < kTcBK * kTcBN; idx += kTcThreads) {
      const int rr = idx / kTcBN, cc = idx % kTcBN;
      const index_t row = r0 + rr;
      gs[rr * kTcLdB + cc] = row < hi && n0 + cc < n ? dy[row * n + n0 + cc] : zero;
      as[rr * kTcLdB + cc] = row < hi && k0 + cc < k ? a[row * k + k0 + cc] : zero;
    }
    __syncthreads();
    for (int ks = 0; ks < kTcBK; ks += 16) {
      // dy^T as the left operand: element (i, r) of the fragment is gs[r][i], a column-major load
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], gs + ks * kTcLdB + wr + 16 * i, kTcLdB);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], as + ks * kTcLdB + wc + 16 * j, kTcLdB);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wr + 16 * i) * kTcLdC + wc + 16 * j, acc[i][j], kTcLdC, wmma::mem_row_major);
  __syncthreads();
  float* dwx = dw + x * n * k;
  for (int idx = static_cast<int>(threadIdx.x); idx < kTcBM * kTcBN; idx += kTcThreads) {
    const int r = idx / kTcBN, cc = idx % kTcBN;
    const index_t row = n0 + r, col = k0 + cc;
    if (row < n && col < k) dwx[row * k + col] += cs[r * kTcLdC + cc];
  }
#endif
}

}  // namespace mixmoe::cuda::kernels
