// The rows part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): softmax, log_softmax, the norms, cross-entropy, reductions and top-k (ops/softmax.hpp, norm.hpp, cross_entropy.hpp, reduce.hpp, topk.hpp).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

struct RowOps {};

}  // namespace mixmoe::cuda
