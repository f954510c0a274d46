// Modules: plain structs that hold parameter Vars and list them, with dotted
// names, through visit_parameters(). There is no registration step and no base
// class: a module is anything that models the Module concept, so models stay
// ordinary values (copyable handles on shared parameters) and the names are the
// checkpoint keys ("layers.0.ffn.lm.experts.3.w_up").
#pragma once

#include <concepts>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixmoe/autograd/var.hpp"

namespace mixmoe {

/// Called once per parameter with its full dotted name.
template <Scalar T, Device D>
using ParameterVisitor = std::function<void(const std::string& name, Var<T, D>& parameter)>;

/// A module names its scalar and device types and lists its parameters.
template <class M>
concept Module = requires(M& m, const ParameterVisitor<typename M::value_type, typename M::device_type>& visit,
                          const std::string& prefix) {
  typename M::value_type;
  typename M::device_type;
  { m.visit_parameters(visit, prefix) } -> std::same_as<void>;
};

/// "prefix.name", or "name" when the prefix is empty.
inline std::string join_name(const std::string& prefix, std::string_view name) {
  if (prefix.empty()) return std::string(name);
  std::string s = prefix;
  s += '.';
  s += name;
  return s;
}

template <class M>
using module_var_t = Var<typename M::value_type, typename M::device_type>;

template <Module M>
struct NamedParameter {
  std::string name;
  module_var_t<M> var;
};

/// All parameters of a module, in visiting order (trainable or not).
template <Module M>
std::vector<module_var_t<M>> parameters(M& m) {
  std::vector<module_var_t<M>> out;
  m.visit_parameters([&](const std::string&, module_var_t<M>& p) { out.push_back(p); }, "");
  return out;
}

/// The parameters that currently require grad: what an optimizer should own.
template <Module M>
std::vector<module_var_t<M>> trainable_parameters(M& m) {
  std::vector<module_var_t<M>> out;
  m.visit_parameters([&](const std::string&, module_var_t<M>& p) {
    if (p.requires_grad()) out.push_back(p);
  }, "");
  return out;
}

/// (name, parameter) pairs in visiting order.
template <Module M>
std::vector<std::pair<std::string, module_var_t<M>>> named_parameters(M& m) {
  std::vector<std::pair<std::string, module_var_t<M>>> out;
  m.visit_parameters([&](const std::string& name, module_var_t<M>& p) { out.emplace_back(name, p); }, "");
  return out;
}

/// Number of scalar parameters (all, or only the trainable ones).
template <Module M>
index_t count_parameters(M& m, bool trainable_only = false) {
  index_t n = 0;
  m.visit_parameters([&](const std::string&, module_var_t<M>& p) {
    if (!trainable_only || p.requires_grad()) n += p.numel();
  }, "");
  return n;
}

/// Sets requires_grad on every parameter whose name satisfies `select`; returns how many
/// parameters matched. Freeze policies are built on this (see train/freeze.hpp).
template <Module M, class Pred>
int set_requires_grad(M& m, Pred&& select, bool on) {
  int matched = 0;
  m.visit_parameters([&](const std::string& name, module_var_t<M>& p) {
    if (select(std::string_view(name))) {
      p.requires_grad_(on);
      ++matched;
    }
  }, "");
  return matched;
}

/// Clears the gradient of every parameter.
template <Module M>
void zero_grad(M& m) {
  m.visit_parameters([](const std::string&, module_var_t<M>& p) { p.zero_grad(); }, "");
}

}  // namespace mixmoe
