// bf16 storage: the bf16 type's rounding (against an independent nearest-neighbour search),
// bf16 tensors, cast and its gradient, the bf16 GEMMs (matmul, linear) against double GEMMs of
// the bf16 operands, the via_fp32 ops (norms, attention, elementwise, grouped_linear) against
// their fp32 ops on the widened inputs (bit for bit on the CPU), nested backwards inside one
// graph, and a mixed-precision training run (fp32 master weights, bf16 activations) against
// the same run in fp32.
#include "test_util.hpp"

#include <mixmoe/io/json_config.hpp>
#include <mixmoe/moe/grouped_gemm.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/ops/bf16.hpp>
#include <mixmoe/ops/cross_entropy.hpp>
#include <mixmoe/train/optimizer.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace test_bf16 {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

using Vb = Var<bf16, Cpu>;
using Tb = Tensor<bf16, Cpu>;

/// The bf16 nearest to x (ties to the even pattern) among the three patterns around a guess:
/// a search by distances in long double, independent of bf16's bit arithmetic.
std::uint16_t nearest_bits(long double x, std::uint16_t guess) {
  std::uint16_t best = guess;
  long double best_d = std::numeric_limits<long double>::infinity();
  for (int delta = -1; delta <= 1; ++delta) {
    const auto b = static_cast<std::uint16_t>(guess + delta);
    if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0) continue;  // NaN patterns
    if (((b ^ guess) & 0x8000u) != 0) continue;                  // crossed the sign
    const long double v = static_cast<long double>(std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16));
    const long double d = std::fabs(v - x);
    if (d < best_d || (d == best_d && (b & 1u) == 0)) {
      best = b;
      best_d = d;
    }
  }
  return best;
}

/// A bf16 leaf with normal values (stddev scale), and the same values as a double tensor.
Vb bf16_leaf(const Shape& s, std::uint64_t seed, double scale = 1.0) {
  Generator g(seed);
  return Vb(Td::randn(s, g, 0.0, scale).to<bf16>(), true);
}

Tf widen(const Tb& t) { return t.to<float>(); }

/// Exact equality of a bf16 tensor and a float tensor rounded to bf16.
void require_equal_rounded(const Tb& got, const Tf& want) {
  REQUIRE(got.shape() == want.shape());
  const Tb w = want.to<bf16>();
  const Tb g = got.contiguous();
  for (index_t i = 0; i < g.numel(); ++i) {
    INFO("element " << i << ": " << float(g.data()[i]) << " vs " << float(w.data()[i]));
    REQUIRE(g.data()[i].bits == w.data()[i].bits);
  }
}

/// max |got - want| / (1 + max |want|) over the elements.
double rel_err(const Tb& got, const Td& want) {
  REQUIRE(got.shape() == want.shape());
  const Td g = got.to<double>();
  double err = 0, scale = 0;
  for (index_t i = 0; i < g.numel(); ++i) {
    err = std::max(err, std::fabs(g.data()[i] - want.data()[i]));
    scale = std::max(scale, std::fabs(want.data()[i]));
  }
  return err / (1.0 + scale);
}

/// a (M, K) b (K, N) in double (the reference GEMM of bf16 operands).
Td gemm_ref(const Td& a, const Td& b, bool ta = false, bool tb = false) {
  const Td A = ta ? a.transpose(0, 1).contiguous() : a, B = tb ? b.transpose(0, 1).contiguous() : b;
  const index_t m = A.size(0), k = A.size(1), n = B.size(1);
  Td c = Td::zeros({m, n});
  for (index_t i = 0; i < m; ++i)
    for (index_t p = 0; p < k; ++p)
      for (index_t j = 0; j < n; ++j) c(i, j) += A(i, p) * B(p, j);
  return c;
}

}  // namespace

