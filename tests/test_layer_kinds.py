"""Layer kinds beyond `z = W a`: norm affine parameters, grouped convolutions, position embeddings
(gnfx.layouts.norm, .conv, .position) and attention projections across a rotary embedding.

The statistics against references that do not use gnfx, in float64 at 1e-10, with M loss terms
and g = ∂L/∂z recorded by hooks:

    norm      per feature f, ā_f = (x̂_f, 1):  A_f = 1/(N R) Σ_{n,r} ā_f ā_fᵀ,  S_f = M Σ_{n,r} g_f²
              (x̂ written out by hand from the norm's input); diag = 1/N Σ_n (∇ℓ̃_n)² in the [γ β]
              layout, ∇ℓ̃_n from torch.func.vmap (batch norm couples the examples, so there the
              reference is N Σ_n (Σ_r g x̂, Σ_r g)²).
    grouped   per group j: A_j, S_j of the ungrouped convolution of group j's input channels by
    conv      group j's kernels; diag from vmap.
    position  A_t = e_t / Σ e, e_t = Σ_n |g_{n,t}|² (0 on rows not read), S = M Σ_{n,t} g gᵀ, and
              tr(A_t S) = M Σ_n |g_{n,t}|², the trace of row t's own block; diag from vmap in the
              (d x T_max) layout.

Then every preconditioner that takes blocks trains a tiny model holding all of them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from references import cross_entropy, loss_terms, per_example_grads
from steps import compile_for_statistics, statistic_step

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


def record(model, name, x, y):
    """(input, output gradient, M) of submodule `name` on the loss of (x, y) (on a copy of `model`)."""
    model = copy.deepcopy(model)
    seen = {}

    def hook(module, inputs, z):
        seen["x"] = inputs[0].detach()
        z.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    dict(model.named_modules())[name].register_forward_hook(hook)
    out = model(x)
    cross_entropy(out, y).backward()
    return seen["x"], seen["g"], loss_terms(out)


# ----------------------------------------------------------------------------- norms


class HandRMSNorm(nn.Module):
    """RMSNorm as Llama writes it: γ * (x * rsqrt(mean(x²) + eps)), cast back."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


class HandLayerNorm(nn.Module):
    """LayerNorm written out: (x - mean) / sqrt(var + eps) * γ + β."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        return centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class TracedShapeLayerNorm(nn.Module):
    """F.layer_norm given the normalized shape as read from the input, `x.shape[-1:]` (vit-pytorch's
    NaViT): a traced value in torch.fx's graph."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


NORMS = {  # name -> (module, features on dim 1, x̂ by hand from the input x)
    "layer": (lambda d: nn.LayerNorm(d), False,
              lambda x, m: (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + m.eps).sqrt()),
    "rms": (lambda d: nn.RMSNorm(d, eps=1e-5), False,
            lambda x, m: x / (x.square().mean(-1, keepdim=True) + m.eps).sqrt()),
    "hand_rms": (lambda d: HandRMSNorm(d), False,
                 lambda x, m: x / (x.square().mean(-1, keepdim=True) + m.eps).sqrt()),
    "traced_shape_layer": (lambda d: TracedShapeLayerNorm(d), False,
                           lambda x, m: (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True)
                                                                          + m.eps).sqrt()),
    "hand_layer": (lambda d: HandLayerNorm(d), False,
                   lambda x, m: (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True)
                                                                  + m.eps).sqrt()),
    "group": (lambda d: nn.GroupNorm(min(2, d), d), True,
              lambda x, m: ((x.unflatten(1, (m.num_groups, -1)) - x.unflatten(1, (m.num_groups, -1)).mean(
                  (2, 3), keepdim=True)) / (x.unflatten(1, (m.num_groups, -1)).var((2, 3), unbiased=False, keepdim=True)
                                            + m.eps).sqrt()).flatten(1, 2)),
    "batch": (lambda d: nn.BatchNorm1d(d), True,
              lambda x, m: (x - x.mean((0, 2), keepdim=True)) / (x.var((0, 2), unbiased=False, keepdim=True)
                                                                  + m.eps).sqrt()),
    "instance": (lambda d: nn.InstanceNorm1d(d, affine=True), True,
                 lambda x, m: (x - x.mean(2, keepdim=True)) / (x.var(2, unbiased=False, keepdim=True) + m.eps).sqrt()),
}


class NormNet(nn.Module):
    """linear → tanh → norm (features last, or first for group and batch norms) → linear: (N, T, 5)."""

    def __init__(self, norm, d=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        make, self.channels_first, _ = NORMS[norm]
        self.inp, self.norm, self.head = nn.Linear(3, d), make(d), nn.Linear(d, 5)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.copy_(1 + 0.5 * torch.randn_like(p))
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2) if self.channels_first else self.norm(h)
        return self.head(h)


