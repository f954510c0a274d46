// The CUDA runtime as mixmoe uses it: error checks that name the call, the device count, the
// stream the kernels run on, and synchronisation.
//
// Streams. Every kernel, copy, cuBLAS and cuFFT call of the backend is issued on
// cuda::current_stream(), per host thread (default: the per-thread default stream, so two host
// threads never serialise on the legacy stream). Work on one stream runs in issue order, which
// is what makes the caching allocator's reuse of a freed block safe without an event: a block
// freed after the kernels that read it were issued can only be written by kernels issued later
// on the same stream. A caller that switches streams (StreamGuard) must synchronise the old
// stream before memory allocated on it is freed and reused on the new one.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>

#include "mixmoe/core/error.hpp"

namespace mixmoe::cuda {

/// Throws mixmoe::Error naming the failed call, where it was made and CUDA's message.
inline void check(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return;
  std::ostringstream os;
  os << "[cuda] " << call << " failed at " << file << ":" << line << ": " << cudaGetErrorName(err) << " ("
     << cudaGetErrorString(err) << ")";
  throw Error(os.str());
}

}  // namespace mixmoe::cuda

/// Checks a CUDA runtime call: MIXMOE_CUDA_CHECK(cudaMemcpyAsync(...)).
#define MIXMOE_CUDA_CHECK(call) ::mixmoe::cuda::check((call), #call, __FILE__, __LINE__)

/// Checks the launch of the kernel just issued (configuration errors are reported at once;
/// faults inside the kernel surface at the next synchronising call).
#define MIXMOE_CUDA_CHECK_LAUNCH(name) ::mixmoe::cuda::check(cudaGetLastError(), name, __FILE__, __LINE__)

namespace mixmoe::cuda {

/// The number of CUDA devices; 0 (not an error) when there is no device or no driver.
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" / "no driver" error
    return 0;
  }
  return n;
}

/// Whether a CUDA device can run the backend's kernels.
inline bool available() { return device_count() > 0; }

/// "name (compute capability X.Y, N GiB)" of the current device.
inline std::string device_description() {
  int dev = 0;
  MIXMOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MIXMOE_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  std::ostringstream os;
  os << p.name << " (compute capability " << p.major << "." << p.minor << ", "
     << static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0) << " GiB)";
  return os.str();
}

namespace detail {
inline cudaStream_t& thread_stream() {
  thread_local cudaStream_t s = cudaStreamPerThread;
  return s;
}
}  // namespace detail

/// The stream this host thread's backend work is issued on.
inline cudaStream_t current_stream() { return detail::thread_stream(); }

/// Makes `s` this thread's stream until the guard goes out of scope (see the note at the top
/// about freeing memory across streams).
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t s) : saved_(detail::thread_stream()) { detail::thread_stream() = s; }
  ~StreamGuard() { detail::thread_stream() = saved_; }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  cudaStream_t saved_;
};

namespace detail {
inline std::atomic<std::uint64_t>& synchronization_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}
}  // namespace detail

// Deferred checks. A check that would have to read a device result back to the host at once
// (is every token id below the vocabulary size?) can instead be enqueued: its kernels find the
// first bad position and write it, with the bad value, into one device-side record, and the host
// keeps the check's message until the stream is next synchronised. synchronize(), and so every
// device->host copy (item(), to_vector(), to_device<Cpu>), then reads the record when a check is
// pending and throws the first failed check's error: the same mixmoe::Error, word for word, as
// the check made at once. Kernels that consume what was checked must stay in bounds on a bad
// value (they write NaN or skip it), since they run before the error is seen.
namespace detail {

/// The device-side record of the first failed deferred check (check < 0: none).
struct DeferredRecord {
  long long check;
  long long position;
  long long value;
  long long unused;
};

/// position < n: the check `id` failed at that position; the first commit claims the record.
/// (A template, as the header's other kernels, so that every translation unit may define it.)
template <int = 0>
__global__ void deferred_commit(const long long* first, long long n, const std::int32_t* values, long long id,
                                       DeferredRecord* record) {
  const long long at = *first;
  if (at < 0 || at >= n) return;
  if (atomicCAS(reinterpret_cast<unsigned long long*>(&record->check), ~0ULL, static_cast<unsigned long long>(id)) ==
      ~0ULL) {
    record->position = at;
    record->value = static_cast<long long>(values[at]);
  }
}

/// The host side: the messages of the checks enqueued and not yet seen to pass.
class DeferredChecks {
 public:
  /// Builds the error message of a failed check from its position and bad value.
  using Message = std::function<std::string(long long position, long long value)>;