TEST_CASE("bf16 rounds float to nearest, ties to even, as a nearest-neighbour search does", "[bf16]") {
  // special values
  CHECK(bf16(1.0f).bits == 0x3f80);
  CHECK(bf16(-2.0f).bits == 0xc000);
  CHECK(bf16(0.0f).bits == 0x0000);
  CHECK(bf16(-0.0f).bits == 0x8000);
  CHECK(bf16(std::numeric_limits<float>::infinity()).bits == 0x7f80);
  CHECK(bf16(-std::numeric_limits<float>::infinity()).bits == 0xff80);
  CHECK(std::isnan(float(bf16(std::numeric_limits<float>::quiet_NaN()))));
  // a signalling NaN whose payload lives only in the low 16 bits stays a NaN (not infinity)
  CHECK(std::isnan(float(bf16(std::bit_cast<float>(0x7f800001u)))));
  CHECK(std::isnan(float(bf16(std::bit_cast<float>(0xff800001u)))));
  // ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one (1); 1 + 3 2^-8 -> 1 + 2^-6
  CHECK(float(bf16(1.0f + 0x1p-8f)) == 1.0f);
  CHECK(float(bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);
  // overflow: the largest float rounds to infinity; the largest bf16 stays
  CHECK(bf16(std::numeric_limits<float>::max()).bits == 0x7f80);
  CHECK(float(bf16(float(std::numeric_limits<bf16>::max()))) == float(std::numeric_limits<bf16>::max()));
  CHECK(float(std::numeric_limits<bf16>::max()) == 0x1.fep127f);
  CHECK(float(std::numeric_limits<bf16>::epsilon()) == 0x1p-7f);
  // subnormals are kept
  CHECK(bf16(0x1p-133f).bits == 0x0001);
  CHECK(float(std::numeric_limits<bf16>::denorm_min()) == 0x1p-133f);

  // random bit patterns over the whole float range
  Generator gen(7);
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const auto u = static_cast<std::uint32_t>(gen.uniform(0.0, 4294967296.0));
    const float f = std::bit_cast<float>(u);
    if (!std::isfinite(f)) continue;
    const std::uint16_t got = bf16(f).bits;
    const bool overflow = (got & 0x7fffu) == 0x7f80u;
    if (overflow) {  // infinity only beyond the midpoint between the largest bf16 and 2^128
      REQUIRE(std::fabs(static_cast<long double>(f)) >= 0x1.ffp127L);
      continue;
    }
    REQUIRE(got == nearest_bits(f, got));
    ++checked;
  }
  CHECK(checked > 190000);
}

TEST_CASE("bf16 rounds a double once (no double rounding through float)", "[bf16]") {
  // 1 + 2^-8 + 2^-30 is just above the tie: through float it would become the tie (1 + 2^-8)
  // and round to even (1); rounded once it goes up to 1 + 2^-7
  CHECK(float(bf16(1.0 + 0x1p-8 + 0x1p-30)) == 1.0f + 0x1p-7f);
  CHECK(float(bf16(-(1.0 + 0x1p-8 + 0x1p-30))) == -(1.0f + 0x1p-7f));
  CHECK(float(bf16(1.0 + 0x1p-8 - 0x1p-30)) == 1.0f);
  CHECK(float(bf16(1.0 + 0x1p-8)) == 1.0f);  // the exact tie
  CHECK(bf16(1e300).bits == 0x7f80);
  CHECK(bf16(-1e300).bits == 0xff80);
  CHECK(bf16(1e-300).bits == 0x0000);
  CHECK(std::isnan(float(bf16(std::numeric_limits<double>::quiet_NaN()))));
  Generator gen(11);
  for (int i = 0; i < 100000; ++i) {
    const double d = gen.normal(0.0, 1.0) * std::ldexp(1.0, static_cast<int>(gen.uniform(-130, 127)));
    const std::uint16_t got = bf16(d).bits;
    if ((got & 0x7fffu) == 0x7f80u) continue;
    REQUIRE(got == nearest_bits(d, got));
  }
  // integers convert through their float value
  CHECK(float(bf16(3)) == 3.0f);
  CHECK(float(bf16(257)) == 256.0f);  // 257 needs 9 bits: the tie goes to even (256)
  CHECK(float(bf16(std::int64_t{259})) == 260.0f);
}

TEST_CASE("bf16 tensors: half the bytes of float, conversions both ways, copies and views", "[bf16]") {
  static_assert(sizeof(Tb::value_type) == 2);
  Generator g(3);
  const Tf x = Tf::randn({4, 5}, g);
  const Tb b = x.to<bf16>();
  REQUIRE(b.shape() == x.shape());
  for (index_t i = 0; i < x.numel(); ++i) REQUIRE(float(b.data()[i]) == round_to_bf16(x.data()[i]));
  // widening is exact, and rounding a widened bf16 gives it back
  const Tf w = b.to<float>();
  const Tb back = w.to<bf16>();
  for (index_t i = 0; i < b.numel(); ++i) REQUIRE(back.data()[i].bits == b.data()[i].bits);
  // double -> bf16 directly
  const Td xd = x.to<double>();
  const Tb bd = xd.to<bf16>();
  for (index_t i = 0; i < b.numel(); ++i) REQUIRE(bd.data()[i].bits == b.data()[i].bits);
  // views and copies move bits, no arithmetic
  const Tb t = b.transpose(0, 1).contiguous();
  REQUIRE(t.shape() == Shape{5, 4});
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < 5; ++j) REQUIRE(t(j, i).bits == b(i, j).bits);
  const Tb z = Tb::zeros({3}), o = Tb::ones({3});
  for (index_t i = 0; i < 3; ++i) {
    REQUIRE(z.data()[i].bits == 0);
    REQUIRE(float(o.data()[i]) == 1.0f);
  }
  // a bf16 tensor into an integer one and back
  const Tb small = Tf::from({1.0f, -3.0f, 250.0f}, Shape{3}).to<bf16>();
  const auto ints = small.to<std::int32_t>();
  CHECK(ints.to_vector() == std::vector<std::int32_t>{1, -3, 250});
}

