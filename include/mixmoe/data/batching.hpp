// Training batches of token ids for causal language models.
//
//   Example:            one token sequence; the loss covers only positions >= target_begin
//                       (a translation prompt "<2de> source <sep> target </s>": target and eos)
//   collate:            examples -> Batch {inputs (B, T), targets (B, T)}, shifted by one
//                       (inputs = ids[:-1], targets = ids[1:]), right-padded with pad_id; targets
//                       on prompt and padding positions are ignore_index
//   TokenBudgetBatcher: length-sorted batches whose B * T stays within a token budget, batch order
//                       shuffled per epoch by a seeded Generator; resumable (BatcherState)
//   LMBlockStream:      monolingual text as one stream, sentence after sentence with eos between,
//                       cut into blocks of T + 1 tokens; B blocks per batch; resumable
//
// Padding is on the right, so under causal attention no real token attends to a pad, and the
// pads' targets are ignore_index: a padded batch gives the same loss as its rows one by one.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "mixmoe/core/device.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/core/tensor.hpp"

namespace mixmoe {

/// One training sequence. Position p of ids is a target (is predicted from ids[0..p-1]) when
/// p >= max(target_begin, 1): target_begin = 0 trains on every next token (language modelling);
/// for a translation example it is the index of the first target token after the prompt.
struct Example {
  std::vector<index_t> ids;
  index_t target_begin = 0;
};

/// A batch for a causal LM: feed `inputs` to the model and take cross_entropy(logits, targets)
/// with the same ignore_index (the default of CrossEntropyOptions, -100).
struct Batch {
  Tensor<Index> inputs;              // (B, T): ids[:-1] of each example, right-padded with pad_id
  Tensor<Index> targets;             // (B, T): ids[1:], ignore_index on prompt and padding positions
  index_t tokens = 0;                // real (non-padding) positions of inputs
  index_t target_tokens = 0;         // positions of targets that are not ignore_index (the loss count)
  std::vector<index_t> example_ids;  // row b came from example (or block) example_ids[b] of the source
};

/// Where a batcher is: `generator` is the state of its generator at the start of epoch `epoch`
/// (before that epoch's order was drawn) and `batch` the next batch within the epoch. Restoring
/// it in a batcher built from the same data and options continues with the same batches.
struct BatcherState {
  std::uint64_t epoch = 0;
  std::uint64_t batch = 0;
  Generator::State generator{};
};

namespace detail {

/// Fisher-Yates with mixmoe's Generator (the same permutation on every platform).
template <class T>
void shuffle_in_place(std::vector<T>& v, Generator& gen) {
  for (std::size_t i = v.size(); i > 1; --i) {
    const auto j = static_cast<std::size_t>(gen.below(i));
    std::swap(v[i - 1], v[j]);
  }
}

/// Collates examples[rows[b]] into row b; the examples are assumed validated.
inline Batch collate_rows(std::span<const Example> examples, std::span<const index_t> rows,
                          std::span<const index_t> ids, index_t pad_id, Index ignore_index) {
  const auto b = static_cast<index_t>(rows.size());
  index_t t = 0;
  for (index_t r : rows) t = std::max(t, static_cast<index_t>(examples[static_cast<std::size_t>(r)].ids.size()) - 1);
  Batch batch;
  batch.inputs = Tensor<Index>::full({b, t}, static_cast<Index>(pad_id));
  batch.targets = Tensor<Index>::full({b, t}, ignore_index);
  Index* in = batch.inputs.data();
  Index* tg = batch.targets.data();
  for (index_t row = 0; row < b; ++row) {
    const Example& ex = examples[static_cast<std::size_t>(rows[static_cast<std::size_t>(row)])];
    const auto len = static_cast<index_t>(ex.ids.size());
    for (index_t p = 0; p + 1 < len; ++p) {
      in[row * t + p] = static_cast<Index>(ex.ids[static_cast<std::size_t>(p)]);
      if (p + 1 >= ex.target_begin) {
        tg[row * t + p] = static_cast<Index>(ex.ids[static_cast<std::size_t>(p + 1)]);
        ++batch.target_tokens;
      }
    }
    batch.tokens += len - 1;
    batch.example_ids.push_back(ids.empty() ? rows[static_cast<std::size_t>(row)] : ids[static_cast<std::size_t>(row)]);
  }
  return batch;
}

/// Checks one example: at least 2 ids, every id in [0, 2^31 - 1], at least one target position.
inline void check_example(const Example& ex, std::size_t which, const char* where) {
  const auto len = static_cast<index_t>(ex.ids.size());
  MIXMOE_CHECK(len >= 2, where, "example ", which, " has ", len, " ids; a training example needs at least 2");
  MIXMOE_CHECK(ex.target_begin >= 0 && ex.target_begin < len, where, "example ", which, ": target_begin ",
               ex.target_begin, " leaves no target among its ", len, " ids (it must be in [0, ", len - 1, "])");
  for (index_t p = 0; p < len; ++p) {
    const index_t id = ex.ids[static_cast<std::size_t>(p)];
    MIXMOE_CHECK(id >= 0 && id <= std::numeric_limits<Index>::max(), where, "example ", which, ": id ", id,
                 " at position ", p, " is not a token id");
  }
}

}  // namespace detail

/// Collates examples into one batch, T = the longest example's length - 1 (see Batch).
inline Batch collate(std::span<const Example> examples, index_t pad_id = 0, Index ignore_index = -100) {
  MIXMOE_CHECK(!examples.empty(), "collate", "no examples");
  MIXMOE_CHECK(pad_id >= 0 && pad_id <= std::numeric_limits<Index>::max(), "collate", "pad_id ", pad_id,
               " is not a token id");
  for (std::size_t i = 0; i < examples.size(); ++i) detail::check_example(examples[i], i, "collate");
  std::vector<index_t> rows(examples.size());
  std::iota(rows.begin(), rows.end(), index_t{0});
  return detail::collate_rows(examples, rows, {}, pad_id, ignore_index);
}

struct BatcherOptions {
  index_t token_budget = 4096;  // every batch has B * T <= token_budget (T: its padded input length)
  index_t max_len = 256;        // ids per example (prompt + target + eos) at most
  bool truncate = false;        // longer examples: false drops them, true keeps their first max_len ids
  index_t max_batch_size = 0;   // rows per batch at most; 0: only the budget limits
  index_t pad_id = 0;           // Tokenizer::kPadId
  Index ignore_index = -100;    // CrossEntropyOptions{}.ignore_index
  std::uint64_t seed = 0;       // of the per-epoch order
  bool shuffle = true;          // false: the same length-sorted batches in every epoch (evaluation)
};

/// What the batcher did with its input examples.
struct BatcherStats {
  index_t kept = 0;       // examples in the epochs (truncated ones included)
  index_t truncated = 0;  // longer than max_len, cut (options.truncate)
  index_t dropped = 0;    // longer than max_len and dropped, or truncated to no target token
};

/// Length-bucketed batches under a token budget. Each epoch: the kept examples are shuffled,
/// stably sorted by length (so equal lengths come in a new order each epoch), cut greedily into
/// batches (an example joins while (rows + 1) * its length - 1 stays within the budget: the list
/// is ascending, so the newcomer is the longest), and the batch order is shuffled. Every kept
/// example appears exactly once per epoch. next() rolls over into the next epoch by itself.
class TokenBudgetBatcher {
 public:
  TokenBudgetBatcher(std::vector<Example> examples, BatcherOptions options) : opt_(options), gen_(options.seed) {
    constexpr const char* where = "TokenBudgetBatcher";
    MIXMOE_CHECK(!examples.empty(), where, "no examples");
    MIXMOE_CHECK(opt_.max_len >= 2, where, "max_len ", opt_.max_len, " is below 2 (an input and a target)");
    MIXMOE_CHECK(opt_.token_budget >= 1, where, "token_budget ", opt_.token_budget, " is not positive");
    MIXMOE_CHECK(opt_.max_batch_size >= 0, where, "max_batch_size ", opt_.max_batch_size, " is negative");
    MIXMOE_CHECK(opt_.pad_id >= 0 && opt_.pad_id <= std::numeric_limits<Index>::max(), where, "pad_id ", opt_.pad_id,
                 " is not a token id");
    index_t longest = 0;
    std::size_t longest_at = 0;
    for (std::size_t i = 0; i < examples.size(); ++i) {
      Example& ex = examples[i];
      detail::check_example(ex, i, where);
      if (static_cast<index_t>(ex.ids.size()) > opt_.max_len) {
        if (!opt_.truncate || ex.target_begin >= opt_.max_len) {
          ++stats_.dropped;
          continue;
        }
        ex.ids.resize(static_cast<std::size_t>(opt_.max_len));
        ++stats_.truncated;
      }
      if (static_cast<index_t>(ex.ids.size()) > longest) {
        longest = static_cast<index_t>(ex.ids.size());
        longest_at = i;
      }
      source_ids_.push_back(static_cast<index_t>(i));
      examples_.push_back(std::move(ex));
    }
    stats_.kept = static_cast<index_t>(examples_.size());
    MIXMOE_CHECK(!examples_.empty(), where, "all ", examples.size(), " examples are longer than max_len ", opt_.max_len,
                 (opt_.truncate ? " with no target token in their first max_len ids" : " and were dropped"));
    MIXMOE_CHECK(longest - 1 <= opt_.token_budget, where, "token_budget ", opt_.token_budget,
                 " is smaller than one example: example ", longest_at, " has ", longest - 1,
                 " input tokens (raise the budget or lower max_len, now ", opt_.max_len, ")");
    start_ = gen_.state();
    plan_epoch();
  }

