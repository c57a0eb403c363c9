"""A weight of three dimensions or more read by a linear map through a flattening view (passes/linear.py):
`F.linear(x, w.view(d_out, -1), b)` (efficient-kan's spline weights, standalone_scale_spline=False),
`w.flatten(1)`, `x @ w.reshape(-1, d_out)`. The block steps W = w.flatten(1) (or w.flatten(0, -2)ᵀ) and writes
back through the view. References: plain forward hooks on the layer (A and S, float64), and the same model
written with a 2-D weight of the same values, stepped by K-FAC on the same batches.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import hook_statistics
from steps import compile_for_statistics, statistic_step

D_IN, A, B, D_OUT, CLASSES = 4, 3, 2, 5, 3  # the flattened layer maps A·B features to D_OUT


class FlatWeight(nn.Module):
    """z = W a + b, W stored as w (D_OUT, A, B) and read as `read` says."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        shape = (A, B, D_OUT) if read == "reshape_t" else (D_OUT, A, B)
        self.weight = nn.Parameter(torch.randn(shape) / (A * B) ** 0.5)
        self.bias = nn.Parameter(torch.randn(D_OUT) / 10)

    def matrix(self) -> torch.Tensor:
        """W (D_OUT x A·B), the matrix the layer applies."""
        return self.weight.flatten(0, -2).t() if self.read == "reshape_t" else self.weight.flatten(1)

    def forward(self, x):
        if self.read == "view":
            return F.linear(x, self.weight.view(D_OUT, -1), self.bias)
        if self.read == "flatten":
            return F.linear(x, self.weight.flatten(1), self.bias)
        return x @ self.weight.reshape(A * B, -1) + self.bias  # stored (A, B, D_OUT): x @ Wᵀ


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.inp = nn.Linear(D_IN, A * B)
        self.layer = layer
        self.head = nn.Linear(D_OUT, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.inp(x)))))


