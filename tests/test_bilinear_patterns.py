"""Bilinear maps `z_k = x1ᵀ W_k x2 + b_k` (nn.Bilinear, F.bilinear) as curvature blocks.

With W (d_out, d1, d2) read as W.flatten(1), the layer is the linear map of the outer product
a = vec(x1 x2ᵀ) (gnfx.layouts.bilinear). The references are a twin model whose layer is an nn.Linear
over that outer product, formed in its forward, with the same values: plain forward/backward hooks on
it give A = E[ā āᵀ] and S = M Σ g gᵀ (tests/references.py), torch.func.vmap its per-example gradients,
and K-FAC on the twin (a linear block) the step the bilinear block must take. float64 throughout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import TOL, cross_entropy, hook_statistics, layer_diag, per_example_fisher_diag

D1, D2, D_OUT, CLASSES = 3, 4, 5, 3


def outer(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """vec(x1 x2ᵀ) per row: entry i·d2 + j is x1_i x2_j."""
    return (x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2)


class BilinearNet(nn.Module):
    """x (..., d1 + d2) split into (x1, x2) -> bilinear map -> tanh -> linear head; `functional`: the map is
    F.bilinear of the net's own (W, b) instead of an nn.Bilinear."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.bil = nn.Bilinear(D1, D2, D_OUT)
        if functional:
            self.weight, self.bias = self.bil.weight, self.bil.bias
            del self.bil
        self.head = nn.Linear(D_OUT, CLASSES)

    def forward(self, x):
        x1, x2 = x[..., :D1], x[..., D1:]
        z = F.bilinear(x1, x2, self.weight, self.bias) if self.functional else self.bil(x1, x2)
        return self.head(torch.tanh(z))


