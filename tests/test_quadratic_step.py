"""The quadratic-model step (gnfx.quadratic_step) against dense float64 references.

The step's α, μ and predicted reduction are checked against the quadratic
q(d) = gᵀd + ½ dᵀ(G + λI)d built from gnfx.ggn.ggn_matrix on tiny models: the update applied is
s = αΔ + μδ with δ the previous update, so the proposal is Δ = (s - μδ)/α whatever α and μ were,
and (α, μ) must be the minimizer of q over that plane (with μ in MOMENTUM_RANGE: the KKT
conditions of the box). Then the Levenberg–Marquardt rule alone, the step with a closure against
the one without (the loss recovered from the output gradient), a rejected step, and convergence in
steps (never time) against AdamW's best learning rate of a grid.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import gnfx
import test_convergence as convergence
from models import GridSampled
from steps import backward_and_step
import test_distributed as distributed
from gnfx.ggn import ggn_matrix
import gnfx.quadratic_step as quadratic_step
import gnfx.flat_layout as flat_layout
from gnfx.finite_differences import difference_rows
from gnfx.forward_mode import ModuleFunction
from gnfx.output_losses import OutputLoss
from gnfx.quadratic_step import (DAMPING_WARMUP, HELD_OUT_FACTOR, HELD_OUT_MAX, LAMBDA_MAX, LAMBDA_MIN,
                                 MOMENTUM_RANGE, held_out_scale, levenberg_marquardt, loss_resolution,
                                 minimize_quadratic, recovered_loss)

DTYPE = torch.float64
STEPS = 6
# forward-mode products, exact to rounding: the tests that hold a step to 1e-9 of the dense GGN quadratic's
# minimizer, or two ways to one step to each other, take them (the default, "auto", takes finite differences on a
# smooth forward, ~1e-8 relative in float64, which rounding differences between two ways reach: their tests are
# under quadratic_products="difference" below, to that precision)
EXACT = {"quadratic_products": "forward"}
LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
          "binary_cross_entropy": F.binary_cross_entropy_with_logits}


def tiny(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).to(DTYPE)


def batch(loss, n=8, out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DTYPE)
    if loss == "binary_cross_entropy":  # soft multi-label targets in [0, 1]
        return x, torch.rand(n, out, generator=g, dtype=DTYPE)
    y = torch.randint(out, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, out, generator=g,
                                                                                          dtype=DTYPE)
    return x, y


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------- α and μ


def assert_minimizer(g, G, last, s, previous, rtol=1e-9):
    """The applied update s = τ(αΔ + μδ) (δ = `previous`, None on a first step; τ = floor_scale, 1
    unless the loss-floor cap shortened the step, test_the_loss_floor_cap_...) with (α, μ) of `last`
    divided by τ minimizes q(d) = gᵀd + ½ dᵀ(G + λI)d over that plane (μ in MOMENTUM_RANGE: the KKT
    conditions of the box), to `rtol` (relative; 10·rtol for the 2x2 solution). Returns whether μ was
    interior (the plain 2x2 solution), q(s) (`last` reports -q(s) as the predicted reduction) and q(s/τ)."""
    tau = last["floor_scale"]
    applied, s = s, s / tau
    alpha, mu, lam = last["alpha"] / tau, last["mu"] / tau, last["damping"]
    mu = next((edge for edge in MOMENTUM_RANGE if abs(edge - mu) < 1e-12), mu)  # μ·τ/τ back on its bound
    interior = False
    if previous is None:
        assert mu == 0.0
        delta = s / alpha
        a_ref = -(g @ delta) / (delta @ (G @ delta) + lam * delta @ delta)
        torch.testing.assert_close(torch.tensor(alpha, dtype=DTYPE), a_ref, rtol=rtol, atol=0)
        c_ref, V = torch.tensor([alpha], dtype=DTYPE), delta[:, None]
    else:
        V = torch.stack([(s - mu * previous) / alpha, previous], dim=1)
        M = V.T @ (G + lam * torch.eye(len(g), dtype=DTYPE)) @ V
        b = V.T @ g
        c_ref = torch.tensor([alpha, mu], dtype=DTYPE)
        slope = b + M @ c_ref  # ∂q/∂(α, μ) at the step's (α, μ)
        scale = (b.abs() + (M.abs() @ c_ref.abs())).max()
        assert abs(slope[0]) <= rtol * scale, (slope, last)  # α minimizes for the chosen μ
        if MOMENTUM_RANGE[0] < mu < MOMENTUM_RANGE[1]:  # an interior μ: the plain 2x2 solution
            interior = True
            torch.testing.assert_close(c_ref, -torch.linalg.solve(M, b), rtol=10 * rtol, atol=0)
        else:  # μ on a bound: q must rise into the range
            assert slope[1] * (1 if mu == MOMENTUM_RANGE[0] else -1) >= -rtol * scale, (slope, last)

    def q(d):
        return float(g @ d + 0.5 * d @ G @ d + 0.5 * lam * d @ d)

    return interior, q(applied), q(s)


def step_against_the_ggn(c, model, params, loss, x, y):
    """One training step of the compiled `c` on (x, y): the gradient g and the dense GGN G at θ (of
    the batch's mean loss), the step s = θ' - θ, and the step's last_step."""
    LOSSES[loss](c(x), y).backward()
    theta0 = flat(p.detach() for p in params).clone()
    g = flat(p.grad for p in params)
    G = ggn_matrix(model, loss, x, y)
    c.step()
    c.zero_grad()
    return g, G, flat(p.detach() for p in params) - theta0, c.optimizer.last_step


@pytest.mark.parametrize("optimizer", ["kfac", "diag"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_alpha_and_mu_minimize_the_dense_ggn_quadratic(loss, optimizer):
    """STEPS steps on one batch: the first has no previous update (μ = 0, α alone), the others
    solve the 2x2 problem; each must be the minimizer of the dense quadratic on its batch."""
    model = tiny()
    c = gnfx.compile(model, optimizer=optimizer, loss=loss, step="quadratic", stat_every=1, **EXACT,
                     **({"inv_every": 1} if optimizer == "kfac" else {}))
    params = list(model.parameters())
    previous = None
    interior = 0
    for _ in range(STEPS):
        g, G, s, last = step_against_the_ggn(c, model, params, loss, *batch(loss))
        assert not last["rejected"], last
        inside, q, _ = assert_minimizer(g, G, last, s, previous)
        interior += inside
        assert last["predicted"] == pytest.approx(-q, rel=1e-9)
        previous = s
    if optimizer == "kfac":  # the 2x2 solve itself was exercised (diag's Adam proposal carries its own
        assert interior >= 1  # momentum, and its best μ here is the bound 0)



@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_the_loss_floor_cap_shortens_the_step_to_predict_the_batch_loss(loss, monkeypatch):
    """FLOOR_CAP = κ: a step s whose unshortened s_0 = s/τ minimizes the dense quadratic over its plane
    (as without the cap) and predicts more than κ·L(θ) is s_0 shortened to τ, the smallest positive
    root of -q(τ s_0) = κ·L(θ) (the eigenvalues of the dense polynomial's companion matrix), and predicts κ·L(θ); any
    other step is s_0 itself. The steps of this small model predict 4-18% of its loss: κ alternates
    between 0.03, which binds, and 0.5, which does not."""
    model = tiny()
    c = gnfx.compile(model, optimizer="kfac", loss=loss, stat_every=1, inv_every=1, **EXACT)
    params = list(model.parameters())
    previous, capped = None, 0
    for step in range(STEPS):
        kappa = (0.03, 0.5)[step % 2]
        monkeypatch.setattr(quadratic_step, "FLOOR_CAP", kappa)
        x, y = batch(loss)
        with torch.no_grad():
            bound = kappa * float(LOSSES[loss](model(x), y))
        g, G, s, last = step_against_the_ggn(c, model, params, loss, x, y)
        tau = last["floor_scale"]
        _, q_applied, q = assert_minimizer(g, G, last, s, previous)
        if -q > bound:
            s0 = s / tau
            curvature = float(s0 @ G @ s0) + last["damping"] * float(s0 @ s0)
            # the roots of ½ s0ᵀ(G + λI)s0 τ² + gᵀs0 τ + κL(θ): the eigenvalues of its companion matrix
            companion = torch.tensor([[-2 * float(g @ s0) / curvature, -2 * bound / curvature], [1.0, 0.0]],
                                     dtype=DTYPE)
            roots = torch.linalg.eigvals(companion)
            assert roots.imag.abs().max() == 0 and tau == pytest.approx(float(roots.real.min()), rel=1e-9)
            assert last["predicted"] == pytest.approx(bound, rel=1e-9) == -q_applied
            capped += 1
        else:
            assert tau == 1.0 and last["predicted"] == pytest.approx(-q, rel=1e-9)
        previous = s
    assert capped == STEPS // 2

def sequence_batch(loss, positions, n=8, out=3, seed=1):
    """batch() with `positions` rows of z per example: x (n, positions, 4), y (n, positions[, out])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, positions, 4, generator=g, dtype=DTYPE)
    y = (torch.randint(out, (n, positions), generator=g) if loss == "cross_entropy"
         else torch.randn(n, positions, out, generator=g, dtype=DTYPE))
    return x, y


def mean_loss(loss, z, y):
    """The mean-reduced loss over every row of z (the tokens of a sequence output)."""
    return F.cross_entropy(z.flatten(0, -2), y.flatten()) if loss == "cross_entropy" else F.mse_loss(z, y)


@pytest.mark.parametrize("positions, examples", [(None, 3), (2, 2)])  # R = 3 rows: 3 examples, or ⌈3/2⌉ of 2 rows
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_quadratic_rows_takes_the_ggn_of_the_first_rows(loss, positions, examples):
    """quadratic_rows=R: (α, μ) minimize q(d) = gᵀd + ½ dᵀ(G_S + λI)d with g the whole batch's
    gradient and G_S the dense GGN of the mean loss of the first R rows of z, rounded up to whole
    examples (an (N, T, C) output has T rows per example); the predicted reduction is -q(s) and
    the actual one the whole batch's L(θ) - L(θ+s)."""
    rows = 3
    model = tiny()
    # ω = 0.9: at the default 0.5 λ is 0.125 by the fourth step, where the model of 3 rows is too poor a
    # judge of the batch and the step is retried shorter (t·s is not the minimizer this test checks)
    c = gnfx.compile(model, optimizer="kfac", loss=loss, quadratic_rows=rows, stat_every=1, inv_every=1,
                     damping_decay=0.9, **EXACT)
    params = list(model.parameters())
    previous = None
    for _ in range(STEPS):
        x, y = batch(loss) if positions is None else sequence_batch(loss, positions)
        loss_before = mean_loss(loss, c(x), y)
        loss_before.backward()
        theta0 = flat(p.detach() for p in params).clone()
        g = flat(p.grad for p in params)
        G = ggn_matrix(model, loss, x[:examples], y[:examples])
        c.step()
        c.zero_grad()
        last = c.optimizer.last_step
        s = flat(p.detach() for p in params) - theta0
        assert not last["rejected"] and not last["backtracks"], last  # (s would not show α, μ)
        _, q, _ = assert_minimizer(g, G, last, s, previous)
        assert last["predicted"] == pytest.approx(-q, rel=1e-9)
        with torch.no_grad():
            actual = float(loss_before - mean_loss(loss, model(x), y))
        assert last["actual"] == pytest.approx(actual, rel=1e-9, abs=1e-15)
        previous = s


class Scale(nn.Module):
    """x ↦ x·exp(w), elementwise: w enters through a nonlinearity, no layer gnfx models, so w gets the
    diagonal preconditioner (a plain x·w is the `scale` kind's block)."""

    def __init__(self, n):
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(0.5, 1.5, n).log())

    def forward(self, x):
        return x * self.log_scale.exp()


def scaled(out=3):
    """tiny() with a Scale after the first layer: kfac on the Linear layers, the diagonal on w (P = 2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Tanh(), nn.Linear(6, out)).to(DTYPE)


@pytest.mark.parametrize("make", [tiny, scaled])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fixed_momentum_alpha_minimizes_the_dense_ggn_quadratic_along_the_velocity(loss, make, monkeypatch):
    """quadratic_momentum=μ̂: the update is s = Σ_k α_k v_k with v = Δ + μ̂ v_prev (v_k its part on
    preconditioner k's parameters; v_k = Δ_k where gᵀv_prev,k > 0) and the α_k the minimizer of
    q(d) = gᵀd + ½ dᵀ(G + λI)d over the span of the v_k (G dense); the predicted reduction is -q(s).
    Δ is the chain's proposal, recorded as the step runs it; at step 3 the carried velocity is
    negated, so that the restart is exercised."""
    momentum = 0.9
    model = make()
    with warnings.catch_warnings():  # scaled(): the coverage warning about w
        warnings.simplefilter("ignore")
        c = gnfx.compile(model, optimizer="kfac", loss=loss, quadratic_momentum=momentum, stat_every=1, inv_every=1,
                         **EXACT)
    params = list(model.parameters())
    diagonal = [n == "1.log_scale" for n, _ in model.named_parameters()]
    owners = torch.cat([torch.full((p.numel(),), d) for p, d in zip(params, diagonal)])
    masks = [m for m in (~owners, owners) if m.any()]
    assert len(c.optimizer.preconditioners) == len(masks)
    proposals, run = [], quadratic_step.QuadraticStep.step

    def recorded(self, chain, *args, **kwargs):
        def proposing():
            before = flat(p.detach() for p in params).clone()
            chain()
            proposals.append(flat(p.detach() for p in params) - before)
        return run(self, proposing, *args, **kwargs)

    monkeypatch.setattr(quadratic_step.QuadraticStep, "step", recorded)
    velocity, carried, restarted = None, 0, 0
    for step in range(STEPS):
        if step == 3:
            c.optimizer.quadratic.previous = [-v for v in c.optimizer.quadratic.previous]
            velocity = -velocity
        g, G, s, last = step_against_the_ggn(c, model, params, loss, *batch(loss, seed=step))
        assert not last["rejected"] and not last.get("backtracks"), last
        rows = [torch.where(m, proposals[-1], 0) for m in masks]
        if velocity is not None:
            for k, m in enumerate(masks):
                if g @ torch.where(m, velocity, 0) > 0:
                    restarted += 1
                else:
                    carried += 1
                    rows[k] = rows[k] + momentum * torch.where(m, velocity, 0)
        V = torch.stack(rows, dim=1)
        M = V.T @ (G + last["damping"] * torch.eye(len(g), dtype=DTYPE)) @ V
        b = V.T @ g
        c_ref = -torch.linalg.solve(M, b)
        torch.testing.assert_close(s, V @ c_ref, rtol=1e-8, atol=1e-10 * float(s.abs().max()))
        assert list(last["alphas"].values()) == pytest.approx(c_ref.tolist(), rel=1e-8)
        assert last["predicted"] == pytest.approx(-float(b @ c_ref + 0.5 * c_ref @ M @ c_ref), rel=1e-9)
        assert last["mu"] == (momentum if step else 0.0)
        velocity = V.sum(1)
    assert carried >= 1 and restarted >= 1


def test_minimize_quadratic_keeps_mu_in_range_and_caps_alpha():
    """The box-constrained minimizer against a dense grid search over μ (α minimized in closed form)."""
    M = torch.tensor([[2.0, 1.5], [1.5, 1.3]], dtype=DTYPE)
    for b in (torch.tensor([-1.0, 2.0], dtype=DTYPE), torch.tensor([-1.0, -3.0], dtype=DTYPE),
              torch.tensor([-1.0, 0.5], dtype=DTYPE)):
        for capped in (False, True):
            c, predicted = minimize_quadratic(M, b, capped)
            mu = torch.linspace(*MOMENTUM_RANGE, 20001, dtype=DTYPE)
            alpha = -(b[0] + M[0, 1] * mu) / M[0, 0]
            alpha = alpha.clamp(max=1.0) if capped else alpha
            v = torch.stack([alpha, mu], dim=1)
            best = float((v @ b + 0.5 * ((v @ M) * v).sum(1)).min())
            assert -predicted == pytest.approx(best, abs=1e-7)
            assert MOMENTUM_RANGE[0] <= c[1] <= MOMENTUM_RANGE[1] and (not capped or c[0] <= 1)


def test_minimize_quadratic_without_curvature_along_the_previous_update_takes_mu_zero():
    M = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=DTYPE)
    c, predicted = minimize_quadratic(M, torch.tensor([-1.0, 0.0], dtype=DTYPE))
    assert c.tolist() == [0.5, 0.0] and predicted == pytest.approx(0.25)


@pytest.mark.parametrize("optimizer, options", [("diag", {"step": "quadratic"}), ("kfac", {"weight_decay": 0.1})],
                         ids=["diag-quadratic", "kfac-weight-decay"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("scale", [1.0, HELD_OUT_MAX], ids=["kappa-1", "kappa-max"])
def test_a_batch_the_model_fits_to_rounding_takes_a_finite_step(loss, optimizer, options, scale, monkeypatch):
    """A float32 batch whose output gradient is exactly 0 (the softmax saturated at the labels: every other
    class's probability underflows; or outputs equal to the mse targets) under a proposal that is not 0 (Adam's
    first moment from the batches before, a weight decay): no row of z counts for cross-entropy (its rows are those
    the gradient reaches), so H_ℓ = 0 there, as it is at a one-hot softmax, and b = gᵀΔ = 0. The step is finite
    (the model along Δ is λ‖Δ‖² α²/2: α = 0) and the next batch, which the model does not fit, trains on.
    Before, the cross-entropy rows' weight 1/(rows counted) was 0/0: a NaN α and NaN parameters.
    So at a held-out step length κ > 1 (`scale`, held: the held-out rule patched out): κc = 0 is the model's
    minimizer, not a step past it, and is no overshot step to be retried shorter. It was: its actual reduction,
    0, rejected it, and the retry's interpolation through φ(0) = φ(t), φ'(0) = 0 divided by zero
    (ZeroDivisionError; diag:quadratic on a linear model of a teacher's separable labels,
    benchmarks/results/first_contact_20_fuzzwide.md)."""
    monkeypatch.setattr(quadratic_step, "held_out_scale", lambda kappa, longer, shorter: kappa)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    c = gnfx.compile(model, optimizer=optimizer, loss=loss, **options)
    x, y = (t.float() if t.is_floating_point() else t for t in batch(loss))
    for seed in range(3):
        train_step(c, x, y, loss, seed)
    c.optimizer.quadratic.held_out_scale = scale
    with torch.no_grad():
        if loss == "cross_entropy":
            model[2].weight.mul_(1e5)  # logit gaps of ~1e4: exp(-gap) is 0 in float32
            fitted = model(x).argmax(1)
        else:
            fitted = model(x)
    LOSSES[loss](c(x), fitted).backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())  # fitted to rounding
    c.step()
    c.zero_grad()
    last = c.optimizer.last_step
    assert last["solved"] and last["alpha"] == 0.0 and not last["rejected"], last  # a proposal, no step along it
    assert c.optimizer.quadratic.held_out_scale == scale
    assert all(torch.isfinite(p).all() for p in model.parameters())
    train_step(c, x, y, loss, 3)
    assert math.isfinite(c.optimizer.last_step["alpha"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_batch_whose_loss_rounds_to_zero_judges_no_step_and_keeps_the_damping():
    """A float32 batch whose loss is 0.0 while its gradient is not 0 (logit gaps of 21-1300: every row's
    log(1 + Σ exp(-gap)) rounds to log 1 = 0, while the softmax's gradient keeps exp(-21) ≈ 8e-10): the model
    predicts reductions of ~1e-14, the float loss cannot show them (actual 0 or -1e-13), so no adaptation is
    judged (`resolved` False, ρ NaN), λ and ν stay, and each step is taken, its loss having risen by less than
    the resolution. Before, every step was rejected and λ went 0.125, 0.25, 1, 8, 128 (ν doubling) in 4 steps
    (benchmarks/results/first_contact_19_defaultsfuzz.md, class 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    x, y = batch("cross_entropy")
    x = x.float()
    for seed in range(3):
        train_step(c, x, y, "cross_entropy", seed)
    with torch.no_grad():
        model[2].weight.mul_(1e3)
        fitted = model(x).argmax(1)
    damping, growth = c.optimizer.quadratic.damping, c.optimizer.quadratic.growth
    for seed in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        loss = F.cross_entropy(c(x), fitted)
        loss.backward()
        assert float(loss.detach()) == 0.0 and any(float(p.grad.abs().max()) > 0 for p in model.parameters())
        c.step()
        c.zero_grad()
        last = c.optimizer.last_step
        assert c.optimizer.quadratic.damping == damping and c.optimizer.quadratic.growth == growth, last
        assert not last["rejected"] and abs(last["actual"]) <= last["resolution"], last
        assert 0 < last["predicted"] < last["resolution"] and not last["resolved"] and math.isnan(last["rho"]), last
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the step was taken
        assert all(torch.isfinite(p).all() for p in model.parameters())


def fixed_batch_fit(steps: int):
    """A float32 MLP trained at the defaults (kfac) on one fixed batch of 8 random labels for `steps` steps (its
    loss reaches ~1e-6, where the float32 loss of 8 rows moves in steps of ε/8 ≈ 1.5e-8): (the model, its compiled
    model, each step's last_step, the next batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    g = torch.Generator().manual_seed(1)
    x, y, x2, y2 = torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g), \
        torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)
    trace = []
    for _ in range(steps):
        backward_and_step(c, F.cross_entropy(c(x), y))
        trace.append(c.optimizer.last_step)
    return model, c, trace, (x2, y2)


def losses_along(c, x, y, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        loss = F.cross_entropy(c(x), y)
        backward_and_step(c, loss)
        out.append(float(loss.detach()))
    return out


def test_a_batch_fitted_to_rounding_keeps_the_damping_and_the_next_batch_trains_at_the_fresh_pace():
    """Training on one fixed batch until its float32 loss no longer resolves the steps (~1e-6, predicted
    reductions of ~1e-9): λ stays at its floor instead of climbing, and a next batch (new labels) is then
    learned as fast as by a freshly compiled optimizer at the same parameters. Before, from step ~70 on the
    rounding rejected every adaptation and λ climbed to 6.9e5 by step 80; the proposal at that λ rounded away
    (no step at all from then on), and on the next batch the loss stayed at 6.60 for 30 steps (λ only halves once
    per adaptation) while the fresh optimizer took it to 5e-6."""
    model, c, trace, (x2, y2) = fixed_batch_fit(100)
    assert max(last["damping"] for last in trace[DAMPING_WARMUP:]) <= 1.0
    assert c.optimizer.quadratic.damping == LAMBDA_MIN
    assert sum(not last.get("resolved", True) for last in trace[-30:]) >= 3  # adaptations the loss cannot judge
    fresh = gnfx.compile(copy.deepcopy(model), optimizer="kfac", loss="cross_entropy")
    after, reference = losses_along(c, x2, y2, 30), losses_along(fresh, x2, y2, 30)
    assert reference[-1] < 1e-3 * reference[0]
    assert after[-1] < 1e-3 * after[0], after


def test_the_resolution_of_a_loss_difference_bounds_its_float32_rounding():
    """loss_resolution against float64: the float32 difference L(θ + t·d) - L(θ) (the recovered loss the step
    measures ρ with, at float32 parameters) differs from the float64 difference at the same float32 parameters
    by less than r = ε·(c + LOSS_ROUNDING·L(θ)) where the two losses are alike (each carries at most r/2 at its
    own level: the mean of the two r where they are not), for a cross-entropy model fitted to rounding (where the
    loss moves in steps of ε/rows), one not fitted, and mse; over directions d and lengths t from 1e-4 to 1."""
    eps = torch.finfo(torch.float32).eps
    fitted, *_ = fixed_batch_fit(60)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)  # fixed_batch_fit's batch
    cases = [("cross_entropy", fitted, x, y)]
    for loss in ("cross_entropy", "mse"):
        x, y = batch(loss, n=32)
        cases.append((loss, nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)), x.float(),
                      y.float() if loss == "mse" else y))
    for loss, model, x, y in cases:
        theta = [p.detach().clone() for p in model.parameters()]
        z = model(x)
        grad_z, = torch.autograd.grad(LOSSES[loss](z, y), z)
        measured = recovered_loss(loss, z.detach(), grad_z)
        twin = copy.deepcopy(model).double()
        level = float(measured(z.detach()))
        r = loss_resolution((OutputLoss(0, loss, 1.0),), level, eps)
        for k in range(4):
            d = [torch.randn(p.shape, generator=g) * p.abs().mean() for p in theta]
            for t in (1e-4, 1e-2, 1.0):
                with torch.no_grad():
                    for p, w, v in zip(model.parameters(), theta, d):
                        p.copy_(w + t * v)
                    for q, p, w in zip(twin.parameters(), model.parameters(), theta):
                        q.copy_(w.double())
                    at_theta = float(LOSSES[loss](twin(x.double()), y.double() if loss == "mse" else y))
                    for q, p in zip(twin.parameters(), model.parameters()):
                        q.copy_(p.double())
                    reference = at_theta - float(LOSSES[loss](twin(x.double()), y.double() if loss == "mse" else y))
                    after = float(measured(model(x)))
                # each loss carries half the resolution at its own level
                bound = 0.5 * (r + loss_resolution((OutputLoss(0, loss, 1.0),), after, eps))
                assert abs(level - after - reference) <= bound, (loss, k, t, level - after, reference, bound)
        with torch.no_grad():
            for p, w in zip(model.parameters(), theta):
                p.copy_(w)


def test_loss_resolution_rule():
    """r = ε·(Σ_k w_k c_k + LOSS_ROUNDING·|L|), c_k = 1 for cross-entropy and binary cross-entropy (a log of a
    sum ≥ 1, rounded at ε/2 a row at each end), 0 for mse."""
    eps = torch.finfo(torch.float32).eps
    rounding = quadratic_step.LOSS_ROUNDING
    ce, bce, mse = (OutputLoss(0, name, 1.0) for name in ("cross_entropy", "binary_cross_entropy", "mse"))
    assert loss_resolution((ce,), 0.0, eps) == eps
    assert loss_resolution((bce,), 2.0, eps) == eps * (1 + 2 * rounding)
    assert loss_resolution((mse,), 0.5, eps) == eps * 0.5 * rounding
    assert loss_resolution((mse,), 0.0, eps) == 0.0  # an mse fitted exactly resolves any reduction > 0
    weighted = (OutputLoss(0, "cross_entropy", 0.25), OutputLoss(1, "mse", 2.0))
    assert loss_resolution(weighted, 1.0, eps) == pytest.approx(eps * (0.25 + rounding))


@pytest.mark.parametrize("rises", [False, True])
def test_an_adaptation_below_the_resolution_is_not_judged_unless_its_loss_rises_past_it(rises, monkeypatch):
    """With the resolution r above the predicted reduction (r set to 10 here), an adaptation that falls due is
    not judged: the step is the one an honest twin takes, λ and ν stay, ρ is NaN and `resolved` False. A loss
    that rose by more than r (a closure adding 2r after the step) is a rejection as ever: the parameters back at
    θ after the retries, λ ← νλ."""
    x, y = batch("mse")
    twins = []
    for resolution in (0.0, 10.0):
        model = tiny()
        c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1)
        train_step(c, x, y, "mse", 0)
        monkeypatch.setattr(quadratic_step, "loss_resolution", lambda *args, r=resolution: r)
        calls = []

        def closure(c=c, calls=calls, lie=20.0 if rises and resolution else 0.0):
            loss = F.mse_loss(c(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            calls.append(float(loss.detach()))
            return loss if len(calls) == 1 else loss + lie

        theta = [p.detach().clone() for p in model.parameters()]
        damping, growth = c.optimizer.quadratic.damping, c.optimizer.quadratic.growth
        c.step(closure)
        c.zero_grad()
        twins.append((model, c, theta, damping, growth))
        monkeypatch.undo()
    (honest, judged, _, damping, _), (model, c, theta, damping_before, growth) = twins
    last = c.optimizer.last_step
    assert judged.optimizer.last_step["resolved"] and judged.optimizer.last_step["predicted"] < 10.0
    assert not last["resolved"] and math.isnan(last["rho"]) and not last["adapted"]
    if rises:
        assert last["rejected"] and c.optimizer.quadratic.damping == 2 * damping_before
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), theta))
    else:
        assert not last["rejected"] and c.optimizer.quadratic.damping == damping_before
        assert c.optimizer.quadratic.growth == growth
        for p, q in zip(model.parameters(), honest.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


# ----------------------------------------------------------------------------- damping


def test_levenberg_marquardt_rule():
    """Nielsen's form: an accepted step λ·max(ω, 1 - (2ρ - 1)³) and ν back to 2, a rejected one νλ
    with ν doubling; λ within [LAMBDA_MIN, LAMBDA_MAX]."""
    assert levenberg_marquardt(1.0, 1.2, 8.0, 0.5) == (0.5, 2.0)  # ρ ≥ ~0.9: λ falls by ω
    assert levenberg_marquardt(1.0, 0.75, 2.0, 0.5) == (1 - 0.5 ** 3, 2.0)  # 1 - (2ρ-1)³ = 0.875
    assert levenberg_marquardt(1.0, 0.5, 2.0, 0.5) == (1.0, 2.0)  # the factor is 1 at ρ = 1/2
    assert levenberg_marquardt(1.0, 0.25, 2.0, 0.5) == (1 + 0.5 ** 3, 2.0)  # and rises below it
    assert levenberg_marquardt(1.0, -3.0, 2.0, 0.5) == (2.0, 4.0)  # rejected: ν, then ν doubles
    assert levenberg_marquardt(2.0, 0.0, 4.0, 0.5) == (8.0, 8.0)
    assert levenberg_marquardt(1.0, math.nan, 2.0, 0.5) == (2.0, 4.0)  # a non-finite ρ counts as rejected
    assert levenberg_marquardt(LAMBDA_MIN, 1.0, 2.0, 0.5) == (LAMBDA_MIN, 2.0)
    assert levenberg_marquardt(LAMBDA_MAX, 0.0, 2.0, 0.5) == (LAMBDA_MAX, 4.0)


def test_held_out_scale_rule():
    """κ ← eκ when the last step taken twice as far lowers the batch's loss at least as much as taken half
    as far, κ ← κ/e when half lowers it more, else κ; within [1, HELD_OUT_MAX]."""
    e = HELD_OUT_FACTOR
    assert held_out_scale(1.0, 0.2, 0.1) == e  # twice is best
    assert held_out_scale(4.0, 0.1, 0.1) == 4.0 * e  # a tie goes to the longer step
    assert held_out_scale(4.0, 0.1, 0.3) == 4.0 / e  # half is best
    assert held_out_scale(4.0, -0.1, -0.2) == 4.0  # neither lowers the loss: κ stays
    assert held_out_scale(1.0, -0.1, 0.1) == 1.0  # never shorter than the model's step
    assert held_out_scale(HELD_OUT_MAX, 0.2, 0.1) == HELD_OUT_MAX
    assert held_out_scale(4.0, math.nan, 0.1) == 4.0 / e  # a non-finite loss is no reduction
    assert held_out_scale(4.0, 0.1, math.nan) == 4.0 * e
    assert held_out_scale(4.0, math.inf, math.nan) == 4.0


def test_after_a_misjudged_adaptation_the_step_is_scaled_by_its_held_out_test():
    """After an adaptation with ρ < RHO_LOW (`misjudged`), the next step tests the last update δ on its own
    batch, which δ was not fitted on: with L(θ + δ) and L(θ - δ/2) from plain forwards here, κ follows
    the rule and the step applied is κ times the model's, the step of a twin that was not misjudged
    (same θ, δ, λ and batch)."""
    a = gnfx.compile(tiny(), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1)
    for seed in range(2):
        train_step(a, *batch("cross_entropy", seed=seed), "cross_entropy", seed)
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    a.optimizer.quadratic.misjudged = True
    x, y = batch("cross_entropy", seed=2)
    theta = [p.detach().clone() for p in a.parameters()]
    delta = [d.clone() for d in a.optimizer.quadratic.previous]
    model = copy.deepcopy(a._model)

    def loss_at(t):
        with torch.no_grad():
            for p, w, d in zip(model.parameters(), theta, delta):
                p.copy_(w + t * d)
            return float(F.cross_entropy(model(x), y))

    longer, shorter = loss_at(0) - loss_at(1), loss_at(0) - loss_at(-0.5)
    assert longer > 0 and longer >= shorter  # this batch prefers the last step twice as long: κ = e
    for c in (a, b):
        train_step(c, x, y, "cross_entropy", 2)
    assert a.optimizer.last_step["held_out_scale"] == HELD_OUT_FACTOR
    assert b.optimizer.last_step["held_out_scale"] == 1.0 and not a.optimizer.last_step["rejected"]
    for p, q, w in zip(a.parameters(), b.parameters(), theta):
        torch.testing.assert_close(p - w, HELD_OUT_FACTOR * (q - w), rtol=1e-10, atol=1e-14)


def test_the_held_out_test_with_a_closure_equals_the_one_without():
    """With step(closure) the held-out losses L(θ + δ) and L(θ - δ/2) are the closure's: the same κ and
    step as from the loss recovered from the output gradient."""
    a = gnfx.compile(tiny(), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1)
    for seed in range(2):
        train_step(a, *batch("cross_entropy", seed=seed), "cross_entropy", seed)
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    for c in (a, b):
        c.optimizer.quadratic.misjudged = True
    x, y = batch("cross_entropy", seed=2)
    train_step(a, x, y, "cross_entropy", 2)

    def closure():
        if torch.is_grad_enabled():
            b.zero_grad()
        loss = F.cross_entropy(b(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss
    torch.manual_seed(2)
    b.step(closure)
    assert a.optimizer.last_step["held_out_scale"] == b.optimizer.last_step["held_out_scale"] == HELD_OUT_FACTOR
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("falls", [False, True])
def test_a_step_the_held_out_scale_took_past_the_minimizer_is_taken_only_if_its_batch_loss_falls(falls, monkeypatch):
    """κ = HELD_OUT_MAX (held there: the held-out rule is patched out) makes the step κc, far past the model's
    minimizer c, -q(κc) < 0: no ρ, but the loss of its batch is measured at θ + κc. Honestly (it rose, on mse
    along 64 times the minimizer), the step is retried shorter on its batch, the loss falls and κ ← κ/e; a
    closure reporting a fall there (`falls`) has the step taken whole, 64 times an unscaled twin's, κ kept."""
    monkeypatch.setattr(quadratic_step, "held_out_scale", lambda scale, longer, shorter: scale)
    x, y = batch("mse")
    twins = []
    for scale in (HELD_OUT_MAX, 1.0):
        model = tiny()
        c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1)
        F.mse_loss(c(x), y).backward()
        c.step()  # a first, accepted step: a previous update exists
        c.zero_grad()
        c.optimizer.quadratic.held_out_scale = scale
        theta = [p.detach().clone() for p in model.parameters()]
        calls = []

        def closure(c=c, calls=calls, scale=scale):
            loss = F.mse_loss(c(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            calls.append(float(loss.detach()))
            held_out = 2 if scale != 1.0 else 0  # the closure's calls at θ + δ and θ - δ/2 come first
            return torch.full_like(loss, calls[0] - 1.0) if falls and len(calls) == 2 + held_out else loss
        c.step(closure)
        twins.append((model, c, theta, calls))
    (model, c, theta, calls), (twin, _, twin_theta, _) = twins
    last = c.optimizer.last_step
    assert last["predicted"] < 0 or last["backtracks"] > 0
    with torch.no_grad():
        after = float(F.mse_loss(model(x), y))
    if not falls:
        assert calls[3] > calls[0]  # the loss at θ + κc rose: the step was retried shorter
        assert not last["rejected"] and last["backtracks"] >= 1 and after < calls[0]
        assert c.optimizer.quadratic.held_out_scale == HELD_OUT_MAX / HELD_OUT_FACTOR
    else:
        assert not last["rejected"] and last["backtracks"] == 0
        assert c.optimizer.quadratic.held_out_scale == HELD_OUT_MAX
        for p, w, q, v in zip(model.parameters(), theta, twin.parameters(), twin_theta):
            torch.testing.assert_close(p - w, HELD_OUT_MAX * (q - v), rtol=1e-8, atol=1e-12)


def test_checkpoint_carries_the_held_out_scale():
    a = gnfx.compile(tiny(), optimizer="kfac", loss="cross_entropy", stat_every=1)
    train_step(a, *batch("cross_entropy"), "cross_entropy", 0)
    a.optimizer.quadratic.held_out_scale, a.optimizer.quadratic.misjudged = 8.0, True
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="cross_entropy", stat_every=1)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    assert (b.optimizer.quadratic.held_out_scale, b.optimizer.quadratic.misjudged) == (8.0, True)


@pytest.mark.parametrize("loss, shape", [("cross_entropy", (8,)), ("cross_entropy", (2, 4)), ("mse", (8,)),
                                         ("binary_cross_entropy", (8,))],
                         ids=["ce", "ce-tokens-ignored", "mse", "bce"])
def test_recovered_loss_is_the_loss(loss, shape):
    """The loss rebuilt from z0 and ∂L/∂z0 equals the real loss at any output z (ignored targets too)."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(*shape, 5, generator=g, dtype=DTYPE, requires_grad=True)
    if loss == "mse":
        y = torch.randn(*shape, 5, generator=g, dtype=DTYPE)
        fn = F.mse_loss
    elif loss == "binary_cross_entropy":  # soft targets, and hard ones at 0 and 1
        y = torch.rand(*shape, 5, generator=g, dtype=DTYPE)
        y.view(-1)[:2] = torch.tensor([0.0, 1.0])
        fn = F.binary_cross_entropy_with_logits
    else:
        y = torch.randint(5, shape, generator=g)
        y.view(-1)[1] = -100
        fn = lambda z, t: F.cross_entropy(z.reshape(-1, 5), t.reshape(-1))  # noqa: E731
    (grad,) = torch.autograd.grad(fn(z0, y), z0)
    rebuilt = recovered_loss(loss, z0.detach(), grad)
    z1 = torch.randn(*shape, 5, generator=g, dtype=DTYPE) * 3
    for z in (z0.detach(), z1):
        torch.testing.assert_close(rebuilt(z), fn(z, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_step_with_a_closure_equals_the_step_without(loss):
    """A closure measures L(θ+s) directly; without one it is recovered from the output gradient:
    the same ρ, λ and parameters, step after step."""
    x, y = batch(loss)
    a, b = tiny(), tiny()
    ca, cb = (gnfx.compile(m, optimizer="kfac", loss=loss, stat_every=1, inv_every=1) for m in (a, b))

    def closure():
        out = LOSSES[loss](cb(x), y)
        if torch.is_grad_enabled():
            out.backward()
        return out

    for i in range(4):
        torch.manual_seed(i)  # the same sampled labels of fisher="mc" (the default here) in both backwards
        LOSSES[loss](ca(x), y).backward()
        ca.step()
        ca.zero_grad()
        torch.manual_seed(i)
        cb.step(closure)
        cb.zero_grad()
        la, lb = ca.optimizer.last_step, cb.optimizer.last_step
        for key in ("alpha", "mu", "damping", "predicted", "rho", "actual"):
            assert la[key] == pytest.approx(lb[key], rel=1e-8, abs=1e-14), key
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_alpha_and_mu_minimize_the_dense_ggn_quadratic_through_batch_norm_in_training_mode():
    """The products run the model in training mode, whose batch norm updates its running statistics
    in place: on copies (torch.func refuses to write a captured buffer), so only the training
    forward moves them, and the step still minimizes the dense quadratic of the train-mode function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1, **EXACT)
    params, previous = list(model.parameters()), None
    for _ in range(3):
        g, G, s, last = step_against_the_ggn(c, model, params, "cross_entropy", *batch("cross_entropy"))
        assert not last["rejected"], last
        assert_minimizer(g, G, last, s, previous)
        previous = s
    assert model[1].num_batches_tracked == 3  # the three training forwards only


@dataclasses.dataclass
class Output:  # a Hugging Face-style output: a dataclass torch's pytree does not know, the loss first
    loss: torch.Tensor | None
    logits: torch.Tensor


class DataclassOutput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return Output(loss=None, logits=self.inner(x))


def test_a_dataclass_output_steps_as_its_logits():
    """z is the output's first floating tensor wherever the forward returns it (gnfx.outputs): the
    steps of a model returning Output(loss=None, logits=z) are those of the one returning z."""
    x, y = batch("cross_entropy")
    plain, wrapped = tiny(), DataclassOutput(tiny())
    cp, cw = (gnfx.compile(m, optimizer="kfac", loss="cross_entropy", fisher="empirical", **EXACT)
              for m in (plain, wrapped))
    for _ in range(3):
        for c, logits in ((cp, lambda out: out), (cw, lambda out: out.logits)):
            F.cross_entropy(logits(c(x)), y).backward()
            c.step()
            c.zero_grad()
        assert cw.optimizer.last_step["alpha"] == pytest.approx(cp.optimizer.last_step["alpha"], rel=1e-10)
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.head = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_an_lstm_steps_on_kernels_forward_mode_differentiates():
    """oneDNN's LSTM kernel (a CPU's, float32) has no forward-mode derivative: the products fall back to
    ATen's own kernel, and the steps are those of a model trained on ATen's kernels throughout."""
    x = batch("cross_entropy")[0].float()[:, None].expand(-1, 3, -1)
    y = batch("cross_entropy")[1]
    fused, native = Recurrent(), Recurrent()
    compiled = [gnfx.compile(m, optimizer="kfac", loss="cross_entropy", fisher="empirical", **EXACT)
                for m in (fused, native)]
    for _ in range(2):
        for c, onednn in zip(compiled, (True, False)):
            with torch.backends.mkldnn.flags(enabled=onednn):
                F.cross_entropy(c(x), y).backward()
                c.step()
            c.zero_grad()
    assert compiled[0].optimizer.quadratic._native_recurrent
    for p, q in zip(fused.parameters(), native.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float32: the two kernels round differently


class TokensToImageGroupNorm(nn.Module):
    """diffusers' attention block hands its tokens (N, HW, C) back as an image by
    `transpose(1, 2).reshape(N, C, H, W)`, a non-contiguous view, which the next ResNet block's GroupNorm
    normalizes; `contiguous`: the same model with a contiguous copy there."""

    def __init__(self, contiguous: bool):
        super().__init__()
        torch.manual_seed(0)
        self.contiguous = contiguous
        self.proj, self.norm, self.head = nn.Linear(1, 4), nn.GroupNorm(2, 4), nn.Linear(16, 3)
        self.to(DTYPE)

    def forward(self, x):
        image = self.proj(x[..., None]).transpose(1, 2).reshape(x.shape[0], 4, 2, 2)
        return self.head(torch.tanh(self.norm(image.contiguous() if self.contiguous else image)).flatten(1))


def test_group_norm_of_a_non_contiguous_input_steps_as_of_a_contiguous_one():
    """torch's forward-mode formula of group_norm fails on a non-contiguous input (a view error): before,
    the quadratic step raised a GnfxError on diffusers' UNet2DModel with attention blocks and on
    AutoencoderKL; now its products take the input as a contiguous copy, and the steps are the contiguous
    twin's."""
    x, y = batch("cross_entropy")
    viewed, copied = TokensToImageGroupNorm(contiguous=False), TokensToImageGroupNorm(contiguous=True)
    compiled = [gnfx.compile(m, optimizer="kfac", loss="cross_entropy", **EXACT) for m in (viewed, copied)]
    for step in range(3):
        for c in compiled:
            torch.manual_seed(step)  # the same labels sampled for fisher="mc"
            F.cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
        assert not compiled[0].optimizer.last_step["rejected"]
    for p, q in zip(viewed.parameters(), copied.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


FRESH_PROCESS = """
import sys, torch, torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
import gnfx
from gnfx.forward_mode import DECOMPOSITIONS, ModuleFunction, jvp_rows


class SoftmaxJacobian(nn.Module):
    # h -> (diag(p) - p p^T) h, p = softmax(h) row by row, by ATen's _softmax_backward_data: its
    # forward-mode derivative is PyTorch's decomposition (gnfx.forward_mode)
    def forward(self, h):
        return torch.ops.aten._softmax_backward_data(h, torch.softmax(h, -1), -1, h.dtype)


def trained(model):
    c = gnfx.compile(model, optimizer="kfac", loss="mse", quadratic_products="forward")
    for _ in range(3):
        F.mse_loss(c(x), y).backward()
        assert c.optimizer.steps or DECOMPOSITIONS not in sys.modules  # not by the capture, forward, backward
        c.step()
        c.zero_grad()
    assert c.optimizer.last_step["solved"]
    return c.optimizer.quadratic


torch.manual_seed(0)
x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
trained(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
assert DECOMPOSITIONS not in sys.modules, "loaded on the common path"
model = nn.Sequential(nn.Linear(4, 6), SoftmaxJacobian(), nn.Linear(6, 3)).double()
assert not trained(model)._native_recurrent  # the decompositions, not ATen's recurrent kernels, did it
assert DECOMPOSITIONS in sys.modules
names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
v = [torch.randn_like(p) for p in params]
_, products = jvp_rows(lambda theta: ModuleFunction(model, names)(theta, x), params, [v])
reference = jvp(lambda *theta: functional_call(model, dict(zip(names, theta)), (x,)), params, tuple(v))[1]
torch.testing.assert_close(products[0], reference, rtol=1e-12, atol=1e-14)
"""


def test_forward_mode_decompositions_load_only_for_a_model_that_needs_one():
    """PyTorch's forward-mode decompositions (~0.2 s at their first use in a process) are not loaded by
    the products of a model whose operations all have forward-mode formulas; an operation that has
    only a decomposition fails once, loads them, and the products run again and equal torch.func's jvp.
    A fresh process: this one may have loaded them (torch.func.jvp does)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gnfx.__file__)))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=root, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_operation_without_a_forward_mode_derivative_raises_with_the_fix():
    """F.grid_sample has no jvp: the quadratic step cannot model the loss, and says so, naming lr=."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), GridSampled(), nn.Linear(4, 3))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(c(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gnfx.GnfxError, match=r"(?s)forward-mode derivatives.*grid_sampler_2d.*Fix: pass lr=.*"
                                              r"quadratic_products='difference'"):
        c.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing applied


# ----------------------------------------------------------------------------- quadratic_products="difference"


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 1e-2)])
def test_finite_difference_products_are_the_forward_mode_products_to_half_the_digits(dtype, rtol):
    """gnfx.finite_differences.difference_rows against torch.func's jvp through the model: the same z, each
    J v to about √ε (module docstring), a zero tangent's exactly zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(8, 4, dtype=dtype)
    names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    rows = [[torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params]]
    z, products, _ = difference_rows(lambda theta: ModuleFunction(model, names)(theta, x), params, rows)
    z_ref, reference = jvp(lambda *theta: functional_call(model, dict(zip(names, theta)), (x,)), params,
                           tuple(rows[0]))
    assert torch.equal(z, z_ref.detach())
    assert float((products[0] - reference).norm() / reference.norm()) < rtol
    assert torch.equal(products[1], torch.zeros_like(z))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_alpha_and_mu_from_finite_differences_minimize_the_dense_ggn_quadratic_to_their_precision(loss):
    """quadratic_products="difference" in float64: every step minimizes the dense quadratic of its batch as
    the forward-mode step does (test_alpha_and_mu_minimize_the_dense_ggn_quadratic), to 1e-6 rather than 1e-9."""
    model = tiny()
    c = gnfx.compile(model, optimizer="kfac", loss=loss, stat_every=1, inv_every=1, quadratic_products="difference")
    params = list(model.parameters())
    previous, interior = None, 0
    for _ in range(STEPS):
        g, G, s, last = step_against_the_ggn(c, model, params, loss, *batch(loss))
        assert not last["rejected"], last
        inside, q, _ = assert_minimizer(g, G, last, s, previous, rtol=1e-6)
        interior += inside
        assert last["predicted"] == pytest.approx(-q, rel=1e-6)
        previous = s
    assert interior >= 1


class ReplayScaled(nn.Module):
    """A tanh MLP that scales its logits when gradients are off if `replay_scale` is set: a forward whose replay
    (under no_grad) is not the training forward."""

    def __init__(self, replay_scale=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.replay_scale = replay_scale

    def forward(self, x):
        z = self.net(x)
        return z if self.replay_scale is None or torch.is_grad_enabled() else z * self.replay_scale


def trajectory_of_differences(model, monkeypatch, reuse: bool, in_place: bool = False):
    """Four steps of kfac's quadratic step by finite differences (float64): the parameters after each, and the
    replays of f the differences ran. Without `reuse` f(θ) is always replayed. With `in_place` the loop halves the
    logits in place before its loss from the third step on (which the backward then differentiates)."""
    if not reuse:
        monkeypatch.setattr(quadratic_step.QuadraticStep, "_trained_outputs", lambda self: None)
    replays = []

    def counted(f, *args, **kwargs):
        return difference_rows(lambda theta: replays.append(1) or f(theta), *args, **kwargs)
    monkeypatch.setattr(quadratic_step, "difference_rows", counted)
    c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=2, inv_every=2, quadratic_products="difference",
                     fisher="empirical")
    trajectory = []
    for step in range(4):
        x, y = batch("mse", seed=step)
        z = c(x)
        if in_place and step >= 2:  # once each kind of forward has been checked
            z.mul_(0.5)
        F.mse_loss(z, y).backward()
        c.step()
        c.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    monkeypatch.undo()
    return trajectory, len(replays)


@pytest.mark.parametrize("case", ["plain", "in_place", "replay_differs"])
def test_finite_differences_take_the_training_forwards_z_only_where_it_is_the_replays(case, monkeypatch):
    """f(θ) of the differences is the training forward's z where the replay computes it bit for bit (checked on
    the first step of each kind of forward: one forward fewer on every other step), and is replayed where the loop
    wrote the logits in place (their version counter) or the replay computes another z: the steps are those of
    differences that always replay f(θ), bit for bit."""
    def model():
        torch.manual_seed(0)
        return ReplayScaled(replay_scale=2.0 if case == "replay_differs" else None).to(DTYPE)
    reused, calls = trajectory_of_differences(model(), monkeypatch, reuse=True, in_place=case == "in_place")
    replayed, replayed_calls = trajectory_of_differences(model(), monkeypatch, reuse=False,
                                                         in_place=case == "in_place")
    for a, b in zip(reused, replayed):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    # the two steps after the first of each kind (a statistic step's graph, the model's own forward) save one each
    assert replayed_calls - calls == (2 if case == "plain" else 0)


class Tabled(nn.Module):
    """A small tanh network beside a large embedding table (an LLM's vocabulary): ‖θ‖ is the table's, ~570."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5000, 64)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.out = nn.Linear(64, 3)

    def forward(self, x, ids):
        return self.net(x) + self.out(self.table(ids))


def test_a_difference_quotient_moves_the_outputs_by_about_root_eps_of_themselves():
    """A tangent on the small network's first layer: the step of norm √ε(1 + ‖θ‖) would move that layer's
    pre-activations far into the tanh's curvature (4% off forward mode in float32); the quotient is retaken at the
    step that moves z by √ε‖z‖, and its gain γ = ‖J v‖/‖v‖ sets the next call's step at once (no retake), both to
    ~1e-3 of the float64 forward-mode product."""
    torch.manual_seed(0)
    model = Tabled()
    x, ids = torch.randn(32, 8), torch.randint(0, 5000, (32,))
    names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    v = [torch.randn_like(p) if n == "net.0.weight" else torch.zeros_like(p) for n, p in zip(names, params)]
    model64 = copy.deepcopy(model).double()
    _, reference = jvp(lambda *theta: functional_call(model64, dict(zip(names, theta)), (x.double(), ids)),
                       tuple(p.double() for p in params), tuple(t.double() for t in v))
    forwards = []

    def f(theta):
        forwards.append(1)
        return ModuleFunction(model, names)(theta, x, ids)
    z, products, gains = difference_rows(f, params, [v])
    assert len(forwards) == 3  # z, the quotient, and the quotient retaken
    assert float((products[0].double() - reference).norm() / reference.norm()) < 5e-3
    length = math.sqrt(sum(float(t.double().norm()) ** 2 for t in v))
    assert gains[0] == pytest.approx(float(reference.norm()) / length, rel=5e-3)
    forwards.clear()
    _, products, _ = difference_rows(f, params, [v], z, gains)
    assert len(forwards) == 1
    assert float((products[0].double() - reference).norm() / reference.norm()) < 5e-3


def test_a_tangent_too_small_for_a_step_in_its_dtype_has_a_zero_product():
    """A float32 tangent of norm ~1e-42 (subnormal: the previous update after a step of α ~ 1e-40 on a batch
    fitted almost to rounding) gets the step h = √ε(1 + ‖θ‖)/‖v‖ > 3.4e38, no float32: h·v was inf·v, NaN
    where v is 0, a NaN product, α and parameters (diag:quadratic, benchmarks/results/first_contact_20_fuzzwide.md).
    Its product is 0 and its gain unknown, as a zero tangent's; the normal tangent beside it is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters()])
    normal = [torch.randn_like(p) for p in params]
    tiny_row = [torch.where(torch.rand_like(p) < 0.5, 1e-43, 0.0) for p in params]  # subnormal, zeros among them
    f = lambda theta: ModuleFunction(model, names)(theta, x)  # noqa: E731
    _, alone, alone_gains = difference_rows(f, params, [normal])
    _, products, gains = difference_rows(f, params, [tiny_row, normal])
    assert torch.equal(products[0], torch.zeros_like(products[0])) and gains[0] is None
    assert torch.equal(products[1], alone[0]) and gains[1] == alone_gains[0]


def test_finite_differences_refuse_sixteen_bit_outputs():
    """A bfloat16 model's outputs keep ~3 digits, a difference quotient none: the step raises, naming the fix,
    and moves nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.bfloat16)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", quadratic_products="difference")
    x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
    F.cross_entropy(c(x).float(), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gnfx.GnfxError, match=r"(?s)torch.bfloat16.*Fix: quadratic_products='forward'"):
        c.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_an_operation_without_a_forward_mode_derivative_steps_with_finite_differences():
    """F.grid_sample, which forward mode cannot take (the test above), steps with quadratic_products="difference",
    and its α minimizes the dense quadratic on its batch (float64, to 1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), GridSampled(), nn.Linear(4, 3)).to(DTYPE)
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1,
                     quadratic_products="difference")
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=generator, dtype=DTYPE), torch.randint(0, 3, (8,), generator=generator)
    names, params = zip(*model.named_parameters())
    # the dense GGN by reverse mode (grid_sample has a backward): J of the logits, H of the mean cross-entropy
    J = torch.cat([j.reshape(8 * 3, -1) for j in torch.func.jacrev(
        lambda *theta: functional_call(model, dict(zip(names, theta)), (x,)), argnums=tuple(range(len(params))))(
        *[p.detach() for p in params])], 1)
    p = torch.softmax(model(x).detach(), -1)
    G = J.T @ torch.block_diag(*[(torch.diag(r) - torch.outer(r, r)) / 8 for r in p]) @ J
    F.cross_entropy(c(x), y).backward()
    theta0 = flat(q.detach() for q in params).clone()
    g = flat(q.grad for q in params)
    c.step()
    last = c.optimizer.last_step
    assert not last["rejected"] and last["alpha"] > 0, last
    assert_minimizer(g, G, last, flat(q.detach() for q in params) - theta0, None, rtol=1e-6)


def test_a_step_that_raises_the_loss_is_undone():
    """A closure reporting a higher loss after the step: the parameters are restored, the momentum
    dropped and λ raised by ν = 2, the first rejection's factor."""
    x, y = batch("mse")
    model = tiny()
    c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1)
    F.mse_loss(c(x), y).backward()
    c.step()  # a first, accepted step: a previous update exists
    c.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def lying_closure():
        loss = F.mse_loss(c(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        calls.append(float(loss))
        return loss if len(calls) == 1 else loss + 10.0

    damping = c.optimizer.quadratic.damping
    c.step(lying_closure)
    last = c.optimizer.last_step
    assert last["rejected"] and last["rho"] < 0 and last["damping"] == damping
    assert c.optimizer.quadratic.damping == pytest.approx(2 * damping)
    assert c.optimizer.quadratic.previous is None
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_a_rejected_step_is_retried_shorter_on_its_batch():
    """A closure that reports a higher loss at θ + s only: the step is retried on the same batch at
    θ + t·s, t the minimizer of the quadratic through L(θ), gᵀs and the reported L(θ + s), within
    [1/10, 1/2]; accepted there, with λ raised to the damping whose model has t·s as its minimizer
    along s, sᵀ(G + λ'I)s = -gᵀs/t (G the dense GGN of the batch). s is the step an honest twin takes."""
    x, y = batch("mse")
    twins = []
    for lie in (0.0, 0.5):
        model = tiny()
        c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1)
        F.mse_loss(c(x), y).backward()
        c.step()  # a first, accepted step: a previous update exists
        c.zero_grad()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        calls = []

        def closure(c=c, lie=lie, calls=calls):
            loss = F.mse_loss(c(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            calls.append(float(loss.detach()))
            return loss + lie if len(calls) == 2 else loss

        damping = c.optimizer.quadratic.damping
        c.step(closure)
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        twins.append((model, c, calls, damping, g, moved, before))
    (_, honest, _, _, _, s, _), (model, lying, calls, damping, g, moved, before) = twins
    assert not honest.optimizer.last_step["rejected"] and honest.optimizer.last_step["backtracks"] == 0
    last = lying.optimizer.last_step
    assert not last["rejected"] and last["backtracks"] == 1 and last["rho"] > 0 and len(calls) == 3
    slope, rise = float(g @ s), calls[1] + 0.5 - calls[0]
    t = min(max(-slope / (2 * (rise - slope)), 0.1), 0.5)
    torch.testing.assert_close(moved, t * s, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for p, v in zip(model.parameters(), before.split([p.numel() for p in model.parameters()])):
            p.copy_(v.view_as(p))
    G = ggn_matrix(model, "mse", x, y)
    curvature = float(s @ G @ s) + damping * float(s @ s)
    assert lying.optimizer.quadratic.damping == pytest.approx(damping + (-slope / t - curvature) / float(s @ s),
                                                              rel=1e-6)


def test_step_quadratic_needs_the_loss():
    with pytest.raises(gnfx.ConfigError, match="loss="):
        gnfx.compile(tiny(), optimizer="kfac", step="quadratic")


def test_defaults_choose_the_step():
    """kfac and ekfac with loss= and no lr: the quadratic step; an lr or no loss: the fixed-lr step;
    rank1 and shampoo: the fixed-lr step unless asked (benchmarks/results/defaults.md), rank1 with the
    true Fisher (fisher="mc") whenever loss= is given."""
    assert gnfx.compile(tiny(), optimizer="kfac", loss="mse").optimizer.quadratic is not None
    assert gnfx.compile(tiny(), optimizer="ekfac", loss="mse").optimizer.quadratic is not None
    rank1 = gnfx.compile(tiny(), optimizer="rank1", loss="mse")
    assert rank1.optimizer.quadratic is None and rank1.optimizer.statistics.fisher == "mc"
    assert gnfx.compile(tiny(), optimizer="rank1").optimizer.statistics.fisher == "empirical"
    with pytest.raises(gnfx.ConfigError, match="fisher='mc'"):  # its sketch takes one sampled vector
        gnfx.compile(tiny(), optimizer="rank1", loss="mse", fisher="type2")
    assert gnfx.compile(tiny(), optimizer="kfac", loss="mse", lr=1e-2).optimizer.quadratic is None
    assert gnfx.compile(tiny(), optimizer="kfac").optimizer.quadratic is None
    assert gnfx.compile(tiny(), optimizer="shampoo", loss="mse").optimizer.quadratic is None


def test_a_given_lr_caps_alpha():
    x, y = batch("mse")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", step="quadratic", lr=1e-3, stat_every=1)
    for _ in range(3):
        F.mse_loss(c(x), y).backward()
        c.step()
        c.zero_grad()
        assert c.optimizer.last_step["alpha"] <= 1.0


def test_checkpoint_carries_the_damping_and_the_previous_update():
    x, y = batch("mse")
    a = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1)
    for _ in range(2):
        F.mse_loss(a(x), y).backward()
        a.step()
        a.zero_grad()
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="mse", stat_every=1)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    assert b.optimizer.quadratic.damping == a.optimizer.quadratic.damping
    for p, q in zip(b.optimizer.quadratic.previous, a.optimizer.quadratic.previous):
        assert torch.equal(p, q)


def test_a_checkpoint_is_not_changed_by_later_steps():
    """δ lives in a buffer that the next step overwrites (FlatLayout): state_dict() holds a copy."""
    x, y = batch("mse")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1)
    for seed in range(3):
        train_step(c, x, y, "mse", seed)
        if seed == 1:
            state = c.optimizer.state_dict()
            previous = [t.clone() for t in state["gnfx"]["quadratic"]["previous"]]
    assert c.optimizer.quadratic._flat_layout.buffered
    assert all(torch.equal(p, q) for p, q in zip(state["gnfx"]["quadratic"]["previous"], previous))
    assert not all(torch.equal(p, q) for p, q in zip(c.optimizer.quadratic.previous, previous))


def test_a_step_of_one_part_makes_no_per_element_owners():
    """FlatLayout.owner, an int64 per parameter element, is made only where a row of V is split by owner."""
    x, y = batch("mse")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1)
    for seed in range(2):
        train_step(c, x, y, "mse", seed)
    layout = c.optimizer.quadratic._flat_layout
    assert layout.owns_all == [True] and "owner" not in vars(layout)


