"""Patterns of single-author model libraries (lucidrains' performer-pytorch, vector-quantize-pytorch, ...), each
reproduced by a small plain-torch stand-in (benchmarks/lucid_probe.py probes the libraries themselves).

- A submodule registered under two paths of the model (performer-pytorch's `ProjectionUpdater(self.net)` keeps
  the layer stack it redraws the random features of as `proj_updater.instance`, the same module object as
  `net`): its layers are one layer each, not parameters shared between two layers, so that the layers inside an
  opaque forward are opened into curvature blocks whose statistics equal those of plain hooks in float64.
- A buffer that a forward changes in place by Python code reading no input (performer-pytorch counts its calls
  in a buffer, `self.calls_since_last_redraw += 1`): torch.fx does not proxy buffers, so the count would run once
  while tracing and never in the graph. The count must go on at every call of the compiled model, start where
  the model's was (capture advances nothing), and the statistics stay exact.
- Unit-norm weights (nGPT-pytorch's NormLinear: a parametrization `F.normalize(V, dim=d)` of every weight): the
  layers are curvature blocks of W (A and S equal to hooks in float64, under torch.fx and torch.export), and
  the maps between W's and V's space are those of autograd (torch.func): the gathered gradient c ∇V =
  (I − W_r W_rᵀ) ∇W_r, and the pulled-back change c ΔW moves W by ΔW but for its component along W_r. nGPT's
  token embedding, such a W indexed by the ids (`W[ids]`), is an embedding block of W: A the token
  frequencies, S = M Σ g gᵀ of the looked-up rows' gradients g (M = N·T), as plain autograd gives them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrize import register_parametrization

from gnfx.reparametrization import UnitNormWeight

from references import TOL, hook_statistics
from steps import compile_for_statistics, statistic_step

DTYPE = torch.float64


class Stack(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 8), nn.Linear(8, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class Updater(nn.Module):
    """performer-pytorch's ProjectionUpdater: holds the stack (`instance`) to act on it outside the forward,
    and counts the calls in a buffer that the forward branches on."""

    def __init__(self, instance: nn.Module):
        super().__init__()
        self.instance = instance
        self.register_buffer("calls", torch.tensor(0))

    def redraw(self):
        if self.calls >= 1000:  # a branch on a buffer's value: neither torch.fx nor torch.export captures it
            self.calls.zero_()
        self.calls += 1


class AliasedStack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.net, self.out = nn.Linear(5, 6), Stack(), nn.Linear(6, 3)
        self.updater = Updater(self.net)  # the same module as `net`, a second path to its layers
        self.to(DTYPE)

    def forward(self, x):
        if self.training:
            self.updater.redraw()
        return self.out(self.net(self.inp(x)))


def test_a_module_registered_under_two_paths_is_opened_once_with_exact_statistics():
    model = AliasedStack()
    c = compile_for_statistics(model, optimizer="kfac")
    x = torch.randn(8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    names = ["inp", "net.fc1", "net.fc2", "out"]
    ref = hook_statistics(model, names, x, y)
    statistic_step(c, x, y)
    assert c.layers.form == "eager"
    assert [b.name for b in c.layers] == names
    assert c.layers.fallbacks == []
    for name in names:
        torch.testing.assert_close(c.statistics(name)["A"], ref[name]["A"], **TOL)
        torch.testing.assert_close(c.statistics(name)["S"], ref[name]["S"], **TOL)
    before = int(model.updater.calls)
    statistic_step(c, x, y)
    statistic_step(c, x, y)
    assert int(model.updater.calls) == before + 2  # the forward's own count goes on at every call


class Counted(nn.Module):
    """A layer whose forward counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.counted, self.out = nn.Linear(5, 6), Counted(), nn.Linear(6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.out(torch.tanh(self.counted(self.inp(x))))


def test_a_buffer_counted_in_place_by_the_forward_counts_every_call():
    model = CountingNet()
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    x = torch.randn(8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    names = ["inp", "counted.fc", "out"]
    for step in range(3):
        ref = hook_statistics(copy.deepcopy(model), names, x, y)
        statistic_step(c, x, y)
        assert int(model.counted.calls) == step + 1
        for name in names:
            torch.testing.assert_close(c.statistics(name)["A"], ref[name]["A"], **TOL)
            torch.testing.assert_close(c.statistics(name)["S"], ref[name]["S"], **TOL)
    assert c.layers.opened["counted.fc"].startswith("opened")
    assert "changes its buffer calls (changed in place)" in c.layers.leaves["counted"]


class L2Norm(nn.Module):
    """nGPT's parametrization: each row along `dim` scaled to length 1."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, w):
        return F.normalize(w, dim=self.dim, p=2)


class UnitNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.hidden, self.out = nn.Linear(5, 6, bias=False), nn.Linear(6, 6), nn.Linear(6, 3, bias=False)
        register_parametrization(self.inp, "weight", L2Norm(-1))  # nGPT's input side: rows of unit length
        register_parametrization(self.out, "weight", L2Norm(0))  # nGPT's `norm_dim_in=False`: columns
        self.to(DTYPE)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_unit_norm_weights_are_blocks_with_exact_statistics(capture):
    model = UnitNormNet()
    x = torch.randn(8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    names = ["inp", "hidden", "out"]
    assert [b.name for b in c.layers] == names and c.layers.fallbacks == []
    for _ in range(2):
        ref = hook_statistics(copy.deepcopy(model), names, x, y)
        statistic_step(c, x, y)
        for name in names:
            torch.testing.assert_close(c.statistics(name)["A"], ref[name]["A"], **TOL)
            torch.testing.assert_close(c.statistics(name)["S"], ref[name]["S"], **TOL)
    for layer in (model.inp, model.out):  # the step keeps W on the sphere: the parametrization's own output
        w = layer.parametrizations.weight.original
        torch.testing.assert_close(layer.weight, F.normalize(w, dim=layer.parametrizations.weight[0].dim))


@pytest.mark.parametrize("dim", [0, -1])
def test_unit_norm_maps_are_the_jacobians(dim):
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 5, dtype=DTYPE, generator=g)
    grad_w, delta_w = torch.randn(4, 5, dtype=DTYPE, generator=g), torch.randn(4, 5, dtype=DTYPE, generator=g)
    rp = UnitNormWeight("fc.weight", "fc.weight_v", dim, 1e-12)
    named = {"fc.weight_v": v}
    w = F.normalize(v, dim=dim)
    along = lambda x: w * (w * x).sum(dim, keepdim=True)  # noqa: E731 - the component along W's rows
    _, vjp = torch.func.vjp(lambda u: F.normalize(u, dim=dim), v)
    c = v.norm(dim=dim, keepdim=True)
    torch.testing.assert_close(rp.weight_gradient(named, {"fc.weight_v": vjp(grad_w)[0]}), grad_w - along(grad_w))
    torch.testing.assert_close(c * vjp(grad_w)[0], rp.weight_gradient(named, {"fc.weight_v": vjp(grad_w)[0]}))
    _, moved = torch.func.jvp(lambda u: F.normalize(u, dim=dim), (v,), (rp.pull_back(named, delta_w)["fc.weight_v"],))
    torch.testing.assert_close(moved, delta_w - along(delta_w))
    torch.testing.assert_close(rp.value(named), w)


class UnitNormLM(nn.Module):
    """nGPT's embedding: a unit-norm table read by indexing, then a unit-norm head."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        torch.manual_seed(0)
        self.table, self.head = nn.Linear(d, vocab, bias=False), nn.Linear(d, vocab, bias=False)
        register_parametrization(self.table, "weight", L2Norm(-1))
        register_parametrization(self.head, "weight", L2Norm(-1))
        self.to(DTYPE)

    def forward(self, ids):
        return self.rest(self.table.weight[ids])

    def rest(self, rows):
        return self.head(torch.tanh(rows))


def test_a_unit_norm_table_read_by_indexing_is_an_embedding_block():
    model = UnitNormLM()
    ids = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(2))
    c = compile_for_statistics(model, optimizer="kfac", capture="export", example_inputs=(ids,))
    assert [(b.name, b.kind) for b in c.layers] == [("table", "embedding"), ("head", "linear")]
    assert c.layers.fallbacks == []
    rows = model.table.weight.detach()[ids].requires_grad_()
    F.cross_entropy(model.rest(rows).flatten(0, 1), y.flatten()).backward()
    g, m = rows.grad.reshape(-1, 4), ids.numel()
    F.cross_entropy(c(ids).flatten(0, 1), y.flatten()).backward()
    c.step()
    torch.testing.assert_close(c.statistics("table")["S"], m * g.T @ g, **TOL)
    counts = torch.bincount(ids.flatten(), minlength=7).to(DTYPE) / m
    torch.testing.assert_close(c.statistics("table")["A"].diagonal() if c.statistics("table")["A"].dim() == 2
                               else c.statistics("table")["A"], counts, **TOL)
