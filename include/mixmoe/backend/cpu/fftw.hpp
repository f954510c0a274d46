// FFTW plans for the CPU: a process-wide cache of real-to-complex (r2c) and
// complex-to-real (c2r) plans per (transform, length, precision, planner effort),
// shared by every thread.
//
// The FFTW planner is not thread-safe: every call that makes or destroys a plan
// holds planner_mutex(). Executing a plan is thread-safe with the new-array
// functions (fftw_execute_dft_r2c / _c2r and their fftwf_ forms), so a cached plan
// runs concurrently on many rows from many threads without a lock.
//
// Plans are made on freshly allocated, SIMD-aligned scratch arrays (so
// FFTW_MEASURE, which overwrites its arrays while timing, never touches user data),
// and therefore assume aligned arrays at execution. execute_r2c/execute_c2r check
// the alignment of the arrays they are given and stage misaligned rows through
// per-thread aligned buffers, so any row of a tensor can be transformed.
//
// Lengths: n real samples <-> n/2 + 1 complex bins (interleaved re, im).
#pragma once

#include <fftw3.h>

#include <cstddef>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <tuple>
#include <type_traits>

#include "mixmoe/core/device.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"

namespace mixmoe::cpu::fft {

enum class Transform { r2c, c2r };

/// Planner effort: estimate plans instantly; measure times candidate algorithms
/// when a length is first seen (slower to plan, sometimes faster to run).
enum class Effort : unsigned { estimate = FFTW_ESTIMATE, measure = FFTW_MEASURE };

/// The one lock around the FFTW planner (both precisions); hold it for any direct
/// call to fftw_plan_* / fftw_destroy_plan made outside this cache.
inline std::mutex& planner_mutex() {
  static std::mutex m;
  return m;
}

/// The FFTW C API for one precision.
template <Scalar T>
struct Api;

template <>
struct Api<double> {
  using Plan = fftw_plan;
  using Complex = fftw_complex;
  static Plan plan_r2c(int n, double* in, Complex* out, unsigned flags) { return fftw_plan_dft_r2c_1d(n, in, out, flags); }
  static Plan plan_c2r(int n, Complex* in, double* out, unsigned flags) { return fftw_plan_dft_c2r_1d(n, in, out, flags); }
  static void r2c(Plan p, double* in, Complex* out) { fftw_execute_dft_r2c(p, in, out); }
  static void c2r(Plan p, Complex* in, double* out) { fftw_execute_dft_c2r(p, in, out); }
  static void destroy(Plan p) { fftw_destroy_plan(p); }
  static void* alloc(std::size_t bytes) { return fftw_malloc(bytes); }
  static void release(void* p) { fftw_free(p); }
  static int alignment_of(double* p) { return fftw_alignment_of(p); }
};

template <>
struct Api<float> {
  using Plan = fftwf_plan;
  using Complex = fftwf_complex;
  static Plan plan_r2c(int n, float* in, Complex* out, unsigned flags) { return fftwf_plan_dft_r2c_1d(n, in, out, flags); }
  static Plan plan_c2r(int n, Complex* in, float* out, unsigned flags) { return fftwf_plan_dft_c2r_1d(n, in, out, flags); }
  static void r2c(Plan p, float* in, Complex* out) { fftwf_execute_dft_r2c(p, in, out); }
  static void c2r(Plan p, Complex* in, float* out) { fftwf_execute_dft_c2r(p, in, out); }
  static void destroy(Plan p) { fftwf_destroy_plan(p); }
  static void* alloc(std::size_t bytes) { return fftwf_malloc(bytes); }
  static void release(void* p) { fftwf_free(p); }
  static int alignment_of(float* p) { return fftwf_alignment_of(p); }
};

/// An FFTW-aligned buffer of T, owned (fftw_malloc / fftw_free).
template <Scalar T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t count) { reserve(count); }
  ~AlignedBuffer() { Api<T>::release(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  /// Grows to hold at least `count` elements (contents are not kept).
  T* reserve(std::size_t count) {
    if (count > count_) {
      Api<T>::release(ptr_);
      ptr_ = nullptr;
      count_ = 0;
      ptr_ = static_cast<T*>(Api<T>::alloc(sizeof(T) * (count ? count : 1)));
      if (!ptr_) throw std::bad_alloc();
      count_ = count;
    }
    return ptr_;
  }
  [[nodiscard]] T* data() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

/// The process-wide plan cache. Plans live until exit; the cache's destructor
/// (at static destruction, when no transform can still be running) destroys them.
class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache cache;
    return cache;
  }

  PlanCache(const PlanCache&) = delete;
  PlanCache& operator=(const PlanCache&) = delete;

  ~PlanCache() {
    std::lock_guard<std::mutex> lock(planner_mutex());
    for (auto& [key, plan] : plans_d_) Api<double>::destroy(plan);
    for (auto& [key, plan] : plans_f_) Api<float>::destroy(plan);
    plans_d_.clear();
    plans_f_.clear();
  }

  /// Effort used for plans made from now on (lengths already planned keep their
  /// plan for the previous effort, which stays cached under that effort).
  void set_effort(Effort e) {
    std::lock_guard<std::mutex> lock(planner_mutex());
    effort_ = e;
  }
  [[nodiscard]] Effort effort() const {
    std::lock_guard<std::mutex> lock(planner_mutex());
    return effort_;
  }

  /// Number of cached plans (both precisions).
  [[nodiscard]] std::size_t size() const {
    std::lock_guard<std::mutex> lock(planner_mutex());
    return plans_d_.size() + plans_f_.size();
  }

  /// The plan for a transform of n real samples in precision T, made on first use.
  template <Scalar T>
  typename Api<T>::Plan get(Transform t, index_t n) {
    MIXMOE_CHECK(n >= 1 && n <= index_t{1} << 30, "fft", "transform length ", n, " out of range [1, 2^30]");
    std::lock_guard<std::mutex> lock(planner_mutex());
    auto& plans = table<T>();
    const Key key{static_cast<int>(t), n, static_cast<unsigned>(effort_)};
    if (auto it = plans.find(key); it != plans.end()) return it->second;
    // Scratch arrays, aligned like the tensors' rows will be after staging; MEASURE overwrites them.
    const auto bins = static_cast<std::size_t>(n / 2 + 1);
    AlignedBuffer<T> real(static_cast<std::size_t>(n)), cplx(2 * bins);
    auto* c = reinterpret_cast<typename Api<T>::Complex*>(cplx.data());
    const unsigned flags = key.flags;
    typename Api<T>::Plan p = t == Transform::r2c ? Api<T>::plan_r2c(static_cast<int>(n), real.data(), c, flags)
                                                  : Api<T>::plan_c2r(static_cast<int>(n), c, real.data(), flags);
    MIXMOE_CHECK(p != nullptr, "fft", "FFTW could not plan a transform of length ", n);
    plans.emplace(key, p);
    return p;
  }

 private:
  // The mutex is made first so that it is destroyed after the cache, whose destructor locks it.
  PlanCache() { (void)planner_mutex(); }

  struct Key {
    int transform;
    index_t n;
    unsigned flags;
    bool operator<(const Key& o) const { return std::tie(transform, n, flags) < std::tie(o.transform, o.n, o.flags); }
  };

  template <Scalar T>
  auto& table() {
    if constexpr (std::is_same_v<T, double>)
      return plans_d_;
    else
      return plans_f_;
  }

  std::map<Key, fftw_plan> plans_d_;
  std::map<Key, fftwf_plan> plans_f_;
  Effort effort_ = Effort::estimate;
};

