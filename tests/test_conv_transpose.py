"""Transposed convolutions (gnfx.layouts.conv_transpose): rows, K-FAC factors, per-example
diagonals and updates, against references that do not use gnfx's rows.

The reference rows come from autograd through `F.conv_transpose*` itself: z is linear in W, so
`a_{n,l}[c·prod(k) + κ] = ∂z[n, 0, l] / ∂W[c, 0, κ]` (the index map of the layout's docstring,
`Wmat[o, c·prod(k) + κ] = W[c, o, κ]`), and each set of them is first checked to reproduce the
output as `a Wmatᵀ + b`. Output gradients g = ∂L/∂z come from a tensor hook, per-example gradients
from torch.func.vmap. With ā = [a, 1] (bias) and M = N for the (N, C) logits:

    expand:  A = 1/(N L) Σ_{n,l} ā ā ᵀ      S = M Σ_{n,l} g gᵀ
    reduce:  A = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_l ā_{n,l}      S = M Σ_n (Σ_l g)(Σ_l g)ᵀ
    diag  = 1/N Σ_n (∇ℓ̃_n)²   in the [Wmat b] layout

Everything is float64 at 1e-10.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.layouts import layout_of
from gnfx.targets import as_matrix
from references import cross_entropy, per_example_grads
from steps import compile_for_statistics, statistic_step

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

kfac_statistics = functools.partial(compile_for_statistics, optimizer="kfac")

# (dim, ConvTranspose keyword arguments, input spatial size)
CASES = {
    "1d-stride2-pad1-outpad1": (1, dict(kernel_size=3, stride=2, padding=1, output_padding=1), (5,)),
    "1d-dilated-nobias": (1, dict(kernel_size=2, dilation=3, bias=False), (4,)),
    "1d-padding-beyond-the-kernel": (1, dict(kernel_size=2, stride=3, padding=2), (5,)),  # d(k-1) - p < 0: a crop
    "2d-dcgan": (2, dict(kernel_size=4, stride=2, padding=1), (3, 3)),
    "2d-stride-pad-outpad-dilation": (2, dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0),
                                              output_padding=(1, 2), dilation=(1, 2)), (3, 2)),
    "3d-stride-pad-outpad": (3, dict(kernel_size=2, stride=(1, 2, 2), padding=(0, 1, 0), output_padding=(0, 1, 0)),
                             (2, 3, 2)),
    "3d-dilated-nobias": (3, dict(kernel_size=(2, 1, 2), dilation=2, bias=False), (2, 2, 3)),
}


class ConvTNet(nn.Module):
    """transposed conv (the layer under test) → tanh → mean over positions → linear head: (N, 4)."""

    def __init__(self, dim, c_in=2, c_out=3, **conv):
        super().__init__()
        torch.manual_seed(0)
        self.conv = CONV_T[dim](c_in, c_out, **conv)
        self.head = nn.Linear(c_out, 4)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(2).mean(2))


def case(key, n=4):
    dim, conv, spatial = CASES[key]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, *spatial, generator=g, dtype=DTYPE)
    return ConvTNet(dim, **conv), x, torch.randint(0, 4, (n,), generator=g)


def reference_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, L, C_in·prod(k)) rows a[n, l, c·prod(k) + κ] = ∂z[n, 0, l] / ∂W[c, 0, κ], by autograd
    through the functional transposed convolution (z is linear in W)."""
    def z(w):
        return FUNCTIONAL[x.dim() - 2](x, w, None, conv.stride, conv.padding, conv.output_padding,
                                       conv.groups, conv.dilation)

    J = torch.autograd.functional.jacobian(z, conv.weight.detach())  # (N, C_out, *S_out, C_in, C_out, *k)
    n, n_spatial = x.shape[0], x.dim() - 2
    J = J.select(1, 0).select(2 + n_spatial, 0)  # (N, *S_out, C_in, *k)
    return J.reshape(n, math.prod(J.shape[1:1 + n_spatial]), -1)


