// Caching allocator for tensor storage. A training step allocates the same sizes
// every time, so freed blocks are kept in size classes and handed out again: once the
// caches are warm (two steps with AdamW, whose state is created in the first), a step
// makes no call to the system allocator.
//
// Size classes are spaced 1/8 of a power of two apart (at most 12.5% waste), so
// sizes that vary from step to step (MoE expert blocks) still hit warm classes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

/// Counters of one allocator; `system_allocs` counts real calls to the system.
struct AllocatorStats {
  std::size_t system_allocs = 0;   // blocks obtained from the system
  std::size_t system_frees = 0;    // blocks returned to the system
  std::size_t cache_hits = 0;      // allocations served from the cache
  std::size_t bytes_in_use = 0;    // bytes handed out and not yet freed
  std::size_t bytes_cached = 0;    // bytes held in the cache, free for reuse
  std::size_t peak_bytes_in_use = 0;
};

namespace detail {

/// The size classes of the caching allocators (host and device): 64-byte steps up to 1 KiB,
/// then 8 classes per power of two, so a request wastes at most 12.5% (64 bytes below 1 KiB).
struct SizeClasses {
  static constexpr int kStepsPerOctave = 8;
  static constexpr int kClasses = 64 * kStepsPerOctave;

  // Class c covers sizes up to bytes_of(c): 64, 128, ..., then 8 steps per octave.
  static int of(std::size_t bytes) {
    if (bytes <= 1024) return static_cast<int>((bytes + 63) / 64);  // classes 0..16: 64-byte steps
    int octave = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes - 1));  // 2^octave < bytes <= 2^(octave+1)
    const std::size_t base = std::size_t{1} << octave;
    const std::size_t step = base / kStepsPerOctave;
    const std::size_t k = (bytes - base + step - 1) / step;  // 1..8
    return 16 + (octave - 10) * kStepsPerOctave + static_cast<int>(k);
  }

  static std::size_t bytes_of(int cls) {
    if (cls <= 16) return static_cast<std::size_t>(cls < 1 ? 1 : cls) * 64;
    const int rel = cls - 17;  // 0-based within the octave ladder above 1024
    const int octave = 10 + rel / kStepsPerOctave;
    const std::size_t k = static_cast<std::size_t>(rel % kStepsPerOctave) + 1;
    const std::size_t base = std::size_t{1} << octave;
    return base + k * (base / kStepsPerOctave);
  }
};

}  // namespace detail

class CachingHostAllocator {
 public:
  static constexpr std::size_t kAlignment = 64;  // one cache line, full AVX-512 vector

  static CachingHostAllocator& instance() {
    static CachingHostAllocator a;
    return a;
  }

  CachingHostAllocator(const CachingHostAllocator&) = delete;
  CachingHostAllocator& operator=(const CachingHostAllocator&) = delete;
  ~CachingHostAllocator() { empty_cache(); }

  /// Returns a block of at least `bytes` bytes, aligned to kAlignment.
  void* allocate(std::size_t bytes) {
    const int cls = detail::SizeClasses::of(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto& list = free_[cls];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
      stats_.bytes_cached -= detail::SizeClasses::bytes_of(cls);
      ++stats_.cache_hits;
    } else {
      p = std::aligned_alloc(kAlignment, detail::SizeClasses::bytes_of(cls));
      if (!p) {
        release_cache_locked();  // out of memory: give the cache back and retry once
        p = std::aligned_alloc(kAlignment, detail::SizeClasses::bytes_of(cls));
      }
      if (!p) throw std::bad_alloc();
      ++stats_.system_allocs;
    }
    stats_.bytes_in_use += detail::SizeClasses::bytes_of(cls);
    if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
    return p;
  }

  /// Takes back a block from allocate(p, bytes) with the same `bytes`.
  void deallocate(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const int cls = detail::SizeClasses::of(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.bytes_in_use -= detail::SizeClasses::bytes_of(cls);
    auto& list = free_[cls];
    try {
      list.push_back(p);
      stats_.bytes_cached += detail::SizeClasses::bytes_of(cls);
    } catch (...) {
      std::free(p);
      ++stats_.system_frees;
    }
  }

  /// Returns every cached (free) block to the system.
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cache_locked();
  }

  [[nodiscard]] AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  /// Rounds a request up to its size class (exposed for tests).
  static std::size_t rounded_size(std::size_t bytes) { return detail::SizeClasses::bytes_of(detail::SizeClasses::of(bytes)); }

 private:
  CachingHostAllocator() = default;

  void release_cache_locked() {
    for (auto& list : free_) {
      for (void* p : list) {
        std::free(p);
        ++stats_.system_frees;
      }
      list.clear();
    }
    stats_.bytes_cached = 0;
  }

  mutable std::mutex mutex_;
  std::array<std::vector<void*>, detail::SizeClasses::kClasses> free_{};
  AllocatorStats stats_{};
};

/// std-compatible allocator over a per-size free-list pool, for small host objects
/// that live per op (autograd nodes and their control blocks). Like the caching
/// allocator, it stops calling the system allocator once a step has warmed it.
template <class U>
struct PoolAllocator {
  using value_type = U;
  PoolAllocator() = default;
  template <class V>
  PoolAllocator(const PoolAllocator<V>&) noexcept {}  // NOLINT: rebinding is implicit by design
  U* allocate(std::size_t n) {
    return static_cast<U*>(CachingHostAllocator::instance().allocate(n * sizeof(U)));
  }
  void deallocate(U* p, std::size_t n) noexcept { CachingHostAllocator::instance().deallocate(p, n * sizeof(U)); }
  template <class V>
  bool operator==(const PoolAllocator<V>&) const noexcept { return true; }
};

}  // namespace mixmoe
