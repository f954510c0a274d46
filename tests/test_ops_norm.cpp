// rms_norm and layer_norm: gradients, values, float precision on large-magnitude rows, errors.
#include "test_util.hpp"

#include <mixmoe/ops/norm.hpp>

#include <cmath>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_ops_norm {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

/// The reference, in double with plain loops: rows of C normalised, then * w + b.
Td ref_norm(const Td& x, const Td* w, const Td* b, double eps, bool centre) {
  const index_t c = x.size(-1), rows = x.numel() / c;
  const Td xc = x.contiguous();
  Td y = Td::empty(x.shape());
  for (index_t r = 0; r < rows; ++r) {
    const double* p = xc.data() + r * c;
    double mu = 0, var = 0;
    if (centre) {
      for (index_t j = 0; j < c; ++j) mu += p[j];
      mu /= static_cast<double>(c);
    }
    for (index_t j = 0; j < c; ++j) var += (p[j] - mu) * (p[j] - mu);
    var /= static_cast<double>(c);
    for (index_t j = 0; j < c; ++j) {
      double v = (p[j] - mu) / std::sqrt(var + eps);
      if (w) v *= w->data()[j];
      if (b) v += b->data()[j];
      y.data()[r * c + j] = v;
    }
  }
  return y;
}

/// Per-row mean and mean square of a (R, C) view of y.
std::pair<std::vector<double>, std::vector<double>> row_moments(const Td& y) {
  const index_t c = y.size(-1), rows = y.numel() / c;
  std::vector<double> mean(rows), sq(rows);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = 0; j < c; ++j) {
      mean[r] += y.data()[r * c + j];
      sq[r] += y.data()[r * c + j] * y.data()[r * c + j];
    }
    mean[r] /= static_cast<double>(c);
    sq[r] /= static_cast<double>(c);
  }
  return {mean, sq};
}

}  // namespace

TEST_CASE("gradcheck: rms_norm with and without weight", "[ops][norm][gradcheck]") {
  for (const Shape& s : {Shape{4}, Shape{3, 5}, Shape{2, 3, 4}, Shape{2, 1, 7}, Shape{40, 3}}) {
    INFO("shape " << s);
    const index_t c = s[s.rank() - 1];
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rms_norm(in[0], in[1]); },
                             {rand_var(s, 1), rand_var({c}, 2)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rms_norm(in[0]); }, {rand_var(s, 3)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rms_norm(in[0], in[1], 0.5); },
                             {rand_var(s, 4), rand_var({c}, 5)});
    // only one of the two requires grad: the other must get nothing
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rms_norm(in[0], in[1]); },
                             {rand_var(s, 6, false), rand_var({c}, 7)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return rms_norm(in[0], in[1]); },
                             {rand_var(s, 8), rand_var({c}, 9, false)});
  }
}

TEST_CASE("gradcheck: layer_norm with every combination of weight and bias", "[ops][norm][gradcheck]") {
  for (const Shape& s : {Shape{4}, Shape{3, 5}, Shape{2, 3, 4}, Shape{2, 1, 7}, Shape{40, 3}}) {
    INFO("shape " << s);
    const index_t c = s[s.rank() - 1];
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0], in[1], in[2]); },
                             {rand_var(s, 1), rand_var({c}, 2), rand_var({c}, 3)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0], in[1]); },
                             {rand_var(s, 4), rand_var({c}, 5)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0], Vd(), in[1]); },
                             {rand_var(s, 6), rand_var({c}, 7)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0]); }, {rand_var(s, 8)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0], in[1], in[2], 0.3); },
                             {rand_var(s, 9, false), rand_var({c}, 10), rand_var({c}, 11)});
    MIXMOE_REQUIRE_GRADCHECK([](const std::vector<Vd>& in) { return layer_norm(in[0], in[1], in[2]); },
                             {rand_var(s, 12), rand_var({c}, 13, false), rand_var({c}, 14, false)});
  }
  // used twice in one graph: the gradients of both uses accumulate
  MIXMOE_REQUIRE_GRADCHECK(
      [](const std::vector<Vd>& in) { return layer_norm(in[0], in[1]) * rms_norm(in[0], in[1]); },
      {rand_var({3, 6}, 15), rand_var({6}, 16)});
}

