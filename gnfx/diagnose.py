"""`gnfx.diagnose`: how well each block's preconditioner approximates the exact GGN, on one batch.

Notation (docs/design.md §1). On a batch with loss `L(θ) = 1/N Σ_n ℓ(z_n, y_n)`, the GGN is
`G = Jᵀ H_ℓ J`. A *unit* is a curvature block `z = W a (+ b)`, whose parameters θ_b read as the
matrix `[W b]` (d_out x (d_in + 1), bias folded in; gnfx.targets), or a loose parameter no block
claims, read as its own tensor. Its diagonal block of the GGN acts as

    G_b v = (G [v; 0])_b,     v zero outside the unit,

computed exactly with gnfx.ggn (forward- and reverse-mode autodiff, never materialized). For each
unit, on the gradient `g_b = ∇_{θ_b} L` of the batch:

(a) the relative curvature error, the mean over `probes` vectors `v ~ N(0, I)` of
    `‖Ĝ_b v - G_b v‖ / ‖G_b v‖`, where Ĝ_b is the curvature the preconditioner models (undamped),
    as the instance that serves the unit computes it (`curvature_product` of a curvature
    preconditioner, `parameter_curvature` of an elementwise one):

      kfac:   Ĝ_b = A ⊗ S, so Ĝ_b v = S V A for v = vec(V) (A diagonal for embeddings)
      ekfac:  Ĝ_b = (Q_A ⊗ Q_S) diag(s) (Q_A ⊗ Q_S)ᵀ, the eigenvalues s fitted in K-FAC's eigenbasis
      rank1:  Ĝ_b = U diag(ŝ) Uᵀ, ŝ = s / (1 - βᵗ) (the bias-corrected tracked eigenpairs)
      diag:   Ĝ_b = diag(v̂), v̂ = v / (1 - β₂ᵗ) (Adam's second moment: the squared gradient, or the
              Fisher diagonal with source="fisher")

    Shampoo's and SOAP's factors are Gram matrices of gradients under a root, with no GGN scale:
    they have no curvature error (None), only (b).

(b) the cosine between the preconditioner's direction `P_b(g_b)` and the exact damped GGN-Newton
    step `(G_b + λ I)⁻¹ g_b`, solved by conjugate gradients on G_b v. `P_b(g_b)` is what the
    preconditioner does to this gradient, read from its state without changing it: a curvature
    preconditioner's own `direction` on a copy of the unit's state, with no statistic folded in
    (kfac: `(S + λ_S I)⁻¹ G (A + λ_A I)⁻¹`; shampoo: the mode products with the inverse roots;
    rank1: the Woodbury formula; the update chain after the direction, grafting and the heavy-ball
    momentum included, is left out, SOAP's own Adam moments are part of its direction), and
    for diag `g / (√v̂ + ε)` (Adam's step without its first moment). A cosine of 1 means the
    preconditioner steps exactly along the damped Newton direction of this block.

Ĝ_b and P_b come from the state as it is (statistics averaged over past batches, inverses from
the last refresh), G_b and g_b from `batch` at the current parameters: both measures include how
stale the preconditioner is. The model is evaluated in eval mode (its forward must be
deterministic, as gnfx.ggn requires), and nothing of the compiled model, its optimizer or its
statistics is changed.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gnfx.errors import ConfigError, GnfxError
from gnfx.ggn import Loss, _loss_fn, ggn_vp, ggn_vps
from gnfx.layouts import layout_of
from gnfx.outputs import logits_of
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.report import format_table
from gnfx.targets import as_matrix, fold, from_matrix


@dataclasses.dataclass
class BlockDiagnosis:
    """One unit's measurements (see the module doc)."""

    name: str  # block name, or parameter name of a loose parameter
    kind: str  # a layer kind (gnfx.layouts: "linear", "conv", "norm", ...), or "tensor" for a loose parameter
    preconditioner: str
    size: int  # number of parameters in the unit
    curvature_error: float | None  # mean ‖Ĝ_b v - G_b v‖ / ‖G_b v‖, None where Ĝ_b is not defined
    cosine: float  # cos(P_b(g_b), (G_b + λI)⁻¹ g_b)
    cg_residual: float  # ‖(G_b + λI) x - g_b‖ / ‖g_b‖ of the CG solution x


