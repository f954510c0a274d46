// Rotary position embedding and fused causal attention (GQA, KV cache): gradients,
// values against plain-loop references, cache consistency and error messages.
#include "test_util.hpp"

#include <mixmoe/ops/attention.hpp>
#include <mixmoe/ops/rope.hpp>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_attention {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

/// rope written out: pair (i, i + Dh/2) of token t rotated by (offset + t) * theta^(-2i/Dh).
Td reference_rope(const Td& x, index_t offset, double theta, double sign = 1.0) {
  const index_t b = x.size(0), t = x.size(1), h = x.size(2), dh = x.size(3), half = dh / 2;
  Td out = Td::zeros(x.shape());
  for (index_t bb = 0; bb < b; ++bb)
    for (index_t tt = 0; tt < t; ++tt)
      for (index_t hh = 0; hh < h; ++hh)
        for (index_t i = 0; i < half; ++i) {
          const double a = sign * static_cast<double>(offset + tt) * std::pow(theta, -2.0 * static_cast<double>(i) / dh);
          const double x1 = x(bb, tt, hh, i), x2 = x(bb, tt, hh, i + half);
          out(bb, tt, hh, i) = x1 * std::cos(a) - x2 * std::sin(a);
          out(bb, tt, hh, i + half) = x2 * std::cos(a) + x1 * std::sin(a);
        }
  return out;
}

/// Causal attention written out: explicit scores, mask, softmax and weighted sum, in double.
Td reference_attention(const Td& q, const Td& k, const Td& v, double scale) {
  const index_t b = q.size(0), tq = q.size(1), hq = q.size(2), dh = q.size(3), tk = k.size(1), hkv = k.size(2);
  const index_t group = hq / hkv;
  Td out = Td::zeros(q.shape());
  for (index_t bb = 0; bb < b; ++bb)
    for (index_t h = 0; h < hq; ++h)
      for (index_t i = 0; i < tq; ++i) {
        const index_t kvh = h / group, pos = tk - tq + i;
        std::vector<double> s(static_cast<std::size_t>(tk), 0.0);
        for (index_t j = 0; j < tk; ++j) {
          if (j > pos) {
            s[j] = -INFINITY;  // the future is masked
            continue;
          }
          for (index_t d = 0; d < dh; ++d) s[j] += q(bb, i, h, d) * k(bb, j, kvh, d);
          s[j] *= scale;
        }
        double m = -INFINITY;
        for (double x : s) m = std::max(m, x);
        double z = 0;
        for (double& x : s) z += (x = std::exp(x - m));
        for (index_t j = 0; j < tk; ++j)
          for (index_t d = 0; d < dh; ++d) out(bb, i, h, d) += s[j] / z * v(bb, j, kvh, d);
      }
  return out;
}

/// kv (B, T, Hkv, Dh) with each head repeated `group` times: (B, T, Hkv * group, Dh).
Td repeat_heads(const Td& kv, index_t group) {
  const index_t b = kv.size(0), t = kv.size(1), hkv = kv.size(2), dh = kv.size(3);
  Td out = Td::empty({b, t, hkv * group, dh});
  for (index_t bb = 0; bb < b; ++bb)
    for (index_t tt = 0; tt < t; ++tt)
      for (index_t h = 0; h < hkv * group; ++h)
        for (index_t d = 0; d < dh; ++d) out(bb, tt, h, d) = kv(bb, tt, h / group, d);
  return out;
}

/// g (B, T, Hkv * group, Dh) summed over each group of heads: (B, T, Hkv, Dh).
Td sum_head_groups(const Td& g, index_t group) {
  const index_t b = g.size(0), t = g.size(1), hq = g.size(2), dh = g.size(3);
  Td out = Td::zeros({b, t, hq / group, dh});
  for (index_t bb = 0; bb < b; ++bb)
    for (index_t tt = 0; tt < t; ++tt)
      for (index_t h = 0; h < hq; ++h)
        for (index_t d = 0; d < dh; ++d) out(bb, tt, h / group, d) += g(bb, tt, h, d);
  return out;
}

