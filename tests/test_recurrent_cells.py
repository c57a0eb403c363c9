"""Recurrent cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) called in the model's own loop over time, as
curvature blocks (gnfx.recurrent, passes/recurrent.py).

Each call t of a cell is two linear maps over the rows of its batch (example n):

    W_ih:  a = [x_t; 1],  δ = ∂ℓ/∂(W_ih x_t + b_ih)
    W_hh:  a = [h_t; 1],  δ = ∂ℓ/∂(W_hh h_t + b_hh)     (h_t the state the call is given; zeros for hx=None)

and a cell called T times is one weight at T sites: A = 1/(N T) Σ_{n,t} a aᵀ, S = M Σ_{n,t} δ δᵀ
(tests/references.py). The references are independent of gnfx: the model itself and a cell written out
here with `retain_grad` on each call's products. Everything float64, compared at 1e-10.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.func import functional_call, grad, jvp, vjp

import gnfx
from gnfx.passes.recurrent import lower_recurrent
from references import TOL, cross_entropy, kfac_factors, loss_terms, per_example_fisher_diag
from steps import compile_for_statistics, statistic_step, train
from test_recurrent import Holder

DTYPE = torch.float64
KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def cell(kind: str, d_in=3, hidden=4, bias=True) -> nn.RNNCellBase:
    if kind.startswith("rnn"):
        return nn.RNNCell(d_in, hidden, bias=bias, nonlinearity=kind[4:]).to(DTYPE)
    return {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind](d_in, hidden, bias=bias).to(DTYPE)


class CellLoop(nn.Module):
    """(N, T, d) or unbatched (T, d) -> (N, T, C) or (T, C): the cell called at each of `steps` steps in
    a Python loop, its first call without hx when none is given, a linear head on every step's h."""

    def __init__(self, kind="lstm", bias=True, steps=3, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.head = cell(kind, bias=bias), nn.Linear(4, classes).to(DTYPE)
        self.lstm, self.steps = kind == "lstm", steps

    def forward(self, x, hx=None):
        state, outputs = hx, []
        for t in range(self.steps):
            state = self.cell(x[..., t, :]) if state is None else self.cell(x[..., t, :], state)
            outputs.append(self.head(state[0] if self.lstm else state))
        return torch.stack(outputs, -2)


def leaves(out):
    return torch.utils._pytree.tree_leaves(out)


def cell_names(bias: bool) -> set[str]:
    return {f"cell.{kind}_{part}" for kind in ("weight", "bias")[:1 + bias] for part in ("ih", "hh")}


# ----------------------------------------------------------------------------- the lowered forward


@pytest.mark.filterwarnings("ignore:block .* its input's first dimension")  # unbatched: one sequence, T outputs
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=4, deadline=None, derandomize=True)
@given(bias=st.booleans(), unbatched=st.booleans(), with_state=st.booleans(), steps=st.integers(1, 3))
def test_compiled_cell_loop_computes_the_models_outputs_and_gradients(kind, capture, bias, unbatched, with_state,
                                                                     steps):
    """On a statistic step (the lowered, tapped graph) the outputs and every parameter's and input's
    gradient equal the model's, and both weights of the cell are blocks of `steps` sites."""
    model = CellLoop(kind, bias, steps)
    x = torch.randn(*(() if unbatched else (2,)), steps, 3, dtype=DTYPE, requires_grad=True)
    state = torch.randn(*(() if unbatched else (2,)), 4, dtype=DTYPE, requires_grad=True)
    hx = ((state, torch.randn_like(state).requires_grad_()) if kind == "lstm" else state) if with_state else None
    inputs = (x, hx) if with_state else (x,)
    expected = model(*inputs)
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, stat_every=1, capture=capture, example_inputs=inputs)
    assert c.layers.form == capture
    got = c(*inputs)
    assert {b.name: len(b.sites) for b in c.layers} == {"cell.weight_ih": steps, "cell.weight_hh": steps,
                                                         "head": steps}
    assert not c.layers.fallbacks
    torch.testing.assert_close(got, expected, **TOL)
    weights = torch.randn_like(expected)
    wrt = [*inputs[:1], *(leaves(hx) if with_state else []), *model.parameters()]
    grads = [torch.autograd.grad((weights * out).sum(), wrt) for out in (expected, got)]
    for e, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("x, hx", [
    (torch.randn(2, 1, 3), None),  # a 3-D input
    (torch.randn(3), torch.randn(1, 4)),  # an unbatched input with a batched state
])
def test_lowered_cell_raises_on_inputs_of_ranks_the_cell_rejects(x, hx):
    """A ValueError where the cell raises one (a 3-D input) or its kernel a RuntimeError (mixed ranks)."""
    module = Holder(nn.GRUCell(3, 4))
    with pytest.raises((ValueError, RuntimeError)):
        module(x, hx)
    with pytest.raises(ValueError, match="expected a 1-D .unbatched. or 2-D input and states of its rank"):
        lower_recurrent(fx.symbolic_trace(module))(x, hx)


