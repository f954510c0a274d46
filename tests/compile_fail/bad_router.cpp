// Must NOT compile: a user's router that misses one member of the Router concept (chosen by
// a BAD_ROUTER_* macro). The build is expected to fail with check_router's one-line message,
// e.g. "a Router needs `index_t num_experts() const`"; the test passes on that message.
#include <mixmoe/moe/fourier_features.hpp>
#include <mixmoe/moe/hash_router.hpp>
#include <mixmoe/moe/router_check.hpp>

#include <string>

namespace {

using namespace mixmoe;

struct BadRouter {
#ifndef BAD_ROUTER_NO_VALUE_TYPE
  using value_type = float;
#endif
  using device_type = Cpu;
#ifndef BAD_ROUTER_NO_CONSTRUCTOR
  BadRouter(const RouterShape&, Generator&) {}
#endif
#ifndef BAD_ROUTER_NO_CALL
  Routing<float> operator()(const Var<float>&, const RouteContext<Cpu>&) const { return {}; }
#endif
#ifndef BAD_ROUTER_NO_NUM_EXPERTS
  [[nodiscard]] index_t num_experts() const { return 1; }
#endif
#ifndef BAD_ROUTER_NO_VISIT
  void visit_parameters(const ParameterVisitor<float, Cpu>&, const std::string&) {}
#endif
};

}  // namespace

int main() {
  Generator gen(0);
#if defined(BAD_ROUTER_NO_LOGITS)
  // A complete Router, but not a LogitRouter: FourierFeatures cannot wrap it.
  using R = bind_router_t<FourierFeatures<BadRouter, transform::DCT>, float, Cpu>;
#elif defined(BAD_ROUTER_HASH_WRAPPED)
  using R = bind_router_t<FourierFeatures<HashRouting, transform::DCT>, float, Cpu>;
#else
  using R = checked_router_t<BadRouter, float, Cpu>;
#endif
  R router(RouterShape{4, 2, 1}, gen);
  return static_cast<int>(router.num_experts());
}
