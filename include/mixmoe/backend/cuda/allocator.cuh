// Caching allocator for device memory. cudaMalloc and cudaFree synchronise the device and cost
// tens of microseconds; a training step allocates the same sizes every time, so freed blocks
// are kept in the host allocator's size classes (core/allocator.hpp) and handed out again. Once
// warm, a step makes no cudaMalloc or cudaFree call. Reuse is stream-ordered (see runtime.cuh):
// a freed block goes to the free lists of the stream that freed it, and only an allocation on
// that stream takes it again, so two host threads (two streams) never share a block in flight.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/core/allocator.hpp"

namespace mixmoe::cuda {

class CachingDeviceAllocator {
 public:
  static CachingDeviceAllocator& instance() {
    // Never destroyed: a device tensor held by a static object may be freed after any destructor
    // of this header's objects has run. The cached blocks are left to the driver at exit (the
    // CUDA context may already be torn down then, and cudaFree would fail).
    static CachingDeviceAllocator* a = new CachingDeviceAllocator;
    return *a;
  }
  CachingDeviceAllocator(const CachingDeviceAllocator&) = delete;
  CachingDeviceAllocator& operator=(const CachingDeviceAllocator&) = delete;

  /// A device block of at least `bytes` bytes (256-byte aligned, as cudaMalloc's are).
  void* allocate(std::size_t bytes) {
    const int cls = mixmoe::detail::SizeClasses::of(bytes);
    const std::size_t size = mixmoe::detail::SizeClasses::bytes_of(cls);
    const unsigned long long sid = current_stream_id();
    std::lock_guard<std::mutex> lock(mutex_);
    auto& list = free_[sid][static_cast<std::size_t>(cls)];
    auto& idle = idle_[static_cast<std::size_t>(cls)];
    void* p = nullptr;
    if (!list.empty() || !idle.empty()) {  // this stream's own blocks first, then those of retired streams
      auto& from = list.empty() ? idle : list;
      p = from.back();
      from.pop_back();
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

  /// Takes back a block from allocate(bytes) with the same `bytes`, for reuse on current_stream()
  /// (the stream whose work, issued so far, is the last to use it).
  void deallocate(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const int cls = mixmoe::detail::SizeClasses::of(bytes);
    const std::size_t size = mixmoe::detail::SizeClasses::bytes_of(cls);
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.bytes_in_use -= size;
    try {
      free_[current_stream_id()][static_cast<std::size_t>(cls)].push_back(p);
      stats_.bytes_cached += size;
    } catch (...) {
      // No memory for the list, or no stream id (the context is going away): back to the driver
      // (cudaFree waits for the device first).
      (void)cudaFree(p);
      ++stats_.system_frees;
    }
  }

  /// The stream `id` was synchronised and goes away (see cuda::retire_stream): its cached blocks
  /// join the pool of idle blocks that any stream may take.
  void retire(unsigned long long id) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(id);
    if (it == free_.end()) return;
    for (std::size_t c = 0; c < it->second.size(); ++c) {
      const auto& list = it->second[c];
      try {
        idle_[c].insert(idle_[c].end(), list.begin(), list.end());  // all or nothing
      } catch (...) {  // no memory for the list: the (idle) blocks go back to the driver
        for (void* p : list) {
          (void)cudaFree(p);
          ++stats_.system_frees;
          stats_.bytes_cached -= mixmoe::detail::SizeClasses::bytes_of(static_cast<int>(c));
        }
      }
    }
    free_.erase(it);
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
  CachingDeviceAllocator() {
    detail::add_retire_hook([](unsigned long long id) noexcept { instance().retire(id); });
  }

  void release_cache_locked() {
    (void)cudaDeviceSynchronize();  // no kernel may still use a block handed back to the driver
    const auto release = [&](FreeLists& lists) {
      for (auto& list : lists) {
        for (void* p : list) {
          (void)cudaFree(p);
          ++stats_.system_frees;
        }
        list.clear();
      }
    };
    for (auto& [sid, lists] : free_) release(lists);
    release(idle_);
    free_.clear();
    stats_.bytes_cached = 0;
  }

  using FreeLists = std::array<std::vector<void*>, mixmoe::detail::SizeClasses::kClasses>;
  mutable std::mutex mutex_;
  std::unordered_map<unsigned long long, FreeLists> free_;  // by stream_id() of the freeing stream
  FreeLists idle_{};                                        // blocks of retired streams: idle, for any stream
  AllocatorStats stats_{};
};

/// Uploads that do not wait for the device. A host->device copy from ordinary (pageable) memory
/// must be staged, and the host buffer may be reused once the call returns, so a plain upload
/// waits for the stream. Here the bytes are copied into a pinned staging block, the DMA copy is
/// queued behind the stream's work and an event marks when the block is free again: the call
/// returns at once (a batch's token ids go up while the previous step still runs). Blocks are
/// cached by size class and reused when their event has passed; an upload above kMaxBytes (a
/// model's weights) or beyond kMaxPinnedBytes of blocks in flight takes the waiting path.
class PinnedStaging {
 public:
  static constexpr std::size_t kMaxBytes = std::size_t{16} << 20;
  static constexpr std::size_t kMaxPinnedBytes = std::size_t{256} << 20;

  static PinnedStaging& instance() {
    static PinnedStaging* s = new PinnedStaging;  // left to the driver at exit, as the device blocks
    return *s;
  }

  /// Queues the copy of `bytes` from host `src` to device `dst` on `stream`; false when it did not
  /// (too large, or too much staging in flight): then the caller copies and waits.
  bool upload(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
    if (bytes == 0 || bytes > kMaxBytes) return false;
    const int cls = mixmoe::detail::SizeClasses::of(bytes);
    const std::size_t size = mixmoe::detail::SizeClasses::bytes_of(cls);
    std::lock_guard<std::mutex> lock(mutex_);
    reclaim_locked();
    // room in the busy list first (doubling), so that nothing can fail once a block is taken
    if (busy_.size() == busy_.capacity()) busy_.reserve(std::max<std::size_t>(16, 2 * busy_.capacity()));
    auto& list = free_[static_cast<std::size_t>(cls)];
    Block b{};
    if (!list.empty()) {
      b = list.back();
      list.pop_back();
    } else {
      if (pinned_bytes_ + size > kMaxPinnedBytes) return false;
      check(cudaHostAlloc(&b.p, size, cudaHostAllocDefault), "cudaHostAlloc (upload staging)", __FILE__, __LINE__);
      check(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreateWithFlags (upload staging)",
            __FILE__, __LINE__);
      b.cls = cls;
      pinned_bytes_ += size;
    }
    std::memcpy(b.p, src, bytes);
    cudaError_t e = cudaMemcpyAsync(dst, b.p, bytes, cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) e = cudaEventRecord(b.done, stream);
    if (e != cudaSuccess) {  // the block is free once whatever was queued has run
      (void)cudaStreamSynchronize(stream);
      free_[static_cast<std::size_t>(b.cls)].push_back(b);
      check(e, "cudaMemcpyAsync / cudaEventRecord (staged upload)", __FILE__, __LINE__);
    }
    busy_.push_back(b);
    return true;
  }

  /// Bytes of pinned staging blocks held (in flight or cached).
  [[nodiscard]] std::size_t pinned_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pinned_bytes_;
  }

 private:
  struct Block {
    void* p = nullptr;
    cudaEvent_t done = nullptr;
    int cls = 0;
  };
  PinnedStaging() = default;

  /// Moves the blocks whose copies have finished back to the free lists (no waiting).
  void reclaim_locked() {
    std::erase_if(busy_, [&](const Block& b) {
      const cudaError_t e = cudaEventQuery(b.done);
      if (e == cudaErrorNotReady) return false;
      check(e, "cudaEventQuery (upload staging)", __FILE__, __LINE__);
      free_[static_cast<std::size_t>(b.cls)].push_back(b);
      return true;
    });
  }

  mutable std::mutex mutex_;
  std::array<std::vector<Block>, mixmoe::detail::SizeClasses::kClasses> free_{};
  std::vector<Block> busy_;
  std::size_t pinned_bytes_ = 0;
};

}  // namespace mixmoe::cuda
