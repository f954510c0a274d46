// The attention part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): fused causal attention, rotary positions and the Fourier features (ops/attention.hpp, rope.hpp, fft.hpp).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

struct AttentionOps {};

}  // namespace mixmoe::cuda
