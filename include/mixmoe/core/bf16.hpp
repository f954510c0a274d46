// bfloat16: the 16-bit float with fp32's exponent range and an 8-bit significand
// (1 sign, 8 exponent, 7 stored mantissa bits): the upper half of an IEEE fp32.
//
// mixmoe::bf16 is a storage type: tensors of it take half the memory of float, and
// arithmetic on it happens in fp32 (every op that takes bf16 tensors widens them,
// computes in fp32 and rounds its result back). Conversion from float rounds to
// nearest, ties to even; NaN stays NaN (quiet), infinities and signed zeros are kept,
// and finite values beyond the largest bf16 (about 3.39e38) become infinities, as
// IEEE rounding does. Subnormals are kept (no flush to zero).
//
// The layout is the same as CUDA's __nv_bfloat16 and PyTorch's torch.bfloat16, so device
// buffers and safetensors "BF16" tensors are reinterpreted, not converted. The members are
// constexpr, so device code can use them (the CUDA build passes --expt-relaxed-constexpr).
#pragma once

#include <bit>
#include <cstdint>
#include <limits>
#include <ostream>
#include <type_traits>

namespace mixmoe {

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  /// Rounds to nearest, ties to even.
  constexpr bf16(float f) : bits(round_bits(f)) {}  // NOLINT(google-explicit-constructor): a float converts as float->double does
  /// Rounds a double to nearest, ties to even, in one rounding (through fp32 rounded to odd).
  constexpr explicit bf16(double d) : bits(round_bits(to_float_odd(d))) {}
  /// Integers and the other arithmetic types convert through their float value.
  template <class A>
    requires(std::is_arithmetic_v<A> && !std::is_same_v<A, float> && !std::is_same_v<A, double>)
  constexpr explicit bf16(A a) : bf16(static_cast<float>(a)) {}

  /// A bf16 with these bits (no rounding).
  static constexpr bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }

  /// Exact: every bf16 is a float.
  constexpr operator float() const { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }  // NOLINT

  constexpr bf16& operator+=(bf16 o) { return *this = bf16(float(*this) + float(o)); }
  constexpr bf16& operator-=(bf16 o) { return *this = bf16(float(*this) - float(o)); }
  constexpr bf16& operator*=(bf16 o) { return *this = bf16(float(*this) * float(o)); }
  constexpr bf16& operator/=(bf16 o) { return *this = bf16(float(*this) / float(o)); }

  /// The bf16 bits of f rounded to nearest, ties to even (NaN -> a quiet NaN of the same sign).
  static constexpr std::uint16_t round_bits(float f) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // NaN: keep it quiet
    const std::uint32_t lsb = (u >> 16) & 1u;
    return static_cast<std::uint16_t>((u + 0x7fffu + lsb) >> 16);  // overflow rounds up into the infinity pattern
  }

  /// d rounded to fp32 toward zero, with the last bit set when inexact ("round to odd"): rounding
  /// that to bf16 gives d correctly rounded, with no double-rounding error.
  static constexpr float to_float_odd(double d) {
    const float f = static_cast<float>(d);
    if (d != d || static_cast<double>(f) == d) return f;  // NaN, or exact
    std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const double af = f < 0 ? -static_cast<double>(f) : static_cast<double>(f), ad = d < 0 ? -d : d;
    if (af > ad) --u;  // rounded away from zero: step back toward zero (inf -> the largest float)
    return std::bit_cast<float>(u | 1u);
  }
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2, "bf16 must be two bytes, as __nv_bfloat16");

/// Rounds x to the nearest bf16 and back (the value a bf16 tensor would store).
constexpr float round_to_bf16(float x) { return float(bf16(x)); }

// No arithmetic or comparison operators of its own: a bf16 in an expression converts to float
// (exact), so a + b, a < b, a == 1.0f all compute in fp32, and assigning the result rounds.

inline std::ostream& operator<<(std::ostream& os, bf16 v) { return os << float(v); }

}  // namespace mixmoe

template <>
class std::numeric_limits<mixmoe::bf16> {
 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 8;  // significand bits, the implicit one included
  static constexpr int max_exponent = 128;
  static constexpr int min_exponent = -125;
  static constexpr mixmoe::bf16 min() noexcept { return mixmoe::bf16::from_bits(0x0080); }  // smallest normal
  static constexpr mixmoe::bf16 max() noexcept { return mixmoe::bf16::from_bits(0x7f7f); }
  static constexpr mixmoe::bf16 lowest() noexcept { return mixmoe::bf16::from_bits(0xff7f); }
  static constexpr mixmoe::bf16 epsilon() noexcept { return mixmoe::bf16::from_bits(0x3c00); }  // 2^-7
  static constexpr mixmoe::bf16 infinity() noexcept { return mixmoe::bf16::from_bits(0x7f80); }
  static constexpr mixmoe::bf16 quiet_NaN() noexcept { return mixmoe::bf16::from_bits(0x7fc0); }
  static constexpr mixmoe::bf16 denorm_min() noexcept { return mixmoe::bf16::from_bits(0x0001); }
};
