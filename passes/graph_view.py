"""Views of a GraphModule for inspection: a networkx DiGraph and Graphviz DOT text."""
from __future__ import annotations

import networkx as nx
from torch import fx


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
