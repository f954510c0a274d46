// Gradient recording mode: on by default, off inside a no_grad scope.
#pragma once

namespace mixmoe {

namespace detail {
inline bool& grad_mode_flag() {
  thread_local bool enabled = true;
  return enabled;
}
}  // namespace detail

/// True when ops record the graph on this thread.
inline bool grad_enabled() { return detail::grad_mode_flag(); }

/// RAII scope in which ops do not record the graph (inference, evaluation,
/// optimizer updates). Nests; restores the previous mode on exit.
class no_grad {
 public:
  no_grad() : previous_(detail::grad_mode_flag()) { detail::grad_mode_flag() = false; }
  ~no_grad() { detail::grad_mode_flag() = previous_; }
  no_grad(const no_grad&) = delete;
  no_grad& operator=(const no_grad&) = delete;

 private:
  bool previous_;
};

/// RAII scope that turns recording back on inside a no_grad scope.
class enable_grad {
 public:
  enable_grad() : previous_(detail::grad_mode_flag()) { detail::grad_mode_flag() = true; }
  ~enable_grad() { detail::grad_mode_flag() = previous_; }
  enable_grad(const enable_grad&) = delete;
  enable_grad& operator=(const enable_grad&) = delete;

 private:
  bool previous_;
};

}  // namespace mixmoe
