"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) as curvature blocks (gnfx.recurrent, passes/recurrent.py).

Each layer and direction holds two linear blocks, rows r = (example n, time t):

    W_ih:  a = [x_t; 1],      δ = ∂ℓ/∂(W_ih x_t + b_ih)
    W_hh:  a = [h_{t-1}; 1],  δ = ∂ℓ/∂hp_t,  hp_t = W_hh h_{t-1} + b_hh   (h_0 included)

    A = 1/(N T) Σ_{n,t} a aᵀ,   S = M Σ_{n,t} g gᵀ,   diag = 1/N Σ_n (∇ℓ̃_n)²   (tests/references.py)

The references are independent of gnfx: the module itself, an unrolled cell written out here with
`retain_grad` on each step's products, per-example autograd (vmap cannot batch ATen's recurrent
kernels), torch.func jvp/vjp. Everything float64, compared at 1e-10.
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
from torch.autograd import forward_ad
from torch.nn.utils.rnn import pad_packed_sequence

import gnfx
from gnfx.composite_forms import composite_packing
from gnfx.ggn import forward_mode_kernels
from gnfx.passes.capture import export
from gnfx.passes.recurrent import lower_recurrent
from gnfx.recurrent import scan_rows
from references import TOL, cross_entropy, kfac_factors, per_example_fisher_diag, record_linear_calls
from steps import compile_for_statistics, statistic_step, train

DTYPE = torch.float64
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def recurrent(cell, d_in=3, hidden=4, **options):
    kwargs = {"nonlinearity": "relu"} if cell == "rnn_relu" else {}
    return CELLS[cell](d_in, hidden, **kwargs, **options).to(DTYPE)


class Tagger(nn.Module):
    """(N, T, d) -> (N, T, C): a recurrent module, then a linear head on every step."""

    def __init__(self, cell="lstm", classes=3, **options):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = recurrent(cell, **options)
        directions = 2 if options.get("bidirectional") else 1
        size = options.get("proj_size") or self.rnn.hidden_size  # an LSTM with projections outputs h_t = W_hr h̃_t
        self.head = nn.Linear(size * directions, classes).to(DTYPE)
        self.sequence_first = not options.get("batch_first", False)

    def forward(self, x):
        out = self.rnn(x.transpose(0, 1) if self.sequence_first else x)[0]
        return self.head(out.transpose(0, 1) if self.sequence_first else out)


def data(n=3, steps=5, d=3, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, steps, d, generator=g, dtype=DTYPE), torch.randint(0, classes, (n, steps), generator=g)


def lowered(module: nn.Module) -> fx.GraphModule:
    """The module's fx graph with its recurrent calls lowered (no taps)."""
    return lower_recurrent(fx.symbolic_trace(module))


