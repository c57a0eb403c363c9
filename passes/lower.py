"""lower: turn opaque module calls into explicit functional ops over the same parameters.

`lower_linear_modules` rewrites each `call_module` of an `nn.Linear` (with the stock forward)
into `F.linear(x, self.<path>.weight, self.<path>.bias)`, so that every later pass sees linear
maps in one form: a linear op whose weight is a `get_attr` node.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn


def lower_linear_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite `call_module` nodes of stock `nn.Linear` modules to `F.linear` on `get_attr` nodes."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
            continue
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            linear = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
        linear.meta.update(node.meta)
        linear.meta["gnfx_module"] = node.target
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
