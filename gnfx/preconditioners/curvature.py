"""The shared machinery of the batched curvature preconditioners (kfac, shampoo, rank1).

Each owns targets (gradient matrices `[∇W ∇b]` of blocks, or loose tensors), cut into pieces and
grouped by shape (gnfx.targets). A subclass supplies the batched math on a stacked gradient
`G` of shape (k, *shape):

    init_group(group)            -> dict of state tensors, each stacked over the k pieces
    direction(G, state, collect) -> U, the preconditioned gradient (and updates the curvature
                                    estimate in `state` when `collect` is True)
    refresh()                    -> the amortized decompositions, run when `refresh_due(step)`

This base applies the common tail to every piece: heavy-ball momentum and decoupled weight decay,

    m ← μ m + U,    θ ← θ (1 - η λ) - η m.
"""
from __future__ import annotations

import torch

from gnfx.hparams import choice, unit_interval
from gnfx.preconditioners.base import Preconditioner
from gnfx.layouts import LAYOUTS
from gnfx.targets import as_matrix, block_target, make_groups, param_regions, param_target

FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def common_hparams() -> dict:
    return {
        "momentum": unit_interval("heavy-ball momentum μ on the preconditioned step", 0.9),
        "decomposition_dtype": choice("dtype of eigendecompositions in the refresh", "float64",
                                      tuple(FACTOR_DTYPES)),
    }


class CurvaturePreconditioner(Preconditioner):
    max_block_hparam: str | None = None  # name of the blocking hyperparameter, if any

    def __init__(self, hp, blocks, params, optimizer):
        super().__init__(hp, blocks, params, optimizer)
        targets = [block_target(b, LAYOUTS[b.kind](b).view) for b in blocks]
        targets += [param_target(n, optimizer.param(n).shape) for n in params]
        max_block = hp[self.max_block_hparam] if self.max_block_hparam else None
        self.groups = make_groups(self.name, targets, max_block)
        # the parameter that holds each group's state in optimizer.state
        self.state_holder = {g.key: g.pieces[0].target.params[0] for g in self.groups}

    # --- state -----------------------------------------------------------------------------
    def factor_dtype(self, piece) -> torch.dtype:
        p = self.opt.param(piece.target.params[0])
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def stacked_zeros(self, group, *shape, dtype=None):
        p = self.opt.param(group.pieces[0].target.params[0])
        return torch.zeros((len(group.pieces),) + shape, dtype=dtype or self.factor_dtype(group.pieces[0]),
                           device=p.device)

    def stacked_eye(self, group, n):
        return self.stacked_zeros(group, n, n) + torch.eye(n, dtype=self.factor_dtype(group.pieces[0]),
                                                           device=self.opt.param(group.pieces[0].target.params[0]).device)

    def group_state(self, group) -> dict:
        """The group's state tensors, created on first use (keys without the group prefix)."""
        holder = self.opt.state_of(self.state_holder[group.key])
        prefix = group.key + "."
        state = {k[len(prefix):]: v for k, v in holder.items() if k.startswith(prefix)}
        if not state:
            state = self.init_group(group)
            state["momentum"] = self.stacked_zeros(group, *group.shape)
            for k, v in state.items():
                holder[prefix + k] = v
        return state

    def states(self) -> dict:
        return {g.key: self.group_state(g) for g in self.groups}

    # --- the batched math, supplied by subclasses ------------------------------------------
    def init_group(self, group) -> dict:
        raise NotImplementedError

    def direction(self, G, state, collect: bool):
        raise NotImplementedError

    def refresh_due(self, step: int) -> bool:
        return False

    def refresh(self) -> None:
        """The amortized decompositions; none by default."""

    def safeguard(self, Us, Gs, lrs):
        """A global scale ν for all of this preconditioner's steps (default 1: none)."""
        return None

    # --- the common tail ---------------------------------------------------------------------
    def apply(self, group, state, U, lr, wd) -> None:
        """m ← μ m + U; θ ← θ(1 - ηλ) - η m, piece by piece; lr and wd are (k,) tensors."""
        m = state["momentum"]
        m.mul_(self.hp["momentum"]).add_(U)
        for i, piece in enumerate(group.pieces):
            decay = 1 - lr[i] * wd[i]
            for pos, region, src in param_regions(piece):
                p = self.opt.param(piece.target.params[pos])
                view = (as_matrix(p, piece.target.view) if pos == 0 else p)[region]
                view.mul_(decay)
                view.sub_((lr[i] * m[i][src]).to(p.dtype))
