"""index_lookup: a row lookup written as indexing, `W[ids]`, as the embedding lookup it is.

Whisper's decoder position embedding (an nn.Embedding subclass whose forward returns
`self.weight[position_ids]`) reaches torch.export's graph as `aten.index.Tensor(W, [ids])`: the
rows of a trainable (V, d) weight picked by a tensor of integer indices, E[ids], the value of
`aten.embedding(W, ids)`, and the same gradient (each output row's gradient added into the row it
was read from). `lookups_as_embeddings` rewrites it into that op, so that the embedding detector
(passes/embedding.py) makes W a block and passes/shared_positions.py sees the lookup; W may be a unit-norm weight
computed from the parameter (nGPT's token embedding, passes/unit_norm_weights.py), whose block steps W. Indexing reads
a negative index i as i + V, which the embedding does not: the indices become
`where(ids < 0, ids + V, ids)`, the same rows (an index outside [-V, V) still raises). Only
torch.export's graph records the indices' dtype (`meta["val"]`). torch.fx's `W[x]` (`operator.getitem`) of a
traced value x records none, and x may be an integer tensor (the lookup), a bool mask or a Python int (a size):
only the call's values tell. So a torch.fx graph holding such an indexing (`traced_indexings`) is captured from a
call (gnfx.variants: at the model's first call, not at gnfx.compile), whose check against the forward
(passes/trace_check.py) runs the graph through `IndexKinds`, an fx.Interpreter that records each such x's dtype
(or Python type) in `meta[EXAMPLE_INDEX]`: no run beyond the check's, and none at later calls. An integer x makes
the same lookup as torch.export's; a mask, an int, a slice or a tuple keep their indexing. The graph then serves
later calls without values: `integer_indices` raises a GnfxError where one indexes with anything but an integer
tensor, whose indexing would be another function than the lookup the graph holds.

`torch.index_select(W, 0, ids)` (`W.index_select(0, ids)`; `aten.index_select(W, 0, ids)` in torch.export's
graph) is the same lookup in both graphs: its index is a vector of integers (0-D: one, whose output row keeps
its dimension) and a negative one raises, as the embedding's does, so it becomes `aten.embedding(W,
ids.reshape(-1))`, the rows in the same shape (the reshape left out where the graph records ids as a vector).

A one-hot product, `one_hot(ids, V).to(dtype) @ W` (`F.one_hot`, cast to a floating dtype, times the trainable
(V, d) table, `matmul` or `@`; torch.export's `aten.one_hot`, `aten.to`, `aten.matmul`), is E[ids] too: each
output row is 1·W_i plus zeros (exactly W_i, for a finite W) and its gradient adds each output row's gradient
into row i (onehotᵀ g). As a linear layer of the one-hot input it was a block over V inputs whose factor
A = E[a aᵀ], the token frequencies on its diagonal, was stored and inverted as a dense V x V matrix; it becomes
`aten.embedding(W, ids)`, whose A is that diagonal, and the one-hot tensor (N·R·V entries) is no longer made.

A lookup whose rows reach the scores of a batch as a bias broadcast over their first dimension
(`_bias_of_scores`: Swin's relative position bias, `T[index.view(-1)].view(M², M², -1)
.permute(2, 0, 1).unsqueeze(0)` added to the scores or given as SDPA's attn_mask) is not rewritten: it
stays a fallback, under torch.export as under torch.fx. As an embedding, its indices (a buffer, no
batch dimension) made it one example whose gradient sums the N·windows windows' (S of that sum, not
of the batch's rows). Looked up once per window (commit 8b27f81: A and S exact against autograd, and
with one window per example the per-example diagonal against vmap), the block made kfac's held-out
loss on the Swin look-alike worse than the fallback's, 1.21 -> 1.54 and 0.66 -> 1.20 on seeds 0 and 1
(benchmarks/results/library_models.md, "Swin's relative position bias looked up per window").
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

from gnfx.errors import GnfxError

from .parameter_casts import floating_cast, metadata_read
from .rewrite import recompiled, replace
from .shapes import value_of
from .unit_norm_weights import normalized

aten = torch.ops.aten
# the shape ops between a relative position bias lookup and the scores (torch.export's, torch.fx's)
_SHAPE_OPS = (aten.view.default, aten.reshape.default, aten.permute.default, aten.contiguous.default,
              aten.clone.default, aten.unsqueeze.default, "view", "reshape", "permute", "contiguous", "unsqueeze")
_UNSQUEEZE = (aten.unsqueeze.default, "unsqueeze")
_ADD = (aten.add.Tensor, operator.add)
_SDPA = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
_ONE_HOT = (F.one_hot, aten.one_hot.default)
_MATMUL = (operator.matmul, torch.matmul, aten.matmul.default)
EXAMPLE_INDEX = "gnfx_example_index"  # the dtype (or Python type) of a torch.fx index on the call captured from
BIAS_OF_SCORES = ("a relative position bias, a lookup broadcast over the attention scores: diag, measured better "
                  "than an embedding block (benchmarks/results/library_models.md)")


def lookups_as_embeddings(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every `aten.index.Tensor(W, [ids])` of a trainable 2-D parameter W and integer ids
    into `aten.embedding(W, ids)` (module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        one_hot = _one_hot_product(gm, node)
        if one_hot is not None:
            _one_hot_as_embedding(gm, node, *one_hot)
            changed = True
            continue
        if _row_selection(node) and trainable_matrix(gm, node.args[0]) is not None:
            _as_embedding(gm, node)
            changed = True
            continue
        if node.op != "call_function" or node.target not in (aten.index.Tensor, operator.getitem):
            continue
        weight, indices = node.args[0], node.args[1]
        # torch.export's list of indices, torch.fx's one index
        ids = (indices[0] if len(indices) == 1 else None) if node.target is aten.index.Tensor else indices
        table = normalized(weight)  # a unit-norm table (nGPT's token embedding): V's rows, normalized
        matrix = trainable_matrix(gm, weight if table is None else table[0])
        if matrix is None:
            continue
        if _bias_of_scores(node):  # torch.fx's whatever its index, as its dtype is not known without the call
            node.meta["gnfx_fallback_reason"] = BIAS_OF_SCORES
            continue
        if not _integer(ids):
            continue
        vocab = matrix.shape[0]
        with gm.graph.inserting_before(node):
            if node.target is operator.getitem:
                ids = gm.graph.call_function(integer_indices, (ids,))
            wrapped = gm.graph.call_function(aten.where.self, (
                gm.graph.call_function(aten.lt.Scalar, (ids, 0)),
                gm.graph.call_function(aten.add.Tensor, (ids, vocab)), ids))
            lookup = gm.graph.call_function(aten.embedding.default, (weight, wrapped))
        wrapped.meta["val"] = value_of(ids)  # what passes/shared_positions.py reads of the indices
        lookup.meta = dict(node.meta)
        replace(gm, node, lookup)
        changed = True
    return recompiled(gm, changed)


def _row_selection(node: fx.Node) -> bool:
    """Whether `node` is `index_select(W, 0, ids)` of a 2-D W (dim 0 or -2), as a function or a method."""
    if not (node.op == "call_function" and node.target in (torch.index_select, aten.index_select.default)
            or node.op == "call_method" and node.target == "index_select"):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim in (0, -2) and (len(node.args) > 2 or "index" in node.kwargs)


def _as_embedding(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace the row selection `node` by `aten.embedding(W, ids.reshape(-1))` (module docstring)."""
    weight, ids = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs["index"]
    value = value_of(ids)
    with gm.graph.inserting_before(node):
        if not (isinstance(value, torch.Tensor) and value.dim() == 1):
            ids = gm.graph.call_function(aten.reshape.default, (ids, [-1]))
            if isinstance(value, torch.Tensor):
                ids.meta["val"] = value.reshape(-1)
        lookup = gm.graph.call_function(aten.embedding.default, (weight, ids))
    lookup.meta = dict(node.meta)
    replace(gm, node, lookup)


