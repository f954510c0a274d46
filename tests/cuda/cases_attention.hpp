// Parity cases of the attention family: causal_attention (ops/attention.hpp), rope (ops/rope.hpp),
// rfft and rfft_magnitude (ops/fft.hpp), forward and the gradients of sum(y * g).
//
// Attention: batch 2, Tq = Tk = 1, 7, 65, 130; a KV cache (Tq < Tk) and a decoding step over 300
// keys; Hq = Hkv, GQA with 2 and 4 query heads per kv head; Dh 1, 8, 32, 33, 64, 128, 256 and 0;
// no queries; peaked scores (the online softmax's rescaling); strided q/k/v (permuted views, a
// slice of a cache, channels not contiguous); inputs without gradients; rope before attention.
// RoPE: offsets 0 .. 1e5, Dh 2 .. 128, a strided input, 1000 positions. FFT: lengths 1, 7, 8, 33,
// 64, 192, 257, 1000, batched rows (more than 1000), a strided input, eps 0 and 1e-3.
//
// The family also runs the bf16 cases (cases_bf16.hpp).
//
// Names say the sizes, so a failure on the device points at the configuration.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include <mixmoe/ops/attention.hpp>
#include <mixmoe/ops/fft.hpp>
#include <mixmoe/ops/rope.hpp>

#include "cases_bf16.hpp"
#include "parity.hpp"