@pytest.mark.parametrize("hp", [{}, {"quadratic_momentum": 0.9}])
def test_the_buffers_of_the_step_change_no_step(hp, monkeypatch):
    """With its flat vectors in buffers kept between steps (FlatLayout.kept, small models) the
    step equals, bit for bit, the step whose buffers are its own (BUFFERED_NUMEL = 0, a large model's),
    with two parts (kfac and the diagonal) and the adaptive μ or a fixed μ̂."""
    runs = []
    for numel in (flat_layout.BUFFERED_NUMEL, 0):
        monkeypatch.setattr(flat_layout, "BUFFERED_NUMEL", numel)
        with warnings.catch_warnings():  # scaled(): the coverage warning about w
            warnings.simplefilter("ignore")
            c = gnfx.compile(scaled(), optimizer="kfac", loss="mse", stat_every=1, **hp)
        trajectory = []
        for seed in range(STEPS):
            train_step(c, *batch("mse", seed=seed), "mse", seed)
            trajectory.append([p.detach().clone() for p in c.parameters()])
        layout = c.optimizer.quadratic._flat_layout
        assert len(c.optimizer.last_step["alphas"]) == 2 and layout.kept == bool(numel)
        assert set(layout._buffers) == ({"theta", "proposal", "grads", "update"} | {"row 0", "row 1"} if numel else
                                        {"update"})  # the step's own: released at its end but δ's
        runs.append(trajectory)
    for buffered, unbuffered in zip(*runs):
        assert all(torch.equal(p, q) for p, q in zip(buffered, unbuffered))


