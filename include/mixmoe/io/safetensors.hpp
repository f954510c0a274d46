// safetensors files: a reader that validates everything and a writer.
//
// Layout: 8 bytes N (unsigned, little-endian), N bytes of JSON header, then the data buffer.
//   header = {"<tensor name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//             "__metadata__": {"<key>": "<string value>", ...}}   (the metadata is optional)
// Offsets are byte offsets into the buffer (which starts at 8 + N); a tensor's bytes are its
// elements in row-major order, little-endian. The tensors must cover the buffer exactly:
// sorted by offset they are contiguous, without gaps or overlaps, and the last one ends at
// the end of the file.
//
// Reader (SafetensorsFile): reads the file in one read and checks the header size against the
// file, the JSON, every entry (dtype known, shape of non-negative extents whose byte size does
// not overflow and equals end - begin), duplicate names, and the coverage of the buffer; every
// error names the file and the tensor. get<T>(name) converts F32, F64, F16, BF16, I32, I64 to T.
// Writer (SafetensorsWriter): F32, F64, BF16 and F16 for floating-point tensors, I32, I64 for
// integer ones, string metadata; the header is padded with spaces to a multiple of 8 bytes.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/bf16.hpp"
#include "mixmoe/core/device.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/core/tensor.hpp"
#include "mixmoe/io/atomic_file.hpp"

namespace mixmoe {

/// Element types of safetensors files. The reader knows them all; get<T>() converts the first six.
enum class Dtype { F32, F64, F16, BF16, I32, I64, BOOL, U8, I8, I16, U16, U32, U64, F8_E4M3, F8_E5M2 };

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F32:
      return "F32";
    case Dtype::F64:
      return "F64";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::I32:
      return "I32";
    case Dtype::I64:
      return "I64";
    case Dtype::BOOL:
      return "BOOL";
    case Dtype::U8:
      return "U8";
    case Dtype::I8:
      return "I8";
    case Dtype::I16:
      return "I16";
    case Dtype::U16:
      return "U16";
    case Dtype::U32:
      return "U32";
    case Dtype::U64:
      return "U64";
    case Dtype::F8_E4M3:
      return "F8_E4M3";
    case Dtype::F8_E5M2:
      return "F8_E5M2";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F64:
    case Dtype::I64:
    case Dtype::U64:
      return 8;
    case Dtype::F32:
    case Dtype::I32:
    case Dtype::U32:
      return 4;
    case Dtype::F16:
    case Dtype::BF16:
    case Dtype::I16:
    case Dtype::U16:
      return 2;
    default:
      return 1;
  }
}

inline std::optional<Dtype> parse_dtype(std::string_view s) {
  for (Dtype d : {Dtype::F32, Dtype::F64, Dtype::F16, Dtype::BF16, Dtype::I32, Dtype::I64, Dtype::BOOL, Dtype::U8,
                  Dtype::I8, Dtype::I16, Dtype::U16, Dtype::U32, Dtype::U64, Dtype::F8_E4M3, Dtype::F8_E5M2})
    if (s == dtype_name(d)) return d;
  return std::nullopt;
}

/// The dtype a tensor of element type T is stored as by default.
template <Element T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return Dtype::F32;
  else if constexpr (std::is_same_v<T, double>)
    return Dtype::F64;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return Dtype::I32;
  else
    return Dtype::I64;
}

// ---- half-precision conversions ---------------------------------------------------------

/// bfloat16 bits -> float (exact).
inline float bf16_to_float(std::uint16_t b) { return float(bf16::from_bits(b)); }

/// float -> bfloat16 bits, rounding to nearest even; NaN stays NaN (core/bf16.hpp).
inline std::uint16_t float_to_bf16(float f) { return bf16(f).bits; }

/// IEEE binary16 bits -> float (exact, subnormals included).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {                                                                   // zero, subnormal
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

/// float -> IEEE binary16 bits, rounding to nearest even; overflow gives infinity.
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<std::uint16_t>(sign | 0x7e00);
  if (a >= 65520.0f) return static_cast<std::uint16_t>(sign | 0x7c00);  // rounds past the largest half
  if (a < 0x1.0p-14f) {                                                 // subnormal half: units of 2^-24
    const float q = std::nearbyint(a * 0x1.0p24f);                      // ties to even (default rounding)
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(q));
  }
  const std::uint32_t au = std::bit_cast<std::uint32_t>(a);
  std::uint32_t h = ((au >> 23) - 112) << 10 | ((au >> 13) & 0x3ff);
  const std::uint32_t rest = au & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: still right
  return static_cast<std::uint16_t>(sign | h);
}