class Holder(nn.Module):
    """A recurrent module called with its initial state."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx):
        return self.rnn(x, hx)


def leaves(out):
    return torch.utils._pytree.tree_leaves(out)


def assert_equal_gradients(expected, got, inputs):
    """The gradients of `inputs` of one random weighting Σ w ⊙ out of the outputs `expected` and `got`
    (a module's and its lowered graph's) are equal."""
    weights = [torch.randn_like(t) for t in leaves(expected)]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, leaves(out))), inputs)
             for out in (expected, got)]
    for e, g in zip(*grads):
        torch.testing.assert_close(g, e, **TOL)


# ----------------------------------------------------------------------------- the lowered forward


@settings(max_examples=12, deadline=None, derandomize=True)
@given(cell=st.sampled_from(sorted(CELLS)), layers=st.integers(1, 2), bidirectional=st.booleans(),
       batch_first=st.booleans(), bias=st.booleans(), with_state=st.booleans(), unbatched=st.booleans())
def test_lowered_module_computes_its_outputs_and_gradients(cell, layers, bidirectional, batch_first, bias,
                                                          with_state, unbatched):
    """(output, h_n[, c_n]) and every parameter's and input's gradient equal the module's."""
    torch.manual_seed(0)
    rnn = recurrent(cell, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    x = torch.randn(*(() if unbatched else (2,)), 5, 3, dtype=DTYPE)
    if not batch_first and not unbatched:
        x = x.transpose(0, 1)
    x.requires_grad_()
    state = torch.randn(layers * (1 + bidirectional), *(() if unbatched else (2,)), 4, dtype=DTYPE)
    hx = ((state, torch.randn_like(state)) if cell == "lstm" else state) if with_state else None
    module = Holder(rnn)
    expected, got = module(x, hx), lowered(module)(x, hx)
    assert type(got) is type(expected) and len(got) == len(expected)
    assert [t.shape for t in leaves(got)] == [t.shape for t in leaves(expected)]
    for e, g in zip(leaves(expected), leaves(got)):
        torch.testing.assert_close(g, e, **TOL)
    assert_equal_gradients(expected, got, [x, *rnn.parameters()])


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")
@pytest.mark.parametrize("rnn, shape, state", [
    (nn.RNN(3, 4, 2, nonlinearity="relu", bidirectional=True), (5, 2, 3), (4, 2, 4)),  # sequence-first
    (nn.LSTM(3, 4), (5, 3), (1, 4)),  # unbatched, with (h0, c0)
    (nn.GRU(3, 4, 2, bias=False, batch_first=True), (2, 5, 3), None),
])
def test_lowered_aten_call_of_an_exported_graph_computes_the_modules_outputs(rnn, shape, state):
    """Under torch.export the module is an aten.lstm / gru / rnn_* call; lowered, it computes the same."""
    module = Holder(rnn.to(DTYPE))
    x = torch.randn(*shape, dtype=DTYPE)
    hx = None if state is None else torch.randn(*state, dtype=DTYPE)
    hx = (hx, torch.randn_like(hx)) if isinstance(rnn, nn.LSTM) else hx
    graph = lower_recurrent(export(module, (x, hx), {}).graph_module)
    assert sum(n.target is scan_rows for n in graph.graph.nodes) == rnn.num_layers * (1 + rnn.bidirectional)
    for e, g in zip(leaves(module(x, hx)), leaves(graph(x, hx)), strict=True):
        torch.testing.assert_close(g, e, **TOL)


def test_lowered_dropout_draws_the_modules_masks():
    """Between layers (training) the lowered graph draws the masks ATen's kernel draws from the same
    random state, so a replay of the training forward through the module (gnfx.random_state) sees them."""
    rnn = recurrent("lstm", num_layers=3, dropout=0.5, batch_first=True)
    module, x = Holder(rnn), torch.randn(4, 6, 3, dtype=DTYPE)
    torch.manual_seed(3)
    expected = module(x, None)
    torch.manual_seed(3)
    got = lowered(module)(x, None)
    for e, g in zip(leaves(expected), leaves(got)):
        torch.testing.assert_close(g, e, **TOL)


# ----------------------------------------------------------------------------- statistics


def unrolled_rows(model: Tagger, x, y):
    """{parameter name of W: (a, g) rows (N, T, d), (N, T, G)} of every input and hidden product of the
    tagger's single-layer forward LSTM/GRU, by a cell written out here: the products of each step
    retain their gradients. Also returns M, the loss terms."""
    rnn = model.rnn
    W_ih, W_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    n, steps, hidden = x.shape[0], x.shape[1], rnn.hidden_size
    h, c = torch.zeros(n, hidden, dtype=DTYPE), torch.zeros(n, hidden, dtype=DTYPE)
    records, outputs = [], []
    for t in range(steps):
        gx, hp = x[:, t] @ W_ih.T + b_ih, h @ W_hh.T + b_hh
        gx.retain_grad()
        hp.retain_grad()
        records.append((x[:, t], gx, h, hp))
        if isinstance(rnn, nn.LSTM):
            i, f, g, o = (gx + hp).split(hidden, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:  # GRU: the hidden part of the n gate is r ⊙ (W_hn h + b_hn)
            r = torch.sigmoid(gx[:, :hidden] + hp[:, :hidden])
            z = torch.sigmoid(gx[:, hidden:2 * hidden] + hp[:, hidden:2 * hidden])
            candidate = torch.tanh(gx[:, 2 * hidden:] + r * hp[:, 2 * hidden:])
            h = (1 - z) * candidate + z * h
        outputs.append(h)
    out = model.head(torch.stack(outputs, 1))
    torch.testing.assert_close(out, model(x), **TOL)  # the written-out cell is the module's
    cross_entropy(out, y).backward()
    model.zero_grad()
    stack = lambda k, grad=False: torch.stack([r[k].grad if grad else r[k].detach() for r in records], 1)  # noqa: E731
    return {"rnn.weight_ih_l0": [(stack(0), stack(1, True))],
            "rnn.weight_hh_l0": [(stack(2), stack(3, True))]}, out.shape[:-1].numel()


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")  # torch.export's, on nn.RNNBase
@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_factors_and_diagonals_equal_the_unrolled_cell_and_per_example_gradients(cell, capture):
    """A and S of W_ih's and W_hh's blocks equal those of the written-out cell's rows (hooks on each
    step's products), and the per-example diagonals those of per-example gradients (autograd on each
    example of the module: torch.func.vmap has no batching rule of ATen's recurrent kernels)."""
    model, (x, y) = Tagger(cell, batch_first=True), data()
    rows, M = unrolled_rows(model, x, y)
    diags = per_example_fisher_diag(model, x, y, vectorized=False)  # (vmap: see the docstring)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers.form == capture
    assert {b.name: b.kind for b in c.layers} == {"rnn.weight_ih_l0": "linear", "rnn.weight_hh_l0": "recurrent",
                                                  "head": "linear"}
    statistic_step(c, x, y)
    for name, calls in rows.items():
        got, expected = c.statistics(name), kfac_factors(calls, True, "expand", M)
        torch.testing.assert_close(got["A"], expected["A"], **TOL)
        torch.testing.assert_close(got["S"], expected["S"], **TOL)
        part = name.split(".")[1].replace("weight", "bias")
        diag = torch.cat([diags[name], diags[f"rnn.{part}"][:, None]], dim=1)
        torch.testing.assert_close(got["diag"], diag, **TOL)


@pytest.mark.filterwarnings("ignore:gnfx reads each layer input's batch")  # the tagger's input is batch-first
@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_every_direction_and_layer_is_a_block_with_per_example_diagonals(capture):
    """A sequence-first, bidirectional two-layer GRU: all eight weights are in blocks, and every
    block's per-example diagonal equals the per-example gradients' (the rows are taken batch-major)."""
    model, (x, y) = Tagger("gru", num_layers=2, bidirectional=True, bias=False), data(n=4)
    diags = per_example_fisher_diag(model, x, y, vectorized=False)  # vmap has no batching rule of ATen's lstm
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers.form == capture
    names = {f"rnn.weight_{part}_l{layer}{suffix}" for part in ("ih", "hh") for layer in (0, 1)
             for suffix in ("", "_reverse")}
    assert {b.name for b in c.layers} == names | {"head"} and not c.layers.fallbacks
    statistic_step(c, x, y)
    for name in names:
        torch.testing.assert_close(c.statistics(name)["diag"], diags[name], **TOL)


class Twice(nn.Module):
    """One GRU called twice, the second time from the first call's final state, on the reversed input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = recurrent("gru", batch_first=True), nn.Linear(4, 3).to(DTYPE)

    def forward(self, x):
        first, state = self.rnn(x)
        second, _ = self.rnn(x.flip(1), state)
        return self.head(first + second)


def test_a_module_called_twice_is_one_block_per_weight_over_both_calls():
    """Each weight's two call sites form one block; its per-example diagonal (the gradient of each
    example summed over both calls) equals the per-example gradients'."""
    model, (x, y) = Twice(), data()
    diags = per_example_fisher_diag(model, x, y, vectorized=False)
    c = compile_for_statistics(model, optimizer="kfac")
    assert {b.name: len(b.sites) for b in c.layers} == {"rnn.weight_ih_l0": 2, "rnn.weight_hh_l0": 2, "head": 1}
    statistic_step(c, x, y)
    for part in ("ih", "hh"):
        diag = torch.cat([diags[f"rnn.weight_{part}_l0"], diags[f"rnn.bias_{part}_l0"][:, None]], dim=1)
        torch.testing.assert_close(c.statistics(f"rnn.weight_{part}_l0")["diag"], diag, **TOL)


# ----------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("options", [{}, {"proj_size": 2}])
def test_ggn_product_equals_jvp_and_vjp_through_the_lowered_graph(options):
    """gnfx.ggn's G v on the compiled tagger (its products run through the module, ATen's kernels)
    equals Jᵀ (H_ℓ (J v)) with J by torch.func jvp and vjp through the lowered graph (an LSTM with
    projections too: W_hr inside the scan)."""
    model, (x, y) = Tagger("lstm", num_layers=2, batch_first=True, **options), data()
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    graph = lowered(model)
    f = lambda *theta: functional_call(graph, dict(zip(names, theta)), (x,))  # noqa: E731
    z, Jv = jvp(f, tuple(params), tuple(v))
    HJv = jvp(grad(lambda out: cross_entropy(out, y)), (z,), (Jv,))[1]
    expected = vjp(f, *params)[1](HJv)
    for got, e in zip(gnfx.ggn.ggn_vp(c, "cross_entropy", x, y, v), expected):
        torch.testing.assert_close(got, e, **TOL)


# ----------------------------------------------------------------------------- LSTM with projections


PROJECTED = "_l0", "_l0_reverse", "_l1", "_l1_reverse"


class UnrolledProjectedLSTM(nn.Module):
    """An nn.LSTM with projections (proj_size P > 0) written out on one example's own sequence (T, d), an
    nn.Linear per product called at every step, so that hooks on them see each step's rows: per layer and
    direction `ih` (W_ih, b_ih), `hh` (W_hh (4H, P), b_hh) and `hr` (W_hr (P, H), no bias), with
    c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g), h̃_t = σ(o) ⊙ tanh(c_t), h_t = W_hr h̃_t (h_0, c_0 zeros)."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.hidden, self.projected = lstm.hidden_size, lstm.proj_size
        self.suffixes = [f"_l{layer}{suffix}" for layer in range(lstm.num_layers)
                         for suffix in ("", "_reverse")[:1 + lstm.bidirectional]]
        self.products = nn.ModuleDict()
        for suffix in self.suffixes:
            weights = {part: getattr(lstm, f"weight_{part}{suffix}").detach() for part in ("ih", "hh", "hr")}
            products = nn.ModuleDict({part: nn.Linear(w.shape[1], w.shape[0], bias=lstm.bias and part != "hr",
                                                      dtype=DTYPE) for part, w in weights.items()})
            for part, w in weights.items():
                products[part].weight.data.copy_(w)
                if part != "hr" and lstm.bias:
                    products[part].bias.data.copy_(getattr(lstm, f"bias_{part}{suffix}").detach())
            self.products[suffix] = products
        self.directions = 1 + lstm.bidirectional

    def forward(self, x):
        for layer in range(len(self.suffixes) // self.directions):
            outputs = []
            for direction in range(self.directions):
                p = self.products[self.suffixes[layer * self.directions + direction]]
                h, c = x.new_zeros(1, self.projected), x.new_zeros(1, self.hidden)
                steps, states = range(len(x)), [None] * len(x)
                for t in (reversed(steps) if direction else steps):
                    i, f, g, o = (p.ih(x[t:t + 1]) + p.hh(h)).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = states[t] = p.hr(torch.sigmoid(o) * torch.tanh(c))
                outputs.append(torch.cat(states))
            x = torch.cat(outputs, -1)
        return x


class UnrolledTagger(nn.Module):
    """`Tagger`'s function with its LSTM written out (`UnrolledProjectedLSTM`), example by example."""

    def __init__(self, model: Tagger):
        super().__init__()
        self.rnn, self.head = UnrolledProjectedLSTM(model.rnn), model.head

    def forward(self, x):
        return self.head(torch.stack([self.rnn(example) for example in x]))


def projected_factors(model: nn.Module, reference: nn.Module, x, y, **kwargs):
    """{parameter name of the module's LSTM: (A, S)} from hooks on the written-out `reference` (its
    products' nn.Linear, every step a call of one example: A = 1/R Σ_r ā ā ᵀ, S = M Σ_r g gᵀ)."""
    names = {f"rnn.weight_{part}{suffix}": f"rnn.products.{suffix}.{part}" for suffix in reference.rnn.suffixes
             for part in ("ih", "hh", "hr")}
    calls, M = record_linear_calls(reference, names.values(), x, y, **kwargs)
    torch.testing.assert_close(reference(x, **kwargs), model(x, **kwargs), **TOL)  # the written-out LSTM is the module
    bias = model.rnn.bias
    return {name: kfac_factors(calls[path], bias and "_hr" not in name, "expand", M) for name, path in names.items()}


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")
@pytest.mark.parametrize("rnn, shape, state", [
    (nn.LSTM(3, 5, 2, proj_size=2, bidirectional=True), (6, 2, 3), (4, 2, 2)),  # sequence-first
    (nn.LSTM(3, 5, 2, proj_size=2, batch_first=True, bias=False), (2, 6, 3), None),
    (nn.LSTM(3, 5, proj_size=4, bidirectional=True), (6, 3), (2, 4)),  # unbatched
])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_lowered_lstm_with_projections_computes_its_outputs_states_and_gradients(rnn, shape, state, capture):
    """output, h_n (L·D, N, P) and c_n (L·D, N, H) of the lowered module are the module's to 1e-12 (fx: a
    call of the module, export: aten.lstm with W_hr among its weights), and so is every gradient."""
    torch.manual_seed(0)
    module = Holder(rnn.to(DTYPE))
    x = torch.randn(*shape, dtype=DTYPE, requires_grad=True)
    hx = None if state is None else (torch.randn(*state, dtype=DTYPE),
                                      torch.randn(*state[:-1], rnn.hidden_size, dtype=DTYPE))
    graph = lowered(module) if capture == "fx" else lower_recurrent(export(module, (x, hx), {}).graph_module)
    expected, got = module(x, hx), graph(x, hx)
    for e, g in zip(leaves(expected), leaves(got), strict=True):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    assert_equal_gradients(expected, got, [x, *rnn.parameters()])


@pytest.mark.filterwarnings("ignore:gnfx reads each layer input's batch")
@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")
@pytest.mark.parametrize("capture, batch_first", [("fx", True), ("fx", False), ("export", False)])
def test_an_lstm_with_projections_is_blocks_whose_factors_are_the_written_out_lstms(capture, batch_first):
    """Every layer and direction of a two-layer bidirectional LSTM with projections is three blocks (before:
    all its parameters fell back, 'an LSTM with proj_size > 0'): W_ih and W_hh as without projections and
    W_hr (no bias) over the rows a = h̃_t, δ = ∂ℓ/∂h_t; A and S of each equal those of hooks on a
    written-out LSTM, and the per-example diagonals the per-example gradients'."""
    model = Tagger("lstm", hidden=5, num_layers=2, bidirectional=True, proj_size=2, batch_first=batch_first)
    x, y = data(n=3, steps=4)
    expected = projected_factors(model, UnrolledTagger(model), x, y)
    diags = per_example_fisher_diag(model, x, y, vectorized=False)  # vmap has no batching rule of ATen's lstm
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert {b.name: b.kind for b in c.layers} == {
        **{f"rnn.weight_{part}{suffix}": kind for suffix in PROJECTED
           for part, kind in (("ih", "linear"), ("hh", "recurrent"), ("hr", "recurrent"))}, "head": "linear"}
    assert not c.layers.fallbacks
    statistic_step(c, x, y)
    for name, factors in expected.items():
        got = c.statistics(name)
        torch.testing.assert_close(got["A"], factors["A"], **TOL)
        torch.testing.assert_close(got["S"], factors["S"], **TOL)
        bias = name.replace("weight", "bias")
        diag = diags[name] if "_hr" in name else torch.cat([diags[name], diags[bias][:, None]], dim=1)
        torch.testing.assert_close(got["diag"], diag, **TOL)


def test_kfac_step_on_an_lstm_with_projections_equals_the_dense_kronecker_solve():
    """One kfac step (lr, no momentum, weight decay or KL clip): each of W_ih, W_hh, W_hr moves by
    -η (S + λ_S I)⁻¹ [∇W ∇b] (A + λ_A I)⁻¹, λ_A = π√λ, λ_S = √λ/π, π = √((tr A/dim A) / (tr S/dim S)),
    with A, S from hooks on the written-out LSTM and ∇ from the module's own backward."""
    model = Tagger("lstm", hidden=5, bidirectional=True, proj_size=3, batch_first=True)
    x, y = data(n=4, steps=4)
    expected = projected_factors(model, UnrolledTagger(model), x, y)
    cross_entropy(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    damping, lr = 1e-2, 0.5
    c = gnfx.compile(model, optimizer="kfac", lr=lr, momentum=0.0, weight_decay=0.0, kl_clip=0.0, damping=damping,
                     stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(x), y).backward()
    c.step()
    params = dict(model.named_parameters())
    for name, factors in expected.items():
        A, S = factors["A"], factors["S"]
        bias = name.replace("weight", "bias") if "_hr" not in name else None
        G = torch.cat([grads[name], grads[bias][:, None]], 1) if bias else grads[name]
        pi = ((A.diagonal().mean() / S.diagonal().mean())).sqrt()
        A = A + pi * damping ** 0.5 * torch.eye(len(A), dtype=DTYPE)
        S = S + damping ** 0.5 / pi * torch.eye(len(S), dtype=DTYPE)
        U = torch.linalg.solve(S, torch.linalg.solve(A, G.T).T)  # (S + λ_S)⁻¹ G (A + λ_A)⁻¹, A symmetric
        torch.testing.assert_close(params[name].detach(), before[name] - lr * U[:, :grads[name].shape[1]], **TOL)
        if bias:
            torch.testing.assert_close(params[bias].detach(), before[bias] - lr * U[:, -1], **TOL)


@pytest.mark.parametrize("optimizer", ["ekfac", "shampoo", "rank1"])
def test_curvature_optimizers_train_an_lstm_with_projections_in_blocks(optimizer):
    """ekfac, shampoo and rank1 take W_hr's block as they take the others': every parameter in a block, the
    steps finite, the loss down."""
    model = Tagger("lstm", hidden=5, proj_size=3, batch_first=True)
    x, y = data(n=8, steps=5)
    c = gnfx.compile(model, optimizer=optimizer, lr=3e-2, stat_every=1)
    assert {"rnn.weight_hr_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0"} <= {b.name for b in c.layers}
    assert not c.layers.fallbacks
    losses = train(c, x, y, cross_entropy, 8)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses


class PackedProjected(nn.Module):
    """A two-layer bidirectional LSTM with projections on a batch packed in the forward (lengths given),
    a head on each example's summed outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(3, 5, 2, proj_size=2, bidirectional=True, batch_first=True).to(DTYPE)
        self.head = nn.Linear(4, 2).to(DTYPE)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0].sum(1))


class UnrolledPacked(nn.Module):
    """`PackedProjected`'s function with its LSTM written out on each example's own (unpadded) steps."""

    def __init__(self, model: PackedProjected):
        super().__init__()
        self.rnn, self.head = UnrolledProjectedLSTM(model.rnn), model.head

    def forward(self, x, lengths):
        return self.head(torch.stack([self.rnn(example[:n]).sum(0) for example, n in zip(x, lengths.tolist())]))


def test_a_packed_lstm_with_projections_is_blocks_over_the_unpadded_steps():
    """On the packed rows the three blocks of every layer and direction hold the (example, step) rows of
    each example's own steps: A and S those of the written-out LSTM run on the unpadded sequences, the
    outputs and gradients the module's."""
    model = PackedProjected()
    x, lengths, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.tensor([3, 5, 2, 4]), torch.tensor([0, 1, 1, 0])
    expected = projected_factors(model, UnrolledPacked(model), x, y, lengths=lengths)
    reference = model(x, lengths)
    grads = torch.autograd.grad(cross_entropy(reference, y), list(model.parameters()))
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    out = c(x, lengths)
    torch.testing.assert_close(out, reference, **TOL)
    for a, b in zip(torch.autograd.grad(cross_entropy(out, y), list(model.parameters()), retain_graph=True), grads):
        torch.testing.assert_close(a, b, **TOL)
    assert len(c.layers) == 13 and not c.layers.fallbacks
    cross_entropy(out, y).backward()
    c.step()
    for name, factors in expected.items():
        torch.testing.assert_close(c.statistics(name)["A"], factors["A"], **TOL)
        torch.testing.assert_close(c.statistics(name)["S"], factors["S"], **TOL)


class PackedProjectedLoss(nn.Module):
    """`PackedProjected` returning its mean cross-entropy: a 0-dimensional output, which gives no N."""

    def __init__(self, model: PackedProjected):
        super().__init__()
        self.model = model

    def forward(self, x, lengths, y):
        return cross_entropy(self.model(x, lengths), y)


def test_a_packed_lstm_under_a_loss_returned_by_the_model_takes_the_heads_examples():
    """Without an output to give N, the LSTM's blocks take the head's N (the loss's M = 4 terms), not the Σ_t b_t = 14
    packed rows their inputs hold (before: S 14/4 = 3.5 times that of the written-out LSTM on the unpadded sequences)."""
    model = PackedProjected()
    x, lengths, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.tensor([3, 5, 2, 4]), torch.tensor([0, 1, 1, 0])
    expected = projected_factors(model, UnrolledPacked(model), x, y, lengths=lengths)
    c = compile_for_statistics(PackedProjectedLoss(model), optimizer="kfac", capture="fx")
    c(x, lengths, y).backward()
    c.step()
    assert len(c.layers) == 13 and not c.layers.fallbacks
    for name, factors in expected.items():
        torch.testing.assert_close(c.statistics(f"model.{name}")["A"], factors["A"], **TOL)
        torch.testing.assert_close(c.statistics(f"model.{name}")["S"], factors["S"], **TOL)


# ----------------------------------------------------------------------------- fallbacks


class PackedTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

    def forward(self, packed):
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_given_to_the_model_is_lowered_and_leaf_modules_keeps_the_module_opaque():
    """A PackedSequence made outside the model reaches the lowered GRU, which runs it on the packed rows
    (gnfx.recurrent.scan_rows): outputs and gradients are the model's own; leaf_modules keeps it opaque."""
    torch.manual_seed(0)
    model = PackedTagger().to(DTYPE)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 3, dtype=DTYPE), torch.randn(2, 3, dtype=DTYPE)])
    y = torch.tensor([0, 1])
    reference = model(packed)
    grads = torch.autograd.grad(F.cross_entropy(reference, y), list(model.parameters()))
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    out = c(packed)
    torch.testing.assert_close(out, reference, **TOL)
    for a, b in zip(torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters())), grads):
        torch.testing.assert_close(a, b, **TOL)
    assert sorted(b.name for b in c.layers) == ["head", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    c = gnfx.compile(PackedTagger(), optimizer="kfac", lr=0.1, leaf_modules=["rnn"])
    F.cross_entropy(c(packed.to(torch.float32)), y).backward()
    c.step()
    assert [b.name for b in c.layers] == ["head"]


class PackingTagger(nn.Module):
    """Packs inside its forward, as LSTM tutorials do: `nn.utils.rnn.pack_padded_sequence` by attribute,
    `pad_packed_sequence` by the name this file imported (both forms a model's code takes)."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(5, 3), nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, tokens, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                                   enforce_sorted=False)
        padded, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(padded.sum(1))


def test_packing_in_the_forward_is_captured_and_the_packed_lstm_lowered():
    """torch.fx cannot trace the packing (its lengths go through Python); captured as graph calls, the
    LSTM on the packed input is lowered on the packed rows (its statistics: tests/test_nlp_patterns.py),
    every layer is a block, and the captured model's outputs and gradients are the model's own (float64)."""
    torch.manual_seed(0)
    model = PackingTagger().to(DTYPE)
    tokens, lengths, y = torch.randint(0, 5, (4, 6)), torch.tensor([6, 2, 4, 3]), torch.tensor([0, 1, 1, 0])
    reference = model(tokens, lengths)
    grads = torch.autograd.grad(F.cross_entropy(reference, y), list(model.parameters()))
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture="fx")
    assert sorted(b.name for b in c.layers) == ["embed", "head", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert not c.layers.fallbacks
    for _ in range(2):  # a statistic step (the tapped graph) and a plain one
        out = c(tokens, lengths)
        torch.testing.assert_close(out, reference, **TOL)
        got = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
        for a, b in zip(got, grads):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("given", [False, True])
def test_a_packed_module_with_dropout_between_layers_is_lowered_and_draws_the_kernels_masks(given):
    """ATen's packed kernels draw the dropout between layers on the packed rows, which the lowered graph
    draws on too (gnfx.recurrent.between_layers_dropout): a three-layer bidirectional LSTM with projections
    on a batch packed in the forward, and a GRU on a PackedSequence given to the model, are lowered (before:
    they fell back, 'through dropout between layers', or raised), and from the same random state the
    compiled model's statistic steps compute the model's outputs and gradients."""
    torch.manual_seed(0)
    if given:
        model = PackedTagger()
        model.rnn = nn.GRU(3, 4, num_layers=3, dropout=0.5, bidirectional=True, batch_first=True)  # head: h_n[-1]
        inputs = (nn.utils.rnn.pack_sequence([torch.randn(n, 3, dtype=DTYPE) for n in (3, 5, 2, 4)],
                                             enforce_sorted=False),)
    else:
        model = PackingTagger()
        model.rnn = nn.LSTM(3, 4, num_layers=3, dropout=0.5, bidirectional=True, proj_size=2, batch_first=True)
        model.head = nn.Linear(4, 2)
        inputs = torch.randint(0, 5, (4, 6)), torch.tensor([6, 2, 4, 3])
    model, y = model.to(DTYPE), torch.tensor([0, 1, 1, 0])
    c = compile_for_statistics(model, optimizer="kfac", capture="fx")
    assert not c.layers.fallbacks and len(c.layers) == 6 * (2 + (not given)) + 1 + (not given)
    for seed in (1, 2):  # statistic steps: the lowered graph
        torch.manual_seed(seed)
        reference = model(*inputs)
        grads = torch.autograd.grad(F.cross_entropy(reference, y), list(model.parameters()))
        torch.manual_seed(seed)
        out = c(*inputs)
        torch.testing.assert_close(out, reference, **TOL)
        got = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
        for a, b in zip(got, grads):
            torch.testing.assert_close(a, b, **TOL)


def test_packing_written_out_has_the_kernels_values_and_forward_mode_derivatives():
    """Packing has no forward-mode derivative in torch; the forward-mode passes write it out
    (gnfx.composite_forms.composite_packing): the same packed rows and batch sizes as the kernel, and a
    tangent through packing, the packed LSTM and unpacking (dual tensors, as the quadratic step takes
    its products) equal to J v by reverse mode alone (torch.autograd.functional.jvp's double vjp)."""
    torch.manual_seed(0)
    model = PackingTagger().to(DTYPE)
    tokens, lengths = torch.randint(0, 5, (4, 6)), torch.tensor([6, 2, 4, 3])
    x = torch.randn(4, 6, 3, dtype=DTYPE)
    for batch_first in (True, False):
        sorted_lengths = lengths.sort(descending=True).values
        padded = x if batch_first else x.transpose(0, 1)
        with composite_packing():
            rows, sizes = torch._VF._pack_padded_sequence(padded, sorted_lengths, batch_first)
        expected_rows, expected_sizes = torch._VF._pack_padded_sequence(padded, sorted_lengths, batch_first)
        assert torch.equal(rows, expected_rows) and torch.equal(sizes, expected_sizes)
    with composite_packing():  # nested (a forward-mode pass inside another): the outer form stays
        with composite_packing():
            pass
        assert vars(torch._VF).get("_pack_padded_sequence") is not None
    assert "_pack_padded_sequence" not in vars(torch._VF)  # the kernel again
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    v = tuple(torch.randn_like(p) for p in params)
    f = lambda *theta: functional_call(model, dict(zip(names, theta)), (tokens, lengths))  # noqa: E731
    expected = torch.autograd.functional.jvp(f, params, v)[1]
    with forward_ad.dual_level(), forward_mode_kernels(), composite_packing():
        duals = {n: forward_ad.make_dual(p, t) for n, p, t in zip(names, params, v)}
        got = forward_ad.unpack_dual(functional_call(model, duals, (tokens, lengths))).tangent
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.filterwarnings("ignore:gnfx. only")
def test_kfac_at_defaults_trains_a_packing_model():
    """The quadratic-model step (no lr) runs its forward-mode products through the packing."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (16, 6), generator=g)
    lengths = torch.randint(2, 7, (16,), generator=g)
    y = (tokens[:, 0] % 2)
    torch.manual_seed(0)
    c = gnfx.compile(PackingTagger(), optimizer="kfac", loss="cross_entropy")
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(c(tokens, lengths), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_gnfx_ggn_on_a_packing_model_raises_a_gnfx_error_naming_torch_func():
    """gnfx.ggn runs the model under torch.func, whose wrapped tensors ATen's recurrent kernels on a
    PackedSequence cannot read (a raw RuntimeError about a data pointer before): the error names
    torch.func, the packed sequence and the fix."""
    tokens, lengths, y = torch.randint(0, 5, (4, 6)), torch.tensor([6, 2, 4, 3]), torch.tensor([0, 1, 1, 0])
    model = PackingTagger()
    model(tokens, lengths)  # the model's own forward runs
    v = [torch.randn_like(p) for p in model.parameters()]
    with pytest.raises(gnfx.GnfxError, match=r"under torch.func .*PackedSequence.*padded batch"):
        gnfx.ggn.ggn_vp(model, "cross_entropy", (tokens, lengths), y, v)


# ----------------------------------------------------------------------------- training


class LanguageModel(nn.Module):
    def __init__(self, cell, vocabulary=6, **options):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocabulary, 8)
        self.rnn = CELLS[cell](8, 16, batch_first=True, **options)
        self.head = nn.Linear(options.get("proj_size") or 16, vocabulary)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


@pytest.mark.parametrize("cell, optimizer, options, rnn_options", [
    ("lstm", "kfac", {"loss": "cross_entropy"}, {}),  # the defaults: the quadratic-model step, no lr
    ("lstm", "kfac", {"loss": "cross_entropy"}, {"proj_size": 6}),
    ("gru", "ekfac", {"lr": 3e-2}, {}),
])
def test_kfac_and_ekfac_train_a_recurrent_model_without_fallback(cell, optimizer, options, rnn_options):
    """Next-token prediction on a periodic sequence (token t+1 = token t + 1 mod V): learnable only
    through the recurrence's memory of the last token. Every parameter is in a block."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 6, (16, 1), generator=g)
    tokens = (starts + torch.arange(13)) % 6
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = LanguageModel(cell, **rnn_options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")  # torch's, on its kernel
        c = gnfx.compile(model, optimizer=optimizer, **options)
        losses = train(c, x, y, cross_entropy, 30)
    assert not c.layers.fallbacks
    assert losses[-1] < 0.2 * losses[0], losses
