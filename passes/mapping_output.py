"""A traced forward that returns a dict subclass returns that type again.

torch.fx's tracer turns any mapping a forward returns into a plain dict (`Tracer.create_arg`), so the
graph of a forward that returns a dict subclass, such as Hugging Face's `ModelOutput` (an OrderedDict and
a dataclass at once: `out.loss`, `out.last_hidden_state`), returns a plain dict, and a caller reading the
output's attributes fails: the Python code of an opaque submodule reading an opened child's output
(YOLOS: `self.vit(pixel_values).last_hidden_state`, passes/opaque_children.py), or the user reading the
model's. `MappingOutputTracer` notes the type of the value the forward returns, and `keep_output_type` sets
the graph's code generation to rebuild it from the plain dict: `cls(**values)` for a dataclass (ModelOutput
takes its fields by keyword), `cls(values)` for another mapping. The graph itself keeps the plain dict, which
the passes read (its leaves are the model's outputs, passes/boundary.py).
"""
from __future__ import annotations

import dataclasses

from torch import fx


def rebuilt(cls: type, values: dict):
    """The mapping of type `cls` holding `values` (module doc)."""
    return cls(**values) if dataclasses.is_dataclass(cls) else cls(values)


class _MappingOutputCodeGen(fx.graph.CodeGen):
    """The graph's code, its returned dict rebuilt as `output_type`."""

    def __init__(self, output_type: type):
        super().__init__()
        self.output_type = output_type

    def additional_globals(self):
        return [("gnfx_rebuilt", rebuilt), ("gnfx_output_type", self.output_type)]

    def generate_output(self, output_args, *, descs=None, repr_fn=None):
        return f"return gnfx_rebuilt(gnfx_output_type, {(repr_fn or repr)(output_args)})"


class MappingOutputTracer(fx.Tracer):
    """An fx tracer that notes, in `output_type`, the type of the mapping the traced forward returns when it
    is a dict subclass (None otherwise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_type: type | None = None
        self._depth = 0
        self._outermost: type | None = None  # the type of the last outermost argument create_arg took

    def create_arg(self, a):
        if self._depth == 0:
            self._outermost = type(a)
        self._depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._depth -= 1

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind == "output":  # fx's trace: create_node("output", ..., (self.create_arg(forward's value),), ...)
            cls = self._outermost
            self.output_type = cls if cls is not dict and issubclass(cls, dict) else None
        return super().create_node(kind, target, args, kwargs, name, type_expr)


def keep_output_type(graph: fx.Graph, output_type: type | None) -> None:
    """Rebuild the graph's returned dict as `output_type` (a dict subclass; nothing for None)."""
    if output_type is not None:
        graph.set_codegen(_MappingOutputCodeGen(output_type))


def copy_output_type(source: fx.Graph, target: fx.Graph) -> None:
    """Give `target`, a graph of `source`'s nodes, `source`'s rebuilt output type, if it has one."""
    if isinstance(source._codegen, _MappingOutputCodeGen):
        keep_output_type(target, source._codegen.output_type)
