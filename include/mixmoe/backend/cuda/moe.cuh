// The moe part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): MoE dispatch on the device: tokens sorted by expert, per-expert GEMMs, weighted combine (moe/).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

struct MoEOps {};

}  // namespace mixmoe::cuda
