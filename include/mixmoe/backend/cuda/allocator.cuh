// Caching allocator for device memory. cudaMalloc and cudaFree synchronise the device and cost
// tens of microseconds; a training step allocates the same sizes every time, so freed blocks
// are kept in the host allocator's size classes (core/allocator.hpp) and handed out again. Once
// warm, a step makes no cudaMalloc or cudaFree call. Reuse is stream-ordered: see runtime.cuh.
#pragma once

#include <array>
#include <mutex>
#include <vector>

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/core/allocator.hpp"

namespace mixmoe::cuda {

class CachingDeviceAllocator {
 public:
  static CachingDeviceAllocator& instance() {
    static CachingDeviceAllocator a;
    return a;
  }
  CachingDeviceAllocator(const CachingDeviceAllocator&) = delete;
  CachingDeviceAllocator& operator=(const CachingDeviceAllocator&) = delete;
  // The cached blocks are left to the driver at exit: the CUDA context may already be torn
  // down when static destructors run, and cudaFree would then fail.
  ~CachingDeviceAllocator() = default;

  /// A device block of at least `bytes` bytes (256-byte aligned, as cudaMalloc's are).
  void* allocate(std::size_t bytes) {
    const int cls = mixmoe::detail::SizeClasses::of(bytes);
    const std::size_t size = mixmoe::detail::SizeClasses::bytes_of(cls);
    std::lock_guard<std::mutex> lock(mutex_);
    auto& list = free_[static_cast<std::size_t>(cls)];
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
      stats_.bytes_cached -= size;
      ++stats_.cache_hits;
    } else {
      cudaError_t err = cudaMalloc(&p, size);
      if (err == cudaErrorMemoryAllocation) {  // give the cache back and retry once
        (void)cudaGetLastError();
        release_cache_locked();
        err = cudaMalloc(&p, size);
      }
      if (err != cudaSuccess) {
        std::ostringstream what;
        what << "cudaMalloc of " << size << " bytes (" << stats_.bytes_in_use << " bytes in use by mixmoe)";
        check(err, what.str().c_str(), __FILE__, __LINE__);
      }
      ++stats_.system_allocs;
    }
    stats_.bytes_in_use += size;
    if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
    return p;
  }

  /// Takes back a block from allocate(bytes) with the same `bytes`.
  void deallocate(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const int cls = mixmoe::detail::SizeClasses::of(bytes);
    const std::size_t size = mixmoe::detail::SizeClasses::bytes_of(cls);
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.bytes_in_use -= size;
    try {
      free_[static_cast<std::size_t>(cls)].push_back(p);
      stats_.bytes_cached += size;
    } catch (...) {
      (void)cudaFree(p);
      ++stats_.system_frees;
    }
  }

  /// Returns every cached block to the driver (after the device has finished with them).
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cache_locked();
  }

  [[nodiscard]] AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  CachingDeviceAllocator() = default;

  void release_cache_locked() {
    (void)cudaDeviceSynchronize();  // no kernel may still use a block handed back to the driver
    for (auto& list : free_) {
      for (void* p : list) {
        (void)cudaFree(p);
        ++stats_.system_frees;
      }
      list.clear();
    }
    stats_.bytes_cached = 0;
  }

  mutable std::mutex mutex_;
  std::array<std::vector<void*>, mixmoe::detail::SizeClasses::kClasses> free_{};
  AllocatorStats stats_{};
};

}  // namespace mixmoe::cuda
