"""A hand-written recurrent cell `forward(x, state=None)` stepped by opaque code: first without a state, then with it.

norse's LIFRecurrentCell (and many hand-written RNN and SNN cells) applies its own input and recurrent weights by
F.linear, and makes its state when called without one (`if state is None: state = zeros`). Its caller steps it over
the time steps in a loop torch.fx cannot trace (`range(x.shape[0])`), so the caller is opaque (capture="fx": norse's
surrogate spike, a custom autograd.Function, makes gnfx refuse torch.export) and the cell a child gnfx opens
(passes/opaque_children.py): captured once per form of call (state None, state given), both graphs' sites one block
per weight, R the T calls. Reference: every F.linear call on the cell's weights in the plain model,
its input and the gradient of its output recorded (a TorchFunctionMode), float64.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.references import cross_entropy, hook_statistics, kfac_factors
from tests.steps import compile_for_statistics, statistic_step

D, H, C, N, T = 4, 6, 3, 5, 4


class Cell(nn.Module):
    """z' = tanh(v'), v' = v / 2 + W_in x + W_rec z: its own weights by F.linear, its state made when None."""

    def __init__(self):
        super().__init__()
        self.input_weights = nn.Parameter(torch.randn(H, D) / D ** 0.5)
        self.recurrent_weights = nn.Parameter(torch.randn(H, H) / H ** 0.5)

    def forward(self, x, state=None):
        if state is None:
            state = (x.new_zeros((x.shape[0], H)), x.new_zeros((x.shape[0], H)))
        z, v = state
        v = v / 2 + F.linear(x, self.input_weights) + F.linear(z, self.recurrent_weights)
        z = torch.tanh(v)
        return z, (z, v)


class Stepped(nn.Module):
    """The cell over the T steps of a time-first input, a readout of each step, the max over time."""

    def __init__(self):
        super().__init__()
        self.cell = Cell()
        self.readout = nn.Linear(H, C)

    def forward(self, x):
        state, outs = None, []
        for t in range(x.shape[0]):  # torch.fx cannot trace it: this module stays opaque
            z, state = self.cell(x[t], state)
            outs.append(self.readout(z))
        return torch.stack(outs).max(0)[0]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.snn = Stepped()

    def forward(self, x):
        return self.snn(torch.tanh(self.encoder(x)))


class LinearCalls(TorchFunctionMode):
    """Records [input, gradient of the output] of every F.linear call on the given weights, by weight."""

    def __init__(self, weights: dict):
        super().__init__()
        self.weights, self.calls = weights, {name: [] for name in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            name = next((n for n, w in self.weights.items() if args[1] is w), None)
            if name is not None:
                record = [args[0].detach(), None]
                self.calls[name].append(record)
                out.register_hook(lambda g: record.__setitem__(1, g.detach()))
        return out


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, N, D, generator=g, dtype=torch.float64), torch.randint(C, (N,), generator=g)


def test_a_cell_with_an_optional_state_is_opened_in_both_forms_with_the_statistics_of_its_calls():
    """Before: the cell was not opened ("its forward takes optional or variadic inputs"), its two weights fell back
    to the diagonal preconditioner (the readout and encoder alone in blocks)."""
    torch.manual_seed(0)
    model = Model().double()
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    x, y = batch()
    out = c(x)
    loss = cross_entropy(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    c.step()
    c.zero_grad()
    report = c.report()
    assert "(100.0%); fallback: 0" in report, report
    for name in ("input_weights", "recurrent_weights"):
        assert f"block snn.cell.{name} (called by the Python code of opaque submodule 'snn')" in report, report

    weights = dict(reference.snn.cell.named_parameters())
    with LinearCalls(weights) as mode:
        want_loss = cross_entropy(reference(x), y)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-14)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-13)
    for name in weights:
        assert len(mode.calls[name]) == T
        want = kfac_factors(mode.calls[name], False, "expand", N)
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(f"snn.cell.{name}")[factor], want[factor], rtol=1e-10, atol=1e-13)


def test_the_cell_called_by_keyword_and_without_a_state_runs_the_graph_of_each_form():
    """After two steps the compiled model's output (the two forms' graphs, the state given by keyword) equals the
    module's own forward on the same parameters."""

    class ByKeyword(Stepped):
        def forward(self, x):
            state, outs = None, []
            for t in range(x.shape[0]):
                z, state = self.cell(x[t]) if state is None else self.cell(x[t], state=state)
                outs.append(self.readout(z))
            return torch.stack(outs).max(0)[0]

    torch.manual_seed(0)
    model = Model().double()
    model.snn = ByKeyword().double()
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    x, y = batch()
    for _ in range(2):
        statistic_step(c, x, y)
    assert "(100.0%); fallback: 0" in c.report()
    torch.testing.assert_close(c(x), model(x), rtol=0, atol=1e-14)


class Encoder(nn.Module):
    """A child with an input that defaults to None (wav2vec2's `forward(waveforms, lengths=None)`), whose caller
    never calls it but its submodules."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, H)
        self.out = nn.Linear(H, C)

    def forward(self, x, lengths=None):
        return self.out(torch.tanh(self.proj(x)))


class Pretraining(nn.Module):
    """torchaudio's HuBERTPretrainModel.forward in miniature: `self.wav2vec2.feature_extractor(...)`,
    `self.wav2vec2.encoder.transformer(...)`, never `self.wav2vec2(...)`, around Python code on the values."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x):
        h = torch.tanh(self.encoder.proj(x))
        if h.sum() > 0:  # a branch on the values: neither torch.fx nor torch.export captures the model
            h = h * 2
        return self.encoder.out(h)


def test_a_child_whose_submodules_the_opaque_code_calls_itself_is_walked_into_not_opened():
    """Before: `encoder` (its `lengths=None` taken since the forms of call) was opened as one graph that no call ran,
    and the first backward raised "the Python code of the model's own forward uses the parameter 'encoder.out.bias'
    other than by calling 'encoder'" (torchaudio's HuBERT pretraining model, every kfac run). Now it is walked into:
    its layers are blocks of the calls the code makes, with the loss, the gradients, A and S of plain hooks."""
    torch.manual_seed(0)
    model = Pretraining().double()
    reference = copy.deepcopy(model)
    c = compile_for_statistics(model, optimizer="kfac")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(C, (N,), generator=g)
    loss = cross_entropy(c(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    c.step()
    assert c.layers.form == "eager"
    assert "calls its submodule 'proj' itself" in c.layers.opened["encoder"], c.layers.opened
    assert c.layers.coverage(dict(model.named_parameters())) == (D * H + H + H * C + C,) * 2

    want_loss = cross_entropy(reference(x), y)
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-14)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-13)
    want = hook_statistics(reference, ["encoder.proj", "encoder.out"], x, y)
    for name, factors in want.items():
        for factor in ("A", "S"):
            torch.testing.assert_close(c.statistics(name)[factor], factors[factor], rtol=1e-10, atol=1e-13)
