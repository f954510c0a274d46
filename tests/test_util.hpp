// Shared helpers for the tests: random inputs, a gradcheck assertion, temporary directories and
// files, .mo catalogs compiled with msgfmt.
#pragma once

#include <catch2/catch.hpp>
#include <mixmoe/mixmoe.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace mixmoe::test {

using Vd = Var<double, Cpu>;
using Td = Tensor<double, Cpu>;
using Vf = Var<float, Cpu>;
using Tf = Tensor<float, Cpu>;

/// A leaf of normal(0, 1) values in double that requires grad.
inline Vd rand_var(const Shape& s, std::uint64_t seed, bool requires_grad = true) {
  Generator g(seed);
  return Vd(Td::randn(s, g), requires_grad);
}

/// REQUIRE that fn's gradient matches central differences, printing the mismatches.
#define MIXMOE_REQUIRE_GRADCHECK(fn, inputs, ...)                          \
  do {                                                                     \
    auto gc_result_ = ::mixmoe::gradcheck(fn, inputs, ##__VA_ARGS__);      \
    INFO(gc_result_.message);                                              \
    REQUIRE(gc_result_.ok);                                                \
  } while (0)

/// REQUIRE that expr throws mixmoe::Error whose message contains `needle`.
#define MIXMOE_REQUIRE_ERROR(expr, needle) REQUIRE_THROWS_WITH((expr), Catch::Matchers::Contains(needle))

/// A fresh temporary directory (mkdtemp: unique for every object), removed with its contents at
/// scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(std::string_view name = "tmp") {
    std::string tmpl = (std::filesystem::temp_directory_path() / ("mixmoe_test_" + std::string(name) + "_XXXXXX")).string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

/// Writes `text` to `p` as it is (binary), creating the parent directories.
inline void write_file(const std::filesystem::path& p, std::string_view text) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  REQUIRE(out.good());
}

/// Compiles a .po text into `mo` with msgfmt (extra flags such as --endianness=big). msgfmt must
/// exist: the MO tests compile their catalogs with it (a clear failure, not a skip).
inline void msgfmt(const std::string& po_text, const std::filesystem::path& mo, const std::string& flags = "") {
  static const bool ok = std::system("msgfmt --version >/dev/null 2>&1") == 0;
  INFO("msgfmt (GNU gettext) is needed by these tests and was not found on PATH; install the gettext package");
  REQUIRE(ok);
  const std::filesystem::path po = std::filesystem::path(mo).replace_extension(".po");
  write_file(po, po_text);
  std::filesystem::create_directories(mo.parent_path());
  const std::string cmd = "msgfmt " + flags + " -o '" + mo.string() + "' '" + po.string() + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::filesystem::remove(po);
}

/// Max |a - b| over elements of same-shaped tensors.
template <class T>
double max_abs_diff(const Tensor<T, Cpu>& a, const Tensor<T, Cpu>& b) {
  REQUIRE(a.shape() == b.shape());
  const auto va = a.to_vector(), vb = b.to_vector();
  double m = 0;
  for (std::size_t i = 0; i < va.size(); ++i) m = std::max(m, std::abs(static_cast<double>(va[i]) - static_cast<double>(vb[i])));
  return m;
}

}  // namespace mixmoe::test
