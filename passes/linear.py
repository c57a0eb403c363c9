"""The linear-map detector: `z = W a (+ b)` with a trainable weight, on inputs of any leading shape.

Recognized in both graph forms (torch-level from symbolic tracing, aten-level from torch.export):
`F.linear` / `aten.linear`; and hand-written forms `x @ W.t()`, `x @ W.T`, `x @ W`,
`torch.matmul`, `torch.mm`, `torch.addmm(b, x, W)` / `aten.addmm`, `aten.mm`, `aten.matmul`,
with the weight transposed or not, and `F.linear(x, W.t(), b)` (which passes/unflatten.py makes of
Hugging Face's Conv1D); `torch.einsum` / `aten.einsum` of the input and a 2-D weight whose
equation is a linear map of one axis of the input (`"...i,oi->...o"`, `"bti,io->bto"`: the weight's
other axis in the contracted axis's place in the output, the input's other axes where they were).
That axis may be any after an ellipsis: talking-heads attention mixes the heads of the attention
weights, `"bhij,hg->bgij"` (vit-pytorch's CaiT and DeepViT); the block's features are then that
dimension of x and z, `options["feature_dim"]` counted from the end (gnfx.layouts.linear). A weight used as
`x @ W` is stored (d_in, d_out); its block reads it transposed (`options["transposed"]`). A weight w of
three dimensions or more read through a chain of reshapes to a matrix (`F.linear(x, w.view(d_out, -1))`,
`w.flatten(1)`, `x @ w.reshape(-1, d_out)`: efficient-kan's spline weights, hand-written layers) is the
block's W where that matrix is a view of w the block can step and write back through
(`options["weight_view"]`, gnfx.targets.as_matrix): W = w.flatten(1) (rows w's first dimension) read as
`z = W a`, or W = w.flatten(0, -2)ᵀ (w's leading dimensions flattened, columns its last) read as `x @ Wᵀ`;
a reshape is row-major, so the matrix is exactly that view. Any other reshape to a matrix is rejected with
its reason. A bias
added by hand after a bias-free form (`x @ W + b`, `b + torch.einsum(...)`: a trainable (d_out,)
vector, the product's only use) is the block's bias: ∂ℓ/∂z is the same on either side of the sum.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .identity_views import replayed
from .sites import Site, arg, computed_weight_reason
from .weight_slices import sliced_parameter

aten = torch.ops.aten
LINEAR_OPS = (F.linear, aten.linear.default)
MATMUL_OPS = (operator.matmul, torch.matmul, torch.mm, aten.mm.default, aten.matmul.default)
ADDMM_OPS = (torch.addmm, aten.addmm.default)
TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.mT.default, torch.t)
EINSUM_OPS = (torch.einsum, aten.einsum.default)
ADD_OPS = (operator.add, torch.add, aten.add.Tensor)


def _is_transpose(node) -> bool:
    """Whether `node` is a 2-D transpose of its first argument (W.t(), W.T, W.transpose(0, 1), ...)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in ("t", "transpose", "permute"):
        rest = list(node.args[1:])
        return node.target == "t" or sorted(rest) in ([0, 1], [-2, -1], [-1, -2]) or rest in ([1, 0], [(1, 0)], [[1, 0]])
    if node.op == "call_function":
        if node.target in TRANSPOSES:
            return True
        if node.target is getattr and node.args[1] in ("T", "mT"):
            return True
        if node.target in (torch.transpose, aten.transpose.int):
            return sorted(node.args[1:3]) in ([0, 1], [-2, -1])
        if node.target is aten.permute.default:
            return list(node.args[1]) == [1, 0]
    return False


def _flattened(node, param_of, shape_of):
    """(parameter name, node read, its reader, the matrix's shape) of a chain of reshapes, each the only
    user of the one before, from a trainable parameter of three dimensions or more to a matrix; else None."""
    chain = []
    while isinstance(node, fx.Node) and param_of(node) is None and node.op in ("call_function", "call_method") \
            and node.args and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    name = param_of(node)
    if name is None or not chain or len(shape_of(name)) < 3:
        return None
    meta = torch.empty(shape_of(name), device="meta")
    for step in reversed(chain):
        meta = replayed(step, meta)
        if meta is None:
            return None
    return (name, node, chain[-1], tuple(meta.shape)) if meta.dim() == 2 else None


