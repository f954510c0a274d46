// Plain-text and TSV readers and writers for corpora, with UTF-8 validation.
//
//   - read_lines / parse_lines:               one sentence per line (monolingual text)
//   - read_parallel_tsv / parse_parallel_tsv: "source<TAB>target[<TAB>extra...]" lines (a user's own corpus)
//   - read_tsv / parse_tsv:                   rows with a fixed range of column counts
//   - write_tsv / format_tsv_row, write_lines
//
// Input rules: the text must be UTF-8 (a leading byte-order mark is dropped); lines end in LF or CRLF
// (the CR is removed); a lone CR elsewhere is kept as a character. Empty lines are skipped unless
// asked otherwise. Every error names "file:line" and the problem.
//
// Escaping policy of the writers: TSV has no escapes here. A field may not contain TAB, LF or CR;
// by default such a field is an error naming the row and column (TsvFieldPolicy::error); with
// TsvFieldPolicy::replace_with_space each of those characters becomes one space. Lines written by
// write_lines follow the same policy for LF and CR (TAB is allowed there). The same holds for a
// U+FEFF at the very start of a file (the first field of row 1, the first line), which the readers
// would drop as a byte-order mark: an error by default, one space with replace_with_space. A U+FEFF
// anywhere else is an ordinary character and is written as it is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

/// Byte offset of the first byte that does not start a valid UTF-8 sequence, or nullopt when
/// `s` is valid. Strict: overlong forms, surrogates (U+D800..DFFF) and code points above
/// U+10FFFF are invalid.
inline std::optional<std::size_t> find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // no overlong
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // no overlong
      if (c == 0xF4) hi = 0x8F;  // <= U+10FFFF
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::nullopt;
}

/// True when `s` is valid UTF-8 (see find_invalid_utf8).
inline bool is_valid_utf8(std::string_view s) { return !find_invalid_utf8(s).has_value(); }

/// Number of code points of a valid UTF-8 string (continuation bytes are not counted).
inline std::size_t utf8_length(std::string_view s) {
  std::size_t n = 0;
  for (const char ch : s)
    if ((static_cast<unsigned char>(ch) & 0xC0) != 0x80) ++n;
  return n;
}

namespace detail {

/// Calls fn(line_number, line) for each line of `text` (LF or CRLF endings, BOM dropped,
/// every line UTF-8 checked). `name` is used in messages.
template <class Fn>
void for_each_text_line(std::string_view text, std::string_view name, const char* where, Fn&& fn) {
  if (text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);
  std::size_t line_no = 0, pos = 0;
  while (pos < text.size()) {
    ++line_no;
    const std::size_t eol = text.find('\n', pos);
    std::string_view line = text.substr(pos, eol == std::string_view::npos ? std::string_view::npos : eol - pos);
    pos = eol == std::string_view::npos ? text.size() : eol + 1;
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (const auto bad = find_invalid_utf8(line))
      detail::fail(where, name, ':', line_no, ": invalid UTF-8 at byte ", *bad + 1, " of the line");
    fn(line_no, line);
  }
}

inline std::string read_text_file(const std::filesystem::path& path, const char* where) {
  std::ifstream in(path, std::ios::binary);
  MIXMOE_CHECK(in.good(), where, path.string(), ": cannot open for reading");
  std::ostringstream os;
  os << in.rdbuf();
  MIXMOE_CHECK(!in.bad(), where, path.string(), ": read error");
  return std::move(os).str();
}

inline void split_tabs(std::string_view line, std::vector<std::string>& out) {
  out.clear();
  std::size_t pos = 0;
  while (true) {
    const std::size_t tab = line.find('\t', pos);
    out.emplace_back(line.substr(pos, tab == std::string_view::npos ? std::string_view::npos : tab - pos));
    if (tab == std::string_view::npos) break;
    pos = tab + 1;
  }
}

}  // namespace detail

/// Options for the line readers.
struct LineReadOptions {
  bool skip_empty = true;  ///< drop empty lines (after removing a CR); otherwise keep them as ""
};

