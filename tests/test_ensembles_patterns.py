"""The PyTorch model-ensembling tutorial's pattern: E MLPs' parameters stacked by
`torch.func.stack_module_state`, registered as parameters (E, ...) of a module whose forward runs the base MLP on
each member under `torch.vmap(functional_call)` (passes/vmapped_products.py). Stand-ins in plain torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import gnfx

from references import TOL, kfac_factors, per_example_fisher_diag, record_linear_calls
from steps import compile_for_statistics, statistic_step, train_on_batches

MEMBERS = 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class Members(nn.Module):
    """The reference: the E member MLPs as modules of their own, each run on its rows, their mean."""

    def __init__(self, models, shared: bool):
        super().__init__()
        self.models, self.shared = nn.ModuleList(models), shared

    def forward(self, x):
        rows = [x] * MEMBERS if self.shared else x.unflatten(1, (MEMBERS, -1)).unbind(1)
        return torch.stack([m(r) for m, r in zip(self.models, rows)]).mean(0)


class VmappedEnsemble(nn.Module):
    """The tutorial's ensemble: `stack_module_state` of E MLPs, the stacked parameters (E, ...) this module's,
    the base MLP on the meta device run on each member by `torch.vmap(functional_call)`, every member reading
    the input (`shared`, in_dims None) or its own slice of the features (in_dims 0); the members' mean."""

    def __init__(self, models, shared: bool):
        super().__init__()
        params, _ = stack_module_state(models)
        self.stacked = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.detach().clone())
                                         for k, v in params.items()})
        self.names, self.shared = {k.replace(".", "_"): k for k in params}, shared
        self.base = [copy.deepcopy(models[0]).to("meta")]  # in a list: not a submodule

    def forward(self, x):
        params = {self.names[k]: v for k, v in self.stacked.items()}
        rows = x if self.shared else x.unflatten(1, (MEMBERS, -1)).transpose(0, 1)
        run = torch.vmap(lambda p, r: functional_call(self.base[0], p, (r,)), in_dims=(0, None if self.shared else 0))
        return run(params, rows).mean(0)


def ensemble(shared: bool):
    torch.manual_seed(0)
    models = [MLP().double() for _ in range(MEMBERS)]
    return VmappedEnsemble(models, shared), Members(copy.deepcopy(models), shared)


def batch(shared: bool, n=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6 if shared else 6 * MEMBERS, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("capture", ["export", "auto"])
def test_a_vmapped_ensembles_weights_are_stacked_blocks_with_each_members_own_linears_factors(shared, capture):
    """Before: every parameter fell back to the diagonal ("used by call_function '_add_batch_dim'"), 0% in blocks.
    Reference: hooks on each member's own nn.Linear of the plain module ensemble (a Python loop over the members),
    the model's own output and gradients, and torch.func's per-example gradients for the diagonal."""
    model, members = ensemble(shared)
    x, y = batch(shared)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    out = c(x)
    torch.testing.assert_close(out, reference(x), **TOL)
    torch.testing.assert_close(out, members(x), **TOL)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    c.step()
    c.zero_grad()
    blocks = {b.name: b.kind for b in c.layers}
    assert blocks == {"stacked.l1": "stacked", "stacked.l2": "stacked"}
    assert {f.param for f in c.layers.fallbacks} == {"stacked.l1_bias", "stacked.l2_bias"}
    assert all("the bias of a linear under torch.vmap" in f.reason for f in c.layers.fallbacks)
    names = [f"models.{e}.{layer}" for e in range(MEMBERS) for layer in ("l1", "l2")]
    calls, M = record_linear_calls(members, names, x, y)
    diag = per_example_fisher_diag(reference, x, y)
    for layer in ("l1", "l2"):
        got = c.statistics(f"stacked.{layer}")
        want = [kfac_factors(calls[f"models.{e}.{layer}"], False, "expand", M) for e in range(MEMBERS)]
        torch.testing.assert_close(got["A"], torch.stack([w["A"] for w in want]), **TOL)
        torch.testing.assert_close(got["S"], torch.stack([w["S"] for w in want]), **TOL)
        torch.testing.assert_close(got["diag"], diag[f"stacked.{layer}_weight"].flatten(0, 1), **TOL)


def test_kfac_at_defaults_trains_a_vmapped_ensemble():
    """Before: 0% of the parameters in blocks, the diagonal's steps."""
    torch.manual_seed(0)
    model = VmappedEnsemble([MLP() for _ in range(MEMBERS)], shared=True)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")
    losses = train_on_batches(c, [(x, y)] * 20, F.cross_entropy)
    assert [b.kind for b in c.layers] == ["stacked", "stacked"]
    assert losses[-1] < 0.5 * losses[0]
