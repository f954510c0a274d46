// libFuzzer target: the MO catalog reader, parse_mo(), on arbitrary bytes.
// mixmoe::Error is the expected answer to bad input; anything else (a crash, a sanitizer
// report, another exception) is a finding. What is returned is checked against the reader's
// promises: every string is valid UTF-8, every entry has a translation.
#include <mixmoe/data/mo_reader.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace {
/// A broken promise of the reader: says which, then aborts (libFuzzer keeps the input).
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const mixmoe::MoCatalog cat = mixmoe::parse_mo(bytes, "fuzz.mo");
    require(mixmoe::is_valid_utf8(cat.header), "the header is UTF-8");
    for (const auto& e : cat.entries) {
      const bool utf8 = mixmoe::is_valid_utf8(e.context) && mixmoe::is_valid_utf8(e.msgid) &&
                        mixmoe::is_valid_utf8(e.msgid_plural);
      require(utf8, "the original strings are UTF-8");
      require(!e.msgstr.empty(), "an entry has at least one translation");
      for (const auto& s : e.msgstr) require(mixmoe::is_valid_utf8(s), "the translations are UTF-8");
    }
  } catch (const mixmoe::Error&) {
  }
  return 0;
}