namespace mixmoe_parity {

struct AttentionCase {
  index_t b, tq, tk, hq, hkv, dh;
  double scale = 0;      // 0: the default 1 / sqrt(Dh)
  double spread = 1.0;   // standard deviation of q and k (large: peaked softmax rows)
  int layout = 0;        // 0 contiguous; 1 q permuted, k/v slices of a longer cache; 2 k/v channels strided
  bool grads[3] = {true, true, true};
};

inline std::string attention_name(const AttentionCase& c) {
  std::string s = "attention B" + std::to_string(c.b) + " Tq" + std::to_string(c.tq) + " Tk" + std::to_string(c.tk) +
                  " Hq" + std::to_string(c.hq) + " Hkv" + std::to_string(c.hkv) + " Dh" + std::to_string(c.dh);
  const auto num = [](double x) {
    std::ostringstream os;
    os << x;
    return os.str();
  };
  if (c.scale != 0) s += " scale " + num(c.scale);
  if (c.spread != 1.0) s += " spread " + num(c.spread);
  if (c.layout == 1) s += " permuted-q cache-kv";
  if (c.layout == 2) s += " strided-channels-kv";
  if (!c.grads[0] || !c.grads[1] || !c.grads[2])
    s += std::string(" grads ") + (c.grads[0] ? "q" : "-") + (c.grads[1] ? "k" : "-") + (c.grads[2] ? "v" : "-");
  return s;
}

/// A (B, T, H, Dh) tensor of `layout`: contiguous (0); for q a permuted (B, H, T, Dh) buffer and
/// for k/v the first T rows of a (B, T + 11, H, Dh) cache (1); Dh not the last memory axis (2).
template <class T, class D>
mixmoe::Tensor<T, D> attention_input(index_t b, index_t t, index_t h, index_t dh, std::uint64_t seed, double spread,
                                     int layout, bool is_query) {
  using namespace mixmoe;
  if (layout == 1 && is_query) return randn<T, D>({b, h, t, dh}, seed, spread).permute({0, 2, 1, 3});
  if (layout == 1) return randn<T, D>({b, t + 11, h, dh}, seed, spread).slice(1, 0, t);
  if (layout == 2 && !is_query) return randn<T, D>({b, dh, t, h}, seed, spread).permute({0, 2, 3, 1});
  return randn<T, D>({b, t, h, dh}, seed, spread);
}

template <class T, class D>
void attention_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // float: the device's dot products and exp round differently from the CPU's GEMMs (1e-6 level);
  // double: only summation order differs
  const double ty = tol<T>(1e-5, 1e-10), tg = tol<T>(5e-5, 1e-10);
  std::vector<AttentionCase> cases = {
      {2, 1, 1, 2, 2, 8},         // one query, one key
      {2, 7, 7, 4, 2, 32},        // GQA, 2 query heads per kv head
      {2, 65, 65, 4, 1, 64},      // one kv head for 4 query heads; a partial row block
      {2, 130, 130, 4, 2, 128},   // several key tiles and row blocks
      {2, 130, 130, 2, 2, 8},     // Hq = Hkv
      {2, 3, 20, 4, 2, 32},       // KV cache: 3 new queries after 17 cached keys
      {1, 1, 300, 4, 2, 64},      // one decoding step over a long cache
      {1, 40, 40, 2, 1, 256},     // the largest head size (smallest shared tiles)
      {2, 5, 37, 3, 3, 33},       // Dh 33: a partial channel chunk
      {2, 7, 9, 2, 1, 1},         // Dh 1
      {2, 0, 5, 4, 2, 3},         // no queries: dK, dV are zero
      {1, 3, 4, 2, 1, 0},         // Dh 0
      {2, 33, 33, 4, 2, 16, 1.0, 2.0},  // peaked rows: scores spread over tens of units
      {2, 9, 14, 4, 2, 16, 0.7},        // explicit scale
  };
  {
    AttentionCase c{2, 9, 14, 4, 2, 16};
    c.layout = 1;
    cases.push_back(c);
    c = AttentionCase{2, 7, 7, 4, 2, 4};
    c.layout = 2;
    cases.push_back(c);
    c = AttentionCase{2, 9, 14, 4, 2, 16};
    c.grads[1] = false;  // dK not wanted: the kernel skips it
    cases.push_back(c);
    c = AttentionCase{2, 9, 14, 4, 2, 16};
    c.grads[0] = c.grads[2] = false;  // dQ and dV not wanted
    cases.push_back(c);
  }
  std::uint64_t seed = 1000;
  for (const AttentionCase& c : cases) {
    const std::string name = t + " " + attention_name(c);
    Var<T, D> q(attention_input<T, D>(c.b, c.tq, c.hq, c.dh, ++seed, c.spread, c.layout, true), c.grads[0]);
    Var<T, D> k(attention_input<T, D>(c.b, c.tk, c.hkv, c.dh, ++seed, c.spread, c.layout, false), c.grads[1]);
    Var<T, D> v(attention_input<T, D>(c.b, c.tk, c.hkv, c.dh, ++seed, 1.0, c.layout, false), c.grads[2]);
    Var<T, D> y = c.scale != 0 ? causal_attention(q, k, v, c.scale) : causal_attention(q, k, v);
    backward_random(y, ++seed);
    put(r, name + " y", y, ty);
    if (c.grads[0]) put(r, name + " dq", q.grad(), tg);
    if (c.grads[1]) put(r, name + " dk", k.grad(), tg);
    if (c.grads[2]) put(r, name + " dv", v.grad(), tg);
  }
  // rope on q and k, then attention over a cache, as in a decoder block
  {
    const std::string name = t + " rope+attention B2 Tq4 Tk9 Hq4 Hkv2 Dh16";
    auto q = leaf<T, D>({2, 4, 4, 16}, 1100), k = leaf<T, D>({2, 9, 2, 16}, 1101), v = leaf<T, D>({2, 9, 2, 16}, 1102);
    Var<T, D> y = causal_attention(rope(q, 5), rope(k, 0), v);
    backward_random(y, 1103);
    put(r, name + " y", y, ty);
    put(r, name + " dq", q.grad(), tg);
    put(r, name + " dk", k.grad(), tg);
    put(r, name + " dv", v.grad(), tg);
  }
}

template <class T, class D>
void rope_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // double: the device's pow/cos/sin are within 2 ulp of the host's; at position 1e5 that moves an
  // angle by ~1e-11
  const double tl = tol<T>(2e-6, 1e-10);
  struct RopeCase {
    Shape shape;
    index_t offset;
    double theta;
    bool strided;
  };
  const RopeCase cases[] = {
      {{2, 7, 3, 8}, 0, 1e4, false},     {{2, 5, 4, 64}, 13, 1e4, false},   {{1, 3, 2, 128}, 100000, 1e6, false},
      {{2, 1, 1, 2}, 5, 1e4, false},     {{3, 33, 2, 34}, 7, 1e4, true},    {{4, 257, 4, 16}, 0, 1e4, false},
      {{1, 1000, 1, 6}, 999, 500, false},
  };
  std::uint64_t seed = 2000;
  for (const RopeCase& c : cases) {
    const std::string name = t + " rope " + c.shape.to_string() + " offset " + std::to_string(c.offset) + " theta " +
                             std::to_string(static_cast<long long>(c.theta)) + (c.strided ? " strided" : "");
    Var<T, D> x;
    if (c.strided)  // a (B, H, T, Dh) buffer seen as (B, T, H, Dh)
      x = Var<T, D>(randn<T, D>({c.shape[0], c.shape[2], c.shape[1], c.shape[3]}, ++seed).permute({0, 2, 1, 3}), true);
    else
      x = leaf<T, D>(c.shape, ++seed);
    Var<T, D> y = rope(x, c.offset, c.theta);
    backward_random(y, ++seed);
    put(r, name + " y", y, tl);
    put(r, name + " dx", x.grad(), tl);
  }
}

