"""Shampoo's step against a dense reference written from the paper (Gupta et al. 2018).

For a piece with gradient G of order k, Shampoo keeps one factor per mode j,

    F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ          (zero start; for a matrix: L = Σ G Gᵀ, R = Σ Gᵀ G)

on statistic steps, recomputes the roots (F_j + ε_j I)^{-p} with ε_j = damping · λ_max(F_j)
on refresh steps, and steps along the mode product, which the reference applies in its Kronecker
form on the row-major vectorization (the factors are symmetric):

    vec(G ×_1 P_1 ×_2 P_2 ... ×_k P_k) = (P_1 ⊗ P_2 ⊗ ... ⊗ P_k) vec(G),
    for a matrix:  vec(L^{-p} G R^{-p}) = (L^{-p} ⊗ R^{-p}) vec(G).

The reference updates the factors with a step's gradient before it refreshes the roots on that
step, as the paper does. Most tests refresh on steps that collect no statistics
(stat_every=2, refreshes at odd steps), where that order cannot matter; the test with statistics
and refreshes on every step is the one that checks it.

Learning rates are powers of two (gnfx hands lr to the update function as a float32 tensor).
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gnfx
from gnfx.preconditioners.shampoo import accumulate_drift
from models import SquashedAffine
from models import TanhMLP as MLP

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
LR = 2.0 ** -12
DEFAULT = {k: spec.default for k, spec in gnfx.REGISTRY["shampoo"].HPARAMS.items()}


# ----------------------------------------------------------------------------- the reference


def inverse_root(F_, damping, p):
    """(F + ε I)^{-p}, ε = damping · λ_max(F), from the eigendecomposition of the PSD matrix F."""
    d, Q = torch.linalg.eigh(F_)
    eps = damping * d.max()
    return Q @ torch.diag((d.clamp(min=0) + eps) ** -p) @ Q.T


def mode_gram(G, j):
    """G_(j) G_(j)ᵀ: the Gram matrix of the mode-j unfolding."""
    X = G.movedim(j, 0).reshape(G.shape[j], -1)
    return X @ X.T


def kron_all(matrices):
    out = matrices[0]
    for m in matrices[1:]:
        out = torch.kron(out, m)
    return out


class ShampooReference:
    """Shampoo with grafting for one piece, in float64, step by step. The modes in `diagonal` keep
    the diagonal of their Gram matrices alone, as a dense diagonal matrix."""

    def __init__(self, shape, *, beta, damping, p, graft="none", beta2=0.999, eps=1e-8,
                 start=0, freq=1, stat_every=1, tolerance=0.0, max_interval=100, diagonal=()):
        self.diagonal = diagonal
        self.factors = [torch.zeros(d, d, dtype=DTYPE) for d in shape]
        self.roots = [torch.eye(d, dtype=DTYPE) for d in shape]
        # the drift rule: each factor's drift bound, its factor at its last refresh (F_r, to check
        # the bound against the exact drift) and that step
        self.tolerance, self.max_interval = tolerance, max_interval
        self.bound = [float("inf")] * len(shape)
        self.refreshed = [torch.zeros(d, d, dtype=DTYPE) for d in shape]
        self.refreshed_at = [0] * len(shape)
        self.refreshes = self.skipped = 0
        self.beta, self.damping, self.p = beta, damping, p
        self.graft, self.beta2, self.eps = graft, beta2, eps
        self.start, self.freq, self.stat_every = start, freq, stat_every
        self.v = torch.zeros(shape, dtype=DTYPE)
        self.t = 0

    def grafted_direction(self, G):
        if self.graft == "adam":
            self.v = self.beta2 * self.v + (1 - self.beta2) * G ** 2
            return G / ((self.v / (1 - self.beta2 ** self.t)).sqrt() + self.eps)
        if self.graft == "adagrad":
            self.v = self.v + G ** 2
            return G / (self.v.sqrt() + self.eps)
        return G

    def step(self, step, G):
        """The direction U of step `step` (0-based) for gradient G: Δθ = -η U."""
        self.t += 1
        if step % self.stat_every == 0:
            previous = self.factors
            grams = [mode_gram(G, j) for j in range(G.dim())]
            grams = [torch.diag(C.diagonal()) if j in self.diagonal else C for j, C in enumerate(grams)]
            self.factors = [self.beta * Fj + (1 - self.beta) * C for Fj, C in zip(self.factors, grams)]
            for j, (Fj, Pj) in enumerate(zip(self.factors, previous)):
                r = self.drift(Fj, Pj)  # the drift of this statistic step
                self.bound[j] += r if self.graft != "none" else r * (1 + self.bound[j])
        D = self.grafted_direction(G)
        if step < self.start:
            return D
        if (step - self.start) % self.freq == 0:
            for j, Fj in enumerate(self.factors):
                if self.tolerance and self.refreshed[j].any():  # the bound holds: at least the exact drift
                    assert self.bound[j] >= self.drift(Fj, self.refreshed[j]) * (1 - 1e-12), (j, step)
                if self.due(j, step):
                    self.roots[j] = inverse_root(Fj, self.damping, self.p)
                    self.refreshed[j], self.refreshed_at[j], self.bound[j] = Fj.clone(), step, 0.0
                    self.refreshes += 1
                else:
                    self.skipped += 1
        P = (kron_all(self.roots) @ G.reshape(-1)).reshape(G.shape)
        if self.graft == "none":
            return P
        return P * (D.norm() / P.norm())

    def drift(self, F_, R):
        """‖F/‖F‖ − R/‖R‖‖ with a graft (the step length is the graft's), ‖F − R‖/‖R‖ without
        (NaN for R = 0: due)."""
        F_, R = F_.flatten(), R.flatten()
        norm = lambda x: (x @ x).sqrt()  # noqa: E731
        return (norm(F_ / norm(F_) - R / norm(R)) if self.graft != "none" else norm(F_ - R) / norm(R)).item()

    def due(self, j, step):
        """Whether factor j's root is recomputed on refresh step `step`: its drift bound, the sum
        of its statistic steps' drifts since its last refresh (1 + b = Π (1 + r) without a graft),
        exceeds τ, or it is max_refresh_interval steps old."""
        if self.tolerance == 0 or not self.bound[j] <= self.tolerance:
            return True
        return step - self.refreshed_at[j] >= self.max_interval


# ----------------------------------------------------------------------------- models and helpers


class Tensor3(nn.Module):
    """A raw (3, 4, 5) parameter contracted by einsum: a fallback that Shampoo claims, and a
    SquashedAffine whose 1-D parameters (no layer) go to the diagonal preconditioner."""

    def __init__(self):
        super().__init__()
        self.T = nn.Parameter(torch.randn(3, 4, 5) / 3)
        self.norm = SquashedAffine(5)

    def forward(self, x):
        return self.norm(torch.einsum("nij,ijk->nk", x, self.T))


def make(cls=MLP, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).to(DTYPE)


def data(n, in_shape=(5,), classes=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *in_shape, generator=g, dtype=DTYPE),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


# Refreshes at steps 1, 3, 5, ...; statistics at steps 0, 2, 4, ...: both orders of "update the
# factors" and "refresh the roots" within a step give the same roots.
OFFSET = dict(stat_every=2, precondition_frequency=2, start_preconditioning_step=1)


def compile_shampoo(model, **hp):
    settings = dict(lr=LR, momentum=0.0, weight_decay=0.0, graft="none", damping=0.1,
                    stat_decay=0.75, betas=(0.9, 0.999), eps=1e-8, **OFFSET)
    settings.update(hp)
    return gnfx.compile(model, optimizer="shampoo", **settings)


def reference_for(shape, hp):
    p = hp.get("exponent", "paper")
    p = 1 / (2 * len(shape)) if p == "paper" else p
    hp = {**OFFSET, **hp}
    above = hp.get("diagonal_above", DEFAULT["diagonal_above"])
    return ShampooReference(shape, beta=hp.get("stat_decay", 0.75), damping=hp.get("damping", 0.1), p=p,
                            diagonal=tuple(j for j, d in enumerate(shape) if above and d > above),
                            graft=hp.get("graft", "none"), start=hp["start_preconditioning_step"],
                            freq=hp["precondition_frequency"], stat_every=hp["stat_every"],
                            tolerance=hp.get("refresh_tolerance", DEFAULT["refresh_tolerance"]),
                            max_interval=hp.get("max_refresh_interval", DEFAULT["max_refresh_interval"]))


def folded(layer, grad=False):
    w = layer.weight.grad if grad else layer.weight
    if layer.bias is None:
        return w.detach().clone()
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w, b.unsqueeze(1)], dim=1).detach().clone()


def train_against_reference(model, hp, batches, regions=None):
    """Train with gnfx Shampoo and check each step of each layer (or each region of a layer:
    {name: [index, ...]}) against its own ShampooReference; returns the compiled model and the
    references by (layer, region number)."""
    c = compile_shampoo(model, **hp)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    regions = regions or {n: [(slice(None), slice(None))] for n in layers}
    refs = {(n, i): reference_for(folded(layers[n])[idx].shape, hp) for n in regions for i, idx in enumerate(regions[n])}
    for step, (x, y) in enumerate(batches):
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        grads = {n: folded(m, grad=True) for n, m in layers.items()}
        before = {n: folded(m) for n, m in layers.items()}
        assert all(g.abs().max() > 1e-3 for g in grads.values()), "training diverged: vacuous comparison"
        c.step()
        for n, idxs in regions.items():
            delta = folded(layers[n]) - before[n]
            for i, idx in enumerate(idxs):
                U = refs[(n, i)].step(step, grads[n][idx])
                torch.testing.assert_close(delta[idx], -LR * U, **TOL, msg=lambda m: f"{n}{idx} step {step}: {m}")
    return c, refs


# ----------------------------------------------------------------------------- tests


def test_kronecker_form_of_the_two_sided_product():
    """The identity the reference relies on: vec(L G R) = (L ⊗ R) vec(G), L, R symmetric."""
    torch.manual_seed(0)
    X, Y = torch.randn(3, 3, dtype=DTYPE), torch.randn(4, 4, dtype=DTYPE)
    L, R, G = X @ X.T, Y @ Y.T, torch.randn(3, 4, dtype=DTYPE)
    torch.testing.assert_close((torch.kron(L, R) @ G.reshape(-1)).reshape(3, 4), L @ G @ R, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("root_method", ["eigh", "newton"])
@pytest.mark.parametrize("exponent", ["paper", 0.5, 1 / 3], ids=["paper", "p=0.5", "p=1/3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matrix_block_equals_dense_reference(exponent, bias, root_method):
    """Δ[W b] = -η (L+ε_L)^{-p} G (R+ε_R)^{-p} at every step, L, R the EMAs of G Gᵀ, Gᵀ G of the
    observed folded gradients, roots from the last refresh (steps 1, 3, 5: stale in between),
    whether the roots come from eigendecompositions or from the coupled Newton iteration."""
    hp = dict(exponent=exponent, stat_decay=0.75, root_method=root_method)
    train_against_reference(make(bias=bias), hp, data(7))


def test_newton_roots_need_an_integer_inverse_exponent():
    with pytest.raises(gnfx.ConfigError, match="root_method='newton'.*exponent=0.3"):
        gnfx.compile(make(), optimizer="shampoo", root_method="newton", exponent=0.3)


@pytest.mark.parametrize("exponent", ["paper", 0.5], ids=["paper", "p=0.5"])
def test_statistics_and_roots_on_every_step_use_the_current_gradient(exponent):
    """stat_every=1, precondition_frequency=1, start_preconditioning_step=0: the step of step t is
    -η (L_t+ε)^{-p} G_t (R_t+ε)^{-p} with L_t, R_t including G_t (Gupta et al. 2018, Algorithm 1)."""
    hp = dict(exponent=exponent, stat_decay=0.75, stat_every=1, precondition_frequency=1,
              start_preconditioning_step=0)
    train_against_reference(make(), hp, data(4))


@pytest.mark.parametrize("graft", ["none", "adam"])
def test_blocks_of_at_most_max_block_are_preconditioned_independently(graft):
    """A 5x8 target ([W b] of Linear(7, 5)) with max_block=3: pieces of at most 3 per dimension
    that tile the target, each with its own factors, roots and graft."""
    model = make(widths=(7, 5))
    hp = dict(max_block=3, graft=graft, exponent=0.5)
    c = compile_shampoo(model, **hp)
    pre = c.optimizer.curvature[0]
    pieces = [p for g in pre.groups for p in g.pieces]
    assert len(pieces) > 1 and all(max(p.shape) <= 3 for p in pieces)
    cover = torch.zeros(5, 8, dtype=torch.int64)
    for p in pieces:
        cover[p.index] += 1
    assert torch.equal(cover, torch.ones_like(cover))  # a tiling: every entry in exactly one piece
    regions = {"layers.0": [p.index for p in pieces]}
    train_against_reference(make(widths=(7, 5)), hp, data(6, in_shape=(7,), classes=5), regions=regions)


@pytest.mark.parametrize("tolerance", [0.0, 1e-3], ids=["fixed-interval", "drift-rule"])
@pytest.mark.parametrize("graft", ["none", "adam"])
def test_dimensions_above_diagonal_above_are_whole_with_a_diagonal_factor(graft, tolerance):
    """A 5x8 target ([W b] of Linear(7, 5)) with max_block=3 and diagonal_above=6: its 8 columns are kept
    whole with the diagonal of Σ Gᵀ G as their factor, (R + ε_R)^{-p} entrywise with ε_R = damping · max R,
    while its 5 rows are cut into blocks of at most 3 with matrix factors; the state holds 8 entries per
    piece for that side, not 8²."""
    model = make(widths=(7, 5))
    hp = dict(max_block=3, diagonal_above=6, graft=graft, exponent=0.5, refresh_tolerance=tolerance)
    c = compile_shampoo(model, **hp)
    pre = c.optimizer.curvature[0]
    pieces = [p for g in pre.groups for p in g.pieces if p.target.name == "layers.0"]
    assert sorted(p.shape for p in pieces) == [(2, 8), (3, 8)]
    for group in pre.groups:
        state = pre.group_state(group)
        if group.shape[1] == 8:
            assert state["factor1"].shape == (len(group.pieces), 8) and state["root1"].shape == (len(group.pieces), 8)
            assert state["factor0"].shape == (len(group.pieces),) + (group.shape[0],) * 2
    regions = {"layers.0": [p.index for p in pieces]}
    train_against_reference(make(widths=(7, 5)), hp, data(7, in_shape=(7,), classes=5), regions=regions)


@pytest.mark.parametrize("compile_update", [False, True], ids=["eager-collect", "generated-update"])
def test_a_target_cut_into_blocks_folds_its_bias_once_per_step_not_once_per_piece(compile_update):
    """[∇W ∇b] of Linear(7, 5) cut into pieces of at most 3: the statistic step's gradient Grams (collect)
    and the generated update each fold the bias into the weight's gradient once per step. Folding it once
    per piece kept one copy of the whole target alive per piece (a 2048 x 2049 target in blocks of 32,
    optimizer="auto"'s choice for a 2048-wide MLP: 4,160 copies, 70 GB). Counted as torch.cat calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cats(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Cats.count += func is torch.ops.aten.cat.default
            return func(*args, **(kwargs or {}))

    c = compile_shampoo(make(widths=(7, 5)), max_block=3, stat_every=1, precondition_frequency=100)
    pre = c.optimizer.curvature[0]
    pieces = [p for g in pre.groups for p in g.pieces if p.target.name == "layers.0"]
    assert len(pieces) == 6
    (x, y), = data(1, in_shape=(7,), classes=5)
    F.cross_entropy(c(x), y).backward()
    with Cats(), torch.no_grad():
        if compile_update:
            c.optimizer.update_function(False)
        else:
            pre.collect()
    assert Cats.count == 1  # the one bias-folded target of the model


@pytest.mark.parametrize("graft", ["adam", "adagrad"])
def test_grafting_takes_the_norm_of_the_grafted_direction_and_only_it_before_the_start(graft):
    """Steps 0..2 (< start_preconditioning_step=3) are the grafted direction D alone; later steps
    are P ‖D‖/‖P‖, with D = G/(sqrt(v/(1-β₂ᵗ))+eps) (adam) or G/(sqrt(Σ G²)+eps) (adagrad)."""
    hp = dict(graft=graft, exponent="paper", start_preconditioning_step=3, precondition_frequency=2,
              stat_every=2, damping=1e-2)  # refreshes at steps 3, 5, 7; statistics at 0, 2, 4, 6
    model = make()
    train_against_reference(model, hp, data(8))

    # independent of the reference class: the first step is exactly D
    model = make()
    c = compile_shampoo(model, **hp)
    (x, y), = data(1)
    F.cross_entropy(c(x), y).backward()
    G, before = folded(model.layers[0], grad=True), folded(model.layers[0])
    c.step()
    D = G / (G.abs() + 1e-8)  # v/(1-β₂) = G² (adam), v = G² (adagrad): D = G / (|G| + eps)
    torch.testing.assert_close(folded(model.layers[0]) - before, -LR * D, **TOL)


@pytest.mark.parametrize("diagonal_above", [None, 4], ids=["matrix-factors", "mode-3-diagonal"])
@pytest.mark.parametrize("exponent", ["paper", 0.5], ids=["paper", "p=0.5"])
def test_order3_parameter_is_preconditioned_along_every_mode(exponent, diagonal_above):
    """A raw (3, 4, 5) parameter (an einsum operand, no layer claims it): three factors, and
    Δ = -η G ×_1 F_1^{-p} ×_2 F_2^{-p} ×_3 F_3^{-p}, with p = 1/6 for "paper"; with diagonal_above=4 the
    third factor is the diagonal D_3 of F_3 alone, 5 entries."""
    model = make(Tensor3)
    hp = dict(exponent=exponent, **({} if diagonal_above is None else {"diagonal_above": diagonal_above}))
    c = compile_shampoo(model, **hp)
    pre = c.optimizer.curvature[0]
    assert [g.shape for g in pre.groups] == [(3, 4, 5)]
    state = pre.group_state(pre.groups[0])
    assert state["factor2"].shape == ((1, 5) if diagonal_above else (1, 5, 5))
    ref = reference_for((3, 4, 5), hp)
    assert ref.diagonal == ((2,) if diagonal_above else ())
    for step, (x, y) in enumerate(data(6, in_shape=(3, 4), classes=5)):
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        G, before = model.T.grad.detach().clone(), model.T.detach().clone()
        c.step()
        torch.testing.assert_close(model.T.detach() - before, -LR * ref.step(step, G), **TOL)


def test_one_dimensional_parameters_take_the_adamw_step():
    """The SquashedAffine's weight and bias are the diagonal preconditioner's: torch.optim.AdamW."""
    model = make(Tensor3)
    c = compile_shampoo(model, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6)
    assert [n for pre in c.optimizer.elementwise for n in pre.param_names] == ["norm.weight", "norm.bias"]
    shadow = [p.detach().clone().requires_grad_() for p in model.norm.parameters()]
    adamw = torch.optim.AdamW(shadow, lr=LR, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-6)
    for x, y in data(3, in_shape=(3, 4), classes=5):
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        for s, p in zip(shadow, model.norm.parameters()):
            s.grad = p.grad.clone()
        c.step()
        adamw.step()
        for s, p in zip(shadow, model.norm.parameters()):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-12, atol=1e-14)


class NoTokens(nn.Module):
    """A table of no class tokens, (0, d), concatenated before the tokens (vit-pytorch's ViT with
    pool="mean" keeps such a cls_token); `empty=False`: the same model without it."""

    def __init__(self, empty=True):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 5)
        self.tokens = nn.Parameter(torch.randn(0, 4)) if empty else None
        self.to(DTYPE)

    def forward(self, x):
        h = self.inp(x)
        if self.tokens is not None:
            h = torch.cat([self.tokens.expand(x.shape[0], -1, -1), h], 1)
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("optimizer", ["shampoo", "soap"])
def test_a_parameter_of_no_entries_leaves_the_others_steps_as_without_it(optimizer):
    """A (0, d) parameter made the mode products raise ('cannot reshape tensor of 0 elements into shape
    [1, -1, 0]'): the others now step as in the same model without it."""
    with_empty, without = NoTokens(), NoTokens(empty=False)
    compiled = [gnfx.compile(m, optimizer, lr=LR) for m in (with_empty, without)]
    for x, y in data(3, in_shape=(4, 3), classes=5):
        for c in compiled:
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
            c.step()
    for name, p in without.named_parameters():
        torch.testing.assert_close(dict(with_empty.named_parameters())[name], p, rtol=0, atol=0)