def record(model, x, y):
    """Reference rows a (N, L, d_in) and output gradients g (N, L, C_out) of `model.conv` under the
    cross-entropy loss, by hooks on a copy; checks z = a Wmatᵀ + b with Wmat[o, c·K+κ] = W[c, o, κ]."""
    model = copy.deepcopy(model)
    seen = {}

    def hook(module, inputs, z):
        seen["x"], seen["z"] = inputs[0].detach(), z.detach()
        z.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = model.conv.register_forward_hook(hook)
    cross_entropy(model(x), y).backward()
    handle.remove()
    a = reference_rows(model.conv, seen["x"])
    w = model.conv.weight.detach()
    Wmat = torch.stack([torch.stack([w[c, o].flatten() for c in range(w.shape[0])]).flatten()
                        for o in range(w.shape[1])])  # the index map written out, entry by entry
    b = model.conv.bias.detach() if model.conv.bias is not None else 0
    torch.testing.assert_close(a @ Wmat.T + b, seen["z"].flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    return a, seen["g"].flatten(2).transpose(1, 2), model.conv.weight.grad, model.conv.bias


def factors(a, g, bias: bool, approx: str, M: int) -> dict[str, torch.Tensor]:
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if bias else a
    if approx == "expand":
        rows_a, rows_g = a.flatten(0, 1), g.flatten(0, 1)
        return {"A": rows_a.T @ rows_a / rows_a.shape[0], "S": M * rows_g.T @ rows_g}
    a_n, g_n = a.mean(1), g.sum(1)
    return {"A": a_n.T @ a_n / a.shape[0], "S": M * g_n.T @ g_n}


def per_example_diag(model, x, y) -> torch.Tensor:
    """1/N Σ_n (∇ℓ̃_n)² in the [Wmat b] layout, from vmap per-example gradients."""
    grads = per_example_grads(model, x, y)
    w = grads["conv.weight"].transpose(1, 2).flatten(2)  # (N, C_in, C_out, *k) -> (N, C_out, C_in·K)
    g = torch.cat([w, grads["conv.bias"][:, :, None]], dim=2) if "conv.bias" in grads else w
    return g.square().mean(0)


@pytest.mark.parametrize("key", list(CASES))
def test_rows_follow_the_index_map_and_give_the_weight_gradient(key):
    """gnfx's rows equal the autograd rows, and Σ_{n,l} δ aᵀ is the weight gradient read as Wmat
    (with Σ δ the bias gradient): δ = the output gradient of the summed loss."""
    model, x, y = case(key)
    a, g, w_grad, bias = record(model, x, y)
    c = gnfx.compile(model, optimizer="kfac", capture="fx", example_inputs=(x,))
    block = c.layers["conv"]
    assert block.kind == "conv_transpose" and (block.d_in, block.d_out) == (a.shape[2], g.shape[2])
    rows = torch.cat(list(layout_of(block).input_chunks(x)))
    torch.testing.assert_close(rows, a, **TOL)
    torch.testing.assert_close(torch.einsum("nlo,nli->oi", g, rows), as_matrix(w_grad, "in_out_flatten"), **TOL)
    if bias is not None:
        torch.testing.assert_close(g.sum((0, 1)), bias.grad, **TOL)


EXPORTED = ("1d-stride2-pad1-outpad1", "2d-stride-pad-outpad-dilation", "3d-stride-pad-outpad")


@pytest.mark.parametrize("key, capture", [(k, "fx") for k in CASES] + [(k, "export") for k in EXPORTED])
def test_expand_factors_and_per_example_diagonal_equal_the_references(key, capture):
    model, x, y = case(key)
    a, g, _, bias = record(model, x, y)
    ref = factors(a, g, bias is not None, "expand", x.shape[0])
    diag = per_example_diag(model, x, y)
    c = kfac_statistics(model, capture=capture, example_inputs=(x,))
    assert c.layers.form == capture and c.layers["conv"].kind == "conv_transpose" and not c.layers.fallbacks
    statistic_step(c, x, y)
    got = c.statistics("conv")
    for name, expected in (("A", ref["A"]), ("S", ref["S"]), ("diag", diag)):
        torch.testing.assert_close(got[name], expected, **TOL)


@pytest.mark.parametrize("key", ["1d-padding-beyond-the-kernel", "2d-dcgan", "3d-dilated-nobias"])
def test_reduce_factors_equal_the_reference(key):
    model, x, y = case(key)
    a, g, _, bias = record(model, x, y)
    ref = factors(a, g, bias is not None, "reduce", x.shape[0])
    c = kfac_statistics(model, capture="fx", kfac_approx="reduce")
    statistic_step(c, x, y)
    got = c.statistics("conv")
    torch.testing.assert_close(got["A"], ref["A"], **TOL)
    torch.testing.assert_close(got["S"], ref["S"], **TOL)


def test_diag_second_moment_is_the_per_example_fisher_diagonal_in_the_weights_shape():
    """diag with source="fisher", β₁ = 0, one step: v = (1-β₂) · 1/N Σ_n (∇ℓ̃_n)², read back from the
    [Wmat b] layout into W's (C_in, C_out, *k) shape."""
    model, x, y = case("2d-stride-pad-outpad-dilation")
    grads = per_example_grads(model, x, y)
    c = gnfx.compile(model, optimizer="diag", source="fisher", betas=(0.0, 0.99), stat_decay=0.0, lr=1e-3)
    cross_entropy(c(x), y).backward()
    c.step()
    for name in ("conv.weight", "conv.bias"):
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(c.optimizer.state[p]["exp_avg_sq"], 0.01 * grads[name].square().mean(0), **TOL)


@pytest.mark.parametrize("key", ["1d-stride2-pad1-outpad1", "2d-dcgan", "3d-stride-pad-outpad"])
def test_kfac_step_equals_the_dense_kronecker_solve(key):
    """G = [Wmat-view gradient, ∇b], K = (A + π√λ I) ⊗ (S + √λ/π I) (kfac.py's π-corrected damping),
    column-major vec: [Wmat b] ← [Wmat b] - η unvec(K⁻¹ vec(G)), written back into W's shape."""
    model, x, y = case(key)
    a, g, w_grad, bias = record(model, x, y)
    ref = factors(a, g, True, "expand", x.shape[0])
    damping, lr = 1e-2, 0.5
    w0, b0 = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    c = gnfx.compile(model, optimizer="kfac", lr=lr, momentum=0.0, weight_decay=0.0, kl_clip=0.0,
                     damping=damping, stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(x), y).backward()
    c.step()
    G = torch.cat([as_matrix(w_grad, "in_out_flatten"), bias.grad[:, None]], dim=1)
    A, S = ref["A"], ref["S"]
    pi = (A.diagonal().mean() / S.diagonal().mean()).sqrt()
    K = torch.kron(A + pi * damping ** 0.5 * torch.eye(A.shape[0], dtype=DTYPE),
                   S + damping ** 0.5 / pi * torch.eye(S.shape[0], dtype=DTYPE))
    U = torch.linalg.solve(K, G.T.reshape(-1)).reshape(G.shape[1], G.shape[0]).T
    expected_w = w0 - lr * U[:, :-1].reshape(w0.shape[1], w0.shape[0], *w0.shape[2:]).transpose(0, 1)
    torch.testing.assert_close(model.conv.weight.detach(), expected_w, **TOL)
    torch.testing.assert_close(model.conv.bias.detach(), b0 - lr * U[:, -1], **TOL)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, 3, 3, 3, dtype=DTYPE))
        self.bias = nn.Parameter(torch.randn(3, dtype=DTYPE))
        self.head = nn.Linear(3, 4).to(DTYPE)

    def forward(self, x):
        z = F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1, output_padding=1)
        return self.head(torch.tanh(z).mean((2, 3)))


