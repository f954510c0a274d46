// Checks of the host model of CUDA itself (host_model.hpp, cuda_runtime.h, cublas_v2.h, cufft.h,
// cub/): the GPU tests run under it (test_cuda_model_<family>), so what it promises is checked
// here against known values: the shuffles' lanes, barriers with a lagging warp (and that a block
// reduction missing its guarding barrier goes wrong under it), launch configurations, copies and
// frees, cuBLAS against a loop, cuFFT against known spectra, cub's stable sort. What it must stop
// (deadlocks, a shuffle with an exited lane, a host pointer given to cuBLAS or to a kernel) runs in
// a child process, which must abort with the model's message.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cufft.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cub/device/device_radix_sort.cuh>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace launch_check {
void scale_launch(float* out, const float* in, float factor, int n, cudaStream_t stream);  // launch_check.cu
}

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("  %s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++failures;
}

/// Runs f in a child process; true when it aborted with `message` in its stderr.
bool aborts_with(const std::function<void()>& f, const char* message) {
  int fd[2];
  if (pipe(fd) != 0) return false;
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fd[1], 2);
    close(fd[0]);
    f();
    _exit(0);  // it did not stop
  }
  close(fd[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = read(fd[0], buf, sizeof buf)) > 0;) err.append(buf, static_cast<std::size_t>(n));
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT && err.find(message) != std::string::npos;
}

template <class T>
T* device_copy(const std::vector<T>& v) {
  void* p = nullptr;
  cudaMalloc(&p, v.size() * sizeof(T));
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}
template <class T>
std::vector<T> host_copy(const T* p, std::size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

void shuffles() {
  std::printf("shuffles\n");
  std::vector<int> x(64), up(64), down(64), idx(64);
  host_model::launch(dim3{1}, 64u, [&] {
    const int t = static_cast<int>(threadIdx.x);
    x[t] = __shfl_xor_sync(0xffffffffu, t, 5);
    up[t] = __shfl_up_sync(0xffffffffu, t, 3, 16);
    down[t] = __shfl_down_sync(0xffffffffu, t, 2, 8);
    idx[t] = __shfl_sync(0xffffffffu, t * 10, 7, 16);
  });
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int w = t / 32 * 32, l = t % 32;
    ok = ok && x[t] == w + (l ^ 5);
    ok = ok && up[t] == (l % 16 >= 3 ? t - 3 : t);
    ok = ok && down[t] == (l % 8 + 2 < 8 ? t + 2 : t);
    ok = ok && idx[t] == 10 * (w + l / 16 * 16 + 7);
  }
  expect(ok, "xor, up (width 16), down (width 8) and indexed (width 16) shuffles read the documented lanes");

  const char* exited = "a shuffle's mask names a lane that has exited";
  expect(aborts_with(
             [] {
               host_model::launch(dim3{1}, 32u, [] {
                 if (threadIdx.x == 3) return;
                 (void)__shfl_xor_sync(0xffffffffu, 1, 1);
               });
             },
             exited),
         std::string("a lane that exited before a full-mask shuffle stops the model (\"") + exited + "\")");
  const char* divergent = "a shuffle never completes";
  expect(aborts_with(
             [] {
               host_model::launch(dim3{1}, 32u, [] {
                 if (threadIdx.x == 0) __syncthreads();
                 else (void)__shfl_xor_sync(0xffffffffu, 1, 1);
               });
             },
             divergent),
         std::string("lane 0 at __syncthreads while the warp shuffles stops the model (\"") + divergent + "\")");
}

/// A block sum over 256 threads through a shared array, with or without the barrier that keeps
/// the next call from overwriting the partial sums before every thread has read them.
template <bool Guarded>
double block_sum(double v) {
  __shared__ double partial[8];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (Guarded) __syncthreads();
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < 8; ++w) s += partial[w];
  return s;
}

template <bool Guarded>
bool two_sums_right() {
  std::vector<double> a(256), b(256);
  host_model::launch(dim3{3}, 256u, [&] {
    const double x = block_sum<Guarded>(1.0);
    const double y = block_sum<Guarded>(2.0);
    if (blockIdx.x == 0) {
      a[threadIdx.x] = x;
      b[threadIdx.x] = y;
    }
  });
  for (int t = 0; t < 256; ++t)
    if (a[t] != 256.0 || b[t] != 512.0) return false;
  return true;
}

