"""index_lookup: a row lookup written as indexing, `W[ids]`, as the embedding lookup it is.

Whisper's decoder position embedding (an nn.Embedding subclass whose forward returns
`self.weight[position_ids]`) reaches torch.export's graph as `aten.index.Tensor(W, [ids])`: the
rows of a trainable (V, d) weight picked by a tensor of integer indices, E[ids], the value of
`aten.embedding(W, ids)`, and the same gradient (each output row's gradient added into the row it
was read from). `lookups_as_embeddings` rewrites it into that op, so that the embedding detector
(passes/embedding.py) makes W a block and passes/shared_positions.py sees the lookup. Indexing reads
a negative index i as i + V, which the embedding does not: the indices become
`where(ids < 0, ids + V, ids)`, the same rows (an index outside [-V, V) still raises). Only
torch.export's graph is rewritten, where the indices' dtype is recorded (`meta["val"]`); torch.fx's
`W[ids]` (`operator.getitem`) may index with a slice, a mask or a tuple that the trace does not tell
apart.
"""
from __future__ import annotations

import torch
from torch import fx

from .shapes import value_of

aten = torch.ops.aten


def lookups_as_embeddings(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every `aten.index.Tensor(W, [ids])` of a trainable 2-D parameter W and integer ids
    into `aten.embedding(W, ids)` (module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        weight, indices = node.args[0], node.args[1]
        ids, matrix = indices[0] if len(indices) == 1 else None, trainable_matrix(gm, weight)
        if matrix is None or not _integer(ids):
            continue
        vocab = matrix.shape[0]
        with gm.graph.inserting_before(node):
            wrapped = gm.graph.call_function(aten.where.self, (
                gm.graph.call_function(aten.lt.Scalar, (ids, 0)),
                gm.graph.call_function(aten.add.Tensor, (ids, vocab)), ids))
            lookup = gm.graph.call_function(aten.embedding.default, (weight, wrapped))
        wrapped.meta["val"] = value_of(ids)  # what passes/shared_positions.py reads of the indices
        lookup.meta = dict(node.meta)
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def trainable_matrix(gm: fx.GraphModule, node) -> torch.nn.Parameter | None:
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
