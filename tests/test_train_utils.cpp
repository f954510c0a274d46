// Training utilities: learning-rate schedules, gradient clipping, the non-finite step guard,
// the progress line and the JSON Lines metrics log. Values are checked against hand-worked
// results; the progress line runs on an injected clock so its text is exact.
#include "test_util.hpp"

#include <mixmoe/train/clip.hpp>
#include <mixmoe/train/metrics_log.hpp>
#include <mixmoe/train/progress.hpp>
#include <mixmoe/train/schedule.hpp>
#include <mixmoe/train/step_guard.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numbers>
#include <sstream>
#include <string>

// Each test file in its own namespace: the unity build compiles several files as one unit.
namespace test_train_utils {

using namespace mixmoe;
using namespace mixmoe::test;

namespace {

constexpr double kNan = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

Vd param_with_grad(std::initializer_list<double> grad) {
  const auto n = static_cast<index_t>(grad.size());
  Vd p(Td::zeros({n}), true);
  p.set_grad(Td::from(grad, {n}));
  return p;
}

/// A fresh, empty directory under the system's temporary directory.
std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("mixmoe_test_train_utils_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void append_raw(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::app);
  out << bytes;
}

}  // namespace

// ---- schedules -------------------------------------------------------------

TEST_CASE("WarmupCosine: linear warm-up, half cosine to min_lr, then constant", "[train][schedule]") {
  const WarmupCosine s{.peak_lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10, .total_steps = 110};
  s.validate();
  // Warm-up: peak * (step + 1) / warmup.
  CHECK(s(0) == Approx(1e-4).epsilon(1e-12));
  CHECK(s(4) == Approx(5e-4).epsilon(1e-12));
  CHECK(s(9) == Approx(1e-3).epsilon(1e-12));
  // Decay over steps 10..110: min + (peak - min) * (1 + cos(pi * p)) / 2.
  CHECK(s(10) == Approx(1e-3).epsilon(1e-12));
  CHECK(s(35) == Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::sqrt(0.5))).epsilon(1e-12));  // p = 1/4
  CHECK(s(60) == Approx(5.5e-4).epsilon(1e-12));                                        // p = 1/2
  CHECK(s(109) == Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi * 0.99))).epsilon(1e-12));
  CHECK(s(110) == 1e-4);
  CHECK(s(100000) == 1e-4);
  // No warm-up: the first step already has the peak.
  const WarmupCosine nw{.peak_lr = 2.0, .min_lr = 0.0, .warmup_steps = 0, .total_steps = 4};
  CHECK(nw(0) == 2.0);
  CHECK(nw(2) == Approx(1.0).epsilon(1e-12));
  CHECK(nw(4) == 0.0);
}

TEST_CASE("WarmupLinear and ConstantLR values; validation names the field", "[train][schedule]") {
  const WarmupLinear s{.peak_lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10, .total_steps = 110};
  CHECK(s(1) == Approx(2e-4).epsilon(1e-12));
  CHECK(s(10) == Approx(1e-3).epsilon(1e-12));
  CHECK(s(60) == Approx(5.5e-4).epsilon(1e-12));
  CHECK(s(85) == Approx(3.25e-4).epsilon(1e-12));
  CHECK(s(110) == 1e-4);
  CHECK(ConstantLR{.lr = 0.25}(12345) == 0.25);

  MIXMOE_REQUIRE_ERROR((WarmupCosine{.peak_lr = 1e-4, .min_lr = 1e-3, .warmup_steps = 0, .total_steps = 10}.validate()),
                       "[WarmupCosine] min_lr must be in [0, peak_lr = 0.0001], got 0.001");
  MIXMOE_REQUIRE_ERROR((WarmupLinear{.peak_lr = 1, .min_lr = 0, .warmup_steps = 20, .total_steps = 10}.validate()),
                       "[WarmupLinear] total_steps (10) must be >= warmup_steps (20)");
}

