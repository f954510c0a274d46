// Run-time sizes of a model. The structure (kind of attention, FFN, expert,
// router, device) is in the types; everything here can change without recompiling.
#pragma once

#include <cstdint>
#include <vector>

#include "mixmoe/core/error.hpp"
#include "mixmoe/core/shape.hpp"

namespace mixmoe {

/// How a MixedMoE layer combines its expert groups (see moe/mixed_moe.hpp).
enum class GroupMix {
  shared_router,  // one router over the experts of all groups, top-k across them
  group_gate,     // a router per group, top-k within it, mixed by a learned per-token gate softmax(x Wg^T)
  fixed,          // a router per group, mixed with the constant weights fixed_mix
};

/// How an MoE layer runs its experts (see moe/mixed_moe.hpp). The results are the same up to
/// floating-point rounding; what differs is the work and the waits.
enum class ExpertExecution {
  automatic,   // grouped on a device (no host synchronisation), per_expert on Cpu (no weight copies)
  grouped,     // every expert in one grouped GEMM over its stacked weights (when the expert type allows)
  per_expert,  // one call of each expert on its block of rows (needs the row counts on the host)
};

/// The operand precision of a GEMM: native (the scalar type's own, fp32 or fp64), or bf16 operands
/// (float only: rounded to bf16, nearest even) with fp32 accumulation, the tensor-core precision.
enum class MatmulPrecision {
  native,
  bf16,
};

/// The storage type of a float model's activations (mixed precision, docs/mixed-precision.md):
/// native (the model's scalar type), or bf16: each block's norms, attention, projections and dense
/// FFN run on bf16 values with fp32 compute, the fp32 weights cast to bf16 for each op; the
/// residual stream, the embeddings, the logits and the loss stay fp32. MoE layers see their input
/// in fp32 (the routers run in fp32); moe.expert_precision bf16 puts their experts on bf16 too.
enum class ActivationPrecision {
  native,
  bf16,
};

/// Sizes of the MoE FFN layers (read by MoE FFN types; dense models ignore it).
struct MoEConfig {
  std::vector<index_t> experts_per_group{8};  // one entry per expert group, in the group order of the type
  index_t expert_hidden = 0;                  // hidden width of one expert; 0 = d_ff / experts in its group
  index_t top_k = 2;                          // experts per token (per group for per-group routing)
  double capacity_factor = 0.0;               // 0 = dropless; > 0 = capacity mode with token dropping
  GroupMix mix = GroupMix::group_gate;        // combination of the groups (ignored with one group)
  std::vector<double> fixed_mix{};            // GroupMix::fixed: one weight per group; empty = 1 / groups each
  ExpertExecution execution = ExpertExecution::automatic;  // grouped or per-expert GEMMs (a speed choice)
  MatmulPrecision expert_precision = MatmulPrecision::native;  // bf16: the experts on bf16 (GEMMs and storage)
};

struct ModelConfig {
  index_t vocab = 8000;
  index_t d_model = 256;
  index_t layers = 4;
  index_t heads = 4;
  index_t kv_heads = 0;  // 0 = heads (no grouping); must divide heads
  index_t d_ff = 1024;   // hidden width of the dense FFN
  double rope_theta = 10000.0;
  double norm_eps = 1e-6;
  double init_std = 0.02;     // embeddings and the residual-branch output projections
  bool tie_embeddings = true;  // output head shares the token embedding
  bool attn_bias = false;      // biases on the q/k/v projections of attention (Qwen2 layout); o has none
  bool qk_norm = false;        // RMSNorm over the whole q and k projections before rotary positions (OLMoE)
  std::uint64_t seed = 0;     // initialisation
  ActivationPrecision activations = ActivationPrecision::native;  // bf16: mixed precision (float models)
  MoEConfig moe{};

  [[nodiscard]] index_t kv_head_count() const { return kv_heads > 0 ? kv_heads : heads; }
  [[nodiscard]] index_t head_dim() const { return d_model / heads; }

  /// Throws naming the first inconsistent size.
  void validate() const {
    MIXMOE_CHECK(vocab > 0 && d_model > 0 && layers > 0 && heads > 0 && d_ff > 0, "ModelConfig",
                 "sizes must be positive (vocab ", vocab, ", d_model ", d_model, ", layers ", layers, ", heads ", heads,
                 ", d_ff ", d_ff, ")");
    MIXMOE_CHECK(d_model % heads == 0, "ModelConfig", "d_model ", d_model, " is not divisible by heads ", heads);
    MIXMOE_CHECK(heads % kv_head_count() == 0, "ModelConfig", "heads ", heads, " is not divisible by kv_heads ",
                 kv_head_count());
    MIXMOE_CHECK(head_dim() % 2 == 0, "ModelConfig", "head size ", head_dim(), " must be even for rotary embeddings");
  }
};

}  // namespace mixmoe
