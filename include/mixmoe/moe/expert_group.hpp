// Expert groups: a tagged list of experts of one type (Mix-MoE's LM and MT experts).
//
//   x (n, C) -> (n, C) per expert, hidden width F, C = d_model
//
// The tag is a type, so a model's groups are told apart at compile time (freeze
// policies, upcycling and statistics find "the LM experts" by tag), and its name is
// the group's parameter prefix: the i-th expert's parameters are named
// "<tag>.experts.<i>.<the expert's own names>", e.g. "lm.experts.3.w_up.weight".
#pragma once

#include <concepts>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "mixmoe/autograd/var.hpp"
#include "mixmoe/moe/grouped_gemm.hpp"
#include "mixmoe/nn/module.hpp"

namespace mixmoe {

/// Group tags. A user's own tag is any type with `static constexpr const char* name`.
namespace tag {
struct lm {  // language-model experts: keep the monolingual knowledge of the upcycled FFN
  static constexpr const char* name = "lm";
};
struct mt {  // translation experts: learn the bilingual knowledge
  static constexpr const char* name = "mt";
};
struct shared {  // experts every token may use (shared-expert designs)
  static constexpr const char* name = "shared";
};
struct generic {  // the one group of a plain MoE
  static constexpr const char* name = "generic";
};
}  // namespace tag

/// A group tag: a type naming itself.
template <class Tag>
concept GroupTag = requires {
  { Tag::name } -> std::convertible_to<const char*>;
};

namespace detail {
template <class E>
concept expert_callable = requires(const E& e, const module_var_t<E>& x) {
  { e(x) } -> std::same_as<module_var_t<E>>;
};
}  // namespace detail

/// An expert: a module callable on token rows (n, C) -> (n, C), constructible from
/// (d_model, hidden, Generator&). FeedForward and SwiGLU are experts.
template <class E>
concept ExpertModule =
    Module<E> && std::constructible_from<E, index_t, index_t, Generator&> && detail::expert_callable<E>;

/// An expert type that can run a list of its experts in one call (grouped GEMMs over their stacked
/// weights, moe/grouped_gemm.hpp), which is what lets an MoE layer run without host synchronisation
/// on a device:
///   static Var<T, D> E::grouped(std::span<const E* const> experts, const Var<T, D>& x_sorted,
///                               const GroupedRows<D>& rows)
/// x_sorted (M, C) rows sorted by expert; rows.offsets (E + 1) on the device: expert i of the list
/// owns rows [offsets[i], offsets[i + 1]); rows.precision: the GEMMs' operand precision (pass rows
/// to grouped_linear). Returns (M, C): expert i's output on its rows, 0 on rows outside every
/// range. FeedForward and SwiGLU have it; other experts run one call per expert.
template <class E>
concept GroupedExpert =
    ExpertModule<E> && requires(std::span<const E* const> ex, const module_var_t<E>& x,
                                const GroupedRows<typename E::device_type>& rows) {
      { E::grouped(ex, x, rows) } -> std::same_as<module_var_t<E>>;
    };

template <class E, class Tag>
struct ExpertGroup {
  static_assert(Module<E>,
                "ExpertGroup<E, Tag>: E must be a module (value_type, device_type and "
                "visit_parameters(visitor, prefix); see nn/module.hpp)");
  static_assert(std::constructible_from<E, index_t, index_t, Generator&>,
                "ExpertGroup<E, Tag>: E must be constructible from (index_t d_model, index_t hidden, Generator&)");
  static_assert(!Module<E> || detail::expert_callable<E>,
                "ExpertGroup<E, Tag>: E must have `Var<T, D> operator()(const Var<T, D>& x) const` "
                "mapping rows (n, C) to (n, C)");
  static_assert(GroupTag<Tag>, "ExpertGroup<E, Tag>: Tag must have `static constexpr const char* name`");

  using expert_type = E;
  using tag_type = Tag;
  using value_type = typename E::value_type;
  using device_type = typename E::device_type;
  using T = value_type;
  using D = device_type;

  ExpertGroup() = default;
  /// `count` experts of hidden width `hidden`; out_std > 0 sets the output projection's init
  /// std where the expert type takes one (as the dense FFN of a model does).
  ExpertGroup(index_t count, index_t d_model, index_t hidden, Generator& gen, double out_std = -1.0) {
    MIXMOE_CHECK(count >= 1, "ExpertGroup", "group ", Tag::name, " needs at least one expert, got ", count);
    MIXMOE_CHECK(d_model > 0 && hidden > 0, "ExpertGroup", "group ", Tag::name,
                 ": sizes must be positive, got d_model ", d_model, ", hidden ", hidden);
    experts.reserve(static_cast<std::size_t>(count));
    for (index_t i = 0; i < count; ++i) {
      if constexpr (std::constructible_from<E, index_t, index_t, Generator&, double>)
        experts.emplace_back(d_model, hidden, gen, out_std);
      else
        experts.emplace_back(d_model, hidden, gen);
    }
  }

  [[nodiscard]] static constexpr const char* name() { return Tag::name; }
  [[nodiscard]] index_t size() const { return static_cast<index_t>(experts.size()); }
  E& operator[](index_t i) { return experts[checked(i)]; }
  const E& operator[](index_t i) const { return experts[checked(i)]; }

  /// Expert i on its rows: x (n, C) -> (n, C).
  Var<T, D> operator()(index_t i, const Var<T, D>& x) const { return experts[checked(i)](x); }

  /// Every expert in one call (GroupedExpert types): x_sorted (M, C), rows.offsets (size() + 1) on the
  /// device, expert i on rows [offsets[i], offsets[i + 1]) -> (M, C), 0 outside every range.
  Var<T, D> grouped(const Var<T, D>& x_sorted, const GroupedRows<D>& rows) const
    requires GroupedExpert<E>
  {
    MIXMOE_CHECK(rows.offsets.dim() == 1 && rows.offsets.size(0) == size() + 1, "ExpertGroup::grouped", "group ",
                 Tag::name, " of ", size(), " experts needs (", size() + 1, ") offsets, got ", rows.offsets.shape());
    std::vector<const E*> list;
    list.reserve(experts.size());
    for (const E& e : experts) list.push_back(&e);
    return E::grouped(std::span<const E* const>(list.data(), list.size()), x_sorted, rows);
  }

  void visit_parameters(const ParameterVisitor<T, D>& visit, const std::string& prefix) {
    const std::string base = join_name(prefix, std::string(Tag::name) + ".experts");
    for (std::size_t i = 0; i < experts.size(); ++i)
      experts[i].visit_parameters(visit, join_name(base, std::to_string(i)));
  }

  std::vector<E> experts;

 private:
  [[nodiscard]] std::size_t checked(index_t i) const {
    MIXMOE_CHECK(i >= 0 && i < size(), "ExpertGroup", "expert ", i, " is out of range for group ", Tag::name, " of ",
                 size(), " experts");
    return static_cast<std::size_t>(i);
  }
};

/// True for ExpertGroup<E, Tag> types.
template <class G>
inline constexpr bool is_expert_group_v = false;
template <class E, class Tag>
inline constexpr bool is_expert_group_v<ExpertGroup<E, Tag>> = true;

}  // namespace mixmoe
