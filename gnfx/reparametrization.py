"""Reparametrized weights: a block whose weight W is computed from parameters (weight and spectral norm,
weight standardization, with or without a gain, masked and unit-norm weights).

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

Spectral normalization (`nn.utils.parametrizations.spectral_norm`) makes W = W_o / σ, σ = uᵀ W_o v
(W_o read as a matrix; u, v the buffers the power iteration of each training forward updates, no
gradient through them). Its block holds W as well, with σ held fixed for the step, at the u, v of
the last forward: the gathered gradient is σ ∇W_o = ∇W − ⟨W, ∇W⟩ u vᵀ (∇W but for the component
along u vᵀ, which σ's dependence on W_o takes out of ∇W_o and which cannot be recovered), and a
change ΔW pulls back to ΔW_o = σ ΔW, whose image J(ΔW_o) = ΔW − W (uᵀ ΔW v) misses only the change
of σ that the normalization pins (W's top singular value stays 1).

Weight standardization (BiT's and timm's StdConv2d, Hugging Face's WeightStandardizedConv2d:
`F.batch_norm(V.reshape(1, C_out, -1), None, None, training=True, eps=ε).reshape_as(V)`) makes each
output row r of W (n = C_in·k·k entries) W_r = (V_r − μ_r) / s_r, μ_r its mean, s_r = √(σ_r² + ε), σ_r²
its (biased) variance. Its Jacobian is J_r = (1/s_r)(I − 11ᵀ/n − W_r W_rᵀ/n), symmetric: the mean of
V_r and (to O(ε)) its scale change no W. As for spectral norm, with s held fixed for the step: the
gathered gradient is s_r ∇V_r = (I − 11ᵀ/n − W_r W_rᵀ/n) ∇W_r, ∇W_r but for its mean and its
component along W_r, which cannot be recovered, and a change ΔW_r pulls back to ΔV_r = s_r ΔW_r,
whose image J_r(s_r ΔW_r) misses only those two components, which the standardization pins.

With a gain (timm's ScaledStdConv2d, NFNets: the batch normalization's weight γ = c · g, g a parameter
of C_out entries, c a number, `weight=(gain * scale).view(-1)`) each row is W_r = c g_r Ŵ_r, Ŵ_r =
(V_r − μ_r) / s_r the standardized row: weight norm's W_r = g_r v̂_r with Ŵ_r for v̂_r, treated as
weight norm is (g held by the block, the step in W's space, both maps exact). With Q_r = I − 11ᵀ/n −
Ŵ_r Ŵ_rᵀ / ‖Ŵ_r‖² (the projection off the mean and off Ŵ_r; Ŵ_r has mean 0) and α_r = ε / s_r², the
Jacobian is ∂W_r/∂g_r = c Ŵ_r, ∂W_r/∂V_r = (c g_r / s_r)(Q_r + α_r Ŵ_r Ŵ_rᵀ / ‖Ŵ_r‖²) (‖Ŵ_r‖² = n σ_r² / s_r²):

- Gather. ∇g_r = c Ŵ_rᵀ ∇W_r and Q_r ∇V_r = (c g_r / s_r) Q_r ∇W_r, so ∇W_r but for its mean (which
  neither reaches) is Ŵ_r ∇g_r / (c ‖Ŵ_r‖²) + (s_r / (c g_r)) Q_r ∇V_r, exactly (ε included).
- Scatter. Δg_r = Ŵ_rᵀ ΔW_r / (c ‖Ŵ_r‖²), ΔV_r = (s_r / (c g_r)) Q_r ΔW_r: J(Δg, ΔV) = ΔW_r but for
  its mean, exactly; ΔV_r ⟂ 1, V_r − μ_r (the least-norm preimage). The gather is this map's transpose.
- At c g_r = 0 (or Ŵ_r = 0, a constant row) the factor s_r / (c g_r) (or 1 / (c ‖Ŵ_r‖²)) is taken as
  0, the pseudo-inverse, as weight norm's at g_r = 0. Decoupled weight decay ΔW = −ηλ W pulls back to
  g ← g(1 − ηλ), V unchanged (Q_r Ŵ_r = 0), as weight norm's.

A masked weight (MADE's masked linear layers, the masked autoregressive flows' hyper-networks: zuko's and
nflows' MaskedLinear, `F.linear(x, mask * V, b)`) is W = M ⊙ V, M a constant tensor of V's shape (a 0/1
adjacency, bool or floating; passes/masked_weights.py). Its Jacobian is the diagonal map ΔV ↦ M ⊙ ΔV:
∇V = M ⊙ ∇W, and where M is 0 neither ∇W is recovered nor ΔW made (those entries of W are pinned to 0).
With M⁺ the entrywise pseudo-inverse (1/M, 0 where M = 0), the gathered gradient is M⁺ ⊙ ∇V (∇W on M's
support, 0 off it) and a change ΔW pulls back to ΔV = M⁺ ⊙ ΔW, whose image M ⊙ ΔV is ΔW on the support:
the step moves no masked-out entry of V (their values change no W), and decoupled weight decay shrinks V
on the support only. For a 0/1 mask both maps are M ⊙ ·. The taps' a and δ at the linear node are those
of W, so the block's statistics are exact for W.

A weight scaled by a number s that only linear maps read, W = s · V (e3nn's FullyConnectedNet, the radial
MLPs of e3nn's convolutions, NequIP and MACE, computes `x @ (V / sqrt(h_in · var_in))`: its normalized
initialization written into the forward; passes/masked_weights.py), needs no stand-in: z = W a = V (s a), so
its block holds V itself on the input rows s a (`ScaledWeight` only makes the product stand for V;
passes/analyze.py, gnfx.layouts.linear), and every preconditioner steps V as the user's parameter (the
diagonal is AdamW on V, whose lr the user tuned).
A sampled weight (Bayes by Backprop's layers: torchbnn's BayesLinear, bayesian-torch's LinearReparameterization
and Conv2dReparameterization, `F.linear(x, μ + σ(ρ) ⊙ ε, b_μ + σ(ρ_b) ⊙ ε_b)` with ε drawn on every call;
passes/sampled_weights.py) is W = μ + P, P computed from other parameters and draws but neither from μ nor from
the input. Its Jacobian in μ is the identity: ∇μ = ∇W (the part of ∇μ that comes through W; a KL term on μ
the loss adds outside the model adds its own gradient, which the step preconditions with the rest of ∇μ), so
the block holds μ itself with the statistics of W's layer, exact for μ (the taps' a and δ at the layer are
those of the sampled W, the one the forward used), and needs no stand-in; ρ, read through σ(ρ) ⊙ ε, falls
back to the diagonal (its gradient ∇W ⊙ ε ⊙ σ'(ρ) is no layer's).
A unit-norm weight (nGPT, whose every weight is `F.normalize(V, dim=d)` through a parametrization: each row of
V along `d` scaled to length 1; passes/unit_norm_weights.py) is W_r = V_r / c_r, c_r = max(‖V_r‖, ε), the
norm over the dimension d. Its Jacobian is (1/‖V_r‖)(I − W_r W_rᵀ) where ‖V_r‖ > ε (the length of V_r changes
no W), and I/ε where the clamp holds. As for spectral norm, with c held fixed for the step: the gathered
gradient is c_r ∇V_r = (I − W_r W_rᵀ) ∇W_r, ∇W_r but for its component along W_r, which the normalization pins
and which cannot be recovered, and a change ΔW_r pulls back to ΔV_r = c_r ΔW_r, whose image is ΔW_r but for
that component: weight norm's map with g ≡ 1 in the place of a parameter.
"""
from __future__ import annotations

