"""A tensor each forward stores on its module for a next call that training never makes (Hugging Face's
RecurrentGemmaForCausalLM at its default `use_cache=True`: the model's forward sets every recurrent block's state to
zeros, each block's scan starts from it and stores its last hidden state h_T for a decoding step;
benchmarks/results/first_contact_17_gemmastate.md), in plain torch.

Since the side-effect check of neuron states (passes/module_attributes.py), a forward that stores a tensor on its
module was refused by torch.export and kept opaque by torch.fx, so the model ran eagerly. No read of the stored
value precedes the write in a call, so the output is a function of the call's inputs; the capture writes the stored
value with a graph node (passes/state_writes.py): the model is captured whole, its outputs, gradients and K-FAC
statistics are the module's own, and after each call the attribute holds what the module's own call leaves. A
state read before the call writes it (a neuron's potential; tests/test_spiking_patterns.py) is still refused.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from references import cross_entropy, hook_statistics
from steps import compile_for_statistics, step_and_follow

DTYPE = torch.float64
WIDTH, STEPS = 4, 3


class RecurrentBlock(nn.Module):
    """RecurrentGemma's recurrent block in short: h_t = σ(a) ⊙ h_{t-1} + W_in x_t from the state its model set,
    h_T stored on the module (`self.recurrent_states = h_T`), the outputs W_out h_t."""

    def __init__(self):
        super().__init__()
        self.linear_in, self.linear_out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.a = nn.Parameter(torch.randn(WIDTH))
        self.state = None

    def forward(self, x):
        u, h, outputs = self.linear_in(x), self.state, []
        for t in range(STEPS):
            h = torch.sigmoid(self.a) * h + u[:, t]
            outputs.append(h)
        self.state = h
        return self.linear_out(torch.stack(outputs, 1))


class Recurrent(nn.Module):
    """RecurrentGemmaModel in short: each block's state set to zeros (`_setup_cache`) before the blocks run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.blocks, self.head = nn.Linear(3, WIDTH), nn.ModuleList([RecurrentBlock(), RecurrentBlock()]), \
            nn.Linear(WIDTH, 3)
        self.to(DTYPE)

    def forward(self, x):
        for block in self.blocks:
            block.state = x.new_zeros(x.shape[0], WIDTH)
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class Carried(Recurrent):
    """The same blocks with the state of the last call carried in (no zeros set): a state the graph cannot hold."""

    def __init__(self):
        super().__init__()
        for block in self.blocks:
            block.state = torch.zeros(WIDTH, dtype=DTYPE)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


NAMES = ["embed", "blocks.0.linear_in", "blocks.0.linear_out", "blocks.1.linear_in", "blocks.1.linear_out", "head"]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_state_stored_for_the_next_call_and_set_by_the_model_first_is_captured(capture):
    model = Recurrent()
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, STEPS, 3, dtype=DTYPE, generator=g), torch.randint(0, 3, (5, STEPS), generator=g)
        fresh = Recurrent()  # (hook_statistics deep-copies its model: not one holding a call's states)
        fresh.load_state_dict(model.state_dict())
        expected = hook_statistics(fresh, NAMES, x, y)
        out, out_ref = c(x), reference(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
        for block, block_ref in zip(model.blocks, reference.blocks):  # the state the module's own call leaves
            assert type(block.state) is torch.Tensor and block.state.grad_fn is not None
            torch.testing.assert_close(block.state, block_ref.state, rtol=0, atol=1e-12)
        cross_entropy(out, y).backward()
        cross_entropy(out_ref, y).backward()
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)
        step_and_follow(c, model, reference)
        for name in NAMES:  # the statistics of the step's batch
            for key in ("A", "S"):
                torch.testing.assert_close(c.statistics(name)[key], expected[name][key], rtol=1e-10, atol=1e-12,
                                           msg=f"{name} {key}")
    assert c.layers.form == capture and not c.layers.leaves
    assert {b.name for b in c.layers} == set(NAMES)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_state_read_before_the_call_writes_it_is_still_refused(capture):
    """The carried state is the last call's h_T: torch.fx keeps the blocks opaque (their Python code carries it),
    torch.export captures nothing; the compiled model's outputs and states equal the module's, call after call."""
    model = Carried()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = torch.randn(5, STEPS, 3, dtype=DTYPE, generator=g)
        model(x), reference(x)  # a state to carry in
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    for _ in range(3):
        x = torch.randn(5, STEPS, 3, dtype=DTYPE, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
        for block, block_ref in zip(model.blocks, reference.blocks):
            torch.testing.assert_close(block.state, block_ref.state, rtol=0, atol=1e-12)
    if capture == "fx":
        assert set(c.layers.leaves) == {"blocks.0", "blocks.1"} and "attribute state" in c.layers.leaves["blocks.0"]


class LazyCache(nn.Module):
    """A table built at the first call from the input's length and kept (`if self.table is None: self.table = ...`,
    a rotary cache): the trace stores it over None, no side effect of `changed_value`'s; read before it is written,
    it is refused, and the graph builds the table at each call as before."""

    def __init__(self):
        super().__init__()
        self.linear, self.table = nn.Linear(WIDTH, WIDTH), None

    def forward(self, x):
        if self.table is None:
            self.table = torch.cos(torch.arange(x.shape[-1], dtype=x.dtype))
        return self.linear(x) * self.table


class Recording(nn.Module):
    """A layer that keeps its last output for inspection (`self.last = out`, None until the first call): a store over
    None, which no capture wrote before (the attribute stayed None after every compiled call)."""

    def __init__(self):
        super().__init__()
        self.linear, self.last = nn.Linear(WIDTH, WIDTH), None

    def forward(self, x):
        self.last = torch.tanh(self.linear(x))
        return self.last


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("layer", [LazyCache, Recording])
def test_a_store_over_none_is_written_where_no_read_precedes_it_and_left_as_before_where_one_does(layer, capture):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, WIDTH), layer(), nn.Linear(WIDTH, 3)).to(DTYPE)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    for x in torch.randn(2, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1)):
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
        if layer is Recording:
            torch.testing.assert_close(model[1].last, reference[1].last, rtol=0, atol=1e-12)
    assert c.layers.form == capture and not c.layers.leaves and len(list(c.layers)) == 3