TEST_CASE("set_lr / apply_schedule change the learning rate of the next optimizer step", "[train][schedule]") {
  Vd w(Td::from({1.0}, {1}), true);
  SGD<double> opt({w}, {.lr = 1.0});
  const WarmupLinear s{.peak_lr = 1.0, .min_lr = 0.0, .warmup_steps = 4, .total_steps = 4};
  CHECK(apply_schedule(opt, s, 1) == Approx(0.5));  // (1 + 1) / 4
  w.set_grad(Td::from({2.0}, {1}));
  opt.step();
  CHECK(w.value()(0) == Approx(0.0).margin(1e-15));  // 1 - 0.5 * 2

  AdamW<double> adam({w}, {.lr = 1e-3});
  set_lr(adam, 3e-4);
  CHECK(adam.options().lr == 3e-4);
  MIXMOE_REQUIRE_ERROR(set_lr(adam, kNan), "[set_lr] learning rate must be finite and >= 0, got nan");
}

// ---- clipping ----------------------------------------------------------------

TEST_CASE("clip_grad_norm scales to exactly max_norm and leaves small gradients alone", "[train][clip]") {
  // Global norm: sqrt(3^2 + 4^2 + 12^2) = 13.
  const Vd a = param_with_grad({3.0, 4.0}), b = param_with_grad({12.0});
  const Vd frozen(Td::from({5.0}, {1}), false);  // no gradient: ignored
  const std::vector<Vd> params{a, frozen, b};
  CHECK(grad_norm(params) == 13.0);

  GradNorm r = clip_grad_norm(params, 20.0);
  CHECK(r.norm == 13.0);
  CHECK_FALSE(r.clipped);
  CHECK(r.scale == 1.0);
  CHECK(a.grad().to_vector() == std::vector<double>{3.0, 4.0});

  r = clip_grad_norm(params, 6.5);
  CHECK(r.norm == 13.0);
  CHECK(r.clipped);
  CHECK(r.scale == 0.5);
  CHECK(a.grad().to_vector() == std::vector<double>{1.5, 2.0});
  CHECK(b.grad().to_vector() == std::vector<double>{6.0});
  CHECK(grad_norm(params) == 6.5);

  r = clip_grad_norm(params, 0.0);  // disabled
  CHECK(r.norm == 6.5);
  CHECK_FALSE(r.clipped);

  // A scale that is not a power of two: the clipped norm is max_norm up to rounding.
  const Vd c = param_with_grad({1.0, 2.0, 2.0});  // norm 3
  r = clip_grad_norm(std::vector<Vd>{c}, 1.0);
  CHECK(r.scale == Approx(1.0 / 3.0).epsilon(1e-15));
  CHECK(grad_norm(std::vector<Vd>{c}) == Approx(1.0).epsilon(1e-15));
  CHECK(c.grad()(0) == Approx(1.0 / 3.0).epsilon(1e-15));
}

TEST_CASE("clip_grad_norm_async: clip_grad_norm's norm and scale as a tensor", "[train][clip]") {
  const Vd a = param_with_grad({3.0, 4.0}), b = param_with_grad({12.0});
  const std::vector<Vd> params{a, b};
  Td r = clip_grad_norm_async(params, 6.5);
  CHECK(r.shape() == Shape{2});
  CHECK(r.to_vector() == std::vector<double>{13.0, 0.5});
  CHECK(a.grad().to_vector() == std::vector<double>{1.5, 2.0});
  r = clip_grad_norm_async(params, 100.0);
  CHECK(r.to_vector() == std::vector<double>{6.5, 1.0});
  a.grad().data()[0] = std::numeric_limits<double>::quiet_NaN();
  r = clip_grad_norm_async(params, 1.0);
  CHECK(std::isnan(r.to_vector()[0]));
  CHECK(r.to_vector()[1] == 1.0);
  CHECK(b.grad().to_vector() == std::vector<double>{6.0});  // nothing scaled
  MIXMOE_REQUIRE_ERROR(clip_grad_norm_async(params, std::numeric_limits<double>::quiet_NaN()),
                       "[clip_grad_norm_async] max_norm is nan");
}

TEST_CASE("grad_norm accumulates float gradients in double and survives overflow of the squares", "[train][clip]") {
  Vf f(Tf::zeros({2}), true);
  f.set_grad(Tf::from({3.0f, 4.0f}, {2}));
  CHECK(grad_norm(std::vector<Vf>{f}) == 5.0);
  const GradNorm r = clip_grad_norm(std::vector<Vf>{f}, 1.0);
  CHECK(f.grad().to_vector() == std::vector<float>{0.6f, 0.8f});
  CHECK(r.norm == 5.0);

  const Vd big = param_with_grad({3e200, 4e200});  // squares overflow a double
  CHECK(grad_norm(std::vector<Vd>{big}) == Approx(5e200).epsilon(1e-14));
}

