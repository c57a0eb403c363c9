"""unit_norm_weights: the unit-norm weights W = F.normalize(V, dim=d) of a graph
(gnfx.reparametrization.UnitNormWeight).

nGPT (nGPT-pytorch's NormLinear) keeps every weight on the unit sphere with a parametrization whose forward
is `F.normalize(V, dim=d, p=2)`: each row of V along d divided by max(‖V_r‖, ε). torch.fx (where the
parametrization is traced into) records the call `F.normalize(V, ...)`; torch.export its decomposition

    n = aten.linalg_vector_norm(V, 2, [d], True);  c = aten.clamp_min(n, ε)
    W = aten.div(V, aten.expand_as(c, V))

`find_unit_norm_weights` gives the node computing W of each such form whose V is a trainable parameter of 2 or
more dimensions that nothing else uses (passes/analyze.py makes that node stand for V, so that a layer detector
sees a weight of V's shape and its block steps W). nGPT's token embedding is such a W indexed by the token ids,
`W[ids]`, which passes/index_lookup.py rewrites into the embedding lookup of W as for a plain table.
Not recognized, so falling back: another p than 2, a norm over several dimensions, nGPT's `norm_eps` > 0 form
(a norm clamped to [1 − ε, 1 + ε] and detached), grouped hyperspheres (chunks stacked and concatenated).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from gnfx.reparametrization import UnitNormWeight

from .norm import DIV
from .sites import arg
from .weight_norm import weight_name

aten = torch.ops.aten
NORMALIZE = (F.normalize,)
VECTOR_NORMS = (aten.linalg_vector_norm.default,)
CLAMP_MIN = (aten.clamp_min.default,)
EXPAND_AS = (aten.expand_as.default, "expand_as")


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _only_use(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def _one_dim(dim) -> int | None:
    """The dimension `dim` names when it names one (an int, or a list of one int), else None."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim
    if isinstance(dim, (list, tuple)) and len(dim) == 1 and isinstance(dim[0], int):
        return dim[0]
    return None


def normalized(node) -> tuple[fx.Node, int, float, tuple[fx.Node, ...]] | None:
    """(V, d, ε, the chain's nodes) if `node` computes F.normalize(V, p=2, dim=d, eps=ε) in one of the forms of
    the module docstring, its inner nodes used by the chain only, else None."""
    if _is(node, NORMALIZE):
        p, dim, eps = arg(node, 1, "p", 2.0), _one_dim(arg(node, 2, "dim", 1)), arg(node, 3, "eps", 1e-12)
        if p != 2 or dim is None or not isinstance(eps, float) or arg(node, 4, "out") is not None:
            return None
        return arg(node, 0, "input"), dim, eps, (node,)
    if not _is(node, DIV) or len(node.args) != 2 or node.kwargs:
        return None
    v, divisor = node.args
    chain = [node]
    if _is(divisor, EXPAND_AS) and _only_use(divisor) and divisor.args[1] is v:
        chain.append(divisor)
        divisor = divisor.args[0]
    if not (_is(divisor, CLAMP_MIN) and _only_use(divisor) and isinstance(divisor.args[1], float)):
        return None
    norm, eps = divisor.args
    if not (_is(norm, VECTOR_NORMS) and _only_use(norm) and norm.args[0] is v and arg(norm, 1, "ord", 2) == 2
            and arg(norm, 3, "keepdim", False) is True and arg(norm, 4, "dtype") is None):
        return None
    dim = _one_dim(arg(norm, 2, "dim"))
    return None if dim is None else (v, dim, eps, (*chain, divisor, norm))


def find_unit_norm_weights(gm: fx.GraphModule, param_of, shape_of, uses: dict) -> dict[fx.Node, UnitNormWeight]:
    """Each node computing W = F.normalize(V, dim=d) (module docstring) of a trainable V (`param_of(node)` gives
    its name, `shape_of(name)` its shape) of 2 or more dimensions, used by that chain only (`uses`: each
    parameter's (consumer, get_attr) pairs), with its gnfx.reparametrization.UnitNormWeight."""
    found = {}
    for node in gm.graph.nodes:
        chain_of = normalized(node)
        if chain_of is None:
            continue
        v, dim, eps, chain = chain_of
        original = param_of(v)
        if original is None or len(shape_of(original)) < 2:
            continue
        if all(consumer in chain for consumer, _ in uses[original]):
            found[node] = UnitNormWeight(weight_name(original), original, dim, eps)
    return found