TEST_CASE("cast: float <-> bf16 <-> double, the gradient converted back", "[bf16]") {
  Generator g(5);
  const Vf x(Tf::randn({3, 4}, g), true);
  const Vb xb = cast<bf16>(x);
  REQUIRE(std::string(xb.op_name()) == "cast");
  const Vd xd = cast<double>(xb);
  for (index_t i = 0; i < x.numel(); ++i)
    REQUIRE(xd.value().data()[i] == static_cast<double>(round_to_bf16(x.value().data()[i])));
  // d/dx sum(c * cast(x)) = c, and through bf16 it is c rounded to bf16 (the gradient is stored in bf16)
  const Td c = Td::randn({3, 4}, g);
  sum(mul(xd, Vd(c))).backward();
  REQUIRE(x.grad().defined());
  for (index_t i = 0; i < x.numel(); ++i)
    REQUIRE(x.grad().data()[i] == round_to_bf16(static_cast<float>(c.data()[i])));
  // cast to its own type is the same Var
  REQUIRE(cast<float>(x).node() == x.node());
  // no graph under no_grad or for an input without gradient
  {
    no_grad ng;
    REQUIRE_FALSE(cast<bf16>(x).requires_grad());
  }
  REQUIRE_FALSE(cast<bf16>(Vf(Tf::ones({2}))).requires_grad());
  MIXMOE_REQUIRE_ERROR(cast<bf16>(Vf()), "undefined");
}

