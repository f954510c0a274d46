// A complete training loop for next-token objectives (language modelling, translation prompts):
// the pieces of train/ put together, for users who do not want to write their own.
//
//   per step: batch = data.next(); lr = schedule(step)
//             loss = cross_entropy(model(inputs), targets, label smoothing)
//                    + load_balance * load_balance_loss(model) + z_loss * router_z_loss(model)   (MoE models)
//                    + extra_loss(model, batch)                                (when given, e.g. align/'s
//                      routing alignment loss: it runs after the forward above and may read the routing
//                      records of that forward, then run other forwards of its own)
//             backward; clip the global gradient norm; a non-finite loss or norm skips the step
//             (StepGuard: counted, warned, and TrainingDiverged after too many in a row); AdamW step
//   every eval_every steps: eval(model) -> a score (higher is better) and metrics; the best model is
//             saved to <checkpoint_dir>/best; early stopping after `patience` evaluations without a
//             better score
//   every checkpoint_every steps: the full training state to <checkpoint_dir>/last (atomic)
//
// Resuming: when <checkpoint_dir>/last holds a complete checkpoint of the same stage, train_loop
// restores the model, AdamW's moments, the step, the data position and the guard counts from it
// and continues; the losses are then bit-identical to an uninterrupted run's (the model has no
// randomness of its own, the data order comes from the source's state). The metrics log is cut
// back to the resumed step, so it also reads as one run.
//
// Progress goes to a Progress line (tokens/s, ETA); every event goes to the MetricsLog when one is
// given, as JSON lines {"stage", "step", "split", ...}.
//
// On a device (a model and AdamW of Var<T, Cuda>) the same loop runs: the batches (host tensors)
// are copied up by supervised_logits (without waiting), the optimizer and clipping run as device
// kernels, and each step waits for the device once: after the forward, the backward and the
// clipping are issued, one copy brings back the loss, the cross-entropy, the extra loss and the
// gradient norm, which StepGuard needs before the optimizer step (and the progress line and the
// log after it). Token ids are checked by deferred checks, so a bad id is reported by that copy.
// Checkpoints are written from host copies of the tensors (train/checkpoint.hpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/data/batching.hpp"
#include "mixmoe/loss/load_balance.hpp"
#include "mixmoe/moe/moe_layer.hpp"
#include "mixmoe/nn/module.hpp"
#include "mixmoe/ops/cross_entropy.hpp"
#include "mixmoe/train/checkpoint.hpp"
#include "mixmoe/train/clip.hpp"
#include "mixmoe/train/lm_loss.hpp"
#include "mixmoe/train/metrics_log.hpp"
#include "mixmoe/train/optimizer.hpp"
#include "mixmoe/train/progress.hpp"
#include "mixmoe/train/schedule.hpp"
#include "mixmoe/train/step_guard.hpp"

