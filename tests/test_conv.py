"""Convolutions: K-FAC statistics from unfolded patches (Grosse & Martens 2016), against references.

A convolution z[:, :, l] = W a_l + b (W = weight.flatten(1), a_l the patch (C_in·prod(k)) that
output position l reads, in weight.flatten(1) order) is a linear map shared over the L positions:

    expand:  A = 1/(N L) Σ_{n,l} ā ā ᵀ                  S = M Σ_{n,l} g gᵀ
    reduce:  A = 1/N Σ_n ā_n ā_nᵀ, ā_n = mean_l ā_{n,l}  S = M Σ_n (Σ_l g)(Σ_l g)ᵀ
    diag  = 1/N Σ_n (∇ℓ̃_n)²                          ([W.flatten(1) b] layout)

with ā = [a, 1] when there is a bias, g = ∂L/∂z, M = N for an (N, C) output.

The references do not use gnfx: forward hooks record each conv's input and a tensor hook its
output gradient; patches come from F.unfold (2-d) or from indexing the padded input one output
position at a time (1-, 2- and 3-d); every set of reference patches is first checked to
reproduce the convolution's output as `patches @ Wᵀ + b` (which pins down the padding, 'same'
with even kernels included). Per-example gradients come from torch.func.vmap, and for Conv2d
from curvlinops' KFACLinearOperator too. Everything is float64 at 1e-10.
"""
from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
import gnfx.layouts.conv
from references import cross_entropy, per_example_grads
from steps import ALL, statistic_step
from steps import compile_for_statistics as _compile

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

compile_for_statistics = functools.partial(_compile, optimizer="kfac")  # these tests use K-FAC


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


# ----------------------------------------------------------------------------- models and data


class ConvNet(nn.Module):
    """conv (the layer under test) → tanh → mean over positions → linear head: (N, C) logits."""

    def __init__(self, dim, c_in=2, c_out=3, classes=4, seed=0, **conv):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = CONV[dim](c_in, c_out, **conv)
        self.head = nn.Linear(c_out, classes)
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(h.flatten(2).mean(2))


def data(n, c_in, spatial, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c_in, *spatial, generator=g, dtype=DTYPE),
            torch.randint(0, classes, (n,), generator=g))


# ----------------------------------------------------------------------------- references


def torch_same_padding(k: int, d: int) -> tuple[int, int]:
    """padding='same': a total of d (k - 1) zeros, the odd one on the right (as torch pads)."""
    total = d * (k - 1)
    return total // 2, total - total // 2


def padding_pairs(conv: nn.Module) -> list[tuple[int, int]]:
    if conv.padding == "same":
        return [torch_same_padding(k, d) for k, d in zip(conv.kernel_size, conv.dilation)]
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    return [(p, p) for p in conv.padding]