TEST_CASE("grads_finite and clip_grad_norm on nan and inf gradients", "[train][clip]") {
  const Vd ok = param_with_grad({1.0, 2.0});
  const Vd with_nan = param_with_grad({1.0, kNan});
  const Vd with_inf = param_with_grad({-kInf, 0.0});
  CHECK(grads_finite(std::vector<Vd>{ok}));
  CHECK_FALSE(grads_finite(std::vector<Vd>{ok, with_nan}));
  CHECK_FALSE(grads_finite(std::vector<Vd>{with_inf, ok}));
  CHECK(std::isnan(grad_norm(std::vector<Vd>{ok, with_nan})));
  CHECK(std::isinf(grad_norm(std::vector<Vd>{with_inf})));
  CHECK(std::isnan(grad_norm(std::vector<Vd>{with_inf, with_nan})));
  // Nothing is scaled when the norm is not finite.
  const GradNorm r = clip_grad_norm(std::vector<Vd>{ok, with_inf}, 1.0);
  CHECK(std::isinf(r.norm));
  CHECK_FALSE(r.clipped);
  CHECK(ok.grad().to_vector() == std::vector<double>{1.0, 2.0});
}

// ---- step guard ---------------------------------------------------------------

TEST_CASE("StepGuard counts skipped steps, warns with the reason and resets after a good step", "[train][guard]") {
  std::ostringstream warn;
  StepGuard guard({.max_consecutive = 3, .warn = &warn});
  CHECK(guard.check(2.5, 1.0, 119));
  CHECK_FALSE(guard.check(kNan, 1.0, 120));
  CHECK(guard.last_reason() == "loss is nan at step 120");
  CHECK_FALSE(guard.check(2.0, kInf, 121));
  CHECK(guard.last_reason() == "gradient norm is inf at step 121");
  CHECK(guard.skipped_consecutive() == 2);
  CHECK(guard.skipped_total() == 2);
  CHECK(warn.str() ==
        "step guard: skipping step 120: loss is nan (1 in a row, 1 in total)\n"
        "step guard: skipping step 121: gradient norm is inf (2 in a row, 2 in total)\n");

  CHECK(guard.check(2.0, 0.5, 122));  // a good step resets the run of skips
  CHECK(guard.skipped_consecutive() == 0);
  CHECK(guard.skipped_total() == 2);
  CHECK(guard.last_reason() == "gradient norm is inf at step 121");

  // Default step numbers: the number of checks so far.
  StepGuard quiet({.max_consecutive = 0, .warn = nullptr});
  CHECK(quiet.check(1.0, 1.0));
  CHECK_FALSE(quiet.check(-kInf, kNan));
  CHECK(quiet.last_reason() == "loss is -inf and gradient norm is nan at step 1");
  for (int i = 0; i < 100; ++i) CHECK_FALSE(quiet.check(kNan, 1.0));  // max_consecutive 0: never throws
  CHECK(quiet.skipped_consecutive() == 101);
}

TEST_CASE("StepGuard throws TrainingDiverged on the max_consecutive-th skip in a row", "[train][guard]") {
  std::ostringstream warn;
  StepGuard guard({.max_consecutive = 3, .warn = &warn});
  CHECK_FALSE(guard.check(kNan, 1.0, 5));
  CHECK_FALSE(guard.check(kNan, 1.0, 6));
  try {
    (void)guard.check(1.0, kNan, 7);
    FAIL("no TrainingDiverged");
  } catch (const TrainingDiverged& e) {
    CHECK(std::string(e.what()) ==
          "[StepGuard] training diverged: 3 steps in a row skipped (limit 3), the last because gradient norm is nan at "
          "step 7");
  }
  CHECK(guard.skipped_total() == 3);
  CHECK(warn.str().find("step guard: training diverged: 3 steps in a row") != std::string::npos);
  // TrainingDiverged is a mixmoe::Error.
  MIXMOE_REQUIRE_ERROR((void)guard.check(kNan, 1.0, 8), "4 steps in a row skipped (limit 3)");
  CHECK_THROWS_AS((void)guard.check(kNan, 1.0, 9), Error);

  // restore() picks up the counts of a checkpoint.
  StepGuard resumed({.max_consecutive = 3, .warn = nullptr});
  resumed.restore(10, 2);
  CHECK_THROWS_AS((void)resumed.check(kNan, 1.0, 50), TrainingDiverged);
  CHECK(resumed.skipped_total() == 11);
  MIXMOE_REQUIRE_ERROR(resumed.restore(1, 2), "[StepGuard] restore: counts must satisfy 0 <= consecutive <= total");
}