def norm_data(n=6, t=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 3, generator=g, dtype=DTYPE), torch.randint(0, 5, (n, t), generator=g)


MODULE_NORMS = [name for name in NORMS if not name.startswith("hand")]


# d = 1: a norm module of one feature is one plain layer, no group axis (timm's CSATv2 has a LayerNorm(1))
@pytest.mark.parametrize("norm, d", [(norm, 4) for norm in NORMS] + [(norm, 1) for norm in MODULE_NORMS])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_norm_statistics_equal_the_per_feature_references(norm, capture, d):
    model = NormNet(norm, d=d)
    x, y = norm_data()
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    block = c.layers["norm"]
    assert block.kind == "norm" and set(block.params) == {n for n, _ in model.named_parameters() if "norm" in n}
    inputs, g, M = record(model, "norm", x, y)  # (references first: the step changes the parameters)
    grads = per_example_grads(model, x, y) if norm != "batch" else None
    statistic_step(c, x, y)
    stats = c.statistics("norm")
    _, channels_first, by_hand = NORMS[norm]
    x_hat = by_hand(inputs, model.norm)
    if channels_first:
        x_hat, g = x_hat.transpose(1, 2), g.transpose(1, 2)
    bias = model.norm.bias is not None if hasattr(model.norm, "bias") else False
    a = torch.stack([x_hat, torch.ones_like(x_hat)], -1) if bias else x_hat.unsqueeze(-1)  # (N, R, d, d_a)
    rows = a.flatten(0, 1)
    feature_axis = (lambda t: t) if d > 1 else (lambda t: t[0])  # one feature: its plain layer's shapes
    assert_close(stats["A"], feature_axis(torch.einsum("pfi,pfj->fij", rows, rows) / len(rows)))
    assert_close(stats["S"], feature_axis(M * g.flatten(0, 1).square().sum(0)[:, None, None]))
    per_example = torch.einsum("nrf,nrfi->nfi", g, a)  # (Σ_r g x̂, Σ_r g) per example and feature
    if norm == "batch":
        expected = len(x) * per_example.square().sum(0)
    else:
        per = [grads["norm.weight"]] + ([grads["norm.bias"]] if bias else [])
        expected = torch.stack(per, -1).square().mean(0)
        assert_close(per_example * len(x), torch.stack(per, -1))  # ∇ℓ̃_n = N ∇L_n
    assert_close(stats["diag"], expected)


def test_norm_reduce_sums_the_gradient_and_averages_x_hat_over_positions():
    model = NormNet("layer")
    x, y = norm_data()
    c = compile_for_statistics(model, optimizer="kfac", kfac_approx="reduce")
    inputs, g, M = record(model, "norm", x, y)
    statistic_step(c, x, y)
    x_hat = NORMS["layer"][2](inputs, model.norm)
    a = torch.stack([x_hat, torch.ones_like(x_hat)], -1).mean(1)  # (N, d, 2)
    assert_close(c.statistics("norm")["A"], torch.einsum("nfi,nfj->fij", a, a) / len(x))
    assert_close(c.statistics("norm")["S"], M * g.sum(1).square().sum(0)[:, None, None])


def test_batch_norm_in_eval_mode_at_capture_falls_back_with_the_reason():
    model = NormNet("batch").eval()
    c = gnfx.compile(model, capture="export", example_inputs=(norm_data()[0],))
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {"norm.weight", "norm.bias"}
    assert "running statistics" in reasons["norm.weight"]


def test_a_norm_over_two_dimensions_falls_back_with_the_reason():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (2, 2)), nn.LayerNorm((2, 2)), nn.Flatten(), nn.Linear(4, 2))
    c = gnfx.compile(model)
    reasons = {f.param: f.reason for f in c.layers.fallbacks}
    assert set(reasons) == {"2.weight", "2.bias"} and "over 2 dimensions" in reasons["2.weight"]


# ----------------------------------------------------------------------------- layer scales


