"""A buffer that a forward changes in place by Python code, traced as a node of torch.fx's graph.

torch.fx proxies parameters, not buffers: torch's BatchNorm forward counts its calls,
`self.num_batches_tracked.add_(1)`, which in a subclass traced through (timm's BatchNormAct2d, any
library's `class MyBN(nn.BatchNorm2d)` with a forward of its own) ran once on
the buffer itself while tracing, and the graph held no operation repeating it. passes/module_attributes.py
names that side effect, and such a module was kept opaque: its norm's parameters were no block in the fx
graph, so whole timm models (gernet, mobileone, the efficientnets, ...) went to torch.export, 3-30 times
slower to capture.

Traced again with each buffer it changed a `get_attr` Proxy (`BufferProxies`; every buffer one trace changed,
in one more trace), the change is a node of the
graph, `add_(num_batches_tracked, 1)`, which each call of the graph runs as each call of the module's forward
does (the statistic and replayed forwards count as a torch.nn.BatchNorm2d leaf's calls count). A forward
that reads the buffer's value into Python (`float(self.num_batches_tracked)`, BatchNorm's cumulative average
at momentum=None; `if self.calls >= k:`, performer's redraw counter) or assigns the buffer a new tensor
(`self.calls += 1`, a Proxy no buffer holds) fails that trace, and the module is kept opaque for the side
effect first found (`BufferChanged`), as before.
"""
from __future__ import annotations

from torch import fx, nn

from gnfx.passes.module_attributes import ForwardSideEffect


class BufferChanged(ForwardSideEffect):
    """A traced forward changed the buffers `buffers` (qualified names in the traced root) in place."""

    def __init__(self, message: str, buffers: frozenset[str]):
        super().__init__(message)
        self.buffers = buffers


class BufferProxies:
    """The buffers of `root` named in `names`, each read as one `get_attr` Proxy of `tracer`'s graph."""

    def __init__(self, root: nn.Module, names: set[str]):
        self.root, self.buffers = root, {name: root.get_buffer(name) for name in names}
        self.by_id = {id(buffer): name for name, buffer in self.buffers.items()}

    def restore(self) -> None:
        """Put back each buffer that a traced forward replaced (`self.calls += 1` assigns it a Proxy)."""
        for name, buffer in self.buffers.items():
            path, _, attr = name.rpartition(".")
            self.root.get_submodule(path)._buffers[attr] = buffer

    def get(self, tracer: fx.Tracer, value, cache: dict):
        """The Proxy of `value` if it is one of the buffers, else None (`cache`: fx's parameter_proxy_cache)."""
        name = self.by_id.get(id(value))
        if name is None:
            return None
        if name not in cache:
            cache[name] = tracer.create_proxy("get_attr", name, (), {})
        return cache[name]