def train_step(c, x, y, loss, seed):
    torch.manual_seed(seed)  # the same sampled labels of fisher="mc" in every model
    LOSSES[loss](c(x), y).backward()
    c.step()
    c.zero_grad()


def steps_alike(a, b, x, y, steps, flag: str, every: int) -> list:
    """Train `a` and `b` (restored from `a`'s checkpoint) on the same (x, y) at `steps` (the steps'
    indices): each step's last_step[flag] is True exactly on the multiples of `every`, alike in both,
    with the same λ and bit-identical parameters; returns the flags."""
    flags = []
    for t in steps:
        for c in (a, b):
            train_step(c, x, y, "mse", t)
        assert a.optimizer.last_step[flag] == b.optimizer.last_step[flag] == (t % every == 0), t
        flags.append(a.optimizer.last_step[flag])
        assert b.optimizer.quadratic.damping == a.optimizer.quadratic.damping
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    return flags


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_damping_every_holds_the_damping_between_adaptations(loss, monkeypatch):
    """damping_every=3: ρ and the λ rule on the first DAMPING_WARMUP steps and every third one
    after; every step equals, bit for bit, that of damping_every=1 whose λ rule (and expansion) is held
    on the same steps (the steps between take the step at the λ held fixed), and λ moves only on
    adaptation steps."""
    every, steps = 3, DAMPING_WARMUP + 8
    x, y = batch(loss)
    a, b = tiny(), tiny()
    ca = gnfx.compile(a, optimizer="kfac", loss=loss, stat_every=1, inv_every=1, damping_every=every)
    cb = gnfx.compile(b, optimizer="kfac", loss=loss, stat_every=1, inv_every=1, damping_every=1)

    def rule(damping, rho, growth, decay):  # cb's: ca's rule on ca's adaptation steps, else λ and ν held
        return levenberg_marquardt(damping, rho, growth, decay) if adapting[0] or held[0] else (damping, growth)

    expand = quadratic_step.QuadraticStep._expand

    def expansion(step, *args):  # cb's: ca's expansion (ρ > 1) on ca's adaptation steps, else the step as it is
        return expand(step, *args) if adapting[0] or held[0] else 1.0

    adapting, held = [True], [False]
    monkeypatch.setattr(quadratic_step, "levenberg_marquardt", rule)
    monkeypatch.setattr(quadratic_step.QuadraticStep, "_expand", expansion)
    moved_after_warmup = 0
    for i in range(steps):
        damping = ca.optimizer.quadratic.damping
        adapting[0] = True
        train_step(ca, x, y, loss, i)
        last = ca.optimizer.last_step
        assert last["adapted"] == (i < DAMPING_WARMUP or i % every == 0), i
        assert not last["rejected"]
        if not last["adapted"]:
            assert math.isnan(last["rho"]) and ca.optimizer.quadratic.damping == damping
        else:
            assert ca.optimizer.quadratic.damping != damping  # ρ is near 1 on this problem, λ falls
            moved_after_warmup += i >= DAMPING_WARMUP
        adapting[0], held[0] = False, last["adapted"]
        train_step(cb, x, y, loss, i)
        assert cb.optimizer.last_step["adapted"] and not cb.optimizer.last_step["rejected"]
        assert cb.optimizer.last_step["damping"] == last["damping"]
        assert cb.optimizer.quadratic.damping == ca.optimizer.quadratic.damping
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), i
    assert moved_after_warmup == len(range(DAMPING_WARMUP + (-DAMPING_WARMUP) % every, steps, every))