  /// The next batch; after the last batch of an epoch comes the first of the next one.
  Batch next() {
    if (batch_ == plan_.size()) {
      ++epoch_;
      start_ = gen_.state();
      plan_epoch();
    }
    const std::vector<index_t>& rows = plan_[batch_++];
    std::vector<index_t> ids(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) ids[i] = source_ids_[static_cast<std::size_t>(rows[i])];
    return detail::collate_rows(examples_, rows, ids, opt_.pad_id, opt_.ignore_index);
  }

  [[nodiscard]] BatcherState state() const { return {epoch_, batch_, start_}; }
  /// Continues from a state() of a batcher made from the same examples and options.
  void set_state(const BatcherState& s) {
    gen_.set_state(s.generator);
    start_ = s.generator;
    epoch_ = s.epoch;
    plan_epoch();
    MIXMOE_CHECK(s.batch <= plan_.size(), "TokenBudgetBatcher::set_state", "batch ", s.batch, " is past the epoch's ",
                 plan_.size(), " batches (a state of different data or options?)");
    batch_ = static_cast<std::size_t>(s.batch);
  }

  [[nodiscard]] std::uint64_t epoch() const { return epoch_; }
  /// Batches of the current epoch already returned.
  [[nodiscard]] std::size_t batch_index() const { return batch_; }
  [[nodiscard]] std::size_t batches_per_epoch() const { return plan_.size(); }
  /// The current epoch's batches as indices into examples().
  [[nodiscard]] const std::vector<std::vector<index_t>>& epoch_plan() const { return plan_; }
  /// The kept examples (truncated where that applies); source_index(i) is example i's input index.
  [[nodiscard]] const std::vector<Example>& examples() const { return examples_; }
  [[nodiscard]] index_t source_index(index_t i) const { return source_ids_.at(static_cast<std::size_t>(i)); }
  [[nodiscard]] const BatcherStats& stats() const { return stats_; }
  [[nodiscard]] const BatcherOptions& options() const { return opt_; }