TEST_CASE("bf16 matmul and linear: fp32 accumulation of bf16 operands, against double GEMMs", "[bf16]") {
  // K up to 300: a bf16 result is within half an ulp (2^-9 relative) of the exact product sum,
  // plus the fp32 accumulation error (far smaller)
  for (const auto& [m, k, n] : {std::array<index_t, 3>{1, 1, 1}, {5, 7, 3}, {33, 300, 17}, {4, 0, 3}}) {
    INFO("M " << m << " K " << k << " N " << n);
    const Vb a = bf16_leaf({m, k}, 10 + m), b = bf16_leaf({k, n}, 20 + n);
    const Vb y = matmul(a, b);
    const Td ad = a.value().to<double>(), bd = b.value().to<double>();
    REQUIRE(rel_err(y.value(), gemm_ref(ad, bd)) <= 0x1p-8);
    Generator gg(30);
    const Tb gy = Td::randn({m, n}, gg).to<bf16>();
    y.backward(gy);
    const Td gd = gy.to<double>();
    if (k > 0) {
      REQUIRE(rel_err(a.grad(), gemm_ref(gd, bd, false, true)) <= 0x1p-8);
      REQUIRE(rel_err(b.grad(), gemm_ref(ad, gd, true, false)) <= 0x1p-8);
    }
  }

  SECTION("batched, one operand broadcast") {
    const Vb a = bf16_leaf({3, 4, 6}, 1), b = bf16_leaf({6, 5}, 2);
    const Vb y = matmul(a, b);
    REQUIRE(y.shape() == Shape{3, 4, 5});
    y.backward(Tb::ones({3, 4, 5}));
    const Td bd = b.value().to<double>();
    Td gb = Td::zeros({6, 5});
    for (index_t i = 0; i < 3; ++i) {
      const Td ai = a.value()[i].to<double>();
      REQUIRE(rel_err(y.value()[i].contiguous(), gemm_ref(ai, bd)) <= 0x1p-8);
      const Td part = gemm_ref(ai, Td::ones({4, 5}), true, false);
      for (index_t j = 0; j < gb.numel(); ++j) gb.data()[j] += part.data()[j];
    }
    REQUIRE(rel_err(b.grad(), gb) <= 0x1p-8);
  }

  SECTION("linear with bias over (B, T, K)") {
    const Vb x = bf16_leaf({2, 3, 8}, 3), w = bf16_leaf({5, 8}, 4), bias = bf16_leaf({5}, 5);
    const Vb y = linear(x, w, bias);
    REQUIRE(y.shape() == Shape{2, 3, 5});
    const Td xd = x.value().reshape({6, 8}).to<double>(), wd = w.value().to<double>(), bd = bias.value().to<double>();
    Td want = gemm_ref(xd, wd, false, true);
    for (index_t r = 0; r < 6; ++r)
      for (index_t j = 0; j < 5; ++j) want(r, j) += bd(j);
    REQUIRE(rel_err(y.value().reshape({6, 5}), want) <= 0x1p-8);
    Generator gg(6);
    const Tb gy = Td::randn({2, 3, 5}, gg).to<bf16>();
    y.backward(gy);
    const Td gd = gy.reshape({6, 5}).to<double>();
    REQUIRE(rel_err(x.grad().reshape({6, 8}), gemm_ref(gd, wd)) <= 0x1p-8);
    REQUIRE(rel_err(w.grad(), gemm_ref(gd, xd, true, false)) <= 0x1p-8);
    Td gbias = Td::zeros({5});
    for (index_t r = 0; r < 6; ++r)
      for (index_t j = 0; j < 5; ++j) gbias(j) += gd(r, j);
    REQUIRE(rel_err(bias.grad(), gbias) <= 0x1p-8);
  }

  SECTION("fp32 master weights: rounded for the GEMM only, fp32 weight gradients; fp32 logits") {
    const Vb x = bf16_leaf({6, 16}, 11);
    Generator g(12);
    const Vf w(Tf::randn({5, 16}, g), true), bias(Tf::randn({5}, g), true);
    const Vb wb(w.value().to<bf16>(), false);
    {
      no_grad ng;  // the same as linear on the rounded weights (the fp32 bias is added unrounded)
      const Tb want = linear(x, wb).value();
      const Tb got = linear(x, w).value();
      for (index_t i = 0; i < got.numel(); ++i) REQUIRE(got.data()[i].bits == want.data()[i].bits);
    }
    const Vf y = linear_fp32_out(x, w, bias);  // fp32 result: the same sums, not rounded
    const Td xd = x.value().to<double>(), wd = wb.value().to<double>();
    Td want = gemm_ref(xd, wd, false, true);
    for (index_t r = 0; r < 6; ++r)
      for (index_t j = 0; j < 5; ++j) want(r, j) += static_cast<double>(bias.value()(j));
    for (index_t i = 0; i < want.numel(); ++i)
      REQUIRE(std::fabs(y.value().data()[i] - want.data()[i]) <= 1e-5 * (1 + std::fabs(want.data()[i])));
    Generator gg(13);
    const Tf gy = Td::randn({6, 5}, gg).to<float>();
    y.backward(gy);
    // dw in fp32 from the bf16-rounded output gradient: close to double, and not rounded to bf16
    const Td gd = gy.to<bf16>().to<double>();
    const Td dw = gemm_ref(gd, xd, true, false);
    bool any_off_bf16 = false;
    for (index_t i = 0; i < dw.numel(); ++i) {
      REQUIRE(std::fabs(w.grad().data()[i] - dw.data()[i]) <= 1e-5 * (1 + std::fabs(dw.data()[i])));
      any_off_bf16 = any_off_bf16 || round_to_bf16(w.grad().data()[i]) != w.grad().data()[i];
    }
    REQUIRE(any_off_bf16);
    REQUIRE(rel_err(x.grad(), gemm_ref(gd, wd)) <= 0x1p-8);
    for (index_t j = 0; j < 5; ++j) {  // the bias gradient sums the fp32 gradient, unrounded
      double s = 0;
      for (index_t r = 0; r < 6; ++r) s += gy(r, j);
      REQUIRE(std::fabs(bias.grad()(j) - s) <= 1e-5 * (1 + std::fabs(s)));
    }
  }

  SECTION("add(fp32, bf16) with broadcast: an fp32 sum, gradients in each operand's type") {
    Generator g(14);
    const Vf a(Tf::randn({4, 6}, g), true);
    const Vb b = bf16_leaf({6}, 15);
    const Vf y = add(a, b);
    for (index_t r = 0; r < 4; ++r)
      for (index_t j = 0; j < 6; ++j) REQUIRE(y.value()(r, j) == a.value()(r, j) + float(b.value()(j)));
    const Tf gy = Tf::randn({4, 6}, g);
    y.backward(gy);
    for (index_t i = 0; i < a.numel(); ++i) REQUIRE(a.grad().data()[i] == gy.data()[i]);
    for (index_t j = 0; j < 6; ++j) {
      float s = 0;
      for (index_t r = 0; r < 4; ++r) s += gy(r, j);
      REQUIRE(std::fabs(float(b.grad()(j)) - s) <= 0x1p-8f * std::fabs(s) + 1e-6f);
    }
  }

  SECTION("stack_weights_bf16: one bf16 stack of fp32 weights, each weight's gradient its slice") {
    Generator g(16);
    const std::vector<Vf> ws{Vf(Tf::randn({3, 4}, g), true), Vf(Tf::randn({3, 4}, g), false),
                             Vf(Tf::randn({3, 4}, g), true)};
    const Vb st = stack_weights_bf16(std::span<const Vf>(ws));
    REQUIRE(st.shape() == Shape{3, 3, 4});
    for (index_t e = 0; e < 3; ++e)
      for (index_t i = 0; i < 3; ++i)
        for (index_t j = 0; j < 4; ++j) REQUIRE(float(st.value()(e, i, j)) == round_to_bf16(ws[e].value()(i, j)));
    const Tb gst = Td::randn({3, 3, 4}, g).to<bf16>();
    st.backward(gst);
    REQUIRE_FALSE(ws[1].grad().defined());
    for (index_t e : {0, 2})
      for (index_t i = 0; i < 3; ++i)
        for (index_t j = 0; j < 4; ++j) REQUIRE(ws[e].grad()(i, j) == float(gst(e, i, j)));
    MIXMOE_REQUIRE_ERROR(stack_weights_bf16(std::span<const Vf>(std::vector<Vf>{ws[0], Vf(Tf::ones({2, 4}))})),
                         "weight 1 has shape (2, 4), weight 0 has (3, 4)");
  }

  SECTION("the result is the bf16 rounding of the fp32 op on the widened operands, bit for bit") {
    const Vb x = bf16_leaf({7, 16}, 8), w = bf16_leaf({9, 16}, 9);
    no_grad ng;
    require_equal_rounded(linear(x, w).value(), linear(Vf(widen(x.value())), Vf(widen(w.value()))).value());
    require_equal_rounded(matmul(x, transpose(w, 0, 1)).value(),
                          matmul(Vf(widen(x.value())), transpose(Vf(widen(w.value())), 0, 1)).value());
  }

  SECTION("errors name the shapes") {
    MIXMOE_REQUIRE_ERROR(linear(bf16_leaf({2, 3}, 1), bf16_leaf({4, 5}, 2)), "does not match weight");
    MIXMOE_REQUIRE_ERROR(matmul(bf16_leaf({2, 3}, 1), bf16_leaf({4, 5}, 2)), "inner dimensions differ");
  }
}