/// Lines of UTF-8 text, one sentence per line. `name` (e.g. the file name) prefixes errors.
inline std::vector<std::string> parse_lines(std::string_view text, std::string_view name,
                                            const LineReadOptions& opt = {}) {
  std::vector<std::string> out;
  detail::for_each_text_line(text, name, "text", [&](std::size_t, std::string_view line) {
    if (!line.empty() || !opt.skip_empty) out.emplace_back(line);
  });
  return out;
}

/// Reads a plain-text file, one sentence per line (see parse_lines).
inline std::vector<std::string> read_lines(const std::filesystem::path& path, const LineReadOptions& opt = {}) {
  return parse_lines(detail::read_text_file(path, "text"), path.string(), opt);
}

/// One row of a TSV file with the line it came from (1-based).
struct TsvRow {
  std::size_t line = 0;
  std::vector<std::string> fields;
};

/// Options for the TSV readers.
struct TsvReadOptions {
  std::size_t min_columns = 1;  ///< fewer fields than this is an error
  std::size_t max_columns = 0;  ///< more fields than this is an error; 0 = no limit
  bool skip_empty = true;       ///< skip empty lines (otherwise they are a 1-field row)
  bool comments = false;        ///< skip lines whose first byte is '#'
};

/// Rows of tab-separated UTF-8 text; errors name "name:line" and the column count found.
inline std::vector<TsvRow> parse_tsv(std::string_view text, std::string_view name, const TsvReadOptions& opt = {}) {
  std::vector<TsvRow> rows;
  std::vector<std::string> fields;
  detail::for_each_text_line(text, name, "tsv", [&](std::size_t line_no, std::string_view line) {
    if (line.empty() && opt.skip_empty) return;
    if (opt.comments && line.starts_with('#')) return;
    detail::split_tabs(line, fields);
    MIXMOE_CHECK(fields.size() >= opt.min_columns && (opt.max_columns == 0 || fields.size() <= opt.max_columns), "tsv",
                 name, ':', line_no, ": expected ", opt.min_columns,
                 opt.max_columns == opt.min_columns ? ""
                 : opt.max_columns == 0             ? " or more"
                                                    : " to " + std::to_string(opt.max_columns),
                 " tab-separated columns, found ", fields.size());
    rows.push_back({line_no, fields});
  });
  return rows;
}

/// Reads a TSV file (see parse_tsv).
inline std::vector<TsvRow> read_tsv(const std::filesystem::path& path, const TsvReadOptions& opt = {}) {
  return parse_tsv(detail::read_text_file(path, "tsv"), path.string(), opt);
}

/// A parallel sentence pair; `extra` holds columns after the second, `line` the 1-based source line.
struct ParallelPair {
  std::string source, target;
  std::vector<std::string> extra;
  std::size_t line = 0;
};

/// Options for the parallel TSV reader.
struct ParallelTsvOptions {
  bool allow_extra_columns = true;  ///< columns after source and target are kept in `extra`; else an error
  bool allow_empty_fields = false;  ///< an empty source or target is an error unless this is set
};

/// Pairs from "source<TAB>target[<TAB>extra...]" lines; empty lines are skipped.
inline std::vector<ParallelPair> parse_parallel_tsv(std::string_view text, std::string_view name,
                                                    const ParallelTsvOptions& opt = {}) {
  TsvReadOptions t;
  t.min_columns = 2;
  t.max_columns = opt.allow_extra_columns ? 0 : 2;
  std::vector<ParallelPair> out;
  for (auto& row : parse_tsv(text, name, t)) {
    MIXMOE_CHECK(opt.allow_empty_fields || (!row.fields[0].empty() && !row.fields[1].empty()), "tsv", name, ':',
                 row.line, ": empty ", row.fields[0].empty() ? "source" : "target", " field");
    ParallelPair p;
    p.source = std::move(row.fields[0]);
    p.target = std::move(row.fields[1]);
    p.extra.assign(std::make_move_iterator(row.fields.begin() + 2), std::make_move_iterator(row.fields.end()));
    p.line = row.line;
    out.push_back(std::move(p));
  }
  return out;
}

/// Reads a parallel TSV file (see parse_parallel_tsv).
inline std::vector<ParallelPair> read_parallel_tsv(const std::filesystem::path& path,
                                                   const ParallelTsvOptions& opt = {}) {
  return parse_parallel_tsv(detail::read_text_file(path, "tsv"), path.string(), opt);
}

