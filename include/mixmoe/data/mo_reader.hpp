// Reader for GNU gettext MO files (compiled message catalogs, the format msgfmt writes; see the
// GNU gettext manual, "The Format of GNU MO Files").
//
// Layout (all numbers 32-bit unsigned, in the byte order given by the magic number):
//   0  magic 0x950412de (read as little-endian: a little-endian file; 0xde120495: big-endian)
//   4  revision (major << 16 | minor); major 0 and 1 are accepted
//   8  N, the number of strings
//  12  O, offset of the table of original strings: N x (length, offset)
//  16  T, offset of the table of translations:     N x (length, offset)
//  20  S, H: size and offset of the hash table (not needed, not read)
// Each string is `length` bytes at `offset` followed by a NUL. An original string is
// "[msgctxt \x04] msgid [\0 msgid_plural]"; a translation holds the plural forms separated by NULs.
// The entry with an empty msgid is the header; its Content-Type charset, Plural-Forms and Language
// fields are parsed. Catalogs in another charset are converted to UTF-8 with iconv; the result is
// validated as UTF-8. System-dependent strings of major revision 1 (<PRIu64> and such) are not read.
//
// Every bound is checked: a bad file throws mixmoe::Error "[mo] <name>: <problem>", never reads out
// of bounds.
#pragma once

#include <iconv.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/data/text_io.hpp"

namespace mixmoe {

/// One message of a catalog. `msgstr` has one string per plural form (one for a singular message).
struct MoEntry {
  std::string context;       ///< msgctxt, empty when none
  std::string msgid;         ///< the original (English) message
  std::string msgid_plural;  ///< the plural original, empty for a singular message
  std::vector<std::string> msgstr;

  [[nodiscard]] bool is_plural() const { return !msgid_plural.empty(); }
};

/// A parsed catalog. `entries` excludes the header entry, in file order (sorted by original string).
struct MoCatalog {
  std::string path;          ///< the name given to the reader (used in messages)
  std::string language;      ///< header "Language:", may be empty
  std::string charset;       ///< header Content-Type charset as written, e.g. "UTF-8"; empty if absent
  std::string plural_forms;  ///< header "Plural-Forms:", e.g. "nplurals=2; plural=(n != 1);"
  std::string header;        ///< the whole header entry (converted to UTF-8)
  bool big_endian = false;
  std::uint32_t revision = 0;
  std::vector<MoEntry> entries;
};

namespace detail {

/// Value of "Key: value" in a gettext header (case-sensitive key), trimmed; empty when absent.
inline std::string mo_header_field(std::string_view header, std::string_view key) {
  std::size_t pos = 0;
  while (pos < header.size()) {
    std::size_t eol = header.find('\n', pos);
    if (eol == std::string_view::npos) eol = header.size();
    std::string_view line = header.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.size() > key.size() && line.starts_with(key) && line[key.size()] == ':') {
      line.remove_prefix(key.size() + 1);
      while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
      while (!line.empty() && (line.back() == ' ' || line.back() == '\t' || line.back() == '\r')) line.remove_suffix(1);
      return std::string(line);
    }
  }
  return {};
}

inline std::string ascii_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

/// True for the charsets whose bytes are already UTF-8 (or the "CHARSET" placeholder of a template).
inline bool charset_is_utf8_compatible(std::string_view cs) {
  const std::string l = ascii_lower(cs);
  return l.empty() || l == "utf-8" || l == "utf8" || l == "ascii" || l == "us-ascii" || l == "ansi_x3.4-1968" ||
         l == "charset";
}

/// RAII wrapper of an iconv descriptor converting `from` -> UTF-8.
class Utf8Converter {
 public:
  Utf8Converter(const std::string& from, std::string_view name) {
    cd_ = iconv_open("UTF-8", from.c_str());
    MIXMOE_CHECK(cd_ != reinterpret_cast<iconv_t>(-1), "mo", name, ": charset \"", from,
                 "\" is not supported by iconv; cannot convert the catalog to UTF-8");
  }
  Utf8Converter(const Utf8Converter&) = delete;
  Utf8Converter& operator=(const Utf8Converter&) = delete;
  ~Utf8Converter() { iconv_close(cd_); }