SCALES = {  # name -> the branch scaled by γ (d,): h (N, T, d) -> (N, T, d)
    "x_gamma": lambda h, g: h * g,
    "gamma_x": lambda h, g: g * h,
    "mul": lambda h, g: h.mul(g),
    "channels_first": lambda h, g: (h.transpose(1, 2) * g.view(1, 4, 1)).transpose(1, 2),
    "channels_first_4d": lambda h, g: (h.transpose(1, 2).unsqueeze(-1) * g.reshape(1, -1, 1, 1))
    .squeeze(-1).transpose(1, 2),
    "view_3d_on_4d": lambda h, g: (h.transpose(1, 2).unsqueeze(1) * g.view(1, -1, 1)).squeeze(1).transpose(1, 2),
    "broadcast": lambda h, g: h * g,  # h (N, T, 1): one input for every feature (ScaleNet.branch)
    "offset": lambda h, g: h * (g + 1.0),  # x-transformers' norms: F.layer_norm(x) * (γ + float(unit_offset))
    "offset_first": lambda h, g: (1.0 + g).type_as(h) * h,
}


class ScaleNet(nn.Module):
    """linear → tanh → a layer scale γ (ConvNeXt's, CaiT's) of the branch, added back → linear."""

    def __init__(self, form, d=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.form, self.inp, self.head = form, nn.Linear(3, d), nn.Linear(d, 5)
        self.gamma = nn.Parameter(1 + 0.5 * torch.randn(d))
        self.to(DTYPE)

    def branch(self, x):
        h = torch.tanh(self.inp(x))
        return h.mean(-1, keepdim=True) if self.form == "broadcast" else h

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x)) + SCALES[self.form](self.branch(x), self.gamma))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", list(SCALES))
def test_layer_scale_statistics_equal_the_per_feature_references(form, capture):
    """A_f = 1/(N R) Σ x_f², S_f = M Σ g_f² (g = ∂L/∂z of the product), diag from vmap: the norm
    kind's per-feature layers with x̂ = x (the input broadcast to every feature where it has one)."""
    model = ScaleNet(form)
    x, y = norm_data()
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers["gamma"].kind == "scale" and not c.layers.fallbacks
    seen = {}
    reference = copy.deepcopy(model)

    def scaled(h, g):  # the product's input and output gradient, in (N, T, d) rows
        h = h.detach().requires_grad_()
        seen["x"] = h.expand(*h.shape[:-1], g.shape[0])
        z = SCALES[form](h, g)
        z.register_hook(lambda grad: seen.__setitem__("g", grad.detach()))
        return z

    reference.forward = lambda x: reference.head(torch.tanh(reference.inp(x)) + scaled(reference.branch(x), reference.gamma))
    out = reference(x)
    cross_entropy(out, y).backward()
    grads = per_example_grads(model, x, y)
    statistic_step(c, x, y)
    stats = c.statistics("gamma")
    rows, g = seen["x"].detach().flatten(0, 1), seen["g"]
    assert_close(stats["A"], rows.square().mean(0)[:, None, None])
    assert_close(stats["S"], loss_terms(out) * g.flatten(0, 1).square().sum(0)[:, None, None])
    assert_close(stats["diag"], grads["gamma"].square().mean(0)[:, None])
    assert_close(torch.einsum("nrf,nrf->nf", g, seen["x"].detach()) * len(x), grads["gamma"])


class ScaledConstant(nn.Module):
    """γ times a buffer (no model input): no layer; γ ⊙ x̂ of a hand-written norm: the norm kind's."""

    def __init__(self, d=4):
        super().__init__()
        self.inp, self.gamma, self.rms = nn.Linear(3, d), nn.Parameter(torch.ones(d)), HandRMSNorm(d)
        self.register_buffer("basis", torch.randn(d))

    def forward(self, x):
        return self.rms(self.inp(x)) + self.gamma * self.basis


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_hand_written_norm_of_one_feature_trains_as_the_module(capture):
    """Its shift is a one-entry parameter added to a tensor: no position table (whose search read a
    second dimension of the parameter's shape and raised IndexError at capture)."""
    model = NormNet("hand_layer", d=1)
    x, y = norm_data()
    c = gnfx.compile(model, "kfac", lr=1e-2, capture=capture)
    twin = copy.deepcopy(model)
    loss = F.cross_entropy(c(x).flatten(0, 1), y.flatten())
    loss.backward()
    twin_loss = F.cross_entropy(twin(x).flatten(0, 1), y.flatten())
    twin_loss.backward()
    assert_close(loss, twin_loss)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad)
    c.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_scale_of_a_constant_is_no_layer_and_a_hand_written_norm_stays_a_norm(capture):
    c = gnfx.compile(ScaledConstant(), capture=capture, example_inputs=(torch.randn(2, 3),))
    assert {f.param for f in c.layers.fallbacks} == {"gamma"}
    assert c.layers["rms"].kind == "norm"


# ----------------------------------------------------------------------------- grouped convolutions