TEST_CASE("norm values: unit rms, zero mean and unit variance, reference", "[ops][norm]") {
  Generator gen(21);
  const Td x = Td::randn({5, 3, 16}, gen, 0.5, 2.0);
  const Td w = Td::randn({16}, gen), b = Td::randn({16}, gen);
  // eps = 0: exact statistics
  {
    const auto [mean, sq] = row_moments(rms_norm(Vd(x), Vd(), 0.0).value());
    for (double v : sq) REQUIRE(v == Approx(1.0).epsilon(1e-13));
  }
  {
    const auto [mean, sq] = row_moments(layer_norm(Vd(x), Vd(), Vd(), 0.0).value());
    for (double v : mean) REQUIRE(std::abs(v) < 1e-14);
    for (double v : sq) REQUIRE(v == Approx(1.0).epsilon(1e-13));  // variance = mean square when the mean is 0
  }
  // against the plain-loop reference, with weight and bias and the default eps
  REQUIRE(max_abs_diff(rms_norm(Vd(x), Vd(w)).value(), ref_norm(x, &w, nullptr, 1e-6, false)) < 1e-13);
  REQUIRE(max_abs_diff(layer_norm(Vd(x), Vd(w), Vd(b)).value(), ref_norm(x, &w, &b, 1e-5, true)) < 1e-13);
  REQUIRE(max_abs_diff(layer_norm(Vd(x), Vd(), Vd(b)).value(), ref_norm(x, nullptr, &b, 1e-5, true)) < 1e-13);
  // a hand-computed row: x = (1, 2, 3, 4), mean 2.5, variance 1.25, mean square 7.5
  const Td h = Td::from({1.0, 2.0, 3.0, 4.0}, {1, 4});
  const auto ln = layer_norm(Vd(h), Vd(), Vd(), 0.0).value().to_vector();
  REQUIRE(ln[0] == Approx(-1.5 / std::sqrt(1.25)).epsilon(1e-15));
  REQUIRE(ln[3] == Approx(1.5 / std::sqrt(1.25)).epsilon(1e-15));
  const auto rn = rms_norm(Vd(h), Vd(Td::from({2.0, 2.0, 2.0, 2.0}, {4})), 0.0).value().to_vector();
  REQUIRE(rn[1] == Approx(4.0 / std::sqrt(7.5)).epsilon(1e-15));
  // eps enters under the square root
  const auto re = rms_norm(Vd(h), Vd(), 0.5).value().to_vector();
  REQUIRE(re[0] == Approx(1.0 / std::sqrt(8.0)).epsilon(1e-15));
  // a constant row: layer_norm gives 0 (not NaN) with eps > 0, and then the bias
  const auto cst = layer_norm(Vd(Td::full({1, 3}, 7.0)), Vd(), Vd(Td::from({1.0, 2.0, 3.0}, {3}))).value().to_vector();
  REQUIRE(cst == std::vector<double>{1.0, 2.0, 3.0});
}

TEST_CASE("norms in float: large-magnitude rows agree with double", "[ops][norm]") {
  // rows with mean 1e4 and spread 1: E[x^2] - E[x]^2 in float would lose every digit
  Generator gen(31);
  const index_t rows = 64, c = 512;
  Tf xf = Tf::randn({rows, c}, gen);
  for (index_t i = 0; i < xf.numel(); ++i) xf.data()[i] += 1e4f;
  const Td xd = xf.to<double>();
  const Tf wf = Tf::randn({c}, gen), bf = Tf::randn({c}, gen);
  auto vxf = Vf(xf, true), vwf = Vf(wf, true), vbf = Vf(bf, true);
  auto vxd = Vd(xd, true), vwd = Vd(wf.to<double>(), true), vbd = Vd(bf.to<double>(), true);
  const Tf lf = layer_norm(vxf, vwf, vbf).value();
  const Td ld = layer_norm(vxd, vwd, vbd).value();
  REQUIRE(max_abs_diff(lf.to<double>(), ld) < 2e-6);
  REQUIRE(max_abs_diff(ld, ref_norm(xd, &vwd.value(), &vbd.value(), 1e-5, true)) < 1e-10);
  const auto [mean, sq] = row_moments(layer_norm(vxf).value().to<double>());
  for (double v : mean) REQUIRE(std::abs(v) < 1e-5);
  for (double v : sq) REQUIRE(std::abs(v - 1.0) < 1e-4);
  // the gradients agree (relative to their scale)
  const Tf g = Tf::randn({rows, c}, gen);
  layer_norm(vxf, vwf, vbf).backward(g);
  layer_norm(vxd, vwd, vbd).backward(g.to<double>());
  REQUIRE(max_abs_diff(vxf.grad().to<double>(), vxd.grad()) < 1e-4);
  REQUIRE(max_abs_diff(vwf.grad().to<double>(), vwd.grad()) < 1e-3);  // a sum over 64 rows
  REQUIRE(max_abs_diff(vbf.grad().to<double>(), vbd.grad()) < 1e-4);
  // rms_norm: values whose squares overflow float are still normalised (statistics in double)
  Tf huge = Tf::randn({rows, c}, gen);
  for (index_t i = 0; i < huge.numel(); ++i) huge.data()[i] *= 1e20f;
  auto vh = Vf(huge, true);
  const Tf rh = rms_norm(vh, Vf(wf)).value();
  const Td rd = rms_norm(Vd(huge.to<double>()), Vd(wf.to<double>())).value();
  REQUIRE(max_abs_diff(rh.to<double>(), rd) < 1e-5);
  rms_norm(vh).backward(g);
  for (float v : vh.grad().to_vector()) REQUIRE(std::isfinite(v));
  // and float rms_norm on ordinary inputs agrees with double
  Tf xs = Tf::randn({rows, c}, gen, 0.0, 3.0);
  REQUIRE(max_abs_diff(rms_norm(Vf(xs), Vf(wf)).value().to<double>(),
                       rms_norm(Vd(xs.to<double>()), Vd(wf.to<double>())).value()) < 1e-5);
}