@pytest.mark.parametrize("lie", [None, 0.0, 1.0])
def test_an_accepted_adaptation_with_rho_above_one_is_expanded_if_the_loss_falls_further(lie, monkeypatch):
    """After the warm-up, an adaptation whose loss fell by more than its model predicted (ρ > 1, as
    on a batch that cross-entropy's exponential tail fits) is tried at EXPANSION·s, s the step of a
    twin without the expansion: kept where the batch loss is lower there (the parameters at θ + 2s,
    α and μ doubled), else the step stays s bit for bit (a closure reporting a higher loss at θ + 2s,
    `lie` = 1; None: no closure, the loss recovered from the output gradient). Either way the momentum
    carries s and λ is the twin's."""
    x, y = batch("cross_entropy")
    values = lambda m: flat([p.detach() for p in m.parameters()])  # noqa: E731
    twins = []
    for expansion in (None, 2.0):
        model = tiny()
        c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1)
        calls = []

        def closure(c=c, calls=calls, offset=lie if expansion else 0.0):
            loss = F.cross_entropy(c(x), y)
            if torch.is_grad_enabled():
                calls.clear()
                loss.backward()
            calls.append(float(loss.detach()))
            return loss + offset if len(calls) == 3 else loss  # 3: the loss at θ + 2s

        monkeypatch.setattr(quadratic_step, "EXPANSION", expansion)
        for i in range(DAMPING_WARMUP + 1):  # the step after the warm-up adapts (10 mod damping_every = 0)
            before = values(model)
            torch.manual_seed(i)  # the same sampled labels of fisher="mc" in both twins
            if lie is None:
                F.cross_entropy(c(x), y).backward()
                c.step()
            else:
                c.step(closure)
            c.zero_grad()
        twins.append((model, c, before))
    (plain, c_plain, before), (model, c, before_expanded) = twins
    assert torch.equal(before, before_expanded)  # no expansion on the warm-up steps
    s = values(plain) - before
    last, plain_last = c.optimizer.last_step, c_plain.optimizer.last_step
    assert plain_last["adapted"] and plain_last["rho"] > 1 and plain_last["expansion"] == 1.0
    assert last["rho"] == plain_last["rho"]
    assert c.optimizer.quadratic.damping == c_plain.optimizer.quadratic.damping
    torch.testing.assert_close(flat(c.optimizer.quadratic.previous), flat(c_plain.optimizer.quadratic.previous),
                               rtol=0, atol=0)
    with torch.no_grad():
        at_s = float(F.cross_entropy(plain(x), y))
        at_2s = float(F.cross_entropy(model(x), y))
    if lie == 1.0:
        assert last["expansion"] == 1.0 and last["alpha"] == plain_last["alpha"]
        assert torch.equal(values(model), values(plain))
    else:
        assert last["expansion"] == 2.0 and last["alpha"] == 2 * plain_last["alpha"]
        assert last["mu"] == 2 * plain_last["mu"]
        torch.testing.assert_close(values(model) - before, 2 * s, rtol=1e-12, atol=1e-14)
        assert at_2s < at_s


