// The smallest mixmoe program: fit y = 3x - 1 with one linear layer.
#include <mixmoe/mixmoe.hpp>

#include <cstdio>

int main() {
  using namespace mixmoe;
  Generator gen(0);
  auto x = Tensor<float>::uniform({64, 1}, gen, -1, 1);
  auto y = Tensor<float>::empty({64, 1});
  for (index_t i = 0; i < 64; ++i) y(i, 0) = 3 * x(i, 0) - 1;
  auto w = parameter(Tensor<float>::zeros({1, 1}));
  auto b = parameter(Tensor<float>::zeros({1}));
  for (int step = 0; step <= 200; ++step) {
    auto err = linear(Var<float>(x), w, b) - Var<float>(y);
    auto loss = mean(err * err);
    loss.backward();
    {
      no_grad ng;
      for (auto* p : {&w, &b}) {
        for (index_t i = 0; i < p->numel(); ++i) p->value().data()[i] -= 0.1f * p->grad().data()[i];
        p->zero_grad();
      }
    }
    if (step % 50 == 0) std::printf("step %3d  loss %.6f  w %.4f  b %.4f\n", step, loss.item(), w.value()(0, 0), b.value()(0));
  }
  return 0;
}
