"""Targets, pieces and groups: how a curvature preconditioner sees the parameters it owns.

A *target* is the matrix (or tensor) one preconditioner treats as a unit: for a linear block the
gradient matrix `[∇W ∇b]` (d_out x (d_in + 1), the bias folded in as in DESIGN §1); for a loose
parameter its own gradient tensor. A target may be cut into *pieces* along dimensions larger than
`max_block` (Shampoo's blocking). Pieces of equal shape form a *group*, served by one batched
operation on a stacked (k, ...) tensor.
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

    @property
    def folded_bias(self) -> bool:
        return self.block is not None and self.block.bias is not None


@dataclasses.dataclass
class Piece:
    target: Target
    index: tuple[slice, ...]  # the region of the target's gradient

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)


@dataclasses.dataclass
class Group:
    """Pieces of one shape, stacked along a leading dimension k."""

    key: str
    shape: tuple[int, ...]
    pieces: list[Piece]


def block_target(block) -> Target:
    return Target(block.name, block.params, (block.d_out, block.d_in + (block.bias is not None)), block)


def param_target(name: str, shape) -> Target:
    return Target(name, (name,), tuple(shape))


def cut(target: Target, max_block: int | None) -> list[Piece]:
    """Split every dimension of the target longer than `max_block` into near-equal chunks."""
    ranges = []
    for d in target.shape:
        if max_block is None or d <= max_block:
            ranges.append([slice(0, d)])
        else:
            n = -(-d // max_block)
            bounds = [round(i * d / n) for i in range(n + 1)]
            ranges.append([slice(a, b) for a, b in zip(bounds, bounds[1:])])
    return [Piece(target, idx) for idx in itertools.product(*ranges)]


def make_groups(prefix: str, targets: list[Target], max_block: int | None = None) -> list[Group]:
    """Group the pieces of all targets by shape, in a deterministic order."""
    by_shape: dict[tuple, list[Piece]] = {}
    for t in targets:
        for p in cut(t, max_block):
            by_shape.setdefault(p.shape, []).append(p)
    return [Group(f"{prefix}_{i}", shape, pieces) for i, (shape, pieces) in enumerate(by_shape.items())]


def fold(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`[w b]`: the bias as a trailing column of the weight matrix."""
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
