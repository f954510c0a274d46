// The attention part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): fused causal attention, rotary positions and the Fourier features (ops/attention.hpp, rope.hpp, fft.hpp).
//
// Causal attention (the definitions of ops/attention.hpp: query i sits at position Tk - Tq + i and
// sees keys 0 .. Tk - Tq + i; query head h reads kv head h / G). The (Tq, Tk) probabilities are
// never stored: every kernel streams tiles of rows through shared memory and keeps per-row state
// in registers. A warp owns one row; lane l holds channels l, l + 32, ... of the row's accumulators
// (C = ceil(Dh / 32) of them, C in {1, 2, 4, 8}: Dh <= 256), and in a tile of up to 32 rows lane j
// computes the dot products of row j. Blocks of 256 threads (8 warps), 48 KiB of shared memory at
// most; a block loops over work items (block-stride) when there are more than the grid holds.
//
//   attn_forward     one block per (batch, query head, 8 query rows); key tiles (K padded, V) in
//                    shared memory; online softmax per row: running max m (T) and sum l (double),
//                    o = sum_j exp(s_j - m) v_j / l written once, lse = m + log l per row
//   attn_backward    delta_i = rowsum(dO_i O_i) in double (one thread per row), then
//                    dQ: one block per (batch, query head, 8 query rows), key tiles as above:
//                      p = exp(s - lse), dS = p (dO.v - delta), dQ = scale sum_j dS_j k_j
//                    dK, dV: one block per (batch, kv head, 8 keys), looping over the G query heads
//                      of the kv head and tiles of the queries that see the block's keys:
//                      dV_j = sum_i p_ij dO_i, dK_j = scale sum_i dS_ij q_i
//                    every output element has one owner (no atomics: deterministic)
//   Dot products and the accumulators are in T (float accumulates in float, like the CPU's GEMMs);
//   the softmax sum and delta in double, as on the CPU.
//
// Rotary positions (ops/rope.hpp):
//   rope_angles      cos/sin tables (T, Dh/2), by the CPU's formula in double: inv_freq_i =
//                    theta^(-2i/Dh), angle = (offset + t) inv_freq_i, rounded to T; grid-stride
//   rope_apply       each (i, i + Dh/2) pair of x (B, T, H, Dh) rotated by +-angle; grid-stride over pairs
//
// Real FFT along the last axis (ops/fft.hpp), through fft.cuh's cuFFT plans and kernels:
//   fft_rfft_rows, fft_rfft_adjoint (rfft and its backward), fft_magnitude,
//   fft_magnitude_adjoint (rfft_magnitude and its backward). Length 1 (a copy) is done without cuFFT.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "mixmoe/backend/cuda/fft.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace attn {

inline constexpr int kWarps = 8;                // rows (forward, dQ) or keys (dK/dV) per block
inline constexpr int kThreads = 32 * kWarps;    // 256
inline constexpr int kMaxTile = 32;             // rows of a shared tile: one per lane
inline constexpr index_t kMaxHeadSize = 256;    // 8 channels per lane
inline constexpr std::size_t kSharedBytes = 48 * 1024;
// more work items than this: blocks loop (fewer where MIXMOE_CUDA_MAX_BLOCKS is below, as in the model tests)
inline constexpr index_t kMaxBlocks = std::min<index_t>(1 << 20, kMaxGridStrideBlocks);

/// A (B, T, H, Dh) tensor read through its strides; its channels are contiguous.
template <class T>
struct Heads {
  const T* p;
  index_t sb, st, sh;
  __device__ const T* row(index_t b, index_t t, index_t h) const { return p + b * sb + t * st + h * sh; }
};

template <class T>
struct Problem {
  Heads<T> q, k, v;
  index_t b, tq, tk, hq, hkv, dh, group;
  T scale;
};

__device__ inline float dexp(float x) { return ::expf(x); }
__device__ inline double dexp(double x) { return ::exp(x); }
__device__ inline index_t imin(index_t a, index_t b) { return a < b ? a : b; }

