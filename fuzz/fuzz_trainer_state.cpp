// libFuzzer target: the reader of the training state of a checkpoint (train_state_from_json, the
// "state" object of trainer_state.json), on any JSON document. Bytes that are not JSON are
// nlohmann's business and are skipped. mixmoe::Error is the expected answer to a bad document; any
// other exception escaping is a finding. A state that reads is written back with
// train_state_to_json() and must read back to the same JSON.
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
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    const mixmoe::TrainState s = mixmoe::train_state_from_json(j, "trainer_state.json: state");
    const nlohmann::json once = mixmoe::train_state_to_json(s);
    const nlohmann::json twice = mixmoe::train_state_to_json(mixmoe::train_state_from_json(once, "round-trip"));
    // Compared as text: a best_validation whose bits are a NaN has a NaN "value", and NaN != NaN.
    require(once.dump() == twice.dump(), "a state written back reads back the same");
  } catch (const mixmoe::Error&) {
  }
  return 0;
}