namespace detail {

template <class U>
U load_le(const unsigned char* p) {
  if constexpr (std::endian::native == std::endian::little) {
    U v;
    std::memcpy(&v, p, sizeof(U));
    return v;
  } else {
    using Bits = std::conditional_t<sizeof(U) == 8, std::uint64_t,
                                    std::conditional_t<sizeof(U) == 4, std::uint32_t, std::uint16_t>>;
    Bits b = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i) b |= static_cast<Bits>(p[i]) << (8 * i);
    return std::bit_cast<U>(b);
  }
}

template <class U>
void store_le(unsigned char* p, U v) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(p, &v, sizeof(U));
  } else {
    using Bits = std::conditional_t<sizeof(U) == 8, std::uint64_t,
                                    std::conditional_t<sizeof(U) == 4, std::uint32_t, std::uint16_t>>;
    const Bits b = std::bit_cast<Bits>(v);
    for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<unsigned char>(b >> (8 * i));
  }
}

/// Element i of a buffer of dtype d, as U (only for the six convertible dtypes).
template <class U>
U load_element(Dtype d, const unsigned char* base, std::size_t i) {
  switch (d) {
    case Dtype::F32:
      return static_cast<U>(load_le<float>(base + 4 * i));
    case Dtype::F64:
      return static_cast<U>(load_le<double>(base + 8 * i));
    case Dtype::F16:
      return static_cast<U>(f16_to_float(load_le<std::uint16_t>(base + 2 * i)));
    case Dtype::BF16:
      return static_cast<U>(bf16_to_float(load_le<std::uint16_t>(base + 2 * i)));
    case Dtype::I32:
      return static_cast<U>(load_le<std::int32_t>(base + 4 * i));
    case Dtype::I64:
      return static_cast<U>(load_le<std::int64_t>(base + 8 * i));
    default:
      return U{};
  }
}

inline bool is_float_dtype(Dtype d) {
  return d == Dtype::F32 || d == Dtype::F64 || d == Dtype::F16 || d == Dtype::BF16;
}

}  // namespace detail

/// One tensor of a safetensors header.
struct SafetensorsEntry {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0, end = 0;  // byte offsets into the data buffer

  [[nodiscard]] std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }
};

/// A whole safetensors file in memory, validated on opening.
class SafetensorsFile {
 public:
  /// Largest header accepted (the reference implementation's limit is 100 MB).
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  /// Reads and validates `path`; throws mixmoe::Error("[safetensors] <path>: ...") on any problem.
  static SafetensorsFile open(const std::filesystem::path& path) { return parse(read_file(path), path.string()); }

  /// Validates the bytes of a file; `origin` names it in error messages.
  static SafetensorsFile parse(std::string bytes, std::string origin) {
    SafetensorsFile f;
    f.bytes_ = std::move(bytes);
    f.origin_ = std::move(origin);
    f.validate();
    return f;
  }

