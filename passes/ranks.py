"""ranks: a traced tensor's rank as a Python int, so that a forward branching on it traces.

Many library layers branch on the rank of their input in Python (spikingjelly's `layer.Conv2d`: `if x.dim() == 3:
... elif x.dim() == 4: ...`; `x.ndim`, `len(x.shape)`, `if x.dim() != 5: raise`). torch.fx cannot branch on a
Proxy, so such a layer was kept opaque and its parameters fell back to the diagonal preconditioner. Given the
example call, the tracer evaluates every node it records on fake tensors of the example's shapes
(`ExampleValues`: torch's FakeTensorMode, which reads no data and changes no real tensor), so the rank of each
traced tensor is known while tracing: `x.dim()`, `x.ndim` and `len(x.shape)` (`len(x.size())`) give it as an
int, and the branch the example takes is the graph's. A node whose value cannot be evaluated (an opaque
submodule outside torch.nn, whose Python code may hold state; a function the model's code wraps or a custom
autograd Function, for the same reason; an op fake tensors refuse, its error log not shown) has no known rank, and
those reads stay proxies (torch.fx's TraceError, as without an example: the submodule is kept opaque).

The graph then holds the ranks it read fixed: `ExampleValues.read` says whether it read any, and gnfx.variants
keys such a graph by the ranks of the call's input tensors, so a call with another rank gets its own capture.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree

UNKNOWN = object()  # a node whose value was not evaluated
# the logger of torch's fake tensors, which logs an op they refuse at error level: here a rank left unknown
FAKE_TENSOR_LOG = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet_fake_tensors():
    """While inside, FakeTensorMode's log of an op it refuses is not shown (it only leaves a rank unknown here)."""
    level = FAKE_TENSOR_LOG.level
    FAKE_TENSOR_LOG.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        FAKE_TENSOR_LOG.setLevel(level)


def _torch_function(target) -> bool:
    """Whether a call_function target is torch's or Python's own (an operator, a builtin), which runs on fake
    tensors without side effects; not a function the model's code wraps (torch.fx.wrap) nor a custom autograd
    Function's apply, whose Python code may count or store what it computes."""
    owner = getattr(target, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return False
    return (getattr(target, "__module__", None) or "").startswith(("torch", "_operator", "operator", "builtins")) \
        or type(target).__name__ in ("builtin_function_or_method", "OpOverload", "OpOverloadPacket")


class ExampleValues:
    """The value of each traced node on the example call, as fake tensors; `read`: whether the trace read a
    rank from them. `examples`: {forward parameter name: the example call's value}."""

    def __init__(self, examples: dict[str, object]):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.examples = examples
        self.values: dict[fx.Node, object] = {}
        self.read = False

    def record(self, root: nn.Module, node: fx.Node, args: tuple, kwargs: dict) -> None:
        """Evaluate `node` (kind, target as torch.fx records them; `args`, `kwargs` with proxies) on the
        values of the nodes it reads; unevaluable: left out."""
        try:
            with _quiet_fake_tensors():
                value = self._evaluated(root, node, args, kwargs)
        except Exception:  # noqa: BLE001 - an op fake tensors refuse: its rank is unknown
            return
        if value is not UNKNOWN and not any(isinstance(v, fx.Proxy) for v in _pytree.tree_leaves(value)):
            self.values[node] = value

    def _evaluated(self, root: nn.Module, node: fx.Node, args: tuple, kwargs: dict):
        if node.op == "placeholder":
            value = self.examples.get(node.target, UNKNOWN)
            return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else UNKNOWN
        if node.op == "get_attr":
            value = _attribute(root, node.target)  # a fake copy: an in-place op changes no real tensor
            return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
        leaves = _pytree.tree_leaves((args, kwargs))
        if any(isinstance(a, fx.Proxy) and self.values.get(a.node, UNKNOWN) is UNKNOWN for a in leaves):
            return UNKNOWN
        args, kwargs = _pytree.tree_map(lambda a: self.values[a.node] if isinstance(a, fx.Proxy) else a, (args, kwargs))
        with self.mode, torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs) if _torch_function(node.target) else UNKNOWN
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                module = root.get_submodule(node.target)
                # only torch's own layers: another opaque module's Python code may store what it computes; its
                # forward, as the module's call is the tracer's while tracing
                torchs = module.__module__.startswith(("torch.nn", "torch.ao.nn"))
                if not torchs:
                    return UNKNOWN
                # on fake copies of its parameters and buffers: batch norm's forward counts its calls in place
                tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                with _reparametrize_module(module, {name: self.mode.from_tensor(t) for name, t in tensors.items()}):
                    return module.forward(*args, **kwargs)
        return UNKNOWN

    def rank(self, proxy: fx.Proxy) -> int | None:
        """The rank of the tensor `proxy` traces, if known (and then `read` is set); else None."""
        value = self.values.get(proxy.node, UNKNOWN)
        if not isinstance(value, torch.Tensor):
            return None
        self.read = True
        return value.dim()

    def length(self, proxy: fx.Proxy) -> int | None:
        """The length of the shape `proxy` traces (`x.size()`), if known (and then `read` is set); else None."""
        value = self.values.get(proxy.node, UNKNOWN)
        if not isinstance(value, torch.Size):
            return None
        self.read = True
        return len(value)


class ShapeAttribute(fx.proxy.Attribute):
    """`x.shape` of a traced tensor: `len(x.shape)` is its rank where known (`ExampleValues.rank`)."""

    def __len__(self) -> int:
        values = getattr(self.tracer, "example_values", None)
        rank = None if values is None else values.rank(self.root)
        return super().__len__() if rank is None else rank


def _attribute(root: nn.Module, target: str):
    """The tensor a get_attr node reads, from the modules' registries (the tracer patches Module.__getattr__)."""
    *path, name = target.split(".")
    module = root
    for part in path:
        module = module._modules[part]
    for registry in (module._parameters, module._buffers, module.__dict__):
        if name in registry:
            return registry[name]
    return UNKNOWN


def input_ranks(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The rank of each input tensor of a call, in pytree order: what a graph that read ranks is keyed by."""
    return tuple(x.dim() for x in _pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(x, torch.Tensor))
