// A model of the device side of CUDA, for running the backend's kernels on the CPU with g++: the
// qualifiers, threadIdx / blockIdx / blockDim / gridDim, __syncthreads, the warp shuffles, the
// atomics the backend uses, static and dynamic __shared__ memory, uint4 / float4, __trap. With
// cuda_runtime.h, cuda_bf16.h, mma.h, cublas_v2.h, cufft.h and cub/ beside it (which include this
// file), a test puts this folder first on its include path and compiles CUDA code as C++.
//
// Execution. A launch runs its blocks one after another on the calling host thread; the threads of
// a block are fibers, each on its own stack (guard page below), switched only where a CUDA thread
// must wait for others: at __syncthreads (until every thread of the block that has not exited is
// there) and at a shuffle (until every lane its mask names is there; the values are exchanged when
// the last arrives). The scheduler goes round the threads that can run, each running until it
// waits or exits; one warp of each block (picked pseudo-randomly from the block's number and
// MIXMOE_HOST_MODEL_SEED, 1 by default; 0: none) lags, running only when no other thread can. The
// other warps thus run ahead as far as the barriers let them, so a warp that reads shared memory
// another rewrites without a __syncthreads between sees the new values (a block reduction without
// the barrier that guards its partial sums from the next call fails the tests this way). Launches
// from several host threads take turns (one at a time), which makes the atomics plain reads and
// writes.
//
// Checks, each a message and abort(): a __syncthreads that some threads of the block never reach
// while the others wait at a shuffle, or a shuffle whose mask names an exited lane or a lane
// outside the block or a lane that waits elsewhere (a deadlock on the GPU, or undefined values),
// lanes of one shuffle disagreeing on the mask, a __trap, a 16-byte vector copy not aligned to 16
// bytes. AddressSanitizer sees the fibers' stacks (the switches are announced to it).
//
// What it cannot show: the GPU's scheduling beyond the lagging warp and its memory model (a missing
// __syncthreads between a write and another thread's read is caught only when this schedule
// exposes it), warp lock-step, the real fragment layouts of WMMA across lanes, and speed.
// test_model.cpp checks the model itself.
#pragma once

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MIXMOE_HOST_MODEL_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;

namespace host_model {
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host model: %s\n", what);
  std::fflush(stderr);
  std::abort();
}
/// 16-byte vector copies made so far (a test can tell that a vector path ran).
inline std::atomic<long long>& vector_copies() {
  static std::atomic<long long> n{0};
  return n;
}

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
template <class E>
struct alignas(2 * sizeof(E)) Vector2 {
  E x, y;
};

/// float rounded to TF32 (10 stored mantissa bits), to nearest with ties away from zero, as the
/// device's conversion; NaN and infinities kept.
inline float round_tf32(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  float r = 0;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
}  // namespace host_model

using uint4 = host_model::Vector4<unsigned>;
using float4 = host_model::Vector4<float>;
using float2 = host_model::Vector2<float>;
using double2 = host_model::Vector2<double>;

// The launch running now (one at a time, see launch()): plain globals, set by the scheduler
// whenever it switches to a thread.
inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

