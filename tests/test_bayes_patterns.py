"""Bayesian-neural-network patterns (benchmarks/bayes_probe.py, benchmarks/results/first_contact_13_bayes.md).

Bayes by Backprop samples each weight on every call, W = μ + σ(ρ) ⊙ ε, ε ~ N(0, I):

- torchbnn's BayesLinear draws ε with `torch.randn_like(log σ)`, σ = exp(log σ);
- bayesian-torch's LinearReparameterization draws it into a buffer, `self.eps_weight.data.normal_()`,
  σ = softplus(ρ) (passes/buffer_draws.py).

∂W/∂μ = I, so the block of the layer holds μ with the statistics of the sampled W (the taps' a and δ at the
linear node are those of the call that used that W): exact for μ (gnfx.reparametrization.SampledWeight,
passes/sampled_weights.py). References: hooks on the layer calls of the plain module at the same seed (the
same ε), float64, and the plain module's loss and gradients stepped in lockstep.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

from references import TOL, kfac_factors, record_linear_calls
from steps import compile_for_statistics, statistic_step


class SampledLinear(nn.Module):
    """A Bayes-by-Backprop linear layer: torchbnn's (`randn_like`, exp) or, with `into_buffer`,
    bayesian-torch's (ε drawn in place into a buffer, softplus)."""

    def __init__(self, d_in: int, d_out: int, into_buffer: bool):
        super().__init__()
        self.into_buffer = into_buffer
        self.weight_mu = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.weight_rho = nn.Parameter(torch.full((d_out, d_in), -3.0))
        self.bias_mu = nn.Parameter(torch.zeros(d_out))
        self.bias_rho = nn.Parameter(torch.full((d_out,), -3.0))
        self.register_buffer("eps_weight", torch.zeros(d_out, d_in), persistent=False)
        self.register_buffer("eps_bias", torch.zeros(d_out), persistent=False)

    def forward(self, x):
        if self.into_buffer:
            weight = self.weight_mu + F.softplus(self.weight_rho) * self.eps_weight.data.normal_()
            bias = self.bias_mu + F.softplus(self.bias_rho) * self.eps_bias.data.normal_()
        else:
            weight = self.weight_mu + torch.exp(self.weight_rho) * torch.randn_like(self.weight_rho)
            bias = self.bias_mu + torch.exp(self.bias_rho) * torch.randn_like(self.bias_rho)
        return F.linear(x, weight, bias)