def _nets(read: str) -> tuple[nn.Module, nn.Module]:
    """The net with the flattened weight, and the same net with an nn.Linear of the same W in its place."""
    torch.manual_seed(0)
    flat = Net(FlatWeight(read)).double()
    plain = Net(nn.Linear(A * B, D_OUT)).double()
    with torch.no_grad():
        plain.inp.load_state_dict(flat.inp.state_dict())
        plain.head.load_state_dict(flat.head.state_dict())
        plain.layer.weight.copy_(flat.layer.matrix())
        plain.layer.bias.copy_(flat.layer.bias)
    return flat, plain


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, D_IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (16,), generator=g)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("read", ["view", "flatten", "reshape_t"])
def test_flattened_weight_is_a_block_with_the_hooks_factors(read, capture):
    """Before: the weight fell back ("used by call_method 'view' ..., not a layer gnfx models")."""
    flat, _ = _nets(read)
    x, y = _batch(1)
    expected = hook_statistics(flat, ["layer"], x, y)["layer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compile_for_statistics(flat, optimizer="kfac", capture=capture)
        statistic_step(c, x, y)
    assert c.layers.form == capture
    assert "layer" in [b.name for b in c.layers], c.layers
    assert "layer.weight" not in [f.param for f in c.layers.fallbacks]
    got = c.statistics("layer")
    torch.testing.assert_close(got["A"], expected["A"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["S"], expected["S"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("read, optimizer", [(read, optimizer) for read in ("view", "flatten", "reshape_t")
                                             for optimizer in ("kfac", "shampoo", "soap", "muon")
                                             if (read, optimizer) != ("reshape_t", "soap")])
def test_steps_of_the_flattened_weight_are_those_of_the_2d_one(read, optimizer):
    """The steps of the flattened weight are those of the same layer with a 2-D weight, written back to w.
    Not SOAP's of the transposed read: its first basis comes from one gradient, whose R = GᵀG (7 x 7, rank 5)
    has a null space in which eigh's basis follows rounding, and Adam's v in it is not rotation invariant; a
    2-D weight read as `x @ W` (view "t") differs from nn.Linear's by the same 0.04 after 3 steps."""
    flat, plain = _nets(read)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cf = gnfx.compile(flat, optimizer, lr=0.05, loss="cross_entropy", stat_every=1)
        cp = gnfx.compile(plain, optimizer, lr=0.05, loss="cross_entropy", stat_every=1)
        for step in range(3):
            x, y = _batch(10 + step)
            for c in (cf, cp):
                F.cross_entropy(c(x), y).backward()
                c.step()
                c.zero_grad()
    assert flat.layer.weight.shape == ((A, B, D_OUT) if read == "reshape_t" else (D_OUT, A, B))
    torch.testing.assert_close(flat.layer.matrix(), plain.layer.weight, rtol=1e-10, atol=1e-10)
    for name in ("layer.bias", "inp.weight", "inp.bias", "head.weight", "head.bias"):
        torch.testing.assert_close(flat.get_parameter(name), plain.get_parameter(name), rtol=1e-10, atol=1e-10)


class UnevenView(nn.Module):
    """`F.linear(x, w.view(D_OUT, -1))` of w (2, 2·D_OUT, 3): the matrix's rows are not w's first dimension,
    each mixes two of its rows: no view of w a block steps."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, D_OUT * 2, 3))

    def forward(self, x):
        return F.linear(x, self.weight.view(D_OUT, -1))


def test_a_reshape_that_is_no_flatten_of_the_rows_falls_back_with_its_reason():
    model = nn.Sequential(UnevenView(), nn.Linear(D_OUT, CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = gnfx.compile(model, "kfac", lr=1e-2, loss="cross_entropy")
    (fallback,) = [f for f in c.layers.fallbacks if f.param == "0.weight"]
    assert "whose rows are not its first dimension" in fallback.reason, fallback.reason


class SplineWeight(nn.Module):
    """efficient-kan's spline product with enable_standalone_scale_spline=False: its `scaled_spline_weight` is
    `spline_weight * 1.0` (the scaler's place taken by the number), read as `.view(out, -1)` by F.linear of the
    flattened bases (here the input itself, (N, A, B) flattened)."""

    def __init__(self):
        super().__init__()
        self.spline_weight = nn.Parameter(torch.randn(D_OUT, A, B) / (A * B) ** 0.5)

    def forward(self, x):
        return F.linear(x.view(x.size(0), -1), (self.spline_weight * 1.0).view(D_OUT, -1))


def test_efficient_kan_spline_weight_without_its_scaler_is_a_block():
    """Before: spline_weight fell back ("used by call_function 'mul'"): the scaled-weight pass took a product by
    a number only where linear maps read it directly, not through the view."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(D_IN, A * B), nn.Unflatten(1, (A, B)), SplineWeight(), nn.Tanh(),
                         nn.Linear(D_OUT, CLASSES)).double()
    plain = nn.Sequential(nn.Linear(D_IN, A * B), nn.Linear(A * B, D_OUT, bias=False), nn.Tanh(),
                          nn.Linear(D_OUT, CLASSES)).double()
    with torch.no_grad():
        plain[0].load_state_dict(flat[0].state_dict())
        plain[3].load_state_dict(flat[4].state_dict())
        plain[1].weight.copy_(flat[2].spline_weight.flatten(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cf = gnfx.compile(flat, "kfac", lr=0.05, loss="cross_entropy", stat_every=1)
        cp = gnfx.compile(plain, "kfac", lr=0.05, loss="cross_entropy", stat_every=1)
        assert [f.param for f in cf.layers.fallbacks] == [], cf.layers
        for step in range(3):
            x, y = _batch(10 + step)
            for c in (cf, cp):
                F.cross_entropy(c(x), y).backward()
                c.step()
                c.zero_grad()
    torch.testing.assert_close(flat[2].spline_weight.flatten(1), plain[1].weight, rtol=1e-10, atol=1e-10)
    for i, j in ((0, 0), (4, 3)):
        torch.testing.assert_close(flat[i].weight, plain[j].weight, rtol=1e-10, atol=1e-10)