# ----------------------------------------------------------------------------- statistics


def hand_written_rows(model: CellLoop, x, y, kind: str):
    """{W_ih, W_hh name: [(a, δ) of each call]} of the model's cell, written out here step by step
    from h = c = 0 with each call's products retaining their gradients; and M, the loss terms."""
    m, hidden = model.cell, model.cell.hidden_size
    h = c = torch.zeros(x.shape[0], hidden, dtype=DTYPE)
    records, outputs = [], []
    for t in range(model.steps):
        gx, hp = F.linear(x[:, t], m.weight_ih, m.bias_ih), F.linear(h, m.weight_hh, m.bias_hh)
        gx.retain_grad()
        hp.retain_grad()
        records.append((x[:, t], gx, h, hp))
        gate = lambda v, k: v[:, k * hidden:(k + 1) * hidden]  # noqa: E731
        if kind == "lstm":  # gates i, f, g, o
            pre = gx + hp
            c = torch.sigmoid(gate(pre, 1)) * c + torch.sigmoid(gate(pre, 0)) * torch.tanh(gate(pre, 2))
            h = torch.sigmoid(gate(pre, 3)) * torch.tanh(c)
        elif kind == "gru":  # r, z, n: the hidden part of n is r ⊙ (W_hn h + b_hn)
            r, z = torch.sigmoid(gate(gx, 0) + gate(hp, 0)), torch.sigmoid(gate(gx, 1) + gate(hp, 1))
            h = (1 - z) * torch.tanh(gate(gx, 2) + r * gate(hp, 2)) + z * h
        else:
            h = torch.tanh(gx + hp) if kind == "rnn_tanh" else torch.relu(gx + hp)
        outputs.append(model.head(h))
    out = torch.stack(outputs, 1)
    torch.testing.assert_close(out, model(x), **TOL)  # the written-out cell is the module's
    cross_entropy(out, y).backward()
    model.zero_grad()
    return {"cell.weight_ih": [(a.detach(), g.grad) for a, g, _, _ in records],
            "cell.weight_hh": [(a.detach(), g.grad) for _, _, a, g in records]}, loss_terms(out)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind, bias", [("lstm", True), ("gru", True), ("rnn_relu", False)])
def test_factors_and_diagonals_equal_the_hand_written_cells_and_per_example_gradients(kind, bias, capture):
    """A and S of W_ih's and W_hh's blocks, each pooling the cell's calls, equal those of the
    written-out cell's rows (each call's products retaining their gradients, the first call's h = 0
    included), and the per-example diagonals those of per-example gradients (autograd on each example)."""
    model = CellLoop(kind, bias, steps=4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (5, 4), generator=g)
    rows, M = hand_written_rows(model, x, y, kind)
    diags = per_example_fisher_diag(model, x, y, vectorized=False)  # vmap has no batching rule of lstm_cell
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers.form == capture
    statistic_step(c, x, y)
    for name, calls in rows.items():
        got, expected = c.statistics(name), kfac_factors(calls, bias, "expand", M)
        torch.testing.assert_close(got["A"], expected["A"], **TOL)
        torch.testing.assert_close(got["S"], expected["S"], **TOL)
        bias_name = name.replace("weight", "bias")
        diag = torch.cat([diags[name], diags[bias_name][:, None]], dim=1) if bias else diags[name]
        torch.testing.assert_close(got["diag"], diag, **TOL)


