"""The chain's parameter write: decoupled weight decay and the learning rate."""
from __future__ import annotations

import dataclasses

from gnfx.transforms.base import Transform


@dataclasses.dataclass(frozen=True)
class Step(Transform):
    """θ ← θ (1 - η λ) - η U for every piece, η and λ the learning rate and weight decay of the
    param group of each parameter it writes (read at every step, so LR schedulers apply; a block's
    bias in a group of its own keeps that group's: gnfx.codegen). Writes each piece's rows into its
    parameters through the preconditioner's `step_parameters` (which knows where the pieces of
    blocks and loose parameters lie). The last stage of every chain."""

    label = "step"
    writes_parameters = True
    formula = "θ ← θ (1 - η λ) - η U"

    def flops_per_entry(self):
        return 3  # θ(1 - ηλ), - ηU

    def __call__(self, pre, Us, Gs, states, lr, wd):
        pre.step_parameters(Us, lr, wd)
