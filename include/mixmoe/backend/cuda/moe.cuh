// The moe part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): the dispatch plan (assignments sorted
// by expert) computed on the device, the row gather / weighted combine of moe/dispatch.hpp and their
// backwards, the routers' index kernels, the auxiliary losses' kernels, and a grouped GEMM.
//
//   M assignments (token -> expert pairs), N tokens, E experts, C channels, M' kept rows
//
//   moe_plan_count     keys = expert * N + token per assignment, radix-sorted (stable: ties keep the
//                      assignment order) with their assignment ids; per expert its routed count, its
//                      start in the sorted list and the kept rows' offsets (capacity applied), all in
//                      device memory: [first bad assignment, routed (E), offsets (E + 1), starts (E)]
//                      (moe/dispatch.hpp reads the first 2 + 2E back only when it needs them)
//   moe_plan_place     the kept rows (order, sorted_token) and per token its rows (token_offsets,
//                      token_rows: a second stable sort, by token, of the row numbers)
//   moe_gather_rows    out[r] = x[index[r]]                   (dispatch_by_expert, gate gather)
//   moe_dispatch_backward  gx[t] += sum of g over t's rows in token_rows order (no atomics)
//   moe_scatter_unique_add gx[index[r]] += g[r] for DISTINCT indices (no two threads share an output)
//   moe_combine        out[t] = sum over t's rows r (token_rows order) of gate[r] y[r]
//   moe_combine_backward_y / _gate   dy[r] += gate[r] dout[token[r]];  dgate[r] += <y[r], dout[token[r]]>
//   grouped_gemm       for every expert e: C[rows of e] (+)= A[rows of e] op(B_e), the row offsets in
//                      device memory (no host synchronisation to launch it)
//   grouped_gemm_wgrad for every expert e: dW_e += dY[rows of e]^T A[rows of e] (the weight gradient)
//                      Both: the SIMT kernels of grouped_gemm_kernels.cuh (fp32 / fp64 FMAs); its
//                      tensor-core kernels for bf16 operands, and for float ones when TF32 is
//                      allowed (cuda::set_allow_tf32), where they can run
//                      (cuda::set_grouped_gemm_tensor_cores chooses)
//
// Every output element is owned by one thread (or one warp / block) that adds its terms in a fixed
// order: the results do not depend on the launch, and the only integer atomic (the first bad
// assignment, atomicMin) gives the same value whatever the order.
#pragma once

#include <cuda_bf16.h>
#include <cub/device/device_radix_sort.cuh>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "mixmoe/backend/cuda/allocator.cuh"
#include "mixmoe/backend/cuda/blas.cuh"
#include "mixmoe/backend/cuda/grouped_gemm_kernels.cuh"
#include "mixmoe/backend/cuda/ops.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace moe_detail {

/// Device scratch memory from the caching allocator, returned when the object goes out of scope
/// (stream-ordered reuse makes that safe while kernels that use it are still queued).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes > 0 ? bytes : 1) {
    p_ = CachingDeviceAllocator::instance().allocate(bytes_);
  }
  ~DeviceBuffer() { CachingDeviceAllocator::instance().deallocate(p_, bytes_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class U>
  [[nodiscard]] U* as() const {
    return static_cast<U*>(p_);
  }

 private:
  std::size_t bytes_ = 0;
  void* p_ = nullptr;
};

/// The number of low bits that hold every value in [0, max_value].
inline int bits_for(unsigned long long max_value) {
  int bits = 1;
  while (bits < 64 && (1ULL << bits) <= max_value) ++bits;
  return bits;
}

inline int to_int_items(index_t n, const char* what) {
  MIXMOE_CHECK(n >= 0 && n <= 0x7fffffff, what, n, " items do not fit the sort's int count");
  return static_cast<int>(n);
}

/// Grid of one 256-thread block per `rows` (capped; the kernels loop over the rest).
inline unsigned row_blocks(index_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows > 65535LL * 32 ? 65535LL * 32 : rows));
}

}  // namespace moe_detail

