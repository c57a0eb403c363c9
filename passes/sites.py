"""A call site: one application of a layer in the graph, as a detector found it."""
from __future__ import annotations

import dataclasses

from torch import fx


@dataclasses.dataclass
class Site:
    """One use of a layer: `node` computes `z` from `input` (the `a` of DESIGN §1) with the
    parameter named `weight` (and `bias`, or None), read by the `get_attr` nodes given."""

    node: fx.Node
    kind: str
    input: fx.Node
    weight: str
    weight_node: fx.Node
    bias: str | None
    bias_node: fx.Node | None
