"""identity views: reshapes of a parameter that give back its own shape, read as the parameter.

Mamba passes its depthwise conv kernel W (d, 1, k) to a helper as `W.squeeze(1)`, which calls
`F.conv1d(x, weight.unsqueeze(1), ...)`: the conv's weight operand is W itself, reached through two
reshapes, and the conv detector, which reads a parameter, saw none ("used by call_function
'squeeze.dim'"). A chain of reshapes (squeeze, unsqueeze, view, reshape, flatten, unflatten: none
reorders the entries, which stay in row-major order) whose result has the parameter's shape is the
parameter: `identity_views` makes that result's users read the parameter, and the chain, then
unused, is removed. Each step is the only user of the one before and takes constant arguments; the
shapes are those of replaying the chain on a meta tensor of the parameter's shape, in both graph forms.
"""
from __future__ import annotations

import torch
from torch import fx

from .rewrite import recompiled

aten = torch.ops.aten
RESHAPES = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.view.default,
            aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints, aten.unflatten.int,
            torch.squeeze, torch.unsqueeze, torch.reshape, torch.flatten, torch.unflatten)
RESHAPE_METHODS = ("squeeze", "unsqueeze", "view", "reshape", "flatten", "unflatten")


def _constant(value) -> bool:
    return isinstance(value, (int, type(None))) or (isinstance(value, (tuple, list)) and all(map(_constant, value)))


def replayed(node: fx.Node, meta: torch.Tensor) -> torch.Tensor | None:
    """The meta tensor reshaping `meta` as `node` reshapes its first argument, or None when `node` is no
    reshape with constant arguments."""
    rest = node.args[1:]
    if not _constant(rest) or not all(map(_constant, node.kwargs.values())):
        return None
    if node.op == "call_function" and node.target in RESHAPES:
        return node.target(meta, *rest, **node.kwargs)
    if node.op == "call_method" and node.target in RESHAPE_METHODS:
        return getattr(meta, node.target)(*rest, **node.kwargs)
    return None


def identity_views(gm: fx.GraphModule) -> fx.GraphModule:
    """Read every chain of reshapes of a trainable parameter that ends in its shape as the parameter
    (module docstring)."""
    changed = False
    for attr in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        try:
            param = gm.get_parameter(attr.target)
        except AttributeError:
            continue
        if not param.requires_grad:
            continue
        for first in list(attr.users):
            chain, node, meta = [], first, torch.empty(param.shape, device="meta")
            while True:
                meta = replayed(node, meta)
                if meta is None:
                    break
                chain.append(node)
                if meta.shape == param.shape:
                    node.replace_all_uses_with(attr)
                    for reshape in reversed(chain):
                        gm.graph.erase_node(reshape)
                    changed = True
                    break
                if len(node.users) != 1:
                    break
                (node,) = node.users
    return recompiled(gm, changed)
