"""Patterns of generative-model training libraries (k-diffusion, torchcfm, normflows; benchmarks/gen_probe.py,
benchmarks/results/first_contact_13_gen.md), each with a plain-torch stand-in, float64, against plain hooks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

from references import TOL, hook_statistics, kfac_factors, record_linear_calls
from steps import compile_for_statistics, statistic_step


class MaskedLinear(nn.Linear):
    """normflows' (and nflows') MADE layer: `F.linear(x, self.weight * self.mask, self.bias)`, a 0/1 float mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.double())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveInverse(nn.Module):
    """normflows' Autoregressive.inverse (the direction its log_prob and forward_kld run for a masked
    autoregressive flow): the MADE called once per feature in a loop, each call on the previous call's output,
    so each masked weight is multiplied by its mask once per call."""

    def __init__(self, features: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.made = nn.Sequential(MaskedLinear((torch.rand(8, features) < 0.6).double()), nn.Tanh(),
                                  MaskedLinear((torch.rand(features, 8) < 0.6).double()))
        self.features = features

    def forward(self, x):
        h = torch.zeros_like(x)
        for _ in range(self.features):
            h = x - self.made(h)
        return h


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_masked_weight_multiplied_by_its_mask_at_every_call_is_one_block_over_the_calls(capture):
    """Each call's product M ⊙ V stands for V: one block whose sites are the calls, its A and S those of hooks
    on every call (positions of the calls pooled); before, V fell back (used by 4 products, 'mul.Tensor')."""
    model = AutoregressiveInverse().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 4, (16,))
    want = hook_statistics(model, ["made.0", "made.2"], x, y)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    statistic_step(c, x, y)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    for name in ("made.0", "made.2"):
        assert len(c.layers[name].sites) == 4
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[name][factor], **TOL)


class Coupling(nn.Module):
    """normflows' AffineCoupling: z2 shifted and scaled by a network of z1; `inverse` (x → z) is the direction
    forward_kld and log_prob run."""

    def __init__(self):
        super().__init__()
        self.param_map = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z):
        shift, scale = self.param_map(z[:, :1]).chunk(2, 1)
        return torch.cat([z[:, :1], z[:, 1:] * scale.exp() + shift], 1), scale.sum(1)

    def inverse(self, z):
        shift, scale = self.param_map(z[:, :1]).chunk(2, 1)
        return torch.cat([z[:, :1], (z[:, 1:] - shift) * (-scale).exp()], 1), -scale.sum(1)


class CouplingBlock(nn.Module):
    """normflows' AffineCouplingBlock: its coupling's inverse, then a swap of the two halves."""

    def __init__(self):
        super().__init__()
        self.flows = nn.ModuleList([Coupling()])

    def forward(self, z):
        z, log_det = self.flows[0](z)
        return z.flip(1), log_det

    def inverse(self, z):
        z, log_det = self.flows[0].inverse(z.flip(1))
        return z, log_det


class Flow(nn.Module):
    """normflows' NormalizingFlow: users train `loss = model.forward_kld(x)`, which calls each layer's `inverse`,
    never its forward, and returns the loss (the log-dets summed in it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.flows = nn.ModuleList([CouplingBlock() for _ in range(3)])

    def forward(self, z):
        for flow in self.flows:
            z, _ = flow(z)
        return z

    def forward_kld(self, x):
        log_q, z = torch.zeros(len(x), dtype=x.dtype), x
        for i in range(len(self.flows) - 1, -1, -1):
            z, log_det = self.flows[i].inverse(z)
            log_q = log_q + log_det
        return -(log_q - 0.5 * (z ** 2).sum(1)).mean()


class ForwardKLD(nn.Module):
    """The plain reference: a forward that returns the flow's forward_kld."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.forward_kld(x)


def test_a_method_calling_its_layers_other_methods_opens_the_layers_they_call():
    """methods=["forward_kld"]: the layers' `inverse` runs as their Python code and the linear layers it calls
    are blocks, their A and S those of hooks on every call (S = N Σ g gᵀ: the loss is a mean over the N
    examples); before, each coupling block was opened as its forward's graph and its inverse's gradient
    reached the watched parameters: a GnfxError at the backward."""
    flow, x = Flow().double(), torch.randn(32, 2, dtype=torch.float64)
    linears = [f"flows.{i}.flows.0.param_map.{j}" for i in range(3) for j in (0, 2)]
    calls, _ = record_linear_calls(ForwardKLD(flow), [f"flow.{n}" for n in linears], x, None, lambda out, _: out)
    c = compile_for_statistics(flow, optimizer="kfac", methods=["forward_kld"])
    c.forward_kld(x).backward()
    c.step()
    covered, total = c.layers.coverage(dict(flow.named_parameters()))
    assert covered == total, c.layers.fallbacks
    for name in linears:
        want = kfac_factors(calls[f"flow.{name}"], True, "expand", len(x))
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], want[factor], **TOL)


class KarrasDenoiser(nn.Module):
    """k-diffusion's Denoiser: D(x̃, σ) = c_skip x̃ + c_out F(c_in x̃), σ_d = 0.5, F a small MLP of [x̃, σ]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, noised, sigma):
        var = sigma[:, None] ** 2 + 0.25
        c_skip, c_out, c_in = 0.25 / var, sigma[:, None] * 0.5 / var.sqrt(), 1 / var.sqrt()
        return c_skip * noised + c_out * self.inner(torch.cat([noised * c_in, sigma[:, None]], 1))


def test_a_loss_weighted_per_example_on_a_scaled_output_is_named_with_its_unweighted_form():
    """Karras et al.'s loss on the denoiser's output, λ(σ)·mean((D - x)²) with λ = 1/c_out² per example, under
    loss="mse" and a closure: the squared error its gradient implies exceeds the closure's loss, and the error
    names the per-example weighting and the unweighted loss of F that loss="mse" models; before, it named only
    reduction='sum' or a factor."""
    model = KarrasDenoiser().double()
    x = torch.randn(16, 4, dtype=torch.float64)
    sigma = torch.exp(torch.randn(16, dtype=torch.float64) * 1.2 - 1.2)
    noised = x + torch.randn_like(x) * sigma[:, None]
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    c = gnfx.compile(model, "kfac", loss="mse")

    def closure():
        loss = (((c(noised, sigma) - x) ** 2).mean(1) * weight).mean()
        if torch.is_grad_enabled():
            c.zero_grad()
            loss.backward()
        return loss
    with pytest.raises(gnfx.GnfxError, match=r"(?s)weighted per example.*k-diffusion.*gnfx\.compile\(inner\)"):
        c.step(closure)
