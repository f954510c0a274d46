// Progress: a progress line for long loops (training stages, evaluation, data preparation).
//
//   Progress bar(2000, "stage1");
//   for (std::int64_t step = 0; step < 2000; ++step) {
//     ...
//     bar.update(step + 1, {{"loss", loss}, {"lr", lr}}, tokens_so_far);
//   }
//   bar.finish();
//
// prints (on a terminal, redrawn in place at most 4 times a second)
//
//   stage1  [#####.....]  52% 1040/2000 loss 3.21 lr 1.0e-03 | 2.3k tok/s (avg 2.1k) | 1m02s elapsed, ETA 57s
//
// and, when the stream is not a terminal (CI logs, files), the same line as a new line each
// time another 10% is done or 10 s have passed since the last one, whichever comes first.
// finish() prints the final line with the totals. The tokens/s shown while running weighs
// the recent past most (weights halve every 5 s), "avg" and the ETA use the whole run's rate.
// The clock is an option, so output can be produced deterministically in tests.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define MIXMOE_PROGRESS_HAS_ISATTY 1
#endif

#include "mixmoe/core/error.hpp"

namespace mixmoe {

struct ProgressOptions {
  enum class Mode {
    Auto,      ///< a terminal when the stream is std::cerr/std::clog/std::cout attached to one
    Terminal,  ///< redraw one line with '\r'
    Log,       ///< a new line now and then
  };
  Mode mode = Mode::Auto;
  /// Characters between the brackets.
  int bar_width = 10;
  /// Terminal mode: at least this long between redraws.
  double redraw_seconds = 0.25;
  /// Log mode: a line when this long has passed since the last one...
  double log_seconds = 10.0;
  /// ...or when another this fraction of the total is done.
  double log_fraction = 0.1;
  /// Half-life of the moving average of tokens/s.
  double rate_halflife_seconds = 5.0;
  /// Steps already done when the bar is created (a resumed run): rates and the ETA count from here.
  std::int64_t start_at = 0;
  /// Seconds on a monotonic clock; std::chrono::steady_clock when empty.
  std::function<double()> clock;
};

namespace detail {

inline std::string progress_printf(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

}  // namespace detail

class Progress {
 public:
  using Mode = ProgressOptions::Mode;

  /// A bar for `total` steps (total <= 0: unknown, no bar and no ETA) labelled `label`, drawn on `os`.
  Progress(std::int64_t total, std::string label, std::ostream& os = std::cerr, ProgressOptions options = {})
      : total_(total), label_(std::move(label)), os_(os), opt_(std::move(options)) {
    MIXMOE_CHECK(opt_.bar_width >= 0, "Progress", "bar_width must be >= 0, got ", opt_.bar_width);
    MIXMOE_CHECK(opt_.log_fraction > 0, "Progress", "log_fraction must be > 0, got ", opt_.log_fraction);
    MIXMOE_CHECK(opt_.rate_halflife_seconds > 0, "Progress", "rate_halflife_seconds must be > 0, got ",
                 opt_.rate_halflife_seconds);
    if (!opt_.clock) {
      opt_.clock = [] {
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
      };
    }
    terminal_ = opt_.mode == Mode::Terminal || (opt_.mode == Mode::Auto && is_terminal(os));
    start_ = rate_time_ = opt_.clock();
    done_ = opt_.start_at;
    last_log_time_ = start_;
    last_log_bucket_ = bucket(done_);
  }

  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// Ends a line left open on a terminal (when finish() was not called).
  ~Progress() {
    try {
      if (terminal_ && drawn_width_ > 0 && !finished_) os_ << '\n' << std::flush;
    } catch (...) {  // NOLINT(bugprone-empty-catch): nothing to do about a failing stream here
    }
  }

  /// Records that `done` steps are done, with the metrics to show (an empty list keeps the last
  /// ones) and the number of tokens processed since the bar was created (< 0: not tracked).
  /// Draws when the rate limits allow.
  void update(std::int64_t done, std::initializer_list<std::pair<std::string_view, double>> metrics = {},
              std::int64_t tokens = -1) {
    set_metrics(metrics);
    advance(done, tokens);
  }
  /// The same, with the metrics in a vector.
  void update(std::int64_t done, const std::vector<std::pair<std::string, double>>& metrics, std::int64_t tokens = -1) {
    if (!metrics.empty()) metrics_ = metrics;
    advance(done, tokens);
  }