def patches_by_positions(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """(N, L, C_in·prod(k)) patches: for every output position o (row-major), the input entries
    x_pad[:, :, o_i s_i + d_i j_i] for the kernel offsets j, flattened like weight.flatten(1)."""
    pads = padding_pairs(conv)
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    out = [(x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]
    rows = []
    for o in itertools.product(*(range(n) for n in out)):
        index = torch.meshgrid(*(o[i] * s[i] + d[i] * torch.arange(k[i]) for i in range(len(k))), indexing="ij")
        rows.append(x[(slice(None), slice(None)) + index].flatten(1))  # (N, C_in·prod(k))
    return torch.stack(rows, dim=1)


def patches_by_unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(N, L, C_in·k1·k2) patches from F.unfold (which pads symmetrically; pad first otherwise)."""
    pads = padding_pairs(conv)
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2)


def augment(a, bias: bool):
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if bias else a


def record_conv(model: nn.Module, name: str, x, y, patches=patches_by_positions):
    """Run the loss forward and backward on a copy of `model` with hooks on the conv `name`.

    Returns the patches a (N, L, C_in·prod(k)), the output gradients g (N, L, C_out) and M, after
    checking that the patches reproduce the convolution: z[n, :, l] = W a_{n,l} + b."""
    model = copy.deepcopy(model)
    conv = dict(model.named_modules())[name]
    seen = {}

    def hook(module, inputs, z):
        seen["x"], seen["z"] = inputs[0].detach(), z.detach()
        z.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = conv.register_forward_hook(hook)
    out = model(x)
    cross_entropy(out, y).backward()
    handle.remove()
    a = patches(seen["x"], conv)
    z_rows = seen["z"].flatten(2).transpose(1, 2)
    w = conv.weight.detach().flatten(1)
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    assert a.shape[1] == z_rows.shape[1], "the reference patches miss output positions"
    torch.testing.assert_close(a @ w.T + b, z_rows, rtol=1e-12, atol=1e-12)
    return a, seen["g"].flatten(2).transpose(1, 2), out.shape[0]


def conv_factors(a, g, bias: bool, approx: str, M: int) -> dict[str, torch.Tensor]:
    """The K-FAC factors of the module docstring, from patches a (N, L, d) and gradients g."""
    a = augment(a, bias)
    N = a.shape[0]
    if approx == "expand":
        rows_a, rows_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        return {"A": rows_a.T @ rows_a / rows_a.shape[0], "S": M * rows_g.T @ rows_g}
    a_n, g_n = a.mean(1), g.sum(1)
    return {"A": a_n.T @ a_n / N, "S": M * g_n.T @ g_n}


def conv_diag(model, name, x, y) -> torch.Tensor:
    """1/N Σ_n (∇ℓ̃_n)² in the [W.flatten(1) b] layout, from vmap per-example gradients."""
    grads = per_example_grads(model, x, y)
    w = grads[f"{name}.weight"].flatten(2)
    g = torch.cat([w, grads[f"{name}.bias"][:, :, None]], dim=2) if f"{name}.bias" in grads else w
    return g.square().mean(0)


def curvlinops_conv_factors(model, name, x, y, approx) -> dict[str, torch.Tensor]:
    from curvlinops import KFACLinearOperator

    model = copy.deepcopy(model)
    params = [p for p in dict(model.named_modules())[name].parameters()]
    kfac = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical",
                              separate_weight_and_bias=False, check_deterministic=False, kfac_approx=approx)
    kfac.compute_kronecker_factors()
    return {"A": kfac._input_covariances[name], "S": kfac._gradient_covariances[name]}


# ----------------------------------------------------------------------------- configurations

# (dim, conv keyword arguments, input spatial size)
CASES = {
    "1d-stride2-pad1": (1, dict(kernel_size=3, stride=2, padding=1), (9,)),
    "1d-same-odd-dilated": (1, dict(kernel_size=3, padding="same", dilation=2), (8,)),
    "1d-same-even": (1, dict(kernel_size=4, padding="same"), (7,)),
    "1d-valid-stride3-nobias": (1, dict(kernel_size=2, stride=3, padding="valid", bias=False), (10,)),
    "2d-stride-pad-dilation": (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (7, 6)),
    "2d-same-odd": (2, dict(kernel_size=3, padding="same"), (5, 6)),
    "2d-same-even-dilated": (2, dict(kernel_size=(2, 4), padding="same", dilation=(2, 1)), (5, 5)),
    "2d-valid-stride2": (2, dict(kernel_size=2, stride=2, padding="valid"), (6, 5)),
    "3d-stride-pad": (3, dict(kernel_size=2, stride=(1, 2, 1), padding=1), (3, 4, 3)),
    "3d-same-even": (3, dict(kernel_size=(2, 3, 2), padding="same", dilation=(1, 1, 2)), (3, 3, 4)),
    "3d-valid-dilated": (3, dict(kernel_size=2, dilation=2, padding="valid"), (4, 4, 3)),
}


def case(key, seed=0):
    dim, conv, spatial = CASES[key]
    model = ConvNet(dim, seed=seed, **conv)
    x, y = data(5, 2, spatial)
    return model, x, y


# ----------------------------------------------------------------------------- A, S, diag vs references


# the export form is slower to capture: every case in the fx form, one per dimension in both
EXPORTED = ("1d-same-even", "2d-stride-pad-dilation", "2d-same-even-dilated", "3d-same-even")
EXPAND_CASES = [(key, "fx") for key in CASES] + [(key, "export") for key in EXPORTED]


@pytest.mark.parametrize("key, capture", EXPAND_CASES)
def test_expand_statistics_equal_the_patch_reference_and_per_example_gradients(key, capture):
    model, x, y = case(key)
    a, g, M = record_conv(model, "conv", x, y)
    ref = conv_factors(a, g, model.conv.bias is not None, "expand", M)
    diag = conv_diag(model, "conv", x, y)
    c = compile_for_statistics(model, capture=capture, example_inputs=(x,))
    assert c.layers.form == capture
    block = c.layers["conv"]
    assert block.kind == "conv"
    assert block.d_in == model.conv.weight[0].numel() and block.d_out == model.conv.out_channels
    statistic_step(c, x, y)
    got = c.statistics("conv")
    assert_close(got["A"], ref["A"])
    assert_close(got["S"], ref["S"])
    assert_close(got["diag"], diag)


@pytest.mark.parametrize("key", list(CASES))
def test_reduce_statistics_equal_the_patch_reference(key):
    model, x, y = case(key)
    a, g, M = record_conv(model, "conv", x, y)
    ref = conv_factors(a, g, model.conv.bias is not None, "reduce", M)
    c = compile_for_statistics(model, capture="fx", kfac_approx="reduce")
    statistic_step(c, x, y)
    got = c.statistics("conv")
    assert_close(got["A"], ref["A"])
    assert_close(got["S"], ref["S"])


@pytest.mark.parametrize("key", [k for k in CASES if k.startswith("2d")])
def test_unfold_and_position_loop_references_agree(key):
    """The two ways of building reference patches are the same matrix (a check of the checks)."""
    model, x, y = case(key)
    a_loop, g_loop, _ = record_conv(model, "conv", x, y, patches_by_positions)
    a_unfold, g_unfold, _ = record_conv(model, "conv", x, y, patches_by_unfold)
    assert_close(a_unfold, a_loop)
    assert_close(g_unfold, g_loop)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("key", ["2d-stride-pad-dilation", "2d-same-odd", "2d-valid-stride2"])
def test_conv2d_statistics_equal_curvlinops_kfac(key, approx):
    """curvlinops' KFACLinearOperator (empirical Fisher, [W b] layout). It handles symmetric
    padding only, so the even-kernel 'same' case is left to the patch reference."""
    model, x, y = case(key)
    ref = curvlinops_conv_factors(model, "conv", x, y, approx)  # before the step moves the weights
    c = compile_for_statistics(model, capture="fx", kfac_approx=approx)
    statistic_step(c, x, y)
    got = c.statistics("conv")
    assert_close(got["A"], ref["A"])
    assert_close(got["S"], ref["S"])


def test_a_stack_of_convolutions_in_a_cnn_with_pooling_matches_the_references():
    """Every conv of a CNN (pooling between them) at once, against hooks and curvlinops."""
    from models import CNN

    model = CNN(channels=2, width=3, classes=4)
    x, y = data(4, 2, (8, 8))
    ref_curvlinops = {n: curvlinops_conv_factors(model, n, x, y, "expand") for n in ("conv1", "conv2")}
    refs = {}
    for n in ("conv1", "conv2"):
        a, g, M = record_conv(model, n, x, y, patches_by_unfold)
        refs[n] = conv_factors(a, g, True, "expand", M)
    diags = {n: conv_diag(model, n, x, y) for n in ("conv1", "conv2")}
    c = compile_for_statistics(model)
    assert [b.name for b in c.layers] == ["conv1", "conv2", "head"]
    statistic_step(c, x, y)
    for n in ("conv1", "conv2"):
        got = c.statistics(n)
        for key in ("A", "S"):
            assert_close(got[key], refs[n][key])
            assert_close(got[key], ref_curvlinops[n][key])
        assert_close(got["diag"], diags[n])


# ----------------------------------------------------------------------------- functional convolution


class FunctionalConv(nn.Module):
    """F.conv2d on bare Parameters `w`, `b` (no nn.Conv2d module)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        twin = nn.Conv2d(2, 3, 3)
        self.w = nn.Parameter(twin.weight.detach().clone())
        self.b = nn.Parameter(twin.bias.detach().clone())
        self.head = nn.Linear(3, 4)
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x, self.w, self.b, stride=2, padding=1))
        return self.head(h.flatten(2).mean(2))


