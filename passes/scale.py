"""The scale detector: a trainable per-feature scale `z = x ⊙ γ (+ β)` of any input (a "layer scale"; with
a bias, an affine map per feature: MobileBERT's NoNorm, ResMLP's Affine), read as the per-feature scalar
layers of gnfx.layouts.scale.

ConvNeXt, CaiT, DeiT III and DINOv2 scale each residual branch by a trainable vector γ (d,). Recognized:
  * `x * γ`, `γ * x`, `torch.mul`, `x.mul(γ)` and `aten.mul.Tensor` with γ a 1-D parameter of d > 1
    entries: broadcasting pairs γ with the last dimension of x, the features;
  * `x * γ.view(1, -1, 1, 1)` (or `reshape`, or the view's shape written out, `(1, d, 1, ..., 1)`) on a
    channels-first map: broadcasting pairs γ with x's dimension k - 1 from the end, for a view of k
    dimensions (dimension 1 of a (N, C, H, W) map for (1, d, 1, 1)); the site records that position,
    `feature_dim` = -(k - 1) (-1 for a 1-D γ);
  * in general γ is a parameter, or a chain of views and unsqueezes of one (PoolFormer's
    `γ.unsqueeze(-1).unsqueeze(-1)`, (d, 1, 1)), each used once, whose shape is all ones but one
    dimension, the features' (ConvNeXt V2's GRN γ, a (1, 1, 1, d) parameter on (N, H, W, d) maps):
    broadcasting pairs it with x's dimension as far from the end, `feature_dim`;
  * γ cast or offset by a number on the way, `x * (γ + 1.0)` (x-transformers' LayerNorm and RMSNorm,
    `F.layer_norm(x) * (γ + float(unit_offset))`; passes/norm.py `offset_operand`): z = x ⊙ (γ + c) has
    ∂z/∂γ = x, the same block and statistics (the layout never reads γ's value).
A trainable β (d,) added to the product of a 1-D γ (its only use), `x * γ + β`, is the block's bias
(∂ℓ/∂z is the same on either side of the sum; the norm layout's ā_f = (x_f, 1)).
x must be computed from a model input (a product of γ with a buffer or another parameter is no layer).
A product whose other operand is a hand-written normalization is the norm kind's (passes/norm.py);
a scalar gain (a γ of one entry) is no per-feature layer and stays a fallback.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .norm import MUL, _is, _normalized, added_bias, offset_operand
from .sites import Site

aten = torch.ops.aten
RESHAPES = (torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view", "reshape")
UNSQUEEZES = (torch.unsqueeze, aten.unsqueeze.default, "unsqueeze")


def _view_shape(node) -> tuple | None:
    """The target shape of a view/reshape node, or None when it is not one."""
    if not _is(node, RESHAPES):
        return None
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(shape) if all(isinstance(s, int) for s in shape) else None


def _reshaped(node, shape: tuple) -> tuple | None:
    """The shape a view/reshape or unsqueeze `node` gives a tensor of `shape`, or None when it is
    neither (or its shape is not written out)."""
    if _is(node, UNSQUEEZES) and isinstance(node.args[1], int):
        dim = node.args[1] + len(shape) + 1 if node.args[1] < 0 else node.args[1]
        return shape[:dim] + (1,) + shape[dim:]
    target = _view_shape(node)
    if target is None or target.count(-1) > 1:
        return None
    known = math.prod(s for s in target if s != -1)
    return tuple(math.prod(shape) // known if s == -1 else s for s in target)


def _scale(operand, param_of, shape_of):
    """(parameter name, (consumer, get_attr) use, feature_dim) if `operand` is a per-feature scale
    vector γ (module docstring): a parameter, or a chain of views, unsqueezes, casts and offsets by a
    number of one, each used once, whose shape is all ones but one dimension, the features'; None
    otherwise."""
    chain, node = [], operand
    while param_of(node) is None:
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None
        if _is(node, RESHAPES) or _is(node, UNSQUEEZES):
            inner = node.args[0]
        elif (inner := offset_operand(node)) is None:
            return None
        chain.append(node)
        node = inner
    name = param_of(node)
    shape = tuple(shape_of(name))
    if sum(s != 1 for s in shape) > 1:
        return None
    for step in reversed(chain):
        if _is(step, RESHAPES) or _is(step, UNSQUEEZES):
            shape = _reshaped(step, shape)
        if shape is None:
            return None
    features = [i for i, s in enumerate(shape) if s != 1]
    if len(features) > 1:
        return None
    feature_dim = features[0] - len(shape) if features else -1
    return name, (chain[-1] if chain else None, node), feature_dim


def _input_dependent(gm: fx.GraphModule) -> set:
    """The nodes computed from a placeholder of the graph (a model input), in one pass over its
    topological order."""
    reads = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(m in reads for m in node.all_input_nodes):
            reads.add(node)
    return reads


def find_scale_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Layer-scale sites (module docstring); no fallback reasons of their own."""
    sites, reads = [], None
    for node in gm.graph.nodes:
        if not _is(node, MUL) or len(node.args) != 2 or node.kwargs:
            continue
        for w_node, x in (node.args, node.args[::-1]):
            found = _scale(w_node, param_of, shape_of)
            if found is None or not isinstance(x, fx.Node) or param_of(x) is not None:
                continue
            name, (consumer, get_attr), feature_dim = found
            reads = _input_dependent(gm) if reads is None else reads
            d = math.prod(shape_of(name))
            if d < 2 or _normalized(x) or x not in reads:
                break
            out, bias, uses = node, None, [(consumer or node, get_attr)]
            added = added_bias(node, param_of) if len(shape_of(name)) == 1 else None
            if added is not None and shape_of(added[1]) == (d,):
                out, bias, b_node = added
                uses.append((out, b_node))
            sites.append(Site(node=out, input=x, weight=name, bias=bias, uses=uses,
                              d_in=1, d_out=d, options={"normalize": ("given",), "feature_dim": feature_dim,
                                                        "channels_first": feature_dim != -1,
                                                        "weight_shape": tuple(shape_of(name))}))
            break
    return sites, []