def test_functional_conv_transpose_on_parameters_is_a_block():
    model = Functional()
    x = torch.randn(3, 2, 3, 3, dtype=DTYPE)
    c = gnfx.compile(model, optimizer="kfac", capture="fx", example_inputs=(x,))
    assert [(b.name, b.kind) for b in c.layers] == [("weight", "conv_transpose"), ("head", "linear")]
    assert not c.layers.fallbacks


def test_a_grouped_transposed_convolution_is_a_fallback_naming_why():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.randn(2, 4, 3, 3)
    with pytest.warns(UserWarning, match="in curvature blocks"):
        c = gnfx.compile(model, optimizer="kfac", capture="fx", example_inputs=(x,))
    assert [b.kind for b in c.layers] == ["linear"]
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {"0.weight", "0.bias"}
    assert all("grouped transposed convolution (groups=2)" in r for r in reasons.values())


class Decoder(nn.Module):
    """A DCGAN-like generator: code (N, 8) → linear → 16x4x4 → two transposed convs → 1x16x16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)

    def forward(self, code):
        h = torch.relu(self.fc(code)).unflatten(1, (16, 4, 4))
        return torch.tanh(self.up2(torch.relu(self.bn(self.up1(h)))))


@pytest.mark.parametrize("hp", [{}, {"lr": 0.05}], ids=["defaults", "lr"])
def test_a_dcgan_decoder_trains_with_kfac_and_its_transposed_convs_are_blocks(hp):
    model = Decoder()
    c = gnfx.compile(model, optimizer="kfac", loss="mse", **hp)
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(32, 8, generator=gen)
    grid = torch.linspace(-1, 1, 16)
    target = 0.8 * torch.sin(3 * grid[:, None] * code[:, :1, None, None] + 2 * grid[None, :] * code[:, 1:2, None, None])
    losses = []
    for _ in range(30):
        loss = F.mse_loss(c(code), target)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert {b.name: b.kind for b in c.layers if b.kind != "norm"} == {"fc": "linear", "up1": "conv_transpose",
                                                                      "up2": "conv_transpose"}
    assert not c.layers.fallbacks
    assert "conv_transpose" in str(c)
    assert losses[-1] < 0.5 * losses[0], losses
