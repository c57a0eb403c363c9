"""Properties over generated architectures and inputs (hypothesis; few examples each, derandomized).

For MLPs (depth, widths, bias per layer, activation incl. in-place ReLU, (N, d) or (N, T, d)
inputs), convolutions (kernel, stride, padding incl. 'same', dilation, bias), norms (layer, RMS, batch,
group, instance; 1-6 features, with or without a shift β) and attention (heads,
head size, F.scaled_dot_product_attention or the hand-written softmax(q kᵀ/√d) v, causal or not,
nn.MultiheadAttention):

* the compiled model's outputs and parameter gradients on a statistic step (the instrumented
  graph) equal the original model's;
* its statistics A and S (kfac_approx "expand" and "reduce") equal the hook references of
  tests/references.py (convolutions: unfolded patches; norms: per feature, x̂ from the norm itself
  with γ = 1, β = 0), and diag the per-example gradients';
* one step of every preconditioner on a linear least-squares problem (convex) is finite and
  decreases the loss, for a small learning rate.

Everything float64; statistics compared at 1e-10, outputs and gradients at 1e-12.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gnfx
from models import causal_mask
from references import (TOL, augment, cross_entropy, hook_statistics, kfac_factors, layer_diag, loss_terms,
                        per_example_fisher_diag)

DTYPE = torch.float64
PROPERTY = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "relu_": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU,
               "sigmoid": nn.Sigmoid, "none": nn.Identity}


def assert_close(actual, expected, tol=TOL):
    torch.testing.assert_close(actual, expected, **tol)


EXACT = dict(rtol=1e-12, atol=1e-12)


def compile_for_statistics(model, approx, diag=True):
    return gnfx.compile(model, optimizer="kfac", stat_every=1, stat_decay=0.0, kfac_approx=approx,
                        statistics=("A", "S", "diag") if diag else ("A", "S"))


def statistic_step(c, model, x, y):
    """One statistic step of c (a copy of `model`) on (x, y); on the way, the outputs and parameter
    gradients of the instrumented graph must equal the original model's (left unchanged)."""
    assert c.optimizer.collecting
    out, ref = c(x), model(x)
    assert_close(out, ref, EXACT)
    cross_entropy(out, y).backward()
    cross_entropy(ref, y).backward()
    for (name, p), q in zip(c.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert_close(p.grad, q.grad, EXACT)
    model.zero_grad()
    c.step()


# ----------------------------------------------------------------------------- MLPs


@st.composite
def mlps(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1))
    widths[-1] = max(widths[-1], 2)  # classes
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    tokens = draw(st.sampled_from([None, 1, 3]))
    n = draw(st.integers(1, 5))
    return widths, biases, activation, tokens, n, draw(st.sampled_from(["expand", "reduce"])), draw(st.integers(0, 999))


def build_mlp(widths, biases, activation, seed):
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out, bias) in enumerate(zip(widths[:-1], widths[1:], biases)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(biases) - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(DTYPE)


def data(shape, classes, labels, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, classes, labels, generator=g)


@PROPERTY
@given(mlps())
def test_generated_mlps_compute_the_original_function_and_the_reference_statistics(arch):
    widths, biases, activation, tokens, n, approx, seed = arch
    model = build_mlp(widths, biases, activation, seed)
    shape = (n, widths[0]) if tokens is None else (n, tokens, widths[0])
    x, y = data(shape, widths[-1], shape[:-1], seed)
    c = compile_for_statistics(copy.deepcopy(model), approx)
    names = [b.name for b in c.layers]
    assert names == [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    ref = hook_statistics(model, names, x, y, approx)
    diags = per_example_fisher_diag(model, x, y, vectorized=activation != "relu_")
    statistic_step(c, model, x, y)
    for name in names:
        got = c.statistics(name)
        assert_close(got["A"], ref[name]["A"])
        assert_close(got["S"], ref[name]["S"])
        assert_close(got["diag"], layer_diag(diags, name))


# ----------------------------------------------------------------------------- convolutions


class ConvNet(nn.Module):
    def __init__(self, c_in, c_out, classes, activation, seed, **conv):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(c_in, c_out, **conv)
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(c_out, classes)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


@st.composite
def convs(draw):
    kernel = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, "same"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    bias = draw(st.booleans())
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    reach = [dilation * (k - 1) + 1 for k in kernel]
    size = tuple(draw(st.integers(max(r, 2), r + 3)) for r in reach)
    conv = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    return c_in, c_out, conv, size, draw(st.integers(1, 3)), draw(st.sampled_from(sorted(ACTIVATIONS))), \
        draw(st.sampled_from(["expand", "reduce"])), draw(st.integers(0, 999))


def patches(x, conv: nn.Conv2d):
    """(N, L, C_in·k1·k2) unfolded patches, padded first as the convolution pads (also 'same')."""
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in conv.padding]
    x = F.pad(x, (*pads[1], *pads[0]))
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)