import dataclasses

import torch


def _remove_parametrizations(weight: str) -> str:
    """The call that removes the parametrizations of the model's weight named `weight`."""
    module, _, name = weight.rpartition(".")
    return f"torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({module!r}), {name!r})"


@dataclasses.dataclass(frozen=True)
class WeightNorm:
    """W = g · v / ‖v‖ (module docstring). `weight`: the name W has in the model (`fc.weight`, for a
    layer's block name); `magnitude`, `direction`: the parameter names of g and v; `dim`: the
    dimension of v the norm is not taken over (-1: the norm over the whole tensor).

    What every reparametrization gives (`Reparametrizations`, gnfx.diagnose): `standin`, the parameter
    of W's shape whose name W's stand-in takes (v); `held`, the others W is computed from (g);
    `value`, `weight_gradient` and `pull_back` of the parameters by name; `removal`, the torch call
    that turns it back into a plain weight (named where gnfx refuses it: under FSDP2)."""

    weight: str
    magnitude: str
    direction: str
    dim: int

    @property
    def standin(self) -> str:
        return self.direction

    @property
    def held(self) -> tuple[str, ...]:
        return (self.magnitude,)

    @property
    def removal(self) -> str:
        """The older API's pre-hook keeps v as `<weight>_v` (`fc.weight_v`), the parametrization as
        `fc.parametrizations.weight.original1`."""
        module, _, name = self.weight.rpartition(".")
        if self.direction == f"{self.weight}_v":
            return f"torch.nn.utils.remove_weight_norm(model.get_submodule({module!r}), {name!r})"
        return _remove_parametrizations(self.weight)

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        """‖v_r‖, broadcastable against v (torch.norm_except_dim, as torch._weight_norm computes it)."""
        return torch.norm_except_dim(v, 2, self.dim)

    def _magnitude(self, named: dict) -> torch.Tensor:
        """g, a trainable parameter: from the parameters by name."""
        return named[self.magnitude]

    def _unit_and_scale(self, named: dict):
        """(v̂, ‖v_r‖ / g_r with 0 where g_r = 0) (module docstring, the pseudo-inverse at g_r = 0)."""
        v = named[self.direction].detach()
        norm = self._norm(v)
        g = self._magnitude(named).detach().reshape(norm.shape)
        return v / norm, norm * _inverse_or_zero(g)

    def row_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over every dimension of x (shaped like v) but `dim` (all at dim=-1), keeping them as 1s."""
        dims = [d for d in range(x.dim()) if self.dim == -1 or d != self.dim % x.dim()]
        return x.sum(dim=dims, keepdim=True)

    def value(self, named: dict) -> torch.Tensor:
        """W, as the model's forward computes it, from the parameters by name."""
        return torch._weight_norm(named[self.direction], self._magnitude(named), self.dim)

    def weight_gradient(self, named: dict, grads: dict) -> torch.Tensor:
        """∇W from ∇g and ∇v (`grads`, by name): ∇W_r = v̂_r ∇g_r + (‖v_r‖ / g_r) ∇v_r (module
        docstring), computed as Pᵀ(∇g, ∇v) with P = `pull_back`: (a, B) ↦ v̂_r a_r + (‖v_r‖ / g_r)
        (I − v̂_r v̂_rᵀ) B_r, the same for a gradient (∇v_r ⟂ v_r) and the exact transpose of P for any
        (a, B), so that the GGN in W's space is G_W = Pᵀ G_θ P (gnfx.diagnose)."""
        unit, scale = self._unit_and_scale(named)
        grad_v = grads[self.direction]
        return (unit * grads[self.magnitude].reshape(scale.shape)
                + scale * (grad_v - unit * self.row_sum(unit * grad_v)))

    def pull_back(self, named: dict, delta_w: torch.Tensor) -> dict:
        """{g: Δg, v: Δv} with J_f(Δg, Δv) = ΔW: Δg_r = v̂_rᵀ ΔW_r, Δv_r = (‖v_r‖ / g_r)(ΔW_r − v̂_r Δg_r)."""
        unit, scale = self._unit_and_scale(named)
        delta_g = self.row_sum(unit * delta_w)
        return {self.magnitude: delta_g.reshape(self._magnitude(named).shape),
                self.direction: scale * (delta_w - unit * delta_g)}


