// A small thread pool for the element-wise and reduction kernels.
//
// Workers sleep on a condition variable between jobs (they never spin), so a
// busy neighbour on a shared 2-core machine slows mixmoe down by at most its
// share, instead of the 10-30x collapse of spin-waiting OpenMP teams.
// Thread count: MIXMOE_NUM_THREADS, else the hardware concurrency.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "mixmoe/core/shape.hpp"

namespace mixmoe::cpu {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool(default_threads());
    return pool;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  [[nodiscard]] int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  /// Runs body(begin, end) over [0, n) split into about num_threads() chunks of at
  /// least `grain` items; the calling thread takes a chunk too. Serial when the work
  /// is small, when called from inside a worker, or with one thread.
  template <class F>
  void run(index_t n, index_t grain, F&& body) {
    if (n <= 0) return;
    const index_t max_chunks = std::max<index_t>(1, n / std::max<index_t>(grain, 1));
    const index_t chunks = std::min<index_t>(num_threads(), max_chunks);
    if (chunks <= 1 || in_worker()) {
      body(index_t{0}, n);
      return;
    }
    std::unique_lock<std::mutex> job_lock(job_mutex_);  // one parallel job at a time
    using Body = std::remove_reference_t<F>;
    Job job;
    job.n = n;
    job.chunks = chunks;
    job.ctx = const_cast<void*>(static_cast<const void*>(&body));
    job.call = [](void* ctx, index_t b, index_t e) { (*static_cast<Body*>(ctx))(b, e); };
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    in_worker() = true;
    work_on(job);
    in_worker() = false;
    std::unique_lock<std::mutex> lock(mutex_);
    // Wait for the chunks and for every worker that picked up this job to let go of it.
    done_.wait(lock, [&] { return job.finished.load() == job.chunks && active_ == 0; });
    job_ = nullptr;
  }

 private:
  struct Job {
    index_t n = 0, chunks = 0;
    void* ctx = nullptr;
    void (*call)(void*, index_t, index_t) = nullptr;
    std::atomic<index_t> next{0};
    std::atomic<index_t> finished{0};
  };

  static int default_threads() {
    if (const char* env = std::getenv("MIXMOE_NUM_THREADS")) {
      const int n = std::atoi(env);
      if (n > 0) return n;
    }
    return std::max(1u, std::thread::hardware_concurrency());
  }

  static bool& in_worker() {
    thread_local bool flag = false;
    return flag;
  }

  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  void work_on(Job& job) {
    for (index_t c; (c = job.next.fetch_add(1)) < job.chunks;) {
      const index_t b = job.n * c / job.chunks, e = job.n * (c + 1) / job.chunks;
      job.call(job.ctx, b, e);
      if (job.finished.fetch_add(1) + 1 == job.chunks) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }

  void worker_loop() {
    in_worker() = true;
    std::uint64_t seen = 0;
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && job_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        job = job_;
        ++active_;
      }
      work_on(*job);
      std::lock_guard<std::mutex> lock(mutex_);
      --active_;
      done_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, job_mutex_;
  std::condition_variable wake_, done_;
  Job* job_ = nullptr;
  std::uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
};

/// parallel_for(n, grain, [&](index_t begin, index_t end) { ... }).
template <class F>
void parallel_for(index_t n, index_t grain, F&& body) {
  ThreadPool::instance().run(n, grain, std::forward<F>(body));
}

}  // namespace mixmoe::cpu
