// Reverse-mode autodiff.
//
// A Var is a handle on a graph node holding a value tensor, its gradient and, for
// op results, the op's backward. Ops record a node as the forward runs (the graph
// is dynamic: routing decides it per batch). Each node gets a sequence number in
// recording order, so backward() visits the reachable nodes in reverse recording
// order, which is a valid reverse topological order: the tape, without a global
// list that outlives the graph. Nodes, their input lists and their tensors come
// from the caching allocators: a warmed-up training step does not call malloc.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixmoe/autograd/grad_mode.hpp"
#include "mixmoe/core/tensor.hpp"

namespace mixmoe {

template <Floating T, Device D = Cpu>
class Var;

namespace autograd {

/// dst += src, same shape, dst contiguous (src may be any layout).
template <class T, class D>
void add_into(const Tensor<T, D>& dst, const Tensor<T, D>& src) {
  MIXMOE_CHECK(dst.shape() == src.shape(), "autograd", "gradient of shape ", src.shape(), " for a value of shape ", dst.shape());
  const Tensor<T, D> s = src.contiguous();
  if constexpr (!Tensor<T, D>::on_host) {
    mixmoe::detail::require_device_ops<D>();
    mixmoe::detail::DeviceOps<D>::add_into(dst.data(), s.data(), dst.numel());
    return;
  }
  T* d = dst.data();
  const T* p = s.data();
  for (index_t i = 0, n = dst.numel(); i < n; ++i) d[i] += p[i];
}

inline std::uint64_t next_sequence() {
  static std::atomic<std::uint64_t> seq{0};
  return ++seq;
}

/// What the backward walk needs of a node, whatever its scalar type: the graph's edges may
/// cross types (cast() links a Var<bf16, D> to the Var<float, D> it came from).
template <Device D>
struct NodeBase {
  using Ptr = std::shared_ptr<NodeBase>;
  using InputList = std::vector<Ptr, PoolAllocator<Ptr>>;

  NodeBase() = default;
  NodeBase(const NodeBase&) = delete;
  NodeBase& operator=(const NodeBase&) = delete;
  virtual ~NodeBase() = default;

  InputList inputs;  // empty for leaves
  const char* op = "leaf";
  std::uint64_t seq = next_sequence();
  std::uint64_t visit_mark = 0;
  bool requires_grad = false;
  bool retain_grad = false;

  [[nodiscard]] bool is_leaf() const { return inputs.empty(); }
  [[nodiscard]] virtual bool has_grad() const = 0;
  virtual void release_grad() = 0;

  /// Runs this node's backward: reads its gradient, accumulates into the inputs' gradients.
  virtual void run_backward() {}
};

template <Floating T, Device D>
struct Node : NodeBase<D> {
  Tensor<T, D> value;
  Tensor<T, D> grad;  // undefined until a gradient flows here

  [[nodiscard]] bool has_grad() const final { return grad.defined(); }
  void release_grad() final { grad = Tensor<T, D>(); }

  /// The gradient buffer, zero-filled on first use (contiguous, value's shape).
  Tensor<T, D>& grad_buffer() {
    if (!grad.defined()) grad = Tensor<T, D>::zeros(value.shape());
    return grad;
  }

  /// Adds g into the gradient; adopts g without a copy when nothing else holds it.
  void accumulate(Tensor<T, D> g) {
    MIXMOE_CHECK(g.shape() == value.shape(), this->op, "gradient of shape ", g.shape(), " for a value of shape ", value.shape());
    if (!grad.defined() && g.is_contiguous() && g.is_unique()) {
      grad = std::move(g);
      return;
    }
    add_into(grad_buffer(), g);
  }
};

/// Input i of a node as the Node<T, D> it is (record() links inputs of the output's type only).
template <Floating T, Device D>
Node<T, D>& input_node(const NodeBase<D>& node, std::size_t i) {
  return static_cast<Node<T, D>&>(*node.inputs[i]);
}

/// What an op's backward function sees: the output gradient and the inputs' buffers.
template <Floating T, Device D>
class BackwardContext {
 public:
  explicit BackwardContext(Node<T, D>& node) : node_(node) {}

