"""`gnfx.register_layer_kind`: a layer kind is one layout plus one detector, registered under a name.

The **layout** (a subclass of gnfx.layouts.base.Layout) answers every question gnfx asks about a
block of the kind after analysis, in the terms of docs/design.md §1 (`z = W a`, per-example
gradient `δ aᵀ`): the rows `a` of a layer input (`input_chunks`, (N, R, d_in) or
(N, R, groups, d_in)), the rows δ of an output gradient (`error_rows`, (N, R, d_out)), the examples
N of an input (`examples`), how the weight reads as the matrix W (`view`, one of gnfx.targets.VIEWS),
whether A is kept as its diagonal (`diagonal_A`: the inputs are then ids and the layout gives the
gradient `gradient(δ, ids)`, the per-example squares `per_example_squares(δ, ids)` and, for several
sites, the per-example gradients `per_example_gradient(δ, ids)`), the independent row groups (`groups`) and
whether the rows are routed to them at run time (`routed`: then `routed_rows(rows, routing)`), the
entries of `a` a blocked A keeps together (`input_unit`), and whether its blocks take part in a tied
input/output embedding (`tied_host`, `tied_guest`). The statistics, the preconditioners, the cost
model and the analysis ask the layout; nothing outside the kind's two files compares its name.

The **detector** is a function `(graph_module, param_of, shape_of) -> (sites, rejected)` (a pass of
passes/): the kind's call sites in the graph (passes/sites.py `Site`: the node computing z, its
input a, the parameter names of W and b, the (consumer, get_attr) uses it accounts for, d_in, d_out
and the options its layout reads) and (node, reason) pairs for nodes of the kind it leaves to the
fallback. `param_of(node)` is the name of the trainable parameter a node reads (None otherwise),
`shape_of(name)` its shape.

`KINDS` holds every registered kind by name; passes/analyze.py registers the built-in ones (linear,
conv, conv_transpose, embedding, norm, position, scale, recurrent, experts, bilinear, stacked) through `register_layer_kind` as a
user does. Where two kinds claim the same node, the one registered later takes it: a user's kind
overrides a built-in one there.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from gnfx.errors import ConfigError, GnfxError
from gnfx.layouts.base import Layout
from gnfx.targets import VIEWS

# kinds the cost model and the report use for what is not a block: a loose parameter, a fallback
RESERVED = ("tensor", "fallback")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """A registered layer kind: its name (a block's `kind`), its layout class and its detector."""

    name: str
    layout: type
    detector: Callable


KINDS: dict[str, LayerKind] = {}


def _layout_problems(layout) -> list[str]:
    """What the layout class lacks or states wrongly (empty when it can serve as a layout)."""
    problems = []
    if not callable(getattr(layout, "input_chunks", None)):
        problems.append("it does not define input_chunks(a), the rows a of a layer input")
    for method in ("gradient", "per_example_squares", "per_example_gradient"):
        if layout.diagonal_A and not callable(getattr(layout, method, None)):
            problems.append(f"diagonal_A is set but it does not define {method}(delta, ids)")
    if layout.routed and not callable(getattr(layout, "routed_rows", None)):
        problems.append("routed is set but it does not define routed_rows(rows, routing)")
    if layout.view not in VIEWS:
        problems.append(f"view = {layout.view!r} is not one of {', '.join(map(repr, VIEWS))} (gnfx.targets.VIEWS)")
    for attribute in ("groups", "input_unit"):
        value = getattr(layout, attribute)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{attribute} = {value!r} is not a positive int")
    return problems


def register_layer_kind(name: str, layout, detector) -> LayerKind:
    """Register the layer kind `name`: blocks the `detector` finds are read through the `layout` class
    (module docstring). Returns the LayerKind. Registering the same layout and detector under the same
    name again does nothing. Raises a ConfigError naming the problem and the fix for a name that is
    not an identifier, reserved or taken, a layout that is not a gnfx.layouts.base.Layout or lacks
    what the statistics ask it, and a detector that cannot be called as
    `detector(graph_module, param_of, shape_of)`."""
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
        raise ConfigError(f"register_layer_kind({name!r}, ...): a layer kind's name must be a Python identifier "
                          f"other than {', '.join(RESERVED)}")
    if not (isinstance(layout, type) and issubclass(layout, Layout)):
        raise ConfigError(f"register_layer_kind({name!r}, ...): the layout must be a subclass of "
                          f"gnfx.layouts.base.Layout; got {layout!r}")
    problems = _layout_problems(layout)
    if problems:
        raise ConfigError(f"{layout.__qualname__} cannot be the layout of {name!r}: {'; '.join(problems)} "
                          f"(docs/design.md, 'Adding a layer kind')")
    try:
        inspect.signature(detector).bind(None, None, None)
    except (TypeError, ValueError):
        raise ConfigError(f"register_layer_kind({name!r}, ...): the detector must be a function "
                          f"detector(graph_module, param_of, shape_of) -> (sites, rejected); got {detector!r}") from None
    kind = LayerKind(name, layout, detector)
    if KINDS.get(name) == kind:
        return KINDS[name]
    if name in KINDS:
        taken = KINDS[name]
        raise ConfigError(f"the layer kind {name!r} is taken (layout {taken.layout.__module__}."
                          f"{taken.layout.__qualname__}, detector {getattr(taken.detector, '__qualname__', taken.detector)}); "
                          f"register {layout.__qualname__} under another name")
    KINDS[name] = kind
    return kind


def layout_class(kind: str):
    """The layout class of the registered layer kind `kind`; None for a name no kind has (the cost
    model's loose parameter, "tensor")."""
    entry = KINDS.get(kind)
    return None if entry is None else entry.layout


def layout_of(block):
    """The layout of a LayerTable block, from its kind's registration."""
    cls = layout_class(block.kind)
    if cls is None:
        raise GnfxError(f"block {block.name!r} is of kind {block.kind!r}, which is not registered (registered: "
                        f"{', '.join(KINDS)}); register it with gnfx.register_layer_kind before compiling")
    return cls(block)


def site_layout(block, site):
    """The layout of one call site of `block` (passes/sites.py `Site`) that reads a window of its parameter
    (`site.window`, passes/weight_slices.py): the block's layout with that site's options and window, which
    read this call's rows into the full parameter's; None for a site that reads the whole parameter (the
    block's own layout serves it). The window belongs to the call, not to the block: another call, or a graph
    captured again for another width (gnfx.variants), reads another."""
    if site.window is None:
        return None
    return layout_of(dataclasses.replace(block, options={**block.options, **site.options, "window": site.window}))