TEST_CASE("norm parameter gradients: many rows, deterministic, against a double reference", "[ops][norm]") {
  Generator gen(41);
  const index_t rows = 1000, c = 24;
  const Tf x = Tf::randn({rows, c}, gen), w = Tf::randn({c}, gen), b = Tf::randn({c}, gen);
  const Tf g = Tf::randn({rows, c}, gen);
  auto run = [&] {
    auto vx = Vf(x, true), vw = Vf(w, true), vb = Vf(b, true);
    layer_norm(vx, vw, vb).backward(g);
    return std::make_tuple(vx.grad().to_vector(), vw.grad().to_vector(), vb.grad().to_vector());
  };
  const auto first = run(), second = run();
  REQUIRE(first == second);  // bit for bit
  // dbias = column sums of g, dweight = column sums of g * xhat, in double
  const Td xhat = ref_norm(x.to<double>(), nullptr, nullptr, 1e-5, true);
  const auto& [gx, gw, gb] = first;
  for (index_t j = 0; j < c; ++j) {
    double sw = 0, sb = 0;
    for (index_t r = 0; r < rows; ++r) {
      sw += g.data()[r * c + j] * xhat.data()[r * c + j];
      sb += g.data()[r * c + j];
    }
    REQUIRE(std::abs(gw[j] - sw) < 1e-4 * std::max(1.0, std::abs(sw)));
    REQUIRE(std::abs(gb[j] - sb) < 1e-4 * std::max(1.0, std::abs(sb)));
  }
  // rms_norm's weight gradient against double too
  auto vx = Vf(x), vw = Vf(w, true);
  rms_norm(vx, vw).backward(g);
  auto dx = Vd(x.to<double>()), dw = Vd(w.to<double>(), true);
  rms_norm(dx, dw).backward(g.to<double>());
  REQUIRE(max_abs_diff(vw.grad().to<double>(), dw.grad()) < 1e-3);
}

TEST_CASE("norm on non-contiguous input and empty batches", "[ops][norm]") {
  Generator gen(51);
  const Td x = Td::randn({6, 4}, gen);
  auto xt = Vd(x.transpose(0, 1), true);  // (4, 6), rows are columns of x
  REQUIRE(max_abs_diff(layer_norm(xt).value(), ref_norm(x.transpose(0, 1).contiguous(), nullptr, nullptr, 1e-5, true)) <
          1e-14);
  // the gradient through the view equals the gradient through a contiguous copy
  auto xcopy = Vd(x.transpose(0, 1).contiguous(), true);
  const Td g = Td::randn({4, 6}, gen);
  rms_norm(xt).backward(g);
  rms_norm(xcopy).backward(g);
  REQUIRE(xt.grad().shape() == Shape{4, 6});
  REQUIRE(max_abs_diff(xt.grad(), xcopy.grad()) == 0.0);
  // zero rows: an empty result, and zero parameter gradients
  auto e = Vd(Td::zeros({0, 5}), true);
  auto w = Vd(Td::ones({5}), true);
  auto y = layer_norm(e, w, w);
  REQUIRE(y.shape() == Shape{0, 5});
  y.backward(Td::zeros({0, 5}));
  REQUIRE(w.grad().to_vector() == std::vector<double>(5, 0.0));
}

TEST_CASE("norm errors", "[ops][norm][errors]") {
  auto x = rand_var({2, 4}, 1);
  MIXMOE_REQUIRE_ERROR(rms_norm(x, rand_var({5}, 2)),
                       "[rms_norm] weight (5) does not match the last axis of x (2, 4) (expected (4))");
  MIXMOE_REQUIRE_ERROR(rms_norm(x, rand_var({1, 4}, 2)),
                       "[rms_norm] weight (1, 4) does not match the last axis of x (2, 4)");
  MIXMOE_REQUIRE_ERROR(layer_norm(x, rand_var({4}, 2), rand_var({3}, 3)),
                       "[layer_norm] bias (3) does not match the last axis of x (2, 4) (expected (4))");
  MIXMOE_REQUIRE_ERROR(layer_norm(x, rand_var({2}, 2)),
                       "[layer_norm] weight (2) does not match the last axis of x (2, 4)");
  MIXMOE_REQUIRE_ERROR(layer_norm(Vd(Td::scalar(1.0))),
                       "[layer_norm] needs an input with a last axis to normalise, got shape ()");
  MIXMOE_REQUIRE_ERROR(rms_norm(Vd(Td::zeros({3, 0}))), "[rms_norm] the last axis of x (3, 0) is empty");
  MIXMOE_REQUIRE_ERROR(rms_norm(x, Vd(), -1e-6), "[rms_norm] eps must be finite and >= 0, got -1e-06");
  MIXMOE_REQUIRE_ERROR(layer_norm(x, Vd(), Vd(), std::nan("")), "[layer_norm] eps must be finite and >= 0, got nan");
  MIXMOE_REQUIRE_ERROR(layer_norm(Vf()), "[layer_norm] the input is an undefined Var");
}
}  // namespace test_ops_norm
