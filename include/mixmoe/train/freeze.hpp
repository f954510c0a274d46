// Freeze policies: which parameters train in a stage, chosen by their dotted names.
//
// A policy is an ordered list of rules (pattern -> train or freeze); the LAST rule whose
// pattern matches a parameter's name decides, and parameters no rule matches are left
// as they are, trained or frozen (`otherwise`). Patterns:
//   with * or ?  a glob over the whole name; * matches any run of characters, dots included
//                ("layers.*.attn.*", "*.w_down.weight");
//   otherwise    a run of whole dotted components anywhere in the name: "lm.experts" matches
//                "layers.0.ffn.lm.experts.3.w_up.weight", "router" matches "...ffn.router.lm.weight",
//                "attn" does not match "attn_x.weight".
//
// The Mix-MoE stages (names of moe/mixed_moe.hpp and nn/decoder.hpp):
//   stage1_policy(): LM experts, routers and group gates train; MT experts (unless asked),
//                    attention, norms and embeddings are frozen;
//   stage2_policy(): MT experts, routers and group gates train; everything else is frozen.
//
//   auto report = apply_freeze_policy(model, stage2_policy());
//   std::cout << report.summary();   // "frozen 1.2M / trainable 400.0K parameters"
//   AdamW opt(trainable_parameters(model), {...});
//
// Build the optimizer after applying the policy (or keep one over all parameters: the
// optimizers skip parameters that do not require grad, so frozen ones stay bit-identical).
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mixmoe/moe/expert_group.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

/// Whether `name` matches `pattern` (see the header comment for the two pattern forms).
inline bool name_matches(std::string_view pattern, std::string_view name) {
  if (pattern.find_first_of("*?") == std::string_view::npos) {
    if (pattern.empty()) return false;
    std::string dotted_name = ".", dotted_pattern = ".";
    dotted_name.append(name).push_back('.');
    dotted_pattern.append(pattern).push_back('.');
    return dotted_name.find(dotted_pattern) != std::string::npos;
  }
  // Glob with backtracking to the last '*': linear in practice for dotted names.
  std::size_t p = 0, n = 0, star = std::string_view::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p;
      ++n;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

struct FreezePolicy {
  struct Rule {
    std::string pattern;
    bool trainable = false;
  };
  /// What happens to parameters that no rule matches.
  enum class Unmatched { keep, train, freeze };

  std::vector<Rule> rules;  // later rules override earlier ones
  Unmatched otherwise = Unmatched::keep;

  FreezePolicy& train(std::string pattern) {
    rules.push_back({std::move(pattern), true});
    return *this;
  }
  FreezePolicy& freeze(std::string pattern) {
    rules.push_back({std::move(pattern), false});
    return *this;
  }
  FreezePolicy& otherwise_train() {
    otherwise = Unmatched::train;
    return *this;
  }
  FreezePolicy& otherwise_freeze() {
    otherwise = Unmatched::freeze;
    return *this;
  }

  /// true: train, false: freeze, nullopt: leave as it is.
  [[nodiscard]] std::optional<bool> decide(std::string_view name) const {
    for (auto it = rules.rbegin(); it != rules.rend(); ++it)
      if (name_matches(it->pattern, name)) return it->trainable;
    if (otherwise == Unmatched::train) return true;
    if (otherwise == Unmatched::freeze) return false;
    return std::nullopt;
  }
};

/// The name pattern of a group's experts: "<tag>.experts".
template <class Tag>
std::string experts_of() {
  static_assert(GroupTag<Tag>, "experts_of<Tag>: Tag must have `static constexpr const char* name`");
  return std::string(Tag::name) + ".experts";
}

/// Mix-MoE stage 1 (monolingual): LM experts + routers (+ MT experts when asked) train, the rest is frozen.
inline FreezePolicy stage1_policy(bool train_mt_experts = false) {
  FreezePolicy p;
  p.otherwise_freeze().train(experts_of<tag::lm>()).train("router").train("group_gate");
  if (train_mt_experts) p.train(experts_of<tag::mt>());
  return p;
}

/// Mix-MoE stage 2 (parallel data): MT experts + routers train; LM experts, attention, norms, embeddings frozen.
inline FreezePolicy stage2_policy() {
  FreezePolicy p;
  p.otherwise_freeze().train(experts_of<tag::mt>()).train("router").train("group_gate");
  return p;
}

/// What a policy did: scalar and tensor counts after applying it.
struct FreezeReport {
  index_t frozen = 0;     // scalar parameters that do not require grad
  index_t trainable = 0;  // scalar parameters that require grad
  index_t frozen_tensors = 0;
  index_t trainable_tensors = 0;
  std::vector<std::string> unused_patterns;  // rules that matched no parameter (a typo?)

  /// "frozen 1.2M / trainable 400.0K parameters"
  [[nodiscard]] std::string summary() const {
    return "frozen " + human_count(frozen) + " / trainable " + human_count(trainable) + " parameters";
  }

  static std::string human_count(index_t n) {
    char buf[32];
    if (n < 1000)
      std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
    else if (n < 1000000)
      std::snprintf(buf, sizeof buf, "%.1fK", static_cast<double>(n) / 1e3);
    else if (n < 1000000000)
      std::snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(n) / 1e6);
    else
      std::snprintf(buf, sizeof buf, "%.1fB", static_cast<double>(n) / 1e9);
    return buf;
  }
};

/// Sets requires_grad on the parameters of `model` as the policy decides; returns the counts.
template <Module M>
FreezeReport apply_freeze_policy(M& model, const FreezePolicy& policy) {
  FreezeReport report;
  std::vector<bool> used(policy.rules.size(), false);
  const auto decide = [&](std::string_view name) { return policy.decide(name); };
  set_requires_grad(
      model, [&](std::string_view name) { return decide(name) == std::optional<bool>(true); }, true);
  set_requires_grad(
      model, [&](std::string_view name) { return decide(name) == std::optional<bool>(false); }, false);
  model.visit_parameters(
      [&](const std::string& name, module_var_t<M>& p) {
        for (std::size_t r = 0; r < policy.rules.size(); ++r)
          if (!used[r] && name_matches(policy.rules[r].pattern, name)) used[r] = true;
        if (p.requires_grad()) {
          report.trainable += p.numel();
          ++report.trainable_tensors;
        } else {
          report.frozen += p.numel();
          ++report.frozen_tensors;
        }
      },
      "");
  for (std::size_t r = 0; r < policy.rules.size(); ++r)
    if (!used[r]) report.unused_patterns.push_back(policy.rules[r].pattern);
  return report;
}

}  // namespace mixmoe
