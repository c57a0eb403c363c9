"""Stacked linear maps (passes/stacked_products.py): E members of an ensemble, or E experts that every row
passes through, as one product with a stacked weight W (E, d_out, d_in) (or (E, d_in, d_out) used as stored).

Member e maps its own input a_e (the member axis of the layer input; or the one input every member reads,
`options["input_member_dim"]` None) to its own output z_e = W_e a_e, so K-FAC models each member as its own
linear layer over every row: W reads as the matrix `W.flatten(0, 1)` (E·d_out x d_in) of E groups
(gnfx.layouts.base; a W stored (E, d_in, d_out) as `W.transpose(1, 2).flatten(0, 1)`, the view
"in_out_stacked"), the input rows are (N, R, E, d_in) and the output gradient's (N, R, E·d_out), so that

    A_e = 1/(N R) Σ_{n,r} a_{e,n,r} a_{e,n,r}ᵀ        S_e = M Σ_{n,r} g_{e,n,r} g_{e,n,r}ᵀ,

the factors of E separate layers, per-example statistics included (every example is a row of every member).
The member axis of a and z is `options["input_member_dim"]` and `options["output_member_dim"]` (counted from
the end; the features are the last dimension); the examples are the first of the others.
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout, position_rows


class StackedLayout(Layout):
    def __init__(self, block):
        super().__init__(block)
        o = block.options
        self.groups = o["members"]
        self.view = "in_out_stacked" if o.get("transposed") else "features_first"
        self.input_member, self.output_member = o.get("input_member_dim"), o["output_member_dim"]

    def _members_last(self, x: torch.Tensor, member) -> torch.Tensor:
        """x with its member axis moved just before the features: (N, ..., E, d)."""
        return x.movedim(member, -2)

    def examples(self, a: torch.Tensor) -> int:
        a = a if self.input_member is None else self._members_last(a, self.input_member)
        return a.shape[0] if a.dim() > (1 if self.input_member is None else 2) else 1

    def input_chunks(self, a: torch.Tensor):
        """The rows (N, R, E, d_in): each member's own input, or the input every member reads, E times."""
        if self.input_member is None:
            rows = position_rows(a)
            yield rows.unsqueeze(2).expand(-1, -1, self.groups, -1)
            return
        a = self._members_last(a, self.input_member)
        a = a if a.dim() > 2 else a.unsqueeze(0)
        yield a.reshape(a.shape[0], -1, self.groups, a.shape[-1])

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient's rows (N, R, E·d_out), member-major."""
        g = self._members_last(g, self.output_member)
        g = g if g.dim() > 2 else g.unsqueeze(0)
        return g.reshape(g.shape[0], -1, g.shape[-2] * g.shape[-1])