def test_mse_is_not_expanded(monkeypatch):
    """The expansion is cross-entropy's (its exponential tail): with loss="mse" an adaptation after the
    warm-up with ρ > 1 stays at s, and no forward is spent on 2s."""
    x, y = batch("mse")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1, inv_every=1, damping_every=1)
    tried = []
    monkeypatch.setattr(quadratic_step.QuadraticStep, "_expand", lambda *args: tried.append(1) or 2.0)
    above_one = 0
    for i in range(DAMPING_WARMUP + 10):
        train_step(c, x, y, "mse", i)
        last = c.optimizer.last_step
        assert last["expansion"] == 1.0
        above_one += i >= DAMPING_WARMUP and last["adapted"] and last["rho"] > 1
    assert above_one and not tried


def test_a_step_predicting_much_more_than_the_last_judged_one_is_judged():
    """Between adaptations a step whose predicted reduction exceeds PREDICTED_GROWTH times that of
    the last accepted adaptation (`judged`) computes ρ and adapts λ; otherwise it keeps λ."""
    x, y = batch("cross_entropy")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1, damping_every=100)
    for i in range(DAMPING_WARMUP):
        train_step(c, x, y, "cross_entropy", i)
    quadratic = c.optimizer.quadratic
    assert quadratic.judged == c.optimizer.last_step["predicted"]
    for i, judged, adapts in ((DAMPING_WARMUP, math.inf, False), (DAMPING_WARMUP + 1, 0.0, True)):
        quadratic.judged, damping = judged, quadratic.damping
        train_step(c, x, y, "cross_entropy", i)
        last = c.optimizer.last_step
        assert last["adapted"] == adapts and math.isfinite(last["rho"]) == adapts
        assert (quadratic.damping != damping) == adapts
    assert quadratic.judged == last["predicted"]