Td randn(const Shape& s, std::uint64_t seed) {
  Generator g(seed);
  return Td::randn(s, g);
}

struct AttnCase {
  index_t b, tq, tk, hq, hkv, dh;
};

}  // namespace

// ---- rope -------------------------------------------------------------------------

TEST_CASE("rope: values by hand and against the written-out rotation", "[ops][rope]") {
  // Dh = 2: one pair with frequency 1, so token t is rotated by t radians.
  auto x = Vd(Td::from({1.0, 0.0, 1.0, 0.0, 0.0, 2.0}, {1, 3, 1, 2}));
  auto y = rope(x).value();
  const std::vector<double> expect = {1.0, 0.0, std::cos(1.0), std::sin(1.0), -2.0 * std::sin(2.0), 2.0 * std::cos(2.0)};
  const auto got = y.to_vector();
  for (std::size_t i = 0; i < expect.size(); ++i) REQUIRE(got[i] == Approx(expect[i]).margin(1e-15));
  // Dh = 4, theta = 100: pair (0, 2) turns at 1 rad per position, pair (1, 3) at 100^(-1/2) = 0.1.
  auto x4 = Vd(Td::from({1.0, 3.0, 0.0, 0.0}, {1, 1, 1, 4}));
  const auto y4 = rope(x4, 2, 100.0).value().to_vector();  // position 2: angles 2 and 0.2
  REQUIRE(y4[0] == Approx(std::cos(2.0)));
  REQUIRE(y4[1] == Approx(3.0 * std::cos(0.2)));
  REQUIRE(y4[2] == Approx(std::sin(2.0)));
  REQUIRE(y4[3] == Approx(3.0 * std::sin(0.2)));

  for (auto [shape, offset, theta] : std::vector<std::tuple<Shape, index_t, double>>{
           {{2, 5, 3, 8}, 0, 10000.0}, {{1, 7, 2, 6}, 11, 10000.0}, {{3, 4, 1, 16}, 1000, 1e6}, {{2, 3, 4, 2}, 5, 500.0}}) {
    INFO("shape " << shape << " offset " << offset << " theta " << theta);
    const Td xv = randn(shape, 7);
    REQUIRE(max_abs_diff(rope(Vd(xv), offset, theta).value(), reference_rope(xv, offset, theta)) < 1e-12);
  }
}

TEST_CASE("rope: gradcheck", "[ops][rope][gradcheck]") {
  for (auto [shape, offset, theta] : std::vector<std::tuple<Shape, index_t, double>>{
           {{1, 3, 2, 4}, 0, 10000.0}, {{2, 5, 3, 6}, 7, 10000.0}, {{1, 4, 1, 2}, 3, 100.0}, {{2, 2, 2, 8}, 0, 10.0}}) {
    INFO("shape " << shape << " offset " << offset << " theta " << theta);
    MIXMOE_REQUIRE_GRADCHECK([=](const std::vector<Vd>& in) { return rope(in[0], offset, theta); }, {rand_var(shape, 3)});
  }
  // inside a graph: the gradient flows through a product of two ropes
  MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rope(in[0], 2) * rope(in[1], 2); },
                           {rand_var({1, 3, 2, 4}, 4), rand_var({1, 3, 2, 4}, 5)});
}

