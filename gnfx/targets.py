"""Targets, pieces and groups: how a curvature preconditioner sees the parameters it owns.

A *target* is the matrix (or tensor) one preconditioner treats as a unit: for a linear block the
gradient matrix `[∇W ∇b]` (d_out x (d_in + 1), the bias folded in as in docs/design.md §1); for a loose
parameter its own gradient tensor. A target may be cut into *pieces* along dimensions larger than
`max_block` (Shampoo's blocking), except dimensions larger than `whole_above`, kept whole (those along
which Shampoo and SOAP are diagonal, `diagonal_modes`). Pieces of equal shape form a *group*, served by
one batched operation on a stacked (k, ...) tensor.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch


@dataclasses.dataclass
class Target:
    """`params` are parameter names: (weight, bias) of a block with bias, else one name."""

    name: str
    params: tuple[str, ...]
    shape: tuple[int, ...]
    block: object = None  # the LayerTable Block, or None for a loose parameter
    view: str = ""  # how the weight reads as the matrix W (as_matrix)
    groups: int = 1  # independent row groups of the block (gnfx.layouts.base)
    factors: tuple = ()  # the shapes of the block's factors, (name, shape) pairs (gnfx.layouts.base)

    @property
    def folded_bias(self) -> bool:
        return self.block is not None and self.block.bias is not None

    @property
    def kind(self) -> str:
        return self.block.kind if self.block is not None else "tensor"


@dataclasses.dataclass
class Piece:
    target: Target
    index: tuple[slice, ...]  # the region of the target's gradient

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)


@dataclasses.dataclass
class Group:
    """Pieces of one shape, layer kind, row grouping and factor shapes, stacked along a leading
    dimension k."""

    key: str
    shape: tuple[int, ...]
    kind: str
    pieces: list[Piece]
    groups: int = 1


def block_target(block, layout) -> Target:
    """The [W b] target of a block, W read as its layout says (gnfx.layouts)."""
    return Target(block.name, block.params, (block.d_out, block.d_in + (block.bias is not None)), block,
                  layout.view, layout.groups, tuple(layout.factor_shapes().items()))


def param_target(name: str, shape) -> Target:
    return Target(name, (name,), tuple(shape))


def diagonal_modes(shape, whole_above: int | None) -> list[bool]:
    """Which dimensions of a piece are above `whole_above` (None or 0: none): kept whole by `cut`, so a
    piece's dimension is above it exactly where its target's is."""
    return [bool(whole_above) and d > whole_above for d in shape]


def cut(target: Target, max_block: int | None, whole_above: int | None = None) -> list[Piece]:
    """Split every dimension of the target longer than `max_block` into near-equal chunks, but those
    above `whole_above` (`diagonal_modes`)."""
    ranges = []
    for d, whole in zip(target.shape, diagonal_modes(target.shape, whole_above)):
        if max_block is None or d <= max_block or whole:
            ranges.append([slice(0, d)])
        else:
            n = -(-d // max_block)
            bounds = [round(i * d / n) for i in range(n + 1)]
            ranges.append([slice(a, b) for a, b in zip(bounds, bounds[1:])])
    return [Piece(target, idx) for idx in itertools.product(*ranges)]


def make_groups(prefix: str, targets: list[Target], max_block: int | None = None,
                whole_above: int | None = None) -> list[Group]:
    """Group the pieces of all targets (`cut`) by shape, kind, row grouping and factor shapes, in a
    deterministic order."""
    return group_pieces(prefix, [p for t in targets for p in cut(t, max_block, whole_above)])


def group_pieces(prefix: str, pieces: list[Piece]) -> list[Group]:
    """Group pieces by shape, and their targets' kind, row grouping and factor shapes, in the
    order they come."""
    by_shape: dict[tuple, list[Piece]] = {}
    for p in pieces:
        t = p.target
        by_shape.setdefault((p.shape, t.kind, t.groups, t.factors), []).append(p)
    return [Group(f"{prefix}_{i}", shape, kind, pieces, groups)
            for i, ((shape, kind, groups, _), pieces) in enumerate(by_shape.items())]


# how a weight reads as the matrix W of `z = W a`, as code (gnfx.codegen writes it out): as is,
# "flatten" (conv kernels), "t" (transposed), "column" (a vector, or a tensor whose
# dimensions but one have one entry, (1, 1, 1, d) say, as d x 1: a view either way), "flat_t" (leading
# dimensions flattened, then transposed: a (1, T, d) position table as d x T), "features_first" (a
# channels-first position table (1, C, *S) as C x prod(S)), "rows" (a weight (1, ..., 1, *G, C), or (C,), as the
# G x C matrix of its rows along the last dimension, gnfx.layouts.weighted_sum), "in_out_flatten" (a
# transposed convolution's kernel (C_in, C_out/g, *k) of g groups as C_out x C_in/g·prod(k), group j's
# rows reading its own input channels, gnfx.layouts.conv_transpose), "in_out_stacked" (stacked experts
# stored (E, d_in, d_out) as E·d_out x d_in, expert e's W_eᵀ stored, gnfx.layouts.experts); {groups} is the
# block's groups
VIEWS = {"": "", "flatten": ".flatten(1)", "t": ".t()", "column": ".reshape(-1, 1)", "flat_t": ".flatten(0, -2).t()",
         "features_first": ".flatten(0, 1).flatten(1)", "rows": ".unsqueeze(0).flatten(0, -2)",
         "in_out_flatten": ".unflatten(0, ({groups}, -1)).transpose(1, 2).flatten(0, 1).flatten(1)",
         "in_out_stacked": ".transpose(1, 2).flatten(0, 1)"}
# the views as_matrix can only give as a copy (no strides read C_in and prod(k) as one dimension past
# C_out): a write goes back through from_matrix (gnfx.preconditioners.curvature.step_parameters)
COPYING_VIEWS = frozenset({"in_out_flatten", "in_out_stacked"})


def as_matrix(w: torch.Tensor, view: str, groups: int = 1) -> torch.Tensor:
    """The weight (or its gradient) as the matrix W of `z = W a`: a view, so updates write through,
    except for the COPYING_VIEWS (a copy: write it back with from_matrix). `groups`: the block's
    row groups (gnfx.layouts.base), which only "in_out_flatten" reads."""
    if view == "flatten":
        return w.flatten(1)
    if view == "t":
        return w.t()
    if view == "column":
        return w.reshape(-1, 1)
    if view == "flat_t":
        return w.flatten(0, -2).t()
    if view == "features_first":
        return w.flatten(0, 1).flatten(1)
    if view == "rows":
        return w.unsqueeze(0).flatten(0, -2)
    if view == "in_out_flatten":
        return w.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1).flatten(1)
    if view == "in_out_stacked":
        return w.transpose(1, 2).flatten(0, 1)
    return w


def from_matrix(M: torch.Tensor, view: str, shape, groups: int = 1) -> torch.Tensor:
    """The inverse of `as_matrix`: a matrix laid out like W back in the weight's shape."""
    if view == "in_out_flatten":
        return M.reshape((groups, shape[1], shape[0] // groups) + tuple(shape[2:])).transpose(1, 2).reshape(shape)
    if view == "in_out_stacked":
        return M.reshape(shape[0], shape[2], shape[1]).transpose(1, 2).reshape(shape)
    return (M.t() if view in ("t", "flat_t") else M).reshape(shape)


def fold(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`[W b]`: the bias as a trailing column of the weight matrix."""
    return w if b is None else torch.cat([w, b.unsqueeze(1)], dim=1)


def param_regions(piece: Piece) -> list[tuple[int, tuple[slice, ...], tuple[slice, ...]]]:
    """Where a piece's entries live: (param position in target.params, region of the param,
    region of the piece). For a folded [W b] target, the last column belongs to the bias."""
    t = piece.target
    if not t.folded_bias:
        return [(0, piece.index, tuple(slice(0, s.stop - s.start) for s in piece.index))]
    rows, cols = piece.index
    d_in = t.shape[1] - 1
    out = []
    if cols.start < d_in:
        stop = min(cols.stop, d_in)
        out.append((0, (rows, slice(cols.start, stop)), (slice(None), slice(0, stop - cols.start))))
    if cols.stop > d_in:
        out.append((1, (rows,), (slice(None), d_in - cols.start)))
    return out


def target_gradient(target: Target, grad_of) -> torch.Tensor:
    """The target's gradient as its matrix, `[∇W ∇b]` where it folds a bias; `grad_of(name)` gives a
    parameter's gradient. (The generated update function writes the same expression out, see gnfx.codegen.)"""
    g = as_matrix(grad_of(target.params[0]), target.view, target.groups)
    return fold(g, grad_of(target.params[1])) if target.folded_bias else g


def stacked_piece_gradients(pieces: list[Piece], grad_of, matrices: dict) -> torch.Tensor:
    """The pieces' regions of their targets' gradients, stacked (k, *shape), each target's matrix formed
    once (`target_gradient`, kept in `matrices` by target name for the pieces of other groups: the fold is a
    copy of the whole [∇W ∇b], which a region of it keeps alive; once per piece, a 2048 x 2049 target cut
    into blocks of 32 held 4,160 copies, 70 GB)."""
    for piece in pieces:
        if piece.target.name not in matrices:
            matrices[piece.target.name] = target_gradient(piece.target, grad_of)
    return torch.stack([matrices[piece.target.name][piece.index] for piece in pieces])
