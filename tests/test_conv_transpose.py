"""Transposed convolutions (gnfx.layouts.conv_transpose): rows, K-FAC factors, per-example
diagonals and updates, against references that do not use gnfx's rows.

The reference rows come from autograd through `F.conv_transpose*` itself: z is linear in W, so
with g groups of C_in/g inputs and C_out/g outputs, `a_{n,l,j}[c·prod(k) + κ] =
∂z[n, j·C_out/g, l] / ∂W[j·C_in/g + c, 0, κ]`. The matrix Wmat (C_out x C_in/g·prod(k)) is built
entry by entry from the index map of the layout's docstring, `Wmat[j·C_out/g + o, c·prod(k) + κ] =
W[j·C_in/g + c, o, κ]`, and each set of rows is first checked to reproduce the output as
`z_j = a_j Wmat_jᵀ + b_j`. Output gradients g = ∂L/∂z come from a tensor hook, per-example
gradients from torch.func.vmap. With ā = [a, 1] (bias), M = N for the (N, C) logits and per group j
(one A and S without groups):

    expand:  A_j = 1/(N L) Σ_{n,l} ā_j ā_jᵀ      S_j = M Σ_{n,l} g_j g_jᵀ
    reduce:  A_j = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_l ā_{j,n,l}      S_j = M Σ_n (Σ_l g_j)(Σ_l g_j)ᵀ
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
from gnfx.targets import as_matrix, from_matrix
from references import augment, cross_entropy, per_example_grads
from steps import compile_for_statistics, statistic_step, train

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
    "1d-groups2-stride2-outpad1": (1, dict(kernel_size=3, stride=2, padding=1, output_padding=1, groups=2), (5,)),
    "2d-groups2-dilated": (2, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), groups=2), (3, 2)),
    "2d-depthwise-nobias": (2, dict(kernel_size=3, stride=2, padding=1, groups=4, bias=False), (3, 3)),
    "3d-groups2": (3, dict(kernel_size=2, stride=2, groups=2), (2, 2, 2)),
}
CHANNELS = {1: (4, 6), 2: (4, 4), 4: (4, 8)}  # (C_in, C_out) by groups


class ConvTNet(nn.Module):
    """transposed conv (the layer under test) → tanh → mean over positions → linear head: (N, 4)."""

    def __init__(self, dim, c_in, c_out, **conv):
        super().__init__()
        torch.manual_seed(0)
        self.conv = CONV_T[dim](c_in, c_out, **conv)
        self.head = nn.Linear(c_out, 4)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(2).mean(2))


def case(key, n=4):
    dim, conv, spatial = CASES[key]
    c_in, c_out = CHANNELS[conv.get("groups", 1)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c_in, *spatial, generator=g, dtype=DTYPE)
    return ConvTNet(dim, c_in, c_out, **conv), x, torch.randint(0, 4, (n,), generator=g)


def index_map(shape, groups: int) -> torch.Tensor:
    """(C_out, C_in/g·prod(k)) flat indices into W (C_in, C_out/g, *k): Wmat = W.flatten()[index],
    written out entry by entry from Wmat[j·C_out/g + o, c·prod(k) + κ] = W[j·C_in/g + c, o, κ]."""
    c_in, s, kernel = shape[0], shape[1], math.prod(shape[2:])
    r = c_in // groups
    flat = torch.arange(math.prod(shape)).reshape(c_in, s, kernel)
    return torch.tensor([[flat[j * r + c, o, kappa].item() for c in range(r) for kappa in range(kernel)]
                         for j in range(groups) for o in range(s)])


def reference_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, L, g, C_in/g·prod(k)) rows a[n, l, j, c·prod(k) + κ] = ∂z[n, j·C_out/g, l] / ∂W[j·C_in/g + c, 0, κ],
    by autograd through the functional transposed convolution (z is linear in W)."""
    def z(w):
        return FUNCTIONAL[x.dim() - 2](x, w, None, conv.stride, conv.padding, conv.output_padding,
                                       conv.groups, conv.dilation)

    w = conv.weight.detach()
    J = torch.autograd.functional.jacobian(z, w)  # (N, C_out, *S_out, C_in, C_out/g, *k)
    n, g, s, r = x.shape[0], conv.groups, w.shape[1], w.shape[0] // conv.groups
    J = J.reshape(n, g * s, -1, w.shape[0], s, math.prod(w.shape[2:]))
    return torch.stack([J[:, j * s, :, j * r:(j + 1) * r, 0] for j in range(g)], dim=2).flatten(3)


