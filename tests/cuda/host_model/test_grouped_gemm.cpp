// The grouped GEMM kernels of backend/cuda/grouped_gemm_kernels.cuh, run on the CPU under the host
// model of CUDA's bf16 and WMMA headers (host_model.hpp), against double references over the same
// operands: the tensor-core kernels (bf16, and float rounded to TF32) and the SIMT kernels (float,
// double, bf16 widened), with
// experts that have no rows, rows that end inside a tile, offsets outside [0, m), padded leading
// dimensions, B transposed, accumulation into C, a grid smaller than the tile list (the grid-stride
// loop), operand rows copied in 16-byte pieces and value by value, and the weight gradient adding
// into dw. The model checks the WMMA pointers' alignment and leading dimensions and the 16-byte
// copies' alignment; the sizes are not multiples of the tiles, so every zero-filled edge is read.
// Exit status 0 when every result is within 1e-4 (1e-12 in double) relative to the sum of
// |products| and nothing outside the rows written was touched, and the model's own checks
// (test_model.cpp, run first) pass.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <mixmoe/backend/cuda/grouped_gemm_kernels.cuh>

namespace {

using mixmoe::index_t;
namespace k = mixmoe::cuda::kernels;

int failures = 0;

std::string sci(double v) {
  std::ostringstream os;
  os.precision(2);
  os << std::scientific << v;
  return os.str();
}

void expect(bool ok, const std::string& what) {
  std::printf("  %s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++failures;
}

template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937& gen) {
  std::normal_distribution<double> d;
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      x = __float2bfloat16(static_cast<float>(d(gen)));
    else
      x = static_cast<T>(d(gen));
  }
  return v;
}

double f(__nv_bfloat16 h) { return __bfloat162float(h); }
double f(float x) { return x; }
double f(double x) { return x; }

/// Which kernels run: the tensor-core ones (bf16 operands) or the SIMT ones (TIn operands).
enum class Kind { tensor_cores, simt };

template <class TIn, Kind kind>
std::string label() {
  if (kind == Kind::tensor_cores) return std::is_same_v<TIn, float> ? "[tensor cores tf32] " : "[tensor cores bf16] ";
  if (std::is_same_v<TIn, double>) return "[SIMT f64] ";
  return std::is_same_v<TIn, float> ? "[SIMT f32] " : "[SIMT bf16] ";
}

/// An operand as the kernel multiplies it: float rounded to TF32 on the tensor cores.
template <Kind kind, class TIn>
double operand(TIn v) {
  if constexpr (kind == Kind::tensor_cores && std::is_same_v<TIn, float>)
    return nvcuda::wmma::__float_to_tf32(v);
  else
    return f(v);
}

/// The rows [lo, hi) of expert x, clamped as the kernels clamp them.
std::pair<index_t, index_t> rows_of(const std::vector<index_t>& offsets, index_t x, index_t m) {
  const index_t lo = std::clamp<index_t>(offsets[x], 0, m);
  const index_t hi = std::clamp<index_t>(offsets[x + 1], lo, m);
  return {lo, hi};
}

/// tile_start as gemm_tile_starts should make it: ceil(rows / kGemmBM) tiles per expert.
std::vector<long long> expected_tile_starts(const std::vector<index_t>& offsets, index_t e, index_t m) {
  std::vector<long long> ts(static_cast<std::size_t>(e + 1), 0);
  for (index_t x = 0; x < e; ++x) {
    const auto [lo, hi] = rows_of(offsets, x, m);
    ts[static_cast<std::size_t>(x + 1)] = ts[static_cast<std::size_t>(x)] + (hi - lo + k::kGemmBM - 1) / k::kGemmBM;
  }
  return ts;
}

/// tile_start made by the kernel (one block of kGemmThreads: its scan's warp shuffles and carry).
std::vector<long long> tile_starts(const std::vector<index_t>& offsets, index_t e, index_t m) {
  std::vector<long long> ts(static_cast<std::size_t>(e + 1), -1);
  host_model::launch(dim3{1, 1, 1}, k::kGemmThreads, [&] { k::gemm_tile_starts<>(offsets.data(), e, m, ts.data()); });
  return ts;
}

