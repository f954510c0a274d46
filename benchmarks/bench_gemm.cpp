// GEMM throughput: mixmoe's cpu::gemm (what the library's matmul/linear call), Eigen's own
// GEMM (cpu::gemm_eigen) and a direct cblas_sgemm call (OpenBLAS, the peer), float, in the
// same run, at square sizes and at the transformer shapes of the forward and backward
// passes, on 1 and 2 threads. Also measures the machine's FMA peak with an independent-
// accumulator loop and reports each GEMM as a fraction of it.
//
//   bench_gemm [--quick] [--reps N] [--min-time SECONDS] [--threads 1,2] [--no-trim]
//
// --no-trim stops glibc from returning freed heap to the system (mallopt). Eigen's GEMM
// allocates its packing buffers on every call; depending on the heap's history glibc then
// shrinks and regrows the heap (or maps and unmaps the buffers) around each call, and the
// page faults can cost more than the product at small sizes. The option shows Eigen's
// kernels without that cost; the default shows what a process gets as it comes.
//
// Each configuration is timed `reps` times after a warm-up; one sample repeats the call
// until min-time has passed. The three implementations are sampled in rotation, so a burst
// of load from a neighbour hits all of them alike and the ratios stay fair. Medians are
// reported. The load average at start and end is printed: the machine may be shared.
#include <mixmoe/backend/cpu/gemm.hpp>
#include <mixmoe/core/random.hpp>
#include <mixmoe/core/tensor.hpp>

#ifdef MIXMOE_BENCH_HAVE_CBLAS
#include <cblas.h>
#endif
#include <immintrin.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using mixmoe::index_t;
using Clock = std::chrono::steady_clock;

