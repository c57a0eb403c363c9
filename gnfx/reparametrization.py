"""Weight normalization: a block whose weight W is computed from the parameters (g, v).

`nn.utils.parametrizations.weight_norm` and the older `nn.utils.weight_norm` make a layer's weight

    W = g · v / ‖v‖,

the norm over every dimension of v but `dim` (dim=0, the default: one norm per output row r of a
Linear or output channel of a Conv, W_r = g_r v̂_r, v̂_r = v_r / ‖v_r‖; dim=-1 or None: one norm over
the whole tensor). The layer's statistics are those of W (the taps' a and δ at the linear or conv
node do not depend on how W is made), so its block is the block of a plain layer holding W: its
gradient matrix is [∇W ∇b] and its preconditioner returns a direction D in W's space. Between that
space and the parameters' (one row r; at dim=-1 the whole tensor is one row):

- Gather. ∇g_r = v̂_rᵀ ∇W_r and ∇v_r = (g_r / ‖v_r‖)(I − v̂_r v̂_rᵀ) ∇W_r, so ∇W is recovered exactly:
  ∇W_r = v̂_r ∇g_r + (‖v_r‖ / g_r) ∇v_r.
- Scatter. A change ΔW of W pulls back to the parameters' change (first order exact, J_f the
  Jacobian of f(g, v) = W):  Δg_r = v̂_rᵀ ΔW_r,  Δv_r = (‖v_r‖ / g_r)(I − v̂_r v̂_rᵀ) ΔW_r, so that
  J_f(Δg, Δv) = v̂_r Δg_r + (g_r / ‖v_r‖)(I − v̂_r v̂_rᵀ) Δv_r = ΔW_r. The Δv it gives is orthogonal
  to v_r (the scale of v does not change W), the least-norm (Δg, Δv) with that image.
- A row with g_r = 0 has W_r = 0 and ∇v_r = 0: J_f reaches only the direction v̂_r there, so ∇W_r's
  component orthogonal to v̂_r is lost in ∇v_r and cannot be recovered, and ΔW_r's cannot be made.
  Both use the pseudo-inverse there: the gathered ∇W_r is v̂_r ∇g_r and the scattered Δv_r is 0
  (the factor ‖v_r‖ / g_r is taken as 0), Δg_r = v̂_rᵀ ΔW_r as everywhere.

At run time (`Reparametrizations`, used by gnfx.parameter_store.ParameterStore) each block's weight
is a stand-in for the step: a tensor holding W with ∇W as its `.grad`, made before the step
(`gather`) under the name of v, so that every preconditioner, the update chain (momentum, grafting,
the parameter write with weight decay) and its state work on W as on a plain layer's weight; after
the chain the change the chain made to the stand-in is pulled back to (g, v) (`scatter`). Decoupled
weight decay W ← W(1 − ηλ) so acts on W, as on a plain layer: its pull-back is g ← g(1 − ηλ), v
unchanged (torch.optim would also shrink v, which changes no W, only the next steps' size). The
quadratic-model step (gnfx.quadratic_step) measures the chain's proposal on the parameters, after
the scatter, and its forward-mode products run in (g, v): it needs nothing of this.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class WeightNorm:
    """W = g · v / ‖v‖ (module docstring). `weight`: the name W has in the model (`fc.weight`, for a
    layer's block name); `magnitude`, `direction`: the parameter names of g and v; `dim`: the
    dimension of v the norm is not taken over (-1: the norm over the whole tensor)."""

    weight: str
    magnitude: str
    direction: str
    dim: int

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        """‖v_r‖, broadcastable against v (torch.norm_except_dim, as torch._weight_norm computes it)."""
        return torch.norm_except_dim(v, 2, self.dim)

    def _unit_and_scale(self, g: torch.Tensor, v: torch.Tensor):
        """(v̂, ‖v_r‖ / g_r with 0 where g_r = 0) (module docstring, the pseudo-inverse at g_r = 0)."""
        norm = self._norm(v)
        g = g.reshape(norm.shape)
        return v / norm, torch.where(g == 0, torch.zeros_like(norm), norm / torch.where(g == 0, 1, g))

    def _row_sum(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Σ over every dimension but `dim` (all at dim=-1), in the shape of the magnitude `like`."""
        dims = [d for d in range(x.dim()) if self.dim == -1 or d != self.dim % x.dim()]
        return x.sum(dim=dims, keepdim=True).reshape(like.shape)

    def value(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """W, as the model's forward computes it."""
        return torch._weight_norm(v, g, self.dim)

    def weight_gradient(self, g, v, grad_g, grad_v) -> torch.Tensor:
        """∇W from ∇g and ∇v: ∇W_r = v̂_r ∇g_r + (‖v_r‖ / g_r) ∇v_r (module docstring), computed as
        Pᵀ(∇g, ∇v) with P = `pull_back`: (a, B) ↦ v̂_r a_r + (‖v_r‖ / g_r)(I − v̂_r v̂_rᵀ) B_r, the same
        for a gradient (∇v_r ⟂ v_r) and the exact transpose of P for any (a, B), so that the GGN in W's
        space is G_W = Pᵀ G_θ P (gnfx.diagnose)."""
        unit, scale = self._unit_and_scale(g, v)
        return unit * grad_g.reshape(scale.shape) + scale * (grad_v - unit * self._row_sum(unit * grad_v, scale))

    def pull_back(self, g, v, delta_w) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δg, Δv) with J_f(Δg, Δv) = ΔW: Δg_r = v̂_rᵀ ΔW_r, Δv_r = (‖v_r‖ / g_r)(ΔW_r − v̂_r Δg_r)."""
        unit, scale = self._unit_and_scale(g, v)
        delta_g = self._row_sum(unit * delta_w, g)
        return delta_g, scale * (delta_w - unit * delta_g.reshape(scale.shape))


class Reparametrizations:
    """The weight-normed blocks' stand-ins for one step (module docstring): `gather` makes them from
    the parameters (g, v) in `named`, `scatter` pulls the change the step made to them back to (g, v).
    `standins` (name of v -> stand-in) is what gnfx.parameter_store.ParameterStore.param returns for v
    between the two."""

    def __init__(self, weight_norms):
        self.weight_norms = {wn.direction: wn for wn in weight_norms}
        self.standins: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.weight_norms)

    @torch.no_grad()
    def gather(self, named: dict) -> None:
        """A stand-in holding W, with ∇W as its gradient (None when neither g nor v has a gradient)."""
        self.standins.clear()
        self._before.clear()
        for name, wn in self.weight_norms.items():
            g, v = named[wn.magnitude], named[wn.direction]
            w = wn.value(g, v)
            standin = w.clone()
            if g.grad is not None or v.grad is not None:
                grad_g = g.grad if g.grad is not None else torch.zeros_like(g)
                grad_v = v.grad if v.grad is not None else torch.zeros_like(v)
                standin.grad = wn.weight_gradient(g, v, grad_g, grad_v)
            self.standins[name] = standin
            self._before[name] = w

    @torch.no_grad()
    def scatter(self, named: dict) -> None:
        """(g, v) += the pull-back of the stand-ins' change ΔW since `gather`; the stand-ins dropped."""
        for name, standin in self.standins.items():
            wn = self.weight_norms[name]
            g, v = named[wn.magnitude], named[wn.direction]
            delta_g, delta_v = wn.pull_back(g, v, standin - self._before[name])
            g.add_(delta_g)
            v.add_(delta_v)
        self.release()

    def release(self) -> None:
        """The stand-ins dropped (after `scatter`, or after a step that raised before it)."""
        self.standins.clear()
        self._before.clear()