/// gemm_tile_starts against the count on the host, with more experts than threads (the carry).
void check_tile_starts(std::mt19937& gen) {
  for (const index_t e : {1, 5, 255, 256, 600}) {
    std::vector<index_t> offsets(static_cast<std::size_t>(e + 1));
    std::uniform_int_distribution<index_t> rows(0, 150);
    for (std::size_t x = 1; x < offsets.size(); ++x) offsets[x] = offsets[x - 1] + rows(gen);
    const index_t m = offsets.back() - 7;  // the last expert's rows run past m: clamped
    expect(tile_starts(offsets, e, m) == expected_tile_starts(offsets, e, m),
           "gemm_tile_starts, " + std::to_string(e) + " experts: the host's count");
  }
}

struct GemmCase {
  std::string name;
  index_t m, n, kk, e;
  std::vector<index_t> offsets;
  bool trans_b, accumulate;
  index_t pad;          // extra columns of A, B and C beyond their rows (leading dimensions)
  unsigned grid_y = 0;  // 0: the full tile bound
};

template <class TIn, class Acc, Kind kind>
void run_gemm(const GemmCase& c, std::mt19937& gen) {
  const index_t m = c.m, n = c.n, kd = c.kk, e = c.e;
  const index_t lda = kd + c.pad, ldc = n + c.pad;
  const index_t ldb = (c.trans_b ? kd : n) + c.pad;
  const index_t b_rows = c.trans_b ? n : kd, stride_b = b_rows * ldb;
  const auto a = random_values<TIn>(static_cast<std::size_t>(m * lda), gen);
  const auto b = random_values<TIn>(static_cast<std::size_t>(e * stride_b), gen);
  std::vector<Acc> cmat(static_cast<std::size_t>(m * ldc));
  std::uniform_real_distribution<double> u(-1, 1);
  for (auto& x : cmat) x = static_cast<Acc>(u(gen));
  const std::vector<Acc> c0 = cmat;
  const auto ts = tile_starts(c.offsets, e, m);
  const index_t tile_bound = (m + k::kTcBM - 1) / k::kTcBM + e;
  const dim3 grid{static_cast<unsigned>((n + k::kTcBN - 1) / k::kTcBN),
                  c.grid_y ? c.grid_y : static_cast<unsigned>(std::min<index_t>(tile_bound, 65535)), 1};
  if constexpr (kind == Kind::tensor_cores)
    host_model::launch(grid, k::kTcThreads, [&] {
      k::grouped_gemm_tc<TIn>(m, n, kd, e, c.offsets.data(), ts.data(), tile_bound, a.data(), lda, b.data(), ldb,
                              stride_b, c.trans_b, cmat.data(), ldc, c.accumulate);
    });
  else
    host_model::launch(grid, k::kGemmThreads, [&] {
      k::grouped_gemm_tiles<TIn, Acc>(m, n, kd, e, c.offsets.data(), ts.data(), tile_bound, a.data(), lda, b.data(),
                                      ldb, stride_b, c.trans_b, cmat.data(), ldc, c.accumulate);
    });
  double worst = 0, worst_unrounded = 0;
  bool untouched = true;
  std::vector<char> written(static_cast<std::size_t>(m), 0);
  for (index_t x = 0; x < e; ++x) {
    const auto [lo, hi] = rows_of(c.offsets, x, m);
    const TIn* bx = b.data() + x * stride_b;
    for (index_t r = lo; r < hi; ++r) {
      written[static_cast<std::size_t>(r)] = 1;
      for (index_t col = 0; col < n; ++col) {
        double s = 0, mag = 0, s_unrounded = 0;
        for (index_t q = 0; q < kd; ++q) {
          const TIn av = a[static_cast<std::size_t>(r * lda + q)];
          const TIn bv = c.trans_b ? bx[col * ldb + q] : bx[q * ldb + col];
          const double p = operand<kind>(av) * operand<kind>(bv);
          s += p;
          s_unrounded += f(av) * f(bv);
          mag += std::abs(p);
        }
        const std::size_t at = static_cast<std::size_t>(r * ldc + col);
        if (c.accumulate) {
          s += c0[at];
          s_unrounded += c0[at];
        }
        worst = std::max(worst, std::abs(cmat[at] - s) / (1.0 + mag + std::abs(s)));
        worst_unrounded = std::max(worst_unrounded, std::abs(cmat[at] - s_unrounded) / (1.0 + mag + std::abs(s)));
      }
    }
  }
  for (index_t r = 0; r < m; ++r)
    for (index_t col = 0; col < ldc; ++col) {
      const std::size_t at = static_cast<std::size_t>(r * ldc + col);
      if ((!written[static_cast<std::size_t>(r)] || col >= n) && cmat[at] != c0[at]) untouched = false;
    }
  const double tol = std::is_same_v<Acc, double> ? 1e-12 : 1e-4;
  expect(worst <= tol, label<TIn, kind>() + "grouped GEMM " + c.name + ": worst relative error " + sci(worst));
  expect(untouched,
         label<TIn, kind>() + "grouped GEMM " + c.name + ": rows of no expert and the padding are untouched");
  if (kind == Kind::tensor_cores && std::is_same_v<TIn, float> && kd >= 16)  // the rounding is not skipped
    expect(worst_unrounded > 1e-5, label<TIn, kind>() + "grouped GEMM " + c.name +
                                       ": differs from the unrounded fp32 products by " + sci(worst_unrounded));
}