def conv_reference(model, x, y, approx):
    """A, S of model.conv from hooks: the patches it multiplies and ∂L/∂(its output), per position."""
    model = copy.deepcopy(model)
    record = {}

    def hook(module, inputs, z):
        record["a"] = patches(inputs[0].detach(), module)
        z.register_hook(lambda g: record.__setitem__("g", g.detach().flatten(2).transpose(1, 2)))

    model.conv.register_forward_hook(hook)
    out = model(x)
    cross_entropy(out, y).backward()
    assert record["a"].shape[1] == record["g"].shape[1]
    return kfac_factors([(record["a"], record["g"])], model.conv.bias is not None, approx, out.shape[0])


@PROPERTY
@given(convs())
def test_generated_convolutions_compute_the_original_function_and_the_patch_statistics(arch):
    c_in, c_out, conv, size, n, activation, approx, seed = arch
    model = ConvNet(c_in, c_out, 3, activation, seed, **conv)
    x, y = data((n, c_in, *size), 3, (n,), seed)
    c = compile_for_statistics(copy.deepcopy(model), approx, diag=False)
    assert [b.name for b in c.layers] == ["conv", "head"] and c.layers["conv"].kind == "conv"
    ref = conv_reference(model, x, y, approx)
    statistic_step(c, model, x, y)
    got = c.statistics("conv")
    assert_close(got["A"], ref["A"])
    assert_close(got["S"], ref["S"])


# ----------------------------------------------------------------------------- norms


NORMS = {  # kind -> (the module for d features and its options, its features on dimension 1)
    "layer": (lambda d, g, bias: nn.LayerNorm(d, bias=bias), False),
    "rms": (lambda d, g, bias: nn.RMSNorm(d, eps=1e-5), False),
    "batch": (lambda d, g, bias: nn.BatchNorm1d(d), True),
    "group": (lambda d, g, bias: nn.GroupNorm(g, d), True),
    "instance": (lambda d, g, bias: nn.InstanceNorm1d(d, affine=True), True),
}


class NormNet(nn.Module):
    """linear → norm of d features (channels first for batch, group and instance norms) → activation → linear."""

    def __init__(self, d_in, d, classes, kind, groups, bias, activation, seed):
        super().__init__()
        torch.manual_seed(seed)
        make, self.channels_first = NORMS[kind]
        self.inp, self.norm, self.act, self.head = nn.Linear(d_in, d), make(d, groups, bias), \
            ACTIVATIONS[activation](), nn.Linear(d, classes)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.copy_(1 + 0.5 * torch.randn_like(p))
        self.to(DTYPE)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h.transpose(1, -1)).transpose(1, -1) if self.channels_first else self.norm(h)
        return self.head(self.act(h))


