"""unflatten: a linear map applied to the batch flattened into rows, rewritten as the same map of the
batch-first input.

Hugging Face's `Conv1D` (GPT-2's attention and MLP projections, weight W stored (d_in, d_out))
computes z = addmm(b, x.view(-1, d_in), W).view(*x.shape[:-1], d_out): the layer's input is the
(N·T, d_in) matrix of every example's rows, whose first dimension is not the batch's, so the
per-example statistics (ekfac's and rank1's diagonals, kfac_approx="reduce") could only take the
whole batch as one example. `unflatten_linear` rewrites each such addmm (or mm, without a bias)
between a flattening view and the view back into aten.linear(x, Wᵀ, b) on the batch-first x (N, T,
d_in): the same map z = x W + b on the same rows, so that the linear detector (passes/linear.py:
`F.linear(x, P.t(), b)` with P stored (d_in, d_out)) reads a batch-first input and output.

It needs the shapes: where the graph carries them (torch.export's `meta["val"]`), a rewrite
requires that the flattened input be (prod(x.shape[:-1]), x.shape[-1]) and that the output view give
back x.shape[:-1] (symbolic sizes compared without guarding); a graph without shapes (torch.fx's
symbolic trace) is left as it is.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .rewrite import recompiled, replace
from .shapes import same_sizes, value_of

aten = torch.ops.aten
FLATTENING = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def unflatten_linear(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every flatten → addmm/mm with a parameter (a get_attr) → unflatten (module doc)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default) or node.kwargs:
            continue
        bias = (node.args[0],) if node.target is aten.addmm.default else ()
        flat, weight = node.args[len(bias):len(bias) + 2]
        users = list(node.users)
        if not (isinstance(flat, fx.Node) and flat.target in FLATTENING and isinstance(weight, fx.Node)
                and weight.op == "get_attr" and len(users) == 1 and users[0].target in FLATTENING):
            continue
        out = users[0]
        source = flat.args[0]
        x, f, w, y = (value_of(n) for n in (source, flat, weight, out))
        if any(v is None for v in (x, f, w, y)) or x.dim() < 3 or w.dim() != 2:
            continue
        if not (same_sizes(f.shape, (math.prod(x.shape[:-1]), x.shape[-1]))
                and same_sizes(y.shape[:-1], x.shape[:-1])):
            continue
        with gm.graph.inserting_before(node):
            transposed = gm.graph.call_function(aten.t.default, (weight,))
            linear = gm.graph.call_function(aten.linear.default, (source, transposed) + bias)
        transposed.meta = {**node.meta, "val": w.t()}
        linear.meta = {**node.meta, "val": y}
        replace(gm, out, linear)
        gm.graph.erase_node(node)
        if not flat.users:
            gm.graph.erase_node(flat)
        changed = True
    return recompiled(gm, changed)