namespace kernels {

inline constexpr int kMoEThreads = 256;
static_assert(kMoEThreads == kRowThreads, "the MoE kernels reduce with block_sum (ops.cuh), made for kRowThreads");

static_assert(kGemmThreads == kMoEThreads, "block_inclusive_scan (grouped_gemm_kernels.cuh) runs kMoEThreads");

/// The first position p in [0, m) with sorted[p] >= key (m when none).
template <class K>
__device__ inline index_t moe_lower_bound(const K* sorted, index_t m, K key) {
  index_t lo = 0, hi = m;
  while (lo < hi) {
    const index_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// ---- dispatch plan ------------------------------------------------------------------------------

/// keys[i] = expert[i] * n + token[i] (an out-of-range pair gets e * n, after every valid key, and
/// records its assignment in *first_bad), ids[i] = i.
template <int = 0>
__global__ void moe_plan_keys(const Index* token, const Index* expert, index_t m, index_t n, index_t e,
                              unsigned long long* keys, Index* ids, unsigned long long* first_bad) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < m;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = token[i], x = expert[i];
    const bool ok = t >= 0 && t < n && x >= 0 && x < e;
    keys[i] = ok ? static_cast<unsigned long long>(x) * static_cast<unsigned long long>(n) +
                       static_cast<unsigned long long>(t)
                 : static_cast<unsigned long long>(e) * static_cast<unsigned long long>(n);
    ids[i] = static_cast<Index>(i);
    if (!ok) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

/// One block of kMoEThreads. meta (2 + 3E): [0] first bad assignment (set before), [1, 1+E) routed,
/// [1+E, 2+2E) offsets of the kept rows, [2+2E, 2+3E) start of each expert in the sorted keys.
template <int = 0>
__global__ void moe_plan_offsets(const unsigned long long* sorted_keys, index_t m, index_t n, index_t e,
                                 index_t capacity, long long* meta) {
  long long carry = 0;
  for (index_t base = 0; base < e; base += kMoEThreads) {
    const index_t x = base + threadIdx.x;
    long long kept = 0;
    if (x < e) {
      const index_t lo = moe_lower_bound(sorted_keys, m, static_cast<unsigned long long>(x) * n);
      const index_t hi = moe_lower_bound(sorted_keys, m, static_cast<unsigned long long>(x + 1) * n);
      const index_t routed = hi - lo;
      kept = capacity > 0 && routed > capacity ? capacity : routed;
      meta[1 + x] = routed;
      meta[2 + 2 * e + x] = lo;
    }
    long long total = 0;
    const long long incl = block_inclusive_scan(kept, &total);
    if (x < e) meta[1 + e + x] = carry + incl - kept;
    carry += total;
  }
  if (threadIdx.x == 0) meta[1 + 2 * e] = carry;
}

/// Sorted position p -> kept row r = offsets[x] + (p - start[x]) when its rank in expert x is below
/// the kept count; tok_keys[r] and row_ids[r] feed the sort by token.
template <int = 0>
__global__ void moe_plan_rows(const unsigned long long* sorted_keys, const Index* sorted_ids, const long long* meta,
                              index_t m, index_t n, index_t e, index_t rows, Index* order, Index* sorted_token,
                              unsigned* tok_keys, Index* row_ids) {
  const unsigned long long end = static_cast<unsigned long long>(e) * n;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < m;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const unsigned long long key = sorted_keys[p];
    if (key >= end) {
      // An out-of-range assignment (sorted after every valid key). Only a dropless plan gets here
      // (capacity mode refuses it on the host first), where row r = p: keep the row harmless (token
      // 0, no expert's range) so the layer runs to its NaN-poisoned combine instead of reading wild.
      if (p < rows) {
        order[p] = sorted_ids[p];
        sorted_token[p] = 0;
        tok_keys[p] = 0u;
        row_ids[p] = static_cast<Index>(p);
      }
      continue;
    }
    const index_t x = static_cast<index_t>(key / static_cast<unsigned long long>(n));
    const index_t t = static_cast<index_t>(key % static_cast<unsigned long long>(n));
    const index_t rank = p - meta[2 + 2 * e + x];
    const index_t lo = meta[1 + e + x], hi = meta[2 + e + x];
    if (rank >= hi - lo) continue;  // over capacity: dropped
    const index_t r = lo + rank;
    order[r] = sorted_ids[p];
    sorted_token[r] = static_cast<Index>(t);
    tok_keys[r] = static_cast<unsigned>(t);
    row_ids[r] = static_cast<Index>(r);
  }
}

/// token_offsets[t] = the first row of token t in the rows sorted by token (t in [0, n]).
template <int = 0>
__global__ void moe_token_offsets(const unsigned* sorted_tok, index_t rows, index_t n, Index* token_offsets) {
  for (index_t t = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; t <= n;
       t += static_cast<index_t>(gridDim.x) * blockDim.x)
    token_offsets[t] = static_cast<Index>(moe_lower_bound(sorted_tok, rows, static_cast<unsigned>(t)));
}

// ---- gathers and the weighted combine -------------------------------------------------------------

/// out[r, :] = x[index[r], :], r < rows, C channels.
template <class T>
__global__ void moe_gather_rows(const T* x, const Index* index, index_t rows, index_t c, T* out) {
  const index_t total = rows * c;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / c, j = i % c;
    out[i] = x[static_cast<index_t>(index[r]) * c + j];
  }
}

/// gx[index[r], :] += g[r, :]: the indices are distinct, so every output has one writer.
template <class T>
__global__ void moe_scatter_unique_add(const T* g, const Index* index, index_t rows, index_t c, T* gx) {
  const index_t total = rows * c;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / c, j = i % c;
    gx[static_cast<index_t>(index[r]) * c + j] += g[i];
  }
}

