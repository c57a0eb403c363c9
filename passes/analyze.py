"""analyze: a captured GraphModule -> LayerTable.

Each registered detector finds the call sites of one layer kind. Sites that share a weight form
one block (tied weights). Then every use of every trainable parameter is accounted for: a
parameter is in a block only if *all* its uses are the weight (or bias) argument of that block's
sites; otherwise it falls back to the diagonal preconditioner, and the reason names the other use.
"""
from __future__ import annotations

from torch import fx, nn

from gnfx.layer_table import Block, Fallback, LayerTable
from .linear import find_linear_sites
from .sites import Site

DETECTORS = {"linear": find_linear_sites}


def _module_path(param: str) -> str:
    return param.rpartition(".")[0]


def _block_name(weight: str) -> str:
    """The dotted module path of a layer's `.weight`; the parameter's own name otherwise."""
    path, _, leaf = weight.rpartition(".")
    return path if leaf == "weight" and path else weight


class _ParamIndex:
    """Maps graph nodes and module paths to the canonical parameter names of the original model."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        self.gm = gm

    def param_of(self, node) -> str | None:
        """The canonical name of the trainable parameter a `get_attr` node reads, else None."""
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        obj = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        name = self.names.get(id(obj))
        return name if name is not None and self.params[name].requires_grad else None


def _uses(gm: fx.GraphModule, index: _ParamIndex, leaves: dict[str, str]) -> dict[str, list[tuple]]:
    """Each trainable parameter's uses: (node that consumes it, get_attr node or None)."""
    uses: dict[str, list[tuple]] = {n: [] for n, p in index.params.items() if p.requires_grad}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            name = index.param_of(node)
            if name is not None:
                uses[name].extend((user, node) for user in node.users)
        elif node.op == "call_module":
            for _, p in modules[node.target].named_parameters():
                name = index.names.get(id(p))
                if name in uses:
                    uses[name].append((node, None))
    return uses


def _describe_use(node: fx.Node, leaves: dict[str, str]) -> str:
    if node.op == "call_module":
        why = leaves.get(node.target)
        return (f"inside leaf module {node.target!r} ({why})" if why
                else f"inside module {node.target!r}, a layer kind gnfx has no curvature block for")
    target = getattr(node.target, "__name__", str(node.target))
    return f"used by {node.op} {target!r} (node {node.name}), not a layer gnfx models"


def analyze(model: nn.Module, gm: fx.GraphModule, leaves: dict[str, str], form: str):
    """Build the LayerTable of `gm` (captured from `model`) and return it with the sites of each block."""
    index = _ParamIndex(model, gm)
    uses = _uses(gm, index, leaves)
    sites: list[Site] = [s for detect in DETECTORS.values() for s in detect(gm, index.param_of)]
    claimed = {(s.node, s.weight_node) for s in sites} | {(s.node, s.bias_node) for s in sites if s.bias}

    def unclaimed(name):
        return [u for u, attr in uses[name] if (u, attr) not in claimed]

    by_weight: dict[str, list[Site]] = {}
    for s in sites:
        by_weight.setdefault(s.weight, []).append(s)

    blocks, block_sites, fallbacks, in_block = [], {}, [], set()
    for weight, group in by_weight.items():
        if unclaimed(weight):
            continue  # reported below as a fallback with the other use
        biases = {s.bias for s in group}
        bias = biases.pop() if len(biases) == 1 else None
        if bias is not None and unclaimed(bias):
            bias = None
        shape = index.params[weight].shape
        block = Block(name=_block_name(weight), kind=group[0].kind, weight=weight, bias=bias,
                      d_in=shape[1], d_out=shape[0], sites=[s.node.name for s in group])
        blocks.append(block)
        block_sites[block.name] = group
        in_block.update(block.params)

    for name, param_uses in uses.items():
        if name in in_block:
            continue
        shape = tuple(index.params[name].shape)
        other = unclaimed(name)
        owners = {s.weight for s in sites if s.bias == name}
        if not param_uses:
            reason = "not used by the captured forward"
        elif other:
            reason = _describe_use(other[0], leaves)
        elif not owners <= in_block:
            reason = f"bias of {sorted(owners - in_block)[0]!r}, which is not in a curvature block"
        else:
            reason = "bias shared by linear maps with different biases"
        fallbacks.append(Fallback(param=name, shape=shape, reason=reason))
    return LayerTable(blocks, fallbacks, leaves, form), block_sites