/// Butterfly sums and maxima: every lane ends with the same value.
template <class T>
__device__ T warp_sum(T v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class T>
__device__ T warp_max(T v) {
  for (int o = 16; o > 0; o /= 2) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

/// o (B, Tq, Hq, Dh) and lse (B, Hq, Tq), both contiguous. Shared: q rows (8, Dh), K tile
/// (tile, Dh + 1), V tile (tile, Dh).
template <class T, int C>
__global__ void __launch_bounds__(kThreads)
    fused_forward(Problem<T> pr, T* out, T* lse, index_t row_blocks, int key_tile) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  const index_t dh = pr.dh, past = pr.tk - pr.tq;
  T* qs = reinterpret_cast<T*>(attn_smem);
  T* ks = qs + kWarps * dh;
  T* vs = ks + key_tile * (dh + 1);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t work = pr.b * pr.hq * row_blocks;
  for (index_t w = blockIdx.x; w < work; w += gridDim.x) {
    const index_t rb = w % row_blocks, bh = w / row_blocks;
    const index_t h = bh % pr.hq, bb = bh / pr.hq, kvh = h / pr.group;
    const index_t r0 = rb * kWarps, rows = imin(kWarps, pr.tq - r0);
    const index_t n = past + r0 + rows;  // keys the block's last row sees
    const index_t i = r0 + warp;         // this warp's query row
    const index_t len = i < pr.tq ? past + i + 1 : 0;  // keys row i sees (0: no row)
    __syncthreads();  // the previous work item no longer reads shared memory
    for (index_t e = threadIdx.x; e < rows * dh; e += kThreads) qs[e] = pr.q.row(bb, r0 + e / dh, h)[e % dh];
    T m = static_cast<T>(-INFINITY);
    double l = 0;
    T acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = T(0);
    for (index_t j0 = 0; j0 < n; j0 += key_tile) {
      const index_t tile = imin(key_tile, n - j0);
      __syncthreads();  // q rows written; the previous tile consumed
      for (index_t e = threadIdx.x; e < tile * dh; e += kThreads) {
        const index_t j = e / dh, d = e % dh;
        ks[j * (dh + 1) + d] = pr.k.row(bb, j0 + j, kvh)[d];
        vs[j * dh + d] = pr.v.row(bb, j0 + j, kvh)[d];
      }
      __syncthreads();
      if (j0 >= len) continue;  // warp-uniform: no key of the tile is visible to this row
      // lane j: the score of key j0 + j; the first tile a row reads has key 0, so m is finite after it
      const bool valid = lane < tile && j0 + lane < len;
      T s = static_cast<T>(-INFINITY);
      if (valid) {
        const T* qr = qs + warp * dh;
        const T* kr = ks + lane * (dh + 1);
        T dot = T(0);
        for (index_t d = 0; d < dh; ++d) dot += qr[d] * kr[d];
        s = pr.scale * dot;
      }
      const T tmax = warp_max(s);
      const T m_new = tmax > m ? tmax : m;
      const T alpha = dexp(m - m_new);  // 0 on the row's first tile (m = -inf)
      const T p = valid ? dexp(s - m_new) : T(0);
      l = l * static_cast<double>(alpha) + warp_sum(static_cast<double>(p));
#pragma unroll
      for (int c = 0; c < C; ++c) acc[c] *= alpha;
      for (int j = 0; j < tile; ++j) {
        const T pj = __shfl_sync(0xffffffffu, p, j);
        const T* vr = vs + j * dh;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const index_t d = lane + 32 * c;
          if (d < dh) acc[c] += pj * vr[d];
        }
      }
      m = m_new;
    }
    if (i < pr.tq) {
      T* orow = out + ((bb * pr.tq + i) * pr.hq + h) * dh;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const index_t d = lane + 32 * c;
        if (d < dh) orow[d] = static_cast<T>(static_cast<double>(acc[c]) / l);
      }
      if (lane == 0) lse[(bb * pr.hq + h) * pr.tq + i] = static_cast<T>(static_cast<double>(m) + ::log(l));
    }
  }
}