TEST_CASE("rope: pair norms kept, inverse rotation undoes it", "[ops][rope]") {
  const Td x = randn({2, 6, 3, 10}, 9);
  const index_t offset = 37;
  const Td y = rope(Vd(x), offset).value();
  for (index_t b = 0; b < 2; ++b)
    for (index_t t = 0; t < 6; ++t)
      for (index_t h = 0; h < 3; ++h)
        for (index_t i = 0; i < 5; ++i) {
          const double nx = std::hypot(x(b, t, h, i), x(b, t, h, i + 5)), ny = std::hypot(y(b, t, h, i), y(b, t, h, i + 5));
          REQUIRE(ny == Approx(nx).epsilon(1e-12));
        }
  // rotating back by the negated angles gives x again: with the written-out rotation ...
  REQUIRE(max_abs_diff(reference_rope(y, offset, 10000.0, -1.0), x) < 1e-12);
  // ... and with the kernel's inverse (the one the backward uses)
  auto tab = detail::rope_table<double>(6, 10, offset, 10000.0);
  REQUIRE(max_abs_diff(detail::rope_rotate(y, *tab, true), x) < 1e-12);
  // a rotation is not the identity: the offset matters
  REQUIRE(max_abs_diff(y, rope(Vd(x), offset + 1).value()) > 1e-3);
}

TEST_CASE("rope: a token alone at offset t equals row t of the whole sequence", "[ops][rope]") {
  const Td x = randn({2, 9, 3, 8}, 10);
  const Td full = rope(Vd(x)).value();
  for (index_t t = 0; t < 9; ++t) {
    INFO("token " << t);
    const Td one = rope(Vd(x.slice(1, t, t + 1)), t).value();  // a non-contiguous view as input
    REQUIRE(max_abs_diff(one, full.slice(1, t, t + 1).contiguous()) < 1e-13);
  }
  // a chunk of the sequence (prefill after a cache of 4 tokens)
  REQUIRE(max_abs_diff(rope(Vd(x.slice(1, 4, 9)), 4).value(), full.slice(1, 4, 9).contiguous()) < 1e-13);
}

TEST_CASE("rope: float agrees with double, also at far positions", "[ops][rope]") {
  const Td x = randn({2, 64, 4, 32}, 11);
  for (index_t offset : {index_t{0}, index_t{100000}}) {
    const Tf yf = rope(Vf(x.to<float>()), offset).value();
    const Td yd = rope(Vd(x), offset).value();
    REQUIRE(max_abs_diff(yf.to<double>(), yd) < 1e-5);
  }
}

TEST_CASE("rope: errors", "[ops][rope][errors]") {
  MIXMOE_REQUIRE_ERROR(rope(Vd(Td::zeros({2, 3, 4}))), "[rope] input must be (B, T, H, Dh), got (2, 3, 4)");
  MIXMOE_REQUIRE_ERROR(rope(Vd(Td::zeros({1, 2, 3, 5}))), "[rope] head size Dh = 5 must be even (input (1, 2, 3, 5))");
  MIXMOE_REQUIRE_ERROR(rope(Vd(Td::zeros({1, 2, 3, 4})), -1), "[rope] position_offset -1 must be >= 0");
  MIXMOE_REQUIRE_ERROR(rope(Vd(Td::zeros({1, 2, 3, 4})), 0, 0.0), "[rope] theta 0 must be a positive number");
  MIXMOE_REQUIRE_ERROR(rope(Vd(Td::zeros({1, 2, 3, 4})), 0, -5.0), "[rope] theta -5 must be a positive number");
}

// ---- causal attention -------------------------------------------------------------