namespace detail {

/// Per-thread aligned staging buffers, one per slot, reused across calls.
template <Scalar T, int Slot>
T* staging(std::size_t count) {
  thread_local AlignedBuffer<T> buf;
  return buf.reserve(count);
}

template <Scalar T>
bool aligned(T* p) {
  return Api<T>::alignment_of(p) == 0;
}

}  // namespace detail

/// out[0 .. 2*(n/2+1)) = r2c(in[0 .. n)) with interleaved (re, im); `in` is not modified.
template <Scalar T>
void execute_r2c(typename Api<T>::Plan plan, index_t n, const T* in, T* out) {
  const auto nr = static_cast<std::size_t>(n), nc = 2 * static_cast<std::size_t>(n / 2 + 1);
  // An out-of-place r2c plan preserves its input, so the const_cast is never written through.
  T* src = const_cast<T*>(in);
  if (!detail::aligned(src)) {
    src = detail::staging<T, 0>(nr);
    std::memcpy(src, in, nr * sizeof(T));
  }
  T* dst = detail::aligned(out) ? out : detail::staging<T, 1>(nc);
  Api<T>::r2c(plan, src, reinterpret_cast<typename Api<T>::Complex*>(dst));
  if (dst != out) std::memcpy(out, dst, nc * sizeof(T));
}

/// out[0 .. n) = c2r(in[0 .. 2*(n/2+1))), unnormalised. `in` is overwritten (c2r destroys
/// its input), so pass a scratch row.
template <Scalar T>
void execute_c2r(typename Api<T>::Plan plan, index_t n, T* in, T* out) {
  const auto nr = static_cast<std::size_t>(n), nc = 2 * static_cast<std::size_t>(n / 2 + 1);
  T* src = in;
  if (!detail::aligned(src)) {
    src = detail::staging<T, 0>(nc);
    std::memcpy(src, in, nc * sizeof(T));
  }
  T* dst = detail::aligned(out) ? out : detail::staging<T, 1>(nr);
  Api<T>::c2r(plan, reinterpret_cast<typename Api<T>::Complex*>(src), dst);
  if (dst != out) std::memcpy(out, dst, nr * sizeof(T));
}

}  // namespace mixmoe::cpu::fft
