"""masked_weights: the masked weights W = M ⊙ V of a graph (gnfx.reparametrization.MaskedWeight).

MADE's masked linear layers multiply their weight entrywise by a constant 0/1 mask before the linear map:
zuko's MaskedLinear (the hyper-networks of zuko.flows.MAF, NSF and its other autoregressive flows) computes
`F.linear(x, self.mask * self.weight, self.bias)` with a bool buffer, nflows' `F.linear(x, self.weight *
self.mask, self.bias)` with a floating one. Both captures record the product as one `mul` (torch.fx: the
operator, the tensor method or torch.mul; torch.export: `aten.mul.Tensor`) of two attribute reads.
`find_masked_weights` gives each such product, in either order, whose V is a trainable parameter of 2 or
more dimensions that nothing else uses (but the products by the same M at the layer's other calls:
normflows' autoregressive inverse calls its MADE once per feature) and whose M is a tensor the graph reads as an attribute that is no
trainable parameter (a buffer, a frozen parameter), of exactly V's shape (passes/analyze.py makes the
product stand for V, so that the linear detector sees a weight of V's shape and its block steps W), M read
through a cast (torch.nn.utils.prune's hook computes `weight_mask.to(dtype) * weight_orig`, which torch.export
records with its `to`; passes/pruning.py gives the product under torch.fx). Not
recognized, so falling back with the reason of the use: a mask of another shape that broadcasts (one per
row or column), a mask computed in the forward, a product of two trainable parameters.

A weight scaled by a number, `V * s`, `s * V` or `V / s` (s a nonzero Python number in the graph:
e3nn's FullyConnectedNet computes `x @ (V / (h_in * var_in) ** 0.5)`, the radial MLPs whose outputs weight
e3nn's, NequIP's and MACE's tensor products; its weights fell back, "used by call_function 'truediv'"),
under the same conditions on V and read by linear maps only (F.linear, matmul, mm, addmm), directly or through
a chain of reshapes (efficient-kan's `(spline_weight * 1.0).view(out, -1)` with its standalone spline scaler off;
passes/linear.py reads the view), stands for V too
(gnfx.reparametrization.ScaledWeight): its linear block holds V on the input rows s a (passes/analyze.py).
A scaled weight of another kind (StyleGAN's equalized-lr convolutions) still falls back, so that the
diagonal keeps stepping V.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from gnfx.reparametrization import MaskedWeight, ScaledWeight

from .identity_views import RESHAPE_METHODS, RESHAPES
from .linear import ADDMM_OPS, LINEAR_OPS, MATMUL_OPS
from .norm import DIV, MUL, _is, _uncast
from .weight_standardization import _number

LINEAR_READS = (*LINEAR_OPS, *MATMUL_OPS, *ADDMM_OPS)  # the reads of a scaled weight (module docstring)


def _constant(gm: fx.GraphModule, node, param_of) -> tuple[nn.Module, str, torch.Tensor] | None:
    """(the module holding it, its attribute name, the tensor) of an attribute read `node` that gives a tensor
    that is no trainable parameter, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or param_of(node) is not None:
        return None
    path, _, name = node.target.rpartition(".")
    holder = gm
    for part in path.split(".") if path else ():
        holder = getattr(holder, part, None)
    value = getattr(holder, name, None)
    return (holder, name, value) if isinstance(holder, nn.Module) and isinstance(value, torch.Tensor) else None


def _pruned_name(original: str, mask: str) -> str:
    """The model's name of W: `fc.weight` for torch.nn.utils.prune's `fc.weight_orig` masked by `weight_mask`
    (the attribute its hook sets), the parameter's own name otherwise."""
    path, _, leaf = original.rpartition(".")
    if leaf.endswith("_orig") and mask == f"{leaf[:-len('_orig')]}_mask":
        return f"{path}.{leaf[:-len('_orig')]}" if path else leaf[:-len("_orig")]
    return original


def find_masked_weights(gm: fx.GraphModule, param_of, shape_of, uses: dict) -> dict[fx.Node, MaskedWeight]:
    """Each product M ⊙ V (module docstring) of a trainable V of 2 or more dimensions (`param_of(node)` gives
    its name, `shape_of(name)` its shape) by a constant M of V's shape, with its
    gnfx.reparametrization.MaskedWeight, where V's uses (`uses`: each parameter's (consumer, get_attr)
    pairs) are all such products by the same M: one per call of a layer called several times (normflows'
    Autoregressive.inverse calls its MADE once per feature), each product standing for V at its call."""
    products: dict[str, dict[fx.Node, tuple]] = {}  # V -> {its product node: (M's holder, attribute, M)}
    for node in gm.graph.nodes:
        if not _is(node, MUL) or len(node.args) != 2 or node.kwargs:
            continue
        for weight, other in (node.args, reversed(node.args)):
            original, constant = param_of(weight), _constant(gm, _uncast(other), param_of)
            if original is not None and constant is not None and len(shape_of(original)) >= 2 and \
                    tuple(constant[2].shape) == shape_of(original):
                products.setdefault(original, {})[node] = constant
    found = {}
    for original, constants in products.items():
        holder, name, mask = next(iter(constants.values()))
        if all(m is mask for _, _, m in constants.values()) and all(consumer in constants for consumer, _ in uses[original]):
            found.update((node, MaskedWeight(_pruned_name(original, name), original, holder, name)) for node in constants)
    return {**found, **_scaled_weights(gm, param_of, shape_of, uses)}


def _read_linearly(node: fx.Node) -> bool:
    """Whether `node` is a linear map, or a chain of reshapes, each the only user of the one before, that one
    reads (module docstring)."""
    while _is(node, RESHAPES) or (node.op == "call_method" and node.target in RESHAPE_METHODS):
        if len(node.users) != 1:
            return False
        (node,) = node.users
    return _is(node, LINEAR_READS)


def _scaled_weights(gm: fx.GraphModule, param_of, shape_of, uses: dict) -> dict[fx.Node, ScaledWeight]:
    """Each V * s, s * V or V / s (module docstring) of a trainable V of 2 or more dimensions, its only use, by
    a nonzero number s, read by linear maps only, with its gnfx.reparametrization.ScaledWeight."""
    found = {}
    for node in gm.graph.nodes:
        if len(node.args) != 2 or node.kwargs or not (_is(node, MUL) or _is(node, DIV)):
            continue
        pairs = [node.args] if _is(node, DIV) else [node.args, tuple(reversed(node.args))]
        for weight, number in pairs:
            original = param_of(weight)
            if original is None or not _number(number) or number == 0 or len(shape_of(original)) < 2:
                continue
            read_linearly = all(_read_linearly(user) for user in node.users)
            if read_linearly and all(consumer is node for consumer, _ in uses[original]):
                found[node] = ScaledWeight(original, original, 1 / number if _is(node, DIV) else number)
    return found