def record(model, x, y):
    """Reference rows a (N, L, g, d_in), output gradients g (N, L, C_out), the weight's gradient and
    the bias of `model.conv` under the cross-entropy loss, by hooks on a copy; checks
    z_j = a_j Wmat_jᵀ + b_j with the entry-by-entry Wmat (index_map)."""
    model = copy.deepcopy(model)
    seen = {}

    def hook(module, inputs, z):
        seen["x"], seen["z"] = inputs[0].detach(), z.detach()
        z.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = model.conv.register_forward_hook(hook)
    cross_entropy(model(x), y).backward()
    handle.remove()
    a = reference_rows(model.conv, seen["x"])
    w, groups = model.conv.weight.detach(), model.conv.groups
    Wmat = w.flatten()[index_map(w.shape, groups)].unflatten(0, (groups, -1))  # (g, C_out/g, d_in)
    b = model.conv.bias.detach() if model.conv.bias is not None else torch.zeros(groups * w.shape[1], dtype=DTYPE)
    z = torch.einsum("nljd,jod->nljo", a, Wmat).flatten(2) + b
    torch.testing.assert_close(z, seen["z"].flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    return a, seen["g"].flatten(2).transpose(1, 2), model.conv.weight.grad, model.conv.bias


def factors(a, g, bias: bool, approx: str, M: int) -> dict[str, torch.Tensor]:
    """The module docstring's A_j and S_j from rows a (N, L, g, d) and g (N, L, C_out), stacked
    (g, ...) for several groups."""
    a = augment(a, bias)
    g = g.unflatten(2, (a.shape[2], -1))
    if approx == "expand":
        rows_a, rows_g = a.flatten(0, 1), g.flatten(0, 1)  # (N L, g, ·)
        A, S = torch.einsum("rji,rjk->jik", rows_a, rows_a) / rows_a.shape[0], M * torch.einsum("rji,rjk->jik", rows_g, rows_g)
    else:
        a_n, g_n = a.mean(1), g.sum(1)
        A, S = torch.einsum("nji,njk->jik", a_n, a_n) / a.shape[0], M * torch.einsum("nji,njk->jik", g_n, g_n)
    return {"A": A, "S": S} if a.shape[2] > 1 else {"A": A[0], "S": S[0]}


def per_example_diag(model, x, y) -> torch.Tensor:
    """1/N Σ_n (∇ℓ̃_n)² in the [Wmat b] layout, from vmap per-example gradients."""
    grads = per_example_grads(model, x, y)
    index = index_map(model.conv.weight.shape, model.conv.groups)
    w = grads["conv.weight"].flatten(1)[:, index]  # (N, C_out, C_in/g·prod(k))
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
    assert block.kind == "conv_transpose" and (block.d_in, block.d_out) == (a.shape[3], g.shape[2])
    groups = model.conv.groups
    assert layout_of(block).groups == groups
    rows = torch.cat(list(layout_of(block).input_chunks(x)))
    torch.testing.assert_close(rows, a if groups > 1 else a[:, :, 0], **TOL)
    per_group = torch.einsum("nljo,nlji->joi", g.unflatten(2, (groups, -1)), a).flatten(0, 1)
    torch.testing.assert_close(per_group, w_grad.flatten()[index_map(w_grad.shape, groups)], **TOL)
    torch.testing.assert_close(as_matrix(w_grad, "in_out_flatten", groups), per_group, **TOL)
    assert torch.equal(from_matrix(as_matrix(w_grad, "in_out_flatten", groups), "in_out_flatten", w_grad.shape, groups), w_grad)
    if bias is not None:
        torch.testing.assert_close(g.sum((0, 1)), bias.grad, **TOL)


EXPORTED = ("1d-stride2-pad1-outpad1", "2d-stride-pad-outpad-dilation", "3d-stride-pad-outpad", "2d-groups2-dilated")


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


@pytest.mark.parametrize("key", ["1d-padding-beyond-the-kernel", "2d-dcgan", "3d-dilated-nobias", "2d-depthwise-nobias"])
def test_reduce_factors_equal_the_reference(key):
    model, x, y = case(key)
    a, g, _, bias = record(model, x, y)
    ref = factors(a, g, bias is not None, "reduce", x.shape[0])
    c = kfac_statistics(model, capture="fx", kfac_approx="reduce")
    statistic_step(c, x, y)
    got = c.statistics("conv")
    torch.testing.assert_close(got["A"], ref["A"], **TOL)
    torch.testing.assert_close(got["S"], ref["S"], **TOL)


@pytest.mark.parametrize("key", ["2d-stride-pad-outpad-dilation", "2d-groups2-dilated"])
def test_diag_second_moment_is_the_per_example_fisher_diagonal_in_the_weights_shape(key):
    """diag with source="fisher", β₁ = 0, one step: v = (1-β₂) · 1/N Σ_n (∇ℓ̃_n)², read back from the
    [Wmat b] layout into W's (C_in, C_out, *k) shape."""
    model, x, y = case(key)
    grads = per_example_grads(model, x, y)
    c = gnfx.compile(model, optimizer="diag", source="fisher", betas=(0.0, 0.99), stat_decay=0.0, lr=1e-3)
    cross_entropy(c(x), y).backward()
    c.step()
    for name in ("conv.weight", "conv.bias"):
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(c.optimizer.state[p]["exp_avg_sq"], 0.01 * grads[name].square().mean(0), **TOL)


@pytest.mark.parametrize("key", ["1d-stride2-pad1-outpad1", "2d-dcgan", "3d-stride-pad-outpad", "1d-groups2-stride2-outpad1"])
def test_kfac_step_equals_the_dense_kronecker_solve(key):
    """Per group j: G_j = the rows of [Wmat b]'s gradient, K_j = (A_j + π_j√λ I) ⊗ (S_j + √λ/π_j I)
    (kfac.py's π-corrected damping), column-major vec: [Wmat_j b_j] ← [Wmat_j b_j] - η unvec(K_j⁻¹ vec(G_j)),
    written back into W's (C_in, C_out/g, *k) shape."""
    model, x, y = case(key)
    a, g, w_grad, bias = record(model, x, y)
    groups = model.conv.groups
    ref = factors(a, g, True, "expand", x.shape[0])
    A, S = (ref["A"], ref["S"]) if groups > 1 else (ref["A"][None], ref["S"][None])
    damping, lr = 1e-2, 0.5
    w0, b0 = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    c = gnfx.compile(model, optimizer="kfac", lr=lr, momentum=0.0, weight_decay=0.0, kl_clip=0.0,
                     damping=damping, stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(x), y).backward()
    c.step()
    index = index_map(w0.shape, groups)
    G = torch.cat([w_grad.flatten()[index], bias.grad[:, None]], dim=1).unflatten(0, (groups, -1))
    U = []
    for A_j, S_j, G_j in zip(A, S, G):
        pi = (A_j.diagonal().mean() / S_j.diagonal().mean()).sqrt()
        K = torch.kron(A_j + pi * damping ** 0.5 * torch.eye(A_j.shape[0], dtype=DTYPE),
                       S_j + damping ** 0.5 / pi * torch.eye(S_j.shape[0], dtype=DTYPE))
        U.append(torch.linalg.solve(K, G_j.T.reshape(-1)).reshape(G_j.shape[1], G_j.shape[0]).T)
    U = torch.cat(U)
    expected_w = w0.flatten().clone()
    expected_w[index] -= lr * U[:, :-1]
    torch.testing.assert_close(model.conv.weight.detach(), expected_w.reshape(w0.shape), **TOL)
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
    losses = train(c, code, target, F.mse_loss, 30)
    assert {b.name: b.kind for b in c.layers if b.kind != "norm"} == {"fc": "linear", "up1": "conv_transpose",
                                                                      "up2": "conv_transpose"}
    assert not c.layers.fallbacks
    assert "conv_transpose" in str(c)
    assert losses[-1] < 0.5 * losses[0], losses


class Mixed(nn.Module):
    """A grouped and an ungrouped transposed convolution (the second with C_out = 1 and 1x1 kernels,
    where the matrix view of W is a true view), then a linear head: (N, 3, 3, 3) -> (N, 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1, groups=3)
        self.mix = nn.ConvTranspose2d(6, 1, 1)
        self.head = nn.Linear(36, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.relu(self.up(x)))).flatten(1))


PRECONDITIONERS = [("kfac", {"inv_every": 2}), ("ekfac", {"inv_every": 2}),
                   ("shampoo", {"start_preconditioning_step": 2, "max_block": 4}),  # pieces of the copied matrix
                   ("soap", {"lr": 5e-2}), ("rank1", {}), ("diag", {"source": "fisher", "lr": 0.1}), ("muon", {})]


@pytest.mark.parametrize("name, hp", PRECONDITIONERS, ids=[p for p, _ in PRECONDITIONERS])
def test_every_preconditioner_trains_transposed_convolutions_and_diagnose_reads_them(name, hp):
    model = Mixed()
    c = gnfx.compile(model, optimizer=name, stat_every=1, **({"lr": 1e-2} | hp))
    assert [(b.name, b.kind) for b in c.layers] == [("up", "conv_transpose"), ("mix", "conv_transpose"), ("head", "linear")]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 3, 3, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(c, x, y, F.cross_entropy, 8)
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in model.named_parameters())
    records = gnfx.diagnose(c, (x, y), loss="cross_entropy", verbose=False)
    assert {r.name for r in records} >= {"up", "mix"}
    assert all(math.isfinite(r.cosine) for r in records)


class Pair(nn.Module):
    """A layer (a transposed convolution or the convolution it equals) → tanh → mean → linear head."""

    def __init__(self, layer):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 4)
        self.layer = layer
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).mean(2))


def test_shampoo_pieces_of_a_transposed_convolution_step_as_those_of_the_convolution_it_equals():
    """At stride 1, conv_transpose(x, W, padding=1) with k = 3 is conv(x, W', padding=1),
    W'[o, c, κ] = W[c, o, 2-κ]: Wmat is W'.flatten(1) with each channel's kernel positions reversed, a
    permutation P of the columns inside the pieces of max_block = 6 (whole channels), under which
    Shampoo's step is equivariant (L⁻ᵖ G P (PᵀRP)⁻ᵖ = L⁻ᵖ G R⁻ᵖ P, graft norms unchanged). Three
    steps on both give the same weights: the pieces' writes land where they belong."""
    transposed = Pair(nn.ConvTranspose1d(4, 3, 3, padding=1, bias=False))
    conv = Pair(nn.Conv1d(4, 3, 3, padding=1, bias=False))
    with torch.no_grad():
        conv.head.load_state_dict(transposed.head.state_dict())
        conv.layer.weight.copy_(transposed.layer.weight.transpose(0, 1).flip(2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 5, generator=g, dtype=DTYPE), torch.randint(0, 4, (8,), generator=g)
    torch.testing.assert_close(transposed(x), conv(x), **TOL)
    compiled = [gnfx.compile(m, optimizer="shampoo", max_block=6, start_preconditioning_step=1, lr=0.1)
                for m in (transposed, conv)]
    assert [c.layers["layer"].kind for c in compiled] == ["conv_transpose", "conv"]
    pieces = [p.index for g in compiled[0].optimizer.curvature[0].groups for p in g.pieces if p.target.name == "layer"]
    assert sorted(p[1] for p in pieces) == [slice(0, 6), slice(6, 12)]
    before = transposed.layer.weight.detach().clone()
    for _ in range(3):
        for c in compiled:
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
    assert (transposed.layer.weight - before).abs().min() > 1e-6  # every entry moved
    torch.testing.assert_close(conv.layer.weight.detach(), transposed.layer.weight.detach().transpose(0, 1).flip(2), **TOL)