  /// Converted text; throws naming `name` and `what` when the input is not valid in the charset.
  std::string operator()(std::string_view in, std::string_view name, std::string_view what) {
    iconv(cd_, nullptr, nullptr, nullptr, nullptr);  // reset the shift state
    std::string out(in.size() * 4 + 16, '\0');
    char* src = const_cast<char*>(in.data());  // iconv's interface is not const-correct
    std::size_t src_left = in.size();
    char* dst = out.data();
    std::size_t dst_left = out.size();
    while (src_left > 0) {
      if (iconv(cd_, &src, &src_left, &dst, &dst_left) == static_cast<std::size_t>(-1)) {
        if (errno == E2BIG) {
          const std::size_t used = static_cast<std::size_t>(dst - out.data());
          out.resize(out.size() * 2);
          dst = out.data() + used;
          dst_left = out.size() - used;
          continue;
        }
        fail("mo", name, ": ", what, ": invalid byte sequence at byte ", in.size() - src_left + 1,
             " for the catalog's charset");
      }
    }
    out.resize(static_cast<std::size_t>(dst - out.data()));
    return out;
  }

 private:
  iconv_t cd_;
};

/// Splits on '\0' (a string with k NULs gives k + 1 parts).
inline std::vector<std::string> split_nul(std::string_view s) {
  std::vector<std::string> parts;
  std::size_t pos = 0;
  while (true) {
    const std::size_t z = s.find('\0', pos);
    parts.emplace_back(s.substr(pos, z == std::string_view::npos ? std::string_view::npos : z - pos));
    if (z == std::string_view::npos) break;
    pos = z + 1;
  }
  return parts;
}

}  // namespace detail