@dataclasses.dataclass(frozen=True)
class WeightNormFixedMagnitude(WeightNorm):
    """W = g · v / ‖v‖ with g no trainable parameter (requires_grad=False: DINO's head, whose last layer
    lightly's and the DINO authors' code weight-norm with g frozen at 1, `norm_last_layer=True`): only v
    moves, so W_r moves only orthogonally to v̂_r. The weight-norm maps without g's part (module docstring):
    gather ∇W_r = (‖v_r‖ / g_r) ∇v_r, ∇W_r but for its component along v̂_r, which ∇v_r does not carry;
    scatter Δv_r = (‖v_r‖ / g_r)(I − v̂_r v̂_rᵀ) ΔW_r, whose image J_v Δv_r is ΔW_r but for that component
    (the pseudo-inverse of J_v, 0 at g_r = 0). `fixed`: g itself (not among the optimizer's parameters), read
    at each step, so that a load_state_dict into it is seen; decoupled weight decay on W then moves nothing
    (its pull-back is along v̂_r)."""

    fixed: torch.Tensor = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def held(self) -> tuple[str, ...]:
        return ()

    def _magnitude(self, named: dict) -> torch.Tensor:
        return self.fixed

    def weight_gradient(self, named: dict, grads: dict) -> torch.Tensor:
        """∇W_r = (‖v_r‖ / g_r)(I − v̂_r v̂_rᵀ) ∇v_r (∇v_r ⟂ v_r already: the projection is exact)."""
        return super().weight_gradient(named, {**grads, self.magnitude: torch.zeros_like(self.fixed)})

    def pull_back(self, named: dict, delta_w: torch.Tensor) -> dict:
        """{v: Δv}, Δv_r = (‖v_r‖ / g_r)(I − v̂_r v̂_rᵀ) ΔW_r."""
        return {self.direction: super().pull_back(named, delta_w)[self.direction]}