  [[nodiscard]] const std::string& origin() const { return origin_; }
  [[nodiscard]] bool contains(const std::string& name) const { return index_.count(name) > 0; }
  /// Tensor names, sorted.
  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(index_.size());
    for (const auto& [name, i] : index_) out.push_back(name);
    return out;
  }
  [[nodiscard]] std::size_t size() const { return entries_.size(); }
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// The header entry of `name`; throws naming the file and the tensor when absent.
  [[nodiscard]] const SafetensorsEntry& entry(const std::string& name) const {
    auto it = index_.find(name);
    MIXMOE_CHECK(it != index_.end(), "safetensors", origin_, ": no tensor '", name, "' (the file has ", entries_.size(),
                 " tensors)");
    return entries_[it->second];
  }

  /// The raw little-endian bytes of a tensor.
  [[nodiscard]] std::string_view raw(const std::string& name) const {
    const auto& e = entry(name);
    return std::string_view(bytes_).substr(data_start_ + e.begin, e.end - e.begin);
  }

  /// The tensor `name` converted to T (floating point from F32/F64/F16/BF16, integers from I32/I64).
  template <Element T>
  [[nodiscard]] Tensor<T, Cpu> get(const std::string& name) const {
    const auto& e = entry(name);
    constexpr bool want_float = Scalar<T>;
    const bool ok = want_float ? detail::is_float_dtype(e.dtype) : (e.dtype == Dtype::I32 || e.dtype == Dtype::I64);
    MIXMOE_CHECK(ok, "safetensors", origin_, ": tensor '", name, "' has dtype ", dtype_name(e.dtype),
                 ", which cannot be read as ",
                 want_float ? "floating point (F32, F64, F16, BF16)" : "integers (I32, I64)");
    MIXMOE_CHECK(e.shape.size() <= static_cast<std::size_t>(kMaxDims), "safetensors", origin_, ": tensor '", name,
                 "' has ", e.shape.size(), " axes; tensors have at most ", kMaxDims);
    Shape s;
    for (auto x : e.shape) s.push_back(x);
    auto t = Tensor<T, Cpu>::empty(s);
    const auto* base = reinterpret_cast<const unsigned char*>(bytes_.data()) + data_start_ + e.begin;
    T* out = t.data();
    const auto n = static_cast<std::size_t>(e.numel());
    if (e.dtype == dtype_of<T>() && std::endian::native == std::endian::little) {
      if (n > 0) std::memcpy(out, base, n * sizeof(T));
    } else {
      for (std::size_t i = 0; i < n; ++i) out[i] = detail::load_element<T>(e.dtype, base, i);
    }
    return t;
  }

  /// Like get(), and checks the shape; the error names the file, the tensor and both shapes.
  template <Element T>
  [[nodiscard]] Tensor<T, Cpu> get(const std::string& name, const Shape& expected) const {
    const auto& e = entry(name);
    MIXMOE_CHECK(same_shape(e, expected), "safetensors", origin_, ": tensor '", name, "' has shape ",
                 shape_string(e.shape), ", expected ", expected);
    return get<T>(name);
  }

  static bool same_shape(const SafetensorsEntry& e, const Shape& s) {
    if (static_cast<int>(e.shape.size()) != s.rank()) return false;
    for (int i = 0; i < s.rank(); ++i)
      if (e.shape[static_cast<std::size_t>(i)] != s[i]) return false;
    return true;
  }

  static std::string shape_string(const std::vector<std::int64_t>& s) {
    std::string out = "(";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + ")";
  }

 private:
  void validate() {
    using nlohmann::json;
    const char* op = "safetensors";
    const std::uint64_t file_size = bytes_.size();
    MIXMOE_CHECK(file_size >= 8, op, origin_, ": truncated: ", file_size,
                 " bytes, too short for the 8-byte header size");
    const auto n = detail::load_le<std::uint64_t>(reinterpret_cast<const unsigned char*>(bytes_.data()));
    MIXMOE_CHECK(n <= kMaxHeaderBytes, op, origin_, ": header size ", n, " exceeds the limit of ", kMaxHeaderBytes,
                 " bytes (not a safetensors file?)");
    MIXMOE_CHECK(n <= file_size - 8, op, origin_, ": header size ", n, " is larger than the file (", file_size,
                 " bytes): truncated?");
    data_start_ = 8 + static_cast<std::size_t>(n);
    const std::string_view text(bytes_.data() + 8, static_cast<std::size_t>(n));
    MIXMOE_CHECK(!text.empty() && text.front() == '{', op, origin_, ": the header does not start with '{'");

    // Duplicate names: the parser keeps only one of them, so look at the keys as they are parsed.
    std::map<std::string, int> seen;
    std::string duplicate;
    json header;
    try {
      header = json::parse(text, [&](int depth, json::parse_event_t ev, json& parsed) {
        if (depth == 1 && ev == json::parse_event_t::key) {
          const auto& k = parsed.get_ref<const std::string&>();
          if (++seen[k] > 1 && duplicate.empty()) duplicate = k;
        }
        return true;
      });
    } catch (const json::exception& ex) {
      detail::fail(op, origin_, ": the header is not valid JSON: ", ex.what());
    }
    MIXMOE_CHECK(duplicate.empty(), op, origin_, ": tensor '", duplicate, "' appears twice in the header");
    MIXMOE_CHECK(header.is_object(), op, origin_, ": the header must be a JSON object");
    const std::uint64_t buffer = file_size - data_start_;

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        MIXMOE_CHECK(v.is_object(), op, origin_, ": __metadata__ must be an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          MIXMOE_CHECK(m.value().is_string(), op, origin_, ": __metadata__ value of '", m.key(), "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      MIXMOE_CHECK(v.is_object(), op, origin_, ": tensor '", name, "': the entry is not an object");
      for (auto f = v.begin(); f != v.end(); ++f)
        MIXMOE_CHECK(f.key() == "dtype" || f.key() == "shape" || f.key() == "data_offsets", op, origin_, ": tensor '",
                     name, "': unknown field '", f.key(), "'");
      SafetensorsEntry e;
      e.name = name;
      MIXMOE_CHECK(v.contains("dtype") && v["dtype"].is_string(), op, origin_, ": tensor '", name,
                   "': missing or non-string dtype");
      const auto d = parse_dtype(v["dtype"].get<std::string>());
      MIXMOE_CHECK(d.has_value(), op, origin_, ": tensor '", name, "': unknown dtype '", v["dtype"].get<std::string>(),
                   "'");
      e.dtype = *d;
      MIXMOE_CHECK(v.contains("shape") && v["shape"].is_array(), op, origin_, ": tensor '", name,
                   "': missing or non-array shape");
      // Byte size, refusing negative extents and overflow (any product above the buffer is already wrong).
      for (const auto& x : v["shape"]) {
        MIXMOE_CHECK(x.is_number_integer(), op, origin_, ": tensor '", name, "': shape ", v["shape"].dump(),
                     " has a non-integer extent");
        MIXMOE_CHECK(x.is_number_unsigned() || x.get<std::int64_t>() >= 0, op, origin_, ": tensor '", name, "': shape ",
                     v["shape"].dump(), " has a negative extent");
        const std::uint64_t ex = x.get<std::uint64_t>();
        MIXMOE_CHECK(ex <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), op, origin_,
                     ": tensor '", name, "': extent ", ex, " is too large");
        e.shape.push_back(static_cast<std::int64_t>(ex));
      }
      std::uint64_t bytes = 0;
      if (std::find(e.shape.begin(), e.shape.end(), 0) == e.shape.end()) {
        bytes = dtype_size(e.dtype);
        for (auto ex : e.shape) {
          MIXMOE_CHECK(bytes <= buffer / static_cast<std::uint64_t>(ex), op, origin_, ": tensor '", name, "': shape ",
                       v["shape"].dump(), " is larger than the data buffer (", buffer, " bytes)");
          bytes *= static_cast<std::uint64_t>(ex);
        }
      }
      MIXMOE_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2 &&
                       v["data_offsets"][0].is_number_unsigned() && v["data_offsets"][1].is_number_unsigned(),
                   op, origin_, ": tensor '", name, "': data_offsets must be two non-negative integers");
      const auto b = v["data_offsets"][0].get<std::uint64_t>(), en = v["data_offsets"][1].get<std::uint64_t>();
      MIXMOE_CHECK(b <= en, op, origin_, ": tensor '", name, "': data_offsets [", b, ", ", en,
                   "] end before they begin");
      MIXMOE_CHECK(en <= buffer, op, origin_, ": tensor '", name, "': data_offsets [", b, ", ", en,
                   "] go past the end of the data buffer (", buffer, " bytes): truncated file?");
      MIXMOE_CHECK(en - b == bytes, op, origin_, ": tensor '", name, "': shape ", v["shape"].dump(), " of ",
                   dtype_name(e.dtype), " needs ", bytes, " bytes but data_offsets [", b, ", ", en, "] hold ", en - b);
      e.begin = static_cast<std::size_t>(b);
      e.end = static_cast<std::size_t>(en);
      entries_.push_back(std::move(e));
    }

    // The tensors must tile the buffer: sorted by (begin, end) each starts where the previous ended.
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::pair(entries_[a].begin, entries_[a].end) < std::pair(entries_[b].begin, entries_[b].end);
    });
    std::size_t pos = 0;
    const SafetensorsEntry* prev = nullptr;
    for (std::size_t i : order) {
      const auto& e = entries_[i];
      if (e.begin < pos)
        detail::fail(op, origin_, ": tensor '", e.name, "' (bytes ", e.begin, "..", e.end, ") overlaps tensor '",
                     prev->name, "' (bytes ", prev->begin, "..", prev->end, ")");
      MIXMOE_CHECK(e.begin == pos, op, origin_, ": bytes ", pos, "..", e.begin,
                   " of the data buffer belong to no tensor", " (before tensor '", e.name, "')");
      pos = e.end;
      prev = &e;
    }
    MIXMOE_CHECK(pos == buffer, op, origin_, ": the data buffer has ", buffer, " bytes but the tensors end at byte ",
                 pos, " (trailing bytes)");
    for (std::size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
  }

  std::string bytes_;
  std::string origin_;
  std::size_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file: add tensors (in order; names must be unique), set metadata, write.