def test_failed_decomposition_keeps_the_last_good_root_and_counts_the_failure(monkeypatch):
    """Two 4x5 layers share a group. On the refresh of step 3, torch.linalg.eigh is made to fail
    for the first of them (every factor): its roots stay those of step 1, its failures count 2 (one per
    factor), its step uses the old roots; the second piece refreshes normally. The refresh of
    step 5 succeeds again."""
    model = make(widths=(5, 4, 4, 4, 3))
    hp = dict(exponent=0.5)
    c = compile_shampoo(model, **hp)
    pre = c.optimizer.curvature[0]
    group = next(g for g in pre.groups if len(g.pieces) == 2)
    names = [p.target.name for p in group.pieces]
    layers = dict(model.named_modules())
    refs = {n: reference_for((4, 5), hp) for n in names}
    real_eigh = torch.linalg.eigh
    fail_next_single = []

    def flaky_eigh(F_, *args, **kwargs):
        """Fail the batched decomposition of the 2-piece group, then the retry of its first piece."""
        if F_.dim() == 3 and F_.shape[0] == 2:
            fail_next_single.append(True)
            raise torch.linalg.LinAlgError("injected failure")
        if fail_next_single:
            fail_next_single.clear()
            raise torch.linalg.LinAlgError("injected failure")
        return real_eigh(F_, *args, **kwargs)

    roots_before = None
    for step, (x, y) in enumerate(data(6)):
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        grads = {n: folded(layers[n], grad=True) for n in names}
        before = {n: folded(layers[n]) for n in names}
        if step == 3:
            roots_before = [pre.group_state(group)[f"root{j}"][0].clone() for j in range(2)]
            with monkeypatch.context() as mp:
                mp.setattr(torch.linalg, "eigh", flaky_eigh)
                c.step()
            assert fail_next_single == []  # the injected failures were both consumed
        else:
            c.step()
        state = pre.group_state(group)
        expected_failures = [0, 0] if step < 3 else [2, 0]
        assert state["failures"].tolist() == expected_failures, (step, state["failures"])
        for i, n in enumerate(names):
            U = refs[n].step(step, grads[n])
            if step == 3 and i == 0:
                assert all(torch.equal(state[f"root{j}"][0], roots_before[j]) for j in range(2))
                P = roots_before[0] @ grads[n] @ roots_before[1]
                assert not torch.allclose(P, U)  # the fresh root would have given another step
                U = P
                # keep the reference's roots at the last good ones, as gnfx does
                refs[n].roots = [r.clone() for r in roots_before]
            torch.testing.assert_close(folded(layers[n]) - before[n], -LR * U, **TOL)


