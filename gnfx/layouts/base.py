"""What every layout shares: the row conventions of docs/design.md §1 and the shapes of a block's factors.

A block's gradient matrix `[W b]` (d_out x d_a, d_a = d_in + 1 with a bias) may consist of
`groups` independent linear maps: its rows split into `groups` consecutive groups of
s = d_out / groups rows, group j mapping its own input rows `a_j` (d_in entries) to its own
outputs, `z_j = W_j a_j + b_j`. K-FAC then models each group on its own,
`G ≈ blockdiag_j(A_j ⊗ S_j)`, `A_j = E[ā_j ā_jᵀ]`, `S_j = E[δ_j δ_jᵀ]`. With one group (linear,
conv, embedding) A and S are the plain d_a x d_a and d_out x d_out factors; with several, a
layout's `input_chunks` yields rows (N, R, groups, d_in) and A, S are stacked per group,
(groups, d_a, d_a) and (groups, s, s). A diagonal A (`diagonal_A`, token ids as inputs) is stored
as its d_a entries.
"""
from __future__ import annotations

import torch


class Layout:
    diagonal_A = False
    groups = 1
    view = ""  # how the weight reads as the matrix W (gnfx.targets.as_matrix)

    def __init__(self, block):
        self.block = block

    @staticmethod
    def examples(a: torch.Tensor) -> int:
        """N: the examples in a layer input (its first dimension; 1 for an unbatched input)."""
        return a.shape[0] if a.dim() > 1 else 1

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient as (N, R, d_out) rows."""
        return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the averaged factors A (bias folded in) and S (module docstring)."""
        b = self.block
        d_a = b.d_in + (b.bias is not None)
        if self.diagonal_A:
            return {"A": (d_a,), "S": (b.d_out, b.d_out)}
        if self.groups == 1:
            return {"A": (d_a, d_a), "S": (b.d_out, b.d_out)}
        s = b.d_out // self.groups
        return {"A": (self.groups, d_a, d_a), "S": (self.groups, s, s)}


def split_groups(X: torch.Tensor, groups: int) -> torch.Tensor:
    """A stack (k, groups·s, d) of [W b] matrices as the stack (k·groups, s, d) of its groups."""
    return X.reshape(X.shape[0] * groups, X.shape[1] // groups, X.shape[2])


def merge_groups(X: torch.Tensor, pieces: int) -> torch.Tensor:
    """The inverse of `split_groups`: (k·groups, s, d) -> (k, groups·s, d)."""
    return X.reshape(pieces, -1, X.shape[2])
