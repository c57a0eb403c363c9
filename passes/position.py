"""The position-embedding detector: `x + P[..., start:stop, :]`, a trainable table P added to an
activation (gnfx.layouts.position).

P is (T_max, d) or has leading dimensions of one, (1, T_max, d); it may be sliced along its
position dimension (the second to last) by `P[:T]`, `P[:, :T]`, `P[:, s:s + T]` (fx: getitem;
export: aten.slice) — the slices must be contiguous, and a slice of any other dimension must take
it whole. The sum is `operator.add`, `torch.add` (no alpha), `Tensor.add` or `aten.add.Tensor`,
in either order. A parameter whose last dimension is 1 (a bias broadcast over features) is not a
position table. A slice of one row, `P[:, s:s + 1]`, is read by every position of x, as a table of
one row is (gnfx.layouts.position); a slice starting from the end (`P[-3:]`) is no table here. A table
expanded to the batch and copied, `clone(P.expand(N, -1, -1))` (a class token, as
passes/class_tokens.py writes it), is one too: added to zeros, read at positions 0..k-1, the copy the
site and the expanded tensor its input.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .class_tokens import CLONES, expanded_table
from .sites import Site

aten = torch.ops.aten
ADD = (operator.add, torch.add, aten.add.Tensor, "add")


def _slices(node) -> list[tuple[int, object]] | None:
    """(dim, slice) pairs of an indexing node (getitem with slices, or aten.slice), else None."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return list(enumerate(index)) if all(isinstance(s, slice) for s in index) else None
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        defaults = (0, None, None, 1)  # dim, start, end, step
        dim, start, end, step = tuple(node.args[1:]) + defaults[len(node.args) - 1:]
        return [(dim, slice(start, end, step))]
    return None


def _table(operand, param_of, shape_of):
    """(parameter, get_attr node, its consumer, start, rows) if `operand` is a position table, sliced
    along its positions only, each node on the way used once; else None. `rows`: the number of rows
    the slices leave where one slice of the positions gives it (None: as many as x has positions)."""
    node, start, consumer = operand, 0, None
    pairs = []
    while isinstance(node, fx.Node) and param_of(node) is None:
        found = _slices(node)
        if found is None or len(node.users) != 1:
            return None
        pairs += found
        consumer, node = node, node.args[0]
    name = param_of(node)
    if name is None:
        return None
    shape = shape_of(name)
    if len(shape) < 2 or any(s != 1 for s in shape[:-2]) or shape[-1] == 1:
        return None
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
    return name, node, consumer, start, rows if position_slices <= 1 else None


def _site(node, x, name, attr, consumer, start, rows, shape) -> Site:
    return Site(node=node, input=x, weight=name, bias=None, uses=[(consumer or node, attr)], d_in=shape[-2],
                d_out=shape[-1], options={"weight_shape": shape, "start": start, "rows": rows, "padding_idx": None})


def find_position_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    def shape_of_table(node):
        name = param_of(node)
        return None if name is None else shape_of(name)

    sites = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in CLONES and len(node.args) == 1 \
                and expanded_table(node.args[0], shape_of_table):
            expand = node.args[0]
            table = expand.args[0]
            shape = shape_of(param_of(table))
            sites.append(_site(node, expand, param_of(table), table, expand, 0, shape[-2], shape))
            continue
        if node.op not in ("call_function", "call_method") or node.target not in ADD or node.kwargs:
            continue
        operands = node.args[:2]
        for i, operand in enumerate(operands):
            x = operands[1 - i]
            found = _table(operand, param_of, shape_of)
            if found is None or not isinstance(x, fx.Node) or param_of(x) is not None:
                continue
            name, attr, consumer, start, rows = found
            sites.append(_site(node, x, name, attr, consumer, start, rows, shape_of(name)))
            break
    return sites, []
