"""Heavy-ball momentum on the directions: m ← μ m + U, the new direction m."""
from __future__ import annotations

import dataclasses

import torch

from gnfx.errors import ConfigError
from gnfx.transforms.base import Transform


@dataclasses.dataclass(frozen=True)
class HeavyBall(Transform):
    """m ← μ m + U for every piece, the buffer m (zero at first) kept per group as "momentum";
    the direction that follows is m. μ = 0 keeps the buffer (m = U)."""

    momentum: float = 0.9
    label = "momentum"
    formula = "m ← μ m + U, U ← m"

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{self!r}: the momentum μ must be in [0, 1)")

    def state_shapes(self, shape):
        return {"momentum": tuple(shape)}

    def flops_per_entry(self):
        return 2  # μ m, + U

    def __call__(self, pre, Us, Gs, states, lr, wd):
        ms = [s["momentum"] for s in states]
        torch._foreach_mul_(ms, self.momentum)
        torch._foreach_add_(ms, Us)
        return ms
