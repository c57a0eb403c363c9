"""What every layout shares: the row conventions of docs/design.md §1 and the shapes of a block's factors.

A block's gradient matrix `[W b]` (d_out x d_a, d_a = d_in + 1 with a bias) may consist of
`groups` independent linear maps: its rows split into `groups` consecutive groups of
s = d_out / groups rows, group j mapping its own input rows `a_j` (d_in entries) to its own
outputs, `z_j = W_j a_j + b_j`. K-FAC then models each group on its own,
`G ≈ blockdiag_j(A_j ⊗ S_j)`, `A_j = E[ā_j ā_jᵀ]`, `S_j = E[δ_j δ_jᵀ]`. With one group (linear,
conv, embedding) A and S are the plain d_a x d_a and d_out x d_out factors; with several, a
layout's `input_chunks` yields rows (N, R, groups, d_in) and A, S are stacked per group,
(groups, d_a, d_a) and (groups, s, s). A diagonal A (`diagonal_A`, token ids as inputs) is stored
as its d_a entries, and such a layout gives the gradient of W, its per-example squares and
per-example gradients from δ and the ids (`gradient`, `per_example_squares`, `per_example_gradient`,
gnfx.layouts.embedding).

**Blocked factors.** A factor over more entries than the block's `max_factor` (set by the plan from
its preconditioner's hyperparameter, gnfx.plan; None: every factor whole) is kept as its diagonal
blocks, `A ≈ blockdiag(A_1, ..., A_m)` over contiguous ranges of its entries (likewise S over the
outputs): `factor_blocks` cuts d entries into m blocks of b, block i holding entries
[i·b, (i+1)·b) and the last one padded with zeros up to b (A's bias entry does not count against
max_factor: a layer of 1024 inputs and a bias keeps its A of 1025 whole at max_factor 1024). The
blocks hold whole `input_unit`s of A's entries (a convolution's unit is one input channel's patch of
prod(kernel) entries; the bias entry is the last entry of a). K-FAC then models
`G ≈ blockdiag(A_i) ⊗ blockdiag(S_j)`, and its update is `U_ji = S_j⁻¹ G_ji A_i⁻¹` on the blocks G_ji
of [∇W ∇b]. A blocked factor is stored as (groups, m, b, b) (groups = 1 for an ungrouped block);
`blockdiag_left` and `blockdiag_right` apply such a stack to stacked matrices.
"""
from __future__ import annotations

import math

import torch

from gnfx.recurrent import is_packed_rows