/// gx[t, j] += g[row, j] over token t's rows in token_rows order (the CPU's order: ascending rows).
template <class T>
__global__ void moe_dispatch_backward(const T* g, const Index* token_offsets, const Index* token_rows, index_t n,
                                      index_t c, T* gx) {
  const index_t total = n * c;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = i / c, j = i % c;
    T acc = gx[i];
    for (Index q = token_offsets[t]; q < token_offsets[t + 1]; ++q)
      acc += g[static_cast<index_t>(token_rows[q]) * c + j];
    gx[i] = acc;
  }
}

/// One block per token (grid-stride over tokens), threads over channels: out[t, j] = sum over t's
/// rows r, in token_rows order, of gate[r] * y[r, j]; NaN everywhere when *poison >= 0 (a plan
/// with an out-of-range assignment; poison may be null).
template <class T>
__global__ void moe_combine(const T* y, const T* gate, const Index* token_offsets, const Index* token_rows, index_t n,
                            index_t c, const long long* poison, T* out) {
  if (poison != nullptr && *poison >= 0) {
    for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n * c;
         i += static_cast<index_t>(gridDim.x) * blockDim.x)
      out[i] = T(NAN);
    return;
  }
  for (index_t t = blockIdx.x; t < n; t += gridDim.x) {
    const Index q0 = token_offsets[t], q1 = token_offsets[t + 1];
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
      T acc = T(0);
      for (Index q = q0; q < q1; ++q) {
        const index_t r = token_rows[q];
        acc += gate[r] * y[r * c + j];
      }
      out[t * c + j] = acc;
    }
  }
}

/// gy[r, j] += gate[r] * g[token[r], j].
template <class T>
__global__ void moe_combine_backward_y(const T* g, const T* gate, const Index* sorted_token, index_t rows, index_t c,
                                       T* gy) {
  const index_t total = rows * c;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = i / c, j = i % c;
    gy[i] += gate[r] * g[static_cast<index_t>(sorted_token[r]) * c + j];
  }
}

/// One warp per sorted row: gg[r] += <y[r], g[token[r]]>, summed in double.
template <class T>
__global__ void moe_combine_backward_gate(const T* g, const T* y, const Index* sorted_token, index_t rows, index_t c,
                                          T* gg) {
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (index_t r = blockIdx.x * static_cast<index_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T* src = g + static_cast<index_t>(sorted_token[r]) * c;
    const T* yr = y + r * c;
    double acc = 0;
    for (index_t j = lane; j < c; j += 32) acc += static_cast<double>(yr[j]) * static_cast<double>(src[j]);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) gg[r] += static_cast<T>(acc);
  }
}

// ---- routers ------------------------------------------------------------------------------------

/// out[i] = i / k: each of total / k rows repeated k times.
template <int = 0>
__global__ void moe_iota_div(Index* out, index_t total, index_t k) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<Index>(i / k);
}

/// out[i] = in[i] * mul + add.
template <int = 0>
__global__ void moe_affine_index(const Index* in, index_t n, index_t bound, index_t mul, index_t add, Index* out) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t v = in[i];
    out[i] = static_cast<Index>((v >= 0 && v < bound ? v : 0) * mul + add);
  }
}

/// Hash routing, one thread per row: experts_of(id, expert + i k) and probs[i, expert] = share; an id
/// outside [0, vocab) (vocab 0: no upper bound) records its row in *first_bad and gets expert e
/// (out of range: the layer's dispatch plan then makes its output NaN) and no probabilities.
template <class T, class F>
__global__ void moe_hash_route(const Index* ids, index_t n, index_t k, index_t e, index_t vocab, F experts_of,
                               Index* expert, T* probs, T share, unsigned long long* first_bad) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const Index id = ids[i];
    if (id < 0 || (vocab > 0 && id >= vocab)) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
      for (index_t j = 0; j < k; ++j) expert[i * k + j] = static_cast<Index>(e);
      continue;
    }
    Index* out = expert + i * k;
    experts_of(id, out);
    for (index_t j = 0; j < k; ++j) probs[i * e + out[j]] = share;
  }
}

// ---- auxiliary losses ---------------------------------------------------------------------------

/// One block per expert x: f[x] = (assignments with expert x) / m; NaN when any expert id is out of
/// range (the loss then shows it without a host synchronisation).
template <class T>
__global__ void moe_expert_fractions(const Index* expert, index_t m, index_t e, T* f) {
  for (index_t x = blockIdx.x; x < e; x += gridDim.x) {
    double hits = 0, bad = 0;
    for (index_t i = threadIdx.x; i < m; i += blockDim.x) {
      const Index v = expert[i];
      hits += v == x ? 1.0 : 0.0;
      bad += (v < 0 || v >= e) ? 1.0 : 0.0;
    }
    hits = block_sum(hits);  // exact: integers far below 2^53
    bad = block_sum(bad);
    if (threadIdx.x == 0) {
      const T count = static_cast<T>(hits);
      f[x] = bad > 0 ? static_cast<T>(NAN) : (m > 0 ? count / static_cast<T>(m) : T(0));
    }
  }
}

