"""The weighted-sum detector: `z = (x * w).sum(-1)` with a trainable w, per group a linear map of x's last
dimension to one output (gnfx.layouts.weighted_sum).

Recognized: the product `x * w`, `w * x`, `torch.mul`, `x.mul(w)` or `aten.mul.Tensor` (its only use) summed over
its last dimension, `.sum(-1)`, `.sum(dim=-1)`, `torch.sum(..., -1)` or `aten.sum.dim_IntList(..., [-1])`, with
or without keepdim, where w is a parameter of the shape (1, ..., 1, *G, C) and x, computed from a model input,
ends in the same (*G, C) with at least one dimension before them (its examples). x's shape must be known (the
value torch.export's graph records, passes/shapes.py): a torch.fx graph, which records none, leaves the product
to the scale detector (passes/scale.py) or to the fallback. PyTorch Geometric's GATConv scores each edge's
endpoints so, `(x_src * self.att_src).sum(dim=-1)` with x_src (N, heads, C) and att_src (1, heads, C); its
product alone read as a layer scale took a single head's vector per feature (one head) and fell back with
several.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .norm import MUL, _is
from .scale import _input_dependent
from .shapes import same_sizes, value_of
from .sites import Site, arg

aten = torch.ops.aten
SUMS = (torch.sum, aten.sum.dim_IntList, "sum")


def _last_dim_only(dims, rank: int) -> bool:
    """Whether the sum's `dim` argument is x's last dimension alone."""
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, rank - 1)


def find_weighted_sum_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Weighted-sum sites (module docstring); no fallback reasons of their own."""
    sites, reads = [], None
    for node in gm.graph.nodes:
        product = node.args[0] if _is(node, SUMS) and node.args else None
        if not _is(product, MUL) or len(product.args) != 2 or product.kwargs or len(product.users) != 1:
            continue
        for w_node, x in (product.args, product.args[::-1]):
            name, value = param_of(w_node), value_of(x)
            if name is None or not isinstance(value, torch.Tensor) or param_of(x) is not None:
                continue
            shape = tuple(shape_of(name))
            core = shape[next((i for i, s in enumerate(shape) if s != 1), len(shape) - 1):]  # (*G, C)
            rank = value.dim()
            if rank <= len(core) or not same_sizes(value.shape[rank - len(core):], core):
                continue
            if not _last_dim_only(arg(node, 1, "dim"), rank) or arg(node, 3, "dtype") is not None:
                continue
            reads = _input_dependent(gm) if reads is None else reads
            if x not in reads:
                continue
            sites.append(Site(node=node, input=x, weight=name, bias=None, uses=[(product, w_node)], d_in=core[-1],
                              d_out=math.prod(core[:-1]),
                              options={"group_dims": len(core) - 1, "keepdim": bool(arg(node, 2, "keepdim", False)),
                                       "weight_shape": shape}))
            break
    return sites, []