TEST_CASE("via_fp32 ops equal their fp32 op on the widened inputs, gradients too, bit for bit", "[bf16]") {
  // forward: round(f(widen(x))); backward: round(df(widen(x)) . widen(g)), the same fp32 code
  const auto check = [](const char* name, auto f16, auto f32, std::vector<Shape> shapes) {
    INFO(name);
    std::vector<Vb> in16;
    std::vector<Vf> in32;
    std::uint64_t seed = 40;
    for (const Shape& s : shapes) {
      in16.push_back(bf16_leaf(s, ++seed));
      in32.push_back(Vf(widen(in16.back().value()), true));
    }
    const Vb y16 = f16(in16);
    const Vf y32 = f32(in32);
    require_equal_rounded(y16.value(), y32.value());
    Generator gg(99);
    const Tb g = Td::randn(y16.shape(), gg).to<bf16>();
    y16.backward(g);
    y32.backward(widen(g));
    for (std::size_t i = 0; i < in16.size(); ++i) {
      INFO("input " << i);
      REQUIRE(in16[i].grad().defined());
      require_equal_rounded(in16[i].grad(), in32[i].grad());
    }
  };
  check("rms_norm", [](auto& v) { return rms_norm(v[0], v[1]); }, [](auto& v) { return rms_norm(v[0], v[1]); },
        {{6, 32}, {32}});
  check("layer_norm", [](auto& v) { return layer_norm(v[0], v[1], v[2]); },
        [](auto& v) { return layer_norm(v[0], v[1], v[2]); }, {{2, 3, 24}, {24}, {24}});
  check("causal_attention (grouped-query heads)", [](auto& v) { return causal_attention(v[0], v[1], v[2]); },
        [](auto& v) { return causal_attention(v[0], v[1], v[2]); }, {{2, 5, 4, 8}, {2, 5, 2, 8}, {2, 5, 2, 8}});
  check("add (broadcast)", [](auto& v) { return v[0] + v[1]; }, [](auto& v) { return v[0] + v[1]; }, {{4, 6}, {6}});
  check("mul", [](auto& v) { return v[0] * v[1]; }, [](auto& v) { return v[0] * v[1]; }, {{4, 6}, {4, 6}});
  check("silu", [](auto& v) { return silu(v[0]); }, [](auto& v) { return silu(v[0]); }, {{5, 7}});
  check("gelu", [](auto& v) { return gelu(v[0]); }, [](auto& v) { return gelu(v[0]); }, {{5, 7}});

  SECTION("an undefined optional weight") {
    const Vb x = bf16_leaf({3, 8}, 1);
    const Vb y = rms_norm(x);
    const Vf y32 = rms_norm(Vf(widen(x.value())));
    require_equal_rounded(y.value(), y32.value());
  }
}

