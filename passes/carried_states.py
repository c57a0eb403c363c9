"""Whether a value a captured forward stores on its module is computed from its call's input data: a state carried to
the next call, not a cache.

A forward that starts a state as None and reads it first carries it from call to call: a spiking neuron's membrane
potential (`if self.mem is None: self.mem = torch.zeros_like(x)`, then `self.mem = self.mem * beta + self.fc(x)`), a
stateful LSTM wrapper's hidden state (`out, self.hidden = self.lstm(x, self.hidden)`, None at the first call). The
capture sees the first call's branch only: a graph that kept the state's read of None would compute every call as the
first (the potential never carried over), silently. passes/state_writes.py refuses such a store (read before its
write), and where the value stored is computed from the input's data the module's store is a side effect
(passes/module_attributes.py): torch.fx keeps the module opaque, torch.export captures nothing. A value computed from
the parameters, buffers and the input's shape alone (a rotary table `cos(arange(x.shape[-1]))`, a cached weight
transform) is the same at every call of that shape: a cache, whose store stays left out of the graph, which computes it
at each call.

(A list the module holds and its forward appends a tensor to, `self.history.append(h)`, is the same state kept for
the next calls, whatever it is computed from: passes/module_attributes.py's `appended`.)

`computed_from_data(stored, inputs)`: whether a path of the graph leads from a node of `inputs` (the call's inputs) to a
node of `stored` through the data of the tensors on it, not through a read of their shape, type or device alone
(`SHAPE_READS`: `x.shape`, `x.size()`, `torch.zeros_like(x)`, aten's `sym_size`; the second input of
`t.expand_as(x)`, `SHAPE_OF_SECOND`). The nodes are torch.fx's Proxies'
(`fx_nodes`) or, under torch.export, those of the tracing mode running the forward (`export_nodes`).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental import proxy_tensor

# operations whose result reads only the shape, dtype or device of their tensor inputs (torch.fx's method and
# attribute names and torch functions, aten's overload packets by name)
SHAPE_READS = frozenset({"shape", "size", "dim", "ndim", "ndimension", "numel", "dtype", "device", "is_cuda",
                         "sym_size", "sym_numel", "sym_stride", "zeros_like", "ones_like", "empty_like",
                         "new_zeros", "new_ones", "new_empty"})
# operations that read their first input's data and only the shape or dtype of their second (`t.expand_as(x)`)
SHAPE_OF_SECOND = frozenset({"expand_as", "view_as", "reshape_as", "type_as"})


def _operation(node: fx.Node) -> str:
    """The name of what `node` computes: the method or attribute name, a function's or aten operator's name."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function" and node.target is getattr:
        return str(node.args[1])
    packet = getattr(node.target, "overloadpacket", node.target)
    return getattr(packet, "__name__", str(packet)).split(".")[-1]


def computed_from_data(stored: list[fx.Node], inputs: set[fx.Node]) -> bool:
    """Whether some node of `stored` is computed from the data of a node of `inputs` (module doc)."""
    seen, todo = set(), list(stored)
    while todo:
        node = todo.pop()
        if node in inputs:
            return True
        if node in seen or node.op in ("call_function", "call_method") and _operation(node) in SHAPE_READS:
            continue
        seen.add(node)
        first = node.args[0] if node.args else None
        if node.op in ("call_function", "call_method") and _operation(node) in SHAPE_OF_SECOND \
                and isinstance(first, fx.Node):
            todo.append(first)
        else:
            todo.extend(node.all_input_nodes)
    return False


def fx_nodes(value, tracer: fx.Tracer) -> list[fx.Node]:
    """The nodes of `tracer`'s Proxies in `value` (a Proxy, or a tuple or list of them: an LSTM's (h, c))."""
    return [v.node for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, fx.Proxy) and v.tracer is tracer]


def export_nodes(value) -> list[fx.Node]:
    """Inside a forward torch.export traces: the nodes of the tensors in `value` in the graph being traced."""
    mode = proxy_tensor.get_proxy_mode()
    if mode is None:
        return []
    slots = (proxy_tensor.get_proxy_slot(v, mode.tracer, None) for v in torch.utils._pytree.tree_leaves(value)
             if isinstance(v, torch.Tensor))
    return [slot.proxy.node for slot in slots if slot is not None]