struct Options {
  bool quick = false;
  int reps = 7;
  double min_time = 0.2;  // seconds per sample
  std::vector<int> threads{1, 2};
  bool no_trim = false;
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--quick] [--reps N] [--min-time SECONDS] [--threads 1,2] [--no-trim]\n", argv0);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  bool reps_set = false, time_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(argv[0]);
      return argv[++i];
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-trim") {
      o.no_trim = true;
    } else if (a == "--reps") {
      o.reps = std::max(1, std::atoi(value().c_str()));
      reps_set = true;
    } else if (a == "--min-time") {
      o.min_time = std::max(0.0, std::atof(value().c_str()));
      time_set = true;
    } else if (a == "--threads") {
      o.threads.clear();
      std::stringstream ss(value());
      for (std::string t; std::getline(ss, t, ',');)
        if (std::atoi(t.c_str()) > 0) o.threads.push_back(std::atoi(t.c_str()));
      if (o.threads.empty()) usage(argv[0]);
    } else {
      usage(argv[0]);
    }
  }
  if (o.quick) {
    if (!reps_set) o.reps = 3;
    if (!time_set) o.min_time = 0.03;
  }
  return o;
}

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) {
      const auto p = line.find(':');
      return p == std::string::npos ? line : line.substr(p + 2);
    }
  return "unknown";
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Seconds per call of f: repeats it until min_time has passed (at least once).
double time_per_call(const std::function<void()>& f, double min_time) {
  index_t iters = 0;
  const auto t0 = Clock::now();
  double elapsed = 0;
  do {
    f();
    ++iters;
    elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (elapsed < min_time);
  return elapsed / static_cast<double>(iters);
}

// ---- FMA peak ---------------------------------------------------------------

// kAcc independent accumulators hide the FMA latency (4 cycles x 2 pipes needs >= 8 in flight).
constexpr int kAcc = 16;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
const char* const kIsa = "AVX-512";
double fma_kernel(index_t iters) {
  __m512 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_ps(1.0f + 1e-3f * static_cast<float>(j));
  const __m512 a = _mm512_set1_ps(0.9999999f), b = _mm512_set1_ps(1e-7f);
  for (index_t i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_ps(s, acc[j]);
  // a store and a scalar sum: GCC 12 warns inside its own _mm512_reduce_add_ps (PR 105593)
  float out[16];
  _mm512_storeu_ps(out, s);
  double total = 0;
  for (float v : out) total += v;
  return total;
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
const char* const kIsa = "AVX2";
double fma_kernel(index_t iters) {
  __m256 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_set1_ps(1.0f + 1e-3f * static_cast<float>(j));
  const __m256 a = _mm256_set1_ps(0.9999999f), b = _mm256_set1_ps(1e-7f);
  for (index_t i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  __m256 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_ps(s, acc[j]);
  float out[8];
  _mm256_storeu_ps(out, s);
  double total = 0;
  for (float v : out) total += v;
  return total;
}
#else
constexpr int kLanes = 0;
const char* const kIsa = "none";
double fma_kernel(index_t) { return 0; }
#endif

volatile double g_sink = 0;

/// Float FMA peak in GFLOP/s with `threads` threads each running the FMA loop (best of `reps` samples).
double fma_peak(int threads, int reps, double min_time) {
  if (kLanes == 0) return 0;
  const index_t iters = 1 << 22;
  const double flops_per_thread = 2.0 * kLanes * kAcc * static_cast<double>(iters);
  std::vector<double> samples;
  for (int r = 0; r < reps + 1; ++r) {  // the first sample is a warm-up (clocks ramp up)
    const auto t0 = Clock::now();
    index_t rounds = 0;
    double elapsed = 0;
    do {
      std::vector<std::thread> pool;
      std::atomic<double> sink{0};
      for (int t = 0; t < threads; ++t) pool.emplace_back([&] { sink.store(fma_kernel(iters)); });
      for (auto& th : pool) th.join();
      g_sink = g_sink + sink.load();
      ++rounds;
      elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (elapsed < min_time);
    if (r > 0) samples.push_back(flops_per_thread * threads * static_cast<double>(rounds) / elapsed * 1e-9);
  }
  // The best sample: a peak is what the core can do, and load from neighbours only lowers it.
  return *std::max_element(samples.begin(), samples.end());
}

// ---- GEMM -----------------------------------------------------------------

struct Case {
  std::string name;
  bool ta, tb;
  index_t m, n, k;
};

std::string op_name(const Case& c) {
  if (!c.ta && !c.tb) return "A B";
  if (c.ta && !c.tb) return "A^T B";
  if (!c.ta && c.tb) return "A B^T";
  return "A^T B^T";
}

std::vector<Case> cases(bool quick) {
  std::vector<Case> cs;
  const std::vector<index_t> squares = quick ? std::vector<index_t>{256, 512} : std::vector<index_t>{256, 512, 1024, 2048};
  for (index_t s : squares) cs.push_back({"square " + std::to_string(s), false, false, s, s, s});
  struct Mnk {
    const char* what;
    index_t m, n, k;
  };
  // (tokens x d_model) by (d_model x d_ff), (tokens x d_ff) by (d_ff x d_model), (tokens x d_model) by (d_model x vocab)
  const std::vector<Mnk> shapes = quick ? std::vector<Mnk>{{"ffn up", 1024, 1024, 256}}
                                        : std::vector<Mnk>{{"ffn up", 4096, 1024, 256},
                                                           {"ffn down", 4096, 256, 1024},
                                                           {"lm head", 2048, 8000, 256}};
  // The backward of C = A B uses A^T-forms (dB = A^T dC) and B^T-forms (dA = dC B^T); the
  // same M, N, K with a transposed operand exercises the other packing paths.
  for (const auto& s : shapes)
    for (auto [ta, tb] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true}})
      cs.push_back({s.what, ta, tb, s.m, s.n, s.k});
  return cs;
}

enum Impl { kBlas, kMixmoe, kEigen, kImpls };

struct Result {
  Case c;
  double gflops[kImpls] = {0, 0, 0};  // median; 0 when not available
  double check = 0;                   // max relative difference between the implementations' results
};

Result run_case(const Case& c, const Options& opt) {
  using T = mixmoe::Tensor<float>;
  mixmoe::Generator gen(42);
  // Stored shapes: A is (m, k), or (k, m) when transposed; B is (k, n), or (n, k).
  const T a = T::randn(c.ta ? mixmoe::Shape{c.k, c.m} : mixmoe::Shape{c.m, c.k}, gen);
  const T b = T::randn(c.tb ? mixmoe::Shape{c.n, c.k} : mixmoe::Shape{c.k, c.n}, gen);
  T out[kImpls] = {T::zeros({c.m, c.n}), T::zeros({c.m, c.n}), T::zeros({c.m, c.n})};
  const index_t lda = c.ta ? c.m : c.k, ldb = c.tb ? c.k : c.n;
  std::function<void()> fns[kImpls];
#ifdef MIXMOE_BENCH_HAVE_CBLAS
  fns[kBlas] = [&, cc = out[kBlas]] {
    cblas_sgemm(CblasRowMajor, c.ta ? CblasTrans : CblasNoTrans, c.tb ? CblasTrans : CblasNoTrans, static_cast<int>(c.m),
                static_cast<int>(c.n), static_cast<int>(c.k), 1.0f, a.data(), static_cast<int>(lda), b.data(),
                static_cast<int>(ldb), 0.0f, cc.data(), static_cast<int>(c.n));
  };
#endif
  fns[kMixmoe] = [&, cc = out[kMixmoe]] {
    mixmoe::cpu::gemm(c.ta, c.tb, c.m, c.n, c.k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, cc.data(), c.n);
  };
  fns[kEigen] = [&, cc = out[kEigen]] {
    mixmoe::cpu::gemm_eigen(c.ta, c.tb, c.m, c.n, c.k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, cc.data(), c.n);
  };

  Result res{c};
  for (int i = 0; i < kImpls; ++i)
    if (fns[i]) fns[i]();  // warm-up: page in the operands, start the BLAS threads, fill the caches
  // The three must compute the same product (same operation, same operands).
  const auto ref = out[kMixmoe].to_vector();
  double scale = 0;
  for (float v : ref) scale = std::max(scale, static_cast<double>(std::abs(v)));
  for (int i = 0; i < kImpls; ++i) {
    if (!fns[i] || i == kMixmoe) continue;
    const auto v = out[i].to_vector();
    for (std::size_t j = 0; j < v.size(); ++j)
      res.check = std::max(res.check, std::abs(static_cast<double>(v[j]) - ref[j]) / std::max(scale, 1e-30));
  }
  std::vector<double> samples[kImpls];
  for (int r = 0; r < opt.reps; ++r)
    for (int i = 0; i < kImpls; ++i)
      if (fns[i]) samples[i].push_back(time_per_call(fns[i], opt.min_time));
  const double flops = 2.0 * static_cast<double>(c.m) * static_cast<double>(c.n) * static_cast<double>(c.k);
  for (int i = 0; i < kImpls; ++i)
    if (!samples[i].empty()) res.gflops[i] = flops / median(samples[i]) * 1e-9;
  return res;
}

void set_threads(int t) {
#ifdef MIXMOE_BENCH_HAVE_CBLAS
  openblas_set_num_threads(t);
#endif
  Eigen::setNbThreads(t);  // no effect unless built with OpenMP
}

int eigen_threads() { return Eigen::nbThreads(); }

std::string pct(double x, double peak) {
  if (peak <= 0 || x <= 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f%%", 100.0 * x / peak);
  return buf;
}

std::string ratio(double x, double y) {
  if (x <= 0 || y <= 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", x / y);
  return buf;
}

std::string gf(double x) {
  if (x <= 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", x);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  bool trim_off = false;
#ifdef __GLIBC__
  if (opt.no_trim) trim_off = mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 && mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1;
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  std::printf("# mixmoe GEMM benchmark (float)%s\n\n", opt.quick ? " -- quick mode, reduced set" : "");
  std::printf("- load average at start: %s\n", read_first_line("/proc/loadavg").c_str());
  std::printf("- CPU: %s, %u logical CPUs\n", cpu_model().c_str(), hw);
  std::printf("- mixmoe cpu::gemm backend: %s\n", mixmoe::cpu::gemm_backend());
#ifdef MIXMOE_BENCH_HAVE_CBLAS
  std::printf("- OpenBLAS: %s (core %s)\n", openblas_get_config(), openblas_get_corename());
#else
  std::printf("- OpenBLAS: not linked (configure with OpenBLAS installed for the peer column)\n");
#endif
#ifdef _OPENMP
  std::printf("- Eigen %d.%d.%d with OpenMP: Eigen::setNbThreads sets its threads\n", EIGEN_WORLD_VERSION,
              EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
#else
  std::printf("- Eigen %d.%d.%d without OpenMP: Eigen's GEMM is single-threaded here whatever the thread count\n",
              EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
#endif
  std::printf("- %d samples per configuration (median reported), each >= %.3f s, after one warm-up call\n", opt.reps,
              opt.min_time);
  std::printf("- FMA peak loop: %s, %d independent accumulators (best sample reported)\n", kIsa, kAcc);
  std::printf("- heap trimming: %s\n\n", trim_off ? "off (--no-trim: freed memory stays in the heap)"
                                                   : (opt.no_trim ? "could not be turned off" : "glibc default"));
  std::fflush(stdout);

  const auto cs = cases(opt.quick);
  for (int t : opt.threads) {
    set_threads(t);
    const double peak = fma_peak(t, opt.quick ? 3 : 5, opt.quick ? 0.05 : 0.2);
    std::printf("## %d thread%s (OpenBLAS/mixmoe %d, Eigen %d); FMA peak %.1f GFLOP/s\n\n", t, t > 1 ? "s" : "", t,
                eigen_threads(), peak);
    std::printf("| shape | op | M | N | K | OpenBLAS GFLOP/s | mixmoe GFLOP/s | Eigen GFLOP/s | mixmoe/OpenBLAS | "
                "Eigen/OpenBLAS | OpenBLAS %% peak | mixmoe %% peak | Eigen %% peak |\n");
    std::printf("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    std::fflush(stdout);
    double worst_check = 0;
    for (const Case& c : cs) {
      const Result r = run_case(c, opt);
      worst_check = std::max(worst_check, r.check);
      std::printf("| %s | %s | %lld | %lld | %lld | %s | %s | %s | %s | %s | %s | %s | %s |\n", c.name.c_str(),
                  op_name(c).c_str(), static_cast<long long>(c.m), static_cast<long long>(c.n),
                  static_cast<long long>(c.k), gf(r.gflops[kBlas]).c_str(), gf(r.gflops[kMixmoe]).c_str(),
                  gf(r.gflops[kEigen]).c_str(), ratio(r.gflops[kMixmoe], r.gflops[kBlas]).c_str(),
                  ratio(r.gflops[kEigen], r.gflops[kBlas]).c_str(), pct(r.gflops[kBlas], peak).c_str(),
                  pct(r.gflops[kMixmoe], peak).c_str(), pct(r.gflops[kEigen], peak).c_str());
      std::fflush(stdout);
    }
    std::printf("\nlargest relative difference between the implementations' results: %.1e%s\n\n", worst_check,
                worst_check > 1e-3 ? "  (MISMATCH: the implementations disagree)" : "");
  }
  std::printf("- load average at end: %s\n", read_first_line("/proc/loadavg").c_str());
  return 0;
}