@st.composite
def norm_nets(draw):
    kind = draw(st.sampled_from(sorted(NORMS)))
    d = draw(st.integers(1, 6))
    groups = draw(st.sampled_from([g for g in range(1, d + 1) if d % g == 0]))
    # torch's norms over channels need 2 values or more per channel (batch, instance) or group
    tokens = draw(st.sampled_from([2, 3] if kind == "instance" or kind == "group" and groups == d else [None, 1, 3]))
    n = draw(st.integers(2 if kind == "batch" and tokens in (None, 1) else 1, 4))
    return (kind, d, groups, draw(st.booleans()), draw(st.integers(1, 3)), tokens, n,
            draw(st.sampled_from(sorted(ACTIVATIONS))), draw(st.sampled_from(["expand", "reduce"])),
            draw(st.integers(0, 999)))


def norm_reference(model, x, y, approx):
    """A, S and diag of model.norm's block [γ β] from hooks: x̂ is the norm itself with γ = 1, β = 0 (no gnfx), ā_f =
    (x̂_f, 1) per feature f, g = ∂L/∂z; A_f and S_f as any layer's (`kfac_factors`), diag = N Σ_n (Σ_r g ā)² (the
    per-example gradients of ℓ̃_n = N ∂L/∂(example n), also for the batch norm that couples the examples)."""
    model = copy.deepcopy(model)
    record = {}
    bare = copy.deepcopy(model.norm)  # the same norm with γ = 1, β = 0
    with torch.no_grad():
        for name, p in bare.named_parameters():
            p.fill_(1.0 if name == "weight" else 0.0)

    def hook(module, inputs, z):
        with torch.no_grad():
            x_hat = bare(inputs[0])
        rows = lambda t: (t.transpose(1, -1) if model.channels_first else t).reshape(t.shape[0], -1, t.shape[  # noqa: E731
            1 if model.channels_first else -1])
        record["x_hat"] = rows(x_hat)
        z = z * 1  # a new tensor of the output's values, which an in-place activation after the norm modifies
        z.register_hook(lambda g: record.__setitem__("g", rows(g.detach())))
        return z

    model.norm.register_forward_hook(hook)
    out = model(x)
    cross_entropy(out, y).backward()
    bias = getattr(model.norm, "bias", None) is not None
    x_hat, g = record["x_hat"].unsqueeze(-1), record["g"].unsqueeze(-1)  # (N, R, d, 1) each
    per_feature = [kfac_factors([(x_hat[:, :, f], g[:, :, f])], bias, approx, loss_terms(out))
                   for f in range(x_hat.shape[2])]
    ref = {key: torch.stack([r[key] for r in per_feature]) for key in ("A", "S")}
    per_example = torch.einsum("nrf,nrfi->nfi", g[..., 0], augment(x_hat, bias))  # (Σ_r g x̂, Σ_r g) per example
    ref["diag"] = out.shape[0] * per_example.square().sum(0)
    return ref