/// delta (B, Hq, Tq) = rowsum(dO * O) in double; go and o contiguous (B, Tq, Hq, Dh).
template <class T>
__global__ void row_dots(const T* go, const T* o, T* delta, index_t b, index_t tq, index_t hq, index_t dh) {
  const index_t n = b * hq * tq;
  for (index_t r = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = r % tq, h = (r / tq) % hq, bb = r / (tq * hq);
    const index_t off = ((bb * tq + i) * hq + h) * dh;
    double acc = 0;
    for (index_t d = 0; d < dh; ++d) acc += static_cast<double>(go[off + d]) * static_cast<double>(o[off + d]);
    delta[r] = static_cast<T>(acc);
  }
}

/// dq (B, Tq, Hq, Dh) contiguous. Shared: q rows and dO rows (8, Dh) each, K and V tiles (tile, Dh + 1).
template <class T, int C>
__global__ void __launch_bounds__(kThreads)
    backward_dq(Problem<T> pr, const T* go, const T* lse, const T* delta, T* dq, index_t row_blocks, int key_tile) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  const index_t dh = pr.dh, past = pr.tk - pr.tq;
  T* qs = reinterpret_cast<T*>(attn_smem);
  T* gs = qs + kWarps * dh;
  T* ks = gs + kWarps * dh;
  T* vs = ks + key_tile * (dh + 1);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t work = pr.b * pr.hq * row_blocks;
  for (index_t w = blockIdx.x; w < work; w += gridDim.x) {
    const index_t rb = w % row_blocks, bh = w / row_blocks;
    const index_t h = bh % pr.hq, bb = bh / pr.hq, kvh = h / pr.group;
    const index_t r0 = rb * kWarps, rows = imin(kWarps, pr.tq - r0);
    const index_t n = past + r0 + rows;
    const index_t i = r0 + warp;
    const index_t len = i < pr.tq ? past + i + 1 : 0;
    const T lse_i = i < pr.tq ? lse[(bb * pr.hq + h) * pr.tq + i] : T(0);
    const T delta_i = i < pr.tq ? delta[(bb * pr.hq + h) * pr.tq + i] : T(0);
    __syncthreads();
    for (index_t e = threadIdx.x; e < rows * dh; e += kThreads) {
      const index_t r = r0 + e / dh, d = e % dh;
      qs[e] = pr.q.row(bb, r, h)[d];
      gs[e] = go[((bb * pr.tq + r) * pr.hq + h) * dh + d];
    }
    T acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = T(0);
    for (index_t j0 = 0; j0 < n; j0 += key_tile) {
      const index_t tile = imin(key_tile, n - j0);
      __syncthreads();
      for (index_t e = threadIdx.x; e < tile * dh; e += kThreads) {
        const index_t j = e / dh, d = e % dh;
        ks[j * (dh + 1) + d] = pr.k.row(bb, j0 + j, kvh)[d];
        vs[j * (dh + 1) + d] = pr.v.row(bb, j0 + j, kvh)[d];
      }
      __syncthreads();
      if (j0 >= len) continue;  // warp-uniform
      const bool valid = lane < tile && j0 + lane < len;
      T ds = T(0);  // dS of (row i, key j0 + lane); 0 where masked
      if (valid) {
        const T* qr = qs + warp * dh;
        const T* gr = gs + warp * dh;
        const T* kr = ks + lane * (dh + 1);
        const T* vr = vs + lane * (dh + 1);
        T dot = T(0), dp = T(0);
        for (index_t d = 0; d < dh; ++d) {
          dot += qr[d] * kr[d];
          dp += gr[d] * vr[d];
        }
        const T p = dexp(pr.scale * dot - lse_i);  // the forward's probability, from its log-sum-exp
        ds = p * (dp - delta_i);
      }
      for (int j = 0; j < tile; ++j) {
        const T dsj = __shfl_sync(0xffffffffu, ds, j);
        const T* kr = ks + j * (dh + 1);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const index_t d = lane + 32 * c;
          if (d < dh) acc[c] += dsj * kr[d];
        }
      }
    }
    if (i < pr.tq) {
      T* row = dq + ((bb * pr.tq + i) * pr.hq + h) * dh;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const index_t d = lane + 32 * c;
        if (d < dh) row[d] = pr.scale * acc[c];
      }
    }
  }
}

