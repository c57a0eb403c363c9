"""embedding_renorm: an embedding with `max_norm`, the renormalization of its rows and the lookup after it.

`nn.Embedding(V, d, max_norm=m)` (and `F.embedding(ids, W, max_norm=m)`, `nn.EmbeddingBag`'s max_norm) first
renormalizes, in place and without gradient, the rows of W that the ids read: each row W_i of p-norm
‖W_i‖_p > m becomes W_i · m / (‖W_i‖_p + 1e-7) (`torch.embedding_renorm_(W.detach(), ids, m, p)`); then it
looks up those rows, an ordinary lookup E[ids] of the renormalized W, whose gradient adds each output row's
gradient into the row it was read from (the renormalization, under no_grad, is no part of the derivative).
The block of W is thus the embedding's of the table as the forward left it: its statistics (token counts A,
output gradients S) do not depend on W's values, and the parameter it steps is that renormalized W, the
value the gradient was taken at.

torch.fx keeps the call as `F.embedding(ids, W, ..., max_norm=m, norm_type=p)`, which the embedding detector
(passes/embedding.py) takes as a lookup of W. torch.export writes it out:
`embedding_renorm_(detach(W), ids, m, p)`, a node of no users, then `embedding(W, ids)`, so W has a second
use (the detach) that no lookup claims. `renorms_as_lookups` folds the two back into the one call
`F.embedding(ids, W, padding_idx, m, p, scale_grad_by_freq, sparse)`, the same operations in the same order;
a renormalization of a table that no embedding of the same ids reads (an nn.EmbeddingBag's: no block,
gnfx.composite_forms) is left as it is, calling `torch.embedding_renorm_` instead of the ATen op, and its
read of the table is the fallback's reason, said as such.

Either way the renormalization is reached through `torch.embedding_renorm_`, looked up when it runs, so that
the replays of the training forward, which must not renormalize, can replace it (gnfx.composite_forms): the
renormalization happens in the user's forward calls only, once each, as in eager training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .rewrite import recompiled, replace
from .sites import arg

aten = torch.ops.aten
UNFOLDED = ("renormalized in place for max_norm (torch.embedding_renorm_) before a read that is no embedding lookup "
            "of the same ids (an nn.EmbeddingBag's, no layer kind)")


def renorms_as_lookups(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold each torch.export renormalization and the lookup of the same table and ids after it into one
    `F.embedding(..., max_norm)` call; make any other call `torch.embedding_renorm_` (module docstring)."""
    changed = False
    for renorm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding_renorm_.default]:
        detached, ids, max_norm, norm_type = renorm.args
        lookup = _lookup_after(renorm)
        changed = True
        if lookup is None:
            renorm.target = torch.embedding_renorm_
            if isinstance(detached, fx.Node):
                detached.meta["gnfx_fallback_reason"] = UNFOLDED
            continue
        weight = lookup.args[0]
        padding = arg(lookup, 2, "padding_idx", -1)
        with gm.graph.inserting_before(lookup):
            folded = gm.graph.call_function(F.embedding, (ids, weight), {
                "padding_idx": None if padding == -1 else padding, "max_norm": max_norm, "norm_type": norm_type,
                "scale_grad_by_freq": arg(lookup, 3, "scale_grad_by_freq", False),
                "sparse": arg(lookup, 4, "sparse", False)})
        folded.meta = dict(lookup.meta)
        replace(gm, lookup, folded)
        gm.graph.erase_node(renorm)
        if not detached.users:
            gm.graph.erase_node(detached)
    return recompiled(gm, changed)


def _lookup_after(renorm: fx.Node) -> fx.Node | None:
    """The `aten.embedding(W, ids)` that reads the table `renorm` renormalizes (`detach(W)`), with the same
    ids, and the first operation on W after the renormalization; else None."""
    detached, ids = renorm.args[:2]
    if not (isinstance(detached, fx.Node) and detached.target is aten.detach.default):
        return None
    weight = detached.args[0]
    node = renorm.next
    while node.op != "output" and weight not in node.all_input_nodes:
        node = node.next
    return node if node.target is aten.embedding.default and node.args[:2] == (weight, ids) else None