TEST_CASE("bf16 grouped_linear: the bf16 grouped GEMMs, rounded, against per-expert double GEMMs", "[bf16]") {
  const Vb x = bf16_leaf({9, 6}, 1), w = bf16_leaf({3, 4, 6}, 2);
  const auto off = Tensor<index_t, Cpu>::from(std::vector<index_t>{0, 4, 4, 8}, Shape{4});  // row 8 in no expert
  const Vb y = grouped_linear(x, w, off);
  REQUIRE(y.shape() == Shape{9, 4});
  Td want = Td::zeros({9, 4});
  const Td xd = x.value().to<double>(), wd = w.value().to<double>();
  const index_t lo[] = {0, 4, 4}, hi[] = {4, 4, 8};
  for (index_t e = 0; e < 3; ++e)
    for (index_t r = lo[e]; r < hi[e]; ++r)
      for (index_t j = 0; j < 4; ++j)
        for (index_t p = 0; p < 6; ++p) want(r, j) += xd(r, p) * wd(e, j, p);
  REQUIRE(rel_err(y.value(), want) <= 0x1p-8);
  Generator gg(3);
  const Tb g = Td::randn({9, 4}, gg).to<bf16>();
  y.backward(g);
  const Td gd = g.to<double>();
  Td gx = Td::zeros({9, 6}), gw = Td::zeros({3, 4, 6});
  for (index_t e = 0; e < 3; ++e)
    for (index_t r = lo[e]; r < hi[e]; ++r)
      for (index_t j = 0; j < 4; ++j)
        for (index_t p = 0; p < 6; ++p) {
          gx(r, p) += gd(r, j) * wd(e, j, p);
          gw(e, j, p) += gd(r, j) * xd(r, p);
        }
  REQUIRE(rel_err(x.grad(), gx) <= 0x1p-8);
  REQUIRE(rel_err(w.grad(), gw) <= 0x1p-8);
  for (index_t p = 0; p < 6; ++p) REQUIRE(float(x.grad()(8, p)) == 0.0f);  // the row outside every expert
}

TEST_CASE("bf16 ops inside an fp32 graph: nested backwards, shared inputs, gradients close to fp32", "[bf16]") {
  // loss = sum(cast(rms_norm(linear(cast(x), cast(w1))) + silu(linear(.., cast(w2))))) * c, with x and
  // the weights fp32 masters: every via_fp32 op runs a backward inside the outer backward, and x's
  // bf16 copy feeds two ops (its gradient sums two contributions)
  Generator g(12);
  const Vd xd(Td::randn({6, 16}, g), true), w1d(Td::randn({16, 16}, g, 0.0, 0.25), true),
      w2d(Td::randn({16, 16}, g, 0.0, 0.25), true), nd(Td::ones({16}), true), cd(Td::randn({6, 16}, g), false);
  const auto model = [&](auto tag) {
    using V = decltype(tag);
    const V x = cast<typename V::value_type>(xd), w1 = cast<typename V::value_type>(w1d),
            w2 = cast<typename V::value_type>(w2d), nw = cast<typename V::value_type>(nd);
    const V h = rms_norm(linear(x, w1), nw);
    const V out = h + silu(linear(h, w2)) + x;
    return sum(mul(cast<double>(out), cd));
  };
  model(Vd()).backward();
  const Td gx = xd.grad().clone(), gw1 = w1d.grad().clone(), gw2 = w2d.grad().clone(), gn = nd.grad().clone();
  for (const Vd& p : {xd, w1d, w2d, nd}) p.zero_grad();
  const Vd loss16 = model(Vb());
  loss16.backward();
  // bf16 activations: a few roundings of 2^-9 relative each along the path
  const auto close = [](const Td& got, const Td& want) {
    double err = 0, scale = 0;
    for (index_t i = 0; i < got.numel(); ++i) {
      err = std::max(err, std::fabs(got.data()[i] - want.data()[i]));
      scale = std::max(scale, std::fabs(want.data()[i]));
    }
    return err / scale;
  };
  CHECK(close(xd.grad(), gx) < 0.05);
  CHECK(close(w1d.grad(), gw1) < 0.05);
  CHECK(close(w2d.grad(), gw2) < 0.05);
  CHECK(close(nd.grad(), gn) < 0.05);
  // and they are not the fp32 gradients: the bf16 path did run
  CHECK(close(w1d.grad(), gw1) > 1e-5);
}