def test_checkpoint_keeps_the_adaptation_schedule():
    """The step counter travels with the optimizer's state: a model restored after DAMPING_WARMUP + 1
    steps adapts on the same later steps, with the same λ, and takes the same steps bit for bit (the
    refreshes use this step's λ, which the checkpoint carries, not the one the last step left in the
    preconditioners)."""
    x, y = batch("mse")
    a = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1, inv_every=1, damping_every=4)
    for i in range(DAMPING_WARMUP + 1):
        train_step(a, x, y, "mse", i)
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="mse", stat_every=1, inv_every=1,
                     damping_every=4)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    assert b.optimizer.steps == a.optimizer.steps == DAMPING_WARMUP + 1
    assert not a.optimizer.last_step["adapted"]  # step DAMPING_WARMUP: 10 mod 4 ≠ 0
    assert (b.optimizer.quadratic.growth, b.optimizer.quadratic.judged) == (
        a.optimizer.quadratic.growth, a.optimizer.quadratic.judged)
    adapted = steps_alike(a, b, x, y, range(DAMPING_WARMUP + 1, DAMPING_WARMUP + 9), "adapted", 4)
    assert any(adapted) and not all(adapted)


def recorded_proposals(monkeypatch, params) -> list:
    """The list to which every step appends its chain's proposal Δ (θ after the chain - θ before),
    measured outside the step by wrapping GnfxOptimizer._apply_chain."""
    proposals, chain = [], gnfx.optimizer.GnfxOptimizer._apply_chain

    def recorded(self):
        theta = flat(p.detach() for p in params).clone()
        chain(self)
        proposals.append(flat(p.detach() for p in params) - theta)

    monkeypatch.setattr(gnfx.optimizer.GnfxOptimizer, "_apply_chain", recorded)
    return proposals