namespace host_model {

// A fiber's saved context and the switch between two. On x86-64 (System V) a switch saves the
// callee-saved registers on the stack and swaps stack pointers (far cheaper than swapcontext,
// which asks the kernel for the signal mask at every switch); the floating-point control words
// are not switched: kernels never change them, so every fiber runs with the launching thread's.
// Elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void mixmoe_host_model_switch(void** save_sp, void* next_sp);
// In a COMDAT group of its own: every translation unit that includes this header defines it once.
asm(R"(
  .pushsection .text.mixmoe_host_model_switch,"axG",@progbits,mixmoe_host_model_switch,comdat
  .weak mixmoe_host_model_switch
  .type mixmoe_host_model_switch, @function
mixmoe_host_model_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mixmoe_host_model_switch, .-mixmoe_host_model_switch
  .popsection
)");
inline void switch_context(Context& from, Context& to) { mixmoe_host_model_switch(&from.sp, to.sp); }
/// A context that starts `entry` (which must never return) on the stack [bottom, bottom + size).
inline void make_context(Context& c, char* bottom, std::size_t size, void (*entry)()) {
  auto* top = reinterpret_cast<std::uint64_t*>(bottom + size);  // 16-byte aligned
  *--top = 0;                                                     // entry's return address: none
  *--top = reinterpret_cast<std::uint64_t>(entry);                // where the switch returns to
  for (int r = 0; r < 6; ++r) *--top = 0;                         // rbp rbx r12 r13 r14 r15
  c.sp = top;
}
#else
struct Context {
  ucontext_t uc{};
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* bottom, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = bottom;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

/// One CUDA thread of the block running: its fiber, and what it waits for.
struct Fiber {
  enum class State { ready, at_barrier, at_shuffle, exited };
  Context context;
  char* stack = nullptr;  // usable part, above the guard page
  State state = State::ready;
  // a shuffle: the value posted, the lane read, the mask, and the value received
  unsigned long long posted = 0, received = 0;
  unsigned source = 0, mask = 0;
};

class Scheduler {
 public:
  static constexpr std::size_t kStackBytes =
#ifdef MIXMOE_HOST_MODEL_ASAN
      512 * 1024;
#else
      128 * 1024;
#endif
  static constexpr std::size_t kGuardBytes = 4096;

  static Scheduler& instance() {
    static Scheduler* s = new Scheduler;  // never destroyed: launches may run from static destructors
    return *s;
  }
  /// Serialises launches (see the note at the top).
  std::mutex& mutex() { return mutex_; }

  /// Runs body() as every thread of every block of the launch (grid, block); dynamic shared
  /// memory of `shared_bytes` for extern __shared__ arrays. The caller holds mutex().
  void run(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    body_ = &body;
    const unsigned threads = block.x * block.y * block.z;
    while (fibers_.size() < threads) add_fiber();
    shared_.assign((shared_bytes + 15) / 16, Chunk{});
    for (Chunk& c : shared_) std::memset(c.bytes, 0xff, sizeof c.bytes);  // uninitialised: NaN, -1
    const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    for (unsigned long long b = 0; b < blocks; ++b) {
      blockIdx = dim3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                      static_cast<unsigned>(b / (static_cast<unsigned long long>(grid.x) * grid.y))};
      run_block(threads);
    }
    body_ = nullptr;
  }

  void* dynamic_shared() { return shared_.empty() ? nullptr : static_cast<void*>(shared_.data()); }
  unsigned current_thread() const { return current_; }

  /// The calling CUDA thread waits at __syncthreads.
  void barrier() { wait(Fiber::State::at_barrier); }

  /// The calling lane's shuffle: posts `value`, waits for the lanes of `mask`, returns the value
  /// lane `source` posted (linear thread numbering within the warp).
  unsigned long long shuffle(unsigned mask, unsigned long long value, unsigned source) {
    Fiber& f = fibers_[current_];
    f.posted = value;
    f.source = source;
    f.mask = mask;
    ++shuffling_;
    wait(Fiber::State::at_shuffle);
    return f.received;
  }

 private:
  struct alignas(16) Chunk {
    unsigned char bytes[16];
  };

  Scheduler() {
    if (const char* v = std::getenv("MIXMOE_HOST_MODEL_SEED")) seed_ = std::strtoull(v, nullptr, 10);
  }

  /// splitmix64's finaliser: the laggard warp of a block from the seed and the block's number.
  static unsigned long long mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  void add_fiber() {
    const std::size_t total = kStackBytes + kGuardBytes;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber's stack");
    if (mprotect(p, kGuardBytes, PROT_NONE) != 0) fail("cannot protect a fiber's guard page");
    fibers_.emplace_back();
    fibers_.back().stack = static_cast<char*>(p) + kGuardBytes;
  }

  static void entry() {
    Scheduler& s = instance();
    s.finish_switch(nullptr);
    (*s.body_)();
    s.fibers_[s.current_].state = Fiber::State::exited;
    s.start_switch(nullptr, s.main_stack_bottom_, s.main_stack_size_);  // this fiber is done for good
    switch_context(s.fibers_[s.current_].context, s.main_);
    fail("a finished fiber resumed");
  }

  void set_thread(unsigned t) {
    current_ = t;
    threadIdx = blockDim.y == 1 && blockDim.z == 1
                    ? dim3{t, 0, 0}
                    : dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
  }

