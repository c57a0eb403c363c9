"""The values a captured graph records for its nodes, for the passes that rewrite by shape.

torch.export's graph keeps each node's value (a FakeTensor, or a SymInt) in `node.meta["val"]`,
with symbolic sizes for its dynamic dimensions; torch.fx's symbolic trace keeps none. Sizes are
compared with `statically_known_true`, which adds no guard: an equality that holds only for some
sizes counts as unknown.
"""
from __future__ import annotations

from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def value_of(node):
    """The value the graph recorded for `node` (None: no node, or no value recorded)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def same_sizes(a, b) -> bool:
    """Whether the size sequences `a` and `b` are equal for every value of their symbols."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def known_equal(a, b) -> bool:
    """Whether the sizes a and b are equal for every value of their symbols."""
    return statically_known_true(a == b)