TEST_CASE("causal_attention: gradcheck of q, k, v", "[ops][attention][gradcheck]") {
  const std::vector<AttnCase> cases = {
      {1, 3, 3, 2, 2, 4},   // Hq == Hkv, Tq == Tk
      {2, 4, 4, 4, 2, 3},   // GQA, 2 query heads per kv head
      {1, 3, 3, 4, 1, 4},   // GQA, one kv head for all (B * Hkv < threads: split groups)
      {2, 2, 5, 2, 2, 3},   // Tq < Tk (a KV cache of 3 tokens)
      {1, 3, 6, 4, 2, 2},   // GQA and Tq < Tk
      {2, 1, 4, 4, 1, 3},   // one decoding step
      {1, 67, 70, 2, 1, 2},  // more query rows than one block
  };
  for (const auto& c : cases) {
    INFO("B " << c.b << " Tq " << c.tq << " Tk " << c.tk << " Hq " << c.hq << " Hkv " << c.hkv << " Dh " << c.dh);
    auto f = [](const std::vector<Vd>& in) { return causal_attention(in[0], in[1], in[2]); };
    MIXMOE_REQUIRE_GRADCHECK(f, (std::vector<Vd>{rand_var({c.b, c.tq, c.hq, c.dh}, 1), rand_var({c.b, c.tk, c.hkv, c.dh}, 2),
                                                 rand_var({c.b, c.tk, c.hkv, c.dh}, 3)}));
  }
  // an explicit scale, and inputs that do not require grad (they must receive none)
  auto g = [](const std::vector<Vd>& in) { return causal_attention(in[0], in[1], in[2], 0.7); };
  MIXMOE_REQUIRE_GRADCHECK(g, (std::vector<Vd>{rand_var({2, 3, 4, 3}, 4), rand_var({2, 5, 2, 3}, 5, false),
                                               rand_var({2, 5, 2, 3}, 6)}));
  MIXMOE_REQUIRE_GRADCHECK(g, (std::vector<Vd>{rand_var({2, 3, 4, 3}, 4, false), rand_var({2, 5, 2, 3}, 5),
                                               rand_var({2, 5, 2, 3}, 6, false)}));
  MIXMOE_REQUIRE_GRADCHECK(g, (std::vector<Vd>{rand_var({1, 3, 2, 3}, 4), rand_var({1, 3, 1, 3}, 5, false),
                                               rand_var({1, 3, 1, 3}, 6, false)}));
  // rope on q and k before attention, as in a LLaMA block
  auto h = [](const std::vector<Vd>& in) { return causal_attention(rope(in[0], 3), rope(in[1]), in[2]); };
  MIXMOE_REQUIRE_GRADCHECK(h, (std::vector<Vd>{rand_var({1, 2, 4, 4}, 7), rand_var({1, 5, 2, 4}, 8), rand_var({1, 5, 2, 4}, 9)}));
}

TEST_CASE("causal_attention: values against the written-out attention", "[ops][attention]") {
  const std::vector<AttnCase> cases = {{1, 1, 1, 1, 1, 1},   {2, 5, 5, 3, 3, 4},   {2, 4, 9, 4, 2, 8},
                                       {1, 130, 130, 2, 1, 16}, {2, 70, 150, 4, 2, 8}, {3, 1, 33, 6, 3, 5}};
  for (const auto& c : cases)
    for (double scale : {-1.0, 0.3}) {
      INFO("B " << c.b << " Tq " << c.tq << " Tk " << c.tk << " Hq " << c.hq << " Hkv " << c.hkv << " Dh " << c.dh
                << " scale " << scale);
      const Td q = randn({c.b, c.tq, c.hq, c.dh}, 21), k = randn({c.b, c.tk, c.hkv, c.dh}, 22),
               v = randn({c.b, c.tk, c.hkv, c.dh}, 23);
      const double s = scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(c.dh));
      const Td out = scale > 0 ? causal_attention(Vd(q), Vd(k), Vd(v), scale).value()
                               : causal_attention(Vd(q), Vd(k), Vd(v)).value();
      REQUIRE(out.shape() == q.shape());
      REQUIRE(max_abs_diff(out, reference_attention(q, k, v, s)) < 1e-12);
    }
  // the first query sees only the first key: its output is that key's value
  const Td q = randn({1, 4, 2, 3}, 1), k = randn({1, 4, 2, 3}, 2), v = randn({1, 4, 2, 3}, 3);
  const Td out = causal_attention(Vd(q), Vd(k), Vd(v)).value();
  REQUIRE(max_abs_diff(out.slice(1, 0, 1).contiguous(), v.slice(1, 0, 1).contiguous()) < 1e-15);
  // large scores (scale 50): the softmax is stable, no inf or nan
  const Td big = causal_attention(Vd(q), Vd(k), Vd(v), 50.0).value();
  REQUIRE(max_abs_diff(big, reference_attention(q, k, v, 50.0)) < 1e-10);
}

