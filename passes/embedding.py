"""The embedding detector: `F.embedding(ids, W)` and `aten.embedding(W, ids)` with a trainable
weight (V, d). Sparse gradients are a fallback, and so is `scale_grad_by_freq`: its gradient divides each
row by the row's count in the batch, ∇W_i = Σ_{t: i_t = i} δ_t / c_i, which the block's statistics (A the
token counts, S and the per-example and batch gradients of the δ's, unscaled) do not model, and K-FAC's
diag(1/(A + λ_A)) would divide by the counts again. `padding_idx` is recorded (its row gets no gradient);
`max_norm`, which renormalizes the rows the ids read in place before the lookup, is a lookup of the
renormalized W (passes/embedding_renorm.py). A bag of embeddings (`F.embedding_bag`, nn.EmbeddingBag's
call, or the module itself where torch.fx keeps it a leaf) is no embedding block, and its fallback says so
(README: a sum or mean bag is a linear map of the count vector, whose K-FAC factor over the vocabulary is
dense; a max bag is no linear map)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .sites import Site, arg

aten = torch.ops.aten
BAG = "a bag of embeddings (nn.EmbeddingBag, F.embedding_bag): no layer kind (README) (fallback)"
_BAGS = (F.embedding_bag, aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default)
SCALED_BY_FREQUENCY = ("an embedding with scale_grad_by_freq, whose gradient divides each row by its count in the "
                       "batch, which the block's statistics do not model (fallback)")


def find_embedding_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.EmbeddingBag):
            rejected.append((node, BAG))  # torch.fx keeps the module a leaf: its parameters fall back here
        if node.op != "call_function":
            continue
        if node.target in _BAGS:
            table = arg(node, 1, "weight") if node.target is F.embedding_bag else node.args[0]
            if param_of(table) is not None:
                rejected.append((node, BAG))
            continue
        if node.target is F.embedding:
            ids, w_node, padding = node.args[0], arg(node, 1, "weight"), arg(node, 2, "padding_idx")
            if arg(node, 6, "sparse", False):
                if param_of(w_node) is not None:
                    rejected.append((node, "an embedding with sparse gradients (fallback)"))
                continue
        elif node.target is aten.embedding.default:
            w_node, ids, padding = node.args[0], node.args[1], arg(node, 2, "padding_idx", -1)
            padding = None if padding == -1 else padding
            if arg(node, 4, "sparse", False):
                if param_of(w_node) is not None:
                    rejected.append((node, "an embedding with sparse gradients (fallback)"))
                continue
        else:
            continue
        weight = param_of(w_node)
        if weight is None:
            continue
        if _scaled_by_frequency(node):
            rejected.append((node, SCALED_BY_FREQUENCY))
            continue
        vocab, dim = shape_of(weight)
        if padding is not None and padding < 0:
            padding += vocab
        sites.append(Site(node=node, input=ids, weight=weight, bias=None,
                          uses=[(node, w_node)], d_in=vocab, d_out=dim,
                          options={"weight_shape": (vocab, dim), "padding_idx": padding}))
    return sites, rejected


def _scaled_by_frequency(node: fx.Node) -> bool:
    """Whether the lookup `node` (F.embedding or aten.embedding) has scale_grad_by_freq."""
    return bool(arg(node, 5, "scale_grad_by_freq", False) if node.target is F.embedding
                else arg(node, 3, "scale_grad_by_freq", False))
