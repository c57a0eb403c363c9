"""weight-first products: `W @ x`, a linear map of the columns of x, as the row form the linear detector reads.

A trainable (d_out, d_in) matrix W multiplying an input x of shape (..., d_in, L) from the left maps
each column x_{:, l} to W x_{:, l}: a linear layer whose features are x's second-to-last dimension
(Mamba's `self.dt_proj.weight @ time_step.transpose(1, 2)`, code written for column vectors). The
linear detector (passes/linear.py) reads `x @ Wᵀ`, features last. `weight_first_products` rewrites
the product into `(xᵀ @ Wᵀ)ᵀ`, the last two dimensions of x and of the result swapped: the same
entries (each W x_{:, l} is the row x_{:, l}ᵀ Wᵀ), the same gradients, and the site's input the rows
x_{:, l}ᵀ, its output rows the columns of z. Only torch.export's graph is rewritten, which records
that x has two dimensions or more (`meta["val"]`; `W @ v` of a vector is no layer of examples) and that
its second-to-last is W's d_in; torch.fx's graph records no shapes.
"""
from __future__ import annotations

import torch
from torch import fx

from .index_lookup import trainable_matrix
from .rewrite import recompiled, replace
from .shapes import known_equal, value_of

aten = torch.ops.aten
PRODUCTS = (aten.matmul.default, aten.mm.default)


def weight_first_products(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every `W @ x` of a trainable 2-D parameter W and an x of two dimensions or more whose
    second-to-last is W's columns into `(xᵀ @ Wᵀ)ᵀ` (module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in PRODUCTS or node.kwargs:
            continue
        weight, x = node.args[:2]
        matrix, value = trainable_matrix(gm, weight), value_of(x)
        if matrix is None or not isinstance(value, torch.Tensor) or value.dim() < 2 or \
                not known_equal(value.shape[-2], matrix.shape[1]):
            continue
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(aten.transpose.int, (x, -2, -1))
            transposed = gm.graph.call_function(aten.t.default, (weight,))
            product = gm.graph.call_function(aten.matmul.default, (rows, transposed))
            columns = gm.graph.call_function(aten.transpose.int, (product, -2, -1))
        with value.fake_mode:  # the values later passes read, as the export recorded them
            rows.meta["val"] = value.transpose(-2, -1)
            product.meta["val"] = value_of(node).transpose(-2, -1)
        columns.meta = dict(node.meta)
        replace(gm, node, columns)
        changed = True
    return recompiled(gm, changed)