@dataclasses.dataclass(frozen=True)
class _OfOneParameter:
    """A reparametrization W = f(W_o) of one parameter W_o, its scale c held fixed for the step, so that
    the step moves W_o by c ΔW and W's gradient is c ∇W_o (each but for what the module docstring says
    f cannot reach): `weight`: W's name in the model; `original`: W_o's parameter name, which W's
    stand-in takes; nothing else held. A subclass gives c as `held_scale`."""

    weight: str
    original: str

    @property
    def standin(self) -> str:
        return self.original

    @property
    def held(self) -> tuple[str, ...]:
        return ()

    def held_scale(self, named: dict) -> torch.Tensor:
        raise NotImplementedError

    def weight_gradient(self, named: dict, grads: dict) -> torch.Tensor:
        """c ∇W_o."""
        return self.held_scale(named) * grads[self.original]

    def pull_back(self, named: dict, delta_w: torch.Tensor) -> dict:
        """{W_o: c ΔW}."""
        return {self.original: self.held_scale(named) * delta_w}


@dataclasses.dataclass(frozen=True)
class SpectralNorm(_OfOneParameter):
    """W = W_o / σ, σ = uᵀ W_o v, σ held fixed for the step (module docstring). `module`: the
    parametrization's `_SpectralNorm`, which holds u and v and reads W_o as a matrix."""

    module: torch.nn.Module = dataclasses.field(compare=False, repr=False)

    @property
    def removal(self) -> str:
        return _remove_parametrizations(self.weight)

    def sigma(self, named: dict) -> torch.Tensor:
        """σ = uᵀ W_o v at the u, v of the last forward, as the parametrization computes it."""
        m = self.module
        return torch.vdot(m._u, torch.mv(m._reshape_weight_to_matrix(named[self.original].detach()), m._v))

    def value(self, named: dict) -> torch.Tensor:
        """W = W_o / σ."""
        return named[self.original] / self.sigma(named)

    def held_scale(self, named: dict) -> torch.Tensor:
        """c = σ: ∇W = σ ∇W_o but for its component along u vᵀ, and J(σ ΔW) = ΔW − W (uᵀ ΔW v) (module
        docstring)."""
        return self.sigma(named)


@dataclasses.dataclass(frozen=True)
class WeightStandardization(_OfOneParameter):
    """W_r = (V_r − μ_r) / s_r per output row r, s held fixed for the step (module docstring); `original`
    is V; `eps`: ε."""

    eps: float

    @property
    def removal(self) -> str:
        """No torch call: the module standardizes its kernel in its own forward (BiT's
        WeightStandardizedConv2d, timm's StdConv2d)."""
        module = self.weight.rpartition(".")[0]
        return (f"model.get_submodule({module!r}) standardizes its weight in its own forward, which no torch call "
                f"removes: replace it by the plain layer of its class's base (nn.Conv2d) with that weight")

    def scale(self, named: dict) -> torch.Tensor:
        """s_r = √(σ_r² + ε), shaped to broadcast against V."""
        v = named[self.original].detach()
        variance = v.flatten(1).var(dim=1, correction=0)
        return (variance + self.eps).sqrt().reshape((-1,) + (1,) * (v.dim() - 1))

    def row_weight(self, named: dict) -> torch.Tensor | None:
        """The batch normalization's weight (one entry per row r multiplying W_r): none."""
        return None

    def value(self, named: dict) -> torch.Tensor:
        """W, as the model's forward computes it (a batch normalization of V's rows)."""
        v = named[self.original]
        return torch.nn.functional.batch_norm(v.reshape(1, v.shape[0], -1), None, None, weight=self.row_weight(named),
                                              training=True, momentum=0.0, eps=self.eps).reshape_as(v)

    def held_scale(self, named: dict) -> torch.Tensor:
        """c = s: ∇W = s ∇V but for its rows' mean and their component along W (module docstring)."""
        return self.scale(named)


