"""Weight-standardized convolutions with a gain (timm's ScaledStdConv2d, NFNets: W_r = c g_r Ŵ_r, Ŵ_r =
(V_r − μ_r) / √(σ_r² + ε)) as conv blocks holding their gain (gnfx.reparametrization.GainedWeightStandardization,
passes/weight_standardization.py), float64, against plain-torch references: the kernel written out and
differentiated by torch.func, and the same network with W a plain nn.Conv2d's weight (autograd, and
per-example gradients by torch.func.vmap). timm is not a dependency: `ScaledStdConv` is its layer's forward.
The form without a gain (BiT, timm's StdConv2d) is tested in test_first_contact.py."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.reparametrization import GainedWeightStandardization
from references import TOL, per_example_grads
from steps import compile_for_statistics, statistic_step, train, train_in_blocks

EPS = 1e-6


class ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d (timm/layers/std_conv.py): the kernel V standardized per output row by a batch
    normalization whose weight is the gain g (C_out, 1, 1, 1) times scale = γ / √fan-in. `gain_form` writes
    that weight as timm does, or as other code might; "product", "biased": forms gnfx leaves to the fallback."""

    def __init__(self, *args, gain_form="timm", **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = 1.7 * self.weight[0].numel() ** -0.5
        self.gain_form = gain_form
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(self.out_channels, 1, 1, 1))
        if gain_form == "product":
            self.gamma = nn.Parameter(torch.ones(()))

    def row_weight(self):
        if self.gain_form in ("timm", "biased"):
            return (self.gain * self.scale).view(-1)
        if self.gain_form == "number_first":
            return self.scale * self.gain.flatten()
        if self.gain_form == "quotient":
            return self.gain.reshape(-1) / 2.0
        if self.gain_form == "gain_only":
            return self.gain.view(-1)
        return (self.gain * self.gamma).view(-1)  # "product"

    def forward(self, x):
        bias = self.gain.view(-1) if self.gain_form == "biased" else None
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=self.row_weight(),
                              bias=bias, training=True, momentum=0.0, eps=EPS).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


FACTORS = {"timm": 1.7 / 6, "number_first": 1.7 / 6, "quotient": 0.5, "gain_only": 1.0}  # conv2's fan-in: 4·3·3 = 36


class Net(nn.Module):
    """Two scaled standardized convolutions (NFNet's stem and block convolutions) and a linear head."""

    def __init__(self, gain_form="timm", conv=ScaledStdConv):
        super().__init__()
        torch.manual_seed(0)
        kwargs = {"gain_form": gain_form} if conv is ScaledStdConv else {}
        self.conv1 = conv(3, 4, 3, padding=1, **kwargs)
        self.conv2 = conv(4, 5, 3, padding=1, bias=False, **kwargs)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.gelu(self.conv2(F.gelu(self.conv1(x)))).mean((2, 3)))


def kernel(v: torch.Tensor, g: torch.Tensor, c: float) -> torch.Tensor:
    """W_r = c g_r (V_r − μ_r) / √(σ_r² + ε), written out (no batch_norm)."""
    rows = v.flatten(1)
    centered = rows - rows.mean(1, keepdim=True)
    return (c * g.reshape(-1, 1) * centered / (centered.square().mean(1, keepdim=True) + EPS).sqrt()).reshape_as(v)


def data():
    torch.manual_seed(1)
    return torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.arange(6) % 3


def plain_copy(model: Net) -> Net:
    """The same network with plain nn.Conv2d layers holding each kernel W (written out by `kernel`)."""
    plain = Net(conv=nn.Conv2d).double()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            layer = getattr(model, name)
            getattr(plain, name).weight.copy_(kernel(layer.weight, layer.gain, layer.scale))
        plain.conv1.bias.copy_(model.conv1.bias)
        plain.head.load_state_dict(model.head.state_dict())
    return plain


def without_row_mean(x: torch.Tensor) -> torch.Tensor:
    return x - x.flatten(1).mean(1).reshape(-1, 1, 1, 1)