void barriers() {
  std::printf("barriers and the lagging warp\n");
  std::vector<int> order;
  std::vector<int> neighbour(256);
  host_model::launch(dim3{1}, 256u, [&] {
    __shared__ int v[256];
    v[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
    __syncthreads();
    neighbour[threadIdx.x] = v[(threadIdx.x + 37) % 256];
    if (threadIdx.x % 32 == 0) order.push_back(static_cast<int>(threadIdx.x / 32));
  });
  bool ok = true;
  for (int t = 0; t < 256; ++t) ok = ok && neighbour[t] == (t + 37) % 256 * 3;
  expect(ok, "every thread reads what another wrote before __syncthreads");
  expect(order.size() == 8 && std::count(order.begin(), order.end(), order.back()) == 1,
         "one warp finishes after all the others (the lagging warp: " +
             std::to_string(order.empty() ? -1 : order.back()) + ")");
  expect(two_sums_right<true>(), "a guarded block reduction called twice gives 256 and 512");
  expect(!two_sums_right<false>(), "without the barrier guarding its partial sums, the second call goes wrong");
}

void launches() {
  std::printf("launch configurations\n");
  int runs = 0;
  const auto body = [&] { ++runs; };
  (void)cudaGetLastError();
  host_model::launch_kernel(body, dim3{2}, dim3{0});
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration && runs == 0, "0 threads: invalid configuration");
  host_model::launch_kernel(body, dim3{1}, dim3{1025});
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "1025 threads: invalid configuration");
  host_model::launch_kernel(body, dim3{1, 65536}, dim3{32});
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y 65536: invalid configuration");
  host_model::launch_kernel(body, dim3{1}, dim3{32}, 48 * 1024 + 1);
  expect(cudaGetLastError() == cudaErrorInvalidValue && runs == 0, "dynamic shared memory over 48 KiB: invalid value");
  host_model::launch_kernel(body, dim3{3, 2}, dim3{4, 2, 2}, 64);
  expect(cudaGetLastError() == cudaSuccess && runs == 96, "a 3 x 2 grid of 4 x 2 x 2 blocks runs 96 threads");
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  cudaStreamDestroy(s);
  host_model::launch_kernel(body, dim3{1}, dim3{1}, 0, s);
  expect(cudaGetLastError() == cudaErrorInvalidResourceHandle && runs == 96, "a destroyed stream: invalid handle");
}

void kernel_arguments() {
  std::printf("kernel arguments\n");
  const int n = 40;  // two blocks of 32
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i);
  float* in = device_copy(x);
  float* out = device_copy(std::vector<float>(n));
  (void)cudaGetLastError();
  launch_check::scale_launch(out, in, 2.0f, n, nullptr);
  std::vector<float> got = host_copy(out, n);
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int i = 0; i < n; ++i) ok = ok && got[i] == 2.0f * static_cast<float>(i);
  expect(ok, "a translated launch with device pointers runs every thread once (out = 2 in)");
  launch_check::scale_launch(out, nullptr, 3.0f, n, nullptr);
  got = host_copy(out, n);
  expect(std::count(got.begin(), got.end(), 3.0f) == n, "a null pointer argument is accepted");
  void* pinned = nullptr;
  cudaHostAlloc(&pinned, n * sizeof(float), cudaHostAllocDefault);
  std::memcpy(pinned, x.data(), n * sizeof(float));
  launch_check::scale_launch(out, static_cast<const float*>(pinned) + 8, 1.0f, n - 8, nullptr);
  got = host_copy(out, n);
  expect(got[0] == 8.0f && got[n - 9] == static_cast<float>(n - 1),
         "a pointer into pinned host memory is accepted (the device may read it)");
  cudaFreeHost(pinned);
  launch_check::scale_launch(out + n, in, 1.0f, 0, nullptr);
  expect(cudaGetLastError() == cudaSuccess, "a pointer just past a device block's end is accepted");
  expect(aborts_with([&] { launch_check::scale_launch(out, x.data(), 1.0f, n, nullptr); },
                     "argument 2 of the kernel launched here is"),
         "a host pointer given to a kernel stops the model, naming the argument");
  float* gone = device_copy(x);
  cudaFree(gone);
  expect(aborts_with([&] { launch_check::scale_launch(gone, in, 1.0f, n, nullptr); },
                     "argument 1 of the kernel launched here is"),
         "a pointer into a freed device block stops the model");
  cudaFree(in);
  cudaFree(out);
}