def factor_blocks(d: int, max_factor: int | None, unit: int = 1, extra: int = 0) -> tuple[int, int]:
    """(m, b): d entries cut into m near-equal blocks of b entries, b a multiple of `unit` (whole
    units; 1 where a unit alone exceeds max_factor) and b <= max_factor + extra, where the last
    `extra` entries (A's bias entry) do not count against max_factor, so that a layer of max_factor
    inputs and a bias keeps its A whole: m = ⌈(d - extra) / b_max⌉ with b_max the largest multiple
    of unit <= max_factor (one more while rounding b = ⌈d / m⌉ up to whole units exceeds the bound),
    and m·b >= d > (m - 1)·b. (1, d) when d - extra <= max_factor or max_factor is None."""
    if max_factor is None or d - extra <= max_factor:
        return 1, d
    unit = unit if unit <= max_factor else 1
    m = -(-(d - extra) // (max_factor // unit * unit))
    while True:
        b = -(-(-(-d // m)) // unit) * unit
        if b <= max_factor + extra:
            return -(-d // b), b
        m += 1


class Layout:
    diagonal_A = False
    groups = 1
    view = ""  # how the weight reads as the matrix W (gnfx.targets.as_matrix)
    input_unit = 1  # entries of a that a blocked A keeps together (module docstring)
    # A tied input/output embedding: one weight read by sites of a `tied_guest` kind (an embedding)
    # and of one `tied_host` kind (a linear unembedding `h Wᵀ`) is one block of the host's kind
    # (passes/analyze.py): the guest's gradient is preconditioned with the host's factors and its
    # own statistics (in the transposed orientation) are not taken
    tied_host = False
    tied_guest = False
    # a diagonal A weighted by each id's output-gradient energy, from `error_ids(g)` (gnfx.layouts.position),
    # instead of the ids' frequencies
    energy_weighted_A = False
    # rows assigned to the groups at run time (stacked experts, gnfx.layouts.experts): the layout gives
    # `routed_rows(rows, routing)`, the (group, rows) pairs of a layer input's or output gradient's rows
    # by the routing the taps recorded with them (Site.routing), instead of (N, R, groups, d) rows
    routed = False

    def __init__(self, block):
        self.block = block

    @staticmethod
    def examples(a: torch.Tensor) -> int:
        """N: the examples in a layer input (its first dimension; 1 for an unbatched input)."""
        return a.shape[0] if a.dim() > 1 else 1

    def tells_examples(self, a) -> bool:
        """Whether the input `a` tells N by `examples` where the model output gives none (gnfx.statistics):
        every input but a column of ids (gnfx.layouts.embedding), a routed layout's sorted tokens and the packed
        rows of a recurrent module called on a PackedSequence (gnfx.recurrent.site_rows)."""
        return not self.routed and not is_packed_rows(a)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient as (N, R, d_out) rows."""
        return position_rows(g)

    def rows(self, a: torch.Tensor) -> int:
        """N·R: the rows (examples x positions) the layer maps for its input `a`, those of `input_chunks`."""
        return sum(chunk.shape[0] * chunk.shape[1] for chunk in self.input_chunks(a))

    def factor_blocking(self) -> dict[str, tuple[int, int] | None]:
        """(m, b) of each factor cut into blocks by the block's `max_factor`, None for a factor kept
        whole (a diagonal A always is)."""
        b = self.block
        d_a, s = b.d_in + (b.bias is not None), b.d_out // self.groups
        out = {}
        for name, d, unit, extra in (("A", d_a, self.input_unit, b.bias is not None), ("S", s, 1, 0)):
            m, size = factor_blocks(d, b.max_factor, unit, int(extra))
            out[name] = (m, size) if m > 1 and not (name == "A" and self.diagonal_A) else None
        return out

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of the averaged factors A (bias folded in) and S (module docstring)."""
        b = self.block
        d_a = b.d_in + (b.bias is not None)
        s = b.d_out // self.groups
        whole = {"A": (d_a,) if self.diagonal_A else (d_a, d_a), "S": (s, s)}
        if self.groups > 1:
            whole = {k: (self.groups,) + v for k, v in whole.items()}
        blocks = self.factor_blocking()
        return {k: v if blocks[k] is None else (self.groups, blocks[k][0], blocks[k][1], blocks[k][1])
                for k, v in whole.items()}


def position_rows(x: torch.Tensor) -> torch.Tensor:
    """x (N, ..., d) as (N, R, d), R the product of the dimensions between (an unbatched (d,): (1, 1, d)). R is
    given, not inferred: a -1 is ambiguous for N = 0, the input of a routed expert that no example reached."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)


def in_window(rows: torch.Tensor, window, full: tuple[int, ...]) -> torch.Tensor:
    """The rows (..., prod(active)) of a layer that reads a window of its parameter (passes/weight_slices.py),
    placed into rows (..., prod(full)) of the full parameter: the entries, read as an array `full`, at
    `window` ((start, stop) per dimension of `full`; a stop of None, for at most one dimension: as many entries
    as the rows have there) are the rows' own, the others 0. `window` None: the rows as they are."""
    if window is None or all((lo, hi) == (0, n) for (lo, hi), n in zip(window, full)):
        return rows
    active = rows.unflatten(-1, [-1 if hi is None else hi - lo for lo, hi in window])
    if active.shape[-len(full):] == tuple(full):
        return rows
    out = rows.new_zeros(rows.shape[:-1] + tuple(full))
    out[(...,) + tuple(slice(lo, lo + n) for (lo, _), n in zip(window, active.shape[-len(full):]))] = active
    return out.flatten(-len(full))


def split_groups(X: torch.Tensor, groups: int) -> torch.Tensor:
    """A stack (k, groups·s, d) of [W b] matrices as the stack (k·groups, s, d) of its groups."""
    return X.reshape(X.shape[0] * groups, X.shape[1] // groups, X.shape[2])


def merge_groups(X: torch.Tensor, pieces: int) -> torch.Tensor:
    """The inverse of `split_groups`: (k·groups, s, d) -> (k, groups·s, d)."""
    return X.reshape(pieces, -1, X.shape[2])


def padded_blocks(X: torch.Tensor, m: int, b: int, dim: int = -1) -> torch.Tensor:
    """X with its dimension `dim` of d entries zero-padded up to m·b and cut into the m blocks
    (that dimension becomes (m, b))."""
    dim = dim % X.dim()
    pad = m * b - X.shape[dim]
    if pad:
        X = torch.nn.functional.pad(X, (0, 0) * (X.dim() - 1 - dim) + (0, pad))
    return X.unflatten(dim, (m, b))


def blockdiag_left(F: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """F X for each matrix of the stack X (k, d, c): F (k, d, d) whole, or (k, m, b, b) the diagonal
    blocks of a blocked factor (module docstring), each applied to its rows of X (the last block's
    top-left r x r to the last r < b rows, `_block_split`)."""
    if F.dim() == 3:
        return torch.bmm(F, X)  # bmm: matmul's reshapes cost dispatches
    whole, rest = _block_split(X.shape[1], F)
    b = F.shape[-1]
    Y = torch.matmul(F[:, :whole], X[:, :whole * b].unflatten(1, (whole, b))).flatten(1, 2)
    if not rest:
        return Y
    return torch.cat([Y, torch.matmul(F[:, whole, :rest, :rest], X[:, whole * b:])], dim=1)


def blockdiag_right(X: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """X F for each matrix of the stack X (k, c, d): F (k, d) a diagonal, (k, d, d) whole, or
    (k, m, b, b) the diagonal blocks of a blocked factor, each applied to its columns of X (the last
    block's top-left r x r to the last r < b columns), written into one contiguous result."""
    if F.dim() == 2:
        return X * F.unsqueeze(1)
    if F.dim() == 3:
        return torch.bmm(X, F)
    whole, rest = _block_split(X.shape[2], F)
    b = F.shape[-1]
    Y = torch.empty_like(X, memory_format=torch.contiguous_format)
    columns = lambda T: T[:, :whole * b].unflatten(1, (whole, b)).transpose(0, 1)  # noqa: E731 - (whole, c, b)
    for X_p, Y_p, F_p in zip(X, Y, F):  # per piece, into Y's columns: no temporary as large as X
        torch.bmm(columns(X_p), F_p[:whole], out=columns(Y_p))
    if rest:
        Y[..., whole * b:] = torch.matmul(X[..., whole * b:], F[:, whole, :rest, :rest])
    return Y


def _block_split(d: int, F: torch.Tensor) -> tuple[int, int]:
    """(whole, r): the blocks of the blocked factor F (k, m, b, b) that lie whole within d entries, and
    the r = d - whole·b entries of the last block (m = whole + 1 if r > 0). On the matrix zero-padded to
    m·b, the last block gives its r entries F_rr X_r + F_rp·0: only its top-left r x r is needed, and no
    padded copy of X."""
    b = F.shape[-1]
    whole = d // b
    return whole, d - whole * b