/// dk, dv (B, Tk, Hkv, Dh) contiguous (either may be null). Shared: the block's K and V rows
/// (8, Dh) each, q and dO tiles (tile, Dh + 1), lse and delta of the tile (tile) each.
template <class T, int C>
__global__ void __launch_bounds__(kThreads)
    backward_dkv(Problem<T> pr, const T* go, const T* lse, const T* delta, T* dk, T* dv, index_t key_blocks,
                 int q_tile) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  const index_t dh = pr.dh, past = pr.tk - pr.tq;
  T* kown = reinterpret_cast<T*>(attn_smem);
  T* vown = kown + kWarps * dh;
  T* qs = vown + kWarps * dh;
  T* gs = qs + q_tile * (dh + 1);
  T* ls = gs + q_tile * (dh + 1);
  T* dls = ls + q_tile;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t work = pr.b * pr.hkv * key_blocks;
  for (index_t w = blockIdx.x; w < work; w += gridDim.x) {
    const index_t kb = w % key_blocks, bk = w / key_blocks;
    const index_t kvh = bk % pr.hkv, bb = bk / pr.hkv;
    const index_t j0 = kb * kWarps, keys = imin(kWarps, pr.tk - j0);
    const index_t j = j0 + warp;  // this warp's key
    const bool active = j < pr.tk;
    const index_t first = j0 - past > 0 ? j0 - past : 0;  // the first query that sees key j0
    __syncthreads();
    for (index_t e = threadIdx.x; e < keys * dh; e += kThreads) {
      const index_t r = j0 + e / dh, d = e % dh;
      kown[e] = pr.k.row(bb, r, kvh)[d];
      vown[e] = pr.v.row(bb, r, kvh)[d];
    }
    T gk[C], gv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) gk[c] = gv[c] = T(0);
    for (index_t h = kvh * pr.group; h < (kvh + 1) * pr.group; ++h) {
      for (index_t i0 = first; i0 < pr.tq; i0 += q_tile) {
        const index_t tile = imin(q_tile, pr.tq - i0);
        __syncthreads();  // the block's K/V rows written; the previous tile consumed
        for (index_t e = threadIdx.x; e < tile * dh; e += kThreads) {
          const index_t r = e / dh, d = e % dh;
          qs[r * (dh + 1) + d] = pr.q.row(bb, i0 + r, h)[d];
          gs[r * (dh + 1) + d] = go[((bb * pr.tq + i0 + r) * pr.hq + h) * dh + d];
        }
        for (index_t e = threadIdx.x; e < tile; e += kThreads) {
          ls[e] = lse[(bb * pr.hq + h) * pr.tq + i0 + e];
          dls[e] = delta[(bb * pr.hq + h) * pr.tq + i0 + e];
        }
        __syncthreads();
        // warp-uniform: no key for this warp, or the tile's last query does not see key j
        if (!active || past + i0 + tile - 1 < j) continue;
        const bool valid = lane < tile && past + i0 + lane >= j;
        T p = T(0), ds = T(0);  // of (query i0 + lane, key j); 0 where masked
        if (valid) {
          const T* qr = qs + lane * (dh + 1);
          const T* gr = gs + lane * (dh + 1);
          const T* kr = kown + warp * dh;
          const T* vr = vown + warp * dh;
          T dot = T(0), dp = T(0);
          for (index_t d = 0; d < dh; ++d) {
            dot += qr[d] * kr[d];
            dp += gr[d] * vr[d];
          }
          p = dexp(pr.scale * dot - ls[lane]);
          ds = p * (dp - dls[lane]);
        }
        for (int r = 0; r < tile; ++r) {
          const T pr_r = __shfl_sync(0xffffffffu, p, r);
          const T ds_r = __shfl_sync(0xffffffffu, ds, r);
          const T* qrow = qs + r * (dh + 1);
          const T* grow = gs + r * (dh + 1);
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const index_t d = lane + 32 * c;
            if (d < dh) {
              gv[c] += pr_r * grow[d];
              gk[c] += ds_r * qrow[d];
            }
          }
        }
      }
    }
    if (active) {
      const index_t off = ((bb * pr.tk + j) * pr.hkv + kvh) * dh;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const index_t d = lane + 32 * c;
        if (d < dh) {
          if (dk) dk[off + d] = pr.scale * gk[c];
          if (dv) dv[off + d] = gv[c];
        }
      }
    }
  }
}

