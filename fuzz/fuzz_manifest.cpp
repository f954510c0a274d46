// libFuzzer target: the checkpoint manifest reader (what open_checkpoint() and with it load_model(),
// read_model_info() and load_training_state() check first), on any bytes as MANIFEST.json of a
// directory holding one file, "a.bin" (5 bytes, "hello"). The reader turns every defect into a
// problem string (detail::checkpoint_problem) and open_checkpoint() into a mixmoe::Error; any
// exception escaping the first, or one other than mixmoe::Error escaping the second, is a finding.
// Checked: a manifest that is accepted lists only files of the directory, with their size and digest.
#include <mixmoe/train/checkpoint.hpp>

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace {
namespace fs = std::filesystem;

/// A broken promise of the reader: says which, then aborts (libFuzzer keeps the input).
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}

void write(const fs::path& path, std::string_view bytes) {  // plain: no fsync on every input
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  require(out.good(), "the manifest can be written");
}

void remove_checkpoint_dir();

/// The checkpoint directory of this process, made once, with the one data file in it (removed at a normal
/// exit; libFuzzer ending the run with _Exit leaves it in the temporary directory).
const fs::path& checkpoint_dir() {
  static const fs::path dir = [] {
    const fs::path d = fs::temp_directory_path() / ("mixmoe_fuzz_manifest_" + std::to_string(::getpid()));
    fs::create_directories(d);
    write(d / "a.bin", "hello");
    std::atexit(remove_checkpoint_dir);
    return d;
  }();
  return dir;
}

void remove_checkpoint_dir() {
  std::error_code ec;
  fs::remove_all(checkpoint_dir(), ec);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const fs::path& dir = checkpoint_dir();
  write(dir / mixmoe::kCheckpointManifest, std::string_view(reinterpret_cast<const char*>(data), size));
  const std::string problem = mixmoe::detail::checkpoint_problem(dir, /*verify_digests=*/true);
  if (problem.empty()) {
    const auto m = nlohmann::json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
    for (auto it = m["files"].begin(); it != m["files"].end(); ++it)
      require(it.key() == "a.bin" && it.value()["size"] == 5 && it.value()["sha256"] == mixmoe::sha256_hex("hello"),
              "an accepted manifest lists only a.bin, with its size and digest");
  }
  try {
    require(mixmoe::open_checkpoint(dir) == dir && problem.empty(), "open_checkpoint agrees with the problem");
  } catch (const mixmoe::Error&) {
    require(!problem.empty(), "open_checkpoint refuses only a manifest with a problem");
  }
  return 0;
}
