"""The linear-map detector: `z = W a (+ b)` with a trainable weight, on inputs of any leading shape.

Recognized in both graph forms: `F.linear` (symbolic tracing, after `lower_linear_modules`) and
`aten.linear` (torch.export).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .sites import Site

LINEAR_OPS = (F.linear, torch.ops.aten.linear.default)


def find_linear_sites(gm: fx.GraphModule, param_of) -> list[Site]:
    """Every linear op whose weight is a parameter (`param_of(node)` returns its name, or None)."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        weight = param_of(w)
        if weight is None:
            continue
        sites.append(Site(node=node, kind="linear", input=x, weight=weight, weight_node=w,
                          bias=param_of(b), bias_node=b))
    return sites
