"""The call of an opaque submodule whose children have graphs of their own (passes/opaque_children.py).

`OpenedLeaf(module, graphs)` stands in the captured graph for the call of the opaque submodule
`module`: it runs `module`'s own forward, eagerly, its Python code taking its branches anew, while
each opened child (by its path under `module`) is replaced, for the call only, by a twin whose
forward is the child's instrumented graph. The twin is a shallow copy of the child: the same
parameters, buffers and attributes (`self.fc1.weight` and `self.fc1.out_features` read as before,
`isinstance` holds), without hooks of its own (the graph runs the child's forward hooks, as the
lowering does for a module call, passes/lower.py). The children are restored when the call returns
or raises, so the model itself never holds the graphs: its own forward (the steps without
statistics, the quadratic step's replay) runs untouched.
"""
from __future__ import annotations

import collections
import copy

from torch import fx, nn

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _twin(child: nn.Module, graph: fx.GraphModule) -> nn.Module:
    """A shallow copy of `child` (shared registries) whose forward is `graph` and that has no hooks."""
    twin = copy.copy(child)
    twin.__dict__.update({name: collections.OrderedDict() for name in _HOOKS}, forward=graph.forward)
    return twin


class OpenedLeaf(nn.Module):
    """The opaque submodule `module`, called with its opened children's graphs in their place.

    `graphs` maps each opened child's path under `module` to its graph (rooted at the model, with its
    taps); the graphs are submodules, so that they print with the captured graph; `module` is not (its
    parameters keep their one name)."""

    def __init__(self, module: nn.Module, graphs: dict[str, fx.GraphModule]):
        super().__init__()
        self.__dict__["module"] = module
        self.paths = list(graphs)
        self.graphs = nn.ModuleList(graphs.values())

    def forward(self, *args, **kwargs):
        swapped = []
        try:
            for path, graph in zip(self.paths, self.graphs):
                parent, _, name = path.rpartition(".")
                owner = self.module.get_submodule(parent)
                child = owner._modules[name]
                swapped.append((owner, name, child))
                owner._modules[name] = _twin(child, graph)
            return self.module(*args, **kwargs)
        finally:
            for owner, name, child in swapped:
                owner._modules[name] = child

    def extra_repr(self) -> str:
        return f"opened: {', '.join(self.paths)}"