def test_steps_between_solves_reuse_the_last_coefficients(monkeypatch):
    """quadratic_every=3, damping_every=4: the products J v (forwards of the model inside step(),
    counted by a hook on its first layer) and the solve (minimize_quadratic, once) run on the first
    DAMPING_WARMUP steps and on every third step after; every other step runs no forward at all and
    no solve, and applies s = α̂Δ + μ̂δ exactly, with (α̂, μ̂) of the last
    solve, Δ the chain's proposal and δ the previous update, both measured outside the step; λ moves
    only on solved steps, an adaptation falling due between solves (t mod 4 = 0) waiting for the
    next one."""
    every, solve_every, steps = 4, 3, DAMPING_WARMUP + 12
    model = tiny()
    c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1, damping_every=every,
                     quadratic_every=solve_every)
    params = list(model.parameters())
    calls = {"forward": 0, "solve": 0}
    model[0].register_forward_pre_hook(lambda *args: calls.update(forward=calls["forward"] + 1))

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(quadratic_step, "minimize_quadratic", counted("solve", quadratic_step.minimize_quadratic))
    proposals = recorded_proposals(monkeypatch, params)
    previous, solved, solved_at, reused = None, None, -1, 0
    for t in range(steps):
        x, y = batch("mse")  # one batch: the guard of the steps between holds (the next test)
        F.mse_loss(c(x), y).backward()
        theta = flat(p.detach() for p in params).clone()
        calls.update(forward=0, solve=0)
        damping = c.optimizer.quadratic.damping
        c.step()
        c.zero_grad()
        last = c.optimizer.last_step
        s = flat(p.detach() for p in params) - theta
        assert not last["rejected"] and not last["backtracks"], (t, last)
        assert last["solved"] == (t < DAMPING_WARMUP or t % solve_every == 0), t
        assert (calls["forward"] >= 1, calls["solve"]) == ((True, 1) if last["solved"] else (False, 0)), t
        if last["solved"]:
            assert last["adapted"] == (t < DAMPING_WARMUP or t // every > solved_at // every), t
            solved, solved_at = (last["alpha"], last["mu"]), t
        else:
            reused += 1
            alpha, mu = solved
            assert (last["alpha"], last["mu"], last["damping"]) == (alpha, mu, damping)
            assert not last["adapted"] and math.isnan(last["predicted"]) and math.isnan(last["rho"])
            assert c.optimizer.quadratic.damping == damping
            # round-off of θ + s - θ: a few ulps of θ
            torch.testing.assert_close(s, alpha * proposals[-1] + mu * previous, rtol=1e-12,
                                       atol=1e-14 * float(theta.abs().max()))
        previous = s
    assert reused == len([t for t in range(DAMPING_WARMUP, steps) if t % solve_every])


def test_steps_between_solves_with_a_fixed_momentum_reuse_alpha_on_the_velocity(monkeypatch):
    """quadratic_every=3 with quadratic_momentum=μ̂ (one tangent per part): a step between solves runs
    no forward and applies s = α̂ v exactly, v = Δ + μ̂ v_prev the velocity (v = Δ where the carried
    velocity goes uphill, gᵀv_prev > 0), α̂ of the last solve (without its expansion); `last_step`
    reports μ̂."""
    mu_hat, solve_every, steps = 0.5, 3, DAMPING_WARMUP + 7
    model = tiny()
    # ω = 0.9: λ stays near 0.3 and every step between passes the reuse guard; at the default ω = 0.5 λ is
    # 7e-4 by step 13 and the refreshed, longer proposal of step 14 fails it (then it solves, as
    # test_a_step_between_solves_failing_the_guard_solves checks)
    c = gnfx.compile(model, optimizer="kfac", loss="mse", stat_every=1, inv_every=1, quadratic_every=solve_every,
                     quadratic_momentum=mu_hat, damping_decay=0.9)
    params = list(model.parameters())
    forwards, proposals = [0], recorded_proposals(monkeypatch, params)
    model[0].register_forward_pre_hook(lambda *args: forwards.__setitem__(0, forwards[0] + 1))
    velocity, alpha, reused = None, None, 0
    for t in range(steps):
        x, y = batch("mse")
        F.mse_loss(c(x), y).backward()
        g = flat(p.grad for p in params).clone()
        theta = flat(p.detach() for p in params).clone()
        forwards[0] = 0
        c.step()
        c.zero_grad()
        last = c.optimizer.last_step
        s = flat(p.detach() for p in params) - theta
        assert not last["rejected"] and not last["backtracks"], (t, last)
        assert last["mu"] == (mu_hat if velocity is not None else 0.0) and last["solved"] == (forwards[0] >= 1), t
        expected = proposals[-1] if velocity is None or float(g @ velocity) > 0 else proposals[-1] + mu_hat * velocity
        if last["solved"]:  # the steps between reuse the solve's α̂, not that of an expansion e·α̂
            alpha = last["alpha"] / last["expansion"]
        else:
            reused += 1
            assert last["alpha"] == alpha and last["expansion"] == 1.0
        torch.testing.assert_close(s, last["alpha"] * expected, rtol=1e-10, atol=1e-14 * float(theta.abs().max()))
        velocity = expected
    assert reused == len([t for t in range(DAMPING_WARMUP, steps) if t % solve_every])


def test_a_step_between_solves_failing_the_guard_solves():
    """A step scheduled to reuse the last solve's ĉ solves instead when the first-order reduction
    -gᵀs of s = ĉ·(Δ, δ) exceeds PREDICTED_GROWTH times the solve's -b̂ᵀĉ, or is not positive."""
    x, y = batch("cross_entropy")
    c = gnfx.compile(tiny(), optimizer="kfac", loss="cross_entropy", stat_every=1, inv_every=1, quadratic_every=100)
    for t in range(DAMPING_WARMUP):
        train_step(c, x, y, "cross_entropy", t)
    quadratic = c.optimizer.quadratic
    names, coefficients, slope = quadratic.coefficients
    assert slope < 0 and names == ["kfac"] and len(coefficients) == 2
    train_step(c, x, y, "cross_entropy", DAMPING_WARMUP)
    assert not c.optimizer.last_step["solved"] and quadratic.coefficients[1] is coefficients
    for t, changed in ((DAMPING_WARMUP + 1, (names, coefficients, -1e-300)), (DAMPING_WARMUP + 2, (names, -coefficients, slope))):
        quadratic.coefficients = changed
        train_step(c, x, y, "cross_entropy", t)
        assert c.optimizer.last_step["solved"] and quadratic.coefficients[1] is not changed[1], t


def test_checkpoint_keeps_the_coefficients_between_solves():
    """A model restored between solves (quadratic_every=3, after step DAMPING_WARMUP, a step between)
    reuses the same coefficients and solves on the same steps: the same steps bit for bit."""
    x, y = batch("mse")
    a = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1, inv_every=1, quadratic_every=3)
    for t in range(DAMPING_WARMUP + 1):
        train_step(a, x, y, "mse", t)
    assert not a.optimizer.last_step["solved"]
    b = gnfx.compile(copy.deepcopy(a._model), optimizer="kfac", loss="mse", stat_every=1, inv_every=1,
                     quadratic_every=3)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    solved = steps_alike(a, b, x, y, range(DAMPING_WARMUP + 1, DAMPING_WARMUP + 6), "solved", 3)
    assert any(solved) and not all(solved)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3"])