TEST_CASE("causal_attention: non-contiguous inputs and no_grad", "[ops][attention]") {
  const Td qt = randn({2, 3, 5, 4}, 31);  // (B, Hq, Tq, Dh): permuted into (B, Tq, Hq, Dh) views
  const Td kt = randn({2, 1, 7, 4}, 32), vt = randn({2, 1, 7, 4}, 33);
  const Td q = qt.permute({0, 2, 1, 3}), k = kt.permute({0, 2, 1, 3}), v = vt.permute({0, 2, 1, 3});
  REQUIRE_FALSE(q.is_contiguous());
  const Td expect = reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.5);
  REQUIRE(max_abs_diff(causal_attention(Vd(q), Vd(k), Vd(v), 0.5).value(), expect) < 1e-12);
  // gradients through strided views equal those through contiguous copies
  auto qv = Vd(q, true), kv = Vd(k, true), vv = Vd(v, true);
  auto qd = Vd(q.contiguous(), true), kd = Vd(k.contiguous(), true), vd = Vd(v.contiguous(), true);
  const Td w = randn(q.shape(), 34);
  causal_attention(qv, kv, vv, 0.5).backward(w);
  causal_attention(qd, kd, vd, 0.5).backward(w);
  REQUIRE(max_abs_diff(qv.grad(), qd.grad()) < 1e-14);
  REQUIRE(max_abs_diff(kv.grad(), kd.grad()) < 1e-14);
  REQUIRE(max_abs_diff(vv.grad(), vd.grad()) < 1e-14);
  // the filled part of a KV-cache buffer (B, Tmax, Hkv, Dh): a view strided over the batch
  const Td kcache = randn({2, 16, 1, 4}, 35), vcache = randn({2, 16, 1, 4}, 36);
  const Td ks = kcache.slice(1, 0, 7), vs = vcache.slice(1, 0, 7);
  REQUIRE_FALSE(ks.is_contiguous());
  REQUIRE(max_abs_diff(causal_attention(Vd(q), Vd(ks), Vd(vs), 0.5).value(),
                       reference_attention(q.contiguous(), ks.contiguous(), vs.contiguous(), 0.5)) < 1e-12);
  // channels not contiguous (Dh is not the last memory axis): copied, same values
  const Td kp = randn({2, 4, 7, 1}, 37).permute({0, 2, 3, 1}), vp = randn({2, 4, 7, 1}, 38).permute({0, 2, 3, 1});
  REQUIRE(kp.stride(3) != 1);
  REQUIRE(max_abs_diff(causal_attention(Vd(q), Vd(kp), Vd(vp), 0.5).value(),
                       reference_attention(q.contiguous(), kp.contiguous(), vp.contiguous(), 0.5)) < 1e-12);
  no_grad guard;
  auto out = causal_attention(Vd(q, true), Vd(k, true), Vd(v, true), 0.5);
  REQUIRE_FALSE(out.requires_grad());
  REQUIRE(max_abs_diff(out.value(), expect) < 1e-12);
}

TEST_CASE("causal_attention: GQA equals standard attention with kv heads repeated", "[ops][attention]") {
  for (auto [hq, hkv] : std::vector<std::pair<index_t, index_t>>{{4, 2}, {4, 1}, {6, 3}, {8, 2}}) {
    INFO("Hq " << hq << " Hkv " << hkv);
    const index_t group = hq / hkv, b = 2, tq = 6, tk = 9, dh = 5;
    auto q = Vd(randn({b, tq, hq, dh}, 41), true), k = Vd(randn({b, tk, hkv, dh}, 42), true),
         v = Vd(randn({b, tk, hkv, dh}, 43), true);
    auto kr = Vd(repeat_heads(k.value(), group), true), vr = Vd(repeat_heads(v.value(), group), true);
    auto qr = Vd(q.value(), true);
    auto gqa = causal_attention(q, k, v), mha = causal_attention(qr, kr, vr);
    REQUIRE(max_abs_diff(gqa.value(), mha.value()) < 1e-13);
    const Td w = randn(gqa.shape(), 44);
    gqa.backward(w);
    mha.backward(w);
    REQUIRE(max_abs_diff(q.grad(), qr.grad()) < 1e-12);
    REQUIRE(max_abs_diff(k.grad(), sum_head_groups(kr.grad(), group)) < 1e-12);
    REQUIRE(max_abs_diff(v.grad(), sum_head_groups(vr.grad(), group)) < 1e-12);
  }
}

