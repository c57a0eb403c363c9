"""The shift detector: `z = x + b`, a trainable vector b (d,) of d > 1 entries added to an activation x computed
from a model input (gnfx.layouts.shift).

Recognized: `x + b`, `b + x`, `torch.add`, `x.add(b)` and `aten.add.Tensor` (no alpha). The kind is registered
before every other built-in kind (passes/analyze.py), so that a kind that reads the sum as part of its layer
takes it: a hand-written linear map's bias (`x @ W + b`, passes/linear.py), a norm's or a layer scale's β, a
position table. What no other kind claims is a shift: PyTorch Geometric's GCNConv and GATConv add their bias
after the aggregation of the messages (`out = propagate(...) + self.bias`), which left it to the fallback.
"""
from __future__ import annotations

from torch import fx

from .norm import ADD, _is
from .scale import _input_dependent
from .sites import Site


def find_shift_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Shift sites (module docstring); no fallback reasons of their own."""
    sites, reads = [], None
    for node in gm.graph.nodes:
        if not _is(node, ADD) or len(node.args) != 2 or node.kwargs:
            continue
        for b_node, x in (node.args, node.args[::-1]):
            name = param_of(b_node)
            if name is None or not isinstance(x, fx.Node) or param_of(x) is not None:
                continue
            shape = tuple(shape_of(name))
            reads = _input_dependent(gm) if reads is None else reads
            if len(shape) != 1 or shape[0] < 2 or x not in reads:
                break
            sites.append(Site(node=node, input=x, weight=name, bias=None, uses=[(node, b_node)], d_in=1, d_out=shape[0],
                              options={"weight_shape": shape, "start": 0, "rows": 1, "feature_dim": -1,
                                       "padding_idx": None}))
            break
    return sites, []
