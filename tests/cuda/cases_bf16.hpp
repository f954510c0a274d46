// Parity cases of the bf16 ops (ops/bf16.hpp, run with the attention family): cast, matmul (2-D,
// K = 300, batched with a broadcast operand, K = 0), linear with a bias, rms_norm, layer_norm,
// causal_attention (grouped-query heads), add, mul, silu and grouped_linear, and fp32 master
// weights in them (linear, linear_fp32_out, add(fp32, bf16), stack_weights_bf16), forward and the
// gradients of sum(y * g). Each runs twice on the same bf16-rounded inputs: in bf16 ("bf16 NAME")
// and in double ("f64 NAME"), so that test_parity_cpu holds the bf16 results against double on
// the host, and the GPU test holds each against the CPU (bf16 within about one bf16 ulp: both
// accumulate in fp32 and round, in different orders).
#pragma once

#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <mixmoe/moe/grouped_gemm.hpp>
#include <mixmoe/ops/bf16.hpp>
#include <mixmoe/ops/reduce.hpp>
#include <mixmoe/ops/shape_ops.hpp>

#include "parity.hpp"

namespace mixmoe_parity {

/// The bf16 cases in T = bf16 or T = double (the twin), on D.
template <class T, class D>
void bf16_cases(Results& r) {
  using namespace mixmoe;
  const std::string t = std::is_same_v<T, bf16> ? "bf16" : "f64";
  // bf16: a result may round the other way on the two devices (one ulp, 2^-8 relative)
  const double tl = std::is_same_v<T, bf16> ? 1.6e-2 : 1e-9;
  std::uint64_t seed = 7000;
  // seeded normal values rounded to bf16 (the same values for both types), as T on D
  const auto values = [&](const Shape& s, double scale) {
    Generator g(++seed);
    return to_device<D>(Tensor<double, Cpu>::randn(s, g, 0.0, scale).to<bf16>().template to<T>());
  };
  const auto in = [&](const Shape& s, double scale = 1.0) { return Var<T, D>(values(s, scale), true); };
  // forward, backward with a seeded gradient, and the results
  const auto run = [&](const std::string& name, const Var<T, D>& y, std::initializer_list<Var<T, D>> inputs) {
    put(r, t + " " + name, y, tl);
    y.backward(values(y.shape(), 1.0));
    int i = 0;
    for (const Var<T, D>& x : inputs) {
      const std::string gname = t + " " + name + " d" + std::to_string(i++);
      if (x.grad().defined())
        put(r, gname, x.grad(), tl);
      else
        put(r, gname + " (none)", Tensor<T, D>::zeros(x.shape()), 0.0);
    }
  };

  {
    const auto a = in({33, 300}, 0.5), b = in({300, 17}, 0.5);
    run("matmul 33x300x17", matmul(a, b), {a, b});
  }
  {
    const auto a = in({3, 4, 40}), b = in({40, 5});
    run("matmul batched (3,4,40)x(40,5)", matmul(a, b), {a, b});
  }
  {
    const auto a = in({4, 0}), b = in({0, 3});
    run("matmul K=0", matmul(a, b), {a, b});
  }
  {
    const auto x = in({2, 7, 64}), w = in({48, 64}, 0.2), bias = in({48});
    run("linear (2,7,64)x(48,64)+b", linear(x, w, bias), {x, w, bias});
  }
  {
    const auto x = in({9, 96}, 3.0), w = in({96});
    run("rms_norm (9,96)", rms_norm(x, w), {x, w});
  }
  {
    const auto x = in({2, 5, 40}, 2.0), w = in({40}), b = in({40});
    run("layer_norm (2,5,40)", layer_norm(x, w, b), {x, w, b});
  }
  {
    const auto q = in({2, 9, 4, 32}), k = in({2, 9, 2, 32}), v = in({2, 9, 2, 32});
    run("causal_attention B2 T9 Hq4 Hkv2 Dh32", causal_attention(q, k, v), {q, k, v});
  }
  {
    const auto a = in({6, 33}), b = in({33}), c = in({6, 33});
    run("add (6,33)+(33), mul, silu", silu(mul(add(a, b), c)), {a, b, c});
  }
  {
    const auto x = in({13, 24}), w = in({4, 16, 24}, 0.3);
    const auto off = to_device<D>(Tensor<index_t, Cpu>::from(std::vector<index_t>{0, 5, 5, 11, 12}, Shape{5}));
    run("grouped_linear M13 E4 (16,24)", grouped_linear(x, w, off), {x, w});
  }
  {  // fp32 master weights in bf16 ops: linear (weights rounded for the GEMM only, fp32 weight
     // gradients), linear_fp32_out, add(fp32, bf16), stack_weights_bf16 into the grouped GEMM; the
     // twin runs the double ops on the same (rounded) values
    const auto x = in({10, 24}), h = in({10, 16});
    const auto master = [&](const Shape& sh, double scale) {
      return Var<std::conditional_t<std::is_same_v<T, bf16>, float, T>, D>(
          values(sh, scale).template to<std::conditional_t<std::is_same_v<T, bf16>, float, T>>(), true);
    };
    const auto w1 = master({16, 24}, 0.3), b1 = master({16}, 1.0), w2 = master({6, 16}, 0.3);
    const auto resid = master({10, 16}, 1.0);
    const auto e0 = master({5, 16}, 0.3), e1 = master({5, 16}, 0.3);
    const auto off = to_device<D>(Tensor<index_t, Cpu>::from(std::vector<index_t>{0, 4, 10}, Shape{3}));
    using M = typename std::decay_t<decltype(w1)>::value_type;
    const std::vector<Var<M, D>> experts{e0, e1};
    Var<M, D> logits, summed;
    if constexpr (std::is_same_v<T, bf16>) {
      const Var<bf16, D> a = silu(linear(x, w1, b1));                       // (10, 16)
      summed = add(resid, mul(a, h));                                      // fp32 (10, 16)
      logits = linear_fp32_out(a, w2);                                     // fp32 (10, 6)
      const Var<bf16, D> g = grouped_linear(a, stack_weights_bf16(std::span<const Var<float, D>>(experts)), off);
      put(r, t + " masters grouped", g, tl);
      backward_random(g, 41);
    } else {
      const Var<T, D> a = silu(linear(x, w1, b1));
      summed = add(resid, mul(a, h));
      logits = linear(a, w2);
      const Var<T, D> g = grouped_linear(a, stack_weights(std::span<const Var<T, D>>(experts)), off);
      put(r, t + " masters grouped", g, tl);
      backward_random(g, 41);
    }
    put(r, t + " masters residual sum", summed, tl);
    put(r, t + " masters logits", logits, tl);
    backward_random(summed, 42);
    backward_random(logits, 43);
    put(r, t + " masters dx", x.grad(), tl);
    put(r, t + " masters dw1", w1.grad(), tl);
    put(r, t + " masters db1", b1.grad(), tl);
    put(r, t + " masters dw2", w2.grad(), tl);
    put(r, t + " masters dresid", resid.grad(), tl);
    put(r, t + " masters dexpert0", e0.grad(), tl);
    put(r, t + " masters dexpert1", e1.grad(), tl);
  }
  {  // a float master through cast: the gradient comes back as the bf16-rounded upstream gradient
    const auto master = Var<float, D>(values({5, 6}, 1.0).template to<float>(), true);
    const Var<T, D> y = mul(cast<T>(master), in({5, 6}));
    put(r, t + " cast float -> T", y, tl);
    y.backward(values(y.shape(), 1.0));
    put(r, t + " cast float -> T dmaster", master.grad(), tl);
  }
}

template <class D>
void cases_bf16(Results& r) {
  bf16_cases<mixmoe::bf16, D>(r);
  bf16_cases<double, D>(r);
}

}  // namespace mixmoe_parity