/// f(std::integral_constant<int, C>) with C = channels per lane for head size dh (<= 256).
template <class F>
void with_chunks(index_t dh, F f) {
  if (dh <= 32)
    f(std::integral_constant<int, 1>{});
  else if (dh <= 64)
    f(std::integral_constant<int, 2>{});
  else if (dh <= 128)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

/// Rows of a shared tile (1 .. 32) so that fixed + tile * per_row elements of T fit in 48 KiB,
/// and the bytes that takes.
template <class T>
std::pair<int, std::size_t> tile_for(index_t fixed, index_t per_row, const char* op) {
  const index_t avail = static_cast<index_t>(kSharedBytes / sizeof(T)) - fixed;
  const int tile = static_cast<int>(std::clamp<index_t>(avail / per_row, 1, kMaxTile));
  const std::size_t bytes = static_cast<std::size_t>(fixed + tile * per_row) * sizeof(T);
  MIXMOE_CHECK(bytes <= kSharedBytes, op, "shared memory of ", bytes, " bytes exceeds ", kSharedBytes);
  return {tile, bytes};
}

inline unsigned blocks_of(index_t work) { return static_cast<unsigned>(std::min<index_t>(work, kMaxBlocks)); }

template <class T>
Problem<T> problem(const T* q, const Shape& qs, const T* k, const Shape& ks, const T* v, const Shape& vs, index_t b,
                   index_t tq, index_t tk, index_t hq, index_t hkv, index_t dh, T scale, const char* op) {
  MIXMOE_CHECK(dh <= kMaxHeadSize, op, "head size Dh = ", dh, " is above the device kernel's limit of ", kMaxHeadSize);
  return Problem<T>{{q, qs[0], qs[1], qs[2]}, {k, ks[0], ks[1], ks[2]}, {v, vs[0], vs[1], vs[2]}, b, tq, tk, hq, hkv,
                    dh, hq / hkv, scale};
}

}  // namespace attn

namespace attn_kernels {

/// cos (T, Dh/2) and sin (T, Dh/2) of (offset + t) theta^(-2i/Dh), in double, rounded to T.
template <class T>
__global__ void rope_angles(T* cosv, T* sinv, index_t t, index_t half, index_t dh, index_t offset, double theta) {
  const index_t n = t * half;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t p = e / half, i = e % half;
    const double inv_freq = ::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
    const double a = static_cast<double>(offset + p) * inv_freq;
    cosv[e] = static_cast<T>(::cos(a));
    sinv[e] = static_cast<T>(::sin(a));
  }
}

/// out (B, T, H, Dh) = x with each (i, i + half) pair rotated by sign * angle(t, i); both contiguous.
template <class T>
__global__ void rope_rotate(const T* x, const T* cosv, const T* sinv, T* out, index_t pairs, index_t t, index_t h,
                            index_t half, T sign) {
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < pairs;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = e % half, row = e / half;  // row: (b, t, h) flattened
    const index_t p = (row / h) % t;
    const index_t base = row * 2 * half;
    const T c = cosv[p * half + i], sn = sign * sinv[p * half + i];
    const T x1 = x[base + i], x2 = x[base + i + half];
    out[base + i] = x1 * c - x2 * sn;
    out[base + i + half] = x2 * c + x1 * sn;
  }
}