void memory() {
  std::printf("memory\n");
  void* p = nullptr;
  expect(cudaMalloc(&p, 10) == cudaSuccess && reinterpret_cast<std::uintptr_t>(p) % 256 == 0, "cudaMalloc, 256-byte aligned");
  unsigned char host[16] = {};
  cudaMemcpy(host, p, 10, cudaMemcpyDeviceToHost);
  expect(std::count(host, host + 10, 0xff) == 10, "new device memory reads 0xff bytes (NaN, -1)");
  expect(cudaMemcpy(host, p, 11, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue, "a copy past the block's end fails");
  expect(cudaMemcpy(host, host + 8, 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
         "a device-to-host copy from host memory fails");
  expect(cudaMemcpy(p, host, 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue, "a copy in the wrong direction fails");
  expect(cudaMemsetAsync(static_cast<char*>(p) + 4, 0, 6, cudaStreamPerThread) == cudaSuccess, "memset inside the block");
  expect(cudaFree(p) == cudaSuccess && cudaFree(p) == cudaErrorInvalidValue, "a second cudaFree of a block fails");
  (void)cudaGetLastError();
  unsigned long long a = 0, b = 0;
  std::thread([&] { cudaStreamGetId(cudaStreamPerThread, &a); }).join();
  cudaStreamGetId(cudaStreamPerThread, &b);
  expect(a != 0 && b != 0 && a != b, "each host thread's per-thread stream has its own id");
}

void blas() {
  std::printf("cuBLAS\n");
  const int m = 3, n = 4, k = 5;
  std::vector<float> a(m * k), b(k * n), c(m * n, std::nanf(""));
  for (int i = 0; i < m * k; ++i) a[i] = static_cast<float>(i % 7) - 3;
  for (int i = 0; i < k * n; ++i) b[i] = static_cast<float>(i % 5) * 0.5f;
  float *da = device_copy(a), *db = device_copy(b), *dc = device_copy(c);
  cublasHandle_t h = nullptr;
  cublasCreate(&h);
  const float one = 1, zero = 0;
  // C (m x n) = A^T B with A stored k x m (lda k), B k x n (ldb k): column-major
  expect(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, da, k, db, k, &zero, dc, m) == CUBLAS_STATUS_SUCCESS,
         "Sgemm (A transposed)");
  const std::vector<float> got = host_copy(dc, m * n);
  bool ok = true;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = 0;
      for (int p = 0; p < k; ++p) s += a[p + i * k] * b[p + j * k];
      ok = ok && got[i + j * m] == s;
    }
  expect(ok, "column-major A^T B equals the loop, and beta 0 ignores the NaN in C");
  expect(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, da, m - 1, db, k, &zero, dc, m) ==
             CUBLAS_STATUS_INVALID_VALUE,
         "lda below the rows of A: CUBLAS_STATUS_INVALID_VALUE");
  expect(aborts_with([&] { cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, a.data(), m, db, k, &zero, dc, m); },
                     "cuBLAS read or wrote outside device memory"),
         "a host pointer given to cuBLAS stops the model");
  cublasDestroy(h);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
}

