"""Patterns the regression sweep of the library probes found (benchmarks/results/first_contact_15_rerunlib.md), each
reproduced in plain torch.

- A BatchNorm subclass with a forward of its own (timm's BatchNormAct2d: `F.batch_norm` then the activation, in
  nearly every timm CNN), traced through by torch.fx: torch's BatchNorm forward counts its calls in a buffer,
  `self.num_batches_tracked.add_(1)`. The count is a node of the fx graph on that buffer (passes/buffer_updates.py),
  so the module is traced, not kept opaque, and the model is captured with torch.fx whole, as before the side-effect
  check sent such models to torch.export: the outputs, the running statistics, the count and every parameter
  gradient equal the module's own, step by step, in float64. At momentum=None the forward reads the count into
  Python (the cumulative average's factor 1/n): that module stays opaque, and its running mean is still the
  module's own.
- Forward hooks that a forward installs on its first call, with a mark that they are there (transformers 5's output
  capturing: `_output_capturing_hooks_installed`, and the hooks record each stage's output for the heads that read
  them, Segformer's decode head): capture runs that first call, and the capture put the mark back but kept the
  hooks, so the model's next own call installed them again and every output was recorded twice. Capture now
  leaves the model as it was, hooks included: the compiled model's outputs and gradients equal the module's on
  statistic steps and on the steps in between (the model's own forward), in float64.
- A parameter of no rows (vit-pytorch's ViT at pool="mean" keeps a (0, d) `cls_token`, which MAE never uses): the
  plan's cost of its diagonal state per rank divided by its row count (ZeroDivisionError at the first kfac step).
  The model steps as the same model without it, bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gnfx

from references import cross_entropy
from steps import compile_for_statistics, step_and_follow

DTYPE = torch.float64


def step_beside(c, model, reference, x, y) -> None:
    """A step of the compiled model beside `reference`, a plain copy of `model`: the outputs, the buffers and every
    parameter gradient equal the copy's; then the copy takes the stepped parameters (its buffers are its own)."""
    out, out_ref = c(x), reference(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=0, atol=1e-12, msg=name)
    cross_entropy(out, y).backward()
    cross_entropy(out_ref, y).backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)
    step_and_follow(c, model, reference)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: torch's BatchNorm forward, then a ReLU; no rank check (timm has none)."""

    def _check_input_dim(self, input):
        pass

    def forward(self, x):
        return torch.relu(super().forward(x))


class ConvNormNet(nn.Module):
    def __init__(self, momentum):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), BatchNormAct(4, momentum=momentum), nn.Linear(4 * 6 * 6, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_batch_norm_subclass_counts_its_batches_as_the_module_does(momentum):
    model = ConvNormNet(momentum)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac")
    x = torch.randn(5, 3, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(2))
    for step in range(3):
        step_beside(c, model, reference, x, y)
        assert int(model.norm.num_batches_tracked) == step + 1
    assert c.layers.form == "fx"
    if momentum is None:  # 1/n read into Python: the module is opaque, its layer opened
        assert "changes its buffer num_batches_tracked" in c.layers.leaves["norm"]
    else:
        assert not c.layers.leaves and not c.layers.fallbacks
        assert {b.name: b.kind for b in c.layers}["norm"] == "norm"


RECORDED: list[torch.Tensor] = []  # the stage outputs the hooks record during one call (transformers: a context var)


class RecordedStages(nn.Module):
    """Two stages whose outputs hooks installed at the first call record, and a head per recorded output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stages = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 8)])
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(8, 3)])
        self.to(DTYPE)

    def forward(self, x):
        if not getattr(self, "_hooks_installed", False):
            for stage in self.stages:
                stage.register_forward_hook(lambda module, args, out: RECORDED.append(out))
            self._hooks_installed = True
        RECORDED.clear()
        for stage in self.stages:
            x = torch.tanh(stage(x))
        return sum(head(h) for head, h in zip(self.heads, RECORDED, strict=True))


def test_hooks_a_forward_installs_at_its_first_call_are_installed_once():
    model = RecordedStages()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=2)
    x = torch.randn(8, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    for _ in range(4):  # statistic steps (the graph) and the steps between (the model's own forward)
        step_beside(c, model, reference, x, y)
    assert [len(stage._forward_hooks) for stage in model.stages] == [1, 1]


class WithEmptyToken(nn.Module):
    def __init__(self, empty: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        if empty:
            self.cls_token = nn.Parameter(torch.randn(0, 4))  # ViT(pool="mean")'s: no class token
        self.to(DTYPE)

    def forward(self, x):
        return self.fc(x)


def test_a_parameter_of_no_rows_steps_as_if_absent():
    x = torch.randn(8, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    weights = []
    for empty in (False, True):
        model = WithEmptyToken(empty)
        c = gnfx.compile(model, "kfac", lr=1e-2)
        for _ in range(2):
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
        weights.append((model.fc.weight.detach().clone(), model.fc.bias.detach().clone()))
    assert all(torch.equal(a, b) for a, b in zip(*weights))