def test_float32_block_with_zero_gradient_at_the_first_statistic_keeps_finite_parameters():
    """A zero-initialised head (common practice) gives the first layer an exactly zero gradient
    on step 0, so its factors are zero at the refresh of step 1. In float32, with the default Adam
    grafting, training must go on with finite parameters (a zero factor has no usable root: keep
    the identity, or count a failure)."""
    torch.manual_seed(0)
    model = MLP()
    nn.init.zeros_(model.layers[1].weight)
    nn.init.zeros_(model.layers[1].bias)
    c = compile_shampoo(model, lr=0.01, graft="adam")
    pre = c.optimizer.curvature[0]
    for step, (x, y) in enumerate(data(4, seed=2)):
        x = x.float()
        c.zero_grad()
        F.cross_entropy(c(x), y).backward()
        if step == 0:
            assert model.layers[0].weight.grad.abs().max() == 0 and model.layers[1].weight.grad.abs().max() > 0
        c.step()
    for g in pre.groups:
        state = pre.group_state(g)
        assert all(torch.isfinite(state[f"root{j}"]).all() for j in range(len(g.shape))), g.key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.layers[0].weight.grad.abs().max() > 0  # the first layer did get gradients later


EVERY_STEP = dict(stat_every=1, precondition_frequency=1, start_preconditioning_step=0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 31 - 1), d=st.integers(1, 6), beta=st.floats(0.01, 0.999),
       scales=st.lists(st.one_of(st.just(0.0), st.floats(-6.0, 3.0)), min_size=1, max_size=12),
       scale_invariant=st.booleans())
