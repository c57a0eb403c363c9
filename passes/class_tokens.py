"""class_tokens: a trainable table expanded to the batch, `P.expand(N, -1, -1)`, made a copy the
position detector takes as a position table (gnfx.layouts.position).

ViT, DeiT, DINOv2, BEiT, CvT and AST prepend class (and distillation) tokens to the patches:
`torch.cat((P.expand(N, -1, -1), patches), dim=1)`, P a parameter (1, k, d) (k rows: one class token,
DINOv2's register tokens); SigLIP's attention-pooling head repeats its probe, `P.repeat(N, 1, 1)`, the
same rows in a tensor of their own. Every example reads the same k rows at its positions 0..k-1: a position
table added to zeros, z_{n,t} = 0 + P_t (gnfx.layouts.position's model, start 0). The expand's own
gradient sums the examples' output gradients, so the statistics need the gradient of the expanded
tensor: `copy_expanded_tables` makes the graph

    e = expand(P, sizes);  z = aten.clone(e)

and every former user of e reads z (one copy of N·k·d entries more). The position detector takes z as a
site whose input is e (the taps read N and k from its shape) and whose weight use is e's read of P.
The same values and gradients. Expanded: a trainable parameter of 2 or more dimensions, its leading
dimensions of one and its last of more than one (a table of rows), read by an `expand` (aten's, or the
tensor method) whose first size is not 1 (the batch) and whose other sizes keep P's (-1 or equal), or
by a `repeat` whose first count is not 1 and whose others are 1. P may reach it through unsqueezes and
views that only add or drop dimensions of one before its rows, each its only use, read with the shape
they give it: einops' `repeat(P, '... d -> b ... d', b=N)` of vit-pytorch's (k, d) class tokens writes
`P.unsqueeze(0).expand(N, -1, -1)`, its `repeat(P, '1 1 d -> b 1 d', b=N)` of a (1, 1, d) token
`P.reshape(d).unsqueeze(0).expand(N, -1)` (a (N, d) tensor it then reshapes to (N, 1, d)).
A table of one row may be expanded to n positions too, every position reading that row: einops'
`repeat(P, 'd -> b n d', b=N, n=n)` of MAE's mask token (d,), `P.unsqueeze(0).unsqueeze(1).expand(N, n, -1)`.
A vector P (d,), d > 1, read by an `expand` to (N, 1, ..., 1, d) (d or -1 last) is a table of one
row (k = 1) too: CLIP's vision class embedding, `P.expand(N, 1, -1)`.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .rewrite import recompiled
from .scale import RESHAPES, UNSQUEEZES, _reshaped

aten = torch.ops.aten
EXPANDS = (aten.expand.default, "expand")
REPEATS = (aten.repeat.default, "repeat")
CLONES = (aten.clone.default, torch.clone, "clone")


def _sizes(node: fx.Node) -> tuple:
    """The sizes argument of an expand or repeat node, as a tuple."""
    sizes = node.args[1:] if node.op == "call_method" else node.args[1]
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else tuple(sizes)


def _rows(shape) -> tuple:
    """A table's shape without its leading dimensions of one."""
    shape = tuple(shape)
    while shape[:1] == (1,):
        shape = shape[1:]
    return shape


def _table_read(expand, shape_of_table):
    """(P's node, the node that reads it, P's shape as the steps leave it) when the input of `expand` is a
    table P, or unsqueezes and views of P that only add or drop dimensions of one before its rows, each
    the only use of the one before (module docstring); else None."""
    consumer, node, steps = expand, expand.args[0], []
    while (shape := shape_of_table(node)) is None:
        if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method")
                and node.target in UNSQUEEZES + RESHAPES and len(node.users) == 1):
            return None
        steps.append(node)
        consumer, node = node, node.args[0]
    read = tuple(shape)
    for step in reversed(steps):  # from P outwards
        read = _reshaped(step, read)
        if read is None:
            return None
    return (node, consumer, read) if _rows(read) == _rows(shape) else None


def expanded_table(node, shape_of_table):
    """(P's node, the node that reads it, P's shape as the expand reads it) when `node` expands a table P
    (module docstring) to the batch, else None; `shape_of_table(node)` gives the shape of a trainable
    parameter's node, or None where the node is no trainable parameter."""
    if not (isinstance(node, fx.Node) and node.op in ("call_function", "call_method")
            and node.target in EXPANDS + REPEATS):
        return None
    found = _table_read(node, shape_of_table)
    shape = None if found is None else found[2]
    if shape is None or len(shape) < 1 or any(s != 1 for s in shape[:-2]) or shape[-1] == 1:
        return None
    sizes = _sizes(node)
    if len(shape) == 1:  # a vector read as one row, (N, 1, ..., 1, d)
        vector = (node.target in EXPANDS and len(sizes) >= 3 and not (isinstance(sizes[0], int) and sizes[0] in (1, -1))
                  and all(s == 1 for s in sizes[1:-1]) and sizes[-1] in (-1, shape[0]))
        return found if vector else None
    kept = (lambda s, p: s == 1) if node.target in REPEATS else (lambda s, p: s in (-1, p))
    one_row = node.target in EXPANDS and shape[-2] == 1  # may be read at any number of positions
    if (len(sizes) == len(shape) and not (isinstance(sizes[0], int) and sizes[0] in (1, -1))
            and all(isinstance(s, int) and kept(s, p) or one_row and i == len(shape) - 2
                    for i, (s, p) in enumerate(zip(sizes[1:], shape[1:]), start=1))):
        return found
    return None


def copy_expanded_tables(gm: fx.GraphModule) -> fx.GraphModule:
    """Follow each expand of a trainable table to the batch with a clone its users read (module doc)."""
    def shape_of_table(node):
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return tuple(obj.shape) if isinstance(obj, nn.Parameter) and obj.requires_grad else None

    changed = False
    for node in list(gm.graph.nodes):
        if expanded_table(node, shape_of_table) is None or any(u.target in CLONES for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            copy = gm.graph.call_function(aten.clone.default, (node,))
        copy.meta = dict(node.meta)
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        changed = True
    return recompiled(gm, changed)
