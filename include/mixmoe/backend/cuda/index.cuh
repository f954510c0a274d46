// The index part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): gather, scatter, embedding, the shape ops and dropout (ops/index.hpp, embedding.hpp, shape_ops.hpp, dropout.hpp).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

struct IndexOps {};

}  // namespace mixmoe::cuda
