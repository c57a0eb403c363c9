"""gnfx.diagnose against cases whose answer is known.

One linear layer z = W a + b with the MSE loss has the GGN G = A ⊗ (2/C) I whatever W and b are
(H_ℓ = (2/C) I, J = ā ⊗ I), and K-FAC with fisher="type2" collects exactly A and S = (2/C) I
(tests/test_fisher.py). So its curvature error is 0, and with a tiny damping its step
(S + λ_S I)⁻¹ G (A + λ_A I)⁻¹ is the Newton step (G + λI)⁻¹ g: cosine 1. A diagonal preconditioner
of correlated inputs misses the off-diagonal of A: a larger error, a smaller cosine.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.diagnose import _Unit
from gnfx.ggn import ggn_matrix, ggn_vp, hvp
from gnfx.targets import fold
from models import SquashedAffine

DTYPE = torch.float64


def regression(n=64, d_in=4, d_out=3, seed=0):
    """Correlated inputs with a nonzero mean (so A is far from diagonal) and targets."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=DTYPE)
    x = torch.randn(n, d_in, generator=g, dtype=DTYPE) @ mix + 1.0
    return x, torch.randn(n, d_out, generator=g, dtype=DTYPE)


def linear(d_in=4, d_out=3):
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).to(DTYPE)


def trained(model, x, y, loss_fn, steps=3, **hparams):
    c = gnfx.compile(model, **hparams)
    for _ in range(steps):
        loss_fn(c(x), y).backward()
        c.step()
        c.zero_grad()
    return c


EXACT_KFAC = dict(optimizer="kfac", fisher="type2", loss="mse", damping=1e-12, inv_every=1, stat_every=1,
                  stat_decay=0.0, kl_clip=0.0, lr=1e-2)
FISHER_DIAG = dict(optimizer="diag", source="fisher", fisher="type2", loss="mse", stat_every=1, lr=1e-2)


def test_exact_kfac_has_no_curvature_error_and_steps_along_the_newton_direction():
    x, y = regression()
    c = trained(linear(), x, y, F.mse_loss, **EXACT_KFAC)
    (record,) = gnfx.diagnose(c, (x, y), loss="mse", damping=1e-12, cg_tol=1e-12, verbose=False)
    assert (record.name, record.kind, record.preconditioner, record.size) == ("weight", "linear", "kfac", 15)
    assert record.curvature_error < 1e-10
    assert record.cg_residual < 1e-10
    assert record.cosine == pytest.approx(1.0, abs=1e-8)


def test_the_cosine_is_that_of_adams_step_and_the_dense_newton_solve():
    """CG on the restricted products solves (G + λI) x = g of the dense GGN (ggn_matrix); diag's
    direction is g / (√v̂ + ε), v̂ = v / (1 - β₂ᵗ)."""
    x, y = regression()
    c = trained(linear(), x, y, F.mse_loss, **FISHER_DIAG)
    layer = linear()
    layer.load_state_dict(c.state_dict())  # the trained parameters, in a plain module
    F.mse_loss(layer(x), y).backward()
    g = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
    G = ggn_matrix(layer, "mse", x, y)
    newton = torch.linalg.solve(G + 0.1 * torch.eye(len(g), dtype=DTYPE), g)
    states = [c.optimizer.state_of(n) for n in ("weight", "bias")]
    v_hat = torch.cat([s["exp_avg_sq"].flatten() / (1 - 0.999 ** s["step"]) for s in states])
    adam = g / (v_hat.sqrt() + 1e-8)
    (record,) = gnfx.diagnose(c, (x, y), loss="mse", damping=0.1, cg_tol=1e-12, verbose=False)
    assert record.cosine == pytest.approx(float(adam @ newton / (adam.norm() * newton.norm())), abs=1e-10)


