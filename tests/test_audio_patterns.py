"""Speech-library patterns in plain torch (benchmarks/results/first_contact_12_audio.md): speechbrain's
Sequential, which keeps the first element of a tuple a layer returns (`if isinstance(x, tuple): x = x[0]`),
around an RNN wrapper that torch.fx cannot trace and that returns (output, hidden), and a feature
normalization that counts the frames it has seen in a Python number (`self.count += mask.sum().item()`).
Checked against the module itself and plain hooks, in float64. Each test failed before its change.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

N, T, FEATURES, HIDDEN, CLASSES = 4, 5, 6, 8, 3


class FrameCountingNorm(nn.Module):
    """speechbrain's InputNormalization(norm_type="global") in small: a running mean of the frames seen, its
    count a Python int updated from the data in the forward (a side effect no graph repeats)."""

    def __init__(self):
        super().__init__()
        self.count, self.mean = 0, torch.zeros(())

    def forward(self, x):
        if self.training:
            frames = (x != 0).sum().item()
            self.count += frames
            weight = frames / self.count
            self.mean = (1 - weight) * self.mean + weight * x.detach().mean()
        return x - self.mean


class RNNWrapper(nn.Module):
    """speechbrain.nnet.RNN.LSTM in small: a branch on x.ndim (untraceable by torch.fx), (output, hidden) out."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(FEATURES, HIDDEN, batch_first=True)

    def forward(self, x):
        if x.ndim == 4:
            x = x.reshape(x.shape[0], x.shape[1], -1)
        return self.rnn(x)


class RNNOutputs(RNNWrapper):
    """The wrapper's output alone."""

    def forward(self, x):
        return super().forward(x)[0]


class TupleKeepingSequential(nn.Sequential):
    """speechbrain.nnet.containers.Sequential: each layer's output, its first element if it is a tuple."""

    def forward(self, x):
        for layer in self:
            x = layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return x


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, T, FEATURES, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (N,), generator=g))


def test_an_opaque_layer_returning_a_tuple_reaches_the_code_after_it_as_one():
    """The RNN wrapper is a leaf of the fx graph (torch.export fails on the norm's side effect, so fx's graph is
    kept); the container's `isinstance(x, tuple)` after it must see the tuple the wrapper returns. Before, the
    trace took the other branch and the graph passed the whole tuple on: "'tuple' object has no attribute
    'flatten'" at the first call. The outputs, every gradient and the head's K-FAC factors (against
    hooks on the module) match."""
    torch.manual_seed(0)
    model = TupleKeepingSequential(FrameCountingNorm(), nn.Linear(FEATURES, FEATURES), RNNWrapper(), nn.Flatten(),
                                   nn.Linear(T * HIDDEN, CLASSES)).double()
    reference = copy.deepcopy(model)
    x, y = _data()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_decay=0.0, stat_every=1)
    with pytest.warns(UserWarning, match="curvature blocks"):  # the LSTM inside the opaque wrapper falls back
        loss = F.cross_entropy(c(x), y)
    assert c.layers.form == "fx" and "2" in c.layers.leaves
    head = {}

    def record(_, inputs, out):  # the head's input a and the gradient g at its output
        head["a"] = inputs[0].detach()
        out.register_hook(lambda g: head.__setitem__("g", g))
    reference[4].register_forward_hook(record)
    loss_ref = F.cross_entropy(reference(x), y)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    c.step()
    a = torch.cat([head["a"], torch.ones(N, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(c.statistics("4")["A"], a.T @ a / N, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c.statistics("4")["S"], N * head["g"].T @ head["g"], rtol=1e-10, atol=1e-12)


def test_a_number_the_forward_computes_from_its_input_keeps_its_module_opaque():
    """`self.count += frames` with `frames` read from the input is a Proxy under torch.fx: the count changed
    from an int to a traced value, a side effect, so the norm is a leaf that runs as written. Before, the
    change was not seen (only numbers were compared) and the next trace (another submodule failed) read the
    first trace's Proxy from the attribute: "Argument 'add_2' of Node 'truediv' does not belong to this
    Graph" at gnfx.compile. The norm's count now advances once per call, as the module's own."""
    torch.manual_seed(0)
    model = nn.Sequential(FrameCountingNorm(), nn.Linear(FEATURES, FEATURES), RNNOutputs(), nn.Flatten(),
                          nn.Linear(T * HIDDEN, CLASSES)).double()
    reference = copy.deepcopy(model)
    x, y = _data()
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx")
    assert "changes its attribute count" in c.layers.leaves["0"]
    for _ in range(2):
        F.cross_entropy(c(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        assert model[0].count == reference[0].count
        torch.testing.assert_close(model[0].mean, reference[0].mean, rtol=0, atol=1e-12)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
        c.zero_grad()
        reference.zero_grad()