def test_quadratic_every_must_be_a_positive_integer(value):
    with pytest.raises(gnfx.ConfigError, match="quadratic_every"):
        gnfx.compile(tiny(), optimizer="kfac", loss="mse", quadratic_every=value)


# ----------------------------------------------------------------------------- convergence in steps


@pytest.mark.parametrize("name", convergence.PROBLEMS)
@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_defaults_beat_adamws_best_learning_rate_in_steps(name, optimizer):
    """kfac and ekfac at defaults (loss= only, no lr: the quadratic step) reach the target in
    at most half of the steps of AdamW at its best learning rate of test_convergence's grid (full
    batch, float64)."""
    counts = convergence.adamw_steps(name)
    best = min(s for s in counts.values() if s is not None)
    model, X, Y, target = convergence.problem(name)
    c = gnfx.compile(model(), optimizer=optimizer, loss="mse")
    steps = convergence.steps_to_target(c, c, X, Y, target, best // 2)
    assert steps is not None, f"{optimizer} with no lr did not reach the target in {best // 2} steps ({counts})"


# ----------------------------------------------------------------------------- torch.distributed


# the default under the quadratic step is "mc", whose labels two ranks cannot sample as one process
# does for the concatenated batch; what is compared here is the step's averaging over the ranks
FISHER = "empirical"


def quadratic_worker(rank, world, init_method, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        compiled = gnfx.compile(distributed.make_model(), "kfac", loss="cross_entropy", stat_every=2, inv_every=3,
                                fisher=FISHER, **EXACT)
        xs, ys = distributed.data()
        shard = slice(rank * 8, (rank + 1) * 8)
        distributed.train(compiled, nn.parallel.DistributedDataParallel(compiled), xs[:, shard], ys[:, shard])
        if rank == 0:
            torch.save({n: p.detach() for n, p in compiled.named_parameters()}, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.leave()


def test_two_ranks_take_the_step_of_one_process_on_the_concatenated_batch(tmp_path):
    """M, b and the actual reduction are averaged over the ranks: the same α, μ, λ on every rank,
    those of the global batch (K-FAC on every block, the LayerNorm's included: one α)."""
    result = distributed.on_two_ranks(quadratic_worker, tmp_path)
    single = gnfx.compile(distributed.make_model(), "kfac", loss="cross_entropy", stat_every=2, inv_every=3,
                          fisher=FISHER, **EXACT)
    xs, ys = distributed.data()
    distributed.train(single, single, xs, ys)
    assert set(single.optimizer.last_step["alphas"]) == {"kfac"}
    for name, p in single.named_parameters():
        torch.testing.assert_close(result[name], p.detach(), rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("schedule", ["cosine", "warmup_from_zero"])
def test_an_lr_schedule_does_not_change_the_uncapped_step_and_warns_once(schedule):
    """Without lr= the proposal Δ is made at the group's lr and α rescales it: a scheduler moves no
    parameter (the same trajectory as without one) and gnfx says so, once. With lr= the lr is a cap
    that the schedule moves: no warning. (A group lr of 0, a warm-up's first step, proposes Δ = 0: no step.)"""
    x, y = batch("mse")

    def run(scheduled, **hp):
        c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1, **EXACT, **hp)
        factor = (lambda t: 0.5 ** t) if schedule == "cosine" else (lambda t: t / 3)
        sched = torch.optim.lr_scheduler.LambdaLR(c.optimizer, factor) if scheduled else None
        steps = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                F.mse_loss(c(x), y).backward()
                c.step()
                c.zero_grad()
                if sched is not None:
                    sched.step()
                steps.append([p.detach().clone() for p in c.parameters()])
        return steps, [w for w in caught if "lr moved" in str(w.message)]

    plain, none = run(False)
    scheduled, warned = run(True)
    assert not none and len(warned) == 1 and "compile with lr=" in str(warned[0].message)
    start = 1 if schedule == "warmup_from_zero" else 0  # its first step (lr 0) moved nothing
    if start:
        assert all(torch.equal(p, q) for p, q in zip(scheduled[0], tiny().parameters()))
        return  # the later steps then start from other parameters than the unscheduled run's
    for a, b in zip(plain, scheduled):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    _, capped = run(True, step="quadratic", lr=1e-2)
    assert not capped



def test_a_param_group_added_is_no_lr_schedule():
    """A param group added (or removed) between steps changes the list of lrs without moving any: no
    warning, and no error from comparing lists of different lengths."""
    quadratic = gnfx.compile(tiny(), optimizer="kfac", loss="mse").optimizer.quadratic
    groups = quadratic.parameters.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quadratic._warn_if_lr_moved()
        groups.append({**groups[0], "params": []})
        quadratic._warn_if_lr_moved()
        groups.pop()
        quadratic._warn_if_lr_moved()

def test_one_backward_over_two_forwards_warns_once_and_keeps_the_last_forwards_gradient():
    """A Siamese loss over model(x1) and model(x2) is modelled by the last forward's output alone: one
    warning; the output gradient kept is that forward's (the rows the step replays), whichever order
    autograd reaches the two outputs in. Accumulation with a backward per forward does not warn."""
    x, y = batch("mse")
    x1, x2 = x[:4], x[4:]

    def train(siamese):
        c = gnfx.compile(tiny(), optimizer="kfac", loss="mse", stat_every=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                if siamese:
                    z1 = c(x1)
                    z2 = c(x2)
                    F.mse_loss(z2, y[4:] + 0.1 * z1).backward()
                    expected = 2 * (z2 - y[4:] - 0.1 * z1).detach() / z2.numel()
                    torch.testing.assert_close(c.optimizer.quadratic._output_grad[0], expected)
                else:
                    for xi, yi in ((x1, y[:4]), (x2, y[4:])):
                        (F.mse_loss(c(xi), yi) / 2).backward()
                c.step()
                c.zero_grad()
        return [w for w in caught if "two training forwards" in str(w.message)]

    assert len(train(siamese=True)) == 1
    assert not train(siamese=False)


class BroadcastProduct(nn.Module):
    """x W written as a broadcast product and a sum: no layer kind gnfx models, so W falls back to the diagonal."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return (x[:, :, None] * self.w).sum(1)


@pytest.mark.parametrize("optimizer, settings, warned", [
    ("kfac", dict(), True),  # kfac's default step chosen with no curvature block to serve: named
    ("kfac", dict(step="quadratic"), True),  # the same step, asked for by name
    ("kfac", dict(lr=1e-3), False),  # the fixed-lr step the warning's fix gives
    ("kfac", dict(step="quadratic", lr=1e-3), False),  # α capped at the lr's step
    ("diag", dict(step="quadratic"), False),  # the diagonal's quadratic step, asked for
])
def test_the_quadratic_step_of_kfac_on_a_model_without_curvature_blocks_is_named(optimizer, settings, warned):
    """kfac with loss= and no lr takes the quadratic step for its blocks; on a model none of whose parameters is
    in a block the step is the diagonal's direction at each batch's model length (benchmarks/results/defaults.md:
    it fits each batch and can raise the others' loss), and gnfx says so with the fix, once the plan is built."""
    x, y = torch.randn(8, 4), torch.randint(3, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(BroadcastProduct(), optimizer, loss="cross_entropy", **settings)
        backward_and_step(c, F.cross_entropy(c(x), y))
    named = [w for w in caught if "no parameter of the model is in a curvature block" in str(w.message)]
    assert len(named) == warned and c.optimizer.steps == 1
    if warned:
        assert "lr=1e-3" in str(named[0].message) and named[0].category is RuntimeWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(nn.Sequential(nn.Linear(4, 3)), optimizer, loss="cross_entropy", **settings)
        backward_and_step(c, F.cross_entropy(c(x), y))
    assert not [w for w in caught if "no parameter of the model is in a curvature block" in str(w.message)]