TEST_CASE("mixed-precision training: fp32 master weights, bf16 activations, close to the fp32 run", "[bf16]") {
  // a two-layer regression y = tanh-ish target of x; AdamW on fp32 weights; the bf16 run casts the
  // weights every step (gradients flow back through cast to the fp32 masters)
  Generator g(21);
  const Tf x = Tf::randn({64, 16}, g), target_w = Tf::randn({16, 8}, g, 0.0, 0.5);
  Tf y;
  {
    no_grad ng;
    y = silu(matmul(Vf(x), Vf(target_w))).value();
  }
  const auto train = [&](bool use_bf16) {
    Generator init(5);
    const Vf w1(Tf::randn({32, 16}, init, 0.0, 0.25), true), w2(Tf::randn({8, 32}, init, 0.0, 0.18), true);
    AdamW<float> opt({w1, w2}, AdamWOptions{.lr = 1e-2, .weight_decay = 0.0});
    double first = 0, last = 0;
    for (int step = 0; step < 150; ++step) {
      opt.zero_grad();
      Vf pred;
      if (use_bf16) {
        const Vb h = silu(linear(cast<bf16>(Vf(x)), cast<bf16>(w1)));
        pred = cast<float>(linear(h, cast<bf16>(w2)));
      } else {
        pred = linear(silu(linear(Vf(x), w1)), w2);
      }
      const Vf d = pred - Vf(y);
      const Vf loss = mean(d * d);
      loss.backward();
      opt.step();
      if (step == 0) first = loss.item();
      last = loss.item();
    }
    return std::pair{first, last};
  };
  const auto [f32_first, f32_last] = train(false);
  const auto [b16_first, b16_last] = train(true);
  INFO("fp32 " << f32_first << " -> " << f32_last << ", bf16 " << b16_first << " -> " << b16_last);
  REQUIRE(std::fabs(b16_first - f32_first) < 0.02 * f32_first);
  REQUIRE(f32_last < 0.05 * f32_first);
  REQUIRE(b16_last < 0.05 * b16_first);
  // bf16 trains as well as fp32, up to its resolution (the loss floor of 8-bit activations)
  REQUIRE(b16_last < 2.0 * f32_last + 1e-3 * f32_first);
}

