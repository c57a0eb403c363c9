"""A weighted sum over the last dimension, `z = (x * w).sum(-1)`: one linear map of C inputs to one output per group.

w has the shape (1, ..., 1, *G, C) (leading ones broadcast over the examples and positions), x (N, ..., *G, C)
and z (N, ..., *G): per group g (an attention head: PyTorch Geometric's GATConv scores each edge's endpoints by
`(x_h * att_h).sum(-1)`, x_h (N, heads, C), att (1, heads, C)) the linear map `z_g = w_gᵀ x_g` of C inputs to
one output. The block is G = prod(*G) row groups (gnfx.layouts.base, `groups` = G, d_in = C, s = 1), and W is
w read as the G x C matrix of its rows (the view "rows"); with a = x_g and δ = ∂ℓ/∂z_g (docs/design.md §1):

    per-example gradient   ∇w_g = Σ_r δ_{r,g} x_{r,g}
    K-FAC, per group       A_g = E[x_g x_gᵀ]  (C x C),    S_g = E[δ_g²]  (1 x 1)

Every dimension of x between N and the groups is a position r. A 1-D w (C,) is one group (G = 1): the linear
map of C inputs to one output of every row of x.
"""
from __future__ import annotations

import math

import torch

from gnfx.layouts.base import Layout


class WeightedSumLayout(Layout):
    view = "rows"

    def __init__(self, block):
        super().__init__(block)
        self.groups = block.d_out
        self.group_dims = block.options["group_dims"]  # the dimensions of *G

    def _positions(self, t: torch.Tensor, trailing: int) -> int:
        """R: the product of t's dimensions between N and its last `trailing` ones (given, not inferred: a
        -1 is ambiguous for N = 0)."""
        return math.prod(t.shape[1:t.dim() - trailing])

    def input_chunks(self, x: torch.Tensor):
        """x as (N, R, G, C), or (N, R, C) for one group (one chunk: nothing to materialize)."""
        rows = x.reshape(x.shape[0], self._positions(x, self.group_dims + 1), self.groups, self.block.d_in)
        yield rows if self.groups > 1 else rows.squeeze(2)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """∂ℓ/∂z (N, ..., *G), or (N, ..., *G, 1) for a sum that kept its dimension, as (N, R, G)."""
        trailing = self.group_dims + self.block.options["keepdim"]
        return g.reshape(g.shape[0], self._positions(g, trailing), self.groups)