/// Parses the bytes of an MO file; `name` (e.g. "de/apt.mo") prefixes every error message.
inline MoCatalog parse_mo(std::string_view bytes, std::string_view name) {
  const std::uint64_t size = bytes.size();
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  MIXMOE_CHECK(size >= 28, "mo", name, ": truncated: the header needs 28 bytes, the file has ", size);
  const auto le32 = [&](std::uint64_t at) {
    return static_cast<std::uint32_t>(b[at]) | static_cast<std::uint32_t>(b[at + 1]) << 8 |
           static_cast<std::uint32_t>(b[at + 2]) << 16 | static_cast<std::uint32_t>(b[at + 3]) << 24;
  };
  const std::uint32_t magic = le32(0);
  MoCatalog cat;
  cat.path = std::string(name);
  if (magic == 0xde120495u) {
    cat.big_endian = true;
  } else {
    MIXMOE_CHECK(magic == 0x950412deu, "mo", name, ": not an MO file: bad magic number 0x", std::hex, magic,
                 " (expected 0x950412de in either byte order)");
  }
  const auto u32 = [&](std::uint64_t at) {  // caller guarantees at + 4 <= size
    const std::uint32_t v = le32(at);
    return cat.big_endian ? (v >> 24 | (v >> 8 & 0xFF00u) | (v << 8 & 0xFF0000u) | v << 24) : v;
  };
  cat.revision = u32(4);
  const std::uint32_t major = cat.revision >> 16;
  MIXMOE_CHECK(major <= 1, "mo", name, ": unsupported major revision ", major, " (0 and 1 are known)");
  const std::uint64_t n = u32(8), orig_at = u32(12), trans_at = u32(16);
  // 64-bit arithmetic: offsets up to 2^32 plus 8 * N up to 2^35 cannot overflow.
  MIXMOE_CHECK(orig_at + 8 * n <= size, "mo", name, ": truncated or corrupt: the table of ", n,
               " original strings at byte ", orig_at, " ends at byte ", orig_at + 8 * n, " of ", size);
  MIXMOE_CHECK(trans_at + 8 * n <= size, "mo", name, ": truncated or corrupt: the table of ", n,
               " translations at byte ", trans_at, " ends at byte ", trans_at + 8 * n, " of ", size);

  // String i of a table: length + offset, checked against the file and for its terminating NUL.
  const auto string_at = [&](std::uint64_t table, std::uint64_t i, const char* what) -> std::string_view {
    const std::uint64_t len = u32(table + 8 * i), off = u32(table + 8 * i + 4);
    MIXMOE_CHECK(off + len + 1 <= size, "mo", name, ": truncated or corrupt: ", what, " ", i, " (", len,
                 " bytes at byte ", off, ") ends at byte ", off + len + 1, " of ", size);
    MIXMOE_CHECK(b[off + len] == 0, "mo", name, ": corrupt: ", what, " ", i, " (", len, " bytes at byte ", off,
                 ") is not followed by a NUL");
    return bytes.substr(static_cast<std::size_t>(off), static_cast<std::size_t>(len));
  };

  // The header (empty original string) first, for the charset.
  std::string_view raw_header;
  for (std::uint64_t i = 0; i < n; ++i)
    if (string_at(orig_at, i, "original string").empty()) {
      raw_header = string_at(trans_at, i, "translation");
      break;
    }
  const std::string content_type = detail::mo_header_field(raw_header, "Content-Type");
  if (const std::size_t cs = content_type.find("charset="); cs != std::string::npos) {
    std::string_view v = std::string_view(content_type).substr(cs + 8);
    v = v.substr(0, v.find_first_of("; \t"));
    cat.charset = std::string(v);
  }
  std::optional<detail::Utf8Converter> conv;
  if (!detail::charset_is_utf8_compatible(cat.charset)) conv.emplace(cat.charset, name);
  const auto to_utf8 = [&](std::string_view s, std::uint64_t i, const char* what) -> std::string {
    std::string out = conv ? (*conv)(s, name, std::string(what) + " " + std::to_string(i)) : std::string(s);
    if (const auto bad = find_invalid_utf8(out))
      detail::fail("mo", name, ": ", what, " ", i, ": invalid UTF-8 at byte ", *bad + 1, " (charset \"",
                   cat.charset.empty() ? "unspecified" : cat.charset, "\")");
    return out;
  };
  cat.header = to_utf8(raw_header, 0, "header");
  cat.language = detail::mo_header_field(cat.header, "Language");
  cat.plural_forms = detail::mo_header_field(cat.header, "Plural-Forms");

  cat.entries.reserve(static_cast<std::size_t>(n));
  for (std::uint64_t i = 0; i < n; ++i) {
    const std::string orig = to_utf8(string_at(orig_at, i, "original string"), i, "original string");
    const std::string_view trans = string_at(trans_at, i, "translation");
    if (orig.empty()) continue;  // the header
    MoEntry e;
    std::string_view id = orig;
    if (const std::size_t eot = id.find('\x04'); eot != std::string_view::npos) {
      e.context = std::string(id.substr(0, eot));
      id.remove_prefix(eot + 1);
    }
    if (const std::size_t z = id.find('\0'); z != std::string_view::npos) {
      e.msgid = std::string(id.substr(0, z));
      e.msgid_plural = std::string(id.substr(z + 1));
    } else {
      e.msgid = std::string(id);
    }
    e.msgstr = detail::split_nul(to_utf8(trans, i, "translation"));
    cat.entries.push_back(std::move(e));
  }
  return cat;
}

/// Parses an MO file from bytes given as std::byte.
inline MoCatalog parse_mo(std::span<const std::byte> bytes, std::string_view name) {
  return parse_mo(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), name);
}

/// Reads and parses an MO file; errors name `display_name`, or the path when it is empty.
inline MoCatalog read_mo(const std::filesystem::path& path, std::string_view display_name = {}) {
  const std::string name = display_name.empty() ? path.string() : std::string(display_name);
  std::ifstream in(path, std::ios::binary);
  MIXMOE_CHECK(in.good(), "mo", name, ": cannot open for reading");
  std::ostringstream os;
  os << in.rdbuf();
  MIXMOE_CHECK(!in.bad(), "mo", name, ": read error");
  return parse_mo(std::string_view(os.view()), name);
}

}  // namespace mixmoe
