// Files that are either wholly old or wholly new: atomic replacement of a file and of a
// directory, whole-file reads, and SHA-256 digests for manifests (POSIX).
//
//   write_file_atomic(path, bytes): writes "<path>.tmp-<pid>" in the same directory, fsyncs
//     it, renames it over `path` (atomic on POSIX file systems) and fsyncs the directory, so
//     that the rename itself survives a power cut. On any error the temporary file is
//     removed and mixmoe::Error is thrown naming the path and the system error. A crash at
//     any moment leaves the old file or the new one, never a partial one (at worst a stray
//     "*.tmp-<pid>" file that readers ignore).
//   replace_directory(staged, target): moves a fully written and synced directory into
//     place: target -> "<target>.old", staged -> target, then removes the old one. A crash
//     between the two renames leaves "<target>.old" complete; resolve_replaced_directory()
//     finds it (see train/checkpoint.hpp).
#pragma once

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

namespace detail {

inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

/// Closes a file descriptor on scope exit.
struct FdGuard {
  int fd = -1;
  explicit FdGuard(int f) : fd(f) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
  /// Closes now, reporting the error (close can report a delayed write error).
  int release() {
    const int r = ::close(fd);
    fd = -1;
    return r;
  }
};

inline std::filesystem::path parent_or_dot(const std::filesystem::path& p) {
  auto parent = p.parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

}  // namespace detail

/// fsyncs a directory, so that renames and creations inside it are durable.
inline void sync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  MIXMOE_CHECK(fd >= 0, "atomic_file", dir.string(),
               ": cannot open the directory to sync it: ", detail::errno_text(errno));
  detail::FdGuard guard(fd);
  // Some file systems do not support fsync on directories (EINVAL): nothing more can be done there.
  MIXMOE_CHECK(::fsync(fd) == 0 || errno == EINVAL, "atomic_file", dir.string(),
               ": fsync of the directory failed: ", detail::errno_text(errno));
}

/// Writes all of `data` to a new file and fsyncs it (fails if it exists); throws naming the path.
inline void write_file_synced(const std::filesystem::path& path, std::string_view data) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  MIXMOE_CHECK(fd >= 0, "atomic_file", path.string(), ": cannot create: ", detail::errno_text(errno));
  detail::FdGuard guard(fd);
  const char* p = data.data();
  std::size_t left = data.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    MIXMOE_CHECK(n > 0, "atomic_file", path.string(), ": write failed after ", data.size() - left, " of ", data.size(),
                 " bytes: ", detail::errno_text(errno));
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  MIXMOE_CHECK(::fsync(fd) == 0, "atomic_file", path.string(), ": fsync failed: ", detail::errno_text(errno));
  MIXMOE_CHECK(guard.release() == 0, "atomic_file", path.string(), ": close failed: ", detail::errno_text(errno));
}

/// The temporary name write_file_atomic() uses for `path`: "<path>.tmp-<pid>".
inline std::filesystem::path atomic_temp_path(const std::filesystem::path& path) {
  std::filesystem::path tmp = path;
  tmp += ".tmp-" + std::to_string(static_cast<long long>(::getpid()));
  return tmp;
}

/// Replaces `path` by a file holding `data`, atomically and durably (see the top of this file).
inline void write_file_atomic(const std::filesystem::path& path, std::string_view data) {
  const auto tmp = atomic_temp_path(path);
  std::error_code ec;
  std::filesystem::remove(tmp, ec);  // a leftover of an earlier crash of a process with our pid
  try {
    write_file_synced(tmp, data);
    MIXMOE_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "atomic_file", "cannot rename ", tmp.string(), " to ",
                 path.string(), ": ", detail::errno_text(errno));
  } catch (...) {
    std::filesystem::remove(tmp, ec);
    throw;
  }
  sync_directory(detail::parent_or_dot(path));
}