 private:
  void plan_epoch() {
    std::vector<index_t> order(examples_.size());
    std::iota(order.begin(), order.end(), index_t{0});
    if (opt_.shuffle) detail::shuffle_in_place(order, gen_);
    const auto len = [&](index_t i) { return static_cast<index_t>(examples_[static_cast<std::size_t>(i)].ids.size()); };
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return len(a) < len(b); });
    plan_.clear();
    std::vector<index_t> cur;
    for (index_t i : order) {
      const auto rows = static_cast<index_t>(cur.size());
      const bool fits =
          (rows + 1) * (len(i) - 1) <= opt_.token_budget && (opt_.max_batch_size == 0 || rows < opt_.max_batch_size);
      if (!fits && !cur.empty()) plan_.push_back(std::exchange(cur, {}));
      cur.push_back(i);
    }
    if (!cur.empty()) plan_.push_back(std::move(cur));
    if (opt_.shuffle) detail::shuffle_in_place(plan_, gen_);
    batch_ = 0;
  }

  BatcherOptions opt_;
  std::vector<Example> examples_;
  std::vector<index_t> source_ids_;
  BatcherStats stats_;
  Generator gen_;
  Generator::State start_{};
  std::uint64_t epoch_ = 0;
  std::size_t batch_ = 0;
  std::vector<std::vector<index_t>> plan_;
};

struct LMStreamOptions {
  index_t block_len = 256;  // T: input (and target) positions per row
  index_t batch_size = 8;   // rows per batch; the last batch of an epoch has the remaining blocks
  index_t eos_id = 3;       // Tokenizer::kEosId, appended after every sentence
  std::uint64_t seed = 0;   // of the per-epoch block order
  bool shuffle = true;      // false: blocks in stream order every epoch
};

