"""A list the model shares with its submodules, written by their forwards and read back by the model's own forward in
the same call (MONAI's DynUNet with deep supervision: each DynUNetSkipLayer writes its supervision head's output,
`self.heads[self.index - 1] = self.super_head(upout)`, into a list the model holds, and DynUNet's forward stacks the
list's entries with its output; benchmarks/results/first_contact_17_listwrites.md), in plain torch.

Since the side-effect check of neuron states (passes/module_attributes.py), a forward that stores a tensor in a list it
holds was kept opaque, and the model's retrace then read the Proxies the failed trace had left in the list ("Found
multiple different tracers"): the model ran eagerly. Each entry is now written in the graph, where the forward writes
it, and read from there (passes/list_writes.py): the model is captured by torch.fx whole, its outputs, gradients and
K-FAC statistics are the module's own, and after each call the list holds the values the module's own call leaves.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gnfx

from references import cross_entropy, hook_statistics
from steps import compile_for_statistics

DTYPE = torch.float64


class SkipLayer(nn.Module):
    """DynUNetSkipLayer in short: its body, the next layer (another SkipLayer, or none), and a head whose output it
    writes into the list `heads` the model shares with every layer."""

    def __init__(self, index, width, heads, next_layer=None):
        super().__init__()
        self.body, self.head, self.next_layer = nn.Linear(width, width), nn.Linear(width, 3), next_layer
        self.heads, self.index = heads, index

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.next_layer is not None:
            h = h + self.next_layer(h)
        self.heads[self.index] = self.head(h)
        return h


class DeepSupervision(nn.Module):
    """DynUNet in short: the nested layers write their heads' outputs into `self.heads` (placeholders until the first
    call), which the forward stacks with its own output."""

    def __init__(self, width=5):
        super().__init__()
        torch.manual_seed(0)
        self.heads = [torch.rand(1)] * 2
        self.layers = SkipLayer(0, width, self.heads, SkipLayer(1, width, self.heads))
        self.out = nn.Linear(width, 3)
        self.to(DTYPE)

    def forward(self, x):
        out = self.out(self.layers(x))
        return torch.stack([out, *(2.0 * h for h in self.heads)], dim=1)


class ReadBeforeWrite(DeepSupervision):
    """A forward that reads the list's entry before its layers write it (the last call's head): a state carried
    from call to call, which no graph computes (passes/module_attributes.py)."""

    def forward(self, x):
        carried = self.heads[1]
        return super().forward(x) + carried.sum()


def test_entries_written_and_read_back_in_one_forward_are_captured_by_fx():
    model = DeepSupervision()
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, dtype=DTYPE, generator=g), torch.randint(0, 3, (6, 3), generator=g)
    names = ["layers.body", "layers.head", "layers.next_layer.body", "layers.next_layer.head", "out"]
    for _ in range(3):
        out, out_ref = c(x), reference(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
        assert len(model.heads) == 2 and model.layers.heads is model.heads
        for held, held_ref in zip(model.heads, reference.heads):  # the list holds what the module's call leaves
            assert type(held) is torch.Tensor
            torch.testing.assert_close(held, held_ref, rtol=0, atol=1e-12)
        fresh = DeepSupervision()  # (hook_statistics deep-copies its model: not one whose list holds a call's tensors)
        fresh.load_state_dict(model.state_dict())
        expected = hook_statistics(fresh, names, x, y)
        cross_entropy(out, y).backward()
        cross_entropy(out_ref, y).backward()
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)
        c.step()
        for name in names:
            for key in ("A", "S"):
                torch.testing.assert_close(c.statistics(name)[key], expected[name][key], rtol=1e-10, atol=1e-12,
                                           msg=f"{name} {key}")
        c.zero_grad()
        reference.zero_grad()
        with torch.no_grad():
            for p, p_ref in zip(model.parameters(), reference.parameters()):
                p_ref.copy_(p)
    assert c.layers.form == "fx" and not c.layers.leaves and not c.layers.fallbacks
    assert {b.name for b in c.layers} == set(names)


def test_an_entry_read_before_it_is_written_is_no_constant_of_a_graph():
    """The carried entry is the last call's head, a state: the writing layer is kept opaque, and the model's own
    reads of the entry (before and after the layer writes it) are no constants of a graph: the compiled model's
    outputs and the list equal the module's, call after call, on new inputs."""
    model = ReadBeforeWrite()
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(6, 5, dtype=DTYPE, generator=g)
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
        for held, held_ref in zip(model.heads, reference.heads):
            torch.testing.assert_close(held, held_ref, rtol=0, atol=1e-12)


class CarriedEntry(nn.Module):
    """A state in a list the module holds, read, then written for the next call (a neuron's potential)."""

    def __init__(self):
        super().__init__()
        self.state = [torch.zeros((), dtype=DTYPE)]

    def forward(self, x):
        self.state[0] = 0.5 * self.state[0] + x
        return torch.tanh(self.state[0])


def test_a_state_entry_holding_a_tensor_at_capture_is_still_carried_by_its_module():
    """Called before gnfx.compile, the state is a tensor when traced: its write found, its read before the write
    refuses it, and the module runs as its Python code, the state carried from call to call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), CarriedEntry(), nn.Linear(5, 3)).to(DTYPE)
    reference = copy.deepcopy(model)
    xs = torch.randn(3, 6, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(xs[0]), reference(xs[0])
    c = compile_for_statistics(model, optimizer="kfac")
    for x in xs:
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(model[1].state[0], reference[1].state[0], rtol=0, atol=1e-12)
    assert c.layers.form == "fx" and "state[0]" in c.layers.leaves["1"]
