// libFuzzer target: the safetensors reader, SafetensorsFile::parse(), on arbitrary bytes; every
// tensor of a file that opens is then read as float, double and int64 (a dtype that does not
// convert is a mixmoe::Error) and its raw bytes must have the size its dtype and shape imply.
#include <mixmoe/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {
/// A broken promise of the reader: says which, then aborts (libFuzzer keeps the input).
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}
template <class T>
void read_as(const mixmoe::SafetensorsFile& f, const std::string& name) {
  try {
    const auto t = f.get<T>(name);
    require(t.numel() == f.entry(name).numel(), "get() has the entry's element count");
  } catch (const mixmoe::Error&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const std::string bytes(reinterpret_cast<const char*>(data), size);
    const auto f = mixmoe::SafetensorsFile::parse(bytes, "fuzz.safetensors");
    for (const auto& name : f.names()) {
      const auto& e = f.entry(name);
      require(f.raw(name).size() == static_cast<std::size_t>(e.numel()) * mixmoe::dtype_size(e.dtype),
              "raw() has numel * dtype size bytes");
      read_as<float>(f, name);
      read_as<double>(f, name);
      read_as<std::int64_t>(f, name);
    }
  } catch (const mixmoe::Error&) {
  }
  return 0;
}
