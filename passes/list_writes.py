"""An entry of a list or dict a module holds, written by a traced forward and read back in the same call, as graph nodes.

MONAI's DynUNet with deep supervision shares one list, `heads`, with its nested DynUNetSkipLayers: each layer's
forward writes its supervision head's output into it, `self.heads[self.index - 1] = self.super_head(upout)`, and
DynUNet's forward stacks the entries with its output. The list is scratch space of one call: every entry is written
before it is read. passes/module_attributes.py names any tensor a forward stores on its module a side effect (a
neuron's membrane potential, carried to the next call, which a graph would read as the constant the trace saw), so
each layer was kept opaque and the model ran eagerly.

Here the entry is a graph value: the trace reads the Proxy the writer stored (the model's stack reads the heads'
outputs h_i, so the graph's output and its gradients are the module's own, the heads curvature blocks), and a node
`AttributeWrite` (passes/module_attributes.py) after the writer's forward stores the value in the entry at each
call, as the module's own call does: after a call of the graph the list holds the h_i of that call, the tensors an eager call leaves. An entry is
written in the graph only where no read of it precedes its write: in the trace after the one that found the write,
the entry holds a stand-in Proxy (`ListWrites.install`) whose node a read before the write would use; an entry read
so (the state of the last call) is refused, and its writer kept opaque for the side effect, as before; a graph that
reads a refused entry (the value the opaque writer stores at each call, which the graph would hold as the trace's
constant) is no capture (`ListWrites.settle`).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from gnfx.passes.module_attributes import REGISTRIES, AttributeWrite, ForwardSideEffect

Entry = tuple[int, object]  # (id of the container, key)


def _before_write(name: str) -> None:
    """The stand-in node of an entry before its forward writes it (`ListWrites.install`); erased, never run."""
    raise AssertionError(f"the stand-in of {name} ran")


def _containers(module: nn.Module):
    """(attribute name, container) of each list and dict among the module's own attributes."""
    return [(k, v) for k, v in vars(module).items() if k not in REGISTRIES and type(v) in (dict, list)]


def _items(container):
    return container.items() if isinstance(container, dict) else enumerate(container)


class ListWrites:
    """The list and dict entries a traced forward writes and reads back (module doc) across the traces of one capture,
    by (id of the container, key): `allowed`, those to write in the graph; `refused`, those read before their write;
    `held`, each one's (container, key, value before the capture)."""

    def __init__(self):
        self.held: dict[Entry, tuple] = {}
        self.allowed: set[Entry] = set()
        self.refused: set[Entry] = set()
        self.found: set[Entry] = set()  # of one trace: the writes it found, to allow in the next
        self.stand_ins: dict[Entry, fx.Proxy] = {}
        self.written: dict[Entry, fx.Proxy] = {}

    def install(self, tracer: fx.Tracer) -> None:
        """At the start of a trace: each entry allowed or refused holds a stand-in Proxy of `tracer`'s graph."""
        self.found, self.written, self.stand_ins = set(), {}, {}
        for entry in self.allowed | self.refused:
            container, key, _ = self.held[entry]
            self.stand_ins[entry] = tracer.create_proxy("call_function", _before_write, (f"entry {key!r}",), {})
            container[key] = self.stand_ins[entry]

    def take(self, tracer: fx.Tracer, module: nn.Module, held: dict) -> tuple[dict, str | None]:
        """`held` (`held_values(module)` before its forward ran) without the entries the forward wrote with a value of
        `tracer`'s trace, the side-effect check's to leave alone: an allowed entry's value written in the graph (a
        `AttributeWrite` node, once per value), an entry not yet allowed noted in `found`; and the change of a
        refused entry the forward wrote, a side effect (passes/module_attributes.py), or None."""
        held = dict(held)
        for name, container in _containers(module):
            for key, value in _items(container):
                entry, label = (id(container), key), f"{name}[{key!r}]"
                if not isinstance(value, fx.Proxy) or value.tracer is not tracer:
                    continue
                if value is self.stand_ins.get(entry):  # as the trace began (held_values before it: the value)
                    pass
                elif entry in self.refused:
                    return held, f"attribute {label} (read before its forward writes it, then written)"
                elif entry in self.allowed:
                    if self.written.get(entry) is not value:
                        self.written[entry] = value
                        self._write(tracer, AttributeWrite(module, name, key), value)
                elif label in held and _is_state(held[label]):
                    self.found.add(entry)
                    self.held.setdefault(entry, (container, key, held[label]))
                else:
                    continue
                held.pop(label, None)
        return held, None

    @staticmethod
    def _write(tracer: fx.Tracer, write: AttributeWrite, value: fx.Proxy) -> None:
        """The node of `write` after the graph's last (before its output, once traced)."""
        last = next(iter(reversed(tracer.graph.nodes)))
        with tracer.graph.inserting_before(last) if last.op == "output" else tracer.graph.inserting_after(last):
            tracer.create_proxy("call_function", write, (value,), {}, name=write.__name__)

    def settle(self, graph: fx.Graph) -> bool:
        """After a trace: whether to trace again, with the entries it found allowed, and those whose stand-in a read
        used refused; else the stand-ins are erased from `graph`. Raises ForwardSideEffect where the graph reads a
        refused entry: its writer, kept opaque, writes it at each call, which the graph would read as a constant."""
        read = {entry for entry, proxy in self.stand_ins.items() if proxy.node.users}
        if stale := read & self.refused:
            key = self.held[next(iter(stale))][1]
            raise ForwardSideEffect(f"the forward reads the entry {key!r} of a list or dict that the forward of a "
                                    f"submodule kept opaque writes after reading it (a state stored for the next call)")
        self.refused |= read
        self.allowed = (self.allowed - read) | self.found
        if read or self.found:
            return True
        for proxy in self.stand_ins.values():
            graph.erase_node(proxy.node)
        return False

    def restore(self) -> None:
        """After a trace: each entry found written holds its value from before the capture (not a Proxy of the
        trace, which a later trace would read)."""
        for container, key, value in self.held.values():
            container[key] = value


def _is_state(value) -> bool:
    """A tensor the module holds (not a parameter): the values passes/module_attributes.py calls stored state."""
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