void fft() {
  std::printf("cuFFT\n");
  const int n = 8;
  std::vector<float> x(2 * n);
  for (int j = 0; j < n; ++j) {
    x[j] = std::cos(2 * 3.14159265358979f * 3 * j / n);  // row 0: frequency 3
    x[n + j] = 1;                                        // row 1: constant
  }
  float* dx = device_copy(x);
  void* dz = nullptr;
  cudaMalloc(&dz, 2 * (n / 2 + 1) * sizeof(cufftComplex));
  cufftHandle fwd = 0, inv = 0;
  int len = n;
  cufftPlanMany(&fwd, 1, &len, nullptr, 1, 0, nullptr, 1, 0, CUFFT_R2C, 2);
  cufftPlanMany(&inv, 1, &len, nullptr, 1, 0, nullptr, 1, 0, CUFFT_C2R, 2);
  expect(cufftExecR2C(fwd, dx, static_cast<cufftComplex*>(dz)) == CUFFT_SUCCESS, "R2C of 2 rows of 8");
  const auto z = host_copy(static_cast<cufftComplex*>(dz), 2 * (n / 2 + 1));
  bool ok = true;
  for (int f = 0; f <= n / 2; ++f) {
    ok = ok && std::abs(z[f].x - (f == 3 ? 4.0f : 0.0f)) < 1e-5f && std::abs(z[f].y) < 1e-5f;
    ok = ok && std::abs(z[n / 2 + 1 + f].x - (f == 0 ? 8.0f : 0.0f)) < 1e-5f && std::abs(z[n / 2 + 1 + f].y) < 1e-5f;
  }
  expect(ok, "the spectra: 4 at frequency 3 (cos), 8 at frequency 0 (constant), 0 elsewhere");
  expect(cufftExecC2R(fwd, static_cast<cufftComplex*>(dz), dx) == CUFFT_INVALID_TYPE, "an R2C plan run as C2R");
  expect(cufftExecC2R(inv, static_cast<cufftComplex*>(dz), dx) == CUFFT_SUCCESS, "C2R back");
  const auto back = host_copy(dx, 2 * n);
  ok = true;
  for (int i = 0; i < 2 * n; ++i) ok = ok && std::abs(back[i] - n * x[i]) < 1e-4f;
  expect(ok, "C2R(R2C(x)) = n x, unnormalised");
  const auto spent = host_copy(static_cast<cufftComplex*>(dz), 2 * (n / 2 + 1));
  expect(std::isnan(spent[0].x) && std::isnan(spent.back().y), "C2R leaves its input overwritten (NaN)");
  cufftDestroy(fwd);
  cufftDestroy(inv);
  expect(cufftDestroy(fwd) == CUFFT_INVALID_PLAN, "a destroyed plan is invalid");
  cudaFree(dx);
  cudaFree(dz);
}

void sort() {
  std::printf("cub::DeviceRadixSort\n");
  const std::vector<unsigned> keys = {0x35, 0x12, 0x05, 0x31, 0x02, 0x15};
  const std::vector<int> values = {0, 1, 2, 3, 4, 5};
  unsigned *dk = device_copy(keys), *dks = device_copy(keys);
  int *dv = device_copy(values), *dvs = device_copy(values);
  std::size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, dk, dks, dv, dvs, 6, 0, 4);
  void* temp = nullptr;
  cudaMalloc(&temp, bytes);
  std::size_t short_bytes = bytes - 1;
  expect(cub::DeviceRadixSort::SortPairs(temp, short_bytes, dk, dks, dv, dvs, 6, 0, 4) == cudaErrorInvalidValue,
         "temporary storage below the size asked for fails");
  expect(cub::DeviceRadixSort::SortPairs(temp, bytes, dk, dks, dv, dvs, 6, 0, 4) == cudaSuccess, "sort by bits 0-3");
  const auto k = host_copy(dks, 6);
  const auto v = host_copy(dvs, 6);
  expect(v == std::vector<int>{3, 1, 4, 0, 2, 5} && k == std::vector<unsigned>{0x31, 0x12, 0x02, 0x35, 0x05, 0x15},
         "stable by the low 4 bits, whole keys moved");
  cudaFree(temp);
  cudaFree(dk);
  cudaFree(dks);
  cudaFree(dv);
  cudaFree(dvs);
}

}  // namespace

/// The host model's own checks; returns the number that failed.
int host_model_checks() {
  std::printf("the host model of CUDA\n");
  shuffles();
  barriers();
  launches();
  kernel_arguments();
  memory();
  blas();
  fft();
  sort();
  return failures;
}
