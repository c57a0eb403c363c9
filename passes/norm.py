"""The norm detector: the affine parameters `z = x̂ ⊙ γ + β` of a normalization (gnfx.layouts.norm).

Recognized, with a trainable 1-D weight γ (d,) and an optional bias β (d,):
  * the modules nn.LayerNorm, nn.RMSNorm (over the last dimension), nn.GroupNorm,
    nn.BatchNorm1d/2d/3d and nn.InstanceNorm1d/2d/3d (in training mode a group norm with one group
    per channel) with their stock forward, as `call_module` nodes (torch.fx keeps torch.nn's
    modules as leaves);
  * `F.layer_norm`, `F.rms_norm` (one normalized dimension), `F.group_norm`, `F.batch_norm` in
    training mode, `F.instance_norm` normalizing with the input's statistics (a group norm with one
    group per channel), and their aten ops (`aten.layer_norm`, `aten.rms_norm`, `aten.group_norm`,
    `aten.batch_norm`, `aten.instance_norm`), as torch.export writes them (nn.InstanceNorm1d/2d/3d too);
  * a hand-written norm: `γ * h` (either order) where h is `x * rsqrt(...)` or `x / sqrt(...)`,
    possibly cast (`.to`, `.float()`, `.type_as`), then optionally `+ β`: RMSNorm as Llama and T5
    write it. The site's input is h itself, which already is x̂. γ may be cast and offset by a
    number c, `h * (1.0 + γ.float())` as Gemma writes its RMSNorm (γ initialized to 0): z = x̂ ⊙ (γ + c)
    has ∂z/∂γ = x̂ as z = x̂ ⊙ γ does, so the block and its statistics are the same (the layout
    reads x̂ and ∂ℓ/∂z, never γ's value). γ may have k > 1 dimensions when its shape is that of x̂'s
    last k (Cohere's q_norm: γ (H, D) on x̂ (N, T, H, D), each head normalized over its own D
    features): the features are those H·D entries, `feature_dims` = k (gnfx.layouts.norm). x̂'s
    shape is read from the value torch.export records for it; torch.fx's graph holds none, and there
    only a 1-D γ is taken.
A norm over several dimensions, or a batch norm captured with its running statistics (eval mode),
is reported as a fallback with that reason.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .shapes import same_sizes, value_of
from .sites import Site, arg

aten = torch.ops.aten

# op -> (normalization, positions of (weight, bias, eps), default eps, features on dim 1)
FUNCTIONS = {
    F.layer_norm: ("layer_norm", (2, 3, 4), 1e-5, False),
    aten.layer_norm.default: ("layer_norm", (2, 3, 4), 1e-5, False),
    F.rms_norm: ("rms_norm", (2, None, 3), None, False),
    aten.rms_norm.default: ("rms_norm", (2, None, 3), None, False),
    F.group_norm: ("group_norm", (2, 3, 4), 1e-5, True),
    aten.group_norm.default: ("group_norm", (2, 3, 4), 1e-5, True),
    F.batch_norm: ("batch_norm", (3, 4, 7), 1e-5, True),
    aten.batch_norm.default: ("batch_norm", (1, 2, 7), 1e-5, True),
    F.instance_norm: ("instance_norm", (3, 4, 7), 1e-5, True),
    aten.instance_norm.default: ("instance_norm", (1, 2, 7), 1e-5, True),
}
KEYWORDS = {"layer_norm": ("weight", "bias", "eps"), "rms_norm": ("weight", None, "eps"),
            "group_norm": ("weight", "bias", "eps"), "batch_norm": ("weight", "bias", "eps"),
            "instance_norm": ("weight", "bias", "eps")}
MODULES = ((nn.LayerNorm, "layer_norm"), (nn.RMSNorm, "rms_norm"), (nn.GroupNorm, "group_norm"),
           (nn.modules.batchnorm._BatchNorm, "batch_norm"), (nn.modules.instancenorm._InstanceNorm, "instance_norm"))
MUL = (operator.mul, torch.mul, aten.mul.Tensor, "mul")
DIV = (operator.truediv, torch.div, aten.div.Tensor, "div")
ADD = (operator.add, torch.add, aten.add.Tensor, "add")
RSQRT = (torch.rsqrt, aten.rsqrt.default, "rsqrt")
SQRT = (torch.sqrt, aten.sqrt.default, "sqrt")
CASTS = (aten._to_copy.default, aten.to.dtype, aten.type_as.default, "to", "float", "type_as")


def _is(node, ops) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in ops


def _uncast(node):
    while _is(node, CASTS):
        node = node.args[0]
    return node


def _normalized(h) -> bool:
    """Whether h is `x * rsqrt(...)` or `x / sqrt(...)` (possibly cast): a hand-written x̂."""
    h = _uncast(h)
    if _is(h, MUL):
        return any(_is(_uncast(x), RSQRT) for x in h.args[:2])
    return _is(h, DIV) and _is(_uncast(h.args[1]), SQRT)


def _site(node, x, weight, bias, uses, how, channels_first, shape_of, feature_dims: int = 1) -> Site | None:
    shape = tuple(shape_of(weight))
    if len(shape) != feature_dims or (bias is not None and tuple(shape_of(bias)) != shape):
        return None
    options = {"normalize": how, "channels_first": channels_first, "weight_shape": shape}
    if feature_dims > 1:
        options["feature_dims"] = feature_dims
    return Site(node=node, input=x, weight=weight, bias=bias, uses=uses, d_in=1, d_out=math.prod(shape),
                options=options)


def _feature_dims(weight_shape, h) -> int:
    """k: γ of k dimensions covers x̂'s last k when its shape is theirs (module docstring); 1 otherwise,
    and where the graph records no value for x̂ (torch.fx)."""
    value = value_of(h)
    if len(weight_shape) < 2 or not isinstance(value, torch.Tensor) or value.dim() <= len(weight_shape):
        return 1
    return len(weight_shape) if same_sizes(tuple(value.shape[-len(weight_shape):]), weight_shape) else 1


def _module_site(gm, node, param_of, shape_of):
    """(site or None, rejection reason or None) of a call_module norm."""
    mod = gm.get_submodule(node.target)
    op = next((name for cls, name in MODULES if isinstance(mod, cls) and type(mod).forward is cls.forward), None)
    weight = param_of(getattr(mod, "weight", None))
    if op is None or weight is None:
        return None, None
    bias = param_of(getattr(mod, "bias", None))
    if op in ("layer_norm", "rms_norm") and len(mod.normalized_shape) != 1:
        return None, f"a {op} over {len(mod.normalized_shape)} dimensions: no curvature block (fallback)"
    if op == "instance_norm":  # each example's channel over its positions: a group per channel
        op, groups = "group_norm", mod.num_features
    else:
        groups = getattr(mod, "num_groups", None)
    how = (op, groups, mod.eps) if op == "group_norm" else (op, mod.eps)
    if getattr(mod, "track_running_stats", False):  # batch and instance norms: it may use its running statistics
        how += (mod,)
    uses = [(node, None)] * (1 if bias is None else 2)
    return _site(node, node.args[0], weight, bias, uses, how, op in ("group_norm", "batch_norm"), shape_of), None


def _function_site(node, param_of, shape_of):
    """(site or None, rejection reason or None) of a functional or aten norm."""
    op, (w_pos, b_pos, eps_pos), eps_default, channels_first = FUNCTIONS[node.target]
    w_key, b_key, eps_key = KEYWORDS[op]
    w_node = arg(node, w_pos, w_key)
    b_node = arg(node, b_pos, b_key) if b_pos is not None else None
    weight, bias = param_of(w_node), param_of(b_node)
    if weight is None:
        return None, None
    eps = arg(node, eps_pos, eps_key, eps_default)
    if op == "batch_norm" and not arg(node, 5, "training", False):
        return None, "a batch norm with running statistics (captured in eval mode): no curvature block (fallback)"
    if op == "instance_norm":  # each example's channel over its positions: a group per channel
        if not arg(node, 5, "use_input_stats", True):
            return None, ("an instance norm with running statistics (captured in eval mode): no curvature block "
                          "(fallback)")
        op, node_groups = "group_norm", shape_of(weight)[0]
    else:
        node_groups = node.args[1] if op == "group_norm" else None
    # γ's shape is the normalized shape (the ops require it), which a forward may pass traced, `x.shape[-1:]`
    if op in ("layer_norm", "rms_norm") and len(shape_of(weight)) != 1:
        return None, f"a {op} over {len(shape_of(weight))} dimensions: no curvature block (fallback)"
    how = (op, node_groups, eps) if op == "group_norm" else (op, eps)
    uses = [(node, w_node)] + ([(node, b_node)] if bias is not None else [])
    return _site(node, node.args[0], weight, bias, uses, how, channels_first, shape_of), None


def offset_operand(node):
    """The tensor operand of `node` when `node` is a cast (`.float()`) or an offset by a number (`γ + 1.0`,
    `1.0 + γ`), else None: z = x ⊙ (γ + c) has ∂z/∂γ = x, as z = x ⊙ γ (module docstring)."""
    if _is(node, CASTS):
        return node.args[0]
    if _is(node, ADD) and not node.kwargs and len(node.args) == 2 and \
            sum(isinstance(x, (int, float)) for x in node.args) == 1:
        return next(x for x in node.args if not isinstance(x, (int, float)))
    return None


def _offset_weight(node, param_of):
    """(name, (consumer, get_attr node)) of the parameter γ that `node` is, possibly cast and offset by a
    number (`1.0 + γ.float()`; `offset_operand`), each step the only user of the one before; else None."""
    consumer = None
    while (name := param_of(node)) is None:
        if not isinstance(node, fx.Node) or len(node.users) != 1 or (operand := offset_operand(node)) is None:
            return None
        consumer, node = node, operand
    return name, (consumer, node)


def added_bias(node, param_of):
    """(the sum, β's name, β's get_attr node) when the only use of `node` is `node + β` (either order), β
    a trainable parameter; else None."""
    (user,) = node.users if len(node.users) == 1 else (None,)
    if not _is(user, ADD) or user.kwargs or len(user.args) != 2:
        return None
    b_node = next((x for x in user.args if x is not node), None)
    bias = param_of(b_node)
    return None if bias is None else (user, bias, b_node)


def _handwritten_site(node, param_of, shape_of) -> Site | None:
    """`γ * x̂ (+ β)` with x̂ a hand-written normalization (γ possibly cast and offset)."""
    a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
    for w_node, h in ((a, b), (b, a)):
        found = _offset_weight(w_node, param_of)
        if found is None or not isinstance(h, fx.Node) or param_of(h) is not None or not _normalized(h):
            continue
        weight, (consumer, attr) = found
        if shape_of(weight)[:1] == (1,):  # a scalar gain broadcast over the features: not per feature
            return None
        uses, out, bias = [(consumer or node, attr)], node, None
        if (added := added_bias(node, param_of)) is not None:
            out, bias, b_node = added
            uses.append((out, b_node))
        k = _feature_dims(tuple(shape_of(weight)), h)
        site = _site(out, h, weight, bias, uses, ("given",), False, shape_of, k)
        if site is None and bias is not None:  # a bias of another shape: the scale alone
            site = _site(node, h, weight, None, uses[:1], ("given",), False, shape_of, k)
        return site
    return None


def find_norm_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Norm affine sites, and (node, reason) for norms that stay fallbacks."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        site = reason = None
        if node.op == "call_module":
            site, reason = _module_site(gm, node, param_of, shape_of)
        elif node.op == "call_function" and node.target in FUNCTIONS:
            site, reason = _function_site(node, param_of, shape_of)
        elif _is(node, MUL):
            site = _handwritten_site(node, param_of, shape_of)
        if site is not None:
            sites.append(site)
        elif reason is not None:
            rejected.append((node, reason))
    return sites, rejected