TEST_CASE("causal_attention: KV-cache steps equal rows of the full sequence", "[ops][attention]") {
  const index_t b = 2, t = 11, hq = 4, hkv = 2, dh = 8;
  const Td qraw = randn({b, t, hq, dh}, 51), kraw = randn({b, t, hkv, dh}, 52), v = randn({b, t, hkv, dh}, 53);
  const Td kr = rope(Vd(kraw)).value();  // the cache holds rotated keys
  const Td full = causal_attention(rope(Vd(qraw)), Vd(kr), Vd(v)).value();
  // the last query alone against all keys
  const Td last = causal_attention(rope(Vd(qraw.slice(1, t - 1, t)), t - 1), Vd(kr), Vd(v)).value();
  REQUIRE(max_abs_diff(last, full.slice(1, t - 1, t).contiguous()) < 1e-13);
  // token-by-token decoding: step s sees the s + 1 cached keys
  for (index_t s = 0; s < t; ++s) {
    INFO("step " << s);
    auto ks = rope(Vd(kraw.slice(1, s, s + 1)), s).value();  // the new key, rotated at its position
    REQUIRE(max_abs_diff(ks, kr.slice(1, s, s + 1).contiguous()) < 1e-13);
    const Td step = causal_attention(rope(Vd(qraw.slice(1, s, s + 1)), s), Vd(kr.slice(1, 0, s + 1)),
                                     Vd(v.slice(1, 0, s + 1))).value();
    REQUIRE(max_abs_diff(step, full.slice(1, s, s + 1).contiguous()) < 1e-13);
  }
  // a chunk of 4 new tokens after a cache of 7
  const Td chunk = causal_attention(rope(Vd(qraw.slice(1, 7, t)), 7), Vd(kr), Vd(v)).value();
  REQUIRE(max_abs_diff(chunk, full.slice(1, 7, t).contiguous()) < 1e-13);
}

TEST_CASE("causal_attention: float agrees with double (T = 64, Dh = 32)", "[ops][attention]") {
  for (auto [tq, tk] : std::vector<std::pair<index_t, index_t>>{{64, 64}, {16, 64}, {100, 100}}) {
    INFO("Tq " << tq << " Tk " << tk);
    const index_t b = 2, hq = 4, hkv = 2, dh = 32;
    const Td q = randn({b, tq, hq, dh}, 61), k = randn({b, tk, hkv, dh}, 62), v = randn({b, tk, hkv, dh}, 63);
    auto qd = Vd(q, true), kd = Vd(k, true), vd = Vd(v, true);
    auto qf = Vf(q.to<float>(), true), kf = Vf(k.to<float>(), true), vf = Vf(v.to<float>(), true);
    auto od = causal_attention(qd, kd, vd);
    auto of = causal_attention(qf, kf, vf);
    REQUIRE(max_abs_diff(of.value().to<double>(), od.value()) < 2e-5);
    const Td w = randn(od.shape(), 64);
    od.backward(w);
    of.backward(w.to<float>());
    REQUIRE(max_abs_diff(qf.grad().to<double>(), qd.grad()) < 1e-4);
    REQUIRE(max_abs_diff(kf.grad().to<double>(), kd.grad()) < 1e-4);
    REQUIRE(max_abs_diff(vf.grad().to<double>(), vd.grad()) < 1e-4);
  }
}

