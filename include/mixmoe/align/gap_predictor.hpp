// RA-MoE's gap predictor: the share of correctable (ci) items of a task-language pair
// predicts what fine-tuning can gain there. An ordinary least-squares line through the
// (ci proportion, gain) points of the pairs, with its coefficient of determination:
//
//   y = a + b x,   b = S_xy / S_xx,  a = ybar - b xbar
//   S_xx = sum (x - xbar)^2,  S_xy = sum (x - xbar)(y - ybar),  S_yy = sum (y - ybar)^2
//   R^2 = 1 - SS_res / S_yy = S_xy^2 / (S_xx S_yy)   (1 when every y is the same and the fit is exact)
//
// Needs at least two points with different x.
//
//   std::vector<GapPoint> pts = {{"de", 0.25, 0.08}, {"ja", 0.40, 0.15}, ...};
//   LinearFit f = fit_gap_predictor(pts);   // f.intercept, f.slope, f.r2, f.predict(0.3)
#pragma once

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"

namespace mixmoe {

/// y = intercept + slope x, fitted by least squares.
struct LinearFit {
  double intercept = 0;
  double slope = 0;
  double r2 = 0;    // coefficient of determination
  double rmse = 0;  // root mean squared residual
  index_t points = 0;

  [[nodiscard]] double predict(double x) const { return intercept + slope * x; }
};

/// Least-squares line through (x[i], y[i]).
inline LinearFit fit_line(const std::vector<double>& x, const std::vector<double>& y) {
  constexpr const char* where = "fit_line";
  MIXMOE_CHECK(x.size() == y.size(), where, x.size(), " x values and ", y.size(), " y values");
  MIXMOE_CHECK(x.size() >= 2, where, "a line needs at least 2 points, got ", x.size());
  const auto n = static_cast<double>(x.size());
  double mx = 0, my = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    MIXMOE_CHECK(std::isfinite(x[i]) && std::isfinite(y[i]), where, "point ", i, " (", x[i], ", ", y[i],
                 ") is not finite");
    mx += x[i];
    my += y[i];
  }
  mx /= n;
  my /= n;
  double sxx = 0, sxy = 0, syy = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxx += (x[i] - mx) * (x[i] - mx);
    sxy += (x[i] - mx) * (y[i] - my);
    syy += (y[i] - my) * (y[i] - my);
  }
  MIXMOE_CHECK(sxx > 0, where, "all ", x.size(), " points have the same x = ", mx, ": the slope is undefined");
  LinearFit f;
  f.points = static_cast<index_t>(x.size());
  f.slope = sxy / sxx;
  f.intercept = my - f.slope * mx;
  double ss_res = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double r = y[i] - f.predict(x[i]);
    ss_res += r * r;
  }
  f.rmse = std::sqrt(ss_res / n);
  f.r2 = syy > 0 ? 1.0 - ss_res / syy : 1.0;
  return f;
}

/// One task-language pair: its ci proportion and the gain (or English-target gap) measured there.
struct GapPoint {
  std::string label;  // e.g. "iso3166/de"
  double ci_proportion = 0;
  double gain = 0;
};

/// gain = intercept + slope * ci_proportion over the pairs.
inline LinearFit fit_gap_predictor(const std::vector<GapPoint>& points) {
  std::vector<double> x, y;
  for (const auto& p : points) {
    x.push_back(p.ci_proportion);
    y.push_back(p.gain);
  }
  return fit_line(x, y);
}

/// The fit and, per pair, the measured and predicted gain.
inline std::string format_gap_predictor(const std::vector<GapPoint>& points, const LinearFit& f) {
  std::ostringstream os;
  char buf[160];
  std::snprintf(buf, sizeof buf, "gain = %.4f %c %.4f * ci   (R^2 = %.4f, RMSE = %.4f, %lld pairs)\n", f.intercept,
                f.slope < 0 ? '-' : '+', std::abs(f.slope), f.r2, f.rmse, static_cast<long long>(f.points));
  os << buf << "pair                 ci      gain  predicted\n";
  for (const auto& p : points) {
    std::snprintf(buf, sizeof buf, "%-16s %6.3f %9.4f %10.4f\n", p.label.c_str(), p.ci_proportion, p.gain,
                  f.predict(p.ci_proportion));
    os << buf;
  }
  return os.str();
}

}  // namespace mixmoe