class GroupedNet(nn.Module):
    def __init__(self, c_in=4, c_out=6, groups=2, bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=2, groups=groups, bias=bias)
        self.head = nn.Linear(c_out, 4)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(2).mean(2))


@pytest.mark.parametrize("c_in, c_out, groups, bias, capture", [
    (4, 6, 2, True, "fx"), (4, 6, 2, True, "export"), (4, 4, 4, False, "fx"), (3, 6, 3, True, "fx")],
    ids=["grouped-fx", "grouped-export", "depthwise-fx", "depthwise-multiplier-fx"])
def test_grouped_conv_statistics_are_those_of_each_group_alone(c_in, c_out, groups, bias, capture):
    model = GroupedNet(c_in, c_out, groups, bias)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, c_in, 6, 6, generator=gen, dtype=DTYPE), torch.randint(0, 4, (5,), generator=gen)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    inputs, g, M = record(model, "conv", x, y)
    grads = per_example_grads(model, x, y)
    statistic_step(c, x, y)
    stats = c.statistics("conv")
    conv, s, width = model.conv, c_out // groups, c_in // groups
    for j in range(groups):
        patches = F.unfold(inputs[:, j * width:(j + 1) * width], 3, padding=1, stride=2).transpose(1, 2)
        w = conv.weight[j * s:(j + 1) * s].flatten(1)
        z = patches @ w.T + (conv.bias[j * s:(j + 1) * s] if bias else 0)
        g_j = g[:, j * s:(j + 1) * s].flatten(2).transpose(1, 2)
        assert_close(z, conv(inputs)[:, j * s:(j + 1) * s].flatten(2).transpose(1, 2))  # the patches are right
        a = torch.cat([patches, torch.ones_like(patches[..., :1])], -1) if bias else patches
        rows = a.flatten(0, 1)
        assert_close(stats["A"][j], rows.T @ rows / len(rows))
        assert_close(stats["S"][j], M * g_j.flatten(0, 1).T @ g_j.flatten(0, 1))
    per = grads["conv.weight"].flatten(2)
    per = torch.cat([per, grads["conv.bias"][..., None]], -1) if bias else per
    assert_close(stats["diag"], per.square().mean(0))


# ----------------------------------------------------------------------------- position embeddings


class PositionNet(nn.Module):
    """token embedding + a (1, T_max, d) or (T_max, d) position table, sliced from `start`."""

    def __init__(self, leading_one=True, start=0, t_max=7, d=4, seed=0, in_place=False):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(9, d)
        self.pos = nn.Parameter(torch.randn((1, t_max, d) if leading_one else (t_max, d)))
        self.head = nn.Linear(d, 9)
        self.start, self.leading_one, self.in_place = start, leading_one, in_place
        self.to(DTYPE)

    def forward(self, ids):
        t = ids.shape[1]
        table = self.pos[:, self.start:self.start + t] if self.leading_one else self.pos[self.start:self.start + t]
        h = self.emb(ids)
        if self.in_place:  # vit-pytorch's `x += self.pos_embedding[:, :n]`
            h += table
            return self.head(torch.tanh(h))
        return self.head(torch.tanh(h + table))


@pytest.mark.parametrize("leading_one, start, t, capture, in_place", [
    (True, 0, 4, "fx", False), (True, 0, 4, "export", False), (False, 2, 4, "fx", False), (True, 0, 7, "export", False),
    (True, 0, 4, "fx", True), (True, 0, 4, "export", True)],
    ids=["1xTxd-fx", "1xTxd-export", "Txd-offset-fx", "1xTxd-every-row-export", "in-place-fx", "in-place-export"])
def test_position_statistics_are_an_embedding_of_the_positions(leading_one, start, t, capture, in_place):
    """Also the table sliced to every one of its rows, which torch.export writes `aten.alias(P)`
    (vit-pytorch's DeepViT and x-transformers' ViTransformerWrapper: `P[:, :n]`, n patches = T_max), and
    the table added in place, `x += P[:, :n]`, which torch.export writes `aten.add_` (vit-pytorch's CaiT,
    DeepViT, MAE)."""
    model = PositionNet(leading_one, start, in_place=in_place)
    gen = torch.Generator().manual_seed(1)
    n = 5
    ids, y = torch.randint(0, 9, (n, t), generator=gen), torch.randint(0, 9, (n, t), generator=gen)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(ids,))
    assert c.layers["pos"].kind == "position"
    # g = ∂L/∂z of z = emb(ids) + table, written out
    z = model.emb(ids).detach() + (model.pos[0] if leading_one else model.pos).detach()[start:start + t]
    z.requires_grad_(True)
    out = model.head(torch.tanh(z))
    g = torch.autograd.grad(cross_entropy(out, y), z)[0]
    M = loss_terms(out)
    per = per_example_grads(model, ids, y)["pos"].reshape(n, 7, 4)
    statistic_step(c, ids, y)
    stats = c.statistics("pos")
    energy = torch.zeros(7, dtype=DTYPE)
    energy[start:start + t] = g.square().sum((0, 2))  # e_t = Σ_n |g_{n,t}|²
    assert_close(stats["A"], energy / energy.sum())
    assert_close(stats["S"], M * g.flatten(0, 1).T @ g.flatten(0, 1))
    # each row's Kronecker block A_t S has the trace of its exact block M Σ_n g_{n,t} g_{n,t}ᵀ
    assert_close(stats["A"] * stats["S"].trace(), M * energy)
    assert_close(stats["diag"], per.square().mean(0).T)