TEST_CASE("StepGuard::check with parameters clears the gradients of a skipped step", "[train][guard]") {
  StepGuard guard({.max_consecutive = 5, .warn = nullptr});
  const Vd a = param_with_grad({1.0, 2.0});
  const std::vector<Vd> params{a};
  CHECK(guard.check(1.0, 1.0, params));
  CHECK(a.grad().defined());
  CHECK_FALSE(guard.check(kNan, 1.0, params));
  CHECK_FALSE(a.grad().defined());
}

// ---- progress ---------------------------------------------------------------------

TEST_CASE("Progress formats numbers and durations", "[train][progress]") {
  CHECK(Progress::format_duration(0.4) == "0s");
  CHECK(Progress::format_duration(57.2) == "57s");
  CHECK(Progress::format_duration(62) == "1m02s");
  CHECK(Progress::format_duration(3725) == "1h02m05s");
  CHECK(Progress::format_duration(-1) == "?");
  CHECK(Progress::format_count(850) == "850");
  CHECK(Progress::format_count(2345) == "2.3k");
  CHECK(Progress::format_count(1.25e6) == "1.2M");
  CHECK(Progress::format_metric(3.21) == "3.21");
  CHECK(Progress::format_metric(0.01234) == "0.0123");
  CHECK(Progress::format_metric(1234.4) == "1234");
  CHECK(Progress::format_metric(1e-3) == "1.0e-03");
  CHECK(Progress::format_metric(0) == "0");
  CHECK(Progress::format_metric(kNan) == "nan");
}

TEST_CASE("Progress on a terminal redraws one line, at most 4 times a second", "[train][progress]") {
  // Each redraw pads with spaces up to the length of the text it overwrites.
  const auto pad = [](const std::string& now, const std::string& before) {
    return std::string(before.size() > now.size() ? before.size() - now.size() : 0, ' ');
  };
  double t = 0;
  std::ostringstream os;
  Progress bar(2000, "stage1", os,
               {.mode = Progress::Mode::Terminal, .rate_halflife_seconds = 1.0, .clock = [&] { return t; }});
  CHECK(bar.terminal());
  t = 60;
  bar.update(1000, {{"loss", 3.5}, {"lr", 1e-3}}, 120000);  // 2000 tok/s
  const std::string l1 = "stage1  [#####.....]  50% 1000/2000 loss 3.5 lr 1.0e-03 | 2.0k tok/s (avg 2.0k) | "
                         "1m00s elapsed, ETA 1m00s";
  CHECK(os.str() == "\r" + l1);
  t = 64;
  bar.update(1040, {{"loss", 3.21}, {"lr", 1e-3}}, 136000);  // 4000 tok/s over the last 4 s
  // Weights halve every second: (120000 / 16 + 16000) tokens in (60 / 16 + 4) s.
  CHECK(bar.tokens_per_second() == Approx(23500.0 / 7.75));
  const std::string l2 = "stage1  [#####.....]  52% 1040/2000 loss 3.21 lr 1.0e-03 | 3.0k tok/s (avg 2.1k) | "
                         "1m04s elapsed, ETA 59s";
  REQUIRE(l2.size() + 1 == l1.size());
  CHECK(os.str() == "\r" + l1 + "\r" + l2 + " ");  // a shorter line erases the rest of the longer one
  t = 64.1;
  bar.update(1041, {}, 136400);  // within 0.25 s of the last redraw: nothing drawn
  CHECK(os.str() == "\r" + l1 + "\r" + l2 + pad(l2, l1));
  CHECK(bar.line().find(" 1041/2000 loss 3.21 lr 1.0e-03 ") != std::string::npos);  // metrics kept

  t = 120;
  bar.update(2000, {{"loss", 2.1}}, 240000);
  // 103600 tokens in the last 55.9 s: 1853 tok/s (the older intervals weigh 2^-55.9 now).
  const std::string l3 = "stage1  [##########] 100% 2000/2000 loss 2.1 | 1.9k tok/s (avg 2.0k) | 2m00s elapsed, ETA 0s";
  bar.finish();
  const std::string fin = "stage1  [##########] 100% 2000/2000 loss 2.1 | 240.0k tok, 2.0k tok/s | done in 2m00s";
  REQUIRE(l3.size() < l2.size());
  REQUIRE(fin.size() < l3.size());
  CHECK(os.str() == "\r" + l1 + "\r" + l2 + " " + "\r" + l3 + pad(l3, l2) + "\r" + fin + pad(fin, l3) + "\n");
  bar.finish();  // once only
  CHECK(os.str().back() == '\n');
  MIXMOE_REQUIRE_ERROR(bar.update(2000), "[Progress] update after finish() on 'stage1'");
}