/// What the writers do with a TAB, LF or CR inside a field.
enum class TsvFieldPolicy {
  error,               ///< throw mixmoe::Error naming the row and column
  replace_with_space,  ///< write each such character as one space
};

namespace detail {

inline constexpr std::string_view kByteOrderMark = "\xEF\xBB\xBF";  // U+FEFF in UTF-8

/// Appends one field under `policy`; `file_start`: the field begins the file, where a leading U+FEFF
/// would be taken for a byte-order mark by the readers.
inline void append_field(std::string& out, std::string_view field, bool tab_allowed, TsvFieldPolicy policy,
                         std::size_t row, std::size_t col, const char* where, bool file_start = false) {
  if (const auto bad = find_invalid_utf8(field))
    fail(where, "row ", row, " column ", col, ": invalid UTF-8 at byte ", *bad + 1);
  if (file_start && field.starts_with(kByteOrderMark)) {
    MIXMOE_CHECK(policy == TsvFieldPolicy::replace_with_space, where, "row ", row, " column ", col,
                 ": field starts with U+FEFF, which at the start of a file reads back as a byte-order mark and is "
                 "dropped (not allowed; TsvFieldPolicy::replace_with_space writes a space instead)");
    out += ' ';
    field.remove_prefix(kByteOrderMark.size());
  }
  for (const char c : field) {
    if (c == '\n' || c == '\r' || (c == '\t' && !tab_allowed)) {
      MIXMOE_CHECK(policy == TsvFieldPolicy::replace_with_space, where, "row ", row, " column ", col,
                   ": field contains a ",
                   c == '\t'   ? "TAB"
                   : c == '\n' ? "line feed"
                               : "carriage return",
                   " (not allowed; TsvFieldPolicy::replace_with_space writes a space instead)");
      out += ' ';
    } else {
      out += c;
    }
  }
}

inline void write_text_file(const std::filesystem::path& path, std::string_view text, const char* where) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  MIXMOE_CHECK(out.good(), where, path.string(), ": cannot open for writing");
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.close();
  MIXMOE_CHECK(!out.fail(), where, path.string(), ": write error");
}

}  // namespace detail

/// One TSV line (with its '\n') from fields; `row` (1-based) is the line's number in the file, used in
/// error messages and, for row 1, to apply the policy to a first field starting with U+FEFF (see above).
inline std::string format_tsv_row(const std::vector<std::string>& fields, TsvFieldPolicy policy = TsvFieldPolicy::error,
                                  std::size_t row = 1) {
  std::string out;
  for (std::size_t c = 0; c < fields.size(); ++c) {
    if (c) out += '\t';
    detail::append_field(out, fields[c], false, policy, row, c + 1, "tsv", row == 1 && c == 0);
  }
  out += '\n';
  return out;
}

/// Writes rows as TSV (LF line ends, no header). The file is written only if every row is valid.
inline void write_tsv(const std::filesystem::path& path, const std::vector<std::vector<std::string>>& rows,
                      TsvFieldPolicy policy = TsvFieldPolicy::error) {
  std::string text;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    try {
      text += format_tsv_row(rows[r], policy, r + 1);
    } catch (const Error& e) {
      detail::fail("tsv", path.string(), ": ", std::string_view(e.what()).substr(6));  // drop "[tsv] "
    }
  }
  detail::write_text_file(path, text, "tsv");
}

/// Writes one line per string (LF line ends). LF/CR inside a line follow `policy`; TAB is allowed.
inline void write_lines(const std::filesystem::path& path, const std::vector<std::string>& lines,
                        TsvFieldPolicy policy = TsvFieldPolicy::error) {
  std::string text;
  for (std::size_t r = 0; r < lines.size(); ++r) {
    try {
      detail::append_field(text, lines[r], true, policy, r + 1, 1, "text", r == 0);
    } catch (const Error& e) {
      detail::fail("text", path.string(), ": ", std::string_view(e.what()).substr(7));  // drop "[text] "
    }
    text += '\n';
  }
  detail::write_text_file(path, text, "text");
}

}  // namespace mixmoe