@dataclasses.dataclass
class _Unit:
    """A block (its [W b] matrix) or a loose parameter (its tensor), as the preconditioner sees it.

    A reparametrized block (`reparametrization`, gnfx.reparametrization: a weight-normed one) is
    stepped in W's space: the parameters' covectors (gradients, GGN products) map to W's by Pᵀ and
    W-space vectors (probes, directions) to the parameters' by P = the pull-back, at the model's
    parameters (`values`), so that the unit's gradient is ∇W and its GGN G_W = Pᵀ G_θ P.
    `stepped=True`: tensors already in the space the preconditioner steps (W for its stand-in's name)."""

    name: str
    kind: str
    params: tuple[str, ...]
    view: str = ""
    block: bool = False
    groups: int = 1  # the block's row groups, which its view may read (gnfx.targets.as_matrix)
    reparametrization: object = None  # the block's, gnfx.reparametrization
    values: dict | None = None  # the model's parameters by name (those W is computed from)

    def matrix(self, tensors: dict, stepped: bool = False) -> Tensor:
        """The unit's layout of per-parameter tensors: `[W b]` for a block, the tensor itself else."""
        if not self.block:
            return tensors[self.params[0]]
        weight = tensors[self.params[0]]
        if self.reparametrization is not None and not stepped:
            weight = self.reparametrization.weight_gradient(self.values, tensors)
        bias = tensors[self.params[1]] if len(self.params) > 1 else None
        return fold(as_matrix(weight, self.view, self.groups), bias)

    def tensors(self, M: Tensor, shapes: dict, stepped: bool = False) -> dict:
        """The inverse of `matrix`: per-parameter tensors of the given shapes."""
        if not self.block:
            return {self.params[0]: M.reshape(shapes[self.params[0]])}
        shape = shapes[self.params[0]]
        d_in = as_matrix(M.new_zeros(shape), self.view, self.groups).shape[1]
        w = from_matrix(M[:, :d_in], self.view, shape, self.groups)
        out = {self.params[0]: w, **({self.params[1]: M[:, d_in]} if len(self.params) > 1 else {})}
        if self.reparametrization is not None and not stepped:
            out.update(self.reparametrization.pull_back(self.values, w))
        return out


class Diagnosis(list):
    """The list of BlockDiagnosis records; `str()` is the table `diagnose` prints."""

    def __str__(self) -> str:
        def number(x):
            return "-" if x is None else f"{x:.3g}"

        rows = [[r.name, r.kind, r.preconditioner, f"{r.size:,}", number(r.curvature_error),
                 f"{r.cosine:+.3f}", f"{r.cg_residual:.1e}"] for r in self]
        return format_table(["block", "kind", "preconditioner", "params", "curvature error", "cosine to GGN-Newton",
                       "CG residual"], rows)