@dataclasses.dataclass(frozen=True)
class MaskedWeight(_OfOneParameter):
    """W = M ⊙ V (module docstring); `original` is V; M is the attribute `mask_name` of the module `holder`,
    where the captured graph reads it, read at each use: a mask changed in place (MADE's mask resampling) or
    replaced (`torch.nn.utils.prune` pruning again registers a new `weight_mask`) is followed; taken to V's
    device and dtype where it is used."""

    holder: torch.nn.Module = dataclasses.field(compare=False, repr=False)
    mask_name: str = dataclasses.field(compare=False, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """M as the graph reads it now."""
        return getattr(self.holder, self.mask_name)

    def _mask(self, named: dict) -> torch.Tensor:
        v = named[self.original]
        return self.mask.to(device=v.device, dtype=v.dtype)

    @property
    def removal(self) -> str:
        """torch.nn.utils.prune.remove for a pruned weight (W named apart from V: `fc.weight` of `fc.weight_orig`);
        else no torch call: the module masks its weight in its own forward (zuko's and nflows' MaskedLinear)."""
        module, _, name = self.weight.rpartition(".")
        if self.weight != self.original:
            return f"torch.nn.utils.prune.remove(model.get_submodule({module!r}), {name!r})"
        return (f"model.get_submodule({module!r}) masks its weight in its own forward, which no torch call removes: "
                f"replace it by a plain nn.Linear holding mask * weight and keep its gradient masked")

    def value(self, named: dict) -> torch.Tensor:
        """W = M ⊙ V, as the model's forward computes it."""
        return self._mask(named) * named[self.original]

    def held_scale(self, named: dict) -> torch.Tensor:
        """c = M⁺: ∇W = M⁺ ⊙ ∇V on M's support, and M ⊙ (M⁺ ⊙ ΔW) = ΔW there (module docstring)."""
        return _inverse_or_zero(self._mask(named))


@dataclasses.dataclass(frozen=True)
class ScaledWeight(_OfOneParameter):
    """W = s · V read by linear maps only (module docstring), `factor` the number s. Never a stand-in: the
    linear block holds V on the input rows s a (passes/analyze.py); this only makes the product stand for V."""

    factor: float


@dataclasses.dataclass(frozen=True)
class SampledWeight(_OfOneParameter):
    """W = μ + P read by linear maps and convolutions only, P computed without μ and without the input (module
    docstring): `original` is μ. Never a stand-in: ∂W/∂μ = I, so the block holds μ itself (passes/analyze.py);
    this only makes the sum stand for μ."""


@dataclasses.dataclass(frozen=True)
class GainedWeightStandardization(WeightStandardization):
    """W_r = c g_r Ŵ_r, Ŵ_r = (V_r − μ_r) / s_r (module docstring: a weight standardization with a
    gain, timm's ScaledStdConv2d); `gain`: g's parameter name (one entry per row, any shape), which the
    block holds; `factor`: the number c."""

    gain: str
    factor: float

    @property
    def held(self) -> tuple[str, ...]:
        return (self.gain,)

    def row_weight(self, named: dict) -> torch.Tensor:
        """γ = c · g, flat."""
        return (named[self.gain] * self.factor).reshape(-1)

    def __post_init__(self):
        if self.factor == 0:
            raise ValueError(f"the gain of {self.weight!r} is multiplied by 0: its W is 0 whatever the parameters")

    def _rows(self, named: dict):
        """(Ŵ, 1 / ‖Ŵ_r‖², s_r / (c g_r)), the last two 0 where their denominators are (module docstring),
        shaped to broadcast against V."""
        v = named[self.original].detach()
        s = self.scale(named)
        standardized = (v - v.flatten(1).mean(dim=1).reshape(s.shape)) / s
        cg = self.factor * named[self.gain].detach().reshape(s.shape)
        return standardized, _inverse_or_zero(self._row_sum(standardized * standardized)), s * _inverse_or_zero(cg)

    @staticmethod
    def _row_sum(x: torch.Tensor) -> torch.Tensor:
        """Σ over each row of x (shaped like V), keeping its dimensions as 1s."""
        return x.flatten(1).sum(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))

    def _off_mean_and_row(self, x: torch.Tensor, standardized: torch.Tensor, inverse_norm2: torch.Tensor) -> torch.Tensor:
        """Q_r x_r = x_r − mean(x_r) − Ŵ_r Ŵ_rᵀ x_r / ‖Ŵ_r‖² per row."""
        centered = x - self._row_sum(x) / x[0].numel()
        return centered - standardized * inverse_norm2 * self._row_sum(standardized * x)

    def weight_gradient(self, named: dict, grads: dict) -> torch.Tensor:
        """∇W but for its rows' mean: Ŵ_r ∇g_r / (c ‖Ŵ_r‖²) + (s_r / (c g_r)) Q_r ∇V_r (module docstring),
        the exact transpose of `pull_back`."""
        standardized, inverse_norm2, rest = self._rows(named)
        return (standardized * (inverse_norm2 / self.factor) * grads[self.gain].reshape(rest.shape)
                + rest * self._off_mean_and_row(grads[self.original], standardized, inverse_norm2))

    def pull_back(self, named: dict, delta_w: torch.Tensor) -> dict:
        """{g: Δg, V: ΔV}: Δg_r = Ŵ_rᵀ ΔW_r / (c ‖Ŵ_r‖²), ΔV_r = (s_r / (c g_r)) Q_r ΔW_r (module docstring)."""
        standardized, inverse_norm2, rest = self._rows(named)
        delta_g = inverse_norm2 / self.factor * self._row_sum(standardized * delta_w)
        return {self.gain: delta_g.reshape(named[self.gain].shape),
                self.original: rest * self._off_mean_and_row(delta_w, standardized, inverse_norm2)}