  /// dL/d(output): contiguous, the output's shape.
  [[nodiscard]] const Tensor<T, D>& grad_out() const { return node_.grad; }
  /// The op's output value (saved by the graph, no copy).
  [[nodiscard]] const Tensor<T, D>& output() const { return node_.value; }
  /// Whether input i needs a gradient (skip its work when not).
  [[nodiscard]] bool needs_grad(std::size_t i) const { return node_.inputs[i] && node_.inputs[i]->requires_grad; }
  /// Input i's gradient buffer (contiguous, zero on first use): add into it.
  [[nodiscard]] Tensor<T, D>& grad_in(std::size_t i) const { return input_node<T>(node_, i).grad_buffer(); }
  /// Adds g into input i's gradient (no copy when g is a fresh tensor).
  void accumulate(std::size_t i, Tensor<T, D> g) const {
    if (needs_grad(i)) input_node<T>(node_, i).accumulate(std::move(g));
  }
  [[nodiscard]] std::size_t num_inputs() const { return node_.inputs.size(); }

 private:
  Node<T, D>& node_;
};

/// What the backward of an op with inputs of other floating types sees (record_mixed): the output
/// gradient in the output's type, and accumulate<In>(i, g) for input i of type In.
template <Floating Out, Device D>
class MixedBackwardContext {
 public:
  explicit MixedBackwardContext(Node<Out, D>& node) : node_(node) {}
  [[nodiscard]] const Tensor<Out, D>& grad_out() const { return node_.grad; }
  [[nodiscard]] bool needs_grad(std::size_t i) const { return node_.inputs[i] && node_.inputs[i]->requires_grad; }
  /// Adds g into input i's gradient; In must be input i's scalar type (the op knows its inputs).
  template <Floating In>
  void accumulate(std::size_t i, Tensor<In, D> g) const {
    if (needs_grad(i)) input_node<In>(node_, i).accumulate(std::move(g));
  }

 private:
  Node<Out, D>& node_;
};

template <Floating Out, Device D, class F>
struct MixedFunctionNode final : Node<Out, D> {
  explicit MixedFunctionNode(F f) : fn(std::move(f)) {}
  void run_backward() override {
    MixedBackwardContext<Out, D> ctx(*this);
    fn(ctx);
  }
  F fn;
};

template <Floating T, Device D, class F>
struct FunctionNode final : Node<T, D> {
  explicit FunctionNode(F f) : fn(std::move(f)) {}
  void run_backward() override {
    BackwardContext<T, D> ctx(*this);
    fn(ctx);
  }
  F fn;
};

}  // namespace autograd

/// A value in the autodiff graph: a leaf (parameter or input) or an op's result.
template <Floating T, Device D>
class Var {
 public:
  using value_type = T;
  using device_type = D;
  using Node = autograd::Node<T, D>;

  /// An undefined Var.
  Var() = default;

  /// A leaf holding `value`; a parameter when requires_grad is true.
  explicit Var(Tensor<T, D> value, bool requires_grad = false) {
    node_ = std::allocate_shared<Node>(PoolAllocator<Node>{});
    node_->value = std::move(value);
    node_->requires_grad = requires_grad;
  }

  explicit Var(std::shared_ptr<Node> node) : node_(std::move(node)) {}

  [[nodiscard]] bool defined() const { return node_ != nullptr; }
  [[nodiscard]] const Tensor<T, D>& value() const { return checked().value; }
  /// The accumulated gradient; undefined when no gradient has reached this Var.
  [[nodiscard]] const Tensor<T, D>& grad() const { return checked().grad; }
  [[nodiscard]] bool requires_grad() const { return checked().requires_grad; }
  [[nodiscard]] bool is_leaf() const { return checked().is_leaf(); }
  [[nodiscard]] const char* op_name() const { return checked().op; }
  [[nodiscard]] const Shape& shape() const { return value().shape(); }
  [[nodiscard]] int dim() const { return value().dim(); }
  [[nodiscard]] index_t size(int axis) const { return value().size(axis); }
  [[nodiscard]] index_t numel() const { return value().numel(); }
  [[nodiscard]] T item() const { return value().item(); }
  [[nodiscard]] const std::shared_ptr<Node>& node() const { return node_; }

