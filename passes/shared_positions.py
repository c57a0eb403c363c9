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

from .shapes import known_equal, same_sizes, value_of
from .sites import arg


aten = torch.ops.aten
_ADDS = (aten.add.Tensor, operator.add, torch.add)
_SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
# the shape ops between a lookup and the scores its rows are added to, by what they do to the dimensions
_VIEWS = ("view", "reshape", torch.reshape, aten.view.default, aten.reshape.default)
_PERMUTES = ("permute", torch.permute, aten.permute.default)
_UNSQUEEZES = ("unsqueeze", torch.unsqueeze, aten.unsqueeze.default)
_COPIES = ("contiguous", aten.contiguous.default, aten.clone.default)


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


def leading_size(x: torch.Tensor, rank: int) -> int:
    """The size of the first dimension of the scores x that a bias of `rank` dimensions, (1, ...), is broadcast
    over: x.shape[0] where x has that rank, else 1 (the bias broadcast over other dimensions: not expanded)."""
    return x.shape[0] if x.dim() == rank else 1


def _op_is(node: fx.Node, ops) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ops


def _sizes(op: fx.Node) -> list:
    """The sizes or dimensions a view or permute node takes, as varargs or as one sequence."""
    rest = op.args[1:]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def broadcast_chain(lookup: fx.Node):
    """(the shape ops, the batch node) where the lookup's value reaches the scores of a batch through a chain of
    one-use shape ops (`_VIEWS`, `_PERMUTES`, `_UNSQUEEZES`, `_COPIES`) ending in `unsqueeze(0)`, the bias b,
    broadcast over the scores' first dimension: `x + b` (`b + x`), or `b` as the float `attn_mask` of
    `scaled_dot_product_attention(q, k, v)`, whose scores are q kᵀ (x = q); the batch node is x. Swin's relative
    position bias, `T[index.view(-1)].view(M², M², -1).permute(2, 0, 1).contiguous().unsqueeze(0)`. Else None."""
    chain, node = [], lookup
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (_op_is(user, _VIEWS + _PERMUTES + _UNSQUEEZES + _COPIES) and user.args[0] is node):
            break
        chain.append(user)
        node = user
    if not chain or not _op_is(chain[-1], _UNSQUEEZES) or chain[-1].args[1:] != (0,) or len(node.users) != 1:
        return None
    consumer = next(iter(node.users))
    if _op_is(consumer, _SDPA) and arg(consumer, 3, "attn_mask") is node and node not in consumer.args[:3]:
        return chain, consumer.args[0]
    if _op_is(consumer, _ADDS) and len(consumer.args) == 2 and not consumer.kwargs:
        x = consumer.args[1] if consumer.args[0] is node else consumer.args[0]
        return (chain, x) if isinstance(x, fx.Node) and x is not node else None
    return None


def _rank(gm: fx.GraphModule, ids: fx.Node) -> int | None:
    """The number of dimensions of the indices: recorded (torch.export), or those of the model's tensor they
    read (torch.fx: passes/index_lookup.py's `where(ids < 0, ids + V, ids)` of a buffer or constant)."""
    value = value_of(ids)
    if value is not None:
        return value.dim()
    if _op_is(ids, (torch.where,)):
        ids = ids.args[2]
    if isinstance(ids, fx.Node) and ids.op == "get_attr":
        tensor = operator.attrgetter(ids.target)(gm)
        return tensor.dim() if isinstance(tensor, torch.Tensor) else None
    return None


def _bias_rank(chain: list, rank: int) -> int:
    """The rank of the chain's result from that of the lookup's value."""
    for op in chain:
        rank = len(_sizes(op)) if _op_is(op, _VIEWS) else rank + 1 if _op_is(op, _UNSQUEEZES) else rank
    return rank