/// Monolingual LM data: the sentences, each followed by eos, form one token stream that is cut
/// into blocks of T + 1 tokens overlapping by one (block k = stream[k T, k T + T + 1)), so every
/// stream token after the first is a target exactly once per epoch. The tail that does not fill
/// a block is left out (dropped_tokens()). Each epoch the block order is shuffled and taken B at a
/// time. Rows have no padding and no ignored targets; attention runs across sentence boundaries
/// within a block (the eos tells the model where a sentence ended).
class LMBlockStream {
 public:
  LMBlockStream(const std::vector<std::vector<index_t>>& sentences, LMStreamOptions options)
      : opt_(options), gen_(options.seed) {
    constexpr const char* where = "LMBlockStream";
    MIXMOE_CHECK(!sentences.empty(), where, "no sentences");
    MIXMOE_CHECK(opt_.block_len >= 1, where, "block_len ", opt_.block_len, " is not positive");
    MIXMOE_CHECK(opt_.batch_size >= 1, where, "batch_size ", opt_.batch_size, " is not positive");
    MIXMOE_CHECK(opt_.eos_id >= 0 && opt_.eos_id <= std::numeric_limits<Index>::max(), where, "eos_id ", opt_.eos_id,
                 " is not a token id");
    for (std::size_t s = 0; s < sentences.size(); ++s) {
      for (std::size_t p = 0; p < sentences[s].size(); ++p) {
        const index_t id = sentences[s][p];
        MIXMOE_CHECK(id >= 0 && id <= std::numeric_limits<Index>::max(), where, "sentence ", s, ": id ", id,
                     " at position ", p, " is not a token id");
        stream_.push_back(static_cast<Index>(id));
      }
      stream_.push_back(static_cast<Index>(opt_.eos_id));
    }
    const auto n = static_cast<index_t>(stream_.size());
    blocks_ = (n - 1) / opt_.block_len;
    MIXMOE_CHECK(blocks_ >= 1, where, "the ", sentences.size(), " sentences make ", n,
                 " tokens with their eos, fewer than one block of block_len + 1 = ", opt_.block_len + 1);
    start_ = gen_.state();
    plan_epoch();
  }

  /// The next batch (B rows of T); after the last batch of an epoch comes the first of the next one.
  Batch next() {
    if (batch_ * static_cast<std::size_t>(opt_.batch_size) >= order_.size()) {
      ++epoch_;
      start_ = gen_.state();
      plan_epoch();
    }
    const std::size_t first = batch_++ * static_cast<std::size_t>(opt_.batch_size);
    const std::size_t last = std::min(order_.size(), first + static_cast<std::size_t>(opt_.batch_size));
    const auto b = static_cast<index_t>(last - first), t = opt_.block_len;
    Batch batch;
    batch.inputs = Tensor<Index>::empty({b, t});
    batch.targets = Tensor<Index>::empty({b, t});
    for (index_t row = 0; row < b; ++row) {
      const index_t block = order_[first + static_cast<std::size_t>(row)];
      const Index* src = stream_.data() + block * t;
      std::copy(src, src + t, batch.inputs.data() + row * t);
      std::copy(src + 1, src + t + 1, batch.targets.data() + row * t);
      batch.example_ids.push_back(block);
    }
    batch.tokens = batch.target_tokens = b * t;
    return batch;
  }

  [[nodiscard]] BatcherState state() const { return {epoch_, batch_, start_}; }
  /// Continues from a state() of a stream made from the same sentences and options.
  void set_state(const BatcherState& s) {
    gen_.set_state(s.generator);
    start_ = s.generator;
    epoch_ = s.epoch;
    plan_epoch();
    MIXMOE_CHECK(s.batch <= batches_per_epoch(), "LMBlockStream::set_state", "batch ", s.batch, " is past the epoch's ",
                 batches_per_epoch(), " batches (a state of different data or options?)");
    batch_ = static_cast<std::size_t>(s.batch);
  }

  [[nodiscard]] std::uint64_t epoch() const { return epoch_; }
  [[nodiscard]] std::size_t batch_index() const { return batch_; }
  [[nodiscard]] std::size_t batches_per_epoch() const {
    return static_cast<std::size_t>((blocks_ + opt_.batch_size - 1) / opt_.batch_size);
  }
  [[nodiscard]] index_t num_blocks() const { return blocks_; }
  /// Stream tokens (eos included) that are no block's target: the tail after the last whole block.
  [[nodiscard]] index_t dropped_tokens() const {
    return static_cast<index_t>(stream_.size()) - 1 - blocks_ * opt_.block_len;
  }
  /// The concatenated stream: sentence ids, each sentence followed by eos.
  [[nodiscard]] const std::vector<Index>& stream() const { return stream_; }
  [[nodiscard]] const LMStreamOptions& options() const { return opt_; }

 private:
  void plan_epoch() {
    order_.resize(static_cast<std::size_t>(blocks_));
    std::iota(order_.begin(), order_.end(), index_t{0});
    if (opt_.shuffle) detail::shuffle_in_place(order_, gen_);
    batch_ = 0;
  }

  LMStreamOptions opt_;
  std::vector<Index> stream_;
  index_t blocks_ = 0;
  Generator gen_;
  Generator::State start_{};
  std::uint64_t epoch_ = 0;
  std::size_t batch_ = 0;
  std::vector<index_t> order_;
};

}  // namespace mixmoe