  /// Marks a leaf as trainable (or frozen).
  Var& requires_grad_(bool on = true) {
    MIXMOE_CHECK(checked().is_leaf(), "Var::requires_grad_", "only leaves can change requires_grad (op '", node_->op, "')");
    node_->requires_grad = on;
    return *this;
  }

  /// Keeps this non-leaf's gradient after backward() (leaves always keep theirs).
  Var& retain_grad() {
    checked().retain_grad = true;
    return *this;
  }

  /// Forgets the accumulated gradient (set-to-none: the buffer goes back to the cache).
  void zero_grad() const { checked().grad = Tensor<T, D>(); }

  /// Replaces the gradient (used by optimizers and clipping utilities).
  void set_grad(Tensor<T, D> g) const { checked().grad = std::move(g); }

  /// A leaf sharing this value, cut from the graph (stop-gradient).
  [[nodiscard]] Var detach() const { return Var(value(), false); }

  /// Backpropagates from this scalar (one element) result.
  void backward() const {
    MIXMOE_CHECK(numel() == 1, "backward", "implicit gradient only for one-element results; shape is ", shape(),
                 " (pass the output gradient explicitly)");
    backward(Tensor<T, D>::ones(shape()));
  }

  /// Backpropagates grad_output = dL/d(this) through the graph; leaves accumulate.
  void backward(const Tensor<T, D>& grad_output) const {
    Node& root = checked();
    MIXMOE_CHECK(grad_output.shape() == root.value.shape(), "backward", "gradient of shape ", grad_output.shape(),
                 " for a result of shape ", root.value.shape());
    MIXMOE_CHECK(root.requires_grad, "backward", "the result does not require grad: no input requires grad, or it was computed under no_grad");
    using Base = autograd::NodeBase<D>;
    // Work lists reused across calls (no allocation once warm), one pair per nesting level: an
    // op's backward may run a backward of its own (ops/bf16.hpp recomputes in fp32).
    thread_local std::deque<std::pair<std::vector<Base*>, std::vector<Base*>>> lists;  // grows without moving
    thread_local std::size_t depth = 0;
    if (lists.size() <= depth) lists.resize(depth + 1);
    struct Level {
      std::size_t& d;
      explicit Level(std::size_t& dd) : d(dd) { ++d; }
      ~Level() { --d; }
    } level(depth);
    auto& [order, stack] = lists[depth - 1];
    static std::atomic<std::uint64_t> epoch{0};
    const std::uint64_t mark = ++epoch;
    order.clear();
    stack.clear();
    stack.push_back(&root);
    root.visit_mark = mark;
    while (!stack.empty()) {
      Base* n = stack.back();
      stack.pop_back();
      order.push_back(n);
      for (auto& in : n->inputs)
        if (in && in->requires_grad && in->visit_mark != mark) {
          in->visit_mark = mark;
          stack.push_back(in.get());
        }
    }
    std::sort(order.begin(), order.end(), [](const Base* a, const Base* b) { return a->seq > b->seq; });
    root.accumulate(grad_output.clone());
    for (Base* n : order) {
      if (n->is_leaf() || !n->has_grad()) continue;
      n->run_backward();
      if (!n->retain_grad) n->release_grad();  // intermediate gradients are freed as soon as they are used
    }
  }

 private:
  Node& checked() const {
    MIXMOE_CHECK(node_ != nullptr, "Var", "use of an undefined Var");
    return *node_;
  }

