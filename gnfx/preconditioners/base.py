"""The interface every preconditioner implements.

A preconditioner owns a set of curvature blocks and of loose parameters (those no block claims,
or all parameters for the diagonal preconditioner). It declares the statistics it needs from the
taps of each block, keeps its state in the optimizer's per-parameter state (so that
`state_dict`/`load_state_dict` carry it), turns gradients into an update every step (`update`),
and may have an expensive, amortized part (`refresh`), run every `inv_every` steps.
"""
from __future__ import annotations

from gnfx.hparams import HParam


class Preconditioner:
    name: str = ""
    HPARAMS: dict[str, HParam] = {}

    def __init__(self, hp: dict, blocks: list, params: list[str], optimizer):
        self.hp = hp
        self.blocks = blocks
        self.param_names = params
        self.opt = optimizer

    @classmethod
    def needs(cls, hp: dict) -> frozenset[str]:
        """The statistics (names in gnfx.statistics.STATISTICS) this preconditioner needs per block."""
        return frozenset()

    def update(self) -> None:
        """Apply one step to every parameter this preconditioner owns (with `torch.no_grad`)."""
        raise NotImplementedError

    def refresh(self) -> None:
        """The amortized work (decompositions, roots); the default has none."""

    def state_bytes(self) -> int:
        """Bytes of optimizer state this preconditioner holds."""
        total = 0
        for name in self.all_params():
            for v in self.opt.state_of(name).values():
                if hasattr(v, "numel"):
                    total += v.numel() * v.element_size()
        return total

    def all_params(self) -> list[str]:
        return [n for b in self.blocks for n in b.params] + list(self.param_names)
