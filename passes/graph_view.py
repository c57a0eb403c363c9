"""Views of a GraphModule for inspection: a networkx DiGraph and Graphviz DOT text; and the nodes a set of
nodes is computed from."""
from __future__ import annotations

from typing import Iterable

import networkx as nx
from torch import fx


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node they are computed from."""
    seen, stack = set(), list(nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _target(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Nodes are FX node names with attributes `op`, `target` and `role` (the gnfx role: 'linear',
    'tap', ..., or None); an edge u -> v means v reads the value of u."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=_target(node), role=node.meta.get("gnfx_role"))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def _color(role: str | None) -> str:
    """Taps light blue, the call sites of blocks (their role is their layer kind) orange, the rest white."""
    return "lightblue" if role == "tap" else "orange" if role else "white"


def to_dot(gm: fx.GraphModule) -> str:
    """Graphviz DOT text of the graph; blocks are orange, taps light blue."""
    g = to_networkx(gm)
    lines = ["digraph gnfx {", "  node [shape=box, fontname=monospace];"]
    for name, attrs in g.nodes(data=True):
        label = f"{name}\\n{attrs['op']}: {attrs['target']}".replace('"', "'")
        color = _color(attrs["role"])
        lines.append(f'  "{name}" [label="{label}", style=filled, fillcolor={color}];')
    lines += [f'  "{u}" -> "{v}";' for u, v in g.edges]
    lines.append("}")
    return "\n".join(lines)