struct WgradCase {
  std::string name;
  index_t m, n, kk, e;
  std::vector<index_t> offsets;
};

template <class TIn, class Acc, Kind kind>
void run_wgrad(const WgradCase& c, std::mt19937& gen) {
  const index_t m = c.m, n = c.n, kd = c.kk, e = c.e;
  const auto dy = random_values<TIn>(static_cast<std::size_t>(m * n), gen);
  const auto a = random_values<TIn>(static_cast<std::size_t>(m * kd), gen);
  std::vector<Acc> dw(static_cast<std::size_t>(e * n * kd));
  std::uniform_real_distribution<double> u(-1, 1);
  for (auto& x : dw) x = static_cast<Acc>(u(gen));
  const std::vector<Acc> dw0 = dw;
  const dim3 grid{static_cast<unsigned>((kd + k::kTcBN - 1) / k::kTcBN),
                  static_cast<unsigned>((n + k::kTcBM - 1) / k::kTcBM), static_cast<unsigned>(e)};
  if constexpr (kind == Kind::tensor_cores)
    host_model::launch(grid, k::kTcThreads, [&] {
      k::grouped_gemm_wgrad_tc<TIn>(m, n, kd, c.offsets.data(), dy.data(), a.data(), dw.data());
    });
  else
    host_model::launch(grid, k::kGemmThreads, [&] {
      k::grouped_gemm_wgrad_tiles<TIn, Acc>(m, n, kd, c.offsets.data(), dy.data(), a.data(), dw.data());
    });
  double worst = 0;
  for (index_t x = 0; x < e; ++x) {
    const auto [lo, hi] = rows_of(c.offsets, x, m);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < kd; ++j) {
        double s = 0, mag = 0;
        for (index_t r = lo; r < hi; ++r) {
          const double p = operand<kind>(dy[static_cast<std::size_t>(r * n + i)]) *
                           operand<kind>(a[static_cast<std::size_t>(r * kd + j)]);
          s += p;
          mag += std::abs(p);
        }
        const std::size_t at = static_cast<std::size_t>((x * n + i) * kd + j);
        s += dw0[at];
        worst = std::max(worst, std::abs(dw[at] - s) / (1.0 + mag + std::abs(s)));
      }
  }
  const double tol = std::is_same_v<Acc, double> ? 1e-12 : 1e-4;
  expect(worst <= tol, label<TIn, kind>() + "weight gradient " + c.name + ": worst relative error " + sci(worst));
}

