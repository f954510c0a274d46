// libFuzzer target: the model configuration readers, model_config_from_json() and the reader of a
// checkpoint's config.json (detail::model_info_from_json, what read_model_info() calls), on any
// JSON document. Bytes that are not JSON are nlohmann's business and are skipped. mixmoe::Error is
// the expected answer to a bad document; any other exception escaping is a finding. A config that
// reads is written back with model_config_to_json() and must read back to the same JSON.
#include <mixmoe/io/json_config.hpp>
#include <mixmoe/train/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

namespace {
/// A broken promise of the reader: says which, then aborts (libFuzzer keeps the input).
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}

void round_trip(const mixmoe::ModelConfig& c) {
  const nlohmann::json once = mixmoe::model_config_to_json(c);
  const nlohmann::json twice = mixmoe::model_config_to_json(mixmoe::model_config_from_json(once, "round-trip"));
  require(once == twice, "a config written back reads back the same");
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    round_trip(mixmoe::model_config_from_json(j, "config"));
  } catch (const mixmoe::Error&) {
  }
  try {
    round_trip(mixmoe::detail::model_info_from_json(j, "config.json").config);
  } catch (const mixmoe::Error&) {
  }
  return 0;
}
