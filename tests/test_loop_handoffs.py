"""Training frameworks' hand-offs of the compiled model's optimizer, reproduced in plain torch.

pytorch-ignite's ParamSchedulers (`LinearCyclicalScheduler(optimizer, "momentum", ...)`) write any name into
the param groups; keras 3 (KERAS_BACKEND=torch) models are torch modules whose layers read their weights through
keras Variables, plain Python objects holding the Parameters. Neither library is needed: a scheduler is a write
of the group's key, a keras layer a module whose forward reads its Parameter through a holder object
(benchmarks/loops_probe.py runs the libraries themselves; benchmarks/results/first_contact_12_loops.md).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from tests.models import TanhMLP

X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))


def train(model, steps: int) -> None:
    for _ in range(steps):
        F.cross_entropy(model(X), Y).backward()
        model.optimizer.step()
        model.optimizer.zero_grad()


@pytest.mark.parametrize("kind, name", [("kfac", "momentum"), ("kfac", "damping"), ("diag", "momentum")])
def test_a_schedule_of_a_compile_setting_is_said_once(kind, name):
    """ignite's `LinearCyclicalScheduler(model.optimizer, "momentum", 0.8, 0.9, cycle_size)` sets
    group["momentum"] every iteration; gnfx's momentum is gnfx.compile's, so the schedule changed nothing, silently.
    It is now said once, naming the value gnfx uses; a schedule of lr says nothing."""
    torch.manual_seed(0)
    model = gnfx.compile(TanhMLP((8, 16, 4)), kind, lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in (0.8, 0.85, 0.9):
            for group in model.optimizer.param_groups:  # what ParamScheduler.__call__ does
                group[name] = value
                group["lr"] = value * 1e-2
            train(model, 1)
    said = [str(w.message) for w in caught if "does not read from the groups" in str(w.message)]
    assert len(said) == 1 and f"sets {name}" in said[0]
    assert ("momentum=0.9" if kind == "kfac" and name == "momentum" else
            "damping=" if name == "damping" else "betas[0]") in said[0]
    quiet = gnfx.compile(TanhMLP((8, 16, 4)), kind, lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in (0.8, 0.9):
            quiet.optimizer.param_groups[0]["lr"] = value * 1e-2
            train(quiet, 1)
    assert not [w for w in caught if "does not read from the groups" in str(w.message)]


class Holder:
    """keras 3's Variable under the torch backend: a Python object whose `.value` is the torch Parameter."""

    def __init__(self, parameter: nn.Parameter):
        self.value = parameter


class HeldDense(nn.Module):
    """A dense layer whose Parameters are registered in a ParameterDict (keras's `_torch_params`) and read in the
    forward through the holders, `x @ kernel.value.T + bias.value`."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.torch_params = nn.ParameterDict({"kernel": nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5),
                                              "bias": nn.Parameter(torch.zeros(d_out))})
        self.kernel, self.bias = Holder(self.torch_params["kernel"]), Holder(self.torch_params["bias"])

    def forward(self, x):
        return x @ self.kernel.value.T + self.bias.value


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_parameters_read_as_constants_are_refused(capture):
    """A keras 3 model under KERAS_BACKEND=torch: every layer's weight was a constant of the captured graph
    (torch.export's lifted_tensor, torch.fx's _tensor_constant), so kfac had 0% of the parameters in blocks and was
    Adam on all of them, with a warning whose advice did not apply. gnfx.compile now refuses it, naming the
    parameters read as constants; a module reading the same Parameters as attributes compiles with its blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(HeldDense(8, 16), nn.Tanh(), HeldDense(16, 4))
    with pytest.raises(gnfx.CaptureError, match=r"(?s)reads the trainable parameter\(s\) '0\.torch_params\.(bias|"
                                                r"kernel)'.*as constants.*module attribute"):
        gnfx.compile(model, "kfac", lr=1e-2, capture=capture, example_inputs=(X,))
    plain = TanhMLP((8, 16, 4))
    compiled = gnfx.compile(plain, "kfac", lr=1e-2, capture=capture, example_inputs=(X,))
    assert compiled.layers.coverage(dict(plain.named_parameters()))[0] > 0


def test_a_perturbation_before_the_step_is_not_another_optimizer():
    """composer's SAM wraps the optimizer: its closure's forward and backward at θ, `p.add_(e)`, the forward and
    backward at θ + e, `p.sub_(e)`, then the gnfx step. gnfx said "another optimizer steps them" at SAM's second
    forward, though its own step ran every time. A write that this optimizer's step follows is no longer said;
    another optimizer stepping after each forward still is, once (tests/test_framework_handoff.py)."""
    torch.manual_seed(0)
    model = gnfx.compile(TanhMLP((8, 16, 4)), "kfac", lr=1e-2, stat_every=1)
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            F.cross_entropy(model(X), Y).backward()
            with torch.no_grad():
                norm = torch.stack([p.grad.norm() for p in params]).norm()
                perturbation = [0.05 * p.grad / norm for p in params]
                torch._foreach_add_(params, perturbation)
            model.optimizer.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            with torch.no_grad():
                torch._foreach_sub_(params, perturbation)
            model.optimizer.step()
            model.optimizer.zero_grad()
    assert model.optimizer.steps == 3
    assert not [w for w in caught if "another optimizer" in str(w.message)]
