"""shared_positions: an embedding of indices shared by the batch, expanded to the batch before the lookup.

Hugging Face's position embeddings look up indices that every example shares, `wpe(position_ids)`
with position_ids (1, T) (GPT-2: `arange(T).unsqueeze(0)`; BERT: a `position_ids` buffer sliced to
T), and nanoGPT's look up `wpe(arange(T))` with positions (T,); both add the (1, T, d) or (T, d)
rows to the (N, T, d) activations by broadcasting. The gradient that reaches the lookup's output is
then summed over the examples, so the per-example statistics (ekfac's and rank1's diagonals,
kfac_approx="reduce") could only take the whole batch as one example.

`expand_shared_positions` rewrites the pattern `embedding(W, ids) + x`: an embedding lookup
(`aten.embedding`, or `F.embedding`, the form `lower_modules` gives an `nn.Embedding` call) whose one
user is a two-tensor add (`aten.add.Tensor`, `operator.add`, `torch.add`, without `alpha`), into
`embedding(W, ids.expand(B)) + x` with B the add's leading sizes, B = broadcast_shapes(ids.shape,
x.shape[:-1]): the same sum x + E[ids] (the broadcast made explicit), with an output gradient per
example. A lookup that scales its gradient by the indices' frequency (`scale_grad_by_freq`, which
the expansion would change), renormalizes W (`max_norm`) or has sparse gradients is left as it is.

Where the graph records shapes (torch.export's `meta["val"]`; symbolic sizes compared without
guarding), only the lookups whose indices are shared, (1, *P) or P for an x of (N, *P, d), are
rewritten, with B = x.shape[:-1]. Where it records none (torch.fx's symbolic trace), the sizes are
taken at run time, from indices only: the pattern is narrowed to a sum of two lookups, nanoGPT's
`tok_emb(idx) + pos_emb(arange(T))`, both rewritten with B = broadcast_shapes(ids.shape,
other_ids.shape) (`expand_to_the_sum`: a view, the identity for the per-example indices). Reading the
sizes of any other x would add a user to x, which the detectors that follow one-use chains (a sliced
position table, a norm's output) would then reject; a lookup added to anything else keeps its
whole-batch statistics there.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .rewrite import recompiled
from .shapes import known_equal, same_sizes, value_of
from .sites import arg


aten = torch.ops.aten
_ADDS = (aten.add.Tensor, operator.add, torch.add)


def expand_to_the_sum(ids, other_ids):
    """The indices `ids` of a lookup E = W[ids] (shape ids.shape + (d,)) added to another lookup
    W'[other_ids], expanded to the leading sizes of the sum: broadcast_shapes(ids.shape, other_ids.shape)
    (a view; ids itself where they are the larger)."""
    return ids.expand(torch.broadcast_shapes(ids.shape, other_ids.shape))


def _expandable_indices(node: fx.Node):
    """The indices node of an embedding lookup whose indices may be expanded without changing its value
    or its gradient, or None."""
    if node.op != "call_function":
        return None
    if node.target is F.embedding:
        ids = arg(node, 0, "input")
        if (arg(node, 3, "max_norm") is not None or arg(node, 5, "scale_grad_by_freq", False)
                or arg(node, 6, "sparse", False)):
            return None
    elif node.target is aten.embedding.default:
        ids = node.args[1]
        if arg(node, 3, "scale_grad_by_freq", False) or arg(node, 4, "sparse", False):
            return None
    else:
        return None
    return ids if isinstance(ids, fx.Node) else None


def _other_addend(node: fx.Node):
    """x of the lookup's one user `node + x` (a two-tensor add without alpha), or None."""
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2 or add.kwargs:
        return None
    x = add.args[1] if add.args[0] is node else add.args[0]
    return x if isinstance(x, fx.Node) and x is not node else None


def _shared(ids, x) -> bool:
    """Whether the indices `ids` (values) are shared by the N examples of the activation x (values):
    (1, *P) or P where x is (N, *P, d) with N not known to be 1."""
    positions = x.shape[1:-1]
    if known_equal(x.shape[0], 1):
        return False
    if ids.dim() == len(positions) + 1:
        return known_equal(ids.shape[0], 1) and same_sizes(ids.shape[1:], positions)
    return ids.dim() == len(positions) and same_sizes(ids.shape, positions)


def _expanded_indices(graph: fx.Graph, lookup: fx.Node, ids: fx.Node, x: fx.Node, add: fx.Node):
    """(the node of the lookup's indices expanded to the add's leading sizes, the expanded lookup's value
    or None where none is recorded) (module doc), or None where the recorded shapes say the indices are
    not shared, or, with no shapes recorded, x is not a lookup too."""
    ids_val, x_val, out, sum_val = value_of(ids), value_of(x), value_of(lookup), value_of(add)
    if any(v is None for v in (ids_val, x_val, out, sum_val)):  # no shapes: x must be a lookup too
        x_ids = _expandable_indices(x) if _other_addend(x) is not None else None
        return None if x_ids is None else (graph.call_function(expand_to_the_sum, (ids, x_ids)), None)
    if (not isinstance(x_val, torch.Tensor) or not same_sizes(sum_val.shape, x_val.shape)
            or not _shared(ids_val, x_val)):
        return None
    examples = graph.call_function(aten.sym_size.int, (x, 0))
    expanded = graph.call_function(aten.expand.default, (ids, [examples] + [-1] * (x_val.dim() - 2)))
    examples.meta = {"val": x_val.shape[0]}
    expanded.meta = {**lookup.meta, "val": ids_val.expand(*x_val.shape[:-1])}
    return expanded, out.expand(*x_val.shape[:-1], out.shape[-1])


def expand_shared_positions(gm: fx.GraphModule) -> fx.GraphModule:
    """Expand the indices of every embedding lookup added to a batch it is shared by (module doc)."""
    changed = False
    for node in list(gm.graph.nodes):
        ids = _expandable_indices(node)
        x = _other_addend(node) if ids is not None else None
        if x is None:
            continue
        add = next(iter(node.users))
        with gm.graph.inserting_before(add):  # after x, which the lookup may precede
            expanded = _expanded_indices(gm.graph, node, ids, x, add)
            if expanded is None:
                continue
            lookup = gm.graph.call_function(node.target, node.args, dict(node.kwargs))
        lookup.replace_input_with(ids, expanded[0])
        lookup.meta = dict(node.meta)
        if expanded[1] is not None:
            lookup.meta["val"] = expanded[1]
        add.replace_input_with(node, lookup)
        gm.graph.erase_node(node)
        changed = True
    return recompiled(gm, changed)