class OneEntryParameters(nn.Module):
    """x-transformers' ScaleNorm, `F.normalize(x) * √d * (g + 0.0)` with a gain g of one entry, and a
    learnable offset b of one entry added to an activation."""

    def __init__(self, d=4):
        super().__init__()
        self.inp, self.head = nn.Linear(3, d), nn.Linear(d, 5)
        self.g, self.b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = F.normalize(self.inp(x), dim=-1) * 2.0 * (self.g + 0.0)
        return self.head(h + self.b)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_parameters_of_one_entry_added_to_a_number_or_an_activation_are_no_position_tables(capture):
    """The position detector read the second dimension of every parameter summed with something, and a
    parameter of one entry has none: IndexError from gnfx.compile. Both fall back, a scalar gain and a
    scalar offset being no per-feature layers."""
    c = gnfx.compile(OneEntryParameters(), capture=capture, example_inputs=(torch.randn(6, 3),))
    assert {f.param for f in c.layers.fallbacks} == {"g", "b"}


class HeadBias(nn.Module):
    """A (T_max, d_head) table added to activations split into heads, (N, H, T, d_head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.table, self.head = nn.Embedding(9, 8), nn.Parameter(torch.randn(5, 4)), nn.Linear(8, 9)
        self.to(DTYPE)

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids).view(n, t, 2, 4).transpose(1, 2)
        h = torch.tanh(h + self.table[:t])
        return self.head(h.transpose(1, 2).reshape(n, t, 8))


def test_a_position_table_broadcast_over_heads_is_read_by_every_head():
    model = HeadBias()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 9, (3, 4), generator=gen), torch.randint(0, 9, (3, 4), generator=gen)
    c = compile_for_statistics(model, optimizer="kfac")
    per = per_example_grads(model, ids, y)["table"]
    # e_t over the rows that read row t, as S counts them: every (example, head), e_t = Σ_{n,h} |g_{n,h,t}|²,
    # g = ∂L/∂z of z = h + table[:T] (N, H, T, d_head), written out (before the step moves the parameters)
    n, t = ids.shape
    z = (model.emb(ids).view(n, t, 2, 4).transpose(1, 2).detach() + model.table[:t].detach()).requires_grad_(True)
    g = torch.autograd.grad(cross_entropy(model.head(torch.tanh(z).transpose(1, 2).reshape(n, t, 8)), y), z)[0]
    energy = torch.zeros(5, dtype=DTYPE)
    energy[:4] = g.square().sum((0, 1, 3))
    statistic_step(c, ids, y)
    stats = c.statistics("table")
    assert_close(stats["A"], energy / energy.sum())
    assert_close(stats["diag"], per.square().mean(0).T)


class ChannelsFirstTable(nn.Module):
    """PiT's and Visformer's table: a (1, C, H, W) parameter added to a convolution's map (N, C, H, W)
    (`norm`: to its batch norm's, as Visformer's patch embedding)."""

    def __init__(self, norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if norm else nn.Identity()
        self.pos = nn.Parameter(torch.randn(1, 3, 4, 5))
        self.head = nn.Linear(3 * 4 * 5, 4)
        self.to(DTYPE)

    def features(self, x):
        return self.bn(self.conv(x))

    def forward(self, x):
        return self.head(torch.tanh(self.features(x) + self.pos).flatten(1))


class BlockTables(nn.Module):
    """NesT's tables: one (T, d) table per block of positions, a (1, B, T, d) parameter added to the
    (N, B, T, d) activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(3, 4), nn.Linear(2 * 5 * 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 2, 5, 4))
        self.to(DTYPE)

    def features(self, x):  # (N, 10, 3) -> (N, 2, 5, 4)
        return self.fc(x).reshape(x.shape[0], 2, 5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.features(x) + self.pos).flatten(1))