TEST_CASE("causal_attention: gradients accumulate over uses and backward is repeatable", "[ops][attention]") {
  auto q = rand_var({1, 4, 2, 4}, 71), k = rand_var({1, 4, 1, 4}, 72), v = rand_var({1, 4, 1, 4}, 73);
  auto once = sum(causal_attention(q, k, v));
  once.backward();
  const Td gq = q.grad().clone(), gk = k.grad().clone(), gv = v.grad().clone();
  q.zero_grad();
  k.zero_grad();
  v.zero_grad();
  auto twice = sum(causal_attention(q, k, v) + causal_attention(q, k, v));
  twice.backward();
  REQUIRE(max_abs_diff(q.grad(), detail::map(gq, [](double g) { return 2 * g; })) < 1e-12);
  REQUIRE(max_abs_diff(k.grad(), detail::map(gk, [](double g) { return 2 * g; })) < 1e-12);
  REQUIRE(max_abs_diff(v.grad(), detail::map(gv, [](double g) { return 2 * g; })) < 1e-12);
}

TEST_CASE("causal_attention: empty query block and zero head size", "[ops][attention]") {
  auto q = Vd(Td::zeros({2, 0, 4, 3}), true);
  auto k = rand_var({2, 5, 2, 3}, 81), v = rand_var({2, 5, 2, 3}, 82);
  auto o = causal_attention(q, k, v);
  REQUIRE(o.shape() == Shape{2, 0, 4, 3});
  o.backward(Td::zeros(o.shape()));
  REQUIRE(max_abs_diff(k.grad(), Td::zeros(k.shape())) == 0.0);
  REQUIRE(max_abs_diff(v.grad(), Td::zeros(v.shape())) == 0.0);
  // Dh = 0: every score is 0, the output has no channels
  auto z = causal_attention(Vd(Td::zeros({1, 3, 2, 0})), Vd(Td::zeros({1, 4, 1, 0})), Vd(Td::zeros({1, 4, 1, 0})));
  REQUIRE(z.shape() == Shape{1, 3, 2, 0});
}

TEST_CASE("causal_attention: errors", "[ops][attention][errors]") {
  auto q = Vd(Td::zeros({2, 3, 4, 8})), k = Vd(Td::zeros({2, 5, 2, 8})), v = Vd(Td::zeros({2, 5, 2, 8}));
  MIXMOE_REQUIRE_ERROR(causal_attention(Vd(Td::zeros({3, 4, 8})), k, v),
                       "[causal_attention] query must be (B, Tq, Hq, Dh), got (3, 4, 8)");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({5, 2, 8})), v),
                       "[causal_attention] key must be (B, Tk, Hkv, Dh), got (5, 2, 8)");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, k, Vd(Td::zeros({2, 4, 2, 8}))),
                       "[causal_attention] key (2, 5, 2, 8) and value (2, 4, 2, 8) must have the same shape");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({1, 5, 2, 8})), Vd(Td::zeros({1, 5, 2, 8}))),
                       "[causal_attention] batch of query (2, 3, 4, 8) and key (1, 5, 2, 8) differ");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({2, 5, 2, 6})), Vd(Td::zeros({2, 5, 2, 6}))),
                       "[causal_attention] head size of query (2, 3, 4, 8) and key (2, 5, 2, 6) differ");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({2, 5, 3, 8})), Vd(Td::zeros({2, 5, 3, 8}))),
                       "[causal_attention] Hq = 4 query heads must be a multiple of Hkv = 3 kv heads");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({2, 5, 0, 8})), Vd(Td::zeros({2, 5, 0, 8}))),
                       "[causal_attention] Hq = 4 query heads must be a multiple of Hkv = 0 kv heads");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, Vd(Td::zeros({2, 2, 2, 8})), Vd(Td::zeros({2, 2, 2, 8}))),
                       "[causal_attention] Tq = 3 queries but only Tk = 2 keys");
  MIXMOE_REQUIRE_ERROR(causal_attention(q, k, v, INFINITY), "[causal_attention] scale inf must be finite");
}
}  // namespace test_ops_attention