  std::shared_ptr<Node> node_;
};

/// A leaf Var that requires grad (a trainable parameter).
template <Floating T, Device D>
Var<T, D> parameter(Tensor<T, D> value) {
  return Var<T, D>(std::move(value), true);
}

/// stop_gradient(x): the value of x, with no gradient flowing back to x.
template <Floating T, Device D>
Var<T, D> stop_gradient(const Var<T, D>& x) {
  return x.detach();
}

namespace detail {

/// What record and record_mixed share: a node of type NodeT (it holds the backward) with value
/// `out` and the nodes of `inputs` (peek: a raw pointer or null, to test; share: the shared_ptr
/// to keep); or a leaf without gradient when recording is off or no input needs a gradient.
template <class NodeT, Floating Out, Device D, class Inputs, class Peek, class Share, class F>
Var<Out, D> record_node(const char* op, Tensor<Out, D> out, const Inputs& inputs, Peek peek, Share share, F&& backward) {
  bool any = false;
  if (grad_enabled())
    for (const auto& in : inputs) {
      const autograd::NodeBase<D>* n = peek(in);
      any = any || (n && n->requires_grad);
    }
  if (!any) return Var<Out, D>(std::move(out), false);
  auto node = std::allocate_shared<NodeT>(PoolAllocator<NodeT>{}, std::forward<F>(backward));
  node->value = std::move(out);
  node->op = op;
  node->requires_grad = true;
  node->inputs.reserve(inputs.size());
  for (const auto& in : inputs) node->inputs.push_back(share(in));
  return Var<Out, D>(std::shared_ptr<autograd::Node<Out, D>>(std::move(node)));
}

}  // namespace detail

/// Records an op: `out` is its value, `inputs` its differentiable inputs, and
/// `backward(BackwardContext&)` adds dL/d(input i) into ctx.grad_in(i) (or calls
/// ctx.accumulate(i, g)) for every i with ctx.needs_grad(i).
///
/// This is also the way to add a custom op: compute the forward with tensors,
/// then call record() with a lambda for the backward; capture what the backward
/// needs (tensors are shared, not copied). Under no_grad, or when no input
/// requires grad, no node is recorded and the lambda is dropped.
template <Floating T, Device D, class F>
Var<T, D> record(const char* op, Tensor<T, D> out, std::span<const Var<T, D>> inputs, F&& backward) {
  static_assert(std::is_invocable_v<F&, autograd::BackwardContext<T, D>&>,
                "mixmoe::record: the backward must be callable as backward(BackwardContext<T, D>&)");
  return detail::record_node<autograd::FunctionNode<T, D, std::decay_t<F>>>(
      op, std::move(out), inputs,
      [](const Var<T, D>& in) { return in.defined() ? in.node().get() : nullptr; },
      [](const Var<T, D>& in) { return std::shared_ptr<autograd::NodeBase<D>>(in.defined() ? in.node() : nullptr); },
      std::forward<F>(backward));
}

template <Floating T, Device D, class F>
Var<T, D> record(const char* op, Tensor<T, D> out, std::initializer_list<Var<T, D>> inputs, F&& backward) {
  return record(op, std::move(out), std::span<const Var<T, D>>(inputs.begin(), inputs.size()), std::forward<F>(backward));
}

/// An input of record_mixed: a Var of any floating type (undefined: no input).
template <Device D>
struct AnyVar {
  template <Floating T>
  AnyVar(const Var<T, D>& v)  // NOLINT(google-explicit-constructor): any Var is an input
      : node(v.defined() ? std::shared_ptr<autograd::NodeBase<D>>(v.node()) : nullptr) {}
  std::shared_ptr<autograd::NodeBase<D>> node;
};

/// record() for an op whose inputs have other floating types than its output (cast, a bf16 GEMM
/// of fp32 weights, ...): backward(MixedBackwardContext<Out, D>&) calls ctx.accumulate<In>(i, g)
/// with input i's own type In.
template <Floating Out, Device D, class F>
Var<Out, D> record_mixed(const char* op, Tensor<Out, D> out, std::span<const AnyVar<D>> inputs, F&& backward) {
  static_assert(std::is_invocable_v<F&, autograd::MixedBackwardContext<Out, D>&>,
                "mixmoe::record_mixed: the backward must be callable as backward(MixedBackwardContext<Out, D>&)");
  return detail::record_node<autograd::MixedFunctionNode<Out, D, std::decay_t<F>>>(
      op, std::move(out), inputs, [](const AnyVar<D>& in) { return in.node.get(); },
      [](const AnyVar<D>& in) { return in.node; }, std::forward<F>(backward));
}

template <Floating Out, Device D, class F>
Var<Out, D> record_mixed(const char* op, Tensor<Out, D> out, std::initializer_list<std::type_identity_t<AnyVar<D>>> inputs,
                         F&& backward) {
  return record_mixed(op, std::move(out), std::span<const AnyVar<D>>(inputs.begin(), inputs.size()),
                      std::forward<F>(backward));
}

}  // namespace mixmoe
