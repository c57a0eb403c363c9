"""The interface every preconditioner implements.

A preconditioner owns a set of curvature blocks and of loose parameters (those no block claims,
or all parameters for the diagonal preconditioner). It declares its hyperparameters (`HPARAMS`)
and the statistics it needs from the taps of each block (`needs`), and keeps its state in the
optimizer's per-parameter state, so that `state_dict`/`load_state_dict` carry it. The diagonal
preconditioner updates its parameters itself (`update`, foreach kernels); the curvature
preconditioners supply batched math to the generated update function (see curvature.py).
"""
from __future__ import annotations

from gnfx.hparams import HParam


class Preconditioner:
    name: str = ""
    HPARAMS: dict[str, HParam] = {}
    # the hyperparameter that is a Tikhonov damping λ on the scale of the GGN, which the
    # quadratic-model step (gnfx.quadratic_step) moves with its Levenberg–Marquardt λ; None: none
    tikhonov_damping: str | None = None

    def __init__(self, hp: dict, blocks: list, params: list[str], optimizer):
        self.hp = hp
        self.blocks = blocks
        self.param_names = params
        self.opt = optimizer

    @classmethod
    def needs(cls, hp: dict) -> frozenset[str]:
        """The statistics (names in gnfx.statistics.STATISTICS) this preconditioner needs per block."""
        return frozenset()

    @classmethod
    def claims_fallback(cls, shape) -> bool:
        """Whether this preconditioner also serves a parameter no block claims (default: no,
        such parameters get the diagonal preconditioner)."""
        return False
