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
    loss = F.cross_entropy(c(x), y)
    assert c.layers.form == "fx" and "2" in c.layers.leaves
    assert "2.rnn.weight_hh_l0" in [b.name for b in c.layers]  # the LSTM inside the opaque wrapper is opened
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


class MaxNormLinear(nn.Module):
    """speechbrain.nnet.linear.Linear: its nn.Linear `w`, after a branch on x.ndim (untraceable by torch.fx)
    and, with `max_norm`, a renormalization of the layer's rows through `.data`."""

    def __init__(self, n_in: int, n_out: int, max_norm: float | None = None):
        super().__init__()
        self.w, self.max_norm, self.combine_dims = nn.Linear(n_in, n_out), max_norm, False

    def forward(self, x):
        if x.ndim == 4 and self.combine_dims:
            x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
        if self.max_norm is not None:
            self.w.weight.data = torch.renorm(self.w.weight.data, p=2, dim=0, maxnorm=self.max_norm)
        return self.w(x)


def test_a_layer_whose_weight_the_opaque_code_reads_through_data_is_opened():
    """`self.w.weight.data` in the opaque wrapper's source reads no value autograd sees, so its nn.Linear is
    opened: a curvature block whose K-FAC factors equal the hooks' on the module. Before, the read counted as a
    use of the weight's value beside the layer's call: the layer was not opened and fell back to diag, as every
    speechbrain Linear did under torch.fx."""
    torch.manual_seed(0)
    model = nn.Sequential(MaxNormLinear(FEATURES, HIDDEN), nn.Tanh(), MaxNormLinear(HIDDEN, CLASSES)).double()
    reference = copy.deepcopy(model)
    x, y = _data()
    x = x[:, 0]
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_decay=0.0, stat_every=1, capture="fx")
    assert {"0.w", "2.w"} <= {b.name for b in c.layers.blocks}
    calls = {}

    def record(name):
        def hook(_, inputs, out):
            calls[name] = [inputs[0].detach(), None]
            out.register_hook(lambda g: calls[name].__setitem__(1, g))
        return hook
    for name in ("0.w", "2.w"):
        reference.get_submodule(name).register_forward_hook(record(name))
    F.cross_entropy(c(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    c.step()
    for name, (a, g) in calls.items():
        a = torch.cat([a, torch.ones(N, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(c.statistics(name)["A"], a.T @ a / N, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.statistics(name)["S"], N * g.T @ g, rtol=1e-10, atol=1e-12)


def test_an_assignment_to_an_opened_layers_weight_data_raises_naming_the_fix():
    """With max_norm the opaque wrapper assigns `self.w.weight.data` before calling the layer: under the opened
    call that reaches the twin's view, not the parameter the layer's graph reads, so the forward would silently
    compute with the weight unrenormalized. It raises a GnfxError naming leaf_modules; and with the wrapper kept
    whole the model trains as the module does."""
    torch.manual_seed(0)
    model = nn.Sequential(MaxNormLinear(FEATURES, HIDDEN, max_norm=0.5), nn.Tanh(),
                          MaxNormLinear(HIDDEN, CLASSES)).double()
    reference = copy.deepcopy(model)
    x, y = _data()
    x = x[:, 0]
    c = gnfx.compile(copy.deepcopy(model), "kfac", lr=1e-2, capture="fx")
    with pytest.raises(gnfx.GnfxError, match=r"assigns the \.data of the parameter '0\.w\.weight'.*leaf_modules=\['0'\]"):
        c(x)
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="fx", leaf_modules=["0"])
    for _ in range(2):
        F.cross_entropy(c(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
        c.step()
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.copy_(p)
        c.zero_grad()
        reference.zero_grad()
