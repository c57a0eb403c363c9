"""The convolution detector: `F.conv1d/2d/3d` and `aten.conv{1,2,3}d` / `aten.convolution` with a
trainable weight. Any stride, padding (numbers or 'same'/'valid'), dilation and groups (grouped
and depthwise convolutions are blocks of independent row groups, gnfx.layouts.conv). Transposed
convolutions are their own kind (passes/conv_transpose.py). A convolution with a window of its kernel
(`W[:o, :c, s:s + k, s:s + k]`, a supernet's active channels and kernel, passes/weight_slices.py) is a site of
the full kernel with that window (Site.window), its 'same' padding that of the active kernel; a grouped one
only with all its output channels (a window of them would change which channels each group reads).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from gnfx.layouts.conv import same_padding

from .sites import Site, arg, computed_weight_reason
from .weight_slices import sliced_parameter

aten = torch.ops.aten
CONV_OPS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
            aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}


def _tuple(x, n) -> tuple[int, ...]:
    return tuple(x) * (n // len(x)) if isinstance(x, (tuple, list)) else (int(x),) * n


def kernel_of(node: fx.Node, param_of, shape_of):
    """(weight, bias, weight shape, kernel size, uses) of a convolution node (plain or transposed: the
    weight its argument 1, the bias its argument 2), or None when its weight is not a trainable parameter."""
    w_node, b_node = arg(node, 1, "weight"), arg(node, 2, "bias")
    weight = param_of(w_node)
    if weight is None:
        return None
    shape = shape_of(weight)
    bias = param_of(b_node)
    uses = [(node, w_node)] + ([(node, b_node)] if bias is not None else [])
    return weight, bias, shape, tuple(shape[2:]), uses


def _sliced_kernel(node: fx.Node, groups, param_of, shape_of):
    """(weight, bias, weight shape, active kernel size, uses, window) of a convolution whose weight is a window
    of a trainable parameter (module docstring) and whose bias, if any, the same output window of a trainable
    one, or None."""
    w_node, b_node = arg(node, 1, "weight"), arg(node, 2, "bias")
    sliced = sliced_parameter(w_node, param_of, shape_of)
    if sliced is None:
        return None
    weight, use, window = sliced
    shape = shape_of(weight)
    if len(shape) < 3 or not isinstance(groups, int) or (groups != 1 and window[0] != (0, shape[0])) \
            or any(hi is None for _, hi in window[2:]):
        return None
    bias = param_of(b_node)
    bias_use = (node, b_node)
    if bias is not None and window[0] != (0, shape[0]):
        return None
    if bias is None and b_node is not None:
        bias_sliced = sliced_parameter(b_node, param_of, shape_of)
        if bias_sliced is None or bias_sliced[2] != window[:1] or shape_of(bias_sliced[0]) != shape[:1]:
            return None
        bias, bias_use = bias_sliced[0], bias_sliced[1]
    uses = [use] + ([bias_use] if bias is not None else [])
    return weight, bias, shape, tuple(hi - lo for lo, hi in window[2:]), uses, window


def find_conv_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Convolution sites, and (the slice of the weight, why) for a window of a grouped convolution's output
    channels (module docstring)."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default:
            if node.args[6]:
                continue  # transposed: passes/conv_transpose.py
            stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
        elif node.target in CONV_OPS:
            stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
            dilation, groups = arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1)
        else:
            continue
        found = kernel_of(node, param_of, shape_of)
        found = found + (None,) if found is not None else _sliced_kernel(node, groups, param_of, shape_of)
        if found is None:
            sliced = sliced_parameter(arg(node, 1, "weight"), param_of, shape_of)
            if sliced is not None and groups != 1 and sliced[2][0] != (0, shape_of(sliced[0])[0]):
                rejected.append((sliced[1][0], f"a window {sliced[2]} of the kernel {shape_of(sliced[0])} of a grouped "
                                               f"convolution (groups={groups}) that cuts its output channels: which "
                                               f"input channels each group reads changes with the window, so no block "
                                               f"of the full kernel holds it"))
            elif sliced is None and (why := computed_weight_reason(node, "convolution", param_of)):
                rejected.append((node, why))
            continue
        weight, bias, shape, kernel, uses, window = found
        n = len(kernel)
        stride, dilation = _tuple(stride, n), _tuple(dilation, n)
        if padding == "same":
            pads = same_padding(kernel, dilation)
        elif padding == "valid":
            pads = [(0, 0)] * n
        else:
            pads = [(p, p) for p in _tuple(padding, n)]
        d_in = shape[1] * math.prod(shape[2:])
        sites.append(Site(node=node, input=node.args[0], weight=weight, bias=bias, uses=uses,
                          d_in=d_in, d_out=shape[0],
                          options={"kernel_size": tuple(shape[2:]), "stride": stride, "padding": pads,
                                   "dilation": dilation, "groups": groups, "weight_shape": shape},
                          window=window))
    return sites, rejected