def diagnose(model, batch, loss: Loss, probes: int = 8, damping: float = 1e-3, cg_tol: float = 1e-4,
             cg_max_iter: int = 250, seed: int = 0, verbose: bool = True) -> Diagnosis:
    """Measure, per block, the preconditioner's curvature error and its step's cosine to the
    exact damped GGN-Newton step (module doc), on `batch`.

    Args:
        model: a model returned by gnfx.compile, after at least one optimizer step.
        batch: (inputs, targets); inputs a tensor or a tuple of tensors passed positionally.
        loss: "cross_entropy", "mse", "binary_cross_entropy" (mean reduction) or a callable loss(z, y) -> scalar,
            as gnfx.ggn.
        probes: random vectors per block for the curvature error.
        damping: λ of the reference step (G_b + λI)⁻¹ g_b.
        cg_tol, cg_max_iter: CG stops at relative residual cg_tol or after cg_max_iter products.
        seed: of the probe vectors.
        verbose: print the table.

    Returns:
        a Diagnosis: a list of BlockDiagnosis, blocks first, then loose parameters.
    """
    opt = getattr(model, "optimizer", None)
    if not hasattr(model, "layers") or opt is None:
        raise ConfigError(f"diagnose expects a model returned by gnfx.compile, got {type(model).__name__}")
    if opt.steps == 0:
        raise GnfxError("diagnose reads the preconditioners' state: take at least one optimizer step first")
    if probes < 1 or damping < 0:
        raise ConfigError(f"diagnose needs probes >= 1 and damping >= 0, got probes={probes}, damping={damping}")
    values = dict(model.named_parameters())
    units = [_Unit(b.name, b.kind, b.params, layout_of(b).view, True, layout_of(b).groups, b.reparametrization, values)
             for b in model.layers]
    units += [_Unit(f.param, "tensor", (f.param,)) for f in model.layers.fallbacks]
    records = Diagnosis()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        exact = _BlockGGN(model, loss, *batch)
        grads = exact.gradient()
        generator = torch.Generator(device=next(iter(grads.values())).device).manual_seed(seed)
        for unit in units:
            pre = _server(opt, unit)
            g = unit.matrix(grads)
            V = torch.randn((probes,) + g.shape, generator=generator, dtype=g.dtype, device=g.device)
            modeled = [_curvature(pre, unit, v, exact.shapes, opt.statistics) for v in V]
            error = None
            if modeled[0] is not None:
                GV = exact.products(unit, V)
                model_V = torch.stack(modeled).to(g.dtype)
                error = float(((model_V - GV).flatten(1).norm(dim=1) / GV.flatten(1).norm(dim=1)).mean())
            newton, residual = _conjugate_gradients(lambda v: exact.product(unit, v) + damping * v, g,
                                                    cg_tol, cg_max_iter)
            step = _direction(pre, unit, g, exact.shapes).to(g.dtype)
            cosine = float(torch.sum(step * newton) / (step.norm() * newton.norm()))
            records.append(BlockDiagnosis(unit.name, unit.kind, pre.name, g.numel(), error, cosine, residual))
    finally:
        model.train(modes[model])
        for m, mode in modes.items():
            m.training = mode
    if verbose:
        print(records)
    return records


class _BlockGGN:
    """G_b v for the units of a model on one batch: gnfx.ggn's products of G with v zero outside
    the unit, restricted to the unit (both in the unit's layout)."""

    def __init__(self, model, loss: Loss, inputs, targets):
        self.model, self.loss, self.inputs, self.targets = model, loss, inputs, targets
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shapes = {n: p.shape for n, p in self.params.items()}

    def gradient(self) -> dict:
        """∇_θ L on the batch, by parameter name."""
        args = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        value = _loss_fn(self.loss)(logits_of(self.model(*args)), self.targets)
        return dict(zip(self.params, torch.autograd.grad(value, list(self.params.values()))))

    def _padded(self, unit: _Unit, V: Tensor) -> list[Tensor]:
        part = unit.tensors(V, self.shapes)
        return [part[n] if n in part else torch.zeros_like(p) for n, p in self.params.items()]

    def _restricted(self, unit: _Unit, vector: list[Tensor]) -> Tensor:
        return unit.matrix(dict(zip(self.params, vector)))

    def product(self, unit: _Unit, V: Tensor) -> Tensor:
        """G_b V for one V (gnfx.ggn.ggn_vp)."""
        return self._restricted(unit, ggn_vp(self.model, self.loss, self.inputs, self.targets, self._padded(unit, V)))

    def products(self, unit: _Unit, V: Tensor) -> Tensor:
        """G_b V_k for a stack V of shape (K, ...), vectorized (gnfx.ggn.ggn_vps)."""
        vs = [torch.stack(column) for column in zip(*(self._padded(unit, v) for v in V))]
        out = ggn_vps(self.model, self.loss, self.inputs, self.targets, vs)
        return torch.stack([self._restricted(unit, [o[k] for o in out]) for k in range(len(V))])