def table_references(model, x, y, features_last):
    """(rows δ (N, R, d) of the table's output gradient, e (R,), M) by autograd through z = features(x) +
    P written out: δ_{n,r} = ∂L/∂z at position r of example n, `features_last` moving z's features
    last; e_r = Σ_n |δ_{n,r}|² (before the step moves the parameters)."""
    z = (model.features(x).detach() + model.pos.detach()).requires_grad_(True)
    out = model.head(torch.tanh(z).flatten(1))
    g = features_last(torch.autograd.grad(cross_entropy(out, y), z)[0])
    rows = g.reshape(len(x), -1, g.shape[-1])
    return rows, rows.square().sum((0, 2)), loss_terms(out)


TABLES = {"channels-first": (lambda: ChannelsFirstTable(), (6, 2, 4, 5), lambda g: g.permute(0, 2, 3, 1)),
          "channels-first-after-a-batch-norm": (lambda: ChannelsFirstTable(norm=True), (6, 2, 4, 5),
                                                lambda g: g.permute(0, 2, 3, 1)),
          "blocks-of-positions": (BlockTables, (6, 10, 3), lambda g: g)}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("table", list(TABLES))
def test_tables_of_several_position_dimensions_are_embeddings_of_their_positions(table, capture):
    """PiT's and Visformer's (1, C, H, W) tables on channels-first maps and NesT's (1, B, T, d) fell back to
    diag ('used by call_function add, not a layer gnfx models'). A channels-first table is H·W positions of
    C features, NesT's B·T positions of d (passes/position.py): A = e / Σ e with e_r = Σ_n |δ_{n,r}|²,
    S = M E[δ δᵀ] over the features, from autograd through the sum written out, and (no batch norm: its
    examples are not independent) the diag equals the per-example gradients' (vmap) as the matrix
    d x positions; float64."""
    build, shape, features_last = TABLES[table]
    model = build()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=gen, dtype=DTYPE), torch.randint(0, 4, (shape[0],), generator=gen)
    c = compile_for_statistics(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert c.layers["pos"].kind == "position" and not c.layers.fallbacks
    rows, energy, M = table_references(model, x, y, features_last)
    per = None if "norm" in table else per_example_grads(model, x, y)["pos"]
    statistic_step(c, x, y)
    stats = c.statistics("pos")
    assert_close(stats["A"], energy / energy.sum())
    assert_close(stats["S"], M * rows.flatten(0, 1).T @ rows.flatten(0, 1))
    if per is not None:  # example n's gradient as the matrix d x positions: its features moved last, transposed
        per_rows = features_last(per.squeeze(1)).reshape(len(x), -1, rows.shape[-1])
        assert_close(stats["diag"], per_rows.square().mean(0).T)


@pytest.mark.parametrize("table", ["channels-first", "blocks-of-positions"])
def test_kfac_step_on_a_table_of_several_position_dimensions_is_the_dense_kronecker_solve(table):
    """ΔP = -η U with U = ((diag A + λ_A I) ⊗ (S + λ_S I))⁻¹ vec(G), G the gradient as the matrix
    d x positions (features C by the H·W entries of each channel's map; d by the B·T rows), vec
    column-major, λ split by π = sqrt((tr A / dim A) / (tr S / dim S)); A and S from autograd."""
    build, shape, features_last = TABLES[table]
    model = build()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=gen, dtype=DTYPE), torch.randint(0, 4, (shape[0],), generator=gen)
    rows, energy, M = table_references(model, x, y, features_last)
    A, S = energy / energy.sum(), M * rows.flatten(0, 1).T @ rows.flatten(0, 1)
    P0 = model.pos.detach().clone()
    damping = 1e-2
    c = gnfx.compile(model, optimizer="kfac", lr=0.5, momentum=0.0, weight_decay=0.0, kl_clip=0.0,
                     damping=damping, stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(x), y).backward()
    grad = features_last(model.pos.grad.detach().clone())  # (1, *positions, d)
    c.step()
    pi = (A.mean() / S.diagonal().mean()).sqrt()
    lam_a, lam_s = pi * damping ** 0.5, damping ** 0.5 / pi
    d = S.shape[0]
    K = torch.kron(torch.diag(A + lam_a), S + lam_s * torch.eye(d, dtype=DTYPE))
    G = grad.reshape(-1, d).T  # (d, positions)
    U = torch.linalg.solve(K, G.T.reshape(-1)).reshape(-1, d)  # un-vec: column-major (d, R) = (R, d) rows
    step = U.reshape(grad.shape)  # features last, as grad
    step = step.permute(0, 3, 1, 2) if table == "channels-first" else step
    assert_close(model.pos.detach(), P0 - 0.5 * step)