def _broadcast_over_first(chain: list, x: fx.Node) -> bool | None:
    """Whether the recorded shapes say that the chain's result b, (1, ...), is broadcast over the first
    dimension of the scores only (x's, of the same rank; module doc); None where no shapes are recorded."""
    consumer = next(iter(chain[-1].users))
    b, x_val = value_of(chain[-1]), value_of(x)
    if _op_is(consumer, _SDPA):
        k = value_of(consumer.args[1])
        scores = None if x_val is None or k is None else (*x_val.shape[:-1], k.shape[-2])
    else:
        scores = None if value_of(consumer) is None else value_of(consumer).shape
    if b is None or x_val is None or scores is None:
        return None
    return (b.dim() == x_val.dim() == len(scores) and same_sizes(b.shape[1:], scores[1:])
            and known_equal(x_val.shape[0], scores[0]) and not known_equal(scores[0], 1))


def _per_example(op: fx.Node, source: fx.Node, rank: int, examples) -> tuple[tuple, int]:
    """(the arguments, the rank of each example's result) of the shape op `op` applied to each example of
    `source`, whose first dimension is the examples' and whose examples have `rank` dimensions."""
    if _op_is(op, _UNSQUEEZES):
        return (source, op.args[1] % (rank + 1) + 1), rank + 1
    if _op_is(op, _VIEWS):
        sizes, rank = [examples] + _sizes(op), len(_sizes(op))
    elif _op_is(op, _PERMUTES):
        sizes = [0] + [d % rank + 1 for d in _sizes(op)]
    else:
        return (source,) + tuple(op.args[1:]), rank
    return ((source, *sizes) if op.op == "call_method" else (source, sizes)), rank


def _expand_over_chain(gm: fx.GraphModule, lookup: fx.Node, ids: fx.Node, chain: list, x: fx.Node) -> bool:
    """Rewrite `chain(lookup(W, ids))`, broadcast over the first dimension E of the scores x, into
    `chain_E(lookup(W, ids.expand(E, ...)))`: the lookup read once per example, each shape op of the chain
    applied to each example (`_per_example`), the final unsqueeze(0) dropped, the value unchanged (module doc).
    False where the indices' rank is unknown or the recorded shapes say b is broadcast otherwise."""
    rank, recorded = _rank(gm, ids), _broadcast_over_first(chain, x)
    if rank is None or recorded is False:
        return False
    graph, consumer = gm.graph, next(iter(chain[-1].users))
    with graph.inserting_before(consumer):
        if recorded:
            examples = graph.call_function(aten.sym_size.int, (x, 0))
            expanded = graph.call_function(aten.expand.default, (ids, [examples] + [-1] * rank))
        else:
            examples = graph.call_function(leading_size, (x, _bias_rank(chain, rank + 1)))
            expanded = graph.call_method("expand", (ids, examples, *[-1] * rank))
        source = graph.call_function(lookup.target, tuple(expanded if a is ids else a for a in lookup.args),
                                     dict(lookup.kwargs))
        new, rank = [examples, expanded, source], rank + 1
        for op in chain[:-1]:
            args, rank = _per_example(op, source, rank, examples)
            source = graph.create_node(op.op, op.target, args, dict(op.kwargs))
            new.append(source)
    for node, old in zip(new, [x, ids, lookup] + chain[:-1]):
        node.meta = dict(old.meta) if old is not x else {}
        if recorded:
            node.meta["val"] = node.target(*fx.node.map_arg(node.args, value_of), **fx.node.map_arg(node.kwargs, value_of))
    consumer.replace_input_with(chain[-1], source)
    for node in reversed([lookup] + chain):
        graph.erase_node(node)
    return True


def expand_shared_positions(gm: fx.GraphModule) -> fx.GraphModule:
    """Expand the indices of every embedding lookup added to a batch it is shared by (module doc)."""
    changed = False
    for node in list(gm.graph.nodes):
        ids = _expandable_indices(node)
        x = _other_addend(node) if ids is not None else None
        if x is None:
            found = broadcast_chain(node) if ids is not None else None
            changed = (found is not None and _expand_over_chain(gm, node, ids, *found)) or changed
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
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