  /// Prints the final line (totals, overall rate, time taken) and ends it. Later calls do nothing.
  void finish() {
    if (finished_) return;
    finished_ = true;
    const double now = opt_.clock();
    emit(final_line(now), true);
  }

  /// The running line as it would be drawn now.
  [[nodiscard]] std::string line() const { return running_line(opt_.clock()); }

  [[nodiscard]] bool terminal() const { return terminal_; }
  /// Tokens/s with exponentially fading weights on older intervals (0 until time has passed).
  [[nodiscard]] double tokens_per_second() const { return rate_ema_; }
  /// Tokens/s over the whole run so far.
  [[nodiscard]] double average_tokens_per_second() const {
    const double dt = opt_.clock() - start_;
    return dt > 0 && tokens_ > 0 ? static_cast<double>(tokens_) / dt : 0.0;
  }

  // ---- formatting helpers (public: also useful for log lines elsewhere) ----

  /// "57s", "1m02s", "2h03m04s" (rounded to whole seconds); "?" for a negative or non-finite time.
  static std::string format_duration(double seconds) {
    if (!std::isfinite(seconds) || seconds < 0) return "?";
    const auto s = static_cast<long long>(std::llround(seconds));
    char buf[48];
    if (s < 60)
      std::snprintf(buf, sizeof buf, "%llds", s);
    else if (s < 3600)
      std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
    else
      std::snprintf(buf, sizeof buf, "%lldh%02lldm%02llds", s / 3600, (s / 60) % 60, s % 60);
    return buf;
  }

  /// "850", "2.3k", "1.2M", "4.0G".
  static std::string format_count(double v) {
    if (!std::isfinite(v)) return "?";
    const double a = std::abs(v);
    if (a < 999.5) return detail::progress_printf("%.0f", v);
    if (a < 999.95e3) return detail::progress_printf("%.1fk", v / 1e3);
    if (a < 999.95e6) return detail::progress_printf("%.1fM", v / 1e6);
    return detail::progress_printf("%.1fG", v / 1e9);
  }

  /// A metric value: "3.21", "0.0123", "1234", "1.0e-03"; "nan", "inf".
  static std::string format_metric(double v) {
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    const double a = std::abs(v);
    if (a == 0) return "0";
    if (a >= 1e-2 && a < 999.5) return detail::progress_printf("%.3g", v);
    if (a >= 999.5 && a < 1e6) return detail::progress_printf("%.0f", v);
    return detail::progress_printf("%.1e", v);
  }

 private:
  static bool is_terminal([[maybe_unused]] const std::ostream& os) {
#ifdef MIXMOE_PROGRESS_HAS_ISATTY
    if (&os == &std::cerr || &os == &std::clog) return ::isatty(STDERR_FILENO) == 1;
    if (&os == &std::cout) return ::isatty(STDOUT_FILENO) == 1;
#endif
    return false;
  }

  void set_metrics(std::initializer_list<std::pair<std::string_view, double>> metrics) {
    if (metrics.size() == 0) return;
    metrics_.clear();
    for (const auto& [k, v] : metrics) metrics_.emplace_back(std::string(k), v);
  }

  [[nodiscard]] std::int64_t bucket(std::int64_t done) const {
    if (total_ <= 0) return 0;
    const double frac = static_cast<double>(done) / static_cast<double>(total_);
    return static_cast<std::int64_t>(std::floor(frac / opt_.log_fraction + 1e-9));
  }

