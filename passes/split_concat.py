"""split_concat: a concatenation split again at its own boundaries is the tensors it concatenated.

WavLM's attention passes `torch.cat((q_proj.bias, k_proj.bias, v_proj.bias))` as the in-projection bias
of F.multi_head_attention_forward, which chunks it into three again for the q, k and v projections:
torch.export records `getitem(chunk(cat([b_q, b_k, b_v]), 3), i)`, a use of each bias no detector knew
(the linear blocks took the weights, the biases fell back to diag). `split_concatenations` makes the
users of each piece read the tensor the piece is, for

    chunk(cat(ts, dim), k, dim)          k = len(ts) tensors of one size along dim
    split(cat(ts, dim), sizes, dim)      (and split_with_sizes) sizes those of ts along dim

with the sizes from the values the graph records (torch.export) or from the parameters and buffers a
get_attr reads (torch.fx). The same values (a piece is a view of the copy cat made of t_i) and the same
gradients. The getitems so bypassed, and the split and the cat once nothing else reads them, are erased.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .rewrite import recompiled, replace
from .shapes import value_of
from .sites import arg

aten = torch.ops.aten
CATS = (aten.cat.default, torch.cat)
CHUNKS = (aten.chunk.default, torch.chunk, "chunk")
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, torch.split, "split", "split_with_sizes")


def _size_along(gm: fx.GraphModule, node, dim: int) -> int | None:
    """The size of tensor `node` along dim, from its recorded value or the attribute it reads; else None."""
    value = value_of(node)
    if value is None and isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or not -value.dim() <= dim < value.dim():
        return None
    size = value.shape[dim]
    return size if isinstance(size, int) else None


def _pieces(gm: fx.GraphModule, node: fx.Node) -> list | None:
    """The tensors the pieces of split or chunk `node` are (module docstring), or None."""
    if node.op not in ("call_function", "call_method") or node.target not in CHUNKS + SPLITS:
        return None
    cat = node.args[0]
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target in CATS):
        return None
    tensors, cat_dim = list(arg(cat, 0, "tensors")), arg(cat, 1, "dim", 0)
    split_dim = arg(node, 2, "dim", 0)
    sizes = [_size_along(gm, t, cat_dim) for t in tensors]
    if split_dim != cat_dim or None in sizes:
        return None
    if node.target in CHUNKS:
        matches = arg(node, 1, "chunks") == len(tensors) and len(set(sizes)) == 1
    else:
        given = arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size", arg(node, 1, "split_sizes")))
        matches = list(given) == sizes if isinstance(given, (list, tuple)) else \
            (given == sizes[0] and len(set(sizes)) == 1)
    return tensors if matches else None


def split_concatenations(gm: fx.GraphModule) -> fx.GraphModule:
    """Make each piece of a concatenation split at its own boundaries the tensor it is (module doc)."""
    changed = False
    for node in list(gm.graph.nodes):
        tensors = _pieces(gm, node)
        if tensors is None:
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                replace(gm, user, tensors[user.args[1]])
                changed = True
        cat = node.args[0]
        for unread in (node, cat):
            if not unread.users:
                gm.graph.erase_node(unread)
    return recompiled(gm, changed)
