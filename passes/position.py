"""The position-embedding detector: `x + P[..., start:stop, :]`, a trainable table P added to an
activation (gnfx.layouts.position).

P is (T_max, d) or has leading dimensions of one, (1, T_max, d); it may be sliced along its
position dimension (the second to last) by `P[:T]`, `P[:, :T]`, `P[:, s:s + T]` (fx: getitem;
export: aten.slice, or aten.alias where the slice takes every row) — the slices must be contiguous,
and a slice of any other dimension must take it whole; a cast to a floating dtype may come between
(open_clip's text towers add `P[:T].to(cast_dtype)`, which torch.export's graph checks with an
`aten._assert_tensor_metadata` of the slice: reads of metadata are no other use, passes/parameter_casts.py). The sum is `operator.add`, `torch.add` (no
alpha), `Tensor.add` or `aten.add.Tensor`, in either order, or in place, `x += P` (`Tensor.add_`,
`aten.add_.Tensor`). A parameter whose last dimension is 1 (a bias broadcast over features) is not a
position table. A slice of one row, `P[:, s:s + 1]`, is read by every position of x, as a table of
one row is (gnfx.layouts.position); a slice starting from the end (`P[-3:]`) is no table here. A table
expanded to the batch and copied, `clone(P.expand(N, -1, -1))` (a class token, P possibly unsqueezed
first, as passes/class_tokens.py writes it), is one too: added to zeros, read at positions 0..k-1, the
copy the site and the expanded tensor its input (a vector (d,) so expanded: a table of one row).

Two more forms, taken whole (a slice of them must take every dimension
whole):
  * (1, B, T, d) and the like, added to an (N, B, T, d) activation (NesT's one table per block of
    tokens): its features are the last dimension and its B·T rows (leading ones dropped) are positions;
  * (1, C, *S), added to a channels-first map (N, C, *S) (PiT's and Visformer's (1, C, H, W) tables):
    its features are C, dimension 1, and its prod(S) entries of each channel are positions, `feature_dim`
    = 1 - len(P.shape) counted from the end. A table is read so when x is written with its features on
    dimension 1: the output of a convolution (plain or transposed) or of a normalization over dimension
    1 (batch, group and instance norms; Visformer's patch embedding is a convolution and a BatchNorm2d),
    through an nn.Identity (a patch embedding without a norm), and, where the graph records x's shape
    (torch.export), x has P's dimensions.
    (x's shape is not in a torch.fx graph: the layer that writes x is what says its features are
    dimension 1; a (1, C, H, W) table added to any other activation is read as the first form, C·H
    positions of W features.) A (1, C, 1, ..., 1) parameter, a per-channel bias, is no table here.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from .class_tokens import CLONES, expanded_table
from .conv import CONV_OPS
from .conv_transpose import CONV_TRANSPOSE_OPS
from .norm import FUNCTIONS as NORM_FUNCTIONS
from .parameter_casts import floating_cast, metadata_read
from .shapes import value_of
from .sites import Site

aten = torch.ops.aten
# the sum, or the sum in place (`x += P` is aten.add_ in torch.export's graphs; the taps copy an x that is a
# block's output, passes/taps.py)
ADD = (operator.add, torch.add, aten.add.Tensor, "add", aten.add_.Tensor, "add_")
FEATURES_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                          nn.modules.instancenorm._InstanceNorm)


def _slices(node) -> list[tuple[int, object]] | None:
    """(dim, slice) pairs of an indexing node (getitem with slices, or aten.slice), else None; none for
    `aten.alias`, which torch.export writes for a slice that takes every row (`P[:, :T]`, T = T_max)."""
    if node.op == "call_function" and node.target is aten.alias.default:
        return []
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return list(enumerate(index)) if all(isinstance(s, slice) for s in index) else None
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        defaults = (0, None, None, 1)  # dim, start, end, step
        dim, start, end, step = tuple(node.args[1:]) + defaults[len(node.args) - 1:]
        return [(dim, slice(start, end, step))]
    return None


def _whole(s: slice, size: int) -> bool:
    """Whether the slice `s` takes every entry of a dimension of `size` entries."""
    stop_whole = s.stop is None or isinstance(s.stop, int) and s.stop >= size
    return s.start in (None, 0) and s.step in (None, 1) and stop_whole


def _features_first(x, gm: fx.GraphModule) -> bool:
    """Whether x is written with its features on dimension 1: a convolution's output (plain or
    transposed), or a normalization's over dimension 1 (batch, group, instance norms), through an
    nn.Identity (timm's patch embedding without a norm)."""
    if not isinstance(x, fx.Node):
        return False
    if x.op == "call_module":
        module = gm.get_submodule(x.target)
        if isinstance(module, nn.Identity):
            return _features_first(x.args[0], gm)
        return isinstance(module, FEATURES_FIRST_MODULES)
    if x.op != "call_function":
        return False
    if x.target in NORM_FUNCTIONS:
        return NORM_FUNCTIONS[x.target][3]
    return x.target in CONV_OPS or x.target in CONV_TRANSPOSE_OPS or x.target is aten.convolution.default


def _table(operand, param_of, shape_of, features_first: bool, x_rank: int | None):
    """(parameter, get_attr node, its consumer, start, rows, feature_dim) if `operand` is a position
    table (module docstring), sliced along its positions only, each node on the way used once; else
    None. `rows`: the number of rows the slices leave where one slice of the positions gives it (None:
    as many as x has positions); `feature_dim`: its features' dimension counted from the end.
    `features_first`: whether x has its features on dimension 1 (`_features_first`), `x_rank` its
    dimensions (None where the graph does not record them): a channels-first table has x's."""
    node, start, consumer = operand, 0, None
    pairs = []
    while isinstance(node, fx.Node) and param_of(node) is None:
        found = [] if floating_cast(node) else _slices(node)
        if found is None or sum(not metadata_read(user) for user in node.users) != 1:
            return None
        pairs += found
        consumer, node = node, node.args[0]
    name = param_of(node)
    if name is None:
        return None
    shape = shape_of(name)
    whole = all(_whole(s, shape[dim]) for dim, s in pairs)
    channels_first = 1 < len(shape) == (x_rank or len(shape)) and shape[0] == 1 and shape[1] > 1
    if features_first and channels_first and math.prod(shape[2:]) > 1:
        return (name, node, consumer, 0, math.prod(shape[2:]), 1 - len(shape)) if whole else None
    if len(shape) < 2 or shape[-1] == 1:
        return None
    positions = shape[:-1]
    while len(positions) > 1 and positions[0] == 1:
        positions = positions[1:]
    if len(positions) > 1:  # rows of several dimensions (NesT's blocks of positions)
        return (name, node, consumer, 0, math.prod(positions), -1) if whole else None
    position_dim = len(shape) - 2
    rows, position_slices = shape[position_dim], 0
    for dim, s in pairs:
        dim = dim + len(shape) if dim < 0 else dim
        if s.step not in (None, 1) or not isinstance(s.start or 0, int) or (s.start or 0) < 0:
            return None  # a start counted from the end is no row the layout reads
        if dim == position_dim:
            start += s.start or 0
            position_slices += 1
            stop = s.stop if isinstance(s.stop, int) and s.stop >= 0 else None
            rows = None if stop is None else min(stop, shape[position_dim]) - (s.start or 0)
        elif s.start not in (None, 0):
            return None
    return name, node, consumer, start, rows if position_slices <= 1 else None, -1


def _site(node, x, name, attr, consumer, start, rows, shape, feature_dim=-1) -> Site:
    d = shape[feature_dim]
    return Site(node=node, input=x, weight=name, bias=None, uses=[(consumer or node, attr)], d_in=math.prod(shape) // d,
                d_out=d, options={"weight_shape": shape, "start": start, "rows": rows, "feature_dim": feature_dim,
                                  "padding_idx": None})


def find_position_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    def shape_of_table(node):
        name = param_of(node)
        return None if name is None else shape_of(name)

    sites = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in CLONES and len(node.args) == 1 \
                and (found := expanded_table(node.args[0], shape_of_table)) is not None:
            table, consumer, read = found
            shape = shape_of(param_of(table))
            rows = read[-2] if len(read) > 1 else 1  # a vector: one row
            sites.append(_site(node, node.args[0], param_of(table), table, consumer, 0, rows, shape))
            continue
        if node.op not in ("call_function", "call_method") or node.target not in ADD or node.kwargs:
            continue
        if param_of(node) is not None:  # a sum that stands for a parameter: a sampled weight μ + P, no table
            continue
        operands = node.args[:2]
        for i, operand in enumerate(operands):
            x = operands[1 - i]
            value = value_of(x)
            rank = value.dim() if isinstance(value, torch.Tensor) else None
            found = _table(operand, param_of, shape_of, _features_first(x, gm), rank)
            if found is None or not isinstance(x, fx.Node) or param_of(x) is not None:
                continue
            name, attr, consumer, start, rows, feature_dim = found
            sites.append(_site(node, x, name, attr, consumer, start, rows, shape_of(name), feature_dim))
            break
    return sites, []
