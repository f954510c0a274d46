// RA-MoE's four categories of a parallel item, by the correctness of the model's answer in
// English and in the target language:
//
//   cc  English correct,   target correct
//   ci  English correct,   target incorrect   <- "correctable": the routing alignment loss trains on these
//   ic  English incorrect, target correct
//   ii  English incorrect, target incorrect
//
// Per language: counts and proportions, the two accuracies, and the English-target gap
//   acc_en = (cc + ci) / n,  acc_tgt = (cc + ic) / n,  gap = acc_en - acc_tgt = (ci - ic) / n.
//
//   auto cats = categorize(en_correct, de_correct);   // parallel bool vectors, item i = item i
//   auto counts = count_categories(cats, "de");
//   auto ci = category_mask(cats);                     // 1 for the ci items: the loss's mask
//   std::cout << format_category_table({counts, ...});
#pragma once

#include <array>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"

namespace mixmoe {

enum class Category { cc = 0, ci = 1, ic = 2, ii = 3 };

inline const char* category_name(Category c) {
  switch (c) {
    case Category::cc:
      return "cc";
    case Category::ci:
      return "ci";
    case Category::ic:
      return "ic";
    case Category::ii:
      return "ii";
  }
  return "?";
}

inline Category categorize(bool english_correct, bool target_correct) {
  if (english_correct) return target_correct ? Category::cc : Category::ci;
  return target_correct ? Category::ic : Category::ii;
}

/// The category of every item; the two vectors are parallel (item i in English and in the target language).
inline std::vector<Category> categorize(const std::vector<bool>& english_correct,
                                        const std::vector<bool>& target_correct) {
  MIXMOE_CHECK(english_correct.size() == target_correct.size(), "categorize", english_correct.size(),
               " English results and ", target_correct.size(), " target-language results: the items must be parallel");
  std::vector<Category> out(english_correct.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = categorize(english_correct[i], target_correct[i]);
  return out;
}

/// 1 for the items of category `which` (default ci), 0 for the others.
inline std::vector<unsigned char> category_mask(const std::vector<Category>& cats, Category which = Category::ci) {
  std::vector<unsigned char> m(cats.size());
  for (std::size_t i = 0; i < cats.size(); ++i) m[i] = cats[i] == which ? 1 : 0;
  return m;
}

/// Counts of one language's items.
struct CategoryCounts {
  std::string language;
  std::array<index_t, 4> count{};  // indexed by Category

  [[nodiscard]] index_t operator[](Category c) const { return count[static_cast<std::size_t>(c)]; }
  [[nodiscard]] index_t total() const { return count[0] + count[1] + count[2] + count[3]; }
  /// Share of the items in category c (0 when there are none).
  [[nodiscard]] double proportion(Category c) const {
    return total() > 0 ? static_cast<double>((*this)[c]) / static_cast<double>(total()) : 0.0;
  }
  [[nodiscard]] double english_accuracy() const { return proportion(Category::cc) + proportion(Category::ci); }
  [[nodiscard]] double target_accuracy() const { return proportion(Category::cc) + proportion(Category::ic); }
  /// English accuracy minus target accuracy = (ci - ic) / n.
  [[nodiscard]] double gap() const { return proportion(Category::ci) - proportion(Category::ic); }
};

inline CategoryCounts count_categories(const std::vector<Category>& cats, std::string language = {}) {
  CategoryCounts c;
  c.language = std::move(language);
  for (Category k : cats) ++c.count[static_cast<std::size_t>(k)];
  return c;
}

/// One line per language: counts, proportions (%), accuracies (%) and the gap (points).
///
///   lang          n     cc     ci     ic     ii    cc%   ci%   ic%   ii%  acc_en acc_tgt    gap
///   de          200    120     50     10     20   60.0  25.0   5.0  10.0    85.0    65.0   20.0
inline std::string format_category_table(const std::vector<CategoryCounts>& rows) {
  std::ostringstream os;
  os << "lang          n     cc     ci     ic     ii    cc%   ci%   ic%   ii%  acc_en acc_tgt    gap\n";
  char buf[200];
  for (const auto& r : rows) {
    std::snprintf(buf, sizeof buf, "%-8s %6lld %6lld %6lld %6lld %6lld  %5.1f %5.1f %5.1f %5.1f  %6.1f  %6.1f %6.1f\n",
                  r.language.c_str(), static_cast<long long>(r.total()), static_cast<long long>(r[Category::cc]),
                  static_cast<long long>(r[Category::ci]), static_cast<long long>(r[Category::ic]),
                  static_cast<long long>(r[Category::ii]), 100 * r.proportion(Category::cc),
                  100 * r.proportion(Category::ci), 100 * r.proportion(Category::ic), 100 * r.proportion(Category::ii),
                  100 * r.english_accuracy(), 100 * r.target_accuracy(), 100 * r.gap());
    os << buf;
  }
  return os.str();
}

}  // namespace mixmoe
