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
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

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
