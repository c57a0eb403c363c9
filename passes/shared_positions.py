"""shared_positions: an embedding of indices shared by the batch, expanded to the batch before the lookup.

Hugging Face's position embeddings look up indices that every example shares, `wpe(position_ids)`
with position_ids (1, T) (GPT-2: `arange(T).unsqueeze(0)`; BERT: a `position_ids` buffer sliced to
T), and add the (1, T, d) rows to the (N, T, d) activations by broadcasting. The gradient that
reaches the lookup's output is then summed over the examples, so the per-example statistics (ekfac's
and rank1's diagonals, kfac_approx="reduce") could only take the whole batch as one example.
`expand_shared_positions` rewrites such a lookup, `embedding(W, ids)` whose one user adds it to an
activation x of N examples, into `embedding(W, ids.expand(N, ...))`: the same sum x + E[ids] (the
broadcast made explicit), with an output gradient per example. Indices without the batch dimension,
(T,) as nanoGPT's `wpe(arange(T))`, are expanded the same way.

It needs the shapes (torch.export's `meta["val"]`; symbolic sizes compared without guarding); a
graph without them (torch.fx's symbolic trace) is left as it is.
"""
from __future__ import annotations

import torch
from torch import fx

from .shapes import known_equal, same_sizes, value_of


aten = torch.ops.aten


def _shared(ids, x) -> bool:
    """Whether the indices `ids` (values) are shared by the N examples of the activation x (values):
    (1, *P) or P where x is (N, *P, d) with N not known to be 1."""
    positions = x.shape[1:-1]
    if known_equal(x.shape[0], 1):
        return False
    if ids.dim() == len(positions) + 1:
        return known_equal(ids.shape[0], 1) and same_sizes(ids.shape[1:], positions)
    return ids.dim() == len(positions) and same_sizes(ids.shape, positions)


def expand_shared_positions(gm: fx.GraphModule) -> fx.GraphModule:
    """Expand the indices of every embedding added to a batch it is shared by (module doc)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.embedding.default or len(node.users) != 1:
            continue
        add = next(iter(node.users))
        if add.op != "call_function" or add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
            continue
        x = add.args[1] if add.args[0] is node else add.args[0]
        ids, x_val, out = value_of(node.args[1]), value_of(x), value_of(add)
        if any(v is None for v in (ids, x_val, out)) or not same_sizes(out.shape, x_val.shape):
            continue
        if not _shared(ids, x_val):
            continue
        with gm.graph.inserting_before(add):  # after x, which the lookup may precede
            examples = gm.graph.call_function(aten.sym_size.int, (x, 0))
            expanded = gm.graph.call_function(aten.expand.default,
                                              (node.args[1], [examples] + [-1] * (x_val.dim() - 2)))
            lookup = gm.graph.call_function(aten.embedding.default, (node.args[0], expanded) + node.args[2:],
                                            dict(node.kwargs))
        examples.meta = {"val": x_val.shape[0]}
        expanded.meta = {**node.meta, "val": ids.expand(*x_val.shape[:-1])}
        lookup.meta = {**node.meta, "val": node.meta["val"].expand(*x_val.shape)}
        add.replace_input_with(node, lookup)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
