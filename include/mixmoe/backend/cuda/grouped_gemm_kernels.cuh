// The kernels of the MoE experts' grouped GEMMs (moe.cuh launches them; cuda::grouped_gemm and
// cuda::grouped_gemm_wgrad are the entry points):
//
//   gemm_tile_starts            the expert-aligned row tiles numbered (one block: a scan over experts)
//   grouped_gemm_tiles          C[rows of x] (+)= A[rows of x] op(B_x) for every expert x, SIMT: float,
//                               double, or bf16 operands widened to fp32; 256 threads (16 x 16) a
//                               64 x 64 tile of C, 4 x 4 outputs a thread, 16 deep in K
//   grouped_gemm_wgrad_tiles    dw[x] (n, k) += dy[rows of x]^T a[rows of x], SIMT, the same way
//   grouped_gemm_tc<TIn>        the first on the tensor cores, WMMA fragments with fp32 accumulation:
//                               TIn = bf16 (m16n16k16), or float rounded to TF32 (m16n16k8, when
//                               cuda::set_allow_tf32 allows it); compute capability 8.0 and newer
//   grouped_gemm_wgrad_tc<TIn>  the second on the tensor cores
//
// All of them walk the same expert-aligned tiling: the rows of expert x are [offsets[x], offsets[x + 1])
// (device memory, clamped to [0, m)), cut into 64-row tiles that never mix two experts;
// tile_start (e + 1), made by gemm_tile_starts, numbers them, and blockIdx.y walks
// them (grid-stride). The weight-gradient kernels give each block one 64 x 64 tile of one expert's
// dw (blockIdx.z: the expert): each output has one owner, no atomics.
//
// Tensor cores: a block is 4 warps; each warp owns a 32 x 32 quarter of the tile (2 x 2 fragments).
// Operand tiles go through shared memory, 32 deep in K, zero-filled outside the expert's rows, past
// n and past k, so any shape works; they are copied in 16-byte pieces where a piece is whole and
// aligned, else value by value, float values rounded to TF32 on the way. B_x is kept as it lies in
// memory: (k, n) tiles for row-major fragments, (n, k) tiles for column-major ones when trans_b. The
// fp32 tile is staged in shared memory and written (or added) element by element with the bounds
// checks.
//
// The header needs only CUDA's bf16 and WMMA headers and index_t: tests/cuda/host_model runs every
// kernel on the CPU under a model of those headers, against references, in CI.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "mixmoe/core/shape.hpp"