/// z (R, F, 2) = the spectrum whose unnormalised c2r is the adjoint of rfft applied to g (R, F, 2):
/// interior bins halved, the imaginary parts of DC and (even N) Nyquist zero (ops/fft.hpp).
template <class T>
__global__ void rfft_adjoint_spectrum(const T* g, T* z, index_t rows, index_t f, index_t n) {
  const index_t total = rows * f;
  const index_t last_interior = (n % 2 == 0) ? f - 2 : f - 1;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t k = e % f;
    T re = g[2 * e], im = g[2 * e + 1];
    if (k >= 1 && k <= last_interior) {
      re *= T(0.5);
      im *= T(0.5);
    } else {
      im = T(0);
    }
    z[2 * e] = re;
    z[2 * e + 1] = im;
  }
}

}  // namespace attn_kernels

/// The attention part of DeviceOps<Cuda> (backend/cuda/cuda.cuh).
struct AttentionOps {
  /// out (B, Tq, Hq, Dh) and lse (B, Hq, Tq), contiguous, of causal attention; q, k, v read
  /// through their strides (channels contiguous).
  template <class T>
  static void attn_forward(const T* q, const Shape& q_strides, const T* k, const Shape& k_strides, const T* v,
                           const Shape& v_strides, T* out, T* lse, index_t b, index_t tq, index_t tk, index_t hq,
                           index_t hkv, index_t dh, T scale) {
    const attn::Problem<T> pr = attn::problem(q, q_strides, k, k_strides, v, v_strides, b, tq, tk, hq, hkv, dh, scale,
                                              "causal_attention");
    const index_t row_blocks = (tq + attn::kWarps - 1) / attn::kWarps, work = b * hq * row_blocks;
    if (work == 0) return;
    const auto tb = attn::tile_for<T>(attn::kWarps * dh, 2 * dh + 1, "causal_attention");
    attn::with_chunks(dh, [&](auto chunks) {
      attn::fused_forward<T, decltype(chunks)::value>
          <<<attn::blocks_of(work), attn::kThreads, tb.second, current_stream()>>>(pr, out, lse, row_blocks, tb.first);
      MIXMOE_CUDA_CHECK_LAUNCH("attn::fused_forward");
    });
  }

  /// Gradients of causal attention: dq (B, Tq, Hq, Dh), dk and dv (B, Tk, Hkv, Dh), contiguous,
  /// each written whole (null: not wanted). out, gout (B, Tq, Hq, Dh) and lse (B, Hq, Tq) are contiguous.
  template <class T>
  static void attn_backward(const T* q, const Shape& q_strides, const T* k, const Shape& k_strides, const T* v,
                            const Shape& v_strides, const T* out, const T* gout, const T* lse, T* dq, T* dk, T* dv,
                            index_t b, index_t tq, index_t tk, index_t hq, index_t hkv, index_t dh, T scale) {
    const attn::Problem<T> pr = attn::problem(q, q_strides, k, k_strides, v, v_strides, b, tq, tk, hq, hkv, dh, scale,
                                              "causal_attention backward");
    auto delta = Tensor<T, Cuda>::empty(Shape{b * hq * tq});  // (B, Hq, Tq)
    if (delta.numel() > 0) {
      attn::row_dots<<<blocks_for(delta.numel()), 256, 0, current_stream()>>>(gout, out, delta.data(), b, tq, hq, dh);
      MIXMOE_CUDA_CHECK_LAUNCH("attn::row_dots");
    }
    const index_t row_blocks = (tq + attn::kWarps - 1) / attn::kWarps;
    if (dq && b * hq * row_blocks > 0) {
      const auto tb = attn::tile_for<T>(2 * attn::kWarps * dh, 2 * (dh + 1), "causal_attention backward");
      attn::with_chunks(dh, [&](auto chunks) {
        attn::backward_dq<T, decltype(chunks)::value>
            <<<attn::blocks_of(b * hq * row_blocks), attn::kThreads, tb.second, current_stream()>>>(
                pr, gout, lse, delta.data(), dq, row_blocks, tb.first);
        MIXMOE_CUDA_CHECK_LAUNCH("attn::backward_dq");
      });
    }
    const index_t key_blocks = (tk + attn::kWarps - 1) / attn::kWarps;
    if ((dk || dv) && b * hkv * key_blocks > 0) {
      const auto tb = attn::tile_for<T>(2 * attn::kWarps * dh, 2 * (dh + 1) + 2, "causal_attention backward");
      attn::with_chunks(dh, [&](auto chunks) {
        attn::backward_dkv<T, decltype(chunks)::value>
            <<<attn::blocks_of(b * hkv * key_blocks), attn::kThreads, tb.second, current_stream()>>>(
                pr, gout, lse, delta.data(), dk, dv, key_blocks, tb.first);
        MIXMOE_CUDA_CHECK_LAUNCH("attn::backward_dkv");
      });
    }
  }