  // The fiber switches, announced to AddressSanitizer when it is on.
  void start_switch([[maybe_unused]] void** fake_stack, [[maybe_unused]] const void* bottom,
                    [[maybe_unused]] std::size_t size) {
#ifdef MIXMOE_HOST_MODEL_ASAN
    __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#endif
  }
  void finish_switch([[maybe_unused]] void* fake_stack) {
#ifdef MIXMOE_HOST_MODEL_ASAN
    const void* bottom = nullptr;
    std::size_t size = 0;
    __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
    if (in_fiber_) {
      main_stack_bottom_ = bottom;  // a fiber just started or resumed: the stack it came from
      main_stack_size_ = size;
    }
#endif
  }

  /// The running fiber stops in `state` until the scheduler lets it go on.
  void wait(Fiber::State state) {
    if (!in_fiber_) fail("__syncthreads or a shuffle called outside a kernel");
    Fiber& f = fibers_[current_];
    f.state = state;
    void* fake = nullptr;
    start_switch(&fake, main_stack_bottom_, main_stack_size_);
    switch_context(f.context, main_);
    finish_switch(fake);
  }

  void resume(unsigned t) {
    Fiber& f = fibers_[t];
    set_thread(t);
    f.state = Fiber::State::ready;
    void* fake = nullptr;
    start_switch(&fake, f.stack, kStackBytes);
    in_fiber_ = true;
    switch_context(main_, f.context);
    in_fiber_ = false;
    finish_switch(fake);
  }

  void run_block(unsigned threads) {
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
#ifdef MIXMOE_HOST_MODEL_ASAN
      // The frame of entry() never returns, so its redzones stay poisoned: cleared for the next start.
      __asan_unpoison_memory_region(f.stack + kStackBytes - 8192, 8192);
#endif
      // The stack tops are staggered by a cache line per fiber: tops 4 KiB-aligned alike would all
      // fall in the same sets of the L1 cache.
      make_context(f.context, f.stack, kStackBytes - 64 * (t % 64), &Scheduler::entry);
      f.state = Fiber::State::ready;
      runnable_.push_back(t);
    }
    const unsigned warps = (threads + 31) / 32;
    const unsigned laggard = seed_ == 0 || warps < 2 ? ~0u : static_cast<unsigned>(mix(seed_ + block_number_) % warps);
    ++block_number_;
    for (;;) {
      while (!runnable_.empty() || !lagging_.empty()) {
        const bool lag_round = runnable_.empty();  // the laggard runs only when nothing else can
        if (lag_round) runnable_.swap(lagging_);
        now_.swap(runnable_);
        runnable_.clear();
        for (unsigned t : now_) {
          if (!lag_round && t / 32 == laggard)
            lagging_.push_back(t);
          else
            resume(t);
        }
        if (shuffling_ != 0) release_shuffles(threads);
      }
      // Nothing can run: every thread has exited, or waits at the barrier.
      unsigned waiting = 0;
      for (unsigned t = 0; t < threads; ++t) {
        const Fiber::State s = fibers_[t].state;
        if (s == Fiber::State::at_shuffle)
          fail("a shuffle never completes: a lane of its mask waits at __syncthreads (divergent warp)");
        if (s == Fiber::State::at_barrier) ++waiting;
      }
      if (waiting == 0) break;
      for (unsigned t = 0; t < threads; ++t)
        if (fibers_[t].state == Fiber::State::at_barrier) {
          fibers_[t].state = Fiber::State::ready;
          runnable_.push_back(t);
        }
    }
  }

