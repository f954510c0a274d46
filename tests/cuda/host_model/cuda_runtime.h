// The host model's CUDA runtime (see host_model.hpp for the device side): one modelled device of
// compute capability 9.0 whose memory is the host's, and work that runs when it is issued.
//
// Memory. cudaMalloc returns host memory filled with 0xff bytes (uninitialised device memory: NaN
// in floating point, -1 in integers, so a kernel reading what nobody wrote shows it) and records
// the block; cudaMemcpy*, cudaMemset*, cuBLAS, cuFFT and cub check that the device side of each
// transfer lies inside one live block and that the host side does not (cudaErrorInvalidValue
// otherwise, as a device would fault or refuse). cudaFree of a pointer that is not a live block
// is cudaErrorInvalidValue (a double free). Pinned memory (cudaHostAlloc) is host memory the
// device may read, as under unified addressing. A kernel argument that is a pointer must be null
// or point into (or just past) a live device or pinned block: a host pointer handed to a kernel
// stops the program with the launch's place and the argument's position. What the model cannot
// see: a host pointer inside a structure passed to a kernel, or stored in device memory (both are
// host memory here, so the kernel reads it without fault).
//
// Streams and events. Every kernel and copy completes before its call returns, so streams never
// overlap and events are always complete; a stream's id (cudaStreamGetId) is unique for the life
// of the program, cudaStreamPerThread has one per host thread. Using a destroyed stream is
// cudaErrorInvalidResourceHandle.
//
// Launches. A kernel<<<grid, block, shared, stream>>>(args) statement is rewritten by
// translate.cmake into a call of host_model::launch_kernel, which checks the configuration as the
// runtime does (1 to 1024 threads, block.z <= 64, grid.y and grid.z <= 65535, dynamic shared
// memory <= 48 KiB without the opt-in attribute: cudaErrorInvalidConfiguration or
// cudaErrorInvalidValue, reported by cudaGetLastError), checks the kernel's pointer arguments
// (above) and runs it.
//
// Errors are per host thread: cudaGetLastError returns the last one and clears it. The
// environment variable MIXMOE_HOST_MODEL_DEVICES=0 makes cudaGetDeviceCount report no device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "host_model.hpp"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
};
using cudaError = cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct CUevent_st;
using cudaEvent_t = CUevent_st*;

#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))
#define cudaStreamPerThread (reinterpret_cast<cudaStream_t>(0x2))
#define cudaStreamDefault 0x0
#define cudaStreamNonBlocking 0x1
#define cudaEventDefault 0x0
#define cudaEventDisableTiming 0x2
#define cudaHostAllocDefault 0x0

struct cudaDeviceProp {
  char name[256];
  std::size_t totalGlobalMem;
  std::size_t sharedMemPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int major;
  int minor;
  int multiProcessorCount;
  int clockRate;
  int memoryClockRate;
  int memoryBusWidth;
};

struct cudaFuncAttributes {
  std::size_t sharedSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
};

namespace host_model {

/// The runtime's state: blocks, streams, events, pinned blocks.
class Runtime {
 public:
  static Runtime& instance() {
    static Runtime* r = new Runtime;  // never destroyed: static tensors may free their memory late
    return *r;
  }
  static cudaError_t& last_error() {
    thread_local cudaError_t e = cudaSuccess;
    return e;
  }
  static cudaError_t fail_with(cudaError_t e) {
    last_error() = e;
    return e;
  }

