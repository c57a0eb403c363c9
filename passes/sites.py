"""A call site: one application of a layer in the graph, as a detector found it."""
from __future__ import annotations

import dataclasses

from torch import fx


@dataclasses.dataclass
class Site:
    """One use of a layer: `node` computes `z` from `input` (the `a` of docs/design.md §1) with the
    parameter named `weight` (and `bias`, or None). A layer of several inputs whose rows its layout forms
    (a bilinear map's outer product of (x1, x2), gnfx.layouts.bilinear) has the tuple of their nodes as
    `input`: the taps record the tuple. `uses` are the (consumer, get_attr) pairs of
    the graph that this site accounts for (for `x @ W.t()` the consumer of W is the transpose).
    `routing`, for a layout whose rows are assigned to its groups at run time (`Layout.routed`: stacked
    experts), is the node whose value assigns them (a grouped product's offsets): the taps record it
    with the input and the output gradient.
    `window`, for a layer that reads a block of consecutive entries of its parameter (a slimmable or
    supernet layer's `W[:o, :i]`, passes/weight_slices.py), is that block: (start, stop) per dimension of the
    weight as its layout reads it (a linear map's (out, in), a convolution's (out, in, *kernel)); the taps
    read this call's rows into the full parameter's with it (gnfx.layouts.registration.site_layout).
    `d_in`, `d_out` are the sizes of `a` and `z` per position (of the full parameter); `options` the kind's
    geometry (what its layout reads). `kind` is the name its detector is registered under (set by passes/analyze.py)."""

    node: fx.Node
    input: fx.Node | tuple[fx.Node, ...]
    weight: str
    bias: str | None
    uses: list[tuple[fx.Node, fx.Node]]
    d_in: int
    d_out: int
    options: dict = dataclasses.field(default_factory=dict)
    kind: str = ""
    routing: fx.Node | None = None
    window: tuple[tuple[int, int], ...] | None = None


def arg(node: fx.Node, position: int, name: str, default=None):
    """The argument of a call node, given by position or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def computed_weight_reason(node: fx.Node, layer: str, param_of) -> str | None:
    """Why the trainable bias of `node`, a `layer` call (weight argument 1, bias 2) whose weight is computed by
    a node gnfx has no reparametrization for (an nn.utils.parametrizations.orthogonal map, a hypernetwork's
    output), stays out of a block: the layer is no block, since its W is no parameter a block steps. None where
    the weight is a parameter (or a stand-in for one) or the bias is no trainable parameter."""
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not isinstance(w, fx.Node) or not isinstance(b, fx.Node) or param_of(b) is None or param_of(w) is not None:
        return None
    target = getattr(w.target, "__name__", str(w.target))
    return (f"the bias of a {layer} whose weight is computed by {w.op} {target!r} (node {w.name}), not a parameter "
            f"gnfx steps as the layer's W: no block for the layer")
