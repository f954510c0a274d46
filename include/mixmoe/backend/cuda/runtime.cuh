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

#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>

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

/// Waits for everything issued on this thread's stream; reports a fault of any kernel in it.
inline void synchronize() {
  detail::synchronization_counter().fetch_add(1, std::memory_order_relaxed);
  MIXMOE_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
}

/// How many times the library has waited for the device since the program started: every
/// synchronize(), which every device->host copy and host->device upload goes through (item(),
/// to_vector(), a range check's read-back, a plan's counts). A profiling aid: the difference over
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