/// The whole file in one string (one read for a regular file); throws naming the path.
inline std::string read_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MIXMOE_CHECK(fd >= 0, "read_file", path.string(), ": cannot open: ", detail::errno_text(errno));
  detail::FdGuard guard(fd);
  struct stat st {};
  MIXMOE_CHECK(::fstat(fd, &st) == 0, "read_file", path.string(), ": cannot stat: ", detail::errno_text(errno));
  MIXMOE_CHECK(S_ISREG(st.st_mode), "read_file", path.string(), ": not a regular file");
  std::string out(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    MIXMOE_CHECK(n >= 0, "read_file", path.string(), ": read failed: ", detail::errno_text(errno));
    if (n == 0) break;  // shrank while reading
    got += static_cast<std::size_t>(n);
  }
  out.resize(got);
  return out;
}

/// Moves the directory `staged` (complete, its files synced) to `target`, replacing any
/// existing `target`: target -> "<target>.old", staged -> target, sync, remove "<target>.old".
inline void replace_directory(const std::filesystem::path& staged, const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  const fs::path old = fs::path(target.string() + ".old");
  std::error_code ec;
  sync_directory(staged);
  if (fs::exists(target)) {
    // A complete "<target>.old" can only be left by a crash after the first rename below, and then
    // target is complete too (the second rename happened) or missing (we would not be here).
    fs::remove_all(old, ec);
    MIXMOE_CHECK(::rename(target.c_str(), old.c_str()) == 0, "atomic_file", "cannot move ", target.string(),
                 " aside to ", old.string(), ": ", detail::errno_text(errno));
  }
  MIXMOE_CHECK(::rename(staged.c_str(), target.c_str()) == 0, "atomic_file", "cannot rename ", staged.string(), " to ",
               target.string(), ": ", detail::errno_text(errno));
  sync_directory(detail::parent_or_dot(target));
  fs::remove_all(old, ec);
}

// ---- SHA-256 (FIPS 180-4), for checkpoint manifests ---------------------------------------

namespace detail {

inline std::uint32_t rotr32(std::uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

inline void sha256_block(std::array<std::uint32_t, 8>& h, const unsigned char* p) {
  static constexpr std::uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  std::uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = (std::uint32_t(p[4 * i]) << 24) | (std::uint32_t(p[4 * i + 1]) << 16) | (std::uint32_t(p[4 * i + 2]) << 8) |
           std::uint32_t(p[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    const std::uint32_t s0 = rotr32(w[i - 15], 7) ^ rotr32(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const std::uint32_t s1 = rotr32(w[i - 2], 17) ^ rotr32(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
  for (int i = 0; i < 64; ++i) {
    const std::uint32_t t1 = hh + (rotr32(e, 6) ^ rotr32(e, 11) ^ rotr32(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
    const std::uint32_t t2 = (rotr32(a, 2) ^ rotr32(a, 13) ^ rotr32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    hh = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
}

}  // namespace detail

/// SHA-256 of `data` as 64 lower-case hex digits.
inline std::string sha256_hex(std::string_view data) {
  std::array<std::uint32_t, 8> h = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  const std::size_t n = data.size();
  std::size_t i = 0;
  for (; i + 64 <= n; i += 64) detail::sha256_block(h, p + i);
  unsigned char tail[128] = {};
  const std::size_t rest = n - i;
  if (rest > 0) std::memcpy(tail, p + i, rest);
  tail[rest] = 0x80;
  const std::size_t tail_len = rest + 1 + 8 <= 64 ? 64 : 128;
  const std::uint64_t bits = static_cast<std::uint64_t>(n) * 8;
  for (int b = 0; b < 8; ++b) tail[tail_len - 1 - b] = static_cast<unsigned char>(bits >> (8 * b));
  for (std::size_t off = 0; off < tail_len; off += 64) detail::sha256_block(h, tail + off);
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(64);
  for (std::uint32_t word : h)
    for (int s = 28; s >= 0; s -= 4) out += hex[(word >> s) & 0xf];
  return out;
}

}  // namespace mixmoe