namespace mixmoe {

/// What train_loop needs of its data: batches, and a position that can be saved and restored
/// (TokenBudgetBatcher and LMBlockStream are sources).
template <class S>
concept BatchSource = requires(S& s, const BatcherState& st) {
  { s.next() } -> std::same_as<Batch>;
  { s.state() } -> std::same_as<BatcherState>;
  s.set_state(st);
};

/// The result of an evaluation: `score` decides what "better" means (higher is better; use
/// -loss for a loss), `metrics` are logged and shown.
struct EvalResult {
  double score = 0.0;
  std::vector<std::pair<std::string, double>> metrics;
};

struct LoopOptions {
  std::string stage = "train";   // names the run in the progress line, the log and the checkpoints
  std::int64_t steps = 1000;     // optimizer steps (skipped steps count too)
  WarmupCosine schedule{};       // total_steps <= 1 is replaced by `steps`
  double clip_norm = 1.0;        // global gradient norm limit; <= 0: no clipping
  double label_smoothing = 0.0;  // of the cross-entropy
  double load_balance = 0.01;    // weight of load_balance_loss (MoE models only)
  double z_loss = 0.001;         // weight of router_z_loss (MoE models only)
  std::int64_t eval_every = 0;   // steps between evaluations; 0: only after the last step
  int patience = 0;              // evaluations without a better score before stopping; 0: never stop early
  std::int64_t checkpoint_every = 0;     // steps between training checkpoints; 0: at every evaluation
  std::filesystem::path checkpoint_dir;  // empty: no checkpoints, no resuming
  bool resume = true;                    // continue from <checkpoint_dir>/last when it is there
  std::string model_type = "mixmoe";     // recorded in the checkpoints' config.json
  nlohmann::json checkpoint_extra = nlohmann::json::object();  // recorded too (tokenizer, languages, ...)
  std::int64_t log_every = 10;           // steps between "train" lines of the metrics log
  StepGuardOptions guard{};
  ProgressOptions progress{};
  std::ostream* out = &std::cerr;  // progress and messages; nullptr: silent
  MetricsLog* metrics = nullptr;   // nullptr: no log
};

struct LoopResult {
  std::int64_t steps = 0;           // steps done, this run and any resumed one
  std::int64_t resumed_from = -1;   // the step resumed from, or -1
  std::int64_t skipped_steps = 0;   // non-finite steps skipped
  std::int64_t tokens = 0;          // target tokens trained on, this run only
  double seconds = 0.0;             // wall time, this run only
  double last_loss = NAN;           // the mean training loss of the last log interval
  std::optional<double> best_score;  // the best evaluation score
  std::int64_t best_step = -1;      // ... and its step
  bool stopped_early = false;
  std::vector<std::pair<std::string, double>> last_eval;  // metrics of the last evaluation
};

namespace detail {

/// The data position in a TrainState: epoch and batch in data_position, the order's generator
/// under rng["data"].
inline void store_batcher_state(TrainState& st, const BatcherState& s) {
  st.data_position = {{"epoch", s.epoch}, {"batch", s.batch}};
  st.rng["data"] = s.generator;
}

inline BatcherState load_batcher_state(const TrainState& st, const std::string& where) {
  const nlohmann::json& j = st.data_position;
  MIXMOE_CHECK(j.is_object() && j.contains("epoch") && j.contains("batch") && st.rng.count("data") == 1, "train_loop",
               where, ": the checkpoint's data position is malformed: ", j.dump());
  BatcherState s;
  s.epoch = j.at("epoch").get<std::uint64_t>();
  s.batch = j.at("batch").get<std::uint64_t>();
  s.generator = st.rng.at("data");
  return s;
}

/// {loss, ce, extra (0 without), gradient norm, clipping scale} as host doubles, read in one copy
/// (on a device: one synchronisation). norm_scale is clip_grad_norm_async's (2) tensor.
template <Scalar T, Device D>
std::vector<double> step_numbers(const Tensor<T, D>& loss, const Tensor<T, D>& ce, const Tensor<T, D>* extra,
                                 const Tensor<double, D>& norm_scale) {
  auto pack = Tensor<double, D>::zeros({5});
  const auto put = [&](index_t at, const Tensor<T, D>& v) {
    pack.slice(0, at, at + 1).copy_from(v.reshape(Shape{1}).template to<double>());
  };
  put(0, loss);
  put(1, ce);
  if (extra) put(2, *extra);
  pack.slice(0, 3, 5).copy_from(norm_scale);
  return pack.to_vector();
}

}  // namespace detail

/// Trains `model` with `opt` on batches of `data` as the header comment describes. `eval` may be
/// empty (no evaluations, no best checkpoint). `extra_loss` may be empty; when given, its scalar
/// is added to the loss of every step (logged as "extra"). Throws TrainingDiverged when too many
/// steps in a row were non-finite; <checkpoint_dir>/last then still holds the last good state.
template <Module Model, Scalar T, Device D, BatchSource Source>
LoopResult train_loop(Model& model, AdamW<T, D>& opt, Source& data, const LoopOptions& o,
                      const std::function<EvalResult(Model&)>& eval = {},
                      const std::function<Var<T, D>(Model&, const Batch&)>& extra_loss = {}) {
  constexpr const char* where = "train_loop";
  MIXMOE_CHECK(o.steps >= 0, where, "steps must be >= 0, got ", o.steps);
  MIXMOE_CHECK(o.eval_every >= 0 && o.checkpoint_every >= 0 && o.log_every >= 0 && o.patience >= 0, where,
               "eval_every, checkpoint_every, log_every and patience must be >= 0");
  WarmupCosine schedule = o.schedule;
  if (schedule.total_steps <= 1) schedule.total_steps = std::max<std::int64_t>(o.steps, 1);
  schedule.warmup_steps = std::min(schedule.warmup_steps, schedule.total_steps);
  schedule.validate();

  const bool moe = count_moe_layers(model) > 0;
  const std::vector<Var<T, D>> params = opt.parameters();
  StepGuardOptions guard_opt = o.guard;
  if (!o.out) guard_opt.warn = nullptr;
  StepGuard guard(guard_opt);
  const std::filesystem::path last_dir = o.checkpoint_dir.empty() ? std::filesystem::path{} : o.checkpoint_dir / "last";
  const std::filesystem::path best_dir = o.checkpoint_dir.empty() ? std::filesystem::path{} : o.checkpoint_dir / "best";

  LoopResult res;
  std::int64_t step = 0;
  int evals_without_gain = 0;

  // ---- resume ------------------------------------------------------------------------------
  if (!last_dir.empty() && o.resume && std::filesystem::exists(last_dir)) {
    TrainState st = load_training_state(last_dir, model, opt);
    const std::string saved_stage = st.extra.value("stage", std::string{});
    MIXMOE_CHECK(saved_stage == o.stage, where, "the checkpoint in ", last_dir.string(), " is of stage '",
                 saved_stage, "', not '", o.stage, "': use another checkpoint directory or remove it");
    step = st.global_step;
    data.set_state(detail::load_batcher_state(st, last_dir.string()));
    guard.restore(st.skipped_steps, static_cast<int>(st.extra.value("skipped_consecutive", 0)));
    res.best_score = st.best_validation;
    res.best_step = st.extra.value("best_step", std::int64_t{-1});
    res.stopped_early = st.extra.value("stopped_early", false);
    evals_without_gain = st.extra.value("evals_without_gain", 0);
    res.resumed_from = step;
    if (o.metrics) o.metrics->truncate_after(step);
    if (o.out)
      *o.out << o.stage << ": resumed from " << last_dir.string() << " at step " << step << " of " << o.steps
             << '\n';
  }

  const auto save_last = [&](std::int64_t at) {
    if (last_dir.empty()) return;
    TrainState st;
    st.global_step = at;
    detail::store_batcher_state(st, data.state());
    st.best_validation = res.best_score;
    st.skipped_steps = guard.skipped_total();
    st.extra = {{"stage", o.stage},
                {"skipped_consecutive", guard.skipped_consecutive()},
                {"best_step", res.best_step},
                {"stopped_early", res.stopped_early},
                {"evals_without_gain", evals_without_gain}};
    std::filesystem::create_directories(o.checkpoint_dir);
    save_training_state(last_dir, model, opt, st, o.model_type, o.checkpoint_extra);
  };

  const auto log_event = [&](nlohmann::ordered_json ev) {
    if (o.metrics) o.metrics->write(ev);
  };

  // Returns whether training should stop (early stopping).
  const auto evaluate = [&](std::int64_t at) {
    if (!eval) return false;
    EvalResult r;
    {
      no_grad ng;
      r = eval(model);
    }
    res.last_eval = r.metrics;
    nlohmann::ordered_json ev{{"stage", o.stage}, {"step", at}, {"split", "dev"}, {"score", r.score}};
    for (const auto& [k, v] : r.metrics) ev[k] = v;
    const bool better = !res.best_score || r.score > *res.best_score;
    if (better) {
      res.best_score = r.score;
      res.best_step = at;
      evals_without_gain = 0;
      if (!best_dir.empty()) {
        std::filesystem::create_directories(o.checkpoint_dir);
        nlohmann::json extra = o.checkpoint_extra.is_object() ? o.checkpoint_extra : nlohmann::json::object();
        extra["stage"] = o.stage;
        extra["step"] = at;
        save_model(model, best_dir, o.model_type, extra);
      }
    } else {
      ++evals_without_gain;
    }
    ev["best"] = better;
    log_event(ev);
    if (o.out) {
      *o.out << o.stage << " step " << at << ": dev";
      for (const auto& [k, v] : r.metrics) *o.out << ' ' << k << ' ' << v;
      *o.out << (better ? "  (best so far)" : "") << '\n';
    }
    return o.patience > 0 && evals_without_gain >= o.patience;
  };

  if (res.stopped_early || step >= o.steps) {
    res.steps = step;
    res.skipped_steps = guard.skipped_total();
    return res;
  }

  // ---- the loop ------------------------------------------------------------------------------
  ProgressOptions popt = o.progress;
  popt.start_at = step;
  std::optional<Progress> bar;
  std::int64_t bar_tokens = 0;  // res.tokens when the bar was made (a bar counts its own tokens)
  if (o.out) bar.emplace(o.steps, o.stage, *o.out, popt);
  const auto t0 = std::chrono::steady_clock::now();
  double interval_loss = 0.0, interval_ce = 0.0, interval_extra = 0.0;
  std::int64_t interval_steps = 0;
  CrossEntropyOptions ce_opt;
  ce_opt.label_smoothing = o.label_smoothing;

  while (step < o.steps) {
    const Batch batch = data.next();
    const double lr = apply_schedule(opt, schedule, step);
    auto sup = supervised_logits(model, batch, ce_opt.ignore_index);  // only the positions with a loss
    auto ce = cross_entropy(sup.logits, sup.targets, ce_opt);
    Var<T, D> loss = ce;
    if (moe) {
      if (o.load_balance != 0) {
        auto lb = load_balance_loss(model);
        loss = loss + lb * o.load_balance;
      }
      if (o.z_loss != 0) {
        auto z = router_z_loss(model);
        loss = loss + z * o.z_loss;
      }
    }
    Var<T, D> extra;
    if (extra_loss) {
      extra = extra_loss(model, batch);
      MIXMOE_CHECK(extra.value().numel() == 1, where, "extra_loss must return a scalar, got shape ",
                   extra.value().shape());
      loss = loss + extra;
    }
    loss.backward();
    // The step's numbers, read together: on a device the step's one synchronisation.
    const std::vector<double> numbers =
        detail::step_numbers(loss.value(), ce.value(), extra_loss ? &extra.value() : nullptr,
                             clip_grad_norm_async(params, o.clip_norm));
    const double loss_value = numbers[0], ce_value = numbers[1], extra_value = numbers[2];
    const GradNorm gn{numbers[3], numbers[4] != 1.0, numbers[4]};
    if (guard.check(loss_value, gn.norm, params, step)) {
      opt.step();
      interval_loss += loss_value;
      interval_ce += ce_value;
      interval_extra += extra_value;
      ++interval_steps;
    }
    opt.zero_grad();
    release_routing_graphs(model);
    ++step;
    res.tokens += batch.target_tokens;

    const bool log_now = o.log_every > 0 && (step % o.log_every == 0 || step == o.steps);
    if (log_now && interval_steps > 0) {
      res.last_loss = interval_loss / static_cast<double>(interval_steps);
      nlohmann::ordered_json ev{{"stage", o.stage},
                                {"step", step},
                                {"split", "train"},
                                {"loss", res.last_loss},
                                {"ce", interval_ce / static_cast<double>(interval_steps)},
                                {"lr", lr},
                                {"grad_norm", gn.norm},
                                {"skipped", guard.skipped_total()}};
      if (extra_loss) ev["extra"] = interval_extra / static_cast<double>(interval_steps);
      log_event(std::move(ev));
      interval_loss = interval_ce = interval_extra = 0.0;
      interval_steps = 0;
    }
    if (bar)
      bar->update(step, {{"loss", std::isnan(res.last_loss) ? loss_value : res.last_loss}, {"lr", lr}},
                  res.tokens - bar_tokens);

    bool stop = false;
    const bool eval_now = eval && ((o.eval_every > 0 && step % o.eval_every == 0) || step == o.steps);
    if (eval_now) {
      if (bar) bar->finish();
      stop = evaluate(step);
      if (stop) res.stopped_early = true;
      if (bar && !stop && step < o.steps) {
        popt.start_at = step;
        bar.emplace(o.steps, o.stage, *o.out, popt);
        bar_tokens = res.tokens;
      }
    }
    const bool ckpt_now = (o.checkpoint_every > 0 && step % o.checkpoint_every == 0) ||
                          (o.checkpoint_every == 0 && eval_now) || step == o.steps || stop;
    if (ckpt_now) save_last(step);
    if (stop) {
      if (o.out)
        *o.out << o.stage << ": stopping early at step " << step << ": no better dev score in " << o.patience
               << " evaluations (best " << *res.best_score << " at step " << res.best_step << ")\n";
      break;
    }
  }
  if (bar) bar->finish();
  res.steps = step;
  res.skipped_steps = guard.skipped_total();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace mixmoe
