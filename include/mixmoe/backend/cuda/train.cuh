// The train part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): optimizer steps, gradient clipping and the training loss (train/).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

struct TrainOps {};

}  // namespace mixmoe::cuda