  /// Completes every shuffle whose lanes have all arrived: each lane receives its source's value.
  void release_shuffles(unsigned threads) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      const unsigned lanes = std::min(32u, threads - w * 32);
      unsigned arrived = 0, mask = 0;
      bool any = false;
      for (unsigned l = 0; l < lanes; ++l) {
        const Fiber& f = fibers_[w * 32 + l];
        if (f.state != Fiber::State::at_shuffle) continue;
        if (any && f.mask != mask) fail("lanes of one shuffle disagree on its mask");
        mask = f.mask;
        any = true;
        arrived |= 1u << l;
        if (!(f.mask >> l & 1u)) fail("a lane shuffles with a mask that leaves itself out");
      }
      if (!any) continue;
      if (lanes < 32 && (mask >> lanes) != 0) fail("a shuffle's mask names lanes outside the block");
      bool complete = true;
      for (unsigned l = 0; l < lanes; ++l) {
        if (!(mask >> l & 1u) || (arrived >> l & 1u)) continue;
        const Fiber::State s = fibers_[w * 32 + l].state;
        if (s == Fiber::State::exited) fail("a shuffle's mask names a lane that has exited");
        complete = false;  // that lane is still running towards it (or waits at the barrier: caught later)
      }
      if (!complete) continue;
      for (unsigned l = 0; l < lanes; ++l) {
        if (!(arrived >> l & 1u)) continue;
        Fiber& f = fibers_[w * 32 + l];
        if (f.source >= lanes || !(mask >> f.source & 1u)) fail("a shuffle reads a lane outside its mask");
        f.received = fibers_[w * 32 + f.source].posted;
      }
      for (unsigned l = 0; l < lanes; ++l)
        if (arrived >> l & 1u) {
          fibers_[w * 32 + l].state = Fiber::State::ready;
          runnable_.push_back(w * 32 + l);
          --shuffling_;
        }
    }
  }

  std::mutex mutex_;
  std::vector<Fiber> fibers_;
  std::vector<unsigned> runnable_, now_, lagging_;
  unsigned shuffling_ = 0;  // lanes waiting at a shuffle
  unsigned long long seed_ = 1, block_number_ = 0;
  std::vector<Chunk> shared_;
  const std::function<void()>* body_ = nullptr;
  Context main_;
  unsigned current_ = 0;
  bool in_fiber_ = false;
  const void* main_stack_bottom_ = nullptr;
  std::size_t main_stack_size_ = 0;
};

/// Runs body() as every thread of the launch (grid, block), blocks one after another; waits for
/// any other host thread's launch to finish first.
inline void launch(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body) {
  Scheduler& s = Scheduler::instance();
  std::lock_guard<std::mutex> lock(s.mutex());
  s.run(grid, block, shared_bytes, body);
}
template <class Body>
void launch(dim3 grid, unsigned threads, Body body) {
  launch(grid, dim3{threads, 1, 1}, 0, std::function<void()>(body));
}

/// The extern __shared__ array of the launch running.
inline void* dynamic_shared() { return Scheduler::instance().dynamic_shared(); }

inline unsigned lane_id() { return Scheduler::instance().current_thread() % 32; }

template <class T>
T shuffle(unsigned mask, T v, unsigned source) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves up to 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  bits = Scheduler::instance().shuffle(mask, bits, source);
  T r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

}  // namespace host_model

inline void __syncthreads() { host_model::Scheduler::instance().barrier(); }

/// The shuffles, width 32 or a smaller power of two as CUDA's.
template <class T>
T __shfl_sync(unsigned mask, T v, int source, int width = 32) {
  const unsigned lane = host_model::lane_id();
  return host_model::shuffle(mask, v, (lane & ~static_cast<unsigned>(width - 1)) + static_cast<unsigned>(source % width));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = host_model::lane_id();
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  if ((src & ~static_cast<unsigned>(width - 1)) != (lane & ~static_cast<unsigned>(width - 1))) src = lane;
  return host_model::shuffle(mask, v, src);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = host_model::lane_id();
  return host_model::shuffle(mask, v, lane % static_cast<unsigned>(width) >= delta ? lane - delta : lane);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = host_model::lane_id();
  return host_model::shuffle(mask, v, lane % static_cast<unsigned>(width) + delta < static_cast<unsigned>(width) ? lane + delta : lane);
}

/// The atomics: one CUDA thread runs at a time (see the note at the top).
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (old < v) *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}

[[noreturn]] inline void __trap() { host_model::fail("a kernel executed __trap()"); }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float cospif(float x) { return static_cast<float>(std::cos(3.14159265358979323846 * x)); }
inline float sinpif(float x) { return static_cast<float>(std::sin(3.14159265358979323846 * x)); }
inline double cospi(double x) { return std::cos(3.14159265358979323846 * x); }
inline double sinpi(double x) { return std::sin(3.14159265358979323846 * x); }