def test_the_drift_bound_is_at_least_the_exact_drift_from_the_factor_at_the_last_refresh(
        seed, d, beta, scales, scale_invariant):
    """Over a random sequence F_t = β F_{t-1} + (1-β) C_t from F_r = F_0 (random PSD; C_t = 10^s X Xᵀ
    of random rank, or 0, a pure decay), the bound b that accumulate_drift builds step by step is at
    least the exact drift from F_r computed densely at every step, ‖F_t/‖F_t‖ − F_r/‖F_r‖‖_F
    (scale-invariant) or ‖F_t − F_r‖_F/‖F_r‖_F, and after one step it is that drift (each step's
    term is exact). Float64; the slack 1e-12 (1 + drift) is round-off of O(1) unit vectors."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g, dtype=DTYPE)
    reference = X @ X.T
    Fs, bound = reference.clone(), torch.zeros(1, dtype=DTYPE)
    exact = lambda A: (A / A.norm() - reference / reference.norm() if scale_invariant  # noqa: E731
                       else (A - reference) / reference.norm()).norm().item()
    for t, s in enumerate(scales):
        Y = torch.randn(d, int(torch.randint(1, d + 1, (1,), generator=g)), generator=g, dtype=DTYPE)
        C = 0 * Y @ Y.T if s == 0.0 else 10 ** s * Y @ Y.T
        previous, Fs = Fs, beta * Fs + (1 - beta) * C
        accumulate_drift(bound, Fs[None], previous[None], scale_invariant)
        b, e = bound.item(), exact(Fs)
        assert b >= e - 1e-12 * (1 + e), (t, b, e)
        if t == 0:
            assert b == pytest.approx(e, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("scale_invariant", [True, False])
def test_a_step_from_a_zero_factor_makes_the_drift_bound_infinite_not_nan(scale_invariant):
    """The first statistic step (F_0 = 0) has no direction to drift from: b becomes +inf (due, and
    equal to itself in a resumed checkpoint), where the drift itself is NaN; so does an infinite b."""
    F_ = torch.eye(3, dtype=DTYPE)[None]
    for start in (0.0, float("inf")):
        bound = torch.tensor([start], dtype=DTYPE)
        accumulate_drift(bound, F_, torch.zeros_like(F_), scale_invariant)
        assert bound.tolist() == [float("inf")]


@pytest.mark.parametrize("graft", ["none", "adam"])
def test_a_root_is_refreshed_exactly_when_its_drift_bound_exceeds_the_tolerance(graft):
    """refresh_tolerance τ = 0.2, statistics and refresh checks on every step for 12 steps: each
    step equals the reference's, which recomputes factor j's root only when the sum of its
    statistic steps' drifts since its last refresh (‖F_s/‖F_s‖ − F_{s-1}/‖F_{s-1}‖‖_F with a graft;
    without, 1 + b = Π(1 + ‖F_s − F_{s-1}‖_F/‖F_{s-1}‖_F), computed directly on the flattened
    matrices) exceeds τ, and checks at each refresh step that this bound is at least the exact
    drift from the factor at the last refresh; the counters agree, and τ both kept and recomputed
    roots (neither rule alone gives these steps)."""
    hp = dict(EVERY_STEP, refresh_tolerance=0.2, graft=graft)
    c, refs = train_against_reference(make(), hp, data(12))
    pre = c.optimizer.curvature[0]
    for group in pre.groups:
        name, state = group.pieces[0].target.name, pre.group_state(group)
        ref = refs[(name, 0)]
        assert (state["refreshes"].item(), state["skipped"].item()) == (ref.refreshes, ref.skipped), name
        assert ref.refreshes > 2 and ref.skipped > 2, (name, ref.refreshes, ref.skipped)


def test_a_root_is_refreshed_once_max_refresh_interval_steps_old_whatever_its_drift():
    """τ = 10⁹ (no drift is that large) and max_refresh_interval=3, checks on every step for 10
    steps: every root is recomputed on steps 0 (no refresh yet), 3, 6 and 9 only, as the
    reference's; refreshed_at then holds 9 and the drift bound 0 (the refresh of step 9 follows its
    statistics)."""
    hp = dict(EVERY_STEP, refresh_tolerance=1e9, max_refresh_interval=3)
    c, refs = train_against_reference(make(), hp, data(10))
    pre = c.optimizer.curvature[0]
    for group in pre.groups:
        state, ref = pre.group_state(group), refs[(group.pieces[0].target.name, 0)]
        assert ref.refreshes == 4 * 2 and ref.skipped == 6 * 2
        assert (state["refreshes"].item(), state["skipped"].item()) == (ref.refreshes, ref.skipped)
        for j in range(2):
            assert state[f"refreshed_at{j}"].tolist() == [9]
            assert state[f"drifted{j}"].tolist() == [0.0]


@pytest.mark.parametrize("tracked", [dict(refresh_tolerance=1e-300),
                                     dict(refresh_tolerance=1e9, max_refresh_interval=2)])
def test_a_tolerance_that_refreshes_every_root_equals_the_fixed_interval_bitwise(tracked):
    """τ = 0 is the fixed interval (precondition_frequency=2) and keeps no drift state; a run with
    the drift rule on in which every root is due at every check (τ below any drift, or roots
    as old as max_refresh_interval at each check) gives the same parameters and roots bit for bit."""
    batches = data(9)
    runs = []
    for hp in (dict(refresh_tolerance=0.0), tracked):
        c = compile_shampoo(make(), **hp)
        for x, y in batches:
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
            c.step()
        runs.append(c)
    fixed, drift = runs
    for (n, a), b in zip(fixed.named_parameters(), drift.parameters()):
        assert torch.equal(a, b), n
    for g in fixed.optimizer.curvature[0].groups:
        plain, tracked_state = (r.optimizer.curvature[0].group_state(g) for r in runs)
        assert not any(k.startswith(("refreshed", "drifted")) for k in plain) and "skipped" not in plain
        assert tracked_state["refreshes"].tolist() == [2 * 4] and tracked_state["skipped"].tolist() == [0]
        assert all(torch.equal(plain[f"root{j}"], tracked_state[f"root{j}"]) for j in range(2))


def test_checkpoint_resume_keeps_the_drift_rule_state():
    """Save after 5 steps (torch.save / torch.load(weights_only=True)), load into a fresh model and
    optimizer, train 7 more: parameters and optimizer state (the drift bounds, the refresh steps, the counters)
    equal the uninterrupted run's bit for bit, and roots were both kept and recomputed after the
    resume."""
    hp = dict(EVERY_STEP, refresh_tolerance=0.2, max_refresh_interval=4, graft="adam")
    batches = data(12)

    def run(c, part):
        for x, y in part:
            c.zero_grad()
            F.cross_entropy(c(x), y).backward()
            c.step()
        return c

    full = run(compile_shampoo(make(), **hp), batches)
    first = run(compile_shampoo(make(), **hp), batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = compile_shampoo(make(seed=5), **hp)
    resumed.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    counts = {g.key: (s["refreshes"].clone(), s["skipped"].clone()) for g, s in
              zip(resumed.optimizer.curvature[0].groups, resumed.optimizer.curvature[0].states().values())}
    run(resumed, batches[5:])
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    states = [full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]]
    assert states[0].keys() == states[1].keys()
    for i in states[0]:
        assert all(k[:-len("root0")] + "refreshed_at0" in states[0][i] for k in states[0][i] if k.endswith("root0"))
        for k, v in states[0][i].items():
            assert torch.equal(v, states[1][i][k]), k
    pre = resumed.optimizer.curvature[0]
    for g in pre.groups:
        state, (refreshes, skipped) = pre.group_state(g), counts[g.key]
        assert (state["refreshes"] > refreshes).all() and (state["skipped"] > skipped).all(), g.key


@pytest.mark.parametrize("name, value", [("exponent", 0), ("exponent", 2), ("exponent", -0.5),
                                         ("exponent", "sqrt"), ("graft", "x"), ("max_block", 0),
                                         ("precondition_frequency", 0), ("start_preconditioning_step", -1),
                                         ("root_method", "svd"), ("root_method", "cholesky"),
                                         ("refresh_tolerance", -1.0), ("max_refresh_interval", 0)])
def test_bad_hyperparameters_raise_config_error_naming_the_parameter(name, value):
    with pytest.raises(gnfx.ConfigError, match=rf"\b{name}={value!r}"):
        gnfx.compile(make(), optimizer="shampoo", **{name: value})
