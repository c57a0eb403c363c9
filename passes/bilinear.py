"""The bilinear-map detector: `z = torch.bilinear(x1, x2, W, b)` with a trainable W (d_out, d1, d2).

Recognized in both graph forms: `torch.bilinear` / `F.bilinear` (the same function; passes/lower.py makes it
of a stock nn.Bilinear call) under torch.fx and `aten.bilinear` under torch.export. The layer is the linear
map W.flatten(1) of the outer product vec(x1 x2ᵀ) (gnfx.layouts.bilinear): the site's input is the pair
(x1, x2), which the taps record as it is, d_in = d1·d2. A bias added by hand after a bias-free call
(`F.bilinear(x1, x2, W) + b`) is the block's bias, as for a linear map (passes/linear.py).
"""
from __future__ import annotations

import torch
from torch import fx

from .linear import _added_bias
from .sites import Site, arg

BILINEAR_OPS = (torch.bilinear, torch.ops.aten.bilinear.default)


def find_bilinear_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], dict]:
    """Every bilinear map whose weight is a trainable (d_out, d1, d2) parameter; nothing rejected."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in BILINEAR_OPS:
            continue
        x1, x2, w_node, b_node = node.args[0], node.args[1], arg(node, 2, "weight"), arg(node, 3, "bias")
        weight, bias = param_of(w_node), param_of(b_node)
        if weight is None or len(shape := shape_of(weight)) != 3:
            continue
        if bias is not None and shape_of(bias) != shape[:1]:
            bias = None
        uses = [(node, w_node)] + ([(node, b_node)] if bias is not None else [])
        site = Site(node=node, input=(x1, x2), weight=weight, bias=bias, uses=uses, d_in=shape[1] * shape[2],
                    d_out=shape[0], options={"weight_shape": shape})
        sites.append(_added_bias(site, param_of, shape_of))
    return sites, {}