  cudaError_t malloc(void** p, std::size_t bytes) {
    if (p == nullptr) return fail_with(cudaErrorInvalidValue);
    *p = nullptr;
    if (bytes == 0) return cudaSuccess;
    void* q = nullptr;  // the exact size (AddressSanitizer sees a read past the end), aligned as cudaMalloc's
    if (posix_memalign(&q, 256, bytes) != 0) q = nullptr;
    if (q == nullptr) return fail_with(cudaErrorMemoryAllocation);
    std::memset(q, 0xff, bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    blocks_[static_cast<const char*>(q)] = bytes;
    *p = q;
    return cudaSuccess;
  }
  cudaError_t free(void* p) {
    if (p == nullptr) return cudaSuccess;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = blocks_.find(static_cast<const char*>(p));
      if (it == blocks_.end()) return fail_with(cudaErrorInvalidValue);
      blocks_.erase(it);
    }
    std::free(p);
    return cudaSuccess;
  }
  /// Whether [p, p + bytes) lies inside one live device block.
  bool on_device(const void* p, std::size_t bytes) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return inside(blocks_, p, bytes);
  }
  /// Whether p points into any live device block.
  bool touches_device(const void* p) const { return on_device(p, 1); }
  /// Whether a kernel may hold p: inside or just past the end of a live device or pinned block.
  bool device_may_read(const void* p) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return inside(blocks_, p, 0) || inside(pinned_, p, 0);
  }

  cudaError_t host_alloc(void** p, std::size_t bytes) {
    if (p == nullptr) return fail_with(cudaErrorInvalidValue);
    *p = std::malloc(bytes == 0 ? 1 : bytes);
    if (*p == nullptr) return fail_with(cudaErrorMemoryAllocation);
    std::lock_guard<std::mutex> lock(mutex_);
    pinned_[static_cast<const char*>(*p)] = bytes;
    return cudaSuccess;
  }
  cudaError_t host_free(void* p) {
    if (p == nullptr) return cudaSuccess;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pinned_.erase(static_cast<const char*>(p)) == 0) return fail_with(cudaErrorInvalidValue);
    }
    std::free(p);
    return cudaSuccess;
  }

  /// The checks of a copy of `bytes` bytes.
  cudaError_t check_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) const {
    if (bytes == 0) return cudaSuccess;
    if (dst == nullptr || src == nullptr) return fail_with(cudaErrorInvalidValue);
    const bool dd = on_device(dst, bytes), sd = on_device(src, bytes);
    const bool dt = touches_device(dst), st = touches_device(src);
    switch (kind) {
      case cudaMemcpyHostToDevice: return dd && !st ? cudaSuccess : fail_with(cudaErrorInvalidValue);
      case cudaMemcpyDeviceToHost: return sd && !dt ? cudaSuccess : fail_with(cudaErrorInvalidValue);
      case cudaMemcpyDeviceToDevice: return dd && sd ? cudaSuccess : fail_with(cudaErrorInvalidValue);
      case cudaMemcpyHostToHost: return !dt && !st ? cudaSuccess : fail_with(cudaErrorInvalidValue);
      case cudaMemcpyDefault: return (dd || !dt) && (sd || !st) ? cudaSuccess : fail_with(cudaErrorInvalidValue);
    }
    return fail_with(cudaErrorInvalidMemcpyDirection);
  }

  // Streams: the two special handles, and streams made by cudaStreamCreate (live until destroyed).
  cudaError_t stream_create(cudaStream_t* s) {
    if (s == nullptr) return fail_with(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(mutex_);
    const unsigned long long id = next_stream_id_++;
    *s = reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(0x1000 + 16 * id));
    streams_[*s] = id;
    return cudaSuccess;
  }
  cudaError_t stream_destroy(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mutex_);
    return streams_.erase(s) == 1 ? cudaSuccess : fail_with(cudaErrorInvalidResourceHandle);
  }
  /// The stream's id, or 0 when it is not a live stream.
  unsigned long long stream_id(cudaStream_t s) {
    if (s == nullptr || s == cudaStreamLegacy) return 1;
    if (s == cudaStreamPerThread) {
      thread_local unsigned long long mine = 0;
      if (mine == 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        mine = next_stream_id_++;
      }
      return mine;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = streams_.find(s);
    return it == streams_.end() ? 0 : it->second;
  }
  cudaError_t check_stream(cudaStream_t s) {
    return stream_id(s) != 0 ? cudaSuccess : fail_with(cudaErrorInvalidResourceHandle);
  }

  cudaError_t event_create(cudaEvent_t* e) {
    if (e == nullptr) return fail_with(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(mutex_);
    *e = reinterpret_cast<cudaEvent_t>(static_cast<std::uintptr_t>(0x100000 + 16 * next_event_++));
    events_.insert(*e);
    return cudaSuccess;
  }
  cudaError_t event_destroy(cudaEvent_t e) {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_.erase(e) == 1 ? cudaSuccess : fail_with(cudaErrorInvalidResourceHandle);
  }
  cudaError_t check_event(cudaEvent_t e) {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_.count(e) == 1 ? cudaSuccess : fail_with(cudaErrorInvalidResourceHandle);
  }

  static bool has_device() {
    const char* v = std::getenv("MIXMOE_HOST_MODEL_DEVICES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }

 private:
  using Blocks = std::map<const char*, std::size_t>;  // start -> size
  /// Whether [p, p + bytes) lies inside one of `blocks` (the caller holds mutex_).
  static bool inside(const Blocks& blocks, const void* p, std::size_t bytes) {
    const char* c = static_cast<const char*>(p);
    auto it = blocks.upper_bound(c);
    if (it == blocks.begin()) return false;
    --it;
    return c >= it->first && c + bytes <= it->first + it->second;
  }

  Runtime() = default;
  mutable std::mutex mutex_;
  Blocks blocks_;
  Blocks pinned_;
  std::map<cudaStream_t, unsigned long long> streams_;
  std::set<cudaEvent_t> events_;
  unsigned long long next_stream_id_ = 2;  // 1: the legacy stream
  unsigned long long next_event_ = 0;
};

/// Whether the runtime accepts a launch's configuration; records the error when not.
inline bool launch_configuration_ok(dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream) {
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    Runtime::fail_with(cudaErrorInvalidConfiguration);
    return false;
  }
  if (shared > 48 * 1024) {
    Runtime::fail_with(cudaErrorInvalidValue);
    return false;
  }
  return Runtime::instance().check_stream(stream) == cudaSuccess;
}

/// Runs `body` as every thread of the launch, after the configuration checks.
inline void launch_kernel(const std::function<void()>& body, dim3 grid, dim3 block, std::size_t shared = 0,
                          cudaStream_t stream = nullptr) {
  if (launch_configuration_ok(grid, block, shared, stream)) launch(grid, block, shared, body);
}

/// Where a translated launch statement is (its line in the translated file is the source's).
struct LaunchSite {
  const char* file;
  int line;
};
/// The launch whose arguments are being checked on this host thread, or null when none is.
inline const LaunchSite*& checked_launch() {
  thread_local const LaunchSite* site = nullptr;
  return site;
}

/// A kernel's arguments, as a translated launch passes them: run(kernel) calls the kernel with
/// them, or, while launch_kernel checks the launch, checks the pointers among them instead.
template <class... Args>
class KernelArguments {
 public:
  explicit KernelArguments(Args&&... args) : args_(std::forward<Args>(args)...) {}
  template <class Kernel>
  void run(Kernel&& kernel) && {
    if (const LaunchSite* site = checked_launch()) {
      std::apply([&](const auto&... a) {
        [[maybe_unused]] int position = 0;
        (check(*site, ++position, a), ...);
      }, args_);
      return;
    }
    std::apply(std::forward<Kernel>(kernel), std::move(args_));
  }

 private:
  template <class A>
  static void check(const LaunchSite& site, int position, const A& a) {
    using T = std::remove_cvref_t<A>;
    if constexpr (std::is_pointer_v<T> && !std::is_function_v<std::remove_pointer_t<T>>) {
      const void* p = const_cast<const void*>(static_cast<const volatile void*>(a));
      if (p == nullptr || Runtime::instance().device_may_read(p)) return;
      std::fprintf(stderr,
                   "host model: %s:%d: argument %d of the kernel launched here is %p, which is not device "
                   "memory: a host pointer, which the kernel cannot read on a GPU\n",
                   site.file, site.line, position, p);
      std::fflush(stderr);
      std::abort();
    }
  }
  std::tuple<Args&&...> args_;
};
template <class... Args>
KernelArguments<Args...> kernel_arguments(Args&&... args) {
  return KernelArguments<Args...>(std::forward<Args>(args)...);
}

/// kernel<<<grid, block, shared, stream>>>(args) as translate.cmake writes it: `body` runs
/// kernel_arguments(args).run(kernel), once on the host to check the pointer arguments (stopping
/// the program at a host pointer), then once per CUDA thread.
inline void launch_kernel(const LaunchSite& site, const std::function<void()>& body, dim3 grid, dim3 block,
                          std::size_t shared = 0, cudaStream_t stream = nullptr) {
  if (!launch_configuration_ok(grid, block, shared, stream)) return;
  {
    struct Checking {  // ends the checking mode even when an argument's expression throws
      explicit Checking(const LaunchSite& s) { checked_launch() = &s; }
      ~Checking() { checked_launch() = nullptr; }
      Checking(const Checking&) = delete;
      Checking& operator=(const Checking&) = delete;
    } checking(site);
    body();
  }
  launch(grid, block, shared, body);
}

}  // namespace host_model

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = host_model::Runtime::last_error();
  host_model::Runtime::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return host_model::Runtime::last_error(); }

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    default: return "error in the host model of CUDA";
  }
}

