"""K-FAC's step against a dense reference built explicitly with torch.kron (docs/design.md §1).

For a block with folded gradient G = [∇W ∇b] (d_out x d_a) and statistics A (d_a x d_a),
S (d_out x d_out), the K-FAC curvature with factored Tikhonov damping is

    K = (A + λ_A I) ⊗ (S + λ_S I),    π = sqrt((tr A / d_a) / (tr S / d_out)),
    λ_A = π √λ,    λ_S = √λ / π,

and the step is U = K⁻¹ vec(G), with the column-major vec(X) = Xᵀ.reshape(-1), for which
vec(S⁻¹ X A⁻¹) = (A⁻¹ ⊗ S⁻¹) vec(X). The reference solves with the explicit Kronecker product,
never with the factored form the implementation uses.

Learning rates and weight decays below are powers of two, exact in any float type; the test at the
end checks that a float64 model steps with its exact learning rate.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from models import SquashedAffine
from models import TanhMLP as MLP

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- models and data


class WithLoose(nn.Module):
    """A SquashedAffine between two linear layers: its weight and bias fall back to AdamW."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.gate = SquashedAffine(4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.gate(self.fc1(x))))


def make(model_cls=MLP, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model_cls(**kwargs).to(DTYPE)


def batches(n, d_in=5, classes=3, size=8, scale=3.0, seed=1):
    """Inputs scaled by `scale` so that tr A / d_a and tr S / d_out differ and π is far from 1."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(size, d_in, generator=g, dtype=DTYPE),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def compile_kfac(model, **hp):
    settings = dict(lr=0.5, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=0.1,
                    stat_every=1, inv_every=1, stat_decay=0.5)
    settings.update(hp)
    return gnfx.compile(model, optimizer="kfac", **settings)


def linear_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def folded(layer, grad=False):
    """[W b] (or W) of a linear layer, or of its gradient."""
    w = layer.weight.grad if grad else layer.weight
    if layer.bias is None:
        return w.detach().clone()
    b = layer.bias.grad if grad else layer.bias
    return torch.cat([w, b.unsqueeze(1)], dim=1).detach().clone()


def forward_backward(c, x, y):
    c.zero_grad()
    F.cross_entropy(c(x), y).backward()


# ----------------------------------------------------------------------------- the reference


def vec(X):
    """Column-major vectorization: vec(X) = Xᵀ.reshape(-1)."""
    return X.T.reshape(-1)


def unvec(v, shape):
    rows, cols = shape
    return v.reshape(cols, rows).T


def pi_correction(A, S):
    return math.sqrt((A.trace().item() / A.shape[0]) / (S.trace().item() / S.shape[0]))


def kfac_matrix(A, S, damping, pi=None):
    """(A + λ_A I) ⊗ (S + λ_S I), explicitly, with the π split of the damping."""
    pi = pi_correction(A, S) if pi is None else pi
    eye = lambda n: torch.eye(n, dtype=A.dtype)  # noqa: E731
    return torch.kron(A + pi * math.sqrt(damping) * eye(A.shape[0]),
                      S + math.sqrt(damping) / pi * eye(S.shape[0]))


def kfac_direction(A, S, G, damping, pi=None):
    """U with vec(U) = K⁻¹ vec(G)."""
    return unvec(torch.linalg.solve(kfac_matrix(A, S, damping, pi), vec(G)), G.shape)


def statistics_of(c, name):
    st = c.statistics(name)
    return st["A"].clone(), st["S"].clone()


# ----------------------------------------------------------------------------- tests


def test_vec_convention_turns_the_factored_product_into_a_kronecker_product():
    """The identity the references rely on: vec(S X A) = (Aᵀ ⊗ S) vec(X)."""
    torch.manual_seed(0)
    S, X, A = torch.randn(3, 3, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE), torch.randn(4, 4, dtype=DTYPE)
    torch.testing.assert_close(vec(S @ X @ A), torch.kron(A.T.contiguous(), S) @ vec(X), **TOL)
    torch.testing.assert_close(unvec(vec(X), X.shape), X)


@pytest.mark.parametrize("root_method", ["cholesky", "eigh", "newton"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("widths", [(5, 4, 3), (5, 4, 4, 4, 3)], ids=["5-4-3", "5-4-4-4-3"])
def test_one_step_equals_the_explicit_kronecker_solve(widths, bias, root_method):
    """After one statistic + refresh step: Δ[W b] = -η ((A+λ_A I) ⊗ (S+λ_S I))⁻¹ vec([∇W ∇b]),
    with the inverses from Cholesky factorizations, eigendecompositions or Newton–Schulz iterations.

    The 5-4-4-4-3 network has two 4x4 layers, which gnfx stacks into one group."""
    model = make(widths=widths, bias=bias)
    c = compile_kfac(model, lr=0.5, damping=0.1, root_method=root_method)
    (x, y), = batches(1)
    forward_backward(c, x, y)
    layers = linear_layers(model)
    before = {n: folded(m) for n, m in layers}
    grads = {n: folded(m, grad=True) for n, m in layers}
    c.step()
    assert [b.name for b in c.layers] == [n for n, _ in layers]  # one block per layer, by module path
    group_sizes = sorted(len(g.pieces) for g in c.optimizer.curvature[0].groups)
    assert group_sizes == ([1, 1] if len(widths) == 3 else [1, 1, 2])
    pis = []
    for n, m in layers:
        A, S = statistics_of(c, n)
        U = kfac_direction(A, S, grads[n], 0.1)
        torch.testing.assert_close(folded(m) - before[n], -0.5 * U, **TOL)
        pis.append(pi_correction(A, S))
        # sensitivity: without the π split (π = 1) the step would be visibly different
        U_no_pi = kfac_direction(A, S, grads[n], 0.1, pi=1.0)
        assert (U - U_no_pi).abs().max() > 1e-3 * U.abs().max()
    assert any(abs(math.log(p)) > math.log(2) for p in pis), pis


def test_statistics_are_those_of_the_batch_on_the_first_step():
    """The reference reads A and S from c.statistics; on the first step they are this batch's
    A = 1/N Σ ā āᵀ and S = N Σ g gᵀ (g = ∂L/∂z of the mean loss), checked here by hand so that
    the Kronecker tests do not rest on gnfx alone."""
    model = make()
    c = compile_kfac(model)
    (x, y), = batches(1)
    layer0, layer1 = model.layers
    z = layer0(x).detach().requires_grad_()
    g, = torch.autograd.grad(F.cross_entropy(layer1(torch.tanh(z)), y), z)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
    forward_backward(c, x, y)
    c.step()
    A, S = statistics_of(c, "layers.0")
    torch.testing.assert_close(A, a.T @ a / len(x), **TOL)
    torch.testing.assert_close(S, len(x) * g.T @ g, **TOL)


@pytest.mark.parametrize("kappa", [1e-4, 1e3], ids=["clipped", "unclipped"])
def test_kl_clipping_scales_the_whole_step_by_nu(kappa):
    """Δ_clipped = ν Δ with ν = min(1, sqrt(κ / Σ_blocks η² ⟨U, ∇W⟩))."""
    lr, damping = 0.5, 0.1
    (x, y), = batches(1)
    runs = {}
    for clip in (0.0, kappa):
        model = make()
        c = compile_kfac(model, lr=lr, damping=damping, kl_clip=clip)
        forward_backward(c, x, y)
        layers = linear_layers(model)
        before = {n: folded(m) for n, m in layers}
        grads = {n: folded(m, grad=True) for n, m in layers}
        c.step()
        runs[clip] = ({n: folded(m) - before[n] for n, m in layers}, grads, c)
    steps, grads, c = runs[0.0]
    vfv = 0.0
    for n in grads:
        A, S = statistics_of(c, n)
        U = kfac_direction(A, S, grads[n], damping)
        torch.testing.assert_close(steps[n], -lr * U, **TOL)
        vfv += lr ** 2 * (U * grads[n]).sum().item()
    nu = min(1.0, math.sqrt(kappa / vfv))
    if kappa < 1:
        assert nu < 0.5, nu  # the clip is active in this case
    else:
        assert nu == 1.0
    for n, step in runs[kappa][0].items():
        torch.testing.assert_close(step, nu * steps[n], **TOL)


def test_momentum_and_decoupled_weight_decay_over_two_steps():
    """m₁ = U₁, θ₁ = θ₀(1-ηλ) - η m₁;  m₂ = μ m₁ + U₂, θ₂ = θ₁(1-ηλ) - η m₂,
    with U_t from the statistics (an EMA with β = 0.5) after step t."""
    lr, wd, mu, damping = 0.5, 0.25, 0.5, 0.1
    model = make()
    c = compile_kfac(model, lr=lr, weight_decay=wd, momentum=mu, damping=damping)
    layers = linear_layers(model)
    theta = {n: folded(m) for n, m in layers}
    momentum = {n: torch.zeros_like(theta[n]) for n in theta}
    for x, y in batches(2):
        forward_backward(c, x, y)
        grads = {n: folded(m, grad=True) for n, m in layers}
        c.step()
        for n, m in layers:
            A, S = statistics_of(c, n)
            momentum[n] = mu * momentum[n] + kfac_direction(A, S, grads[n], damping)
            theta[n] = theta[n] * (1 - lr * wd) - lr * momentum[n]
            torch.testing.assert_close(folded(m), theta[n], **TOL)
    # both terms mattered: the same steps without momentum/decay end elsewhere
    plain = make()
    cp = compile_kfac(plain, lr=lr, damping=damping)
    for x, y in batches(2):
        forward_backward(cp, x, y)
        cp.step()
    assert (folded(plain.layers[0]) - theta["layers.0"]).abs().max() > 1e-3


def test_fallback_parameters_take_the_adamw_step():
    """The SquashedAffine's weight and bias (no curvature block) follow torch.optim.AdamW exactly."""
    lr, wd = 0.05, 0.1
    model = make(WithLoose)
    c = compile_kfac(model, lr=lr, weight_decay=wd, betas=(0.8, 0.9), eps=1e-6)
    assert {b.name for b in c.layers} == {"fc1", "fc2"}
    shadow = [p.detach().clone().requires_grad_() for p in model.gate.parameters()]
    adamw = torch.optim.AdamW(shadow, lr=lr, weight_decay=wd, betas=(0.8, 0.9), eps=1e-6)
    fc1_before = folded(model.fc1)
    for x, y in batches(3):
        forward_backward(c, x, y)
        for s, p in zip(shadow, model.gate.parameters()):
            s.grad = p.grad.clone()
        c.step()
        adamw.step()
        for s, p in zip(shadow, model.gate.parameters()):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(folded(model.fc1), fc1_before)  # the blocks moved too


def test_inverses_change_only_on_refresh_steps_and_stale_ones_are_used_between():
    """inv_every=3, statistics every step: A_inv, S_inv are recomputed at steps 0, 3, 6 from the
    statistics of that step, and steps 1, 2, 4, 5 use the stale inverses."""
    lr, damping, inv_every = 0.5, 0.1, 3
    model = make()
    c = compile_kfac(model, lr=lr, damping=damping, inv_every=inv_every)
    pre = c.optimizer.curvature[0]
    layer = model.layers[0]
    group = next(g for g in pre.groups if g.pieces[0].target.name == "layers.0")
    stale = None
    previous = None
    for t, (x, y) in enumerate(batches(7)):
        forward_backward(c, x, y)
        G = folded(layer, grad=True)
        before = folded(layer)
        c.step()
        state = pre.group_state(group)
        A_inv, S_inv = state["A_inv"][0].clone(), state["S_inv"][0].clone()
        A, S = statistics_of(c, "layers.0")
        if t % inv_every == 0:
            pi = pi_correction(A, S)
            eye = lambda n: torch.eye(n, dtype=DTYPE)  # noqa: E731
            torch.testing.assert_close(A_inv, torch.linalg.inv(A + pi * damping ** 0.5 * eye(A.shape[0])), **TOL)
            torch.testing.assert_close(S_inv, torch.linalg.inv(S + damping ** 0.5 / pi * eye(S.shape[0])), **TOL)
            if previous is not None:
                assert not torch.allclose(A_inv, previous[0]) and not torch.allclose(S_inv, previous[1])
            stale = (A, S)
        else:
            assert torch.equal(A_inv, previous[0]) and torch.equal(S_inv, previous[1])
            # the statistics moved on, the step uses the ones of the last refresh
            assert not torch.allclose(A, stale[0])
        torch.testing.assert_close(folded(layer) - before, -lr * kfac_direction(*stale, G, damping), **TOL)
        previous = (A_inv, S_inv)


@pytest.mark.parametrize("name, value", [("damping", -1), ("damping", 0), ("kl_clip", -1),
                                         ("inv_every", 0), ("inv_every", 1.5), ("momentum", 1.0),
                                         ("momentum", -0.1), ("root_method", "qr")])
def test_bad_hyperparameters_raise_config_error_naming_the_parameter(name, value):
    with pytest.raises(gnfx.ConfigError, match=rf"\b{name}={value!r}"):
        gnfx.compile(make(), optimizer="kfac", **{name: value})


def test_float64_model_steps_with_the_exact_learning_rate():
    """With lr = 0.1 (not a float32 number) the float64 step is still -η K⁻¹ vec(G) to round-off."""
    lr, wd, damping = 0.1, 0.01, 0.1
    model = make()
    c = compile_kfac(model, lr=lr, weight_decay=wd, damping=damping)
    (x, y), = batches(1)
    forward_backward(c, x, y)
    layer = model.layers[0]
    G, before = folded(layer, grad=True), folded(layer)
    c.step()
    A, S = statistics_of(c, "layers.0")
    expected = before * (1 - lr * wd) - lr * kfac_direction(A, S, G, damping)
    torch.testing.assert_close(folded(layer), expected, **TOL)