@pytest.mark.filterwarnings("ignore:gnfx. only")  # the low coverage is the point
def test_leaf_modules_keeps_a_cell_opaque():
    """A cell named in leaf_modules is not lowered: its parameters fall back, saying so."""
    model = CellLoop("gru")
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture="fx", leaf_modules=["cell"])
    assert [b.name for b in c.layers] == ["head"]
    assert {f.param for f in c.layers.fallbacks} == cell_names(True)
    assert all("requested with leaf_modules" in f.reason for f in c.layers.fallbacks)


# ----------------------------------------------------------------------------- forward mode


def as_on_a_gpu(kernel, fused, lstm: bool):
    """torch._VF's `kernel` (lstm_cell, gru_cell) as on a GPU, where it runs the op `fused`
    (_thnn_fused_lstm_cell, _thnn_fused_gru_cell), which has no forward-mode derivative: the op is
    called here on the cell's gates, and raises torch's forward-mode error where a tangent reaches it
    (its kernel is a GPU's: on a CPU, without tangents, it raises that it has no CPU kernel)."""
    def call(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        h, last = hx if lstm else (hx, hx)
        try:
            fused(F.linear(input, w_ih), F.linear(h, w_hh), last, b_ih, b_hh)
        except NotImplementedError as error:
            if "forward AD" in str(error):
                raise
        return kernel(input, hx, w_ih, w_hh, b_ih, b_hh)
    return call


@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated")  # torch.func.jvp's first call, the reference's
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_mode_passes_compute_the_cells_whose_gpu_kernels_have_none(kind, monkeypatch):
    """nn.LSTMCell and nn.GRUCell run fused kernels on a GPU, without a forward-mode derivative. With
    the kernels as on a GPU, gnfx.ggn's G v equals Jᵀ (H_ℓ (J v)) by torch.func jvp and vjp through
    the lowered graph, and kfac at defaults (its quadratic-model step: forward-mode products) steps."""
    model, x = CellLoop(kind), torch.randn(4, 3, 3, dtype=DTYPE)
    y = torch.randn(4, 3, 3, dtype=DTYPE)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    graph = lower_recurrent(fx.symbolic_trace(model))
    f = lambda *theta: functional_call(graph, dict(zip(names, theta)), (x,))  # noqa: E731
    z, Jv = jvp(f, tuple(params), tuple(v))
    expected = vjp(f, *params)[1](jvp(grad(lambda out: (out - y).square().mean()), (z,), (Jv,))[1])
    name = f"{kind}_cell"
    monkeypatch.setattr(torch._VF, name, as_on_a_gpu(getattr(torch._VF, name),
                                                       getattr(torch.ops.aten, f"_thnn_fused_{name}"), kind == "lstm"))
    for got, e in zip(gnfx.ggn.ggn_vp(model, "mse", x, y, v), expected, strict=True):
        torch.testing.assert_close(got, e, **TOL)
    c = gnfx.compile(model, optimizer="kfac", loss="mse")
    losses = train(c, x, y, F.mse_loss, 2)
    assert losses[1] < losses[0], losses


# ----------------------------------------------------------------------------- training


class Decoder(nn.Module):
    """(N, T, d) -> (N, T, 1): a cell stepped over the input's own length, as seq2seq decoders and
    agents write it (`for t in range(x.shape[1])`, which torch.fx cannot trace: torch.export captures
    it), the LSTM's state unpacked and passed back as (h, c)."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.cell, self.head = kind, cell(kind, 1, 8), nn.Linear(8, 1).to(DTYPE)

    def forward(self, x):
        outputs, h, c = [], None, None
        for t in range(x.shape[1]):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t]) if h is None else self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
            outputs.append(self.head(h))
        return torch.stack(outputs, 1)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_kfac_at_defaults_trains_a_cell_loop_with_every_parameter_in_a_block(kind):
    """The running sum of a sequence, learnable only through the state: kfac with its quadratic-model
    step (no lr, loss='mse') lowers the loss, without a warning and without fallbacks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, 1, generator=g, dtype=DTYPE)
    y = x.cumsum(1) / 2
    model = Decoder(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gnfx.compile(model, optimizer="kfac", loss="mse")
        losses = train(c, x, y, F.mse_loss, 12)
    assert c.layers.form == "export"
    assert {b.name for b in c.layers} == {"cell.weight_ih", "cell.weight_hh", "head"} and not c.layers.fallbacks
    assert losses[-1] < 0.1 * losses[0], losses