inline cudaError_t cudaGetDeviceCount(int* n) {
  if (n == nullptr) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  *n = host_model::Runtime::has_device() ? 1 : 0;
  return *n == 1 ? cudaSuccess : host_model::Runtime::fail_with(cudaErrorNoDevice);
}
inline cudaError_t cudaGetDevice(int* d) {
  if (d == nullptr) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : host_model::Runtime::fail_with(cudaErrorInvalidDevice); }

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (p == nullptr || d != 0) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  *p = cudaDeviceProp{};
  std::strcpy(p->name, "host model of CUDA (sm_90)");
  p->totalGlobalMem = std::size_t{80} << 30;
  p->sharedMemPerBlock = 48 * 1024;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->clockRate = 1980000;
  p->memoryClockRate = 2619000;
  p->memoryBusWidth = 5120;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (v == nullptr || d != 0) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    default: return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
/// Every kernel is "built" for sm_90: the host model compiles every code path.
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* f) {
  if (a == nullptr || f == nullptr) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  *a = cudaFuncAttributes{0, 1024, 32, 90, 90};
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) { return host_model::Runtime::instance().malloc(p, bytes); }
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) { return host_model::Runtime::instance().free(p); }
inline cudaError_t cudaHostAlloc(void** p, std::size_t bytes, unsigned) {
  return host_model::Runtime::instance().host_alloc(p, bytes);
}
inline cudaError_t cudaMallocHost(void** p, std::size_t bytes) { return host_model::Runtime::instance().host_alloc(p, bytes); }
inline cudaError_t cudaFreeHost(void* p) { return host_model::Runtime::instance().host_free(p); }

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t s = nullptr) {
  auto& rt = host_model::Runtime::instance();
  if (rt.check_stream(s) != cudaSuccess) return cudaErrorInvalidResourceHandle;
  const cudaError_t e = rt.check_copy(dst, src, bytes, kind);
  if (e != cudaSuccess) return e;
  if (bytes != 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t s = nullptr) {
  auto& rt = host_model::Runtime::instance();
  if (rt.check_stream(s) != cudaSuccess) return cudaErrorInvalidResourceHandle;
  if (bytes == 0) return cudaSuccess;
  if (!rt.on_device(p, bytes)) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }

inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return host_model::Runtime::instance().stream_create(s); }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  return host_model::Runtime::instance().stream_create(s);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { return host_model::Runtime::instance().stream_destroy(s); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { return host_model::Runtime::instance().check_stream(s); }
inline cudaError_t cudaStreamQuery(cudaStream_t s) { return host_model::Runtime::instance().check_stream(s); }
inline cudaError_t cudaStreamGetId(cudaStream_t s, unsigned long long* id) {
  if (id == nullptr) return host_model::Runtime::fail_with(cudaErrorInvalidValue);
  *id = host_model::Runtime::instance().stream_id(s);
  return *id != 0 ? cudaSuccess : host_model::Runtime::fail_with(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return host_model::Runtime::instance().event_create(e); }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  return host_model::Runtime::instance().event_create(e);
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { return host_model::Runtime::instance().event_destroy(e); }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr) {
  auto& rt = host_model::Runtime::instance();
  if (rt.check_stream(s) != cudaSuccess) return cudaErrorInvalidResourceHandle;
  return rt.check_event(e);
}
/// Work completes when issued: a recorded event is always complete.
inline cudaError_t cudaEventQuery(cudaEvent_t e) { return host_model::Runtime::instance().check_event(e); }
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return host_model::Runtime::instance().check_event(e); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
  auto& rt = host_model::Runtime::instance();
  if (rt.check_stream(s) != cudaSuccess) return cudaErrorInvalidResourceHandle;
  return rt.check_event(e);
}