class ModuleTwin(nn.Module):
    """The same network with an nn.Conv2d holding copies of w and b (for the hook reference)."""

    def __init__(self, functional: FunctionalConv):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DTYPE)
        with torch.no_grad():
            self.conv.weight.copy_(functional.w)
            self.conv.bias.copy_(functional.b)
        self.head = copy.deepcopy(functional.head)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(2).mean(2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_functional_conv2d_on_parameters_is_a_conv_block(capture):
    model = FunctionalConv()
    x, y = data(4, 2, (7, 6))
    twin = ModuleTwin(model)
    assert_close(twin(x), model(x))
    a, g, M = record_conv(twin, "conv", x, y, patches_by_unfold)
    ref = conv_factors(a, g, True, "expand", M)
    diag = conv_diag(twin, "conv", x, y)
    c = compile_for_statistics(model, capture=capture, example_inputs=(x,))
    block = c.layers.block_of("w")
    assert block is not None and block.kind == "conv" and block.params == ("w", "b")
    assert not c.layers.fallbacks
    statistic_step(c, x, y)
    got = c.statistics(block.name)
    assert_close(got["A"], ref["A"])
    assert_close(got["S"], ref["S"])
    assert_close(got["diag"], diag)


# ----------------------------------------------------------------------------- grouped convolutions


class Grouped(nn.Module):
    def __init__(self, groups):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, groups=groups)
        self.head = nn.Linear(4, 3)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convolution_is_a_block_of_independent_groups(groups, capture):
    """A grouped convolution is `groups` convolutions side by side: one block whose factors are
    per group (their values are checked in test_layer_kinds.py)."""
    model = Grouped(groups)
    x, _ = data(3, 4, (5, 5), classes=3)
    c = gnfx.compile(model, optimizer="kfac", capture=capture, example_inputs=(x,))
    assert [b.name for b in c.layers] == ["conv", "head"] and not c.layers.fallbacks
    conv = c.layers["conv"]
    d_a = 4 // groups * 9 + 1
    assert (conv.d_in, conv.d_out, conv.options["groups"]) == (4 // groups * 9, 4, groups)
    assert conv.shapes["A"] == (groups, d_a, d_a) and conv.shapes["S"] == (groups, 4 // groups, 4 // groups)


# ----------------------------------------------------------------------------- memory chunking


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("key", ["1d-same-even", "2d-stride-pad-dilation", "3d-valid-dilated"])
def test_unfolding_in_small_chunks_gives_the_same_statistics(key, approx, monkeypatch):
    """With CHUNK_ELEMENTS tiny, patches are unfolded one example at a time: same A, S, diag."""
    model, x, y = case(key)
    whole = compile_for_statistics(model, capture="fx", kfac_approx=approx)
    statistic_step(whole, x, y)
    expected = whole.statistics("conv")

    model, x, y = case(key)
    chunks = []
    unfold = gnfx.layouts.conv.unfold
    monkeypatch.setattr(gnfx.layouts.conv, "CHUNK_ELEMENTS", 5)
    monkeypatch.setattr(gnfx.layouts.conv, "unfold", lambda a, *args: chunks.append(a.shape[0]) or unfold(a, *args))
    chunked = compile_for_statistics(model, capture="fx", kfac_approx=approx)
    statistic_step(chunked, x, y)
    assert chunks and max(chunks) == 1, "the patches were not unfolded one example at a time"
    got = chunked.statistics("conv")
    for name in ALL:
        assert_close(got[name], expected[name])


# ----------------------------------------------------------------------------- graph forms


def test_fx_and_export_forms_give_identical_blocks_and_statistics():
    from models import CNN

    x, y = data(4, 3, (8, 8), classes=5)
    stats, tables = {}, {}
    for capture in ("fx", "export"):
        model = CNN()
        c = compile_for_statistics(model, capture=capture, example_inputs=(x,), kfac_approx="reduce")
        assert c.layers.form == capture
        statistic_step(c, x, y)
        tables[capture] = [(b.name, b.kind, b.params, b.d_in, b.d_out, b.options) for b in c.layers]
        stats[capture] = {b.name: c.statistics(b.name) for b in c.layers}
    assert tables["fx"] == tables["export"]
    for name, values in stats["fx"].items():
        for key in ALL:
            assert_close(stats["export"][name][key], values[key])


class ReflectPadded(nn.Module):
    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
        self.head = nn.Linear(3, 4)
        self.to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_non_zero_padding_modes_give_the_same_blocks_in_both_graph_forms(mode):
    x, y = data(3, 2, (5, 5))
    blocks = {}
    for capture in ("fx", "export"):
        c = gnfx.compile(ReflectPadded(mode), optimizer="kfac", capture=capture, example_inputs=(x,))
        blocks[capture] = [b.name for b in c.layers]
    assert blocks["export"] == ["conv", "head"]
    assert blocks["fx"] == blocks["export"]


# ----------------------------------------------------------------------------- K-FAC's step on a conv


@pytest.mark.parametrize("key", ["1d-stride2-pad1", "2d-same-even-dilated", "3d-valid-dilated"])
def test_kfac_step_on_a_convolution_equals_the_dense_kronecker_solve(key):
    """With G = [∇W.flatten(1) ∇b] (C_out x d_a), K = (A + λ_A I) ⊗ (S + λ_S I), π-corrected damping
    (kfac.py) and a column-major vec: [W b] ← [W b] - η unvec(K⁻¹ vec(G)) (momentum 0, no KL clip)."""
    model, x, y = case(key)
    a, g, M = record_conv(model, "conv", x, y)
    bias = model.conv.bias is not None
    ref = conv_factors(a, g, bias, "expand", M)
    damping, lr = 1e-2, 0.5
    before = [p.detach().clone() for p in model.conv.parameters()]
    c = gnfx.compile(model, optimizer="kfac", lr=lr, momentum=0.0, weight_decay=0.0, kl_clip=0.0,
                     damping=damping, stat_every=1, inv_every=1, stat_decay=0.0)
    cross_entropy(c(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.conv.parameters()]
    c.step()
    G = torch.cat([grads[0].flatten(1)] + ([grads[1][:, None]] if bias else []), dim=1)
    A, S = ref["A"], ref["S"]
    pi = (A.diagonal().mean() / S.diagonal().mean()).sqrt()
    K = torch.kron(A + pi * damping ** 0.5 * torch.eye(A.shape[0], dtype=DTYPE),
                   S + damping ** 0.5 / pi * torch.eye(S.shape[0], dtype=DTYPE))
    U = torch.linalg.solve(K, G.T.reshape(-1)).reshape(G.shape[1], G.shape[0]).T
    assert_close(model.conv.weight.detach(), before[0] - lr * U[:, :before[0][0].numel()].reshape(before[0].shape))
    if bias:
        assert_close(model.conv.bias.detach(), before[1] - lr * U[:, -1])