  static DeferredChecks& instance() {
    static DeferredChecks* c = new DeferredChecks;  // left to the driver at exit, as the allocator's blocks
    return *c;
  }

  /// Enqueues on current_stream() the report of a check whose kernels wrote the first bad
  /// position of n values into *first (a value outside [0, n): none); `message` names the error.
  void enqueue(const long long* first, long long n, const std::int32_t* values, Message message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!record_) {
      void* p = nullptr;
      check(cudaMalloc(&p, sizeof(DeferredRecord)), "cudaMalloc (deferred check record)", __FILE__, __LINE__);
      record_ = static_cast<DeferredRecord*>(p);
      check(cudaMemset(record_, 0xff, sizeof(DeferredRecord)), "cudaMemset (deferred check record)", __FILE__,
            __LINE__);
    }
    const long long id = next_id_++;
    deferred_commit<<<1, 1, 0, current_stream()>>>(first, n, values, id, record_);
    check(cudaGetLastError(), "deferred_commit", __FILE__, __LINE__);
    pending_.push_back(Pending{id, current_stream(), std::this_thread::get_id(), std::move(message)});
  }

  /// Checks enqueued and not yet seen by a synchronisation of their stream.
  std::size_t pending() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_.size();
  }

  /// After current_stream() was synchronised: throws the error of the first failed check (and
  /// clears the record, so the device stays usable); forgets the checks of this stream.
  void report() {
    std::string failed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pending_.empty()) return;
      const cudaStream_t s = current_stream();
      DeferredRecord host{};
      check(cudaMemcpyAsync(&host, record_, sizeof host, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (deferred check)",
            __FILE__, __LINE__);
      check(cudaStreamSynchronize(s), "cudaStreamSynchronize (deferred check)", __FILE__, __LINE__);
      if (host.check >= 0) {
        const auto it = std::find_if(pending_.begin(), pending_.end(), [&](const Pending& p) { return p.id == host.check; });
        failed = it != pending_.end() ? it->message(host.position, host.value)
                                      : "[cuda] deferred check " + std::to_string(host.check) + " failed at position " +
                                            std::to_string(host.position);
        if (it != pending_.end()) pending_.erase(it);
        check(cudaMemsetAsync(record_, 0xff, sizeof(DeferredRecord), s), "cudaMemsetAsync (deferred check)", __FILE__,
              __LINE__);
        check(cudaStreamSynchronize(s), "cudaStreamSynchronize (deferred check)", __FILE__, __LINE__);
      }
      const auto me = std::this_thread::get_id();
      std::erase_if(pending_, [&](const Pending& p) { return p.stream == s && p.thread == me; });
    }
    if (!failed.empty()) throw Error(failed);
  }

 private:
  struct Pending {
    long long id;
    cudaStream_t stream;     // with the thread: cudaStreamPerThread is one handle for many streams
    std::thread::id thread;
    Message message;
  };
  DeferredChecks() = default;

  mutable std::mutex mutex_;
  DeferredRecord* record_ = nullptr;
  long long next_id_ = 0;
  std::deque<Pending> pending_;
};

}  // namespace detail

/// Waits for everything issued on this thread's stream; reports a fault of any kernel in it, then
/// the first failed deferred check (see above) issued on it.
inline void synchronize() {
  detail::synchronization_counter().fetch_add(1, std::memory_order_relaxed);
  MIXMOE_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
  detail::DeferredChecks::instance().report();
}

/// Deferred checks enqueued (on any stream) and not yet seen to pass by a synchronisation.
inline std::size_t pending_checks() { return detail::DeferredChecks::instance().pending(); }

/// How many times the library has waited for the device since the program started: every
/// synchronize(), which every device->host copy and every upload above 16 MiB goes through
/// (item(), to_vector(), a range check's read-back, a plan's counts). A profiling aid: the difference over
/// a training step counts that step's host synchronisations (docs/cuda.md lists where they are).
inline std::uint64_t synchronization_count() {
  return detail::synchronization_counter().load(std::memory_order_relaxed);
}

/// Blocks of `threads` covering n elements, capped for grid-stride loops.
inline unsigned blocks_for(long long n, unsigned threads = 256) {
  const long long b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535LL * 32 ? 65535LL * 32 : b));
}

}  // namespace mixmoe::cuda
