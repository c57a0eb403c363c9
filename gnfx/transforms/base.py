"""The interface of one stage of the update chain of a curvature preconditioner.

A curvature preconditioner (gnfx.preconditioners.curvature) turns the stacked gradients G of
each of its groups of equal-shaped pieces into directions U (its `direction`); its chain then
maps the directions of ALL its groups at once, stage by stage, and the last stage writes the
parameters (docs/design.md, "The update chain"), as optax's `chain` composes gradient
transformations:

    U ← T_1(U) ← ... ← T_k(U),   then   θ ← write(θ, U).

A stage is a small frozen dataclass (its fields are its hyperparameters, its repr is how the
generated update `model.update_code` names it) called once per step with lists that follow the
preconditioner's groups: it works on them with foreach kernels, a fixed number of operations
per preconditioner (or per group), never per piece. A stage that keeps state declares it with
`state_shapes`: stacked tensors over each group's pieces, created as zeros in the group's state
(optimizer.state, so that checkpoints carry them) under these keys.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch


@dataclasses.dataclass(frozen=True)
class Transform:
    # the name of the stage in the generated update (`<preconditioner>_<label>`)
    label: ClassVar[str] = "transform"
    # whether it is the chain's parameter write (exactly one, the last stage)
    writes_parameters: ClassVar[bool] = False
    # whether it sums over all blocks of its preconditioner (under FSDP2 one scalar all-reduce,
    # which a rank holding none of the blocks joins with empty lists: gnfx.fsdp)
    sums_over_blocks: ClassVar[bool] = False
    # its math in DESIGN's symbols, for the comment of its line in `model.update_code`
    formula: ClassVar[str] = ""

    def state_shapes(self, shape: tuple) -> dict[str, tuple]:
        """{state key: per-piece shape} of the state it keeps for a group of pieces of `shape`."""
        return {}

    def flops_per_entry(self) -> int:
        """Its FLOPs per step per entry of the directions it maps (leading order, gnfx.cost: the
        update of model.cost(), the report and "auto"); none by default."""
        return 0

    def __call__(self, pre, Us: list[torch.Tensor], Gs: list[torch.Tensor], states: list[dict],
                 lr: torch.Tensor, wd: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The new directions of preconditioner `pre`'s groups: Us, Gs (stacked gradients) and
        states follow `pre.groups`; lr and wd are the (pieces,) learning rates and weight decays
        in group order (wd None: no param group decays this step). The parameter write returns None."""
        raise NotImplementedError