@dataclasses.dataclass(frozen=True)
class UnitNormWeight(_OfOneParameter):
    """W = F.normalize(V, dim=`dim`, eps=`eps`), each row of V along `dim` of length 1, c = max(‖V_r‖, ε) held
    fixed for the step (module docstring); `original` is V."""

    dim: int
    eps: float

    @property
    def removal(self) -> str:
        """The parametrization's removal, where it is one (nGPT's NormLinear); else the model's own forward
        normalizes it."""
        if ".parametrizations." in f".{self.original}":
            return _remove_parametrizations(self.weight)
        module = self.weight.rpartition(".")[0]
        return (f"model.get_submodule({module!r}) normalizes its weight in its own forward, which no torch call "
                f"removes: replace it by a plain layer with that weight")

    def value(self, named: dict) -> torch.Tensor:
        """W, as the model's forward computes it."""
        return torch.nn.functional.normalize(named[self.original], dim=self.dim, eps=self.eps)

    def held_scale(self, named: dict) -> torch.Tensor:
        """c = max(‖V_r‖, ε), shaped to broadcast against V."""
        return named[self.original].detach().norm(dim=self.dim, keepdim=True).clamp_min(self.eps)


def _inverse_or_zero(x: torch.Tensor) -> torch.Tensor:
    """1 / x, 0 where x is 0 (the pseudo-inverse of a diagonal)."""
    return torch.where(x == 0, torch.zeros_like(x), 1 / torch.where(x == 0, torch.ones_like(x), x))


class Reparametrizations:
    """The reparametrized blocks' stand-ins for one step (module docstring): `gather` makes them from
    the parameters in `named`, `scatter` pulls the change the step made to them back to the
    parameters. `standins` (the name a stand-in takes -> the stand-in) is what
    gnfx.parameter_store.ParameterStore.param returns between the two."""

    def __init__(self, reparametrizations):
        self.reparametrizations = {rp.standin: rp for rp in reparametrizations}
        self.standins: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.reparametrizations)

    def __iter__(self):
        return iter(self.reparametrizations.values())

    @torch.no_grad()
    def gather(self, named: dict) -> None:
        """A stand-in holding W, with ∇W as its gradient (None when no parameter of W has a gradient)."""
        self.release()
        for name, rp in self.reparametrizations.items():
            w = rp.value(named)
            standin = w.clone()
            sources = (rp.standin, *rp.held)
            if any(named[n].grad is not None for n in sources):
                grads = {n: named[n].grad if named[n].grad is not None else torch.zeros_like(named[n])
                         for n in sources}
                standin.grad = rp.weight_gradient(named, grads)
            self.standins[name] = standin
            self._before[name] = w

    @torch.no_grad()
    def scatter(self, named: dict) -> None:
        """The parameters += the pull-back of the stand-ins' change ΔW since `gather`; the stand-ins dropped."""
        for name, standin in self.standins.items():
            rp = self.reparametrizations[name]
            for param, delta in rp.pull_back(named, standin - self._before[name]).items():
                named[param].add_(delta)
        self.release()

    def release(self) -> None:
        """The stand-ins dropped (after `scatter`, or after a step that raised before it)."""
        self.standins.clear()
        self._before.clear()
