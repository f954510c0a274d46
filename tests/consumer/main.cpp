// Uses the installed package: a linear model's gradient against the closed form.
#include <mixmoe/mixmoe.hpp>

#include <cmath>
#include <cstdio>

int main() {
  using namespace mixmoe;
  Generator gen(7);
  auto x = Var<float>(Tensor<float>::randn({4, 3}, gen));
  auto w = parameter(Tensor<float>::randn({2, 3}, gen));
  auto loss = sum(linear(x, w));
  loss.backward();
  // d sum(x W^T) / dW[j, c] = sum_r x[r, c]
  for (int j = 0; j < 2; ++j)
    for (int c = 0; c < 3; ++c) {
      float expect = 0;
      for (int r = 0; r < 4; ++r) expect += x.value()(r, c);
      if (std::abs(w.grad()(j, c) - expect) > 1e-5f) {
        std::printf("consumer: wrong gradient at (%d, %d): %f vs %f\n", j, c, w.grad()(j, c), expect);
        return 1;
      }
    }
  std::printf("consumer: ok (gemm backend %s)\n", cpu::gemm_backend());
  return 0;
}
