"""Implicit-layer training patterns in plain torch (benchmarks/implicit_probe.py runs torchdeq, siren-pytorch and
hypnettorch themselves): a deep equilibrium layer differentiated by a one-shot tensor hook, as torchdeq's
`hook_ift=True` does it. The forward solves z* = f(z*, x) under torch.no_grad, calls f once more with gradients
and registers on f(z*) a hook that removes itself and returns the implicit gradient (I - ∂f/∂z)⁻ᵀ g, solved by
fixed-point iteration with torch.autograd.grad through f(z*), whose root is the hooked tensor again.

The reference is plain autograd on a second build of the same model from the same seed.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

WIDTH, CLASSES = 6, 3


class HookedEquilibrium(nn.Module):
    """z* = tanh(W z* + U x), the 1-step call f(z*) carrying torchdeq's one-shot implicit-gradient hook."""

    def __init__(self):
        super().__init__()
        self.W = nn.Linear(WIDTH, WIDTH, bias=False)
        self.U = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        with torch.no_grad():
            self.W.weight.mul_(0.5)
        self.handle = None

    def f(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))

    def forward(self, x):
        with torch.no_grad():
            z = torch.zeros_like(x)
            for _ in range(30):
                z = self.f(z, x)
        z = z.requires_grad_()
        new_z = self.f(z, x)

        def implicit_gradient(grad):
            self.handle.remove()  # the autograd.grad below starts at new_z again: no infinite loop
            y = torch.zeros_like(grad)
            for _ in range(30):
                y = torch.autograd.grad(new_z, z, y, retain_graph=True)[0] + grad
            return y

        self.handle = new_z.register_hook(implicit_gradient)
        return self.head(new_z)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, WIDTH, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (8,), generator=g)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_implicit_gradient_hook_registered_in_the_forward_is_kept(fisher):
    """torch.export dropped the hook from its graph, whose backward gave the 1-step gradient (every fisher:
    passes/tensor_hooks.py, the forward now runs as its Python code); fisher="mc"/"type2" start their own
    backward from z inside the user's, which ran the hook first: it removed itself, and the user's backward
    gave the 1-step gradient again (float64 gap 1e-2 on torchdeq's hook_ift; gnfx.hook_removals), silently.
    The gradients must be the plain model's, step after step."""
    x, y = _batch()
    torch.manual_seed(0)
    model = HookedEquilibrium().double()
    torch.manual_seed(0)
    reference = HookedEquilibrium().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = gnfx.compile(model, "kfac", lr=1e-2, loss="cross_entropy", fisher=fisher, stat_every=1)
        for _ in range(2):
            F.cross_entropy(c(x), y).backward()
            F.cross_entropy(reference(x), y).backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
            c.step()
            c.zero_grad()
            reference.zero_grad()
            reference.load_state_dict(model.state_dict())


def test_implicit_probe_reports_the_kan_spline_weights_outside_the_blocks_and_exact_base_blocks():
    """benchmarks.implicit_probe's KAN needs no library: its kfac_lr row shows the capture, 10% of the entries
    in blocks (the spline weights and scalers fall back, named), exact loss and gradients, and the base
    blocks' A and S against hooks on the KANLinear calls; AdamW's row has no capture."""
    from benchmarks import implicit_probe

    row = implicit_probe.probe("kan", "kfac_lr", steps=2).split(" | ")
    assert row[1:4] == ["kfac_lr (lr=0.001)", "fx", "10.0%"] and "layers.0.spline_weight" in row[6]
    gaps, factors = row[4].split("; ")
    assert all(float(v) < 1e-12 for v in gaps.split(", ")) and factors.startswith("A, S of 2 linear blocks")
    assert float(factors.split()[-1]) < 1e-12 and len(row[5].split(", ")) == 2
    assert implicit_probe.probe("kan", "adamw", steps=1).split(" | ")[1:5] == ["adamw (lr=0.001)", "–", "–", "–"]