class OuterTwin(nn.Module):
    """The same function with the bilinear map as an nn.Linear over vec(x1 x2ᵀ)."""

    def __init__(self, model: BilinearNet):
        super().__init__()
        weight, bias = (model.weight, model.bias) if model.functional else (model.bil.weight, model.bil.bias)
        self.lin = nn.Linear(D1 * D2, D_OUT).to(weight.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(weight.flatten(1))
            self.lin.bias.copy_(bias)
        self.head = nn.Linear(D_OUT, CLASSES).to(weight.dtype)
        self.head.load_state_dict(model.head.state_dict())

    def forward(self, x):
        return self.head(torch.tanh(self.lin(outer(x[..., :D1], x[..., D1:]))))


def _block(model: BilinearNet) -> str:
    return "weight" if model.functional else "bil"


def _data(positions: int | None, seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    shape = (n, D1 + D2) if positions is None else (n, positions, D1 + D2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, shape[:-1], generator=g)


def _step(c, x, y):
    cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("positions", [None, 2], ids=["rows", "positions"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.bilinear"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_bilinear_factors_and_diagonal_are_those_of_a_linear_map_of_the_outer_product(capture, functional, positions,
                                                                                     approx):
    """nn.Bilinear (fx: a leaf module call, lowered to torch.bilinear; export: aten.bilinear) and F.bilinear are
    one block of kind "bilinear" whose A, S equal the hooks' on the twin's nn.Linear over vec(x1 x2ᵀ) (of
    d1·d2 + 1 entries with the bias), under both kfac_approx, and whose per-example diagonal equals vmap's
    per-example gradients of W.flatten(1) and b."""
    torch.manual_seed(0)
    model = BilinearNet(functional).double()
    x, y = _data(positions)
    c = gnfx.compile(model, "kfac", capture=capture, lr=1e-2, stat_every=1, stat_decay=0.0, kfac_approx=approx,
                     statistics=("A", "S", "diag"), example_inputs=(x,))
    name = _block(model)
    assert c.layers[name].kind == "bilinear" and not c.layers.fallbacks
    twin = OuterTwin(model)  # (before the step moves the model)
    _step(c, x, y)
    expected = hook_statistics(twin, ["lin"], x, y, approx)["lin"]
    stats = c.statistics(name)
    assert stats["A"].shape == (D1 * D2 + 1, D1 * D2 + 1)
    torch.testing.assert_close(stats["A"], expected["A"], **TOL)
    torch.testing.assert_close(stats["S"], expected["S"], **TOL)
    torch.testing.assert_close(stats["diag"], layer_diag(per_example_fisher_diag(twin, x, y), "lin"), **TOL)


def test_one_kfac_step_of_a_bilinear_block_is_that_of_the_linear_twin():
    """One K-FAC step (lr given) moves W.flatten(1), b and the head exactly as the same K-FAC moves the twin's
    nn.Linear over the outer product, and its head."""
    torch.manual_seed(0)
    model = BilinearNet().double()
    twin = OuterTwin(model)
    x, y = _data(None)
    settings = dict(lr=0.3, damping=0.05, stat_every=1)
    c, c_twin = gnfx.compile(model, "kfac", **settings), gnfx.compile(twin, "kfac", **settings)
    before = model.bil.weight.detach().clone()
    _step(c, x, y)
    _step(c_twin, x, y)
    assert (model.bil.weight - before).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(model.bil.weight.flatten(1), twin.lin.weight, **TOL)
    torch.testing.assert_close(model.bil.bias, twin.lin.bias, **TOL)
    torch.testing.assert_close(model.head.weight, twin.head.weight, **TOL)


class TwoInputNet(nn.Module):
    """A bilinear map of two model inputs: bil(x1, x2) -> head."""

    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(D1, D2, D_OUT)
        self.head = nn.Linear(D_OUT, CLASSES)

    def forward(self, x1, x2):
        return self.head(torch.relu(self.bil(x1, x2)))


def _task(n: int = 64, seed: int = 0):
    """Classes of the sign pattern of two fixed bilinear forms of (x1, x2): a task no linear map of x1 and x2
    solves."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(n, D1, generator=g), torch.randn(n, D2, generator=g)
    forms = torch.randn(2, D1, D2, generator=g)
    s = torch.einsum("ni,kij,nj->nk", x1, forms, x2) > 0
    return x1, x2, s[:, 0].long() + s[:, 1].long()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bilinear_map_of_two_model_inputs_is_an_input_block_in_both_captures(capture):
    """Given as two model inputs (example_inputs=), the bilinear map is a block reading the model's input
    (`model_input`), and its taps record the pair without changing the forward: the compiled model's
    output is the model's."""
    torch.manual_seed(0)
    model = TwoInputNet()
    x1, x2, _ = _task(8)
    c = gnfx.compile(model, "kfac", capture=capture, lr=1e-2, example_inputs=(x1, x2))
    assert c.layers["bil"].kind == "bilinear" and c.layers["bil"].model_input and not c.layers.fallbacks
    torch.testing.assert_close(c(x1, x2), model(x1, x2))


class OpaqueBilinear(nn.Module):
    """A submodule torch.fx cannot trace (a branch on a tensor's value) that calls its nn.Bilinear."""

    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(D1, D2, D_OUT)

    def forward(self, x1, x2):
        z = self.bil(x1, x2)
        return z if x1.sum() > -1e9 else 2 * z


class OpenedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = OpaqueBilinear()
        self.head = nn.Linear(D_OUT, CLASSES)

    def forward(self, x1, x2):
        return self.head(torch.tanh(self.inner(x1, x2)))


def test_an_nn_bilinear_called_by_opaque_code_is_opened_as_a_bilinear_block():
    """An nn.Bilinear inside a submodule fx cannot trace is opened (passes/opaque_children.py: its graph
    `(x1, x2) -> call_module`, lowered to torch.bilinear): a block whose A is the hooks' on the outer products."""
    torch.manual_seed(0)
    model = OpenedNet().double()
    x1, x2, y = _task(8)
    x1, x2 = x1.double(), x2.double()
    c = gnfx.compile(model, "kfac", capture="fx", lr=1e-2, stat_every=1, stat_decay=0.0, example_inputs=(x1, x2))
    assert "inner" in c.layers.leaves  # (an opaque submodule)
    assert c.layers["inner.bil"].kind == "bilinear" and not c.layers.fallbacks
    cross_entropy(c(x1, x2), y).backward()
    c.step()
    a = torch.cat([outer(x1, x2), torch.ones(len(x1), 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(c.statistics("inner.bil")["A"], a.T @ a / len(a), **TOL)


@pytest.mark.parametrize("name, settings", [("ekfac", dict(lr=3e-2)), ("shampoo", dict(lr=1e-2)),
                                            ("soap", dict(lr=3e-2)), ("rank1", dict(lr=1e-2)),
                                            ("kfac", dict(loss="cross_entropy"))],
                         ids=["ekfac", "shampoo", "soap", "rank1", "kfac-quadratic"])
def test_every_curvature_preconditioner_trains_a_bilinear_block(name, settings):
    """ekfac, shampoo, soap and rank1 (lr given) and K-FAC's quadratic-model step (no lr, loss=) train a
    bilinear block: the loss falls over 15 steps on one batch."""
    torch.manual_seed(0)
    model = TwoInputNet()
    x1, x2, y = _task()
    c = gnfx.compile(model, name, example_inputs=(x1, x2), **settings)
    assert c.layers["bil"].kind == "bilinear"
    first = F.cross_entropy(model(x1, x2), y).item()
    for _ in range(15):
        loss = F.cross_entropy(c(x1, x2), y)
        loss.backward()
        c.step()
        c.zero_grad()
    assert F.cross_entropy(model(x1, x2), y).item() < 0.8 * first


def test_a_bilinear_factor_above_max_factor_is_blocked_over_the_outer_products_entries():
    """A of d1·d2 = 48 entries (+ the bias) above max_factor 16 keeps its diagonal blocks only, of whole d2 = 8
    entries x1_i x2 each (4 blocks of 16, the bias in the last, zero-padded), each the hooks' block of the
    twin's A; the cost model counts the factors of the outer product's size: kept whole, the memory and
    FLOPs of the twin's linear block, and less blocked."""
    torch.manual_seed(0)
    d1, d2 = 6, 8

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(d1, d2, D_OUT)

        def forward(self, x):
            return self.bil(x[:, :d1], x[:, d1:])

    class WideTwin(nn.Module):
        def __init__(self, wide):
            super().__init__()
            self.lin = nn.Linear(d1 * d2, D_OUT).double()
            with torch.no_grad():
                self.lin.weight.copy_(wide.bil.weight.flatten(1))
                self.lin.bias.copy_(wide.bil.bias)

        def forward(self, x):
            return self.lin(outer(x[:, :d1], x[:, d1:]))

    model = Wide().double()
    x = torch.randn(16, d1 + d2, dtype=torch.float64)
    y = torch.randint(0, D_OUT, (16,))
    c = gnfx.compile(model, "kfac", lr=1e-2, max_factor=16, stat_every=1, stat_decay=0.0)
    whole = hook_statistics(WideTwin(model), ["lin"], x, y)["lin"]["A"]
    _step(c, x, y)
    A = c.statistics("bil")["A"]
    assert A.shape == (1, 4, 16, 16)
    padded = torch.zeros(64, 64, dtype=torch.float64)
    padded[:49, :49] = whole
    for i in range(4):
        torch.testing.assert_close(A[0, i], padded[16 * i:16 * (i + 1), 16 * i:16 * (i + 1)], **TOL)
    blocked = c.cost(batch_size=16)["bil"]
    whole = gnfx.compile(Wide().double(), "kfac", lr=1e-2).cost(batch_size=16)["bil"]
    linear = gnfx.compile(WideTwin(model), "kfac", lr=1e-2).cost(batch_size=16)["lin"]
    assert (whole.memory_bytes, whole.flops) == (linear.memory_bytes, linear.flops)
    assert blocked.memory_bytes < whole.memory_bytes


def test_a_weight_normed_bilinear_steps_as_the_weight_normed_linear_twin():
    """nn.utils.parametrizations.weight_norm on an nn.Bilinear (W_k = g_k v_k / ‖v_k‖, the norm over (d1, d2)) is a
    bilinear block over W (gnfx.reparametrization.WeightNorm): one K-FAC step moves (g, v) exactly as the same
    K-FAC moves the weight-normed nn.Linear over the outer product, whose v is v.flatten(1)."""
    torch.manual_seed(0)
    model = BilinearNet().double()
    twin = OuterTwin(model)
    model.bil = nn.utils.parametrizations.weight_norm(model.bil)
    twin.lin = nn.utils.parametrizations.weight_norm(twin.lin)
    x, y = _data(None)
    settings = dict(lr=0.3, damping=0.05, stat_every=1)
    c, c_twin = gnfx.compile(model, "kfac", **settings), gnfx.compile(twin, "kfac", **settings)
    assert c.layers["bil"].kind == "bilinear" and not c.layers.fallbacks
    v_before = model.bil.parametrizations.weight.original1.detach().clone()
    _step(c, x, y)
    _step(c_twin, x, y)
    ours, theirs = model.bil.parametrizations.weight, twin.lin.parametrizations.weight
    torch.testing.assert_close(ours.original0.flatten(1), theirs.original0, **TOL)  # g
    torch.testing.assert_close(ours.original1.flatten(1), theirs.original1, **TOL)  # v
    torch.testing.assert_close(model.bil.bias, twin.lin.bias, **TOL)
    assert (ours.original1 - v_before).abs().max() > 1e-4  # it moved


def test_per_example_statistics_form_the_outer_products_a_chunk_at_a_time(monkeypatch):
    """The per-example diagonal reads the layer input's chunks one at a time (gnfx.statistics `_example_chunks`):
    when the layout forms the next chunk of outer products, at most the one before is still held (it listed
    every chunk first, N·R·d1·d2 entries at once), and the diagonal is still vmap's."""
    import weakref

    from gnfx.layouts import bilinear

    monkeypatch.setattr(bilinear, "CHUNK_ELEMENTS", D1 * D2)  # one example a chunk
    chunks_of = bilinear.BilinearLayout.input_chunks
    held = []

    def watched(self, a):
        alive = []
        for chunk in chunks_of(self, a):
            held.append(sum(ref() is not None for ref in alive))
            alive.append(weakref.ref(chunk))
            yield chunk

    monkeypatch.setattr(bilinear.BilinearLayout, "input_chunks", watched)
    torch.manual_seed(0)
    model = BilinearNet().double()
    x, y = _data(None)
    expected = layer_diag(per_example_fisher_diag(OuterTwin(model), x, y), "lin")
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0, statistics=("A", "S", "diag"))
    held.clear()
    _step(c, x, y)
    assert len(held) >= 2 * len(x) and max(held) <= 1  # (A's pass and the diagonal's, 8 chunks each)
    torch.testing.assert_close(c.statistics("bil")["diag"], expected, **TOL)