@PROPERTY
@given(norm_nets())
def test_generated_norms_compute_the_original_function_and_the_per_feature_statistics(arch):
    kind, d, groups, bias, d_in, tokens, n, activation, approx, seed = arch
    model = NormNet(d_in, d, 3, kind, groups, bias, activation, seed)
    shape = (n, d_in) if tokens is None else (n, tokens, d_in)
    x, y = data(shape, 3, shape[:-1], seed)
    c = compile_for_statistics(copy.deepcopy(model), approx)
    assert c.layers["norm"].kind == "norm"
    ref = norm_reference(model, x, y, approx)
    statistic_step(c, model, x, y)
    got = c.statistics("norm")
    one_feature = (lambda t: t[0]) if d == 1 else (lambda t: t)  # one feature is one plain layer: no group axis
    assert_close(got["A"], one_feature(ref["A"]))
    assert_close(got["S"], one_feature(ref["S"]))
    assert_close(got["diag"], ref["diag"])


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Separate q, k, v, out projections; SDPA or softmax(q kᵀ/√d_h (future masked)) v."""

    def __init__(self, d, heads, form, causal):
        super().__init__()
        self.heads, self.form, self.causal = heads, form, causal
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        n, t, d = x.shape
        split = lambda z: z.view(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.form == "sdpa":
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            if self.causal:
                scores = scores.masked_fill(causal_mask(x), float("-inf"))
            mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(n, t, d))


class MHA(nn.Module):
    def __init__(self, d, heads, causal):
        super().__init__()
        self.causal = causal
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, attn_mask=causal_mask(x) if self.causal else None, need_weights=False)[0]


class Transformerish(nn.Module):
    """tokens (N, T, d) → attention → residual → token-wise head: logits (N, T, C)."""

    def __init__(self, d, heads, form, causal, classes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.attn = MHA(d, heads, causal) if form == "mha" else Attention(d, heads, form, causal)
        self.head = nn.Linear(d, classes)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(x + self.attn(x))


@st.composite
def attentions(draw):
    heads = draw(st.integers(1, 2))
    return (heads, heads * draw(st.integers(1, 3)), draw(st.sampled_from(["sdpa", "handwritten", "mha"])),
            draw(st.booleans()), draw(st.integers(1, 4)), draw(st.integers(1, 3)),
            draw(st.sampled_from(["expand", "reduce"])), draw(st.integers(0, 999)))


@PROPERTY
@given(attentions())
def test_generated_attention_computes_the_original_function_and_the_reference_statistics(arch):
    heads, d, form, causal, t, n, approx, seed = arch
    model = Transformerish(d, heads, form, causal, 3, seed)
    x, y = data((n, t, d), 3, (n, t), seed)
    c = compile_for_statistics(copy.deepcopy(model), approx)
    roles = {b.name: b.role for b in c.layers}
    if form == "mha":
        assert roles == {"attn.mha.in_proj": "attention.qkv", "attn.mha.out_proj": "attention.out", "head": None}
    else:
        assert roles == {"attn.q": "attention.q", "attn.k": "attention.k", "attn.v": "attention.v",
                         "attn.out": "attention.out", "head": None}
    statistic_step(c, model, x, y)
    if form == "mha":
        return  # its projections are not nn.Linear modules that hooks could record (tests/test_attention.py)
    names = list(roles)
    ref = hook_statistics(model, names, x, y, approx)
    diags = per_example_fisher_diag(model, x, y)
    for name in names:
        got = c.statistics(name)
        assert_close(got["A"], ref[name]["A"])
        assert_close(got["S"], ref[name]["S"])
        assert_close(got["diag"], layer_diag(diags, name))


# ----------------------------------------------------------------------------- one step on a convex problem


EVERY_STEP = {  # statistics and refreshes on step 0, so that the first step is preconditioned
    "diag": dict(source="fisher"),
    "rank1": dict(),
    "kfac": dict(inv_every=1),
    "shampoo": dict(start_preconditioning_step=0, precondition_frequency=1),
    "soap": dict(precondition_frequency=1),
    "ekfac": dict(inv_every=1),
}


@st.composite
def least_squares(draw):
    return (draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.booleans()),
            draw(st.sampled_from([0.1, 1.0, 10.0])), draw(st.integers(0, 999)))


@pytest.mark.parametrize("name", sorted(EVERY_STEP))
def test_one_step_of_every_preconditioner_decreases_a_least_squares_loss(name):
    """L(W, b) = mean ‖W x + b - y‖² is convex; each preconditioner's step is a positive definite
    map of the gradient (grafted or clipped by positive factors), so a small enough step descends."""

    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(least_squares())
    def check(problem):
        d_in, d_out, n, bias, scale, seed = problem
        torch.manual_seed(seed)
        model = nn.Linear(d_in, d_out, bias=bias).to(DTYPE)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(n, d_in, generator=g, dtype=DTYPE)
        y = scale * torch.randn(n, d_out, generator=g, dtype=DTYPE)
        c = gnfx.compile(model, optimizer=name, lr=1e-5, stat_every=1, **EVERY_STEP[name])
        loss = F.mse_loss(c(x), y)
        loss.backward()
        c.step()
        assert c.optimizer.skipped_steps == 0
        assert all(torch.isfinite(p).all() for p in model.parameters())
        with torch.no_grad():
            assert F.mse_loss(model(x), y) < loss

    check()