def _weight(node, consumer, orientation: str, param_of, shape_of, rejected: dict):
    """(parameter name, its use (reader, node read), the matrix's shape, orientation, view, window) of the
    weight operand `node` of `consumer`, a product that reads it as W ("out_in", F.linear) or as Wᵀ ("in_out",
    `x @ node`): a trainable parameter, transposed (the other orientation) or not, a parameter of three
    dimensions or more flattened to a matrix (module docstring) that is one of the views a block steps, or a
    slice of a matrix (`W[:o, :i]`, passes/weight_slices.py: its window, (start, stop) of W's (out, in), the
    matrix's shape the parameter's); else None (a reshape that is none recorded in `rejected` with its reason)."""
    if _is_transpose(node) and len(node.users) == 1:
        consumer, node, orientation = node, node.args[0], "in_out" if orientation == "out_in" else "out_in"
    name = param_of(node)
    if name is not None:
        return name, (consumer, node), shape_of(name), orientation, "", None
    sliced = sliced_parameter(node, param_of, shape_of)
    if sliced is not None and len(shape_of(sliced[0])) == 2:  # W[:o, :i] (passes/weight_slices.py)
        name, use, window = sliced
        return name, use, shape_of(name), orientation, "", window if orientation == "out_in" else window[::-1]
    found = _flattened(node, param_of, shape_of)
    if found is None:
        return None
    name, read, first_reshape, matrix = found
    shape = shape_of(name)
    if orientation == "out_in" and matrix[0] == shape[0]:
        view = "flatten"  # W = w.flatten(1)
    elif orientation == "in_out" and matrix[1] == shape[-1]:
        view = "flat_t"  # Wᵀ = w.flatten(0, -2)
    else:
        role, mismatch = ("W", "rows are not its first dimension") if orientation == "out_in" else \
            ("Wᵀ", "columns are not its last")
        rejected[first_reshape] = (f"reshape of {name} {shape} to the matrix {matrix} read as a linear map's {role}, "
                                   f"whose {mismatch}: no view of the weight a linear block steps")
        return None
    return name, (first_reshape, read), matrix, orientation, view, None


def _site(node, x, w_operand, bias_node, orientation: str, param_of, shape_of, rejected: dict) -> Site | None:
    """The site of a product `node` of the input x and a weight operand it reads in `orientation` (`_weight`)."""
    found = _weight(w_operand, node, orientation, param_of, shape_of, rejected)
    if found is None:
        return None
    name, use, matrix, orientation, view, window = found
    if len(matrix) != 2:
        return None
    d_out, d_in = matrix if orientation == "out_in" else matrix[::-1]
    bias, bias_use = _bias(node, bias_node, d_out, window, param_of, shape_of)
    uses = [use] + ([bias_use] if bias is not None else [])
    if view:
        options = {"weight_view": view}
    else:
        options = {"transposed": True} if orientation == "in_out" else {}
    options["weight_shape"] = shape_of(name)
    return Site(node=node, input=x, weight=name, bias=bias, uses=uses,
                d_in=d_in, d_out=d_out, options=options, window=window)


def _bias(product, node, d_out: int, window, param_of, shape_of) -> tuple[str | None, tuple | None]:
    """(the bias parameter of the bias operand `node` of `product`, its use (consumer, node read)): a trainable
    (d_out,) vector, read whole or, for a weight read through a slice (its (out, in) `window`), through a slice
    of the same output window (`b[:o]` beside `W[:o, :i]`); (None, None) otherwise."""
    bias = param_of(node)
    if bias is not None:
        whole = window is None or window[0] == (0, d_out)
        return (bias, (product, node)) if shape_of(bias) == (d_out,) and whole else (None, None)
    sliced = sliced_parameter(node, param_of, shape_of)
    if sliced is None or window is None or shape_of(sliced[0]) != (d_out,) or sliced[2] != window[:1]:
        return None, None
    return sliced[0], sliced[1]