template <class T, class D>
void fft_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = type_name<T>();
  // cuFFT and FFTW use different factorisations: float rounding of O(log N) operations
  const double tl = tol<T>(2e-5, 1e-11);
  // the gradient of a magnitude divides by it: a small bin amplifies float rounding (seen up to 4e-6
  // between float and double on the CPU)
  const double tm = tol<T>(5e-5, 1e-11);
  std::uint64_t seed = 3000;
  for (index_t n : {1, 7, 8, 33, 64, 192, 257, 1000}) {
    const std::string ns = " N" + std::to_string(n);
    {
      auto x = leaf<T, D>({3, n}, ++seed);
      Var<T, D> y = rfft(x);
      backward_random(y, ++seed);
      put(r, t + " rfft (3," + ns + ") y", y, tl);
      put(r, t + " rfft (3," + ns + ") dx", x.grad(), tl);
    }
    {
      auto x = leaf<T, D>({3, n}, ++seed);
      Var<T, D> m = rfft_magnitude(x);
      backward_random(m, ++seed);
      put(r, t + " rfft_magnitude (3," + ns + ") eps 0 m", m, tl);
      put(r, t + " rfft_magnitude (3," + ns + ") eps 0 dx", x.grad(), tm);
    }
    {
      // (2, 3, N) seen through a transpose of a (2, N, 3) buffer: the last axis is strided
      Var<T, D> x(randn<T, D>({2, n, 3}, ++seed).transpose(1, 2), true);
      Var<T, D> m = rfft_magnitude(x, 1e-3);
      backward_random(m, ++seed);
      put(r, t + " rfft_magnitude strided (2, 3," + ns + ") eps 1e-3 m", m, tl);
      put(r, t + " rfft_magnitude strided (2, 3," + ns + ") eps 1e-3 dx", x.grad(), tm);
    }
  }
  // a contiguous view one element into its buffer: its start is not aligned to the complex type,
  // which cuFFT's real input needs (the device copies it first)
  for (index_t n : {7, 64}) {
    const std::string ns = " N" + std::to_string(n);
    Var<T, D> x(randn<T, D>({3 * n + 1}, ++seed).slice(0, 1, 3 * n + 1).reshape({3, n}), true);
    Var<T, D> y = rfft(x);
    backward_random(y, ++seed);
    put(r, t + " rfft at offset 1 (3," + ns + ") y", y, tl);
    put(r, t + " rfft at offset 1 (3," + ns + ") dx", x.grad(), tl);
    Var<T, D> x2(randn<T, D>({3 * n + 1}, ++seed).slice(0, 1, 3 * n + 1).reshape({3, n}), true);
    Var<T, D> m = rfft_magnitude(x2);
    backward_random(m, ++seed);
    put(r, t + " rfft_magnitude at offset 1 (3," + ns + ") m", m, tl);
    put(r, t + " rfft_magnitude at offset 1 (3," + ns + ") dx", x2.grad(), tm);
  }
  // many rows in one batched plan
  {
    auto x = leaf<T, D>({1030, 16}, ++seed);
    Var<T, D> y = rfft(x);
    backward_random(y, ++seed);
    put(r, t + " rfft (1030, N16) y", y, tl);
    put(r, t + " rfft (1030, N16) dx", x.grad(), tl);
    auto x2 = leaf<T, D>({1030, 64}, ++seed);
    Var<T, D> m = rfft_magnitude(x2);
    backward_random(m, ++seed);
    put(r, t + " rfft_magnitude (1030, N64) m", m, tl);
    put(r, t + " rfft_magnitude (1030, N64) dx", x2.grad(), tm);
  }
}

template <class D>
void cases_attention(Results& r) {
  attention_cases<float, D>(r);
  attention_cases<double, D>(r);
  rope_cases<float, D>(r);
  rope_cases<double, D>(r);
  fft_cases<float, D>(r);
  fft_cases<double, D>(r);
  cases_bf16<D>(r);
}

}  // namespace mixmoe_parity
