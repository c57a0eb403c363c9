"""index_lookup: a row lookup written as indexing, `W[ids]`, as the embedding lookup it is.

Whisper's decoder position embedding (an nn.Embedding subclass whose forward returns
`self.weight[position_ids]`) reaches torch.export's graph as `aten.index.Tensor(W, [ids])`: the
rows of a trainable (V, d) weight picked by a tensor of integer indices, E[ids], the value of
`aten.embedding(W, ids)`, and the same gradient (each output row's gradient added into the row it
was read from). `lookups_as_embeddings` rewrites it into that op, so that the embedding detector
(passes/embedding.py) makes W a block and passes/shared_positions.py sees the lookup. Indexing reads
a negative index i as i + V, which the embedding does not: the indices become
`where(ids < 0, ids + V, ids)`, the same rows (an index outside [-V, V) still raises).

In torch.export's graph the indices' dtype is recorded (`meta["val"]`). torch.fx's `W[ids]`
(`operator.getitem`) records none, and may index with a slice, a mask or a tuple that the trace does
not tell apart: it is rewritten (into `F.embedding`) only where the indices are an integer tensor of
the model (a buffer, or a constant the trace computed from one: `index.view(-1)`) and the rows reach
the scores of a batch as a bias broadcast over its first dimension, which passes/shared_positions.py
then looks up per example (`broadcast_chain`): Swin's relative position bias,
`table[index.view(-1)].view(M², M², -1).permute(2, 0, 1).unsqueeze(0)` added to the scores. Any other
such lookup would be one example for the statistics (a buffer has no batch dimension) and stays a
fallback.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .shapes import value_of
from .shared_positions import broadcast_chain

aten = torch.ops.aten


def lookups_as_embeddings(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every `aten.index.Tensor(W, [ids])` of a trainable 2-D parameter W and integer ids
    into `aten.embedding(W, ids)`, and torch.fx's `W[ids]` of an integer buffer broadcast over the scores of a
    batch into `F.embedding(ids, W)` (module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.index.Tensor, operator.getitem):
            continue
        weight, indices = node.args[0], node.args[1]
        matrix = _trainable_matrix(gm, weight)
        if node.target is aten.index.Tensor:
            ids = indices[0] if len(indices) == 1 and _integer(indices[0]) else None
            where, lt, add, embedding = aten.where.self, aten.lt.Scalar, aten.add.Tensor, aten.embedding.default
        else:  # torch.fx
            ids = indices if _integer_buffer(gm, indices) and broadcast_chain(node) is not None else None
            where, lt, add, embedding = torch.where, operator.lt, operator.add, None
        if matrix is None or ids is None:
            continue
        vocab = matrix.shape[0]
        with gm.graph.inserting_before(node):
            wrapped = gm.graph.call_function(where, (
                gm.graph.call_function(lt, (ids, 0)), gm.graph.call_function(add, (ids, vocab)), ids))
            lookup = (gm.graph.call_function(embedding, (weight, wrapped)) if embedding is not None
                      else gm.graph.call_function(F.embedding, (wrapped, weight)))
        wrapped.meta["val"] = value_of(ids)  # what passes/shared_positions.py reads of the indices
        lookup.meta = dict(node.meta)
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _trainable_matrix(gm: fx.GraphModule, node) -> torch.nn.Parameter | None:
    """The trainable 2-D parameter `node` reads (a get_attr), or None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        param = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return param if param.requires_grad and param.dim() == 2 else None


def _integer(ids) -> bool:
    """Whether `ids` is a node whose recorded value is a tensor of integer indices."""
    value = value_of(ids)
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and not value.dtype.is_complex \
        and value.dtype is not torch.bool


def _integer_buffer(gm: fx.GraphModule, node) -> bool:
    """Whether `node` is an integer tensor of the model (a get_attr: a buffer, or a constant of a torch.fx
    trace)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        buffer = gm.get_buffer(node.target)
    except AttributeError:
        return False
    return not buffer.dtype.is_floating_point and not buffer.dtype.is_complex and buffer.dtype is not torch.bool