def along(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each row of x projected on the same row of w."""
    rows, w_rows = x.flatten(1), w.flatten(1)
    return (w_rows * ((rows * w_rows).sum(1) / w_rows.square().sum(1))[:, None]).reshape_as(x)


@pytest.mark.parametrize("gain_form, capture", [("timm", "fx"), ("timm", "export"), ("number_first", "fx"),
                                                ("quotient", "export"), ("gain_only", "fx")])
def test_a_scaled_standardized_convolution_is_a_conv_block_holding_its_gain(gain_form, capture):
    """NFNet's convolutions (timm's ScaledStdConv2d) fell back to diag, kernel and gain ('used by call_method
    reshape ... not a layer gnfx models'; nfnet_l0 33.4% in blocks): each is now a conv block over the W it
    computes that holds g; the compiled model's outputs are the model's."""
    model = Net(gain_form).double()
    x, _ = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning
        c = gnfx.compile(model, "kfac", loss="cross_entropy", capture=capture, example_inputs=(x,))
    torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)
    table = c.layers
    assert not table.fallbacks, table
    block = table["conv2"]
    assert block.kind == "conv" and block.weight == "conv2.weight"
    rp = block.reparametrization
    assert isinstance(rp, GainedWeightStandardization)
    assert (rp.original, rp.gain, rp.eps) == ("conv2.weight", "conv2.gain", EPS)
    assert rp.factor == pytest.approx(FACTORS[gain_form], rel=1e-15)
    assert table.block_of("conv2.gain") is block and table.block_of("conv1.gain") is table["conv1"]
    covered, total = table.coverage(dict(model.named_parameters()))
    assert covered == total


@pytest.mark.parametrize("gain_form, reason", [
    ("product", "batch_norm weight is not one parameter (of one entry per output row) times a number"),
    ("biased", "or that has a bias")])
def test_other_standardization_weights_fall_back_with_the_reason(gain_form, reason):
    """A weight computed from two parameters, or a batch normalization's bias, is no gained standardization:
    the kernel falls back, and the report says why."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = gnfx.compile(Net(gain_form).double(), "kfac", loss="cross_entropy", capture="fx")
    assert "conv2.weight" in [f.param for f in c.layers.fallbacks] and reason in repr(c)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_statistics_are_the_plain_convolutions(capture):
    """The blocks' statistics are those of a plain convolution holding W: the per-example diagonal equals
    the per-example gradients' of W (vmap, on the plain copy)."""
    model = Net().double()
    x, y = data()
    expected = per_example_grads(plain_copy(model), x, y)
    c = compile_for_statistics(model, capture=capture, example_inputs=(x,))
    statistic_step(c, x, y)
    for name in ("conv1", "conv2"):
        w = expected[f"{name}.weight"].flatten(2)
        bias = expected.get(f"{name}.bias")
        rows = w if bias is None else torch.cat([w, bias[:, :, None]], dim=2)
        torch.testing.assert_close(c.statistics(name)["diag"], rows.square().mean(0), **TOL)


def test_gathered_gradient_is_the_kernels_gradient_but_its_row_means():
    """The stand-in holds W, and its gradient is ∇W (autograd, on the plain copy) but for each row's mean,
    which no change of (g, V) reaches; at a row with g_r = 0 only the component along Ŵ_r (through g_r)."""
    model = Net().double()
    x, y = data()
    with torch.no_grad():
        model.conv2.gain[1] = 0.0
    plain = plain_copy(model)
    c = gnfx.compile(model, "kfac", loss="cross_entropy", capture="fx", example_inputs=(x,))
    F.cross_entropy(c(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    store = c.optimizer.parameter_store
    store.gather()
    for name in ("conv1", "conv2"):
        standin = store.param(f"{name}.weight")
        torch.testing.assert_close(standin.detach(), getattr(plain, name).weight.detach(), rtol=1e-12, atol=1e-14)
        reference = without_row_mean(getattr(plain, name).weight.grad)
        if name == "conv2":
            reference[1] = along(reference, kernel(model.conv2.weight, torch.ones(5), 1.0))[1]
        torch.testing.assert_close(standin.grad, reference, rtol=1e-10, atol=1e-13)
    store.scatter()  # no change of the stand-ins: the parameters stay
    assert store.param("conv2.weight") is model.conv2.weight


def test_pull_back_and_gathered_gradient_are_the_jacobians_pseudo_inverse():
    """With J the Jacobian of (g, V) ↦ W (torch.func on `kernel`) and P the pull-back: J P ΔW = ΔW but for its
    rows' means, and Pᵀ Jᵀ ∇W = ∇W but for its rows' means (ε included); at g_r = 0 only the component along
    Ŵ_r; at a constant row V_r (Ŵ_r = 0) the rest. P's ΔV is the least-norm preimage (ΔV_r ⟂ 1, V_r − μ_r);
    `weight_gradient` is P's transpose; decoupled weight decay (ΔW = −W) pulls back to Δg = −g (0 where W_r = 0),
    ΔV = 0."""
    torch.manual_seed(2)
    v, g, c = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 1, 1, 1, dtype=torch.float64), 0.7
    g[0] = 0.0  # a row whose gain is 0
    v[1] = 0.25  # a constant row: Ŵ_1 = 0
    rp = GainedWeightStandardization("w", "v", EPS, "g", c)
    named = {"v": v, "g": g}
    torch.testing.assert_close(rp.value(named), kernel(v, g, c), rtol=1e-12, atol=1e-14)
    standardized = kernel(v, torch.ones(4), 1.0)

    def expected(x):
        out = without_row_mean(x)
        out[0] = along(x, standardized)[0]
        return out

    delta_w = torch.randn_like(v)
    pulled = rp.pull_back(named, delta_w)
    _, image = torch.func.jvp(lambda v, g: kernel(v, g, c), (v, g), (pulled["v"], pulled["g"]))
    torch.testing.assert_close(image, expected(delta_w), rtol=1e-10, atol=1e-12)
    rows, centered = pulled["v"].flatten(1), without_row_mean(v).flatten(1)
    torch.testing.assert_close(rows.sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close((rows * centered).sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-13)

    grad_w = torch.randn_like(v)
    _, vjp = torch.func.vjp(lambda v, g: kernel(v, g, c), v, g)
    grad_v, grad_g = vjp(grad_w)
    gathered = rp.weight_gradient(named, {"v": grad_v, "g": grad_g})
    torch.testing.assert_close(gathered, expected(grad_w), rtol=1e-10, atol=1e-12)

    a, b = torch.randn_like(g), torch.randn_like(v)
    forward = (a * pulled["g"]).sum() + (b * pulled["v"]).sum()
    transposed = (rp.weight_gradient(named, {"v": b, "g": a}) * delta_w).sum()
    torch.testing.assert_close(forward, transposed, rtol=1e-12, atol=1e-14)

    decay = rp.pull_back(named, -kernel(v, g, c))
    shrunk = -g
    shrunk[1] = 0.0  # W_1 = 0 whatever g_1: nothing decays
    torch.testing.assert_close(decay["g"], shrunk, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(decay["v"], torch.zeros_like(v), rtol=0, atol=1e-12)


def test_a_zero_factor_is_refused():
    with pytest.raises(ValueError, match="multiplied by 0"):
        GainedWeightStandardization("w", "v", EPS, "g", 0.0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_kfac_at_defaults_trains_it(capture):
    """kfac at its defaults (the quadratic-model step) lowers the loss; the compiled model's outputs stay the
    model's over the steps."""
    model = Net().double()
    x, y = data()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", loss="cross_entropy", capture=capture, example_inputs=(x,))
    losses = train(c, x, y, F.cross_entropy, steps=10)
    assert losses[-1] < 0.5 * losses[0], losses
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(c(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["ekfac", "shampoo", "rank1", "diag", "soap", "muon"])
def test_other_preconditioners_step_it(optimizer):
    """The other preconditioners see the W-space gradient matrix too: a few steps lower the loss."""
    x, _ = data()
    losses = train_in_blocks(Net().double(), x, torch.randn(6, 3, dtype=torch.float64), optimizer)
    assert losses[-1] < losses[0], losses