TEST_CASE("Progress in a log prints a line every 10% or every 10 s", "[train][progress]") {
  double t = 0;
  std::ostringstream os;
  {
    Progress bar(100, "train", os, {.mode = Progress::Mode::Log, .clock = [&] { return t; }});
    CHECK_FALSE(bar.terminal());
    t = 1, bar.update(1);    // nothing yet
    t = 11, bar.update(5);   // 10 s since the start
    t = 12, bar.update(10);  // 10%
    t = 13, bar.update(15);
    t = 14, bar.update(19);
    t = 15, bar.update(20);  // 20%
    t = 20;
    bar.finish();
  }
  CHECK(os.str() ==
        "train  [..........]   5% 5/100 | 11s elapsed, ETA 3m29s\n"    // 11 s * 95 / 5 = 209 s
        "train  [#.........]  10% 10/100 | 12s elapsed, ETA 1m48s\n"   // 12 s * 90 / 10
        "train  [##........]  20% 20/100 | 15s elapsed, ETA 1m00s\n"   // 15 s * 80 / 20
        "train  [##........]  20% 20/100 | done in 20s\n");
}

TEST_CASE("Progress with an unknown total, and resumed at a step", "[train][progress]") {
  double t = 0;
  std::ostringstream os;
  Progress eval(0, "eval", os, {.mode = Progress::Mode::Log, .clock = [&] { return t; }});
  t = 5;
  eval.update(37, {{"loss", 2.5}});
  CHECK(eval.line() == "eval  37 loss 2.5 | 5s elapsed");

  // Resumed at step 50 of 100: the ETA uses only the steps done since.
  Progress resumed(100, "stage2", os, {.mode = Progress::Mode::Log, .start_at = 50, .clock = [&] { return t; }});
  t = 15;
  resumed.update(60);
  CHECK(resumed.line() == "stage2  [######....]  60% 60/100 | 10s elapsed, ETA 40s");
}

// ---- metrics log ----------------------------------------------------------------------

TEST_CASE("MetricsLog writes JSON Lines that read back exactly", "[train][metrics]") {
  const auto dir = fresh_dir("roundtrip");
  const auto path = dir / "sub" / "metrics.jsonl";
  {
    MetricsLog log(path, false);
    log.log(1, "stage1", "train", {{"loss", 3.5}});
    log.log(2, "stage1", "train", {{"loss", 0.1 + 0.2}, {"lr", 1e-3}});
    log.write(nlohmann::json{{"step", 2}, {"split", "valid"}, {"bleu", 12.25}});
    log.log(3, "", "train", {{"loss", kNan}});
    // Flushed line by line: readable while the log is open.
    CHECK(read_metrics(path).size() == 4);
  }
  const std::string text = slurp(path);
  CHECK(text.substr(0, text.find('\n')) == R"({"step":1,"stage":"stage1","split":"train","loss":3.5})");
  bool partial = true;
  const auto events = read_metrics(path, &partial);
  CHECK_FALSE(partial);
  REQUIRE(events.size() == 4);
  CHECK(events[1]["loss"].get<double>() == 0.1 + 0.2);  // bit-exact
  CHECK(events[1]["lr"].get<double>() == 1e-3);
  CHECK(events[2]["split"] == "valid");
  CHECK(events[2]["bleu"].get<double>() == 12.25);
  CHECK(events[3]["loss"].is_null());  // nan has no JSON form
  CHECK_FALSE(events[3].contains("stage"));

  MetricsLog log(path, true);
  MIXMOE_REQUIRE_ERROR(log.write(nlohmann::json::array({1, 2})),
                       "metrics.jsonl: an event must be a JSON object, got array");
  std::filesystem::remove_all(dir);
}