def _one_hot_product(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(W, ids, the cast, the one-hot) of a product `node` = `cast(one_hot(ids, V)) @ W` of a trainable (V, d)
    W whose cast only it reads (module docstring), else None."""
    if not (node.op == "call_function" and node.target in _MATMUL and len(node.args) == 2):
        return None
    cast, weight = node.args
    matrix = trainable_matrix(gm, weight)
    if matrix is None or not isinstance(cast, fx.Node) or not floating_cast(cast) or len(cast.users) != 1:
        return None
    one_hot = cast.args[0]
    if not (isinstance(one_hot, fx.Node) and one_hot.op == "call_function" and one_hot.target in _ONE_HOT):
        return None
    classes = one_hot.args[1] if len(one_hot.args) > 1 else one_hot.kwargs.get("num_classes", -1)
    return (weight, one_hot.args[0], cast, one_hot) if classes == matrix.shape[0] else None


def _one_hot_as_embedding(gm: fx.GraphModule, node: fx.Node, weight, ids, cast: fx.Node, one_hot: fx.Node) -> None:
    """Replace the one-hot product `node` by `aten.embedding(W, ids)`, and the cast and the one-hot by nothing
    where nothing else reads them (torch.export's check of the one-hot's dtype aside)."""
    with gm.graph.inserting_before(node):
        lookup = gm.graph.call_function(aten.embedding.default, (weight, ids))
    lookup.meta = dict(node.meta)
    replace(gm, node, lookup)
    gm.graph.erase_node(cast)
    if all(metadata_read(user) and not user.users for user in one_hot.users):
        for user in list(one_hot.users):
            gm.graph.erase_node(user)
        gm.graph.erase_node(one_hot)


def _bias_of_scores(lookup: fx.Node) -> bool:
    """Whether the lookup's value reaches the scores of a batch through one-use shape ops ending in
    `unsqueeze(0)`, a bias broadcast over their first dimension: added to them, or the attn_mask of
    scaled_dot_product_attention (module docstring)."""
    node = lookup
    while len(node.users) == 1 and next(iter(node.users)).target in _SHAPE_OPS:
        node = next(iter(node.users))
    if node is lookup or node.target not in _UNSQUEEZE or node.args[1:] != (0,) or len(node.users) != 1:
        return False
    consumer = next(iter(node.users))
    return consumer.target in _ADD or (consumer.target in _SDPA and node not in consumer.args[:3])


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
    """Whether `ids` is a node whose recorded value (torch.export's) or example dtype (torch.fx's, `IndexKinds`)
    is that of a tensor of integer indices."""
    value = value_of(ids)
    kind = value.dtype if isinstance(value, torch.Tensor) else ids.meta.get(EXAMPLE_INDEX) \
        if isinstance(ids, fx.Node) else None
    return isinstance(kind, torch.dtype) and _integer_dtype(kind)


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype is torch.bool)


def integer_indices(ids):
    """`ids`, the index of a torch.fx `W[ids]` the graph holds as an embedding lookup (an integer tensor on the
    call it was captured from); a GnfxError where this call's is anything else (module docstring)."""
    if isinstance(ids, torch.Tensor) and _integer_dtype(ids.dtype):
        return ids
    given = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else f"a {type(ids).__name__}"
    raise GnfxError(f"gnfx captured the forward's indexing of a trainable table, W[x], as an embedding lookup of "
                    f"integer indices x, as they were on the call it captured from; this call indexes with {given}, "
                    f"which the captured graph cannot take. Fix: index with one kind of index in every call (a bool "
                    f"mask m as W[m.nonzero().squeeze(1)]), or capture='export', which captures each dtype of input "
                    f"on its own")


def traced_indexings(gm: fx.GraphModule) -> set[fx.Node]:
    """The indices x of torch.fx's `W[x]`, W a trainable matrix (or its unit-norm weight) and x a traced value,
    whose kind only a call's values tell (module docstring); a relative position bias's left out (it falls back
    whatever x is)."""
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], fx.Node):
            continue
        table = normalized(node.args[0])
        if trainable_matrix(gm, node.args[0] if table is None else table[0]) is not None and not _bias_of_scores(node):
            found.add(node.args[1])
    return found


class IndexKinds(fx.Interpreter):
    """A run of a torch.fx graph module on a call (args, kwargs), as the graph's own forward takes it, that records
    in `meta[EXAMPLE_INDEX]` the dtype (or Python type) of each node of `indices` (module docstring)."""

    def __init__(self, gm: fx.GraphModule, indices: set[fx.Node]):
        super().__init__(gm)
        self.indices = indices

    def __call__(self, *args, **kwargs):
        """The graph's output on the call, its inputs in the order of its placeholders (the graph's own call
        where they take a form the Interpreter's positional run does not: `**kwargs`, nothing recorded)."""
        signature = inspect.signature(self.module.forward)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return self.module(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return self.run(*bound.args, *bound.kwargs.values())

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.indices:
            n.meta[EXAMPLE_INDEX] = value.dtype if isinstance(value, torch.Tensor) else type(value)
        return value