  void advance(std::int64_t done, std::int64_t tokens) {
    MIXMOE_CHECK(done >= 0, "Progress", "done must be >= 0, got ", done);
    MIXMOE_CHECK(!finished_, "Progress", "update after finish() on '", label_, "'");
    const double now = opt_.clock();
    done_ = done;
    if (tokens >= 0) {
      // Tokens and seconds, each summed with weights halving every half-life: their ratio is the
      // recent rate, and equals the overall rate until the older intervals have faded.
      const double dt = now - rate_time_;
      if (dt > 0) {
        const double decay = std::exp2(-dt / opt_.rate_halflife_seconds);
        rate_tokens_sum_ = rate_tokens_sum_ * decay + static_cast<double>(tokens - rate_tokens_);
        rate_seconds_sum_ = rate_seconds_sum_ * decay + dt;
        rate_ema_ = rate_tokens_sum_ / rate_seconds_sum_;
        rate_time_ = now;
        rate_tokens_ = tokens;
      }
      tokens_ = tokens;
    }
    if (terminal_) {
      if (drawn_width_ == 0 || now - last_draw_ >= opt_.redraw_seconds) {
        last_draw_ = now;
        emit(running_line(now), false);
      }
    } else {
      const std::int64_t b = bucket(done);
      if (b > last_log_bucket_ || now - last_log_time_ >= opt_.log_seconds) {
        last_log_bucket_ = b;
        last_log_time_ = now;
        emit(running_line(now), false);
      }
    }
  }

  /// label, bar, percentage, count and metrics: the part shared by the running and final lines.
  [[nodiscard]] std::string head() const {
    std::string s = label_;
    if (total_ > 0) {
      const double frac = std::clamp(static_cast<double>(done_) / static_cast<double>(total_), 0.0, 1.0);
      const auto filled = static_cast<int>(std::floor(frac * opt_.bar_width + 1e-9));
      s += "  [";
      s.append(static_cast<std::size_t>(filled), '#');
      s.append(static_cast<std::size_t>(opt_.bar_width - filled), '.');
      char buf[96];
      std::snprintf(buf, sizeof buf, "] %3d%% %lld/%lld", static_cast<int>(std::floor(frac * 100 + 1e-9)),
                    static_cast<long long>(done_), static_cast<long long>(total_));
      s += buf;
    } else {
      s += "  " + std::to_string(done_);
    }
    for (const auto& [k, v] : metrics_) s += " " + k + " " + format_metric(v);
    return s;
  }

  [[nodiscard]] std::string running_line(double now) const {
    std::string s = head();
    const double elapsed = now - start_;
    if (tokens_ >= 0) {
      s += " | " + format_count(rate_ema_) + " tok/s";
      if (elapsed > 0) s += " (avg " + format_count(static_cast<double>(tokens_) / elapsed) + ")";
    }
    s += " | " + format_duration(elapsed) + " elapsed";
    if (total_ > 0) {
      const auto progressed = static_cast<double>(done_ - opt_.start_at);
      const auto left = static_cast<double>(std::max<std::int64_t>(total_ - done_, 0));
      const std::string eta = left == 0 ? format_duration(0)
                              : progressed > 0 ? format_duration(elapsed * left / progressed)
                                               : std::string("?");
      s += ", ETA " + eta;
    }
    return s;
  }

  [[nodiscard]] std::string final_line(double now) const {
    std::string s = head();
    const double elapsed = now - start_;
    if (tokens_ >= 0) {
      s += " | " + format_count(static_cast<double>(tokens_)) + " tok";
      if (elapsed > 0) s += ", " + format_count(static_cast<double>(tokens_) / elapsed) + " tok/s";
    }
    s += " | done in " + format_duration(elapsed);
    return s;
  }

  void emit(const std::string& text, bool end_line) {
    if (terminal_) {
      os_ << '\r' << text;
      if (text.size() < drawn_width_) os_ << std::string(drawn_width_ - text.size(), ' ');
      drawn_width_ = std::max<std::size_t>(text.size(), 1);
      if (end_line) os_ << '\n';
    } else {
      os_ << text << '\n';
    }
    os_ << std::flush;
  }

  std::int64_t total_;
  std::string label_;
  std::ostream& os_;
  ProgressOptions opt_;
  bool terminal_ = false;
  bool finished_ = false;
  double start_ = 0;
  std::int64_t done_ = 0;
  std::vector<std::pair<std::string, double>> metrics_;
  std::int64_t tokens_ = -1;
  // moving average of tokens/s
  double rate_time_ = 0;
  std::int64_t rate_tokens_ = 0;
  double rate_tokens_sum_ = 0;
  double rate_seconds_sum_ = 0;
  double rate_ema_ = 0;
  // drawing state
  std::size_t drawn_width_ = 0;  // terminal: width of the line on screen (0: nothing drawn yet)
  double last_draw_ = 0;
  double last_log_time_ = 0;
  std::int64_t last_log_bucket_ = 0;
};

}  // namespace mixmoe