namespace mixmoe::cuda::kernels {

// ---- the tiling ---------------------------------------------------------------------------------

inline constexpr int kGemmThreads = 256;
inline constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16;

/// The rows [begin, end) of expert x: offsets[x] and offsets[x + 1] clamped to [0, m], end >= begin.
struct RowRange {
  index_t begin, end;
};
__device__ inline RowRange expert_rows(const index_t* offsets, index_t x, index_t m) {
  const index_t lo = offsets[x] < 0 ? 0 : (offsets[x] > m ? m : offsets[x]);
  const index_t hi = offsets[x + 1] < lo ? lo : (offsets[x + 1] > m ? m : offsets[x + 1]);
  return {lo, hi};
}

/// Row tile t of the tiling: its expert, its first row, and the expert's row end (the tile holds the
/// rows [begin, min(begin + kGemmBM, end))).
struct RowTile {
  index_t expert, begin, end;
};
__device__ inline RowTile row_tile(const index_t* offsets, const long long* tile_start, index_t e, index_t m,
                                   long long t) {
  index_t lo = 0, hi = e;  // the expert: the largest x with tile_start[x] <= t (tile_start[0] = 0)
  while (hi - lo > 1) {
    const index_t mid = lo + (hi - lo) / 2;
    if (tile_start[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  const RowRange rows = expert_rows(offsets, lo, m);
  return {lo, rows.begin + (t - tile_start[lo]) * kGemmBM, rows.end};
}

/// Inclusive prefix sum of v over a block of kGemmThreads threads (every thread calls it); *total
/// gets the block's sum.
__device__ inline long long block_inclusive_scan(long long v, long long* total) {
  __shared__ long long warp_total[kGemmThreads / 32];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  for (int o = 1; o < 32; o *= 2) {
    const long long t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  __syncthreads();  // warp_total may still be read by a previous call
  if (lane == 31) warp_total[warp] = v;
  __syncthreads();
  long long before = 0, all = 0;
  for (int w = 0; w < kGemmThreads / 32; ++w) {
    if (w < warp) before += warp_total[w];
    all += warp_total[w];
  }
  *total = all;
  return v + before;
}

/// tile_start (e + 1): the first row tile of each expert, ceil(rows_x / kGemmBM) tiles per expert
/// (rows clamped to [0, m)), and the count in tile_start[e]. One block of kGemmThreads.
template <int = 0>
__global__ void gemm_tile_starts(const index_t* offsets, index_t e, index_t m, long long* tile_start) {
  long long carry = 0;
  for (index_t base = 0; base < e; base += kGemmThreads) {
    const index_t x = base + threadIdx.x;
    long long tiles = 0;
    if (x < e) {
      const RowRange rows = expert_rows(offsets, x, m);
      tiles = (rows.end - rows.begin + kGemmBM - 1) / kGemmBM;
    }
    long long total = 0;
    const long long incl = block_inclusive_scan(tiles, &total);
    if (x < e) tile_start[x] = carry + incl - tiles;
    carry += total;
  }
  if (threadIdx.x == 0) tile_start[e] = carry;
}

// ---- SIMT ---------------------------------------------------------------------------------------

__device__ inline float moe_to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
__device__ inline float moe_to_acc(float v, float) { return v; }
__device__ inline double moe_to_acc(double v, double) { return v; }

/// acc[i][j] += sum over the kGemmBK rows q of left[q][ty + 16 i] * right[q][tx + 16 j]: a thread's
/// 4 x 4 outputs from two k-major shared tiles.
template <class Acc, int WL, int WR>
__device__ inline void simt_fma_tile(Acc (&acc)[4][4], const Acc (&left)[kGemmBK][WL], const Acc (&right)[kGemmBK][WR],
                                     int ty, int tx) {
  for (int q = 0; q < kGemmBK; ++q) {
    Acc lv[4], rv[4];
    for (int i = 0; i < 4; ++i) lv[i] = left[q][ty + 16 * i];
    for (int j = 0; j < 4; ++j) rv[j] = right[q][tx + 16 * j];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] += lv[i] * rv[j];
  }
}

/// 256 threads (16 x 16), each computing a 4 x 4 block of a 64 x 64 output tile, 16-deep K steps
/// through shared memory. blockIdx.x: the column tile; blockIdx.y (grid-stride): the row tile in the
/// expert-aligned tile list (a tile never mixes two experts' rows, so it reads one B_e).
template <class TIn, class Acc>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_gemm_tiles(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const long long* tile_start,
                       index_t tile_bound, const TIn* a, index_t lda, const TIn* b, index_t ldb, index_t stride_b,
                       bool trans_b, Acc* c, index_t ldc, bool accumulate) {
  __shared__ Acc as[kGemmBK][kGemmBM + 1];  // A tile, k-major (padded: its stores spread over the banks)
  __shared__ Acc bs[kGemmBK][kGemmBN];      // B tile
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const index_t col0 = static_cast<index_t>(blockIdx.x) * kGemmBN;
  const long long total_tiles = tile_start[e];
  for (index_t t = blockIdx.y; t < tile_bound && t < total_tiles; t += gridDim.y) {
    const RowTile tile = row_tile(offsets, tile_start, e, m, t);
    const index_t row_begin = tile.begin, row_end = tile.end;
    const TIn* bx = b + tile.expert * stride_b;
    Acc acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
    for (index_t k0 = 0; k0 < k; k0 += kGemmBK) {
      for (int l = 0; l < (kGemmBM * kGemmBK) / kGemmThreads; ++l) {
        const int idx = threadIdx.x + l * kGemmThreads;
        const int r = idx / kGemmBK, kk = idx % kGemmBK;
        const index_t row = row_begin + r, kc = k0 + kk;
        as[kk][r] = row < row_end && kc < k ? moe_to_acc(a[row * lda + kc], Acc(0)) : Acc(0);
      }
      for (int l = 0; l < (kGemmBN * kGemmBK) / kGemmThreads; ++l) {
        const int idx = threadIdx.x + l * kGemmThreads;
        const int cc = trans_b ? idx / kGemmBK : idx % kGemmBN;
        const int kk = trans_b ? idx % kGemmBK : idx / kGemmBN;
        const index_t col = col0 + cc, kc = k0 + kk;
        Acc v = Acc(0);
        if (col < n && kc < k) v = moe_to_acc(trans_b ? bx[col * ldb + kc] : bx[kc * ldb + col], Acc(0));
        bs[kk][cc] = v;
      }
      __syncthreads();
      simt_fma_tile(acc, as, bs, ty, tx);
      __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
      const index_t row = row_begin + ty + 16 * i;
      if (row >= row_end) continue;
      for (int j = 0; j < 4; ++j) {
        const index_t col = col0 + tx + 16 * j;
        if (col >= n) continue;
        Acc* dst = c + row * ldc + col;
        *dst = accumulate ? *dst + acc[i][j] : acc[i][j];
      }
    }
  }
}

/// The weight gradient of a grouped GEMM: dw[x] (n, k) += dy[rows of x]^T a[rows of x]. One block of
/// 256 threads (16 x 16, 4 x 4 outputs each) per 64 x 64 tile of one expert's dw (blockIdx.z: the
/// expert), walking that expert's rows 16 at a time: each output has one owner, no atomics. TIn
/// float, double or __nv_bfloat16 (then T = float: fp32 accumulation).
template <class TIn, class T>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_gemm_wgrad_tiles(index_t m, index_t n, index_t k, const index_t* offsets, const TIn* dy, const TIn* a,
                             T* dw) {
  __shared__ T gs[kGemmBK][kGemmBM];  // dy rows x n columns
  __shared__ T as[kGemmBK][kGemmBN];  // a rows x k columns
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const index_t x = blockIdx.z;
  const index_t n0 = static_cast<index_t>(blockIdx.y) * kGemmBM, k0 = static_cast<index_t>(blockIdx.x) * kGemmBN;
  const auto [lo, hi] = expert_rows(offsets, x, m);
  T acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (index_t r0 = lo; r0 < hi; r0 += kGemmBK) {
    for (int l = 0; l < (kGemmBM * kGemmBK) / kGemmThreads; ++l) {
      const int idx = threadIdx.x + l * kGemmThreads;
      const int rr = idx / kGemmBM, cc = idx % kGemmBM;
      const index_t row = r0 + rr;
      gs[rr][cc] = row < hi && n0 + cc < n ? moe_to_acc(dy[row * n + n0 + cc], T(0)) : T(0);
      as[rr][cc] = row < hi && k0 + cc < k ? moe_to_acc(a[row * k + k0 + cc], T(0)) : T(0);
    }
    __syncthreads();
    simt_fma_tile(acc, gs, as, ty, tx);
    __syncthreads();
  }
  if (lo == hi) return;  // no rows: dw[x] gets nothing
  T* dwx = dw + x * n * k;
  for (int i = 0; i < 4; ++i) {
    const index_t row = n0 + ty + 16 * i;
    if (row >= n) continue;
    for (int j = 0; j < 4; ++j) {
      const index_t col = k0 + tx + 16 * j;
      if (col < k) dwx[row * k + col] += acc[i][j];
    }
  }
}

// ---- tensor cores -------------------------------------------------------------------------------

inline constexpr int kTcThreads = 128;                  // 4 warps
inline constexpr int kTcBM = kGemmBM, kTcBN = kGemmBN;  // the output tile: the same tiling
inline constexpr int kTcBK = 32;                        // K (or rows, for the weight gradient) per stage
inline constexpr int kTcLdC = kTcBN + 4;                // the fp32 result tile (kTcBM x kTcBN)

/// The operand types of the tensor-core kernels: bf16 (m16n16k16 fragments) and float rounded to
/// TF32 (m16n16k8). Shared rows are padded by 16 bytes: leading dimensions 40 and 72 bf16, 36 and
/// 68 floats (multiples of 8 or 4 as WMMA needs; consecutive rows start in different banks).
template <class TIn>
struct TcOperand;

template <>
struct TcOperand<__nv_bfloat16> {
  using Precision = __nv_bfloat16;  // the fragments' element type
  static constexpr int kK = 16;     // the fragments' depth
  __device__ static __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
  __device__ static __nv_bfloat16 prepare(__nv_bfloat16 v) { return v; }
};

// TF32 fragments exist from compute capability 8.0 (device code for older GPUs never uses them)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TcOperand<float> {
  using Precision = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
  __device__ static float zero() { return 0.0f; }
  __device__ static float prepare(float v) { return nvcuda::wmma::__float_to_tf32(v); }  // round to TF32
};
#endif

template <class TIn>
inline constexpr int kTcPieces = 16 / static_cast<int>(sizeof(TIn));  // values in 16 bytes
template <class TIn>
inline constexpr int kTcLdA = kTcBK + kTcPieces<TIn>;  // a tile of 64 rows x kTcBK (A; B_x^T when trans_b)
template <class TIn>
inline constexpr int kTcLdB = kTcBN + kTcPieces<TIn>;  // kTcBK rows x 64 (B_x; dy and a of the weight gradient)

template <class TIn>
using TcAccumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, TcOperand<TIn>::kK, float>;

/// dst[r * ld_dst + c] = prepare(src[r * ld_src + c]) for r < rows and c < cols, zero elsewhere, over
/// an R x C tile by the block's kTcThreads threads. A piece of 16 bytes is one vector copy when it is
/// whole and its source aligned (the destination always is: shared rows are whole pieces long and
/// the tiles start 32-byte aligned), else value by value.
template <int R, int C, class TIn>
__device__ inline void tc_load_tile(TIn* dst, int ld_dst, const TIn* src, index_t ld_src, index_t rows, index_t cols) {
  using Op = TcOperand<TIn>;
  constexpr int p = kTcPieces<TIn>, pieces = C / p;
  static_assert(C % p == 0, "whole pieces");
  for (int idx = static_cast<int>(threadIdx.x); idx < R * pieces; idx += kTcThreads) {
    const int r = idx / pieces, c = (idx % pieces) * p;
    TIn* d = dst + r * ld_dst + c;
    if (r >= rows) {
      for (int q = 0; q < p; ++q) d[q] = Op::zero();
      continue;
    }
    const TIn* sp = src + r * ld_src + c;
    if (c + p <= cols && reinterpret_cast<std::uintptr_t>(sp) % 16 == 0) {
      if constexpr (std::is_same_v<TIn, float>) {
        float4 v;
        v = *reinterpret_cast<const float4*>(sp);
        v.x = Op::prepare(v.x);
        v.y = Op::prepare(v.y);
        v.z = Op::prepare(v.z);
        v.w = Op::prepare(v.w);
        *reinterpret_cast<float4*>(d) = v;
      } else {
        *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(sp);
      }
    } else {
      for (int q = 0; q < p; ++q) d[q] = c + q < cols ? Op::prepare(sp[q]) : Op::zero();
    }
  }
}

/// Loads a fragment; TF32 fragments then have their elements rounded, as the API asks (the values
/// in shared memory are rounded already, so this changes nothing).
template <class Frag, class TIn>
__device__ inline void tc_load_fragment(Frag& f, const TIn* p, int ld) {
  nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ld));
  if constexpr (std::is_same_v<TIn, float>)
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
}

/// acc (a warp's 2 x 2 fragments) += the warp's rows [wr, wr + 32) of the A tile (row-major, ld lda;
/// with LayoutA col_major, stored as (k, m) rows) times the columns [wc, wc + 32) of the B tile (row-
/// major (k, n), ld ldb; with LayoutB col_major, stored as (n, k) rows), over kTcBK.
template <class TIn, class LayoutA, class LayoutB>
__device__ inline void tc_mma_stage(TcAccumulator<TIn> (&acc)[2][2], const TIn* at, int lda, int wr, const TIn* bt,
                                    int ldb, int wc) {
  namespace wmma = nvcuda::wmma;
  using Op = TcOperand<TIn>;
  for (int ks = 0; ks < kTcBK; ks += Op::kK) {
    wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, typename Op::Precision, LayoutA> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::Precision, LayoutB> fb[2];
    for (int i = 0; i < 2; ++i) {
      if constexpr (std::is_same_v<LayoutA, wmma::row_major>)
        tc_load_fragment(fa[i], at + (wr + 16 * i) * lda + ks, lda);
      else
        tc_load_fragment(fa[i], at + ks * lda + wr + 16 * i, lda);
    }
    for (int j = 0; j < 2; ++j) {
      if constexpr (std::is_same_v<LayoutB, wmma::row_major>)
        tc_load_fragment(fb[j], bt + ks * ldb + wc + 16 * j, ldb);
      else
        tc_load_fragment(fb[j], bt + (wc + 16 * j) * ldb + ks, ldb);
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

/// Stores the warp's fragments into the block's fp32 tile cs (kTcBM x kTcBN, leading dimension kTcLdC).
template <class TIn>
__device__ inline void tc_store_tile(float* cs, int wr, int wc, const TcAccumulator<TIn> (&acc)[2][2]) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(cs + (wr + 16 * i) * kTcLdC + wc + 16 * j, acc[i][j], kTcLdC,
                                      nvcuda::wmma::mem_row_major);
}

/// For every expert x: C[r, :] (+)= A[r, :] op(B_x) over the rows r in [offsets[x], offsets[x + 1])
/// (clamped to [0, m)); A (m, k) row-major (lda); B_x = b + x * stride_b, (k, n) row-major (ldb), or
/// (n, k) when trans_b; C (m, n) fp32 (ldc). TIn bf16, or float rounded to TF32. tile_start (e + 1)
/// as gemm_tile_starts makes it (kTcBM-row tiles). Launch: grid (ceil(n / kTcBN), min(tile_bound,
/// 65535)), kTcThreads.
template <class TIn>
__global__ void __launch_bounds__(kTcThreads)
    grouped_gemm_tc(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const long long* tile_start,
                    index_t tile_bound, const TIn* a, index_t lda, const TIn* b, index_t ldb, index_t stride_b,
                    bool trans_b, float* c, index_t ldc, bool accumulate) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int ld_a = kTcLdA<TIn>, ld_b = kTcLdB<TIn>;
  __shared__ __align__(32) TIn as[kTcBM * ld_a];
  __shared__ __align__(32) TIn bs[kTcBN * ld_a > kTcBK * ld_b ? kTcBN * ld_a : kTcBK * ld_b];
  __shared__ __align__(32) float cs[kTcBM * kTcLdC];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // the warp's quarter of the tile
  const index_t col0 = static_cast<index_t>(blockIdx.x) * kTcBN;
  const long long total_tiles = tile_start[e];
  for (long long t = blockIdx.y; t < tile_bound && t < total_tiles; t += gridDim.y) {
    const RowTile tile = row_tile(offsets, tile_start, e, m, t);
    const index_t row_begin = tile.begin, row_end = tile.end;
    const TIn* bx = b + tile.expert * stride_b;
    TcAccumulator<TIn> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (index_t k0 = 0; k0 < k; k0 += kTcBK) {
      tc_load_tile<kTcBM, kTcBK>(as, ld_a, a + row_begin * lda + k0, lda, row_end - row_begin, k - k0);
      if (trans_b)  // B_x^T tile: n rows of k, read along k
        tc_load_tile<kTcBN, kTcBK>(bs, ld_a, bx + col0 * ldb + k0, ldb, n - col0, k - k0);
      else
        tc_load_tile<kTcBK, kTcBN>(bs, ld_b, bx + k0 * ldb + col0, ldb, k - k0, n - col0);
      __syncthreads();
      if (trans_b)
        tc_mma_stage<TIn, wmma::row_major, wmma::col_major>(acc, as, ld_a, wr, bs, ld_a, wc);
      else
        tc_mma_stage<TIn, wmma::row_major, wmma::row_major>(acc, as, ld_a, wr, bs, ld_b, wc);
      __syncthreads();  // the operand tiles are rewritten by the next stage
    }
    tc_store_tile<TIn>(cs, wr, wc, acc);
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
#else
  __trap();  // built for a GPU without these tensor cores: moe.cuh never launches it there
#endif
}

/// dw[x] (n, k) += dy[rows of x]^T a[rows of x] for every expert x, dy (m, n) and a (m, k) row-major
/// (bf16, or float rounded to TF32), the rows [offsets[x], offsets[x + 1]) clamped to [0, m); dw fp32.
/// Each block owns one 64 x 64 tile of one expert's dw (no atomics). Launch: grid (ceil(k / kTcBN),
/// ceil(n / kTcBM), e), kTcThreads.
template <class TIn>
__global__ void __launch_bounds__(kTcThreads)
    grouped_gemm_wgrad_tc(index_t m, index_t n, index_t k, const index_t* offsets, const TIn* dy, const TIn* a,
                          float* dw) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int ld = kTcLdB<TIn>;
  __shared__ __align__(32) TIn gs[kTcBK * ld];  // gs[r][i] = dy[r0 + r, n0 + i]
  __shared__ __align__(32) TIn as[kTcBK * ld];  // as[r][j] = a[r0 + r, k0 + j]
  __shared__ __align__(32) float cs[kTcBM * kTcLdC];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
  const index_t x = blockIdx.z;
  const index_t n0 = static_cast<index_t>(blockIdx.y) * kTcBM, k0 = static_cast<index_t>(blockIdx.x) * kTcBN;
  const auto [lo, hi] = expert_rows(offsets, x, m);
  if (lo == hi) return;  // no rows: dw[x] gets nothing (the whole block returns)
  TcAccumulator<TIn> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (index_t r0 = lo; r0 < hi; r0 += kTcBK) {
    tc_load_tile<kTcBK, kTcBM>(gs, ld, dy + r0 * n + n0, n, hi - r0, n - n0);
    tc_load_tile<kTcBK, kTcBN>(as, ld, a + r0 * k + k0, k, hi - r0, k - k0);
    __syncthreads();
    // dy^T as the left operand: element (i, r) of a fragment is gs[r][i], a column-major load
    tc_mma_stage<TIn, wmma::col_major, wmma::row_major>(acc, gs, ld, wr, as, ld, wc);
    __syncthreads();
  }
  tc_store_tile<TIn>(cs, wr, wc, acc);
  __syncthreads();
  float* dwx = dw + x * n * k;
  for (int idx = static_cast<int>(threadIdx.x); idx < kTcBM * kTcBN; idx += kTcThreads) {
    const int r = idx / kTcBN, cc = idx % kTcBN;
    const index_t row = n0 + r, col = k0 + cc;
    if (row < n && col < k) dwx[row * k + col] += cs[r * kTcLdC + cc];
  }
#else
  __trap();  // built for a GPU without these tensor cores: moe.cuh never launches it there
#endif
}

}  // namespace mixmoe::cuda::kernels
