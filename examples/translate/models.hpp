// The model types of mixmoe-translate's comparison, shared with the other example trainers
// that load its checkpoints (examples/ramoe). A checkpoint's config.json names its type
// ("model_type": dense, moe, mix-fft, mix-dct, mix-random).
#pragma once

#include <mixmoe/moe/expert_group.hpp>
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/mixed_moe.hpp>
#include <mixmoe/moe/top_k_router.hpp>
#include <mixmoe/nn/attention.hpp>
#include <mixmoe/nn/decoder.hpp>
#include <mixmoe/nn/ffn.hpp>

namespace mixmoe_examples {

using namespace mixmoe;

using Attn = CausalSelfAttention<float>;
using Expert = SwiGLU<float>;
using LMExperts = ExpertGroup<Expert, tag::lm>;
using MTExperts = ExpertGroup<Expert, tag::mt>;
using DenseLM = DecoderLM<Attn, Expert>;
template <class Transform>
using MixFFN = MixedMoE<FourierFeatures<TopK<>, Transform>, LMExperts, MTExperts>;
using MixFFT = DecoderLM<Attn, MixFFN<transform::FFTMagnitude<>>>;
using MixDCT = DecoderLM<Attn, MixFFN<transform::DCT>>;
using MixRandom = DecoderLM<Attn, MixFFN<transform::RandomProjection>>;
using VanillaMoE = DecoderLM<Attn, MixedMoE<TopK<>, LMExperts, MTExperts>>;  // one shared router

}  // namespace mixmoe_examples
