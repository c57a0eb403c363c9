"""A trainable vector added to activations, `z = x + b` with b (d,): a position table of one row.

Every row of x (N, ..., d) reads b, as broadcasting adds it: gnfx.layouts.position's model of a table of
one row, P (1, d) (per-example gradient ∇b_n = Σ_r δ_{n,r}; A = [1], S = E[δ δᵀ] over all rows), with b
read as the matrix d x 1 (the view "column"). PyTorch Geometric's convolutions (GCNConv, GATConv) add their
bias so, after aggregating the messages of the linear map whose bias it would otherwise be.
"""
from __future__ import annotations

from gnfx.layouts.position import PositionLayout


class ShiftLayout(PositionLayout):
    view = "column"