def test_the_better_approximation_ranks_above_the_worse():
    x, y = regression()
    kfac = gnfx.diagnose(trained(linear(), x, y, F.mse_loss, **EXACT_KFAC), (x, y), loss="mse", damping=1e-6,
                         verbose=False)[0]
    diag = gnfx.diagnose(trained(linear(), x, y, F.mse_loss, **FISHER_DIAG), (x, y), loss="mse", damping=1e-6,
                         verbose=False)[0]
    assert kfac.curvature_error < 1e-6 < 0.1 < diag.curvature_error
    assert kfac.cosine > 0.999 > 0.9 > diag.cosine


class TwoLayers(nn.Module):
    """Two linear layers side by side, z = [W₁ x₁₂ + b₁, W₂ x₃₄ + b₂]: with the MSE loss each
    block's GGN is A_i ⊗ (2/C) I, which K-FAC with fisher="type2" collects exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.one, self.two = nn.Linear(2, 2).to(DTYPE), nn.Linear(2, 1).to(DTYPE)

    def forward(self, x):
        return torch.cat([self.one(x[:, :2]), self.two(x[:, 2:])], dim=1)


def test_two_instances_of_one_preconditioner_are_each_asked_for_their_own_blocks():
    """A policy that gives kfac two sets of hyperparameters makes two instances, "kfac" and
    "kfac_v2": each block is measured with the instance that serves it, both exact here."""
    x, y = regression()
    hparams = {**EXACT_KFAC, "optimizer": {"one": "kfac", "two": ("kfac", {"momentum": 0.5})}}
    c = trained(TwoLayers(), x, y, F.mse_loss, **hparams)
    records = gnfx.diagnose(c, (x, y), loss="mse", damping=1e-12, cg_tol=1e-12, verbose=False)
    assert [(r.name, r.preconditioner) for r in records] == [("one", "kfac"), ("two", "kfac_v2")]
    for r in records:
        assert r.curvature_error < 1e-10 and r.cg_residual < 1e-10, r
        assert r.cosine == pytest.approx(1.0, abs=1e-8), r


class SmallNet(nn.Module):
    """Linear → SquashedAffine (loose parameters, served by diag or shampoo) → tanh → linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 8), SquashedAffine(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def state_snapshot(c):
    opt = c.optimizer
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors += [v for b in opt.statistics.blocks.values() for v in b.values.values()]
    tensors += [p for p in c.parameters()] + [p.grad for p in c.parameters() if p.grad is not None]
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("optimizer", list(gnfx.REGISTRY))
def test_every_preconditioner_gets_finite_numbers_and_keeps_its_state(optimizer):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    # shampoo: preconditioning from the first step, and fc1's 8 x 6 [W b] cut into four pieces
    hparams = {"start_preconditioning_step": 1, "max_block": 4} if optimizer == "shampoo" else {}
    c = trained(SmallNet(), x, y, F.cross_entropy, steps=3, optimizer=optimizer, stat_every=1, lr=1e-2, **hparams)
    F.cross_entropy(c(x), y).backward()  # gradients present: diagnose must leave them too
    before = state_snapshot(c)
    records = gnfx.diagnose(c, (x, y), loss="cross_entropy", probes=2, cg_max_iter=60, verbose=False)
    assert [(r.name, r.kind) for r in records] == [("fc1", "linear"), ("fc2", "linear"),
                                                    ("norm.weight", "tensor"), ("norm.bias", "tensor")]
    for r in records:
        assert -1 <= r.cosine <= 1 and math.isfinite(r.cg_residual), r
        defined = r.preconditioner in ("kfac", "ekfac", "rank1", "diag")
        assert (r.curvature_error is not None) == defined and (not defined or math.isfinite(r.curvature_error)), r
    for a, b in zip(before, state_snapshot(c), strict=True):
        assert torch.equal(a, b)
    assert c.training


@dataclasses.dataclass
class Prediction:
    """A Hugging Face-style output: a scalar loss first, then the logits, then more."""

    loss: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor


class Structured(SmallNet):
    def forward(self, x):
        h = torch.tanh(self.norm(self.fc1(x)))
        z = self.fc2(h)
        return Prediction(z.square().mean(), z, h)


def test_a_model_returning_an_output_object_is_measured_on_its_logits():
    """diagnose and gnfx.ggn take the logits of an output object (the first floating tensor of
    at least one dimension, as the compiled forward does): the same numbers as the model that
    returns the logits alone (float64: equal to round-off)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (32,), generator=g)
    plain = trained(SmallNet().to(DTYPE), x, y, F.cross_entropy, optimizer="kfac", stat_every=1)
    structured = trained(Structured().to(DTYPE), x, y, lambda out, y: F.cross_entropy(out.logits, y), optimizer="kfac",
                         stat_every=1)
    expected = gnfx.diagnose(plain, (x, y), loss="cross_entropy", probes=1, cg_max_iter=5, verbose=False)
    got = gnfx.diagnose(structured, (x, y), loss="cross_entropy", probes=1, cg_max_iter=5, verbose=False)
    assert [r.name for r in got] == [r.name for r in expected]
    for r, e in zip(got, expected):
        assert r.curvature_error == pytest.approx(e.curvature_error, rel=1e-10)
        assert r.cosine == pytest.approx(e.cosine, rel=1e-10)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in SmallNet().parameters()]
    for product in (ggn_vp, hvp):
        got = product(Structured().to(DTYPE), "cross_entropy", x, y, v)
        for a, b in zip(got, product(SmallNet().to(DTYPE), "cross_entropy", x, y, v)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Bag(nn.Module):
    """Embedding → mean over tokens → linear: a block whose A is diagonal, W read transposed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(self.embed(idx).mean(1))


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_conv_and_embedding_blocks(optimizer):
    from models import CNN

    g = torch.Generator().manual_seed(0)
    cases = [(CNN(channels=2, width=3, classes=3), torch.randn(8, 2, 6, 6, generator=g, dtype=DTYPE)),
             (Bag(), torch.randint(0, 10, (8, 5), generator=g))]
    for model, x in cases:
        y = torch.randint(0, 3, (8,), generator=g)
        c = trained(model, x, y, F.cross_entropy, optimizer=optimizer, stat_every=1, inv_every=1)
        records = gnfx.diagnose(c, (x, y), loss="cross_entropy", probes=2, cg_max_iter=20, verbose=False)
        assert {r.kind for r in records} == ({"conv", "linear"} if isinstance(model, CNN) else {"embedding", "linear"})
        for r in records:
            assert math.isfinite(r.curvature_error) and -1 <= r.cosine <= 1, r


def test_the_table_lists_every_block(capsys):
    x, y = regression()
    c = trained(linear(), x, y, F.mse_loss, **FISHER_DIAG)
    gnfx.diagnose(c, (x, y), loss="mse", probes=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["block", "kind", "preconditioner"]
    assert lines[2].split()[:3] == ["weight", "linear", "diag"]


@pytest.mark.parametrize("kind, module, view, matrix", [
    ("conv", nn.Conv2d(2, 3, 3), "flatten", lambda w, b: fold(w.flatten(1), b)),
    ("embedding", nn.Embedding(7, 4), "t", lambda w, b: w.t()),
    ("linear", nn.Linear(4, 5, bias=False), "", lambda w, b: w),
])
def test_unit_layout_is_the_preconditioners_matrix(kind, module, view, matrix):
    """[W b] with W read as the matrix of z = W a (gnfx.targets.as_matrix), and back."""
    params = dict(module.named_parameters())
    unit = _Unit("m", kind, tuple(params), view, True)
    M = unit.matrix(params)
    expected = matrix(params["weight"], params.get("bias"))
    torch.testing.assert_close(M, expected)
    back = unit.tensors(M, {n: p.shape for n, p in params.items()})
    for n, p in params.items():
        torch.testing.assert_close(back[n], p)


def test_diagnose_needs_a_compiled_model_after_a_step():
    x, y = regression()
    with pytest.raises(gnfx.ConfigError, match="gnfx.compile"):
        gnfx.diagnose(linear(), (x, y), loss="mse")
    with pytest.raises(gnfx.GnfxError, match="at least one optimizer step"):
        gnfx.diagnose(gnfx.compile(linear()), (x, y), loss="mse")
