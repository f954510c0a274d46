// libFuzzer target: the plain-text and TSV readers (parse_lines, parse_tsv, parse_parallel_tsv).
// The first input byte picks the options, the rest is the text. mixmoe::Error is the expected
// answer to bad input. Checked: every line and field is valid UTF-8 without LF, the column
// limits hold, and a TSV row written back with format_tsv_row() parses to the same fields, both as the
// first line of a file (where a leading U+FEFF is a byte-order mark) and after another line.
#include <mixmoe/data/text_io.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {
/// A broken promise of the reader: says which, then aborts (libFuzzer keeps the input).
void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz check failed: %s\n", what);
  std::abort();
}
bool clean(const std::string& s) { return mixmoe::is_valid_utf8(s) && s.find('\n') == std::string::npos; }
bool clean_field(const std::string& s) { return clean(s) && s.find('\t') == std::string::npos; }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const unsigned flags = data[0];
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    mixmoe::LineReadOptions lo;
    lo.skip_empty = (flags & 1) != 0;
    for (const auto& line : mixmoe::parse_lines(text, "fuzz.txt", lo))
      require(clean(line), "a line is UTF-8 without LF");
  } catch (const mixmoe::Error&) {
  }
  try {
    mixmoe::TsvReadOptions to;
    to.skip_empty = (flags & 2) != 0;
    to.comments = (flags & 4) != 0;
    to.min_columns = (flags >> 3) & 3;
    to.max_columns = (flags >> 5) & 7;
    for (const auto& row : mixmoe::parse_tsv(text, "fuzz.tsv", to)) {
      require(row.fields.size() >= to.min_columns, "min_columns holds");
      require(to.max_columns == 0 || row.fields.size() <= to.max_columns, "max_columns holds");
      for (const auto& f : row.fields) require(clean_field(f), "a field is UTF-8 without LF or TAB");
      // Round trip through the writer, as the first line of a file and after one, when the writer accepts
      // the fields (it refuses a CR, and a first field starting with U+FEFF on the first line).
      mixmoe::TsvReadOptions plain;
      plain.skip_empty = false;
      for (const std::size_t line : {std::size_t{1}, std::size_t{2}}) {
        std::string again;  // the row written as line `line` of a file
        try {
          again = mixmoe::format_tsv_row(row.fields, mixmoe::TsvFieldPolicy::error, line);
        } catch (const mixmoe::Error&) {
          continue;
        }
        const auto back = mixmoe::parse_tsv(line == 1 ? again : "-\n" + again, "round-trip.tsv", plain);
        require(back.size() == line && back[line - 1].fields == row.fields, "a row written back reads the same");
      }
    }
  } catch (const mixmoe::Error&) {
  }
  try {
    mixmoe::ParallelTsvOptions po;
    po.allow_extra_columns = (flags & 64) != 0;
    po.allow_empty_fields = (flags & 128) != 0;
    for (const auto& p : mixmoe::parse_parallel_tsv(text, "fuzz.parallel.tsv", po)) {
      require(clean(p.source) && clean(p.target), "a pair is UTF-8 without LF");
      require(po.allow_empty_fields || (!p.source.empty() && !p.target.empty()), "no empty side unless allowed");
      require(po.allow_extra_columns || p.extra.empty(), "no extra columns unless allowed");
    }
  } catch (const mixmoe::Error&) {
  }
  return 0;
}