/// One warp per row of logits (n, e): z[t] = logsumexp(l[t, :]) in double.
template <class T>
__global__ void moe_logsumexp_rows(const T* l, index_t n, index_t e, double* z) {
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (index_t t = blockIdx.x * static_cast<index_t>(blockDim.x / 32) + threadIdx.x / 32; t < n; t += warps) {
    const T* row = l + t * e;
    double mx = -INFINITY;
    for (index_t j = lane; j < e; j += 32) mx = ::fmax(mx, static_cast<double>(row[j]));
    for (int o = 16; o > 0; o /= 2) mx = ::fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    double s = 0;
    for (index_t j = lane; j < e; j += 32) s += ::exp(static_cast<double>(row[j]) - mx);
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) z[t] = mx + ::log(s);
  }
}

/// One block: out[0] = mean of z^2 (double sums in a fixed order).
template <class T>
__global__ void moe_mean_square(const double* z, index_t n, T* out) {
  double s = 0;
  for (index_t t = threadIdx.x; t < n; t += blockDim.x) s += z[t] * z[t];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = static_cast<T>(s / static_cast<double>(n));
}

/// gl[t, j] += (2 g / n) z[t] softmax(l)[t, j], g = *grad_out read on the device.
template <class T>
__global__ void moe_z_loss_backward(const T* l, const double* z, const T* grad_out, index_t n, index_t e, T* gl) {
  const double g = static_cast<double>(grad_out[0]) * 2.0 / static_cast<double>(n);
  const index_t total = n * e;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const double zt = z[i / e];
    gl[i] += static_cast<T>(g * zt * ::exp(static_cast<double>(l[i]) - zt));
  }
}

}  // namespace kernels

// ---- grouped GEMM (the kernels: grouped_gemm_kernels.cuh) -------------------------------------------

namespace moe_detail {
/// -1: tensor cores where they can run; 0: off; 1: on.
inline std::atomic<int>& tensor_core_setting() {
  static std::atomic<int> s{-1};
  return s;
}
/// Whether the tensor-core kernels can run here: a device of compute capability 8.0 or newer, and
/// kernels built for it (code compiled only for an older architecture has empty bodies, which the
/// driver would run on a new GPU as they are).
inline bool tensor_cores_usable() {
  static const bool usable = [] {
    int dev = 0, major = 0;
    MIXMOE_CUDA_CHECK(cudaGetDevice(&dev));
    MIXMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 8) return false;
    for (const void* f : {reinterpret_cast<const void*>(&kernels::grouped_gemm_tc<__nv_bfloat16>),
                          reinterpret_cast<const void*>(&kernels::grouped_gemm_tc<float>),
                          reinterpret_cast<const void*>(&kernels::grouped_gemm_wgrad_tc<__nv_bfloat16>),
                          reinterpret_cast<const void*>(&kernels::grouped_gemm_wgrad_tc<float>)}) {
      cudaFuncAttributes attr{};
      MIXMOE_CUDA_CHECK(cudaFuncGetAttributes(&attr, f));
      if (attr.ptxVersion < 80 || attr.binaryVersion < 80) return false;
    }
    return true;
  }();
  return usable;
}
}  // namespace moe_detail

/// Whether the grouped GEMMs of the MoE experts (forward and both gradients) run on the tensor cores
/// (grouped_gemm_kernels.cuh) for bf16 operands, and for float operands when set_allow_tf32 allows
/// TF32, rather than on the SIMT kernels. By default: where they can run (a device of compute
/// capability 8.0 or newer, code built for one).
inline bool grouped_gemm_tensor_cores() {
  const int s = moe_detail::tensor_core_setting().load(std::memory_order_relaxed);
  return s < 0 ? moe_detail::tensor_cores_usable() : s == 1;
}

/// Chooses the grouped GEMM kernels for the whole process (a comparison, a benchmark). Turning the
/// tensor cores on where they cannot run throws mixmoe::Error.
inline void set_grouped_gemm_tensor_cores(bool on) {
  MIXMOE_CHECK(!on || moe_detail::tensor_cores_usable(), "cuda::set_grouped_gemm_tensor_cores",
               "the tensor-core kernels cannot run here (a device of compute capability 8.0 or newer and code "
               "built for it are needed: CMAKE_CUDA_ARCHITECTURES 80 or more)");
  moe_detail::tensor_core_setting().store(on ? 1 : 0, std::memory_order_relaxed);
}

namespace moe_detail {
/// Whether grouped GEMMs of TIn operands take the tensor-core kernels now.
template <class TIn>
bool use_tensor_cores() {
  if constexpr (std::is_same_v<TIn, __nv_bfloat16>)
    return grouped_gemm_tensor_cores();
  else if constexpr (std::is_same_v<TIn, float>)
    return allow_tf32() && grouped_gemm_tensor_cores();
  else
    return false;
}
}  // namespace moe_detail