  /// cos and sin tables (T, Dh/2) of rope for positions offset .. offset + T - 1.
  template <class T>
  static void rope_angles(T* cosv, T* sinv, index_t t, index_t dh, index_t offset, double theta) {
    const index_t half = dh / 2;
    if (t * half == 0) return;
    attn_kernels::rope_angles<<<blocks_for(t * half), 256, 0, current_stream()>>>(cosv, sinv, t, half, dh, offset,
                                                                                   theta);
    MIXMOE_CUDA_CHECK_LAUNCH("rope_angles");
  }

  /// out = rope of x (B, T, H, Dh), both contiguous, by the tables' angles (negated when inverse).
  template <class T>
  static void rope_apply(const T* x, const T* cosv, const T* sinv, T* out, index_t b, index_t t, index_t h,
                         index_t dh, bool inverse) {
    const index_t half = dh / 2, pairs = b * t * h * half;
    if (pairs == 0) return;
    attn_kernels::rope_rotate<<<blocks_for(pairs), 256, 0, current_stream()>>>(x, cosv, sinv, out, pairs, t, h, half,
                                                                                inverse ? T(-1) : T(1));
    MIXMOE_CUDA_CHECK_LAUNCH("rope_rotate");
  }

  /// y (R, F, 2) = rfft of the rows of x (R, N), both contiguous.
  template <class T>
  static void fft_rfft_rows(const T* x, T* y, index_t rows, index_t n) {
    rfft_rows(x, y, rows, n);
  }

  /// gx (R, N) = the adjoint of rfft applied to g (R, F, 2); both contiguous.
  template <class T>
  static void fft_rfft_adjoint(const T* g, T* gx, index_t rows, index_t n) {
    const index_t f = n / 2 + 1;
    if (rows == 0 || n == 0) return;
    auto z = Tensor<T, Cuda>::empty(Shape{rows, f, 2});  // c2r overwrites its input: a scratch spectrum
    attn_kernels::rfft_adjoint_spectrum<<<blocks_for(rows * f), 256, 0, current_stream()>>>(g, z.data(), rows, f, n);
    MIXMOE_CUDA_CHECK_LAUNCH("rfft_adjoint_spectrum");
    c2r_rows(z.data(), gx, rows, n);
  }

  /// m (count) = sqrt(re^2 + im^2 + eps) of the spectrum (count, 2).
  template <class T>
  static void fft_magnitude(const T* spec, T* m, index_t count, T eps) {
    if (count == 0) return;
    kernels::magnitude<<<blocks_for(count), 256, 0, current_stream()>>>(spec, m, count, eps);
    MIXMOE_CUDA_CHECK_LAUNCH("magnitude");
  }

  /// gx (R, N) from g (R, F) = dL/dm of fft_magnitude, with the forward's spectrum (R, F, 2) and
  /// magnitude (R, F); all contiguous.
  template <class T>
  static void fft_magnitude_adjoint(const T* g, const T* spec, const T* m, T* gx, index_t rows, index_t n) {
    const index_t f = n / 2 + 1;
    if (rows == 0 || n == 0) return;
    auto z = Tensor<T, Cuda>::empty(Shape{rows, f, 2});
    kernels::magnitude_adjoint_spectrum<<<blocks_for(rows * f), 256, 0, current_stream()>>>(g, spec, m, z.data(), rows,
                                                                                            f, n);
    MIXMOE_CUDA_CHECK_LAUNCH("magnitude_adjoint_spectrum");
    c2r_rows(z.data(), gx, rows, n);
  }
};

}  // namespace mixmoe::cuda