# ----------------------------------------------------------------------------- attention across RoPE


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPEAttention(nn.Module):
    """q, k rotated by cos/sin of their positions (as Llama), then scaled dot-product attention."""

    def __init__(self, d=8, heads=2, complex_form=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.heads, self.complex_form = heads, complex_form
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d // heads, 2) / (d // heads)))

    def forward(self, x):
        n, t, d = x.shape
        split = lambda z: z.view(n, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        freqs = torch.arange(t, dtype=x.dtype)[:, None] * self.inv_freq.to(x.dtype)[None]
        if self.complex_form:
            rot = torch.polar(torch.ones_like(freqs), freqs)
            q = torch.view_as_real(torch.view_as_complex(q.reshape(n, self.heads, t, -1, 2)) * rot).flatten(3)
            k = torch.view_as_real(torch.view_as_complex(k.reshape(n, self.heads, t, -1, 2)) * rot).flatten(3)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(h.transpose(1, 2).reshape(n, t, d))


@pytest.mark.parametrize("complex_form, capture", [(False, "fx"), (False, "export"), (True, "fx")],
                         ids=["rotate_half-fx", "rotate_half-export", "complex-fx"])
def test_projections_across_rope_get_their_attention_roles(complex_form, capture):
    torch.manual_seed(0)
    model = RoPEAttention(complex_form=complex_form).float()
    x = torch.randn(2, 4, 8)
    c = gnfx.compile(model, capture=capture, example_inputs=(x,))
    assert {b.name: b.role for b in c.layers} == {"q": "attention.q", "k": "attention.k", "v": "attention.v",
                                                  "o": "attention.out"}


# ----------------------------------------------------------------------------- training


class Everything(nn.Module):
    """Every new kind in one tiny model: a depthwise-separable conv with batch and group norms,
    a position table, a LayerNorm, a layer scale, a hand-written RMSNorm, and a head."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.depthwise = nn.Conv1d(3, 3, 3, padding=1, groups=3, bias=False)  # (a bias before BN has no gradient)
        self.pointwise = nn.Conv1d(3, d, 1)
        self.bn, self.gn = nn.BatchNorm1d(3), nn.GroupNorm(2, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 8, d))
        self.ln, self.rms = nn.LayerNorm(d), HandRMSNorm(d)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 4)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):  # (N, 3, T) -> (N, 4)
        h = self.gn(self.pointwise(torch.relu(self.bn(self.depthwise(x)))))
        h = h.transpose(1, 2) + self.pos[:, :x.shape[2]]
        h = h + torch.tanh(self.fc(self.ln(h))) * self.gamma
        return self.head(self.rms(h).mean(1))


PRECONDITIONERS = [("kfac", {"inv_every": 2}), ("ekfac", {"inv_every": 2}), ("shampoo", {"start_preconditioning_step": 2}), ("soap", {"lr": 5e-2}),
                   ("rank1", {}), ("diag", {"source": "fisher", "lr": 0.1})]


@pytest.mark.parametrize("name, hp", PRECONDITIONERS, ids=[p for p, _ in PRECONDITIONERS])
def test_every_preconditioner_trains_the_new_kinds(name, hp):
    model = Everything()
    c = gnfx.compile(model, optimizer=name, stat_every=1, **({"lr": 1e-2} | hp))
    assert not c.layers.fallbacks
    assert {b.kind for b in c.layers} == {"conv", "norm", "position", "linear", "scale"}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_kfac_direction_of_a_grouped_block_is_per_group(optimizer):
    """U_j = (S_j + λ_S I)⁻¹ G_j (A_j + λ_A I)⁻¹ for each row group j of a depthwise conv (and of a
    norm: groups of one feature), from the averaged A_j, S_j with K-FAC's π split of λ; also EKFAC's
    with damping_kind="factored" and its eigenvalues set to the Kronecker ones of each group,
    diag(Q_S,jᵀ S_j Q_S,j) diag(Q_A,jᵀ A_j Q_A,j)ᵀ (the correction off)."""
    model = Everything().double()
    hp = {"damping_kind": "factored"} if optimizer == "ekfac" else {}
    c = gnfx.compile(model, optimizer=optimizer, stat_every=1, inv_every=1, momentum=0.0, kl_clip=0.0, lr=1.0, **hp)
    pre = c.optimizer.curvature[0]
    x, y = torch.randn(8, 3, 8, dtype=DTYPE), torch.randint(0, 4, (8,))
    F.cross_entropy(c(x), y).backward()
    c.step()  # statistics and inverses from this batch
    c.zero_grad()
    F.cross_entropy(c(x), y).backward()
    for name in ("depthwise", "ln"):
        block = c.layers[name]
        group, i = next((g, i) for g in pre.groups for i, p in enumerate(g.pieces) if p.target.name == name)
        G = model.get_parameter(block.weight).grad.reshape(block.d_out, -1)
        if block.bias is not None:
            G = torch.cat([G, model.get_parameter(block.bias).grad[:, None]], 1)
        state = {k: v[i:i + 1] for k, v in pre.group_state(group).items()}
        A, S = c.statistics(name)["A"], c.statistics(name)["S"]
        if optimizer == "ekfac":
            Q_S, Q_A = state["Q_S"][0], state["Q_A"][0]
            state["scale"] = torch.cat([torch.outer(torch.diagonal(Q_S[j].T @ S[j] @ Q_S[j]),
                                                    torch.diagonal(Q_A[j].T @ A[j] @ Q_A[j])) for j in range(len(A))])[None]
        U = pre.direction(G[None], state, collect=False)[0]
        s = block.d_out // len(A)
        root = pre.hp["damping"] ** 0.5
        for j in range(len(A)):
            pi = ((A[j].diagonal().mean()) / S[j].diagonal().mean()).sqrt()
            expected = torch.linalg.solve(S[j] + root / pi * torch.eye(s, dtype=DTYPE), G[j * s:(j + 1) * s]) \
                @ torch.linalg.inv(A[j] + pi * root * torch.eye(len(A[j]), dtype=DTYPE))
            torch.testing.assert_close(U[j * s:(j + 1) * s], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_diagnose_measures_the_grouped_blocks(optimizer):
    """gnfx.diagnose's curvature products of K-FAC and EKFAC on row-grouped blocks (norms, the
    depthwise conv) and a diagonal-A block (the position table): finite, and within the range a
    fitted curvature reaches."""
    model = Everything().double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, generator=gen, dtype=DTYPE), torch.randint(0, 4, (16,), generator=gen)
    c = gnfx.compile(model, optimizer=optimizer, stat_every=1, inv_every=1)
    for _ in range(2):
        F.cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
    records = {r.name: r for r in gnfx.diagnose(c, (x, y), loss="cross_entropy", probes=1, cg_max_iter=10,
                                                   verbose=False)}
    for name in ("depthwise", "bn", "gn", "ln", "rms", "pos"):
        r = records[name]
        assert math.isfinite(r.curvature_error) and -1 <= r.cosine <= 1, r


@pytest.mark.parametrize("model", ["norm", "grouped"])
def test_ekfac_measures_each_group_in_its_own_eigenbasis(model):
    """eigen_diag = 1/N Σ_n (Q_S,jᵀ ∇ℓ̃_n,j Q_A,j)² for each row group j (∇ℓ̃_n,j: example n's
    gradient rows of group j, from vmap), in the bases the previous refresh set."""
    model = NormNet("layer") if model == "norm" else GroupedNet(4, 6, 2, True)
    name = "norm" if isinstance(model, NormNet) else "conv"
    batches = [norm_data(seed=s) if name == "norm" else
               (torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(s), dtype=DTYPE),
                torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
    c = gnfx.compile(model, optimizer="ekfac", stat_every=1, stat_decay=0.0, inv_every=1, lr=1e-2)
    statistic_step(c, *batches[0])  # bases from this batch's A and S
    pre = c.optimizer.curvature[0]
    group, i = next((g, i) for g in pre.groups for i, p in enumerate(g.pieces) if p.target.name == name)
    state = pre.group_state(group)
    Q_S, Q_A = state["Q_S"][i], state["Q_A"][i]
    assert not torch.allclose(Q_A, torch.eye(Q_A.shape[-1], dtype=DTYPE).expand_as(Q_A))
    x, y = batches[1]
    grads = per_example_grads(model, x, y)
    per = grads[f"{name}.weight"].reshape(len(x), grads[f"{name}.weight"].shape[1], -1)
    per = torch.cat([per, grads[f"{name}.bias"][..., None]], -1)  # (N, d_out, d_a)
    rotated = Q_S.transpose(1, 2) @ per.unflatten(1, (len(Q_S), -1)) @ Q_A  # per group j
    cross_entropy(c(x), y).backward()
    measured = c.optimizer.statistics[name].batch()["eigen_diag"]
    assert_close(measured, rotated.flatten(1, 2).square().mean(0))