def bnn(into_buffer: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(SampledLinear(4, 8, into_buffer), nn.Tanh(), SampledLinear(8, 3, into_buffer)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("into_buffer, capture", [(False, "fx"), (True, "fx"), (False, "export")])
def test_a_sampled_weight_is_a_linear_block_over_its_mean_with_the_statistics_of_the_sample(into_buffer, capture):
    """Before: torchbnn's μ + exp(log σ) ⊙ ε was read as a position table added to an activation (a "position"
    block, factors of another shape); bayesian-torch's draw into a buffer made each layer an opaque leaf (no
    block; the draw a forward side effect). (torch.export cannot capture a draw into `buffer.data`: "a fake
    tensor in the exported program's constants"; capture="auto" takes torch.fx's graph there.)"""
    model, reference, (x, y) = bnn(into_buffer), bnn(into_buffer), batch()
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    torch.manual_seed(5)
    statistic_step(c, x, y)
    kinds = {b.name: b.kind for b in c.layers}
    assert kinds == {"0.weight_mu": "linear", "2.weight_mu": "linear"}, kinds
    assert {b.bias for b in c.layers} == {"0.bias_mu", "2.bias_mu"}
    torch.manual_seed(5)  # the same ε in the reference's forward
    calls, m = record_linear_calls(reference, ["0", "2"], x, y)
    for name in ("0", "2"):
        want = kfac_factors(calls[name], True, "expand", m)
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(f"{name}.weight_mu")[factor], want[factor], **TOL)


class KLReturningNet(nn.Module):
    """bayesian-torch's models: each layer returns (out, KL(q(μ, σ) ‖ N(0, 1))), the forward (logits, Σ KL)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = SampledLinear(4, 8, True), SampledLinear(8, 3, True)

    @staticmethod
    def kl(layer: SampledLinear) -> torch.Tensor:
        terms = []
        for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
            sigma = F.softplus(rho)
            terms.append((-torch.log(sigma) + (sigma ** 2 + mu ** 2) / 2 - 0.5).mean())
        return terms[0] + terms[1]

    def forward(self, x):
        hidden = torch.tanh(self.fc1(x))
        return self.fc2(hidden), self.kl(self.fc1) + self.kl(self.fc2)


def test_a_sampled_weight_whose_mean_a_kl_returned_beside_the_output_reads_is_a_block_over_the_mean():
    """Before: μ's second use, the KL the forward returns, made it fall back ('used by call_function sub'); the
    KL is a term of its own, which reaches μ's gradient directly: the block's statistics are the data path's,
    exact, and the loss and every gradient (the KL's in ∇μ) are the module's."""
    torch.manual_seed(0)
    model = KLReturningNet().double()
    torch.manual_seed(0)
    reference = KLReturningNet().double()
    x, y = batch()
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")

    def elbo(m):
        logits, kl = m(x)
        return F.cross_entropy(logits, y) + kl / len(x)
    torch.manual_seed(5)
    loss = elbo(c)
    loss.backward()
    calls = {"fc1": [], "fc2": []}
    for name, calls_of in calls.items():  # the layers' calls (a, g) on the reference's forward, by plain hooks
        def hook(_, inputs, output, calls_of=calls_of):
            calls_of.append([inputs[0].detach(), None])
            output.register_hook(lambda g, record=calls_of[-1]: record.__setitem__(1, g.detach()))
        getattr(reference, name).register_forward_hook(hook)
    torch.manual_seed(5)
    elbo(reference).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    c.step()
    assert {b.name: b.kind for b in c.layers} == {"fc1.weight_mu": "linear", "fc2.weight_mu": "linear"}
    for name in ("fc1", "fc2"):
        want = kfac_factors(calls[name], True, "expand", len(x))
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(f"{name}.weight_mu")[factor], want[factor], **TOL)


def test_a_draw_into_a_buffer_is_drawn_anew_on_every_call_as_the_module_draws_it():
    """The compiled model's forward is the module's, draw for draw: the same losses and gradients at the same
    seeds, a new ε on every call (before: the layer was opaque, so this held by running the module's code)."""
    model, (x, y) = bnn(True), batch()
    reference = bnn(True)
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx")
    for seed in (3, 4):
        torch.manual_seed(seed)
        loss = F.cross_entropy(c(x), y)
        torch.manual_seed(seed)
        loss_ref = F.cross_entropy(reference(x), y)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, **TOL)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)
        model.zero_grad()
        reference.zero_grad()
    assert [b.kind for b in c.layers] == ["linear", "linear"], c.layers.fallbacks
    assert not torch.equal(model[0].eps_weight, torch.zeros_like(model[0].eps_weight))
    torch.manual_seed(3)
    first = c(x)
    assert not torch.equal(first, c(x))  # a new ε on the second call



class ReadsUnsetBuffer(nn.Module):
    """A layer whose forward reads, and never changes, a buffer allocated without values that holds NaNs
    (bayesian-torch allocates its ε buffers with `torch.Tensor(n, m)`, whose memory may hold any bits)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("unset", torch.full((3,), float("nan")))

    def forward(self, x):
        return self.linear(x) + torch.nan_to_num(self.unset)


def test_a_buffer_holding_nans_that_the_forward_reads_is_no_side_effect():
    """Before: NaN != NaN made the unchanged buffer 'changed in place', a forward side effect, and the
    forward that read it could not be captured (a CaptureError at the first call, at random for
    bayesian-torch's layers, whose unset memory holds NaNs on some runs only)."""
    model = nn.Sequential(ReadsUnsetBuffer(), nn.Tanh(), nn.Linear(3, 2)).double()
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx")
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    F.cross_entropy(c(x), y).backward()
    c.step()
    assert [b.kind for b in c.layers] == ["linear", "linear"], c.layers.fallbacks
    assert torch.isnan(model[0].unset).all()


class PenaltyReturningNet(nn.Module):
    """Plain layers whose weights also feed a term the forward returns beside its output: bayesian-torch's
    Flipout layers called with return_kl=True read μ in `F.linear(x, μ, b_μ)` and in their KL (here a penalty
    of the weights, `mean()`ed), or, with `prototypes`, the first layer's weight returned as it is (a tensor the
    loss could combine with the features, no term of its own)."""

    def __init__(self, prototypes: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.prototypes = nn.Linear(4, 8), nn.Linear(8, 3), prototypes

    def forward(self, x):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        if self.prototypes:
            return logits, self.fc1.weight.T
        return logits, (self.fc1.weight ** 2).mean() + (self.fc2.weight - 0.1).abs().mean()


def test_a_weight_that_also_feeds_a_penalty_returned_beside_the_output_is_still_a_block():
    """Before: the penalty's use made both weights fall back ('used by call_function pow'); now the blocks'
    statistics are the data path's (exact against hooks) and the gradient the model's, penalty included. A
    weight returned as it is still falls back."""
    torch.manual_seed(0)
    model = PenaltyReturningNet().double()
    torch.manual_seed(0)
    reference = PenaltyReturningNet().double()
    x, y = batch()
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    logits, penalty = c(x)
    (F.cross_entropy(logits, y) + penalty).backward()
    calls = {"fc1": [], "fc2": []}
    for name, calls_of in calls.items():
        def hook(_, inputs, output, calls_of=calls_of):
            calls_of.append([inputs[0].detach(), None])
            output.register_hook(lambda g, record=calls_of[-1]: record.__setitem__(1, g.detach()))
        getattr(reference, name).register_forward_hook(hook)
    logits_ref, penalty_ref = reference(x)
    (F.cross_entropy(logits_ref, y) + penalty_ref).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    c.step()
    assert {b.name: b.kind for b in c.layers} == {"fc1": "linear", "fc2": "linear"}, c.layers.fallbacks
    for name in ("fc1", "fc2"):
        want = kfac_factors(calls[name], True, "expand", len(x))
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[factor], **TOL)
    returned = gnfx.compile(PenaltyReturningNet(prototypes=True).double(), "kfac", lr=1e-2, capture="fx")
    logits, prototypes = returned(x)
    (F.cross_entropy(logits, y) + prototypes.sum()).backward()
    assert [f.param for f in returned.layers.fallbacks] == ["fc1.weight", "fc1.bias"]


class NumpyScalars(nn.Module):
    """A forward computing with numpy scalars, on either side of a traced value: `h / np.sqrt(d)` (attention's
    scale as many write it) and blitz's `-np.log(np.sqrt(2π)) - torch.log(σ)`."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        import numpy as np
        hidden = torch.tanh(self.fc1(x)) / np.sqrt(8)
        return self.fc2(-np.log(np.sqrt(2 * np.pi)) - hidden * np.float32(2.0))


def test_numpy_scalars_in_the_forward_are_numbers_of_the_graph():
    """Before: `h / np.sqrt(d)` put np.float64(...) into the generated code, which does not import numpy (a
    NameError at the first call), and a numpy scalar on the left failed the trace ('invalid __array_struct__')."""
    torch.manual_seed(0)
    model = NumpyScalars().double()
    torch.manual_seed(0)
    reference = NumpyScalars().double()
    x, y = batch()
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx")
    loss = F.cross_entropy(c(x), y)
    loss.backward()
    F.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), y), **TOL)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    c.step()
    assert c.layers.form == "fx" and [b.kind for b in c.layers] == ["linear", "linear"], c.layers.fallbacks


def test_bayes_probe_reports_blocks_over_the_means_and_exact_statistics_of_a_stand_in(monkeypatch):
    """benchmarks.bayes_probe without torchbnn: `probe` on a stand-in Bayesian MLP (one layer drawing into a
    buffer, one with randn_like) gives one row: fx, half the entries (the means) in blocks, lockstep gaps 0 and
    the hooked factors of the 2 linear blocks."""
    from benchmarks import bayes_probe

    def stand_in(name):
        return nn.Sequential(nn.Flatten(), SampledLinear(64, 16, True), nn.Tanh(), SampledLinear(16, 10, False))

    def cross_entropy_only(name, dtype=torch.float32):
        g = torch.Generator().manual_seed(1)
        batch = torch.randn(32, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g)
        return batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])
    monkeypatch.setattr(bayes_probe, "build", stand_in)
    monkeypatch.setattr(bayes_probe, "problem", cross_entropy_only)
    row = bayes_probe.probe("tbnn_cnn", "kfac_lr", steps=2).split(" | ")
    assert row[2:4] == ["fx", "50.0%"], row
    loss_gap, grad_gap, factors = row[4].replace(";", ",").split(", ", 2)
    assert float(loss_gap) == 0 and float(grad_gap) < 1e-12, row[4]
    assert factors.endswith("(M 32, 2 linear blocks)"), row[4]
    assert all(float(gap.split()[1]) < 1e-5 for gap in factors.split(" (")[0].split(", ")), row[4]


class SampledConv(nn.Module):
    """bayesian-torch's Conv2dReparameterization: `F.conv2d(x, μ + softplus(ρ) ⊙ ε, b_μ + softplus(ρ_b) ⊙ ε_b)`,
    ε drawn into buffers; a 3x3 kernel, padding 1."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.mu_kernel = nn.Parameter(torch.randn(c_out, c_in, 3, 3) / (3 * c_in ** 0.5))
        self.rho_kernel = nn.Parameter(torch.full((c_out, c_in, 3, 3), -3.0))
        self.mu_bias = nn.Parameter(torch.zeros(c_out))
        self.rho_bias = nn.Parameter(torch.full((c_out,), -3.0))
        self.register_buffer("eps_kernel", torch.zeros(c_out, c_in, 3, 3), persistent=False)
        self.register_buffer("eps_bias", torch.zeros(c_out), persistent=False)

    def forward(self, x):
        kernel = self.mu_kernel + F.softplus(self.rho_kernel) * self.eps_kernel.data.normal_()
        bias = self.mu_bias + F.softplus(self.rho_bias) * self.eps_bias.data.normal_()
        return F.conv2d(x, kernel, bias, padding=1)


def test_a_sampled_convolution_is_a_conv_block_over_its_mean_with_the_patches_statistics_of_the_sample():
    """K-FAC's A and S of the sampled convolution against its patches (F.unfold of the hooked input) and
    hooked output gradients at the same seed (test_conv.py's expand factors)."""
    from test_conv import conv_factors

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(SampledConv(2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    model, reference = cnn(), cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    torch.manual_seed(5)
    statistic_step(c, x, y)
    assert c.layers["0.mu_kernel"].kind == "conv" and c.layers["0.mu_kernel"].bias == "0.mu_bias"
    seen = {}

    def hook(_, inputs, output):
        seen["x"] = inputs[0].detach()
        output.register_hook(lambda grad: seen.__setitem__("g", grad.detach()))
    reference[0].register_forward_hook(hook)
    torch.manual_seed(5)
    F.cross_entropy(reference(x), y).backward()
    a = F.unfold(seen["x"], 3, padding=1).transpose(1, 2)
    want = conv_factors(a, seen["g"].flatten(2).transpose(1, 2), True, "expand", len(x))
    for factor in ("A", "S"):
        torch.testing.assert_close(c.statistics("0.mu_kernel")[factor], want[factor], **TOL)
