"""Grafting: the direction from the preconditioner, the step size (per piece) from another method.

For the gradient G of each piece the grafted method's direction D is
  "adam":    v ← β₂ v + (1-β₂) G²,  t ← t + 1,  D = G / (sqrt(v / (1-β₂ᵗ)) + ε)
  "adagrad": v ← v + G²,                        D = G / (sqrt(v) + ε)
  "none":    no grafting, U unchanged
and each piece's direction U takes D's norm: U ← U ‖D‖ / ‖U‖ (Frobenius norms per piece, a zero U
stays zero). A preconditioner whose direction is not preconditioned yet (`pre.active`, a 0-d bool
tensor, False: Shampoo before start_preconditioning_step; `pre.started` the same as a Python bool, which
the eager update reads) takes D alone: U ← D.
"""
from __future__ import annotations

import dataclasses

import torch

from gnfx.errors import ConfigError
from gnfx.transforms.base import Transform

GRAFTS = ("adam", "adagrad", "none")
# FLOPs per entry: the grafted direction D (Adam: v's update 3, its bias correction, root, ε and
# the division 4; AdaGrad: 2 + 3), then the two norms and the rescaling (RESCALE)
DIRECTION_FLOPS = {"adam": 7, "adagrad": 5, "none": 0}
RESCALE = 5


@dataclasses.dataclass(frozen=True)
class Graft(Transform):
    """U ← U ‖D‖ / ‖U‖ per piece, D the direction of the grafted method `kind` (module doc), its
    second moment v and step count t kept per group as "graft_v" and "graft_t" (by every kind,
    "none" included: the state gnfx kept before the chain, so that its checkpoints load). All
    groups at once: foreach kernels, and one norm reduction per group over its stacked pieces."""

    kind: str = "adam"
    beta2: float = 0.999
    eps: float = 1e-8
    label = "graft"
    formula = "U ← U ‖D‖ / ‖U‖ per piece, D the grafted method's direction"

    def __post_init__(self):
        if self.kind not in GRAFTS or not 0 <= self.beta2 < 1 or not self.eps > 0:
            raise ConfigError(f"{self!r}: kind must be one of {GRAFTS}, beta2 in [0, 1) and eps > 0")

    def state_shapes(self, shape):
        return {"graft_v": tuple(shape), "graft_t": ()}

    def flops_per_entry(self):
        return DIRECTION_FLOPS[self.kind] + (RESCALE if self.kind != "none" else 0)

    def __call__(self, pre, Us, Gs, states, lr, wd):
        if self.kind == "none":
            return Us
        Gs = [G.to(U.dtype) for U, G in zip(Us, Gs)]
        Ds = self.grafted(Gs, states)
        # each piece's norm by one reduction over its group's stack: per group, not per piece (a group of
        # thousands of blocks would otherwise make as many tensors on the host)
        pieces = [tuple(range(1, U.dim())) for U in Us]
        norms_U = [torch.linalg.vector_norm(U, dim=dims) for U, dims in zip(Us, pieces)]
        norms_D = [torch.linalg.vector_norm(D, dim=dims) for D, dims in zip(Ds, pieces)]
        tiny, biggest = min(torch.finfo(U.dtype).tiny for U in Us), min(torch.finfo(U.dtype).max for U in Us)
        scales = torch._foreach_div(norms_D, torch._foreach_clamp_min(norms_U, tiny))
        torch._foreach_clamp_max_(scales, biggest)  # finite, so that a zero U stays zero (0 · ∞ is NaN)
        grafted = [U * scale.view((-1,) + (1,) * (U.dim() - 1)) for U, scale in zip(Us, scales)]
        # eagerly, once started, no pass selecting U everywhere; a compiled graph selects by the tensor
        # (it reads no Python flag, which would recompile it at the start)
        if pre.active is None or (not torch.compiler.is_compiling() and pre.started):
            return grafted
        return [torch.where(pre.active, U, D) for U, D in zip(grafted, Ds)]

    def grafted(self, Gs, states) -> list[torch.Tensor]:
        """D of every group (module doc), updating its state."""
        vs = [s["graft_v"] for s in states]
        if self.kind == "adagrad":
            torch._foreach_addcmul_(vs, Gs, Gs)
            root = torch._foreach_sqrt(vs)
        else:
            ts = [s["graft_t"] for s in states]
            torch._foreach_add_(ts, 1)
            torch._foreach_mul_(vs, self.beta2)
            torch._foreach_addcmul_(vs, Gs, Gs, value=1 - self.beta2)
            corrections = torch._foreach_pow(self.beta2, ts)  # 1 - β₂ᵗ, per piece
            torch._foreach_neg_(corrections)
            torch._foreach_add_(corrections, 1)
            root = torch._foreach_div(vs, [c.view((-1,) + (1,) * (v.dim() - 1)) for c, v in zip(corrections, vs)])
            torch._foreach_sqrt_(root)
        torch._foreach_add_(root, self.eps)
        return torch._foreach_div(Gs, root)
