// gradcheck: compares an op's analytic gradient (backward) with central finite
// differences, in double. Use it on your own ops:
//
//   auto r = mixmoe::gradcheck([](const std::vector<Var<double>>& in) { return my_op(in[0], in[1]); },
//                              {Var<double>(x, true), Var<double>(w, true)});
//   if (!r) std::cerr << r.message;
//
// The output is reduced to a scalar with fixed random weights, L = sum(w * f(x)),
// so every output element's gradient is exercised. Inputs that do not require
// grad are held constant and must receive no gradient.
#pragma once

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/autograd/var.hpp"

namespace mixmoe {

struct GradcheckOptions {
  double eps = 1e-6;    // finite-difference step
  double atol = 1e-6;   // pass when |analytic - numeric| <= atol + rtol * |numeric|
  double rtol = 1e-4;
  std::uint64_t seed = 1234;  // for the output weights
};

struct GradcheckResult {
  bool ok = true;
  double max_abs_error = 0;
  std::string message;  // the first mismatches, naming input and element
  explicit operator bool() const { return ok; }
};

using GradcheckFn = std::function<Var<double, Cpu>(const std::vector<Var<double, Cpu>>&)>;

inline GradcheckResult gradcheck(const GradcheckFn& fn, std::vector<Var<double, Cpu>> inputs, GradcheckOptions opt = {}) {
  using V = Var<double, Cpu>;
  using Tn = Tensor<double, Cpu>;
  GradcheckResult res;
  std::ostringstream msg;
  int reported = 0;
  for (auto& in : inputs) {
    MIXMOE_CHECK(in.defined() && in.is_leaf(), "gradcheck", "inputs must be leaf Vars");
    in.zero_grad();
    // Perturbation writes the value in place: make sure it owns a contiguous buffer.
    if (!in.value().is_contiguous()) in = V(in.value().clone(), in.requires_grad());
  }

  V out = fn(inputs);
  MIXMOE_CHECK(out.defined(), "gradcheck", "the function returned an undefined Var");
  Generator gen(opt.seed);
  const Tn weights = Tn::uniform(out.shape(), gen, -1.0, 1.0);
  const auto weighted = [&](const V& o) {
    const Tn v = o.value().contiguous();
    double s = 0;
    for (index_t i = 0; i < v.numel(); ++i) s += v.data()[i] * weights.data()[i];
    return s;
  };
  bool any_requires = false;
  for (auto& in : inputs) any_requires = any_requires || in.requires_grad();
  MIXMOE_CHECK(any_requires, "gradcheck", "no input requires grad: nothing to check");
  MIXMOE_CHECK(out.requires_grad(), "gradcheck", "the output does not depend on any input that requires grad (op '",
               out.op_name(), "')");
  out.backward(weights);

  for (std::size_t k = 0; k < inputs.size(); ++k) {
    V& in = inputs[k];
    if (!in.requires_grad()) {
      if (in.grad().defined()) {
        res.ok = false;
        msg << "input " << k << " does not require grad but received one\n";
      }
      continue;
    }
    const Tn analytic = in.grad().defined() ? in.grad() : Tn::zeros(in.shape());
    double* p = in.value().data();
    for (index_t i = 0; i < in.numel(); ++i) {
      const double orig = p[i];
      double plus, minus;
      {
        no_grad ng;
        p[i] = orig + opt.eps;
        plus = weighted(fn(inputs));
        p[i] = orig - opt.eps;
        minus = weighted(fn(inputs));
        p[i] = orig;
      }
      const double numeric = (plus - minus) / (2 * opt.eps);
      const double a = analytic.data()[i];
      const double err = std::abs(a - numeric);
      res.max_abs_error = std::max(res.max_abs_error, err);
      if (!(err <= opt.atol + opt.rtol * std::abs(numeric))) {
        res.ok = false;
        if (reported++ < 8)
          msg << "input " << k << " " << in.shape() << " element " << i << ": analytic " << a << " numeric " << numeric
              << " (abs error " << err << ")\n";
      }
    }
  }
  res.message = msg.str();
  return res;
}

}  // namespace mixmoe
