"""The common ending of the graph rewrites: a node replaced by another, and the graph checked and its
code regenerated once after a pass changed it."""
from __future__ import annotations

from torch import fx


def replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """Every use of `node` becomes a use of `new`, and `node` leaves the graph."""
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def recompiled(gm: fx.GraphModule, changed: bool = True) -> fx.GraphModule:
    """`gm`, its graph linted and its Python code regenerated if the pass `changed` it."""
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