/// For every expert x in [0, e): C[r, :] (+)= A[r, :] op(B_x) for the rows r in
/// [offsets[x], offsets[x + 1]) (clamped to [0, m)). A (m, k) row-major with leading dimension lda;
/// B_x = b + x * stride_b, (k, n) with leading dimension ldb, or (n, k) when trans_b; C (m, n), ldc.
/// offsets (e + 1) is DEVICE memory, non-decreasing: nothing is read back, the grid covers the
/// ceil(m / 64) + e row tiles an expert-aligned tiling can need. Rows outside every expert's range
/// are not written. TIn float, double or __nv_bfloat16 (then Acc = float: fp32 accumulation).
template <class TIn, class Acc>
void grouped_gemm(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const TIn* a, index_t lda,
                  const TIn* b, index_t ldb, index_t stride_b, bool trans_b, Acc* c, index_t ldc,
                  bool accumulate = false) {
  static_assert((std::is_same_v<TIn, float> && std::is_same_v<Acc, float>) ||
                    (std::is_same_v<TIn, double> && std::is_same_v<Acc, double>) ||
                    (std::is_same_v<TIn, __nv_bfloat16> && std::is_same_v<Acc, float>),
                "cuda::grouped_gemm: float, double, or bf16 inputs with a float result");
  MIXMOE_CHECK(m >= 0 && n >= 0 && k >= 0 && e >= 0, "cuda::grouped_gemm", "negative size m ", m, ", n ", n, ", k ", k,
               ", e ", e);
  if (m == 0 || n == 0 || e == 0) return;
  moe_detail::DeviceBuffer tile_start(static_cast<std::size_t>(e + 1) * sizeof(long long));
  kernels::gemm_tile_starts<<<1, kernels::kGemmThreads, 0, current_stream()>>>(offsets, e, m,
                                                                                  tile_start.as<long long>());
  MIXMOE_CUDA_CHECK_LAUNCH("gemm_tile_starts");
  const index_t tile_bound = (m + kernels::kGemmBM - 1) / kernels::kGemmBM + e;
  const index_t col_tiles = (n + kernels::kGemmBN - 1) / kernels::kGemmBN;
  MIXMOE_CHECK(col_tiles <= 0x7fffffff, "cuda::grouped_gemm", "n = ", n, " needs too many column tiles");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(tile_bound < 65535 ? tile_bound : 65535));
  if constexpr (!std::is_same_v<TIn, double>) {
    if (moe_detail::use_tensor_cores<TIn>()) {
      kernels::grouped_gemm_tc<TIn><<<grid, kernels::kTcThreads, 0, current_stream()>>>(
          m, n, k, e, offsets, tile_start.as<long long>(), tile_bound, a, lda, b, ldb, stride_b, trans_b, c, ldc,
          accumulate);
      MIXMOE_CUDA_CHECK_LAUNCH("grouped_gemm_tc");
      return;
    }
  }
  kernels::grouped_gemm_tiles<TIn, Acc>
      <<<grid, kernels::kMoEThreads, 0, current_stream()>>>(m, n, k, e, offsets, tile_start.as<long long>(), tile_bound,
                                                            a, lda, b, ldb, stride_b, trans_b, c, ldc, accumulate);
  MIXMOE_CUDA_CHECK_LAUNCH("grouped_gemm_tiles");
}

/// dw (e, n, k) += for every expert x: dy[rows of x]^T a[rows of x], dy (m, n) and a (m, k) row-major,
/// the rows [offsets[x], offsets[x + 1]) (clamped to [0, m)) read from DEVICE memory: no synchronisation.
/// TIn = T (float or double), or __nv_bfloat16 operands with a float dw (fp32 accumulation).
template <class TIn, class T>
void grouped_gemm_wgrad(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const TIn* dy, const TIn* a,
                        T* dw) {
  static_assert((std::is_same_v<TIn, T> && (std::is_same_v<T, float> || std::is_same_v<T, double>)) ||
                    (std::is_same_v<TIn, __nv_bfloat16> && std::is_same_v<T, float>),
                "cuda::grouped_gemm_wgrad: float, double, or bf16 operands with a float result");
  MIXMOE_CHECK(m >= 0 && n >= 0 && k >= 0 && e >= 0, "cuda::grouped_gemm_wgrad", "negative size m ", m, ", n ", n,
               ", k ", k, ", e ", e);
  if (m == 0 || n == 0 || k == 0 || e == 0) return;
  const index_t col_tiles = (k + kernels::kGemmBN - 1) / kernels::kGemmBN;
  const index_t row_tiles = (n + kernels::kGemmBM - 1) / kernels::kGemmBM;
  MIXMOE_CHECK(col_tiles <= 0x7fffffff && row_tiles <= 65535 && e <= 65535, "cuda::grouped_gemm_wgrad", "n = ", n,
               ", k = ", k, ", e = ", e, " exceed the launch grid");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles), static_cast<unsigned>(e));
  if constexpr (!std::is_same_v<TIn, double>) {
    if (moe_detail::use_tensor_cores<TIn>()) {
      kernels::grouped_gemm_wgrad_tc<TIn>
          <<<grid, kernels::kTcThreads, 0, current_stream()>>>(m, n, k, offsets, dy, a, dw);
      MIXMOE_CUDA_CHECK_LAUNCH("grouped_gemm_wgrad_tc");
      return;
    }
  }
  kernels::grouped_gemm_wgrad_tiles<TIn, T>
      <<<grid, kernels::kMoEThreads, 0, current_stream()>>>(m, n, k, offsets, dy, a, dw);
  MIXMOE_CUDA_CHECK_LAUNCH("grouped_gemm_wgrad_tiles");
}

