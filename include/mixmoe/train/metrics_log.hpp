// MetricsLog: training metrics as JSON Lines, one object per event, flushed line by line.
//
//   MetricsLog log("runs/de/metrics.jsonl");              // appends to an existing log
//   log.truncate_after(resumed_step);                      // resuming: forget what came after the checkpoint
//   log.log(120, "stage2", "train", {{"loss", 3.2}, {"lr", 3e-4}});
//   // {"step":120,"stage":"stage2","split":"train","loss":3.2,"lr":0.0003}
//
//   for (const auto& e : read_metrics("runs/de/metrics.jsonl")) plot(e["step"], e["loss"]);
//
// A process killed while writing leaves at most a partial last line: opening the log for
// appending cuts it (so the next line starts on a line of its own), and read_metrics() ignores
// it. Any other malformed line is an error naming the file and the line number. Numbers are
// written so that they read back exactly; nan and inf have no JSON form and are written as null.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/core/error.hpp"

namespace mixmoe {

namespace detail {

/// The whole file as bytes; throws naming the file when it cannot be read.
inline std::string read_whole_file(const std::filesystem::path& path, const char* where) {
  std::ifstream in(path, std::ios::binary);
  MIXMOE_CHECK(in.is_open(), where, path.string(), ": cannot open for reading");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MIXMOE_CHECK(!in.bad(), where, path.string(), ": read failed");
  return bytes;
}

/// One line of a JSON Lines file: its number (from 1), its text, and whether it ended with '\n'.
struct JsonLine {
  std::int64_t number;
  std::string_view text;
  bool terminated;
};

inline std::vector<JsonLine> split_json_lines(std::string_view bytes) {
  std::vector<JsonLine> lines;
  std::size_t pos = 0;
  std::int64_t number = 0;
  while (pos < bytes.size()) {
    const std::size_t nl = bytes.find('\n', pos);
    ++number;
    if (nl == std::string_view::npos) {
      lines.push_back({number, bytes.substr(pos), false});
      break;
    }
    std::string_view text = bytes.substr(pos, nl - pos);
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    lines.push_back({number, text, true});
    pos = nl + 1;
  }
  return lines;
}

inline bool blank(std::string_view s) { return s.find_first_not_of(" \t\r") == std::string_view::npos; }

/// Parses the events of a JSON Lines text. A last line without '\n' that does not parse is a
/// partial write: dropped, and reported through `partial`. Returns (line number, event) pairs.
inline std::vector<std::pair<std::int64_t, nlohmann::json>> parse_json_lines(std::string_view bytes,
                                                                              const std::string& name,
                                                                              const char* where, bool* partial) {
  std::vector<std::pair<std::int64_t, nlohmann::json>> events;
  if (partial) *partial = false;
  for (const JsonLine& line : split_json_lines(bytes)) {
    if (blank(line.text)) continue;
    nlohmann::json event = nlohmann::json::parse(line.text, nullptr, /*allow_exceptions=*/false);
    if (event.is_discarded()) {
      if (!line.terminated) {
        if (partial) *partial = true;
        break;
      }
      // Parse again with exceptions to get the parser's own account of the problem.
      std::string why;
      try {
        const nlohmann::json reparsed = nlohmann::json::parse(line.text);
        (void)reparsed;
      } catch (const nlohmann::json::parse_error& e) {
        why = e.what();
      }
      detail::fail(where, name, ": line ", line.number, ": not valid JSON (", why, ")");
    }
    MIXMOE_CHECK(event.is_object(), where, name, ": line ", line.number, ": expected a JSON object, got ",
                 event.type_name());
    events.emplace_back(line.number, std::move(event));
  }
  return events;
}

}  // namespace detail

/// Reads a JSON Lines metrics file. A partial last line (a write cut short) is ignored and
/// reported through `partial_last_line` when given; any other line that is not a JSON object
/// throws mixmoe::Error naming the file and the line number. Blank lines are skipped.
inline std::vector<nlohmann::json> read_metrics(const std::filesystem::path& path, bool* partial_last_line = nullptr) {
  const std::string bytes = detail::read_whole_file(path, "read_metrics");
  std::vector<nlohmann::json> out;
  for (auto& [number, event] : detail::parse_json_lines(bytes, path.string(), "read_metrics", partial_last_line))
    out.push_back(std::move(event));
  return out;
}

/// Appends events to a JSON Lines file, one line per event, flushed after each.
class MetricsLog {
 public:
  /// Opens `path` (creating it and missing parent directories). append = false starts an empty
  /// log; append = true keeps the existing lines, cutting a partial last line if there is one.
  explicit MetricsLog(std::filesystem::path path, bool append = true) : path_(std::move(path)) {
    std::error_code ec;
    if (path_.has_parent_path()) std::filesystem::create_directories(path_.parent_path(), ec);
    if (append && std::filesystem::exists(path_)) {
      const std::string bytes = detail::read_whole_file(path_, "MetricsLog");
      if (!bytes.empty() && bytes.back() != '\n') {
        const std::size_t keep = bytes.rfind('\n') == std::string::npos ? 0 : bytes.rfind('\n') + 1;
        const auto last = nlohmann::json::parse(std::string_view(bytes).substr(keep), nullptr, false);
        if (last.is_discarded() || !last.is_object()) {  // a write cut short: cut it
          std::filesystem::resize_file(path_, keep, ec);
          MIXMOE_CHECK(!ec, "MetricsLog", path_.string(), ": cannot cut the partial last line: ", ec.message());
        } else {  // a complete event whose newline was not written: end its line
          open(true);
          out_ << '\n' << std::flush;
          return;
        }
      }
    }
    open(append);
  }

