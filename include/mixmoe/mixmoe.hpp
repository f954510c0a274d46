// The one include for users of mixmoe.
#pragma once

#include "mixmoe/core/allocator.hpp"
#include "mixmoe/core/device.hpp"
#include "mixmoe/core/error.hpp"
#include "mixmoe/core/random.hpp"
#include "mixmoe/core/shape.hpp"
#include "mixmoe/core/tensor.hpp"

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/autograd/gradcheck.hpp"
#include "mixmoe/autograd/var.hpp"

#include "mixmoe/ops/attention.hpp"
#include "mixmoe/ops/cross_entropy.hpp"
#include "mixmoe/ops/dropout.hpp"
#include "mixmoe/ops/elementwise.hpp"
#include "mixmoe/ops/embedding.hpp"
#include "mixmoe/ops/fft.hpp"
#include "mixmoe/ops/index.hpp"
#include "mixmoe/ops/matmul.hpp"
#include "mixmoe/ops/norm.hpp"
#include "mixmoe/ops/reduce.hpp"
#include "mixmoe/ops/rope.hpp"
#include "mixmoe/ops/shape_ops.hpp"
#include "mixmoe/ops/softmax.hpp"
#include "mixmoe/ops/topk.hpp"
#include "mixmoe/ops/unary.hpp"

#include "mixmoe/train/optimizer.hpp"