def _conjugate_gradients(apply, b: Tensor, tol: float, max_iter: int) -> tuple[Tensor, float]:
    """x ≈ M⁻¹ b for a symmetric positive definite M given by `apply(v) = M v`; with the relative
    residual ‖b - M x‖ / ‖b‖ (the recursive one, exact in exact arithmetic)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(torch.sum(r * r))
    bb = rr
    for _ in range(max_iter):
        if rr <= tol ** 2 * bb:
            break
        Mp = apply(p)
        alpha = rr / float(torch.sum(p * Mp))
        x += alpha * p
        r -= alpha * Mp
        rr, rr_old = float(torch.sum(r * r)), rr
        p = r + (rr / rr_old) * p
    return x, math.sqrt(rr / bb) if bb > 0 else 0.0


def _server(opt, unit: _Unit):
    """The preconditioner instance that serves the unit, as each instance says (its blocks or its
    loose parameters): several instances of one class ("kfac", "kfac_v2") are told apart."""
    for pre in opt.preconditioners:
        if unit.name in ([b.name for b in pre.blocks] if unit.block else pre.param_names):
            return pre
    raise GnfxError(f"no preconditioner of this model serves {unit.name!r}")


def _pieces(pre: CurvaturePreconditioner, unit: _Unit):
    """(group, index in the group, piece) of every piece of the unit's target."""
    for group in pre.groups:
        for i, piece in enumerate(group.pieces):
            if piece.target.name == unit.name and (piece.target.block is not None) == unit.block:
                yield group, i, piece


def _piecewise(pre: CurvaturePreconditioner, unit: _Unit, M: Tensor, fn) -> Tensor | None:
    """fn(group, index of the piece in it, the piece of M) for every piece of the unit,
    reassembled; None where fn gives None."""
    out = None
    for group, i, piece in _pieces(pre, unit):
        result = fn(group, i, M[piece.index])
        if result is None:
            return None
        out = result.new_zeros(M.shape) if out is None else out
        out[piece.index] = result
    return out


def _direction(pre, unit: _Unit, g: Tensor, shapes: dict) -> Tensor:
    """P_b(g_b): the preconditioner's direction for the unit's gradient, its state unchanged (an
    elementwise preconditioner's `parameter_direction`, parameter by parameter, of the tensors it steps,
    `shapes` theirs)."""
    if isinstance(pre, CurvaturePreconditioner):
        def direction(group, i, G):
            state = {k: v[i:i + 1].clone() for k, v in pre.group_state(group).items()}
            return pre.direction(G.unsqueeze(0), state, collect=False)[0]

        return _piecewise(pre, unit, g, direction)
    grads = unit.tensors(g, shapes, stepped=True)
    return unit.matrix({n: pre.parameter_direction(n, grads[n]) for n in unit.params}, stepped=True)


def _curvature(pre, unit: _Unit, V: Tensor, shapes: dict, statistics) -> Tensor | None:
    """Ĝ_b V: the curvature the preconditioner models for the unit (its `curvature_product`, piece
    by piece, from the averaged `statistics`; an elementwise one's `parameter_curvature`, parameter by
    parameter, `shapes` theirs), None where it models none."""
    if isinstance(pre, CurvaturePreconditioner):
        return _piecewise(pre, unit, V, lambda group, i, piece: pre.curvature_product(group, i, piece, statistics))
    parts = {n: pre.parameter_curvature(n, v) for n, v in unit.tensors(V, shapes, stepped=True).items()}
    return None if any(p is None for p in parts.values()) else unit.matrix(parts, stepped=True)
