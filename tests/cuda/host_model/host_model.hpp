// A model of the parts of CUDA that backend/cuda/grouped_gemm_kernels.cuh uses, for running its
// kernels on the CPU with g++: the qualifiers, threadIdx / blockIdx / gridDim, __syncthreads,
// __shfl_up_sync (full warps meeting at a barrier), uint4 and float4, a bf16 type and WMMA's bf16 (m16n16k16) and TF32
// (m16n16k8) fragments. A launch runs the blocks one after another on one std::thread per CUDA thread, meeting at a
// std::barrier for __syncthreads; __shared__ arrays are static, so the threads of the block running share them. A
// fragment holds its whole 16 x 16 tile in every lane (each lane computes the same values; only lane 0 of a warp stores
// them). The model checks what the GPU requires: WMMA pointers aligned to 256 bits, leading dimensions that are
// multiples of 8 (16-bit elements) or 4 (floats), 16-byte vector copies aligned to 16 bytes. What it
// cannot show: the GPU's scheduling, its fragment layouts across lanes, and speed. cuda_bf16.h and
// mma.h beside this file include it, so a test puts this folder first on its include path.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace host_model {
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host model: %s\n", what);
  std::abort();
}
/// 16-byte vector copies made so far (a test can tell that a vector path ran).
inline std::atomic<long long>& vector_copies() {
  static std::atomic<long long> n{0};
  return n;
}
}  // namespace host_model

namespace host_model {
/// CUDA's 16-byte vectors (uint4, float4): an assignment checks that both sides are 16-byte
/// aligned, as the GPU requires, and counts itself.
template <class E>
struct alignas(16) Vector4 {
  E x, y, z, w;
  Vector4& operator=(const Vector4& o) {
    if (reinterpret_cast<std::uintptr_t>(this) % 16 != 0 || reinterpret_cast<std::uintptr_t>(&o) % 16 != 0)
      fail("a 16-byte vector access not aligned to 16 bytes");
    x = o.x;
    y = o.y;
    z = o.z;
    w = o.w;
    vector_copies().fetch_add(1, std::memory_order_relaxed);
    return *this;
  }
};
}  // namespace host_model

using uint4 = host_model::Vector4<unsigned>;
using float4 = host_model::Vector4<float>;
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

namespace host_model {

inline std::barrier<>*& block_barrier() {
  static std::barrier<>* b = nullptr;
  return b;
}

/// A warp's meeting point for the shuffles: every lane writes its value, all meet, each reads.
struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : meet(lanes) {}
  std::barrier<> meet;
  unsigned long long slot[32] = {};
};
inline std::vector<std::unique_ptr<Warp>>& block_warps() {
  static std::vector<std::unique_ptr<Warp>> w;
  return w;
}

/// Runs `kernel()` for every thread of every block of the 1-D-block launch (grid, threads): one
/// std::thread per CUDA thread, kept for the whole grid, running the blocks one after another.
template <class Kernel>
void launch(dim3 grid, unsigned threads, Kernel kernel) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  const auto n = static_cast<std::ptrdiff_t>(threads);
  std::barrier<> between(n);             // block boundaries
  std::optional<std::barrier<>> inside;  // __syncthreads of the block running
  const unsigned blocks = grid.x * grid.y * grid.z;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx = dim3{t, 0, 0};
      for (unsigned i = 0; i < blocks; ++i) {
        if (t == 0) {
          inside.emplace(n);
          block_barrier() = &*inside;
          block_warps().clear();
          for (unsigned w = 0; w < (threads + 31) / 32; ++w)
            block_warps().push_back(std::make_unique<Warp>(std::min<std::ptrdiff_t>(32, n - 32 * w)));
        }
        between.arrive_and_wait();  // the block's barrier is made
        blockIdx = dim3{i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
        kernel();
        block_barrier()->arrive_and_drop();  // a finished thread no longer holds the others back
        block_warps()[t / 32]->meet.arrive_and_drop();
        between.arrive_and_wait();  // every thread is done with the block
      }
    });
  for (auto& th : pool) th.join();
  block_barrier() = nullptr;
}

}  // namespace host_model

inline void __syncthreads() { host_model::block_barrier()->arrive_and_wait(); }

/// The value of lane - delta (its own below delta); every lane of the warp must call it, and the
/// model takes full masks only.
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves up to 8 bytes");
  if (mask != 0xffffffffu) host_model::fail("the model's shuffles take the full mask");
  auto& w = *host_model::block_warps()[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&w.slot[lane], &v, sizeof v);
  w.meet.arrive_and_wait();
  T r = v;
  if (lane >= delta) std::memcpy(&r, &w.slot[lane - delta], sizeof r);
  w.meet.arrive_and_wait();  // the slots are rewritten by the next shuffle
  return r;
}