/// The cases of one kind of kernel; `all` adds the edge cases (the tensor-core kernels run them all).
template <class TIn, class Acc, Kind kind>
void run_all(std::mt19937& gen, bool all) {
  const std::vector<index_t> five = {0, 64, 64, 200, 250, 300};  // an empty expert, a tile boundary
  const std::vector<index_t> three = {0, 37, 37, 200};
  run_gemm<TIn, Acc, kind>({"m 300 n 100 k 70, 5 experts", 300, 100, 70, 5, five, false, false, 3}, gen);
  run_gemm<TIn, Acc, kind>({"B transposed, accumulating", 300, 100, 70, 5, five, true, true, 5}, gen);
  run_gemm<TIn, Acc, kind>({"grid of 2 row blocks (grid-stride)", 300, 100, 70, 5, five, false, true, 0, 2}, gen);
  run_gemm<TIn, Acc, kind>({"offsets outside [0, m)", 50, 16, 33, 3, {-5, 10, 10, 400}, true, false, 1}, gen);
  run_wgrad<TIn, Acc, kind>({"m 300 n 100 k 70, 5 experts", 300, 100, 70, 5, five}, gen);
  run_wgrad<TIn, Acc, kind>({"offsets outside [0, m)", 50, 16, 33, 3, {-5, 10, 10, 400}}, gen);
  if (!all) return;
  run_gemm<TIn, Acc, kind>({"1 x 1 x 1", 1, 1, 1, 1, {0, 1}, false, false, 0}, gen);
  run_gemm<TIn, Acc, kind>({"whole tiles", 128, 128, 64, 2, {0, 70, 128}, false, false, 0}, gen);
  run_gemm<TIn, Acc, kind>({"rows outside every expert", 100, 40, 20, 2, {10, 30, 60}, false, true, 2}, gen);
  // k and n multiples of 8 with aligned rows: the 16-byte copies, and their edges
  const long long before = host_model::vector_copies().load();
  run_gemm<TIn, Acc, kind>({"16-byte pieces", 200, 72, 48, 3, three, false, false, 0}, gen);
  run_gemm<TIn, Acc, kind>({"16-byte pieces, B transposed", 200, 72, 48, 3, three, true, true, 0}, gen);
  run_gemm<TIn, Acc, kind>({"16-byte pieces, padded rows", 130, 64, 40, 2, {0, 65, 130}, true, false, 8}, gen);
  // (every whole piece of A and B in every stage of every tile: thousands)
  const long long copies = host_model::vector_copies().load() - before;
  expect(copies > 1000,
         label<TIn, kind>() + "the aligned cases copy in 16-byte pieces (" + std::to_string(copies) + " copies)");
  run_wgrad<TIn, Acc, kind>({"1 x 1 x 1", 1, 1, 1, 1, {0, 1}}, gen);
  run_wgrad<TIn, Acc, kind>({"whole tiles", 128, 128, 64, 2, {0, 70, 128}}, gen);
  run_wgrad<TIn, Acc, kind>({"16-byte pieces", 200, 72, 48, 3, three}, gen);
}

}  // namespace

int host_model_checks();  // test_model.cpp

int main() {
  failures += host_model_checks();
  std::mt19937 gen(2024);
  std::printf("grouped GEMM kernels under the host model\n");
  check_tile_starts(gen);
  run_all<__nv_bfloat16, float, Kind::tensor_cores>(gen, true);
  run_all<float, float, Kind::tensor_cores>(gen, true);
  run_all<float, float, Kind::simt>(gen, false);
  run_all<double, double, Kind::simt>(gen, false);
  run_all<__nv_bfloat16, float, Kind::simt>(gen, false);
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
