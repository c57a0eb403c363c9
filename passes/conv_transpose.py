"""The transposed-convolution detector: `F.conv_transpose1d/2d/3d`, `aten.conv_transpose{1,2,3}d`
and `aten.convolution` with transposed=True, with a trainable weight (C_in, C_out/groups, *k). Any
stride, padding, output_padding, dilation and groups (gnfx.layouts.conv_transpose).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from .conv import _tuple, kernel_of
from .sites import Site, arg, computed_weight_reason

aten = torch.ops.aten
CONV_TRANSPOSE_OPS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                      aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}


def find_conv_transpose_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Transposed-convolution sites, and the bias of one whose weight is computed, with its reason."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        generic = node.target is aten.convolution.default and bool(node.args[6])  # transposed=True
        if node.op != "call_function" or not (generic or node.target in CONV_TRANSPOSE_OPS):
            continue
        if (found := kernel_of(node, param_of, shape_of)) is None:
            if why := computed_weight_reason(node, "transposed convolution", param_of):
                rejected.append((node, why))
            continue
        weight, bias, shape, kernel, uses = found
        if generic:
            stride, padding, dilation, output_padding, groups = (node.args[i] for i in (3, 4, 5, 7, 8))
        else:
            stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
            output_padding, groups = arg(node, 5, "output_padding", 0), arg(node, 6, "groups", 1)
            dilation = arg(node, 7, "dilation", 1)
        n = len(kernel)
        sites.append(Site(node=node, input=node.args[0], weight=weight, bias=bias, uses=uses,
                          d_in=shape[0] // groups * math.prod(kernel), d_out=shape[1] * groups,
                          options={"kernel_size": kernel, "stride": _tuple(stride, n), "padding": _tuple(padding, n),
                                   "output_padding": _tuple(output_padding, n), "dilation": _tuple(dilation, n),
                                   "groups": groups, "weight_shape": shape}))
    return sites, rejected
