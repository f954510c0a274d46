// GPU parity of the index family (cases_index.hpp) against the CPU backend, then device-only
// checks of what has no CPU counterpart: deferred checks, uploads that do not wait, and host
// threads running the backend at the same time, each on its own stream.
#include "parity_main.cuh"

#include <cmath>
#include <cstdint>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <mixmoe/mixmoe.hpp>
#include <mixmoe/nn/linear.hpp>
#include <mixmoe/train/clip.hpp>

#include "cases_index.hpp"

namespace mixmoe_parity {
void cpu_cases_index(Results& r);
}

namespace {

using mixmoe_parity::expect;

std::uint64_t syncs() { return mixmoe::cuda::synchronization_count(); }

/// A deferred embedding check waits for nothing; a bad id's row is NaN and its gradient dropped
/// until the next synchronisation throws the error; a passing check leaves nothing pending.
void deferred_embedding() {
  using namespace mixmoe;
  const index_t v = 6, c = 5;
  const std::vector<Index> host_ids = {0, 3, 9, 5, 3, -1};  // positions 2 and 5 are bad
  const auto ids = Tensor<Index, Cuda>::from(host_ids, {2, 3});
  Var<float, Cuda> w(Tensor<float, Cuda>::from(std::vector<float>(v * c, 1.0f), {v, c}), true);
  const std::uint64_t before = syncs();
  Var<float, Cuda> y = embedding(w, ids, IndexCheck::deferred);  // (2, 3, C)
  Var<float, Cuda> g(Tensor<float, Cuda>::ones({2, 3, c}));
  sum(y * g).backward();
  expect(syncs() == before, "a deferred embedding, forward and backward, waits 0 times (got " +
                                std::to_string(syncs() - before) + ")");
  expect(mixmoe::cuda::pending_checks() == 1, "one deferred check pending (got " + std::to_string(mixmoe::cuda::pending_checks()) + ")");
  std::string message;
  try {
    (void)y.value().to_vector();
  } catch (const Error& e) {
    message = e.what();
  }
  expect(message == "[embedding] id 9 at position (0, 2) is out of range for a vocabulary of V = 6",
         "the next read throws the first bad id's error (got '" + message + "')");
  expect(mixmoe::cuda::pending_checks() == 0, "nothing pending after the report");
  const std::vector<float> out = y.value().to_vector();  // the record was cleared: reads work again
  bool rows_ok = true;
  for (index_t p = 0; p < 6; ++p)
    for (index_t k = 0; k < c; ++k) {
      const float e = out[static_cast<std::size_t>(p * c + k)];
      const bool bad = p == 2 || p == 5;
      rows_ok = rows_ok && (bad ? std::isnan(e) : e == 1.0f);
    }
  expect(rows_ok, "the rows of the bad ids are NaN, the others the table's");
  const std::vector<float> gw = w.grad().to_vector();  // row r: its count among the good ids
  const float counts[6] = {1, 0, 0, 2, 0, 1};
  bool grad_ok = true;
  for (index_t r = 0; r < v; ++r)
    for (index_t k = 0; k < c; ++k) grad_ok = grad_ok && gw[static_cast<std::size_t>(r * c + k)] == counts[r];
  expect(grad_ok, "the gradient drops the bad ids and counts the good ones");

  // a passing check: nothing thrown, nothing left pending after a synchronisation
  Var<float, Cuda> ok = embedding(w, Tensor<Index, Cuda>::from({1, 2, 3}, {3}), IndexCheck::deferred);
  mixmoe::cuda::synchronize();
  expect(mixmoe::cuda::pending_checks() == 0, "a passing deferred check is forgotten at the next synchronisation");
  // the module's default is deferred
  Embedding<float, Cuda> layer;
  layer.weight = w;
  expect(layer.check == IndexCheck::deferred, "nn::Embedding checks deferred by default");
}

/// Uploads go through pinned staging without waiting, and arrive intact, also when blocks are
/// reused many times over and sizes vary.
void staged_uploads() {
  using namespace mixmoe;
  const std::uint64_t before = syncs();
  std::vector<Tensor<Index, Cuda>> up;
  std::vector<std::vector<Index>> want;
  for (int i = 0; i < 200; ++i) {
    const std::size_t n = 1 + static_cast<std::size_t>((i * 7919) % 5000);
    std::vector<Index> h(n);
    for (std::size_t j = 0; j < n; ++j) h[j] = static_cast<Index>(i * 100003 + static_cast<int>(j));
    up.push_back(Tensor<Index, Cuda>::from(h, {static_cast<index_t>(n)}));
    want.push_back(std::move(h));  // the host buffer is gone (moved) before the device reads it
  }
  expect(syncs() == before, "200 uploads wait 0 times (got " + std::to_string(syncs() - before) + ")");
  bool same = true;
  for (std::size_t i = 0; i < up.size(); ++i) same = same && up[i].to_vector() == want[i];
  expect(same, "every staged upload arrives intact");
  expect(mixmoe::cuda::PinnedStaging::instance().pinned_bytes() <= mixmoe::cuda::PinnedStaging::kMaxPinnedBytes,
         "the staging stays within its bound");
}

/// clip_grad_norm_async leaves its result on the device: 0 waits, the host call's numbers.
void async_clipping() {
  using namespace mixmoe;
  std::vector<Var<float, Cuda>> ps;
  for (index_t n : {3, 1000, 70000}) {
    Var<float, Cuda> p(Tensor<float, Cuda>::zeros({n}), true);
    p.set_grad(mixmoe::cuda::randn<float>({n}, 40 + static_cast<std::uint64_t>(n)));
    ps.push_back(p);
  }
  const double norm = grad_norm(ps);
  const std::uint64_t before = syncs();
  const Tensor<double, Cuda> ns = clip_grad_norm_async(ps, 0.25 * norm);
  expect(syncs() == before, "clip_grad_norm_async waits 0 times");
  const std::vector<double> v = ns.to_vector();
  expect(std::abs(v[0] - norm) <= 1e-9 * norm && std::abs(v[1] - 0.25) <= 1e-9,
         "its norm and scale are grad_norm's and max_norm / norm (got " + std::to_string(v[0]) + ", " +
             std::to_string(v[1]) + ")");
  expect(std::abs(grad_norm(ps) - 0.25 * norm) <= 1e-5 * norm, "the gradients are clipped to max_norm");
}

/// Runs f on a thread of its own and waits for it; what it throws comes back as the message.
template <class F>
std::string on_thread(F&& f) {
  std::string error;
  std::thread t([&] {
    try {
      f();
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  t.join();
  return error;
}

/// Two host threads, each on its per-thread default stream (one handle, two streams): the caches
/// that outlive a call are kept per stream, so neither thread sees the other's blocks in flight,
/// deferred errors or cuFFT plans, and both compute what one thread alone computes. A thread that
/// ends gives its stream's cache back (retire_stream).
void two_threads() {
  using namespace mixmoe;
  auto& alloc = mixmoe::cuda::CachingDeviceAllocator::instance();
  auto& plans = mixmoe::cuda::FftPlanCache::instance();
  unsigned long long other_id = 0;
  std::string error = on_thread([&] { other_id = mixmoe::cuda::current_stream_id(); });
  expect(error.empty() && other_id != mixmoe::cuda::current_stream_id(),
         "two threads' per-thread streams have different ids " + error);

  // a freed block goes back to its stream's free list only; when the thread ends, to the idle pool
  const std::size_t bytes = (std::size_t{47} << 20) + 123;  // a size class nothing else here uses
  void* mine = alloc.allocate(bytes);
  alloc.deallocate(mine, bytes);
  void* theirs = nullptr;
  error = on_thread([&] {
    theirs = alloc.allocate(bytes);
    alloc.deallocate(theirs, bytes);
  });
  void* again = alloc.allocate(bytes);
  void* retired = alloc.allocate(bytes);
  expect(error.empty() && theirs != mine, "a block freed on one thread's stream is not handed to another thread's " +
                                              error);
  expect(again == mine, "it is reused on the stream that freed it");
  expect(retired == theirs, "a block of a thread that ended is reused by another stream");
  alloc.deallocate(again, bytes);
  alloc.deallocate(retired, bytes);

  // a failed deferred check is reported by its own stream's synchronisation only
  std::promise<void> enqueued, main_synced;
  std::string their_message;
  std::thread checker([&] {
    bool told = false;
    try {
      Var<float, Cuda> w(Tensor<float, Cuda>::ones({6, 4}), true);
      Var<float, Cuda> y = embedding(w, Tensor<Index, Cuda>::from({1, 7}, {2}), IndexCheck::deferred);
      enqueued.set_value();
      told = true;
      main_synced.get_future().wait();
      mixmoe::cuda::synchronize();
    } catch (const std::exception& e) {
      their_message = e.what();
      if (!told) enqueued.set_value();  // main must not wait for ever
    }
  });
  enqueued.get_future().wait();
  bool main_threw = false;
  try {
    mixmoe::cuda::synchronize();
  } catch (const Error&) {
    main_threw = true;
  }
  main_synced.set_value();
  checker.join();
  expect(!main_threw, "another thread's failed deferred check is not thrown by this thread's synchronisation");
  expect(their_message == "[embedding] id 7 at position (1) is out of range for a vocabulary of V = 6",
         "it is thrown by its own thread's (got '" + their_message + "')");
  expect(mixmoe::cuda::pending_checks() == 0, "nothing pending afterwards");
  // a thread that ends without reading its failed check: retired, the error goes to stderr
  error = on_thread([] {
    Var<float, Cuda> w(Tensor<float, Cuda>::ones({6, 4}), true);
    (void)embedding(w, Tensor<Index, Cuda>::from({9}, {1}), IndexCheck::deferred);
  });
  expect(error.empty() && mixmoe::cuda::pending_checks() == 0,
         "the checks of a thread that ended are not left pending " + error);

  // the same work on two threads at once gives one thread's results; each stream has its own plans,
  // given back when its thread ends
  const auto work = [](std::uint64_t seed) {
    Var<float, Cuda> xv = mixmoe_parity::leaf<float, Cuda>({96, 33}, seed);
    Var<float, Cuda> wv = mixmoe_parity::leaf<float, Cuda>({33, 48}, seed + 1);
    Var<float, Cuda> y = softmax(rfft_magnitude(matmul(xv, wv), 1e-6), -1);
    Var<float, Cuda> g(mixmoe_parity::randn<float, Cuda>(y.value().shape(), seed + 2));
    sum(y * g).backward();
    std::vector<float> out = y.value().to_vector();
    const std::vector<float> gx = xv.grad().to_vector();
    out.insert(out.end(), gx.begin(), gx.end());
    return out;
  };
  const std::vector<float> ref_a = work(71), ref_b = work(72);
  const std::size_t plans_before = plans.size();
  const auto close = [](const std::vector<float>& u, const std::vector<float>& v) {
    if (u.size() != v.size()) return false;
    for (std::size_t i = 0; i < u.size(); ++i)
      if (!(std::abs(u[i] - v[i]) <= 1e-5f * (1.0f + std::abs(v[i])))) return false;
    return true;
  };
  bool same = true, own_plans = true;
  std::string errors;
  for (int round = 0; round < 20; ++round) {
    std::vector<float> got_a, got_b;
    std::string error_a, error_b;
    std::promise<void> a_done, b_done, main_looked;
    std::shared_future<void> looked = main_looked.get_future().share();
    const auto worker = [&](std::uint64_t seed, std::vector<float>& got, std::string& error, std::promise<void>& done) {
      return std::thread([&, seed] {
        try {
          got = work(seed);
        } catch (const std::exception& e) {
          error = e.what();
        }
        done.set_value();
        looked.wait();  // keep the thread, and so its plans, until main has counted them
      });
    };
    std::thread ta = worker(71, got_a, error_a, a_done), tb = worker(72, got_b, error_b, b_done);
    a_done.get_future().wait();
    b_done.get_future().wait();
    own_plans = own_plans && plans.size() >= plans_before + 2;  // each live thread's stream has its plans
    main_looked.set_value();
    ta.join();
    tb.join();
    errors += error_a + error_b;
    same = same && close(got_a, ref_a) && close(got_b, ref_b);
  }
  expect(errors.empty(), "no thread threw " + errors);
  expect(same, "matmul, rfft_magnitude and softmax, forward and backward, on two threads at once (20 rounds) "
               "give one thread's results");
  expect(own_plans, "each thread's stream gets cuFFT plans of its own");
  expect(plans.size() == plans_before, "the plans of the threads that ended are gone (" +
                                           std::to_string(plans.size()) + " held, " +
                                           std::to_string(plans_before) + " before)");
}

}  // namespace

int main() {
  using namespace mixmoe_parity;
  const int rc = parity_main("test_cuda_index", cases_index<mixmoe::Cuda>, cpu_cases_index);
  return with_device_checks("test_cuda_index", rc, [] {
    deferred_embedding();
    staged_uploads();
    async_clipping();
    two_threads();
  });
}
