// The CUDA runtime as mixmoe uses it: error checks that name the call, the device count, the
// stream the kernels run on, and synchronisation.
//
// Streams. Every kernel, copy, cuBLAS and cuFFT call of the backend is issued on
// cuda::current_stream(), per host thread (default: the per-thread default stream, so two host
// threads never serialise on the legacy stream). Work on one stream runs in issue order, which
// is what makes the caching allocator's reuse of a freed block safe without an event: a block
// freed after the kernels that read it were issued can only be written by kernels issued later
// on the same stream. The process-wide caches are therefore kept per stream (stream_id() tells
// the per-thread default streams of two threads apart, which share one handle): a freed device
// block is reused only on the stream that freed it, each stream has its own deferred-check
// record and its own cuFFT plans. Host threads may thus run the backend at the same time, each
// on its own stream. What stays the caller's: a tensor made or last used on one stream and
// handed to another (another thread, or a StreamGuard) must have that stream synchronised first
// (cuda::synchronize() there), before the other reads it or drops its last reference.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

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

namespace detail {
inline void retire_stream_id(cudaStream_t s, unsigned long long id, bool throw_errors);

/// This thread's per-thread stream: its id, and its retirement when the thread ends (its cached
/// memory, deferred-check record and cuFFT plans go back, see retire_stream).
struct PerThreadStream {
  unsigned long long id = 0;
  PerThreadStream() = default;
  PerThreadStream(const PerThreadStream&) = delete;
  PerThreadStream& operator=(const PerThreadStream&) = delete;
  ~PerThreadStream() {
    if (id != 0) retire_stream_id(cudaStreamPerThread, id, false);
  }
};
}  // namespace detail

/// The driver's id of stream `s`, unique for the life of the program. cudaStreamPerThread (and
/// the null stream under per-thread default streams) names a different stream in every thread:
/// the id is that of the calling thread's. Throws mixmoe::Error when the driver cannot say.
inline unsigned long long stream_id(cudaStream_t s) {
  thread_local detail::PerThreadStream mine;  // cached: this thread's per-thread stream never changes
  if (s == cudaStreamPerThread && mine.id != 0) return mine.id;
  unsigned long long id = 0;
  check(cudaStreamGetId(s, &id), "cudaStreamGetId", __FILE__, __LINE__);
  if (s == cudaStreamPerThread) mine.id = id;  // an id of 0 is not taken as cached: asked again
  return id;
}

/// stream_id(current_stream()).
inline unsigned long long current_stream_id() { return stream_id(current_stream()); }

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

/// The host side: the messages of the checks enqueued and not yet seen to pass, and one device
/// record per stream (a check is reported by a synchronisation of the stream it was issued on).
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
    const cudaStream_t s = current_stream();
    const unsigned long long sid = stream_id(s);
    std::lock_guard<std::mutex> lock(mutex_);
    Stream& st = streams_[sid];
    if (!st.record) {
      void* p = nullptr;
      check(cudaMalloc(&p, sizeof(DeferredRecord)), "cudaMalloc (deferred check record)", __FILE__, __LINE__);
      // On the stream itself: ordered before its commits whatever the stream's flags.
      const cudaError_t e = cudaMemsetAsync(p, 0xff, sizeof(DeferredRecord), s);
      if (e != cudaSuccess) (void)cudaFree(p);
      check(e, "cudaMemsetAsync (deferred check record)", __FILE__, __LINE__);
      st.record = static_cast<DeferredRecord*>(p);
    }
    const long long id = next_id_++;
    deferred_commit<<<1, 1, 0, s>>>(first, n, values, id, st.record);
    check(cudaGetLastError(), "deferred_commit", __FILE__, __LINE__);
    st.pending.push_back(Pending{id, std::move(message)});
  }

  /// Checks enqueued (on any stream) and not yet seen by a synchronisation of their stream.
  std::size_t pending() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t n = 0;
    for (const auto& [sid, st] : streams_) n += st.pending.size();
    return n;
  }

  /// After current_stream() was synchronised: throws the error of the first failed check issued on
  /// it (and clears its record, so the device stays usable); forgets the checks it has seen.
  void report() {
    const cudaStream_t s = current_stream();
    unsigned long long sid = 0;
    DeferredRecord* record = nullptr;
    long long seen = 0;  // the checks up to this id were committed before the copy below
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (streams_.empty()) return;
      sid = stream_id(s);
      const auto it = streams_.find(sid);
      if (it == streams_.end() || it->second.pending.empty()) return;
      record = it->second.record;
      seen = it->second.pending.back().id;
    }
    // Read without the lock: other threads' streams go on enqueueing meanwhile.
    DeferredRecord host{};
    check(cudaMemcpyAsync(&host, record, sizeof host, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (deferred check)",
          __FILE__, __LINE__);
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize (deferred check)", __FILE__, __LINE__);
    std::deque<Pending> done;  // the checks seen, their messages built after the lock
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::deque<Pending>& pending = streams_[sid].pending;
      while (!pending.empty() && pending.front().id <= seen) {
        done.push_back(std::move(pending.front()));
        pending.pop_front();
      }
    }
    if (host.check >= 0) {
      check(cudaMemsetAsync(record, 0xff, sizeof(DeferredRecord), s), "cudaMemsetAsync (deferred check)", __FILE__,
            __LINE__);
      check(cudaStreamSynchronize(s), "cudaStreamSynchronize (deferred check)", __FILE__, __LINE__);
      throw Error(failure(done, host));
    }
  }

  /// The stream `id`, synchronised, is going away (its thread ended, or retire_stream): its record
  /// is read one last time and freed. Returns the error of its first failed check ("" when none).
  std::string retire(unsigned long long id) {
    Stream st;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = streams_.find(id);
      if (it == streams_.end()) return {};
      st = std::move(it->second);
      streams_.erase(it);
    }
    std::string failed;
    if (!st.pending.empty()) {
      DeferredRecord host{};
      if (cudaMemcpy(&host, st.record, sizeof host, cudaMemcpyDeviceToHost) == cudaSuccess && host.check >= 0)
        failed = failure(st.pending, host);
    }
    (void)cudaFree(st.record);
    return failed;
  }

 private:
  struct Pending {
    long long id;
    Message message;
  };
  struct Stream {
    DeferredRecord* record = nullptr;  // device memory, freed when the stream is retired
    std::deque<Pending> pending;       // ids increasing
  };
  DeferredChecks() = default;

  /// The message of the failed check in `host`, one of `checks`.
  static std::string failure(const std::deque<Pending>& checks, const DeferredRecord& host) {
    const auto it = std::find_if(checks.begin(), checks.end(), [&](const Pending& p) { return p.id == host.check; });
    return it != checks.end() ? it->message(host.position, host.value)
                              : "[cuda] deferred check " + std::to_string(host.check) + " failed at position " +
                                    std::to_string(host.position);
  }

  mutable std::mutex mutex_;
  long long next_id_ = 0;
  std::unordered_map<unsigned long long, Stream> streams_;  // by stream_id()
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

