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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from gnfx.reparametrization import WeightStandardization

from .sites import arg
from .weight_norm import weight_name

aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default, torch.reshape, "reshape", "view")
RESHAPE_AS = (aten.reshape_as.default, "reshape_as", "view_as")
BATCH_NORMS = (aten.batch_norm.default, torch.batch_norm)  # (input, weight, bias, mean, var, training, momentum, eps)


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


def _standardized(node) -> tuple[fx.Node, float] | None:
    """(its input, ε) if `node` is a batch normalization in training mode without running statistics
    or affine parameters, else None."""
    if _is(node, BATCH_NORMS):
        operands = [arg(node, i, k) for i, k in enumerate(("input", "weight", "bias", "running_mean", "running_var"))]
        training, eps = arg(node, 5, "training"), arg(node, 7, "eps", 1e-5)
    elif _is(node, (F.batch_norm,)):
        operands = [arg(node, i, k) for i, k in enumerate(("input", "running_mean", "running_var", "weight", "bias"))]
        training, eps = arg(node, 5, "training", False), arg(node, 7, "eps", 1e-5)
    else:
        return None
    if training is not True or any(o is not None for o in operands[1:]) or not isinstance(eps, float):
        return None
    return operands[0], eps


def find_weight_standardizations(gm: fx.GraphModule, param_of, shape_of,
                                 uses: dict) -> dict[fx.Node, WeightStandardization]:
    """Each node computing W = (the module docstring's chain) of a trainable V (`param_of(node)` gives
    its name, `shape_of(name)` its shape) of 2 or more dimensions, used by that chain only (`uses`: each
    parameter's (consumer, get_attr) pairs), with its gnfx.reparametrization.WeightStandardization."""
    found = {}
    for node in gm.graph.nodes:
        if not _is(node, RESHAPE_AS) or len(node.args) != 2:
            continue
        normalized, like = node.args
        standardized = _standardized(normalized)
        if standardized is None or len(normalized.users) != 1:
            continue
        rows, eps = standardized
        original = param_of(like)
        if original is None or len(shape_of(original)) < 2 or not _rows_of(rows, shape_of(original)):
            continue
        if param_of(rows.args[0]) != original or len(rows.users) != 1:
            continue
        if all(consumer in (rows, node) for consumer, _ in uses[original]):
            found[node] = WeightStandardization(weight_name(original), original, eps)
    return found
