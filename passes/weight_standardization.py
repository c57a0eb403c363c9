"""weight_standardization: the weight standardizations W_r = (V_r − μ_r) / √(σ_r² + ε) of a graph
(gnfx.reparametrization.WeightStandardization).

BiT (Hugging Face's WeightStandardizedConv2d) and timm's StdConv2d standardize each output row of a
convolution's kernel V by a batch normalization of its rows, without running statistics or affine
parameters:

    W = F.batch_norm(V.reshape(1, C_out, -1), None, None, training=True, momentum=0.0, eps=ε).reshape_as(V)

torch.export records `aten.reshape(V, [1, C_out, -1])`, `aten.batch_norm.default(·, None, None, None,
None, True, momentum, ε, cudnn)` and `aten.reshape_as(·, V)`; torch.fx (where the module traces) the
same with `torch.batch_norm` or `F.batch_norm` and the tensor methods. `find_weight_standardizations`
gives the node computing W of each such chain whose V is a trainable parameter of 2 or more
dimensions that nothing else uses (passes/analyze.py makes that node stand for V, so that the conv
detector sees a kernel of V's shape and its block steps W). Not recognized, so falling back with the
reason of the use: a standardization written out as `(V − V.mean(...)) / V.std(...)`.

timm's ScaledStdConv2d (NFNets) gives the batch normalization a weight, one gain per row:
`F.batch_norm(..., weight=(gain * scale).view(-1), ...)`, recorded as the product of the parameter g by
the number c (`aten.mul.Tensor(g, c)`, `operator.mul`) and its view. Recognized as W_r = c g_r Ŵ_r
(gnfx.reparametrization.GainedWeightStandardization), whose block holds g as well: a weight γ computed
from one trainable g of C_out entries, used by nothing else, by views, reshapes and flattens and by
products or quotients by nonzero numbers, in any order (`g.view(-1)`, `c * g.flatten()`, `g / c`).
Not recognized (V and the weight's parameters fall back, with that reason): any other weight (a
product of two parameters, a function of g), and a batch normalization's bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from gnfx.reparametrization import GainedWeightStandardization, WeightStandardization

from .norm import DIV, MUL
from .sites import arg
from .weight_norm import weight_name

aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default, torch.reshape, "reshape", "view")
RESHAPE_AS = (aten.reshape_as.default, "reshape_as", "view_as")
BATCH_NORMS = (aten.batch_norm.default, torch.batch_norm)  # (input, weight, bias, mean, var, training, momentum, eps)
FLAT_VIEWS = RESHAPES + (aten._unsafe_view.default, aten.flatten.using_ints, torch.flatten, "flatten")
UNRECOGNIZED_GAIN = ("a weight standardization whose batch_norm weight is not one parameter (of one entry per "
                     "output row) times a number, or that has a bias: no curvature block (fallback)")


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _rows_of(node, shape) -> bool:
    """Whether `node` reshapes a tensor of `shape` to (1, shape[0], n), its rows side by side."""
    if not _is(node, RESHAPES):
        return False
    target = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(target) == 1 and isinstance(target[0], (tuple, list)):
        target = tuple(target[0])
    n = torch.Size(shape[1:]).numel()
    return len(target) == 3 and target[0] == 1 and target[1] in (-1, shape[0]) and target[2] in (-1, n)


def _standardized(node) -> tuple[fx.Node, object, object, float] | None:
    """(its input, its weight, its bias, ε) if `node` is a batch normalization in training mode without
    running statistics, else None."""
    if _is(node, BATCH_NORMS):
        names, training, eps = ("input", "weight", "bias", "running_mean", "running_var"), arg(node, 5, "training"), \
            arg(node, 7, "eps", 1e-5)
    elif _is(node, (F.batch_norm,)):
        names, training, eps = ("input", "running_mean", "running_var", "weight", "bias"), \
            arg(node, 5, "training", False), arg(node, 7, "eps", 1e-5)
    else:
        return None
    operands = {k: arg(node, i, k) for i, k in enumerate(names)}
    if training is not True or operands["running_mean"] is not None or operands["running_var"] is not None \
            or not isinstance(eps, float):
        return None
    return operands["input"], operands["weight"], operands["bias"], eps


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _gain(node, rows: int, param_of, shape_of) -> tuple[str, float, list[fx.Node]] | None:
    """(g, c, the nodes computing γ from g) if `node` computes γ = c · g (the module docstring's forms)
    of a trainable g of `rows` entries, each of those nodes used once, else None."""
    factor, chain = 1.0, []
    while param_of(node) is None:
        if not isinstance(node, fx.Node) or len(node.users) != 1 or len(node.args) < 1:
            return None
        chain.append(node)
        if _is(node, FLAT_VIEWS):
            node = node.args[0]
        elif _is(node, MUL) and len(node.args) == 2 and not node.kwargs and _number(node.args[1]):
            factor, node = factor * node.args[1], node.args[0]
        elif _is(node, MUL) and len(node.args) == 2 and not node.kwargs and _number(node.args[0]):
            factor, node = factor * node.args[0], node.args[1]
        elif _is(node, DIV) and len(node.args) == 2 and not node.kwargs and _number(node.args[1]) and node.args[1]:
            factor, node = factor / node.args[1], node.args[0]
        else:
            return None
    gain = param_of(node)
    if torch.Size(shape_of(gain)).numel() != rows or factor == 0:
        return None
    return gain, float(factor), chain


def find_weight_standardizations(gm: fx.GraphModule, param_of, shape_of,
                                 uses: dict) -> dict[fx.Node, WeightStandardization]:
    """Each node computing W = (the module docstring's chain) of a trainable V (`param_of(node)` gives
    its name, `shape_of(name)` its shape) of 2 or more dimensions, used by that chain only (`uses`: each
    parameter's (consumer, get_attr) pairs), with its gnfx.reparametrization.WeightStandardization, or
    GainedWeightStandardization where the batch normalization has a gain (and the gain too is used by
    that chain only). A chain of that form whose weight is not such a gain, or with a bias, is left out
    with the reason for the report."""
    found = {}
    for node in gm.graph.nodes:
        if not _is(node, RESHAPE_AS) or len(node.args) != 2:
            continue
        normalized, like = node.args
        standardized = _standardized(normalized)
        if standardized is None or len(normalized.users) != 1:
            continue
        rows, weight, bias, eps = standardized
        original = param_of(like)
        if original is None or len(shape_of(original)) < 2 or not _rows_of(rows, shape_of(original)):
            continue
        if param_of(rows.args[0]) != original or len(rows.users) != 1:
            continue
        if not all(consumer in (rows, node) for consumer, _ in uses[original]):
            continue
        if weight is None and bias is None:
            found[node] = WeightStandardization(weight_name(original), original, eps)
            continue
        gain = _gain(weight, shape_of(original)[0], param_of, shape_of) if bias is None else None
        if gain is None:
            rows.meta["gnfx_fallback_reason"] = UNRECOGNIZED_GAIN
            continue
        name, factor, chain = gain
        if all(consumer in (*chain, normalized) for consumer, _ in uses[name]):
            found[node] = GainedWeightStandardization(weight_name(original), original, eps, name, factor)
    return found
