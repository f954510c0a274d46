// End-to-end: a 2-layer MLP learns a fixed problem, and a warmed-up training
// step makes no call to the system allocator.
#include "test_util.hpp"

#include <cstdlib>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#define MIXMOE_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MIXMOE_TEST_ASAN 1
#endif
#endif

// ---- allocation counting -------------------------------------------------------
// Every global operator new is counted. Outside sanitizer builds the C allocator
// itself (malloc, calloc, realloc, aligned_alloc, posix_memalign) is interposed
// too, which also sees allocations made by C libraries (OpenBLAS, FFTW) and by
// std::aligned_alloc in the caching allocator. ASan owns malloc, so there only
// operator new and the caching allocator's own counter are checked.
namespace {
std::atomic<long> g_new_calls{0};
std::atomic<long> g_malloc_calls{0};
std::atomic<bool> g_counting{false};
}  // namespace

void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_new_calls.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
// Every form that pairs with the deletes below is replaced, so that no block from the
// runtime's own operator new (ASan's, for one) reaches our free().
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  if (g_counting.load(std::memory_order_relaxed)) g_new_calls.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& tag) noexcept { return ::operator new(n, tag); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

#ifndef MIXMOE_TEST_ASAN
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* malloc(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_malloc_calls.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t s) {
  if (g_counting.load(std::memory_order_relaxed)) g_malloc_calls.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(n, s);
}
void* realloc(void* p, std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_malloc_calls.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_malloc_calls.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) g_malloc_calls.fetch_add(1, std::memory_order_relaxed);
  *out = __libc_memalign(a, n);
  return *out ? 0 : 12;  // ENOMEM
}
}
#endif

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

// Three interleaved spirals in 2-D: not linearly separable, learnable by a small MLP.
struct Spiral {
  Tf x;
  Tensor<Index> y;
};

Spiral make_spiral(index_t per_class, std::uint64_t seed) {
  Generator gen(seed);
  const index_t n = 3 * per_class;
  Spiral s{Tf::empty({n, 2}), Tensor<Index>::empty({n})};
  for (index_t c = 0; c < 3; ++c)
    for (index_t i = 0; i < per_class; ++i) {
      const double r = static_cast<double>(i) / per_class;
      const double t = 4.0 * c + 4.0 * r + 0.2 * gen.normal();
      s.x(c * per_class + i, 0) = static_cast<float>(r * std::sin(t));
      s.x(c * per_class + i, 1) = static_cast<float>(r * std::cos(t));
      s.y(c * per_class + i) = static_cast<Index>(c);
    }
  return s;
}

struct Mlp {
  Vf w1, b1, w2, b2;
  explicit Mlp(Generator& gen, index_t hidden)
      : w1(parameter(Tf::randn({hidden, 2}, gen, 0.0, 1.0))),
        b1(parameter(Tf::zeros({hidden}))),
        w2(parameter(Tf::randn({3, hidden}, gen, 0.0, 1.0 / std::sqrt(static_cast<double>(hidden))))),
        b2(parameter(Tf::zeros({3}))) {}
  Vf operator()(const Vf& x) const { return linear(relu(linear(x, w1, b1)), w2, b2); }
  std::vector<Vf> parameters() const { return {w1, b1, w2, b2}; }
};

float accuracy(const Tf& logits, const Tensor<Index>& y) {
  index_t ok = 0;
  for (index_t i = 0; i < logits.size(0); ++i) {
    index_t best = 0;
    for (index_t c = 1; c < 3; ++c)
      if (logits(i, c) > logits(i, best)) best = c;
    ok += best == y(i);
  }
  return static_cast<float>(ok) / static_cast<float>(logits.size(0));
}

}  // namespace

TEST_CASE("a 2-layer MLP learns three spirals", "[training]") {
  const Spiral data = make_spiral(100, 3);
  Generator gen(1);
  Mlp mlp(gen, 64);
  AdamW<float> opt(mlp.parameters(), {.lr = 0.02, .weight_decay = 0.0});
  const Vf x(data.x);
  float first = 0, last = 0;
  for (int step = 0; step < 600; ++step) {
    auto loss = cross_entropy(mlp(x), data.y);
    if (step == 0) first = loss.item();
    last = loss.item();
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
  INFO("loss " << first << " -> " << last);
  REQUIRE(first > 1.0f);  // about ln 3 at the start
  REQUIRE(last < 0.15f);
  no_grad ng;
  REQUIRE(accuracy(mlp(x).value(), data.y) > 0.95f);
}

TEST_CASE("a warmed-up training step does not call the system allocator", "[training][allocation]") {
  const Spiral data = make_spiral(64, 5);
  Generator gen(2);
  Mlp mlp(gen, 32);
  AdamW<float> opt(mlp.parameters(), {.lr = 0.01});
  const Vf x(data.x);
  auto step = [&] {
    auto loss = cross_entropy(mlp(x), data.y);
    loss.backward();
    opt.step();
    opt.zero_grad();
    return loss.item();
  };
  step();  // the first step fills the caches (tensors, graph nodes, optimizer state)
  step();
  const auto system_before = CachingHostAllocator::instance().stats().system_allocs;
  g_new_calls = 0;
  g_malloc_calls = 0;
  g_counting = true;
  float loss = 0;
  for (int i = 0; i < 5; ++i) loss = step();
  g_counting = false;
  const long news = g_new_calls.load(), mallocs = g_malloc_calls.load();
  const auto system_after = CachingHostAllocator::instance().stats().system_allocs;
  INFO("operator new calls " << news << ", malloc-family calls " << mallocs << ", cache misses "
                             << (system_after - system_before) << ", loss " << loss);
  REQUIRE(std::isfinite(loss));
  REQUIRE(news == 0);
  REQUIRE(mallocs == 0);
  REQUIRE(system_after == system_before);
}

// Devices and scalar types are types: mixing them is a compile-time error.
struct OtherDevice {
  static constexpr const char* name = "other";
};
template <class A, class B>
concept Addable = requires(A a, B b) { add(a, b); };
template <class A, class B>
concept Multipliable = requires(A a, B b) { matmul(a, b); };
static_assert(Addable<Vf, Vf>);
static_assert(!Addable<Var<float, Cpu>, Var<float, OtherDevice>>, "mixing devices must not compile");
static_assert(!Addable<Var<float, Cpu>, Var<double, Cpu>>, "mixing scalar types must not compile");
static_assert(!Multipliable<Var<float, Cpu>, Var<float, OtherDevice>>, "mixing devices must not compile");

TEST_CASE("optimizers reject bad configuration", "[training][errors]") {
  auto w = parameter(Tf::zeros({2}));
  MIXMOE_REQUIRE_ERROR((AdamW<float>({w}, {.beta1 = 1.0})), "[AdamW] betas must be in [0, 1)");
  auto h = w * 2.0;
  MIXMOE_REQUIRE_ERROR((SGD<float>({h}, {})), "[Optimizer] parameter 0 is not a leaf Var");
}