class SafetensorsWriter {
 public:
  /// Adds `t` stored as `as` (default: its own type). Floating point may be stored as F32, F64,
  /// BF16 or F16 (rounded to nearest even); integers as I32 or I64.
  template <Element T>
  void add(const std::string& name, const Tensor<T, Cpu>& t, Dtype as = dtype_of<T>()) {
    MIXMOE_CHECK(!name.empty() && name != "__metadata__", "safetensors", "invalid tensor name '", name, "'");
    MIXMOE_CHECK(names_.count(name) == 0, "safetensors", "tensor '", name, "' added twice");
    MIXMOE_CHECK(t.defined(), "safetensors", "tensor '", name, "' is undefined");
    const bool ok = Scalar<T> ? detail::is_float_dtype(as) : (as == Dtype::I32 || as == Dtype::I64);
    MIXMOE_CHECK(ok, "safetensors", "tensor '", name, "' cannot be stored as ", dtype_name(as));
    const Tensor<T, Cpu> c = t.contiguous();
    const auto n = static_cast<std::size_t>(c.numel());
    Item item{name, as, {}, std::string(n * dtype_size(as), '\0')};
    for (index_t e : c.shape()) item.shape.push_back(e);
    auto* out = reinterpret_cast<unsigned char*>(item.bytes.data());
    const T* in = c.data();
    for (std::size_t i = 0; i < n; ++i) {
      switch (as) {
        case Dtype::F32:
          detail::store_le(out + 4 * i, static_cast<float>(in[i]));
          break;
        case Dtype::F64:
          detail::store_le(out + 8 * i, static_cast<double>(in[i]));
          break;
        case Dtype::BF16:
          detail::store_le(out + 2 * i, float_to_bf16(static_cast<float>(in[i])));
          break;
        case Dtype::F16:
          detail::store_le(out + 2 * i, float_to_f16(static_cast<float>(in[i])));
          break;
        case Dtype::I32:
          detail::store_le(out + 4 * i, static_cast<std::int32_t>(in[i]));
          break;
        case Dtype::I64:
          detail::store_le(out + 8 * i, static_cast<std::int64_t>(in[i]));
          break;
        default:
          break;
      }
    }
    names_.insert(name);
    items_.push_back(std::move(item));
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  [[nodiscard]] std::size_t size() const { return items_.size(); }

  /// The file's bytes.
  [[nodiscard]] std::string serialize() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::size_t offset = 0;
    for (const auto& it : items_) {
      header[it.name] = {
          {"dtype", dtype_name(it.dtype)}, {"shape", it.shape}, {"data_offsets", {offset, offset + it.bytes.size()}}};
      offset += it.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::string out(8, '\0');
    detail::store_le(reinterpret_cast<unsigned char*>(out.data()), static_cast<std::uint64_t>(text.size()));
    out.reserve(8 + text.size() + offset);
    out += text;
    for (const auto& it : items_) out += it.bytes;
    return out;
  }

  /// Writes the file atomically (see io/atomic_file.hpp).
  void write(const std::filesystem::path& path) const { write_file_atomic(path, serialize()); }

 private:
  struct Item {
    std::string name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::string bytes;
  };
  std::vector<Item> items_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mixmoe