  /// Writes one event (a JSON object) as one line and flushes it.
  void write(const nlohmann::ordered_json& event) { write_line(event.is_object(), event.type_name(), event.dump()); }
  void write(const nlohmann::json& event) { write_line(event.is_object(), event.type_name(), event.dump()); }

  /// Writes {"step": step, "stage": stage, "split": split, name: value...}; an empty stage or
  /// split is left out.
  void log(std::int64_t step, std::string_view stage, std::string_view split,
           std::initializer_list<std::pair<std::string_view, double>> values) {
    nlohmann::ordered_json e;
    e["step"] = step;
    if (!stage.empty()) e["stage"] = stage;
    if (!split.empty()) e["split"] = split;
    for (const auto& [k, v] : values) e[std::string(k)] = v;
    write(e);
  }

  /// Drops every event whose "step" is greater than `step` (and a partial last line), so that a
  /// resumed run's log reads like an uninterrupted run's. Events without a "step" are kept. The
  /// file is rewritten through a temporary file and a rename. Returns how many events were dropped.
  std::int64_t truncate_after(std::int64_t step) {
    out_.close();
    const std::string bytes = detail::read_whole_file(path_, "MetricsLog::truncate_after");
    std::string kept;
    std::int64_t dropped = 0;
    for (const auto& line : detail::split_json_lines(bytes)) {
      if (detail::blank(line.text)) continue;
      const nlohmann::json event = nlohmann::json::parse(line.text, nullptr, false);
      if (event.is_discarded() && !line.terminated) break;  // a partial write
      MIXMOE_CHECK(!event.is_discarded() && event.is_object(), "MetricsLog::truncate_after", path_.string(), ": line ",
                   line.number, ": not a JSON object");
      const auto it = event.find("step");
      if (it != event.end()) {
        MIXMOE_CHECK(it->is_number_integer(), "MetricsLog::truncate_after", path_.string(), ": line ", line.number,
                     ": \"step\" is not an integer");
        if (it->get<std::int64_t>() > step) {
          ++dropped;
          continue;
        }
      }
      kept.append(line.text);
      kept.push_back('\n');
    }
    std::filesystem::path tmp = path_;
    tmp += ".tmp";
    {
      std::ofstream t(tmp, std::ios::binary | std::ios::trunc);
      MIXMOE_CHECK(t.is_open(), "MetricsLog::truncate_after", tmp.string(), ": cannot open for writing");
      t << kept;
      t.flush();
      MIXMOE_CHECK(t.good(), "MetricsLog::truncate_after", tmp.string(), ": write failed");
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path_, ec);
    MIXMOE_CHECK(!ec, "MetricsLog::truncate_after", "cannot rename ", tmp.string(), " to ", path_.string(), ": ",
                 ec.message());
    open(true);
    return dropped;
  }

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  void open(bool append) {
    out_.open(path_, std::ios::binary | (append ? std::ios::app : std::ios::trunc));
    MIXMOE_CHECK(out_.is_open(), "MetricsLog", path_.string(), ": cannot open for writing");
  }

  void write_line(bool is_object, const char* type, const std::string& text) {
    MIXMOE_CHECK(is_object, "MetricsLog", path_.string(), ": an event must be a JSON object, got ", type);
    out_ << text << '\n' << std::flush;
    MIXMOE_CHECK(out_.good(), "MetricsLog", path_.string(), ": write failed");
  }

  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace mixmoe
