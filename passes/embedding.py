"""The embedding detector: `F.embedding(ids, W)` and `aten.embedding(W, ids)` with a trainable
weight (V, d). Sparse gradients are a fallback; `padding_idx` is recorded (its row gets no gradient);
`max_norm`, which renormalizes the rows the ids read in place before the lookup, is a lookup of the
renormalized W (passes/embedding_renorm.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .sites import Site, arg

aten = torch.ops.aten


def find_embedding_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
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
        vocab, dim = shape_of(weight)
        if padding is not None and padding < 0:
            padding += vocab
        sites.append(Site(node=node, input=ids, weight=weight, bias=None,
                          uses=[(node, w_node)], d_in=vocab, d_out=dim,
                          options={"weight_shape": (vocab, dim), "padding_idx": padding}))
    return sites, rejected
