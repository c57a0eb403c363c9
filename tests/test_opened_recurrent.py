"""Recurrent layers as forecasting and tagging code calls them, and opaque code writing into an opened layer's output.

A recurrent layer called by opaque code with and without its state (gluonts' DeepAR: `self.rnn(x)` in its loss,
`self.rnn(x, state)` when sampling) is opened into curvature blocks (passes/opaque_children.py, OPTIONAL_INPUTS):
its graph passes `hx` on as each call gives it. Reference: the same model without the data-dependent branch,
whose forward torch.fx captures whole, the recurrent layer a module call of the captured graph. A lowered
sequence-first layer's output is contiguous, as torch's (gnfx.recurrent.recurrent_result); an opened layer's
output that the opaque code writes in place through a view keeps its statistics (passes/taps.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx


class Forecaster(nn.Module):
    """Encodes a context window, then decodes from the encoder's state: the layer called without, then with hx.
    `branch`: a branch on a tensor's value, which keeps the forward opaque to torch.fx and torch.export."""

    def __init__(self, kind: str, branch: bool, d=3, hidden=5):
        super().__init__()
        self.rnn = getattr(nn, kind)(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)
        self.branch = branch

    def forward(self, context, future):
        if self.branch and bool(context.abs().sum() < 0):  # never taken; data-dependent all the same
            context = -context
        _, state = self.rnn(context)
        out, _ = self.rnn(future, state)
        return self.head(out)


def train(c, steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        context, future = torch.randn(6, 7, 3, generator=g, dtype=torch.float64), torch.randn(
            6, 4, 3, generator=g, dtype=torch.float64)
        y = torch.randint(4, (6, 4), generator=g)
        F.cross_entropy(c(context, future).reshape(-1, 4), y.reshape(-1)).backward()
        c.step()
        c.zero_grad()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_a_recurrent_layer_called_with_and_without_its_state_by_opaque_code_is_a_block(kind):
    """Before, the layer was not opened ("its forward takes optional or variadic inputs") and its parameters fell
    back to the diagonal preconditioner: the steps differed from the captured model's."""
    torch.manual_seed(0)
    opaque = Forecaster(kind, branch=True).double()
    traced = copy.deepcopy(opaque)
    traced.branch = False
    compiled = [gnfx.compile(m, "kfac", lr=0.1) for m in (opaque, traced)]
    for c in compiled:
        train(c)
    report = compiled[0].report()
    assert "(100.0%); fallback: 0" in report
    for name in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"):
        assert f"block rnn.{name} (called by the Python code" in report
    for p, q in zip(opaque.parameters(), traced.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class CellDecoder(nn.Module):
    """A cell stepped over the positions, its first call without a state (hx None)."""

    def __init__(self, kind: str, branch: bool, d=3, hidden=5):
        super().__init__()
        self.cell = getattr(nn, kind)(d, hidden)
        self.head = nn.Linear(hidden, 4)
        self.branch, self.lstm = branch, kind == "LSTMCell"

    def forward(self, context, future):
        if self.branch and bool(context.abs().sum() < 0):
            context = -context
        x, state, outs = torch.cat([context, future], 1), None, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs.append(state[0] if self.lstm else state)
        return self.head(torch.stack(outs[-future.shape[1]:], 1))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_a_cell_stepped_by_opaque_code_from_no_state_is_a_block(kind):
    torch.manual_seed(0)
    opaque = CellDecoder(kind, branch=True).double()
    traced = copy.deepcopy(opaque)
    traced.branch = False
    compiled = [gnfx.compile(m, "kfac", lr=0.1) for m in (opaque, traced)]
    for c in compiled:
        train(c)
    assert "(100.0%); fallback: 0" in compiled[0].report()
    for p, q in zip(opaque.parameters(), traced.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class SequenceFirstTagger(nn.Module):
    """The classic word-language-model decoder: a sequence-first LSTM whose output is `.view`ed, which works
    because torch's sequence-first output is contiguous."""

    def __init__(self, branch: bool, d=3, hidden=5):
        super().__init__()
        self.rnn = nn.LSTM(d, hidden)
        self.decoder = nn.Linear(hidden, 4)
        self.branch = branch

    def forward(self, context, future):
        if self.branch and bool(context.abs().sum() < 0):
            context = -context
        output, _ = self.rnn(future.transpose(0, 1))
        decoded = self.decoder(output.view(output.size(0) * output.size(1), output.size(2)))
        return decoded.view(output.size(0), output.size(1), 4).transpose(0, 1)


@pytest.mark.parametrize("branch", [False, True], ids=["captured", "opened"])
def test_a_sequence_first_output_stays_contiguous(branch):
    """Before, the lowered layer's sequence-first output was a transposed (non-contiguous) tensor, and the
    forward's `.view` raised at the first statistic step."""
    torch.manual_seed(0)
    tagger = SequenceFirstTagger(branch).double()
    c = gnfx.compile(tagger, "kfac", lr=0.1)
    train(c)
    assert "(100.0%); fallback: 0" in c.report()


class TwoParameterHead(nn.Module):
    """gluonts' distribution projection: one Linear per distribution parameter, each output squeezed (a view)."""

    def __init__(self, hidden=5):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(hidden, 1), nn.Linear(hidden, 1)])

    def forward(self, x):
        return [p(x).squeeze(-1) for p in self.proj]


class ShiftedLogits(nn.Module):
    """Opaque code that writes into a view of an opened layer's output in place (gluonts' NegativeBinomialOutput:
    `logits += scale.log()`); `in_place=False` writes the same sum out of place."""

    def __init__(self, in_place: bool, d=3, hidden=5):
        super().__init__()
        self.encoder = nn.Linear(d, hidden)
        self.head = TwoParameterHead(hidden)
        self.in_place = in_place

    def forward(self, context, future):
        if bool(context.abs().sum() < 0):
            context = -context
        h = torch.tanh(self.encoder(future))  # contiguous (N, T, H): the heads' (N, T, 1) outputs are views of (N·T, 1)
        scale, logits = self.head(h)
        shift = context.mean((1, 2)).unsqueeze(1)
        if self.in_place:
            logits += shift
        else:
            logits = logits + shift
        return torch.stack([F.softplus(scale), logits, -logits, scale], -1)


def test_an_opened_layers_output_written_in_place_through_a_view_keeps_its_statistics():
    """Before, the head's output hook was lost when the opaque code wrote into its returned view (a view's
    grad_fn is replaced when its base is written through another view): that block got no statistics at all."""
    torch.manual_seed(0)
    in_place = ShiftedLogits(in_place=True).double()
    out_of_place = copy.deepcopy(in_place)
    out_of_place.in_place = False
    compiled = [gnfx.compile(m, "kfac", lr=0.1, stat_every=1) for m in (in_place, out_of_place)]
    for c in compiled:
        train(c)
    for name in ("head.proj.0", "head.proj.1"):
        for key in ("A", "S"):
            torch.testing.assert_close(compiled[0].statistics(name)[key], compiled[1].statistics(name)[key])
    for p, q in zip(in_place.parameters(), out_of_place.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