TEST_CASE("MetricsLog::truncate_after makes a resumed run's log equal to an uninterrupted one", "[train][metrics]") {
  const auto dir = fresh_dir("truncate");
  const auto straight = dir / "straight.jsonl", resumed = dir / "resumed.jsonl";
  {
    MetricsLog log(straight, false);
    for (int step = 1; step <= 6; ++step) log.log(step, "stage1", "train", {{"loss", 4.0 / step}});
  }
  {
    // The first run logs up to step 4, the checkpoint is at step 2, then it is killed mid-write.
    MetricsLog log(resumed, false);
    for (int step = 1; step <= 4; ++step) log.log(step, "stage1", "train", {{"loss", 4.0 / step}});
  }
  append_raw(resumed, R"({"step":5,"stage":"sta)");
  bool partial = false;
  CHECK(read_metrics(resumed, &partial).size() == 4);
  CHECK(partial);
  {
    MetricsLog log(resumed, true);
    CHECK(log.truncate_after(2) == 2);
    CHECK(read_metrics(resumed).size() == 2);
    for (int step = 3; step <= 6; ++step) log.log(step, "stage1", "train", {{"loss", 4.0 / step}});
  }
  CHECK(slurp(resumed) == slurp(straight));
  std::filesystem::remove_all(dir);
}

TEST_CASE("MetricsLog in append mode cuts a partial last line before writing", "[train][metrics]") {
  const auto dir = fresh_dir("append");
  const auto path = dir / "m.jsonl";
  append_raw(path, "{\"step\":1}\n{\"step\":2,\"lo");
  {
    MetricsLog log(path, true);
    log.log(2, "s", "train", {{"loss", 1.5}});
  }
  CHECK(slurp(path) == "{\"step\":1}\n{\"step\":2,\"stage\":\"s\",\"split\":\"train\",\"loss\":1.5}\n");
  // A whole event whose '\n' is missing is kept, and the next event starts on a new line.
  append_raw(path, "{\"step\":3}");
  {
    MetricsLog log(path, true);
    log.log(4, "", "", {});
  }
  CHECK(slurp(path) ==
        "{\"step\":1}\n{\"step\":2,\"stage\":\"s\",\"split\":\"train\",\"loss\":1.5}\n{\"step\":3}\n{\"step\":4}\n");
  std::filesystem::remove_all(dir);
}

TEST_CASE("read_metrics reports malformed lines by number", "[train][metrics]") {
  const auto dir = fresh_dir("malformed");
  const auto path = dir / "bad.jsonl";
  append_raw(path, "{\"step\":1}\n\nnot json\n{\"step\":2}\n");
  MIXMOE_REQUIRE_ERROR(read_metrics(path), "bad.jsonl: line 3: not valid JSON (");
  {
    MetricsLog log(path, true);
    MIXMOE_REQUIRE_ERROR(log.truncate_after(0), "bad.jsonl: line 3: not a JSON object");
  }
  std::filesystem::remove(path);
  append_raw(path, "[1,2]\n");
  MIXMOE_REQUIRE_ERROR(read_metrics(path), "bad.jsonl: line 1: expected a JSON object, got array");
  std::filesystem::remove(path);
  append_raw(path, "{\"step\":\"x\"}\n");
  {
    MetricsLog log(path, true);
    MIXMOE_REQUIRE_ERROR(log.truncate_after(0), "bad.jsonl: line 1: \"step\" is not an integer");
  }
  // A last line without '\n' that parses is a complete event.
  std::filesystem::remove(path);
  append_raw(path, "{\"step\":1}\n{\"step\":2}");
  bool partial = true;
  CHECK(read_metrics(path, &partial).size() == 2);
  CHECK_FALSE(partial);
  MIXMOE_REQUIRE_ERROR(read_metrics(dir / "missing.jsonl"), "[read_metrics] ");
  MIXMOE_REQUIRE_ERROR(read_metrics(dir / "missing.jsonl"), "missing.jsonl: cannot open for reading");
  std::filesystem::remove_all(dir);
}
}  // namespace test_train_utils