namespace detail {
/// What the caches keyed by stream do when a stream goes away (the caching allocator, the cuFFT
/// plans): each registers one function, called with the stream's id after it was synchronised.
using RetireHook = void (*)(unsigned long long id) noexcept;
inline std::mutex& retire_hooks_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
inline std::vector<RetireHook>& retire_hooks() {
  static auto* hooks = new std::vector<RetireHook>;
  return *hooks;
}
inline void add_retire_hook(RetireHook hook) {
  std::lock_guard<std::mutex> lock(retire_hooks_mutex());
  retire_hooks().push_back(hook);
}

inline void retire_stream_id(cudaStream_t s, unsigned long long id, bool throw_errors) {
  std::string failed;
  try {
    const cudaError_t e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
      if (throw_errors) check(e, "cudaStreamSynchronize (retire_stream)", __FILE__, __LINE__);
      return;  // a broken context: nothing can be given back safely
    }
    failed = DeferredChecks::instance().retire(id);
    std::vector<RetireHook> hooks;
    {
      std::lock_guard<std::mutex> lock(retire_hooks_mutex());
      hooks = retire_hooks();
    }
    for (RetireHook hook : hooks) hook(id);
  } catch (...) {
    if (throw_errors) throw;
    return;
  }
  if (failed.empty()) return;
  if (throw_errors) throw Error(failed);
  std::fprintf(stderr, "mixmoe: a deferred check failed on a thread that ended before reading it: %s\n",
               failed.c_str());
}
}  // namespace detail

/// Gives back what the backend keeps for stream `s` (call it before cudaStreamDestroy): waits for
/// the stream, throws the first failed deferred check issued on it (as synchronize() does), frees its
/// check record, moves its cached device memory to the pool every stream draws from and destroys its
/// cuFFT plans. A thread's per-thread stream is retired this way when the thread ends (a failed check
/// then goes to stderr). The stream may be used again afterwards: the caches fill up again.
inline void retire_stream(cudaStream_t s) { detail::retire_stream_id(s, stream_id(s), true); }

/// How many times the library has waited for the device since the program started: every
/// synchronize(), which every device->host copy and every upload above 16 MiB goes through
/// (item(), to_vector(), a range check's read-back, a plan's counts). A profiling aid: the difference over
/// a training step counts that step's host synchronisations (docs/cuda.md lists where they are).
inline std::uint64_t synchronization_count() {
  return detail::synchronization_counter().load(std::memory_order_relaxed);
}

/// Most blocks of a grid-stride kernel (elements beyond are taken by its loop): 65535 x 32, or the
/// macro MIXMOE_CUDA_MAX_BLOCKS where it is defined (the CPU model of CUDA's tests set it to a few
/// blocks, so that every grid-stride loop runs many rounds even at small sizes).
#ifndef MIXMOE_CUDA_MAX_BLOCKS
#define MIXMOE_CUDA_MAX_BLOCKS (65535LL * 32)
#endif
inline constexpr long long kMaxGridStrideBlocks = MIXMOE_CUDA_MAX_BLOCKS;
static_assert(kMaxGridStrideBlocks >= 1 && kMaxGridStrideBlocks <= 0x7fffffff, "MIXMOE_CUDA_MAX_BLOCKS: 1 to 2^31 - 1 blocks");

/// Blocks of `threads` covering n elements, capped for grid-stride loops (kMaxGridStrideBlocks).
inline unsigned blocks_for(long long n, unsigned threads = 256) {
  const long long b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxGridStrideBlocks ? kMaxGridStrideBlocks : b));
}

}  // namespace mixmoe::cuda