/// The moe part of DeviceOps<Cuda> (backend/cuda/cuda.cuh). Every name starts with moe_.
struct MoEOps {
  /// Sorts the M assignments by (expert, token, assignment) and sizes the plan. keys_sorted and
  /// ids_sorted (M) and meta (2 + 3E) are device buffers the caller keeps for moe_plan_place;
  /// meta gets [first bad assignment or -1, routed (E), offsets (E + 1), starts (E)]. Nothing is
  /// read back here: the caller copies meta's head to the host when it needs the counts.
  static void moe_plan_count(const Index* token, const Index* expert, index_t m, index_t n, index_t e, index_t capacity,
                             std::int64_t* keys_sorted, Index* ids_sorted, std::int64_t* meta) {
    cudaStream_t s = current_stream();
    auto* meta_ll = reinterpret_cast<long long*>(meta);
    MIXMOE_CUDA_CHECK(cudaMemsetAsync(meta_ll, 0xff, sizeof(long long), s));  // first bad = -1 (all ones)
    auto* sorted = reinterpret_cast<unsigned long long*>(keys_sorted);
    if (m > 0) {
      const int items = moe_detail::to_int_items(m, "moe_plan_count");
      moe_detail::DeviceBuffer keys(static_cast<std::size_t>(m) * sizeof(unsigned long long));
      moe_detail::DeviceBuffer ids(static_cast<std::size_t>(m) * sizeof(Index));
      kernels::moe_plan_keys<<<blocks_for(m), 256, 0, s>>>(token, expert, m, n, e, keys.as<unsigned long long>(),
                                                           ids.as<Index>(),
                                                           reinterpret_cast<unsigned long long*>(meta_ll));
      MIXMOE_CUDA_CHECK_LAUNCH("moe_plan_keys");
      const int bits = moe_detail::bits_for(static_cast<unsigned long long>(e) * static_cast<unsigned long long>(n));
      std::size_t temp_bytes = 0;
      MIXMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.as<unsigned long long>(), sorted,
                                                        ids.as<Index>(), ids_sorted, items, 0, bits, s));
      moe_detail::DeviceBuffer temp(temp_bytes);
      MIXMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.as<void>(), temp_bytes, keys.as<unsigned long long>(),
                                                        sorted, ids.as<Index>(), ids_sorted, items, 0, bits, s));
    }
    if (e > 0) {
      kernels::moe_plan_offsets<<<1, kernels::kMoEThreads, 0, s>>>(sorted, m, n, e, capacity, meta_ll);
      MIXMOE_CUDA_CHECK_LAUNCH("moe_plan_offsets");
    }
  }

  /// Writes the plan's rows (after moe_plan_count): order and sorted_token (rows), token_offsets
  /// (n + 1), token_rows (rows). rows is the kept count (capacity mode, read on the host after its
  /// range check) or m (dropless: out-of-range assignments become harmless tail rows).
  static void moe_plan_place(const std::int64_t* keys_sorted, const Index* ids_sorted, const std::int64_t* meta,
                             index_t m, index_t n, index_t e, index_t rows, Index* order, Index* sorted_token,
                             Index* token_offsets, Index* token_rows) {
    cudaStream_t s = current_stream();
    if (rows == 0) {
      mixmoe::detail::DeviceBackend<Cuda>::fill(token_offsets, n + 1, Index(0));
      return;
    }
    moe_detail::DeviceBuffer tok_keys(static_cast<std::size_t>(rows) * sizeof(unsigned));
    moe_detail::DeviceBuffer tok_sorted(static_cast<std::size_t>(rows) * sizeof(unsigned));
    moe_detail::DeviceBuffer row_ids(static_cast<std::size_t>(rows) * sizeof(Index));
    kernels::moe_plan_rows<<<blocks_for(m), 256, 0, s>>>(
        reinterpret_cast<const unsigned long long*>(keys_sorted), ids_sorted, reinterpret_cast<const long long*>(meta),
        m, n, e, rows, order, sorted_token, tok_keys.as<unsigned>(), row_ids.as<Index>());
    MIXMOE_CUDA_CHECK_LAUNCH("moe_plan_rows");
    // Rows grouped by token, ascending within a token: a stable sort of the row numbers by token.
    const int items = moe_detail::to_int_items(rows, "moe_plan_place");
    const int bits = moe_detail::bits_for(static_cast<unsigned long long>(n));
    std::size_t temp_bytes = 0;
    MIXMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, tok_keys.as<unsigned>(),
                                                      tok_sorted.as<unsigned>(), row_ids.as<Index>(), token_rows, items,
                                                      0, bits, s));
    moe_detail::DeviceBuffer temp(temp_bytes);
    MIXMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.as<void>(), temp_bytes, tok_keys.as<unsigned>(),
                                                      tok_sorted.as<unsigned>(), row_ids.as<Index>(), token_rows, items,
                                                      0, bits, s));
    kernels::moe_token_offsets<<<blocks_for(n + 1), 256, 0, s>>>(tok_sorted.as<unsigned>(), rows, n, token_offsets);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_token_offsets");
  }

  /// out (rows, c) = x[index[r], :].
  template <class T>
  static void moe_gather_rows(const T* x, const Index* index, index_t rows, index_t c, T* out) {
    if (rows * c == 0) return;
    kernels::moe_gather_rows<<<blocks_for(rows * c), 256, 0, current_stream()>>>(x, index, rows, c, out);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_gather_rows");
  }

  /// gx[index[r], :] += g[r, :] for DISTINCT indices.
  template <class T>
  static void moe_scatter_unique_add(const T* g, const Index* index, index_t rows, index_t c, T* gx) {
    if (rows * c == 0) return;
    kernels::moe_scatter_unique_add<<<blocks_for(rows * c), 256, 0, current_stream()>>>(g, index, rows, c, gx);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_scatter_unique_add");
  }

  /// gx (n, c) += the sum of g's rows of each token (token_offsets / token_rows of a plan).
  template <class T>
  static void moe_dispatch_backward(const T* g, const Index* token_offsets, const Index* token_rows, index_t n,
                                    index_t c, T* gx) {
    if (n * c == 0) return;
    kernels::moe_dispatch_backward<<<blocks_for(n * c), 256, 0, current_stream()>>>(g, token_offsets, token_rows, n, c,
                                                                                    gx);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_dispatch_backward");
  }

  /// out (n, c) = per token, the gate-weighted sum of its rows of y; all NaN when poison (device
  /// memory, may be null) holds a first bad assignment >= 0.
  template <class T>
  static void moe_combine(const T* y, const T* gate, const Index* token_offsets, const Index* token_rows, index_t n,
                          index_t c, const std::int64_t* poison, T* out) {
    if (n * c == 0) return;
    kernels::moe_combine<<<moe_detail::row_blocks(n), kernels::kMoEThreads, 0, current_stream()>>>(
        y, gate, token_offsets, token_rows, n, c, reinterpret_cast<const long long*>(poison), out);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_combine");
  }

  template <class T>
  static void moe_combine_backward_y(const T* g, const T* gate, const Index* sorted_token, index_t rows, index_t c,
                                     T* gy) {
    if (rows * c == 0) return;
    kernels::moe_combine_backward_y<<<blocks_for(rows * c), 256, 0, current_stream()>>>(g, gate, sorted_token, rows, c,
                                                                                        gy);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_combine_backward_y");
  }

  template <class T>
  static void moe_combine_backward_gate(const T* g, const T* y, const Index* sorted_token, index_t rows, index_t c,
                                        T* gg) {
    if (rows == 0) return;
    kernels::moe_combine_backward_gate<<<blocks_for(rows * 32), 256, 0, current_stream()>>>(g, y, sorted_token, rows, c,
                                                                                            gg);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_combine_backward_gate");
  }

  /// out (total) = i / k.
  static void moe_iota_div(Index* out, index_t total, index_t k) {
    if (total == 0) return;
    kernels::moe_iota_div<<<blocks_for(total), 256, 0, current_stream()>>>(out, total, k);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_iota_div");
  }

  /// out (n) = in * mul + add, an in outside [0, bound) taken as 0 (its layer's output is NaN anyway:
  /// the dispatch plan of the same routing poisons it), so the result is always a valid index.
  static void moe_affine_index(const Index* in, index_t n, index_t bound, index_t mul, index_t add, Index* out) {
    if (n == 0) return;
    kernels::moe_affine_index<<<blocks_for(n), 256, 0, current_stream()>>>(in, n, bound, mul, add, out);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_affine_index");
  }

  /// Hash routing of n ids (k experts each through experts_of, probs (n, e) zero-filled before).
  /// Nothing waits: the ids are checked on the device and the first row with one out of range is
  /// reported by the next synchronisation, as the error message(row, id) (a deferred check,
  /// runtime.cuh).
  template <class T, class F>
  static void moe_hash_route(const Index* ids, index_t n, index_t k, index_t e, index_t vocab, F experts_of,
                             Index* expert, T* probs, T share, detail::DeferredChecks::Message message) {
    if (n == 0) return;
    moe_detail::DeviceBuffer flag(sizeof(unsigned long long));
    MIXMOE_CUDA_CHECK(cudaMemsetAsync(flag.as<void>(), 0xff, sizeof(unsigned long long), current_stream()));
    kernels::moe_hash_route<<<blocks_for(n), 256, 0, current_stream()>>>(ids, n, k, e, vocab, experts_of, expert, probs,
                                                                         share, flag.as<unsigned long long>());
    MIXMOE_CUDA_CHECK_LAUNCH("moe_hash_route");
    // the flag's all-ones means "none": read as a signed position it is -1
    detail::DeferredChecks::instance().enqueue(flag.as<long long>(), n, ids, std::move(message));
  }

  /// f (e) = assignments per expert / m (NaN everywhere when an expert id is out of range).
  template <class T>
  static void moe_expert_fractions(const Index* expert, index_t m, index_t e, T* f) {
    if (e == 0) return;
    kernels::moe_expert_fractions<<<moe_detail::row_blocks(e), kernels::kMoEThreads, 0, current_stream()>>>(expert, m,
                                                                                                            e, f);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_expert_fractions");
  }

  /// z (n) = logsumexp of each row of l (n, e), in double; out[0] = mean of z^2.
  template <class T>
  static void moe_z_loss(const T* l, index_t n, index_t e, double* z, T* out) {
    if (n == 0) return;
    kernels::moe_logsumexp_rows<<<blocks_for(n * 32), 256, 0, current_stream()>>>(l, n, e, z);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_logsumexp_rows");
    kernels::moe_mean_square<<<1, kernels::kRowThreads, 0, current_stream()>>>(z, n, out);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_mean_square");
  }

  /// gl (n, e) += (2 g / n) z softmax(l), g = grad_out[0] (device memory).
  template <class T>
  static void moe_z_loss_backward(const T* l, const double* z, const T* grad_out, index_t n, index_t e, T* gl) {
    if (n * e == 0) return;
    kernels::moe_z_loss_backward<<<blocks_for(n * e), 256, 0, current_stream()>>>(l, z, grad_out, n, e, gl);
    MIXMOE_CUDA_CHECK_LAUNCH("moe_z_loss_backward");
  }

  /// cuda::grouped_gemm for float or double (see there).
  template <class T>
  static void moe_grouped_gemm(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const T* a,
                               index_t lda, const T* b, index_t ldb, index_t stride_b, bool trans_b, T* c, index_t ldc,
                               bool accumulate) {
    grouped_gemm<T, T>(m, n, k, e, offsets, a, lda, b, ldb, stride_b, trans_b, c, ldc, accumulate);
  }

  /// cuda::grouped_gemm_wgrad (see there).
  template <class T>
  static void moe_grouped_gemm_wgrad(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const T* dy,
                                     const T* a, T* dw) {
    grouped_gemm_wgrad<T, T>(m, n, k, e, offsets, dy, a, dw);
  }

  /// The weight gradient with dy (m, n) and a (m, k) rounded to bf16 first, fp32 accumulation.
  static void moe_grouped_gemm_wgrad_bf16(index_t m, index_t n, index_t k, index_t e, const index_t* offsets,
                                          const float* dy, const float* a, float* dw) {
    if (m == 0 || n == 0 || k == 0 || e == 0) return;
    moe_detail::DeviceBuffer dy16(static_cast<std::size_t>(m * n) * sizeof(__nv_bfloat16));
    moe_detail::DeviceBuffer a16(static_cast<std::size_t>(m * k) * sizeof(__nv_bfloat16));
    convert_to_bf16(dy, dy16.as<__nv_bfloat16>(), m * n);
    convert_to_bf16(a, a16.as<__nv_bfloat16>(), m * k);
    grouped_gemm_wgrad<__nv_bfloat16, float>(m, n, k, e, offsets, dy16.as<__nv_bfloat16>(), a16.as<__nv_bfloat16>(),
                                             dw);
  }

  /// The bf16 grouped GEMM on fp32 operands: A (m, k) and B (e * stride_b, contiguous) are rounded to
  /// bf16 (nearest even) first, the products accumulate in fp32.
  static void moe_grouped_gemm_bf16(index_t m, index_t n, index_t k, index_t e, const index_t* offsets, const float* a,
                                    index_t a_count, index_t lda, const float* b, index_t b_count, index_t ldb,
                                    index_t stride_b, bool trans_b, float* c, index_t ldc, bool accumulate) {
    if (m == 0 || n == 0 || e == 0) return;
    moe_detail::DeviceBuffer a16(static_cast<std::size_t>(a_count) * sizeof(__nv_bfloat16));
    moe_detail::DeviceBuffer b16(static_cast<std::size_t>(b_count) * sizeof(__nv_bfloat16));
    convert_to_bf16(a, a16.as<__nv_bfloat16>(), a_count);
    convert_to_bf16(b, b16.as<__nv_bfloat16>(), b_count);
    grouped_gemm<__nv_bfloat16, float>(m, n, k, e, offsets, a16.as<__nv_bfloat16>(), lda, b16.as<__nv_bfloat16>(), ldb,
                                       stride_b, trans_b, c, ldc, accumulate);
  }
};

}  // namespace mixmoe::cuda