def _einsum_operands(node):
    """(x, W, W stored (d_in, d_out)?, feature_dim) of an einsum that is a linear map of one axis of x,
    `feature_dim` counted from the end (module docstring), else None."""
    equation, operands = node.args[0], node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if node.kwargs or not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    (sx, sw), (x, w) = terms, operands
    if len(sw) != 2 or "." in sw:
        (sx, sw), (x, w) = (sw, sx), (w, x)  # the weight first, as in "oi,...i->...o"
    if len(sw) != 2 or "." in sw or len(set(sw)) != 2 or not sx:
        return None
    shared = [axis for axis in sx if axis in sw]
    if len(shared) != 1 or len(set(sx.replace(".", ""))) != len(sx.replace(".", "")):
        return None
    contracted = shared[0]
    other = sw.replace(contracted, "")
    position = sx.index(contracted)
    if contracted in out or other in sx or "." in sx[position:] or out != sx.replace(contracted, other):
        return None
    return x, w, sw.index(contracted) == 0, position - len(sx)


def _added_bias(site: Site, param_of, shape_of) -> Site:
    """`site` with the bias of `z + b` / `b + z` when z is the site's bias-free product and the sum its
    only use, b a trainable (d_out,) vector (module doc); none for features off the last dimension, which
    such a b does not broadcast along."""
    node = site.node
    if site.bias is not None or len(node.users) != 1 or "feature_dim" in site.options:
        return site
    (add,) = node.users
    is_add = (add.op == "call_function" and add.target in ADD_OPS) or (add.op == "call_method" and add.target == "add")
    if not is_add or add.kwargs or len(add.args) != 2:
        return site
    b_node = add.args[1] if add.args[0] is node else add.args[0]
    bias = param_of(b_node)
    if bias is None or shape_of(bias) != (site.d_out,):
        return site
    site.bias = bias
    site.uses = site.uses + [(add, b_node)]
    return site


def find_linear_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], dict]:
    """Every linear map whose weight is a trainable parameter (`param_of(node)` gives its name); and the
    reshapes of weights to matrices that are no view a block steps (module docstring), each with its reason."""
    sites, rejected = [], {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        t = node.target
        site = None
        if t in LINEAR_OPS:
            site = _site(node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), "out_in", param_of,
                         shape_of, rejected)
            if site is None and (why := computed_weight_reason(node, "linear map", param_of)):
                rejected[node] = why
        elif t in MATMUL_OPS or (node.op == "call_method" and t in ("matmul", "mm", "__matmul__")):
            site = _site(node, node.args[0], node.args[1], None, "in_out", param_of, shape_of, rejected)
        elif t in ADDMM_OPS and not node.kwargs:
            site = _site(node, node.args[1], node.args[2], node.args[0], "in_out", param_of, shape_of, rejected)
        elif t in EINSUM_OPS and (operands := _einsum_operands(node)) is not None:
            site = _einsum_site(node, *operands, param_of, shape_of)
        if site is not None:
            sites.append(_added_bias(site, param_of, shape_of))
    return sites, rejected


def _einsum_site(node, x, w, in_out: bool, feature_dim: int, param_of, shape_of) -> Site | None:
    """The site of a linear einsum (`_einsum_operands`): W's consumer is the einsum itself."""
    name = param_of(w)
    if name is None or len(shape_of(name)) != 2:
        return None
    shape = shape_of(name)
    d_out, d_in = shape[::-1] if in_out else shape
    options = {"transposed": True, "weight_shape": shape} if in_out else {"weight_shape": shape}
    if feature_dim != -1:
        options["feature_dim"] = feature_dim
    return Site(node=node, input=x, weight=name, bias=None, uses=[(node, w)], d_in=d_in, d_out=d_out, options=options)
