"""A state a module carries from call to call, started as None (or an empty list) and read first: a spiking neuron's
membrane potential, a stateful LSTM wrapper's hidden state, a list of every call's outputs (passes/carried_states.py).

The capture sees the first call only: a graph that read the state as the trace's None (or an empty list) computed every
call as the first, silently (the outputs of the second and third calls were off by up to 1.4 before). torch.fx keeps
such a module opaque, its Python code carrying the state, with the attribute in the reason; torch.export refuses the
model. A cache built from the parameters or the input's shape alone (a rotary table, a cached weight transform) is the
same at every call and stays captured.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gnfx
from references import cross_entropy
from steps import compile_for_statistics

DTYPE = torch.float64
WIDTH = 4


class Neuron(nn.Module):
    """snntorch's neurons in short: the membrane potential made at the first call, `mem = β mem + W x` at each."""

    def __init__(self):
        super().__init__()
        self.fc, self.mem = nn.Linear(WIDTH, WIDTH), None

    def forward(self, x):
        if self.mem is None:
            self.mem = torch.zeros_like(x)
        self.mem = self.mem * 0.9 + self.fc(x)
        return torch.tanh(self.mem)


class StatefulLSTM(nn.Module):
    """A stateful LSTM wrapper: the last call's (h, c) passed to the next call, None at the first."""

    def __init__(self):
        super().__init__()
        self.lstm, self.hidden = nn.LSTM(WIDTH, WIDTH, batch_first=True), None

    def forward(self, x):
        out, self.hidden = self.lstm(x, self.hidden)
        return out


class History(nn.Module):
    """Every call's features appended to a list the module holds, the earlier calls' summed into the output."""

    def __init__(self):
        super().__init__()
        self.fc, self.history = nn.Linear(WIDTH, WIDTH), []

    def forward(self, x):
        h = self.fc(x)
        self.history.append(h)
        return h + sum(self.history[:-1], torch.zeros_like(h))


SHAPES = {Neuron: (5, WIDTH), StatefulLSTM: (5, 3, WIDTH), History: (5, WIDTH)}
ATTRIBUTE = {Neuron: "attribute mem", StatefulLSTM: "attribute hidden", History: "attribute history"}


def _model(layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), layer(), nn.Linear(WIDTH, 3)).to(DTYPE)


@pytest.mark.parametrize("capture", ["auto", "fx"])
@pytest.mark.parametrize("layer", [Neuron, StatefulLSTM, History])
def test_a_state_started_as_none_and_read_first_keeps_its_module_opaque(layer, capture):
    """Three successive calls of the compiled model give the outputs and gradients of an eager copy's three calls."""
    model = _model(layer)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(*SHAPES[layer], dtype=DTYPE, generator=g)
        out, out_ref = c(x), reference(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
        y = torch.randint(0, 3, out.shape[:-1], generator=g)
        cross_entropy(out, y).backward(retain_graph=True)
        cross_entropy(out_ref, y).backward(retain_graph=True)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=1e-12, msg=name)
    assert set(c.layers.leaves) == {"1"} and ATTRIBUTE[layer] in c.layers.leaves["1"]


@pytest.mark.parametrize("layer", [Neuron, StatefulLSTM, History])
def test_a_state_started_as_none_and_read_first_is_no_export(layer):
    c = gnfx.compile(_model(layer), capture="export")
    with pytest.raises(gnfx.CaptureError, match=ATTRIBUTE[layer]):
        c(torch.randn(*SHAPES[layer], dtype=DTYPE))


class RecordedState(nn.Module):
    """An LSTM whose last (h, c) the module keeps for inspection, never read by its forward: a tuple, which the graph
    cannot write as it writes one tensor (tests/test_state_writes_patterns.py's Recording)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.last = nn.LSTM(WIDTH, WIDTH, batch_first=True), None

    def forward(self, x):
        out, self.last = self.lstm(x)
        return out


def test_a_tuple_stored_from_the_input_keeps_its_module_opaque_and_holds_the_modules_values():
    """Before: captured whole, and after each compiled call the attribute still held None."""
    model = _model(RecordedState)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    for x in torch.randn(3, 5, 3, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(1)):
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(model[1].last, reference[1].last, rtol=0, atol=1e-12)
    assert set(c.layers.leaves) == {"1"} and "attribute last" in c.layers.leaves["1"]
    assert "other than one tensor" in c.layers.leaves["1"]
    with pytest.raises(gnfx.CaptureError, match="attribute last"):
        gnfx.compile(_model(RecordedState), capture="export")(torch.randn(5, 3, WIDTH, dtype=DTYPE))


class RotaryCache(nn.Module):
    """A table built at the first call from the input's width alone, and kept (a rotary embedding's cache)."""

    def __init__(self):
        super().__init__()
        self.linear, self.table = nn.Linear(WIDTH, WIDTH), None

    def forward(self, x):
        if self.table is None:
            self.table = torch.cos(torch.arange(x.shape[-1], dtype=x.dtype)).expand_as(x[0]).clone()
        return self.linear(x) * self.table


class WeightCache(nn.Module):
    """A transform of the weight computed at the first call and kept (`self.scaled is None` tested first)."""

    def __init__(self):
        super().__init__()
        self.linear, self.scaled = nn.Linear(WIDTH, WIDTH), None

    def forward(self, x):
        if self.scaled is None:
            self.scaled = 2 * self.linear.weight.t()
        return x @ self.scaled


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("layer", [RotaryCache, WeightCache])
def test_a_cache_of_the_parameters_or_the_shape_stays_captured(layer, capture):
    model = _model(layer)
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture)
    for x in torch.randn(3, 5, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(1)):
        torch.testing.assert_close(c(x), reference(x), rtol=0, atol=1e-12)
    assert c.layers.form == capture and not c.layers.leaves