namespace {

ModelConfig lm_config() {
  ModelConfig c;
  c.vocab = 23;
  c.d_model = 32;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.d_ff = 48;
  c.seed = 4;
  c.init_std = 0.1;
  return c;
}

using DenseLM = DecoderLM<CausalSelfAttention<float>, SwiGLU<float>>;
using MixedLM = DecoderLM<CausalSelfAttention<float>,
                          MixedMoE<TopK<>, ExpertGroup<SwiGLU<float>, tag::lm>, ExpertGroup<SwiGLU<float>, tag::mt>>>;

Tensor<Index> token_ids(index_t b, index_t t, index_t vocab, std::uint64_t seed) {
  Generator g(seed);
  std::vector<int> v(static_cast<std::size_t>(b * t));
  for (int& x : v) x = static_cast<int>(g.uniform(0.0, static_cast<double>(vocab) - 1e-9));
  return Tensor<Index>::from_indices(std::span<const int>(v), {b, t});
}

/// max |a - b| / max |b|.
double rel_diff(const Tf& a, const Tf& b) {
  double err = 0, scale = 0;
  for (index_t i = 0; i < a.numel(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(a.data()[i] - b.data()[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(b.data()[i])));
  }
  return err / scale;
}

/// The same model (same seed) in fp32 and with bf16 activations: logits and every parameter's
/// gradient of a cross-entropy loss are close, not equal.
template <class LM>
void compare_with_fp32(ModelConfig cfg) {
  const Tensor<Index> ids = token_ids(2, 9, cfg.vocab, 1), targets = token_ids(2, 9, cfg.vocab, 2);
  LM m32(cfg);
  cfg.activations = ActivationPrecision::bf16;
  LM m16(cfg);
  const Vf l32 = m32(ids), l16 = m16(ids);
  const double d = rel_diff(l16.value(), l32.value());
  INFO("logits differ by " << d);
  CHECK(d < 0.03);
  CHECK(d > 1e-5);  // the bf16 path did run
  cross_entropy(l32, targets).backward();
  cross_entropy(l16, targets).backward();
  const auto p32 = named_parameters(m32), p16 = named_parameters(m16);
  REQUIRE(p32.size() == p16.size());
  for (std::size_t i = 0; i < p32.size(); ++i) {
    INFO(p32[i].first);
    REQUIRE(p16[i].second.grad().defined());
    CHECK(rel_diff(p16[i].second.grad(), p32[i].second.grad()) < 0.1);
  }
}

}  // namespace

TEST_CASE("DecoderLM with bf16 activations: close to the fp32 model, trains, decodes with a cache", "[bf16][nn]") {
  SECTION("dense SwiGLU") { compare_with_fp32<DenseLM>(lm_config()); }
  SECTION("mixed MoE, experts in bf16 too") {
    ModelConfig cfg = lm_config();
    cfg.moe.experts_per_group = {2, 2};
    cfg.moe.mix = GroupMix::shared_router;
    cfg.moe.expert_precision = MatmulPrecision::bf16;
    compare_with_fp32<MixedLM>(cfg);
  }

  SECTION("training lowers the loss as in fp32") {
    const auto train = [](ActivationPrecision p) {
      ModelConfig cfg = lm_config();
      cfg.activations = p;
      DenseLM model(cfg);
      AdamW<float> opt(parameters(model), AdamWOptions{.lr = 3e-3, .weight_decay = 0.0});
      const Tensor<Index> ids = token_ids(4, 12, cfg.vocab, 7);
      const Tensor<Index> targets = ids;  // learn to copy the input token
      double first = 0, last = 0;
      for (int step = 0; step < 40; ++step) {
        opt.zero_grad();
        const Vf loss = cross_entropy(model(ids), targets);
        loss.backward();
        opt.step();
        if (step == 0) first = loss.item();
        last = loss.item();
      }
      return std::pair{first, last};
    };
    const auto [a0, a1] = train(ActivationPrecision::native);
    const auto [b0, b1] = train(ActivationPrecision::bf16);
    INFO("fp32 " << a0 << " -> " << a1 << ", bf16 " << b0 << " -> " << b1);
    REQUIRE(a1 < 0.5 * a0);
    REQUIRE(std::fabs(b0 - a0) < 0.01 * a0);
    REQUIRE(std::fabs(b1 - a1) < 0.1 * a1);
  }

  SECTION("decoding with a KV cache matches the full forward") {
    ModelConfig cfg = lm_config();
    cfg.activations = ActivationPrecision::bf16;
    DenseLM model(cfg);
    const Tensor<Index> ids = token_ids(2, 8, cfg.vocab, 3);
    no_grad ng;
    const Tf full = model(ids).value();
    DecodeState<float> state;
    const Tf prompt = model(Tensor<Index>(ids.slice(1, 0, 3).contiguous()), &state).value();
    // the GEMMs see other row counts, so a value may round to the neighbouring bf16
    CHECK(rel_diff(prompt, full.slice(1, 0, 3).contiguous()) < 0.03);
    for (index_t t = 3; t < 8; ++t) {
      const Tf step = model(Tensor<Index>(ids.slice(1, t, t + 1).contiguous()), &state).value();
      CHECK(rel_diff(step, full.slice(1, t, t + 1).contiguous()) < 0.03);
    }
  }

  SECTION("configuration: JSON round trip, a double model refuses bf16") {
    ModelConfig cfg = lm_config();
    REQUIRE(model_config_to_json(cfg).at("activations") == "native");
    cfg.activations = ActivationPrecision::bf16;
    REQUIRE(model_config_to_json(cfg).at("activations") == "bf16");
    REQUIRE(model_config_from_json(model_config_to_json(cfg)).activations == ActivationPrecision::bf16);
    auto j = model_config_to_json(cfg);
    j["activations"] = "fp8";
    MIXMOE_REQUIRE_ERROR(model_config_from_json(j), "config.activations: unknown value 'fp8' (native or bf16)");
    MIXMOE_REQUIRE_ERROR((DecoderLM<CausalSelfAttention<double>, SwiGLU<double>>(cfg)),
                         "activations bf16 needs a float model (got 64-bit)");
  }
}

}  // namespace test_bf16
