"""Capture: torch.fx first, torch.export as the fallback, untraceable submodules as leaves.

Whatever the graph form, the blocks it finds must collect the statistics of the hook reference
(tests/references.py) at 1e-10 in float64, and every parameter not in a block must be a fallback
whose reason says why.
"""
from __future__ import annotations

import copy
import functools
import inspect
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gnfx
from steps import ALL, compile_for_statistics
from references import TOL, cross_entropy, hook_statistics, layer_diag, per_example_fisher_diag

DTYPE = torch.float64


def batch(shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DTYPE), torch.randint(0, classes, shape[:-1], generator=g)


def assert_statistics_match(c, model, names, x, y, vectorized=True, **kwargs):
    """One statistic step of c on (x, y); A, S vs hooks and diag vs per-example gradients (vmap,
    or a loop for data-dependent models) on `model` before the step. With keyword arguments
    to the forward, diag is left to the other tests."""
    ref = hook_statistics(model, names, x, y, **kwargs)
    diags = per_example_fisher_diag(model, x, y, vectorized=vectorized) if not kwargs else None
    cross_entropy(c(x, **kwargs), y).backward()
    c.step()
    c.zero_grad()
    for name in names:
        torch.testing.assert_close(c.statistics(name)["A"], ref[name]["A"], **TOL)
        torch.testing.assert_close(c.statistics(name)["S"], ref[name]["S"], **TOL)
        if diags is not None:
            torch.testing.assert_close(c.statistics(name)["diag"], layer_diag(diags, name), **TOL)


class MLP(nn.Module):
    def __init__(self, d=4, hidden=5, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(hidden, classes)
        self.to(DTYPE)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class RankBranch(MLP):
    """Top-level Python control flow on the input's rank: fx cannot trace it, torch.export can."""

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        return self.b(torch.tanh(self.a(x)))


class DataBranch(MLP):
    """Top-level control flow on the input's values: neither fx nor torch.export can capture it."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = 2 * h
        return self.b(h)


class Gate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        if h.abs().max() < 2:  # data-dependent, so untraceable (and always true after a tanh)
            return torch.tanh(self.lin(h))
        return self.lin(h)


class WithGate(MLP):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.gate = Gate(5).to(DTYPE)

    def forward(self, x):
        return self.b(self.gate(torch.tanh(self.a(x))))


class Mixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class WithMixer(MLP):
    """A traceable submodule, to be made a leaf on request."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.mix = Mixer(5).to(DTYPE)

    def forward(self, x):
        return self.b(self.mix(torch.tanh(self.a(x))))


class Keywords(MLP):
    """A forward driven by keyword arguments."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.ctx = nn.Linear(2, 5).to(DTYPE)

    def forward(self, x, *, context=None, scale=2.0):
        h = torch.tanh(self.a(x))
        if context is not None:
            h = h + self.ctx(context)
        return self.b(scale * h)


class TimestepConditioned(MLP):
    """A diffusers UNet's timestep: a tensor of ints, one per example, or one Python int for the batch,
    which `torch.is_tensor` tells apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.t_embed = nn.Linear(1, 5).to(DTYPE)

    def forward(self, x, timestep):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=x.device)
        t = timestep.to(x.dtype).expand(x.shape[0])[:, None] / 10
        return self.b(torch.tanh(self.a(x)) + self.t_embed(t))


class SkipJoin(nn.Module):
    """MONAI's BasicUNet decoder block (UpCat): the skip connection is concatenated when one is passed,
    asked with `torch.jit.isinstance(skip, torch.Tensor)`; without it the layer takes the upsampled input alone
    (so its input width differs between the branches)."""

    def __init__(self, width):
        super().__init__()
        self.joined = nn.Linear(2 * width, width)
        self.alone = nn.Linear(width, width)

    def forward(self, x, skip):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            return self.joined(torch.cat([skip, x], dim=-1))
        return self.alone(x)


class SkipJoinNet(MLP):
    def __init__(self):
        super().__init__(hidden=4)
        self.join = SkipJoin(4).to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.tanh(self.join(torch.tanh(h), h)))


class NoisyLatent(RankBranch):
    """A posterior sample as diffusers draws it, `torch.randn(shape, generator=None)`, in a forward that
    torch.fx cannot trace (its rank branch)."""

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        h = torch.tanh(self.a(x))
        return self.b(h + 0.1 * torch.randn(h.shape, generator=None, dtype=h.dtype))


# ----------------------------------------------------------------------------- fx


def test_fx_captures_a_plain_model_with_one_block_per_linear():
    model = MLP()
    c = compile_for_statistics(model)
    assert c.layers.form == "fx" and c.layers.leaves == {} and c.layers.fallbacks == []
    assert [(b.name, b.kind, b.params, b.d_in, b.d_out) for b in c.layers] == [
        ("a", "linear", ("a.weight", "a.bias"), 4, 5), ("b", "linear", ("b.weight", "b.bias"), 5, 3)]
    assert_statistics_match(c, model, ["a", "b"], *batch((7, 4)))


def test_keyword_driven_forward():
    model = Keywords()
    c = compile_for_statistics(model)
    assert [b.name for b in c.layers] == ["a", "ctx", "b"]
    x, y = batch((7, 4))
    context = torch.randn(7, 2, dtype=DTYPE)
    assert_statistics_match(c, model, ["a", "ctx", "b"], x, y, context=context, scale=0.5)


def test_keyword_forward_with_an_optional_argument_left_out():
    model = Keywords()
    c = compile_for_statistics(model)
    x, y = batch((7, 4))
    assert c.optimizer.collecting
    torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)


class GatedWhenGiven(MLP):
    """Traceable when `gate` is left out; a branch on data when it is given."""

    def forward(self, x, gate=None):
        h = torch.tanh(self.a(x))
        if gate is not None and (gate * h).sum() > 0:
            h = gate * h
        return self.b(h)


def test_a_call_form_that_cannot_be_captured_runs_the_original_forward_and_warns():
    model = GatedWhenGiven()
    c = compile_for_statistics(model)
    x, y = batch((7, 4))
    assert_statistics_match(c, model, ["a", "b"], x, y)
    gate = torch.ones(7, 5, dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="could not be captured.*add no statistics"):
        out = c(x, gate)
    torch.testing.assert_close(out, model(x, gate), rtol=0, atol=0)
    before = c.statistics("a")["A"].clone()
    cross_entropy(out, y).backward()
    c.step()  # a step without this forward's statistics: the averages stay as they were
    torch.testing.assert_close(c.statistics("a")["A"], before, rtol=0, atol=0)


class MaskOrCausal(MLP):
    """timm's VisionTransformer: `forward(x, attn_mask=None, is_causal=False)` and a branch
    `if attn_mask is not None or is_causal:`, which a traced flag cannot take."""

    def forward(self, x, attn_mask=None, is_causal: bool = False, scale: float = 1.0):
        h = torch.tanh(self.a(x))
        if attn_mask is not None or is_causal:  # timm runs its blocks one by one here, with the mask and flag
            if attn_mask is not None:
                h = h * attn_mask
            h = h + is_causal * h.cumsum(0)
        return self.b(scale * h)


def test_flags_with_constant_defaults_are_traced_fixed_to_the_calls_values():
    """A call leaving is_causal at False, or passing True or another scale, gets a graph traced with
    those constants (before, the flag was traced as a tensor: the call's capture failed and it ran the
    model's own forward, without statistics)."""
    model = MaskOrCausal()
    c = compile_for_statistics(model)
    assert c.layers.form == "fx"  # at compile: the flag a tensor, the mask given
    x, y = batch((7, 4))
    assert_statistics_match(c, model, ["a", "b"], x, y)
    assert_statistics_match(c, model, ["a", "b"], x, y, is_causal=True, scale=0.5)
    assert_statistics_match(c, model, ["a", "b"], x, y, attn_mask=torch.rand(7, 5, dtype=DTYPE))
    torch.testing.assert_close(c(x, None, True, 2.0), model(x, None, True, 2.0), rtol=0, atol=0)  # positionally


def test_a_call_that_runs_the_models_own_forward_under_a_true_fisher_records_nothing_and_steps():
    """fisher="mc" backpropagates sampled vectors to the block outputs of the forward; a call of a form
    that could not be captured has none (before: torch.autograd.grad raised on an empty list)."""
    model = GatedWhenGiven()
    c = compile_for_statistics(model, loss="cross_entropy", fisher="mc", step="lr")
    x, y = batch((7, 4))
    cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()
    before = c.statistics("a")["S"].clone()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = c(x, torch.ones(7, 5, dtype=DTYPE))
    cross_entropy(out, y).backward()
    c.step()
    torch.testing.assert_close(c.statistics("a")["S"], before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- torch.export


def test_untraceable_top_level_forward_under_capture_fx_names_the_fix():
    c = gnfx.compile(RankBranch(), capture="fx")  # fx is retried at the first call, with its inputs
    with pytest.raises(gnfx.CaptureError) as err:
        c(batch((7, 4))[0])
    message = str(err.value)
    assert "RankBranch" in message and "if x.dim() == 3" in message  # what and where
    assert "example_inputs" in message and "capture='export'" in message and "leaf_modules" in message
    # the code is the forward's own, which no leaf_modules entry keeps opaque (torchvision's detection models
    # iterate over their list of images there): not "mark the submodule that holds this code as opaque"
    assert "this code runs in the forward of RankBranch itself" in message and "move it into a submodule" in message


def returns_tuple(forward):
    """A decorator in the manner of Hugging Face's (`can_return_tuple`): a generic wrapper."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class Decorated(MLP):
    """A wrapped forward with keyword arguments that torch.fx cannot re-bind: it fails inside
    torch before any line of the forward runs."""

    @returns_tuple
    def forward(self, x, mask=None, scale=None, **kwargs):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("model, example_inputs, where", [
    (Decorated(), None, f"{Decorated.forward.__wrapped__.__code__.co_firstlineno}: Decorated.forward"),
    (DataBranch(), batch((7, 4))[:1], f"{inspect.getsourcelines(DataBranch.forward)[1] + 2}: if h.sum() > 0:"),
], ids=["before its lines", "at its line"])
def test_the_capture_error_names_the_users_code_not_gnfx_or_torch(model, example_inputs, where):
    """The "at" line is the innermost frame of the user's code in the failure's traceback (or in
    the exceptions it was raised from), else the forward itself: never gnfx's or torch's files."""
    with pytest.raises(gnfx.CaptureError) as err:  # without example inputs, fx captures at the first call
        c = gnfx.compile(model, capture="fx", example_inputs=example_inputs)
        c(*batch((7, 4))[:1])
    at = next(line for line in str(err.value).splitlines() if line.startswith("  at "))
    assert at == f"  at {__file__}:{where}" + (", the forward being captured" if example_inputs is None else "")


class WrongLength(nn.Module):
    """A forward whose rank check torch.fx cannot trace and whose table fits 5 positions only: on 6 the model
    itself raises (timm's CrossViT built with an img_size its position tables do not fit does so)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.pos = nn.Parameter(torch.zeros(1, 5, 3))
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x):
        if x.dim() == 3:
            x = self.norm(x)
        return self.a(x) + self.pos


@pytest.mark.parametrize("capture", ["auto", "export"])
def test_a_call_the_model_itself_fails_on_raises_the_models_own_error_not_a_capture_error(capture):
    """Where neither torch.fx nor torch.export captures the call because the model's own forward raises on
    it, the user gets the model's exception (as without gnfx), with a note saying so; the run that found
    it left the batch-norm statistics and torch's random state as they were."""
    model = WrongLength()
    x = torch.randn(2, 6, 4)
    with pytest.raises(RuntimeError, match="must match the size") as plain:
        copy.deepcopy(model)(x)
    c = gnfx.compile(model, "kfac", lr=0.1, capture=capture)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="must match the size") as err:
        c(x)
    assert type(err.value) is type(plain.value) and not isinstance(err.value, gnfx.CaptureError)
    assert "WrongLength's own forward raises this" in "\n".join(err.value.__notes__)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model.norm.running_mean, torch.zeros(6)) and int(model.norm.num_batches_tracked) == 0


def test_untraceable_top_level_forward_falls_back_to_torch_export():
    model = RankBranch()
    x, y = batch((7, 4))
    c = compile_for_statistics(model, example_inputs=(x,))
    assert c.layers.form == "export"
    assert [(b.name, b.params) for b in c.layers] == [("a", ("a.weight", "a.bias")), ("b", ("b.weight", "b.bias"))]
    assert_statistics_match(c, model, ["a", "b"], x, y)
    # the batch dimension stays dynamic
    assert_statistics_match(c, model, ["a", "b"], *batch((4, 4), seed=1))


def test_untraceable_top_level_forward_is_exported_at_the_first_call():
    model = RankBranch()
    c = compile_for_statistics(model)
    assert "first call" in repr(c.layers) and "first call" in repr(c)
    with pytest.raises(gnfx.GnfxError, match="first call"):
        list(c.layers)
    x, y = batch((7, 4))
    assert_statistics_match(c, model, ["a", "b"], x, y)
    assert c.layers.form == "export" and "torch.fx could not trace" in c.layers.capture
    assert "graph captured with export (torch.fx could not trace" in repr(c)


def test_a_forward_asking_torch_is_tensor_of_an_input_is_exported_for_tensor_and_python_number_inputs():
    """Before, torch.fx traced `torch.is_tensor(timestep)` as False (a traced value is no tensor) and the
    graph captured at gnfx.compile held `torch.tensor([timestep])`, which raised on the tensor of
    timesteps every diffusers training script passes (diffusers' UNet1DModel). Now torch.fx refuses the
    question and torch.export captures each call with its real inputs: a tensor, and a Python int."""
    model = TimestepConditioned()
    c = compile_for_statistics(model)
    x, y = batch((7, 4))
    timesteps = torch.randint(0, 10, (7,))
    for timestep in (timesteps, 3):
        torch.testing.assert_close(c(x, timestep=timestep), model(x, timestep=timestep), rtol=0, atol=0)
        assert_statistics_match(c, model, ["a", "t_embed", "b"], x, y, timestep=timestep)
    assert c.layers.form == "export" and "torch.is_tensor" in c.layers.capture


def test_a_submodule_asking_torch_jit_isinstance_of_a_traced_value_keeps_its_branch():
    """Before, torch.fx traced `torch.jit.isinstance(skip, torch.Tensor)` as False (a traced value is no tensor):
    the graph of MONAI's BasicUNet dropped every skip connection and its first call failed on the channels
    its decoder convolutions expected (here: the graph ran `alone`, the other layer, and the model's output
    was another function). Now torch.fx refuses the question and the submodule is kept opaque, with its
    layers opened: the same output as the module, the statistics of hooks on it."""
    model = SkipJoinNet()
    c = compile_for_statistics(model)
    x, y = batch((7, 4))
    torch.testing.assert_close(c(x), model(x), rtol=0, atol=0)
    assert_statistics_match(c, model, ["a", "join.joined", "b"], x, y)
    assert "torch.jit.isinstance" in c.layers.leaves["join"]


def test_a_draw_given_generator_none_at_the_dynamic_batch_size_is_exported():
    """Before, torch.export refused `torch.randn(shape, generator=None)` at a dynamic batch size (the
    generator overload takes no symbolic sizes), and the forward ran eagerly as its Python code. Now the
    draw is exported, from the default generator as the forward draws it: the same statistics as hooks
    on the same draws, at two batch sizes."""
    model = NoisyLatent()
    c = compile_for_statistics(model)
    for n in (7, 4):
        x, y = batch((n, 4), seed=n)
        torch.manual_seed(n)
        ref = hook_statistics(model, ["a", "b"], x, y)
        torch.manual_seed(n)
        cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
        for name in ("a", "b"):
            torch.testing.assert_close(c.statistics(name)["A"], ref[name]["A"], **TOL)
            torch.testing.assert_close(c.statistics(name)["S"], ref[name]["S"], **TOL)
    assert c.layers.form == "export"


def test_data_dependent_top_level_branch_runs_eagerly_with_its_layers_opened_and_is_a_capture_error_in_both_forms():
    """Before, capture='auto' raised a CaptureError here too: now the forward's own code runs as written
    at each call (passes/opaque_root.py) and its layers are blocks collecting the hooks' statistics, on
    either side of the branch; a warning names both failures. Forcing a form keeps its error."""
    model = DataBranch()
    x, y = batch((7, 4))
    with pytest.warns(RuntimeWarning, match="neither torch.fx nor torch.export captured the forward of DataBranch") as caught:
        c = compile_for_statistics(model, example_inputs=(x,))
    assert "if h.sum() > 0:" in str(caught[0].message)
    assert c.layers.form == "eager" and [b.name for b in c.layers] == ["a", "b"] and not c.layers.fallbacks
    sides, away = set(), 3 * model.a.weight.detach().sum(0)  # shifted by it, a batch takes the other side
    for seed in range(6):
        x, y = batch((7, 4), seed=seed)
        x = x - away if seed % 2 else x
        with torch.no_grad():
            sides.add(bool(torch.tanh(model.a(x)).sum() > 0))
        ref = hook_statistics(model, ["a", "b"], x, y)  # (per-example gradients would take each row's side)
        cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()
        for name in ("a", "b"):
            for k in ("A", "S"):
                torch.testing.assert_close(c.statistics(name)[k], ref[name][k], **TOL)
    assert sides == {True, False}
    with pytest.raises(gnfx.CaptureError, match="torch.cond"):
        gnfx.compile(DataBranch(), capture="fx")(x)
    with pytest.raises(gnfx.CaptureError, match="torch.export could not capture DataBranch"):
        gnfx.compile(DataBranch(), capture="export", example_inputs=(x,))


def test_export_without_example_inputs_captures_the_first_call():
    model = MLP()
    c = compile_for_statistics(model, capture="export")
    with pytest.raises(gnfx.GnfxError, match="first call"):
        c.graph_module
    assert_statistics_match(c, model, ["a", "b"], *batch((7, 4)))
    assert c.layers.form == "export" and c.layers.capture == "capture='export'"


def test_unknown_capture_mode_is_a_config_error():
    with pytest.raises(gnfx.ConfigError, match="capture='bogus'"):
        gnfx.compile(MLP(), capture="bogus")


def test_fx_and_export_forms_give_the_same_blocks_and_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6, bias=False), nn.Tanh(),
                          nn.Linear(6, 3)).to(DTYPE)
    x, y = batch((5, 3, 4))
    fx_c = compile_for_statistics(model, capture="fx")
    exported = copy.deepcopy(model)
    ex_c = compile_for_statistics(exported, capture="export", example_inputs=(x,))
    assert (fx_c.layers.form, ex_c.layers.form) == ("fx", "export")

    def table(c):
        return [(b.name, b.kind, b.weight, b.bias, b.d_in, b.d_out, len(b.sites)) for b in c.layers]
    assert table(fx_c) == table(ex_c) == [("0", "linear", "0.weight", "0.bias", 4, 6, 1),
                                          ("2", "linear", "2.weight", None, 6, 6, 1),
                                          ("4", "linear", "4.weight", "4.bias", 6, 3, 1)]
    assert fx_c.layers.fallbacks == ex_c.layers.fallbacks == []
    for data in [(x, y), batch((3, 2, 4), seed=1)]:  # a second batch of other (dynamic) sizes
        assert_statistics_match(fx_c, model, ["0", "2", "4"], *data)
        assert_statistics_match(ex_c, exported, ["0", "2", "4"], *data)
        for name in ["0", "2", "4"]:
            for k in ALL:
                torch.testing.assert_close(fx_c.statistics(name)[k], ex_c.statistics(name)[k], **TOL)


def padded_projection(x, weight, bias, window: int):
    """A library's attention-like function that pads its input to whole windows from its shape, which
    symbolic tracing cannot follow; the library registers it with torch.fx.wrap (below), as
    torchvision does its Swin attention, so fx keeps each call opaque, parameters and all."""
    pad = (window - x.shape[1] % window) % window
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return torch.nn.functional.linear(x, weight, bias)[:, :x.shape[1] - pad]


torch.fx.wrap("padded_projection")


class WrappedProjection(MLP):
    def forward(self, x):  # x: (N, T, d)
        return self.b(torch.tanh(padded_projection(x, self.a.weight, self.a.bias, 4)))


def test_a_torch_fx_wrapped_function_taking_parameters_is_captured_by_torch_export():
    """fx traces the whole forward but keeps the wrapped call opaque, so its Linear's parameters
    would fall back; capture waits for the first call, and torch.export, which traces into the call,
    puts them in a block."""
    model = WrappedProjection()
    c = compile_for_statistics(model)
    assert "first call" in repr(c.layers)
    assert_statistics_match(c, model, ["b"], *batch((6, 5, 4)))
    assert c.layers.form == "export"
    assert "padded_projection (a torch.fx.wrap'ed function taking a.weight, a.bias)" in c.layers.capture
    assert {b.name for b in c.layers} == {"a", "b"} and c.layers.fallbacks == []
    fx_c = compile_for_statistics(copy.deepcopy(model), capture="fx")  # what fx alone gives
    assert [b.name for b in fx_c.layers] == ["b"]
    assert sorted(f.param for f in fx_c.layers.fallbacks) == ["a.bias", "a.weight"]


class LinearFunction(torch.autograd.Function):
    """A hand-written linear layer (a fused kernel's Python fallback): y = x Wᵀ + b, its backward the
    derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight, g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).sum(0)


class FunctionProjection(MLP):
    def forward(self, x):
        return self.b(torch.tanh(LinearFunction.apply(x, self.a.weight, self.a.bias)))


def test_a_custom_function_taking_parameters_is_captured_by_torch_export():
    """torch.fx keeps a custom autograd.Function whole (its backward is its own), so the layer inside
    it would fall back; torch.export records its operations once its backward is checked to be their
    derivative, and puts the layer in a block."""
    model = FunctionProjection()
    c = compile_for_statistics(model)
    assert "first call" in repr(c.layers)
    assert_statistics_match(c, model, ["b"], *batch((6, 4)), vectorized=False)
    assert c.layers.form == "export" and {b.name for b in c.layers} == {"a", "b"}
    assert "LinearFunction (a torch.autograd.Function taking a.weight, a.bias)" in c.layers.capture


class Tied(MLP):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(5, 5).to(DTYPE)

    def forward(self, x):
        return self.b(torch.tanh(self.fc(torch.tanh(self.fc(torch.tanh(self.a(x)))))))


def test_export_form_finds_tied_weights():
    model = Tied()
    x, y = batch((7, 4))
    c = compile_for_statistics(model, capture="export", example_inputs=(x,))
    assert [(b.name, len(b.sites)) for b in c.layers] == [("a", 1), ("fc", 2), ("b", 1)]
    assert c.layers.fallbacks == []
    assert_statistics_match(c, model, ["a", "fc", "b"], x, y)


class ExtraKeywords(MLP):
    """Inputs through **kwargs, as many model libraries' forwards take them."""

    def forward(self, x, **kwargs):
        return self.b(kwargs["gain"] * torch.tanh(self.a(x)))


def test_inputs_taken_through_var_keywords_are_exported_with_dynamic_shapes():
    model = ExtraKeywords()
    c = compile_for_statistics(model, capture="export")
    for n in (7, 5):  # the batch dimension of every input is dynamic
        x, y = batch((n, 4), seed=n)
        gain = torch.rand(n, 5, dtype=DTYPE)
        assert_statistics_match(c, model, ["a", "b"], x, y, gain=gain)
    assert c.layers.form == "export" and len(c._variants.graphs()) == 1


def test_an_optimizer_checkpoint_loaded_before_the_first_call_is_loaded_at_the_capture():
    x, y = batch((7, 4))
    trained = compile_for_statistics(MLP(), capture="export")
    for _ in range(2):
        cross_entropy(trained(x), y).backward()
        trained.step()
    resumed = compile_for_statistics(MLP(), capture="export")
    # an optimizer's round trip before any capture (accelerate does it) only sets the param groups
    resumed.optimizer.load_state_dict(resumed.optimizer.state_dict())
    resumed.optimizer.load_state_dict(trained.optimizer.state_dict())
    assert resumed.optimizer.steps == 0 and not resumed.optimizer.attached
    resumed(x)
    assert resumed.optimizer.steps == 2
    torch.testing.assert_close(resumed.statistics("a")["A"], trained.statistics("a")["A"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- leaves


def test_untraceable_submodule_becomes_a_leaf_whose_linear_is_opened():
    """The leaf's Python code runs eagerly; the nn.Linear it calls is a block of its own graph
    (passes/opaque_children.py), whose statistics match the hooks' as the graph's blocks do."""
    model = WithGate()
    c = compile_for_statistics(model, capture="fx")
    assert c.layers.form == "fx"
    assert list(c.layers.leaves) == ["gate"] and "could not be traced" in c.layers.leaves["gate"]
    assert [b.name for b in c.layers] == ["a", "gate.lin", "b"] and not c.layers.fallbacks
    assert c.layers["gate.lin"].called_by == "gate"
    assert "gate.lin: opened" in c.report()
    assert_statistics_match(c, model, ["a", "gate.lin", "b"], *batch((7, 4)), vectorized=False)


def test_leaf_modules_forces_a_traceable_submodule_to_be_a_leaf():
    model = WithMixer()
    assert [b.name for b in compile_for_statistics(copy.deepcopy(model)).layers] == ["a", "mix.lin", "b"]
    c = compile_for_statistics(model, leaf_modules=["mix"])
    assert c.layers.leaves == {"mix": "requested with leaf_modules"}
    assert [b.name for b in c.layers] == ["a", "b"]
    assert {f.param: f.reason for f in c.layers.fallbacks} == {
        p: "inside leaf module 'mix' (requested with leaf_modules)" for p in ["mix.lin.weight", "mix.lin.bias"]}
    assert_statistics_match(c, model, ["a", "b"], *batch((7, 4)))


def test_leaf_modules_naming_a_linear_keeps_it_out_of_the_blocks():
    c = compile_for_statistics(MLP(), leaf_modules=["b"])
    assert c.layers.leaves == {"b": "requested with leaf_modules"}
    assert [b.name for b in c.layers] == ["a"]
    assert sorted(f.param for f in c.layers.fallbacks) == ["b.bias", "b.weight"]


@pytest.mark.parametrize("name", ["nope", "a.lin", ""])
def test_a_bad_leaf_modules_name_raises(name):
    with pytest.raises(gnfx.GnfxError) as err:
        gnfx.compile(MLP(), leaf_modules=[name])
    assert repr(name) in str(err.value) and "named_modules" in str(err.value)


# ----------------------------------------------------------------------------- Python-level random draws


class LayerDrop(nn.Module):
    """A residual layer skipped with probability p in training, drawn as some model libraries draw it:
    by Python's `random` or by `numpy.random`, a number the captured graph cannot hold."""

    def __init__(self, p: float, draw: str):
        super().__init__()
        self.lin, self.p, self.draw = nn.Linear(4, 4), p, draw

    def forward(self, x):
        u = random.uniform(0, 1) if self.draw == "random" else np.random.random()
        if self.training and u < self.p:
            return x
        return x + torch.tanh(self.lin(x))


class LayerDropNet(nn.Module):
    def __init__(self, p: float, draw: str = "random"):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(LayerDrop(p, draw) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TopLevelDraw(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if random.random() < 0.5:
            h = torch.tanh(h)
        return self.b(h)


def _outputs_over_calls(model, x, calls=6, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    return [model(x).detach() for _ in range(calls)]


@pytest.mark.parametrize("draw", ["random", "numpy"])
@pytest.mark.parametrize("capture", ["auto", "fx"])
def test_a_layer_that_draws_python_random_numbers_is_an_opaque_call_drawing_anew(draw, capture):
    """A LayerDrop by Python's random or numpy.random: capture ran its draw once, and the graph took the
    branch of that draw on every call (the same layers dropped always, or never). Each drawing layer is
    now a leaf named with the reason, the compiled model's outputs over calls are the model's own with
    the same draws (capture draws nothing from the user's stream), the other layers stay blocks, and the
    nn.Linear each drawing layer calls (or skips) is opened into a block of its own graph."""
    x = torch.randn(5, 4)
    model = LayerDropNet(0.5, draw)
    expected = _outputs_over_calls(model, x)
    assert len({tuple(o.flatten().tolist()) for o in expected}) > 1  # the draws change the output
    c = gnfx.compile(model, optimizer="kfac", lr=0.1, capture=capture)
    got = _outputs_over_calls(c, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert sorted(c.layers.leaves) == ["layers.0", "layers.1", "layers.2"]
    assert all("PythonRandomDraw" in reason for reason in c.layers.leaves.values())
    assert [b.name for b in c.layers] == ["layers.0.lin", "layers.1.lin", "layers.2.lin", "head"]
    assert [b.called_by for b in c.layers] == ["layers.0", "layers.1", "layers.2", None]


def test_a_draw_that_decides_nothing_keeps_the_graph_and_the_users_stream():
    """LayerDrop at probability 0 draws but takes the same branch for every draw: the traced graph
    stands (every layer a block), and capture leaves Python's and numpy's generators where they were
    (the graph, which holds no Python code, draws nothing when it runs)."""
    random.seed(1)
    np.random.seed(1)
    c = gnfx.compile(LayerDropNet(0.0, "random"), optimizer="kfac", lr=0.1)
    c(torch.randn(5, 4))
    assert not c.layers.leaves and not c.layers.fallbacks
    assert [b.name for b in c.layers] == ["layers.0.lin", "layers.1.lin", "layers.2.lin", "head"]
    after = random.random(), float(np.random.random())
    random.seed(1)
    np.random.seed(1)
    assert (random.random(), float(np.random.random())) == after


def test_a_top_level_draw_that_decides_the_graph_runs_eagerly_drawing_anew():
    """Before, capture='auto' raised a CaptureError: now the forward's own code runs at each call, drawing
    as the model does (the outputs over calls are the model's own with the same draws), its layers
    opened, with a warning naming the draw's line; capture='export' keeps its error and its fix."""
    x = torch.randn(5, 4)
    model = TopLevelDraw()
    expected = _outputs_over_calls(model, x)
    assert len({tuple(o.flatten().tolist()) for o in expected}) > 1  # the draws change the output
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    with pytest.warns(RuntimeWarning, match="PythonRandomDraw") as caught:
        got = _outputs_over_calls(c, x)
    assert "if random.random() < 0.5" in str(caught[0].message)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert c.layers.form == "eager" and [b.name for b in c.layers] == ["a", "b"]
    with pytest.raises(gnfx.CaptureError, match="PythonRandomDraw") as err:
        gnfx.compile(TopLevelDraw(), optimizer="kfac", lr=0.1, capture="export", example_inputs=(x,))
    assert "if random.random() < 0.5" in str(err.value)
    assert "draw with torch in the graph" in str(err.value)  # the export's fix names the draw, not torch.cond


class SpanMask(nn.Module):
    """Hugging Face wav2vec2's SpecAugment in small: the masked positions drawn by numpy's `choice` (or Python's
    `random.sample`), which forced draws cannot force, made a mask tensor that the graph would hold as a constant."""

    def __init__(self, draw: str):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.draw = nn.Linear(4, 4), nn.Linear(4, 3), draw
        self.masked = nn.Parameter(torch.randn(4))

    def forward(self, x):  # (N, T, 4)
        h = self.a(x)
        if self.training:
            T = x.shape[1]
            spans = np.random.choice(T, 2, replace=False) if self.draw == "numpy" else random.sample(range(T), 2)
            mask = torch.zeros(T, dtype=torch.bool)
            mask[torch.as_tensor(spans)] = True
            h = torch.where(mask[None, :, None], self.masked, h)
        return self.b(h)


@pytest.mark.parametrize("draw", ["numpy", "random"])
def test_a_draw_that_cannot_be_forced_draws_anew_at_every_call(draw):
    """Before, the draws changed nothing in the graph's code under either forced draw (choice and sample cannot
    be forced), so the graph torch.export made stood, with the masked positions of the one draw made while
    capturing baked in as a constant: every statistic forward masked the same spans, silently. A forced capture
    during which the generators still move now counts as one the draws decide."""
    x = torch.randn(5, 6, 4)
    model = SpanMask(draw)
    expected = _outputs_over_calls(model, x)
    assert len({tuple(o.flatten().tolist()) for o in expected}) > 1  # the draws change the output
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forward runs eagerly, its layers opened: named in a warning
        got = _outputs_over_calls(c, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert [b.name for b in c.layers] == ["a", "b"]


class TorchLayerDrop(nn.Module):
    """Hugging Face's LayerDrop (BART, Whisper, wav2vec2): `torch.rand([])` drawn in the forward, no traced value
    among its arguments, and a branch on it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = x + torch.tanh(self.a(x))
        dropout_probability = torch.rand([])
        if not (self.training and dropout_probability < 0.5):
            x = x + torch.tanh(self.b(x))
        return self.head(x)


def test_a_torch_draw_outside_the_traced_graph_is_drawn_anew_at_every_call():
    """torch.fx ran `torch.rand([])` once while tracing, and its graph kept that draw's branch on every call:
    the layer was never dropped (or always), silently. The trace now sees the generator move, and the forward
    is captured so that each call draws: the compiled model's outputs over calls are the module's own with the
    same torch seed, the layer dropped in some of them."""
    x = torch.randn(5, 4)
    model = TorchLayerDrop()

    def outputs(m):
        torch.manual_seed(3)
        return [m(x).detach() for _ in range(8)]
    expected = outputs(model)
    assert len({tuple(o.flatten().tolist()) for o in expected}) > 1  # the draws change the output
    c = gnfx.compile(model, optimizer="kfac", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = outputs(c)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert "TorchRandomDraw" in c.report()


class RecordedLayerDrop(LayerDrop):
    """A LayerDrop that records every number it draws."""

    def __init__(self, p: float):
        super().__init__(p, "random")
        self.drawn = []

    def forward(self, x):
        u = random.uniform(0, 1)
        self.drawn.append(u)
        return x if self.training and u < self.p else x + torch.tanh(self.lin(x))


@pytest.mark.filterwarnings("ignore:gnfx. only")
def test_the_quadratic_steps_replays_draw_the_training_forwards_python_random_numbers():
    """kfac at its defaults replays the training forward (forward-mode products, the loss at θ + s): a
    layer that draws with Python's random (an opaque call) draws the training forward's number in every
    replay, as dropout draws its masks, so the model's α, ρ are those of one sub-network; the replays
    leave the generator where the training forward did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), RecordedLayerDrop(0.5), nn.Linear(4, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", damping_every=1)
    c(x)  # the capture (its traces draw too, forced to 0 and 1 where they retrace)
    random.seed(3)
    per_step = []
    for _ in range(4):
        model[1].drawn.clear()
        loss = cross_entropy(c(x), y)
        loss.backward()
        c.step()
        c.zero_grad()
        per_step.append(list(model[1].drawn))
    assert all(len(drawn) > 1 for drawn in per_step)  # the training forward and its replays
    assert all(len(set(drawn)) == 1 for drawn in per_step), per_step
    random.seed(3)
    assert [drawn[0] for drawn in per_step] == [random.uniform(0, 1) for _ in range(4)]


def test_only_a_forward_that_draws_python_random_numbers_has_their_state_recorded_for_its_replays():
    """Recording Python's and numpy's generators costs ~0.1 ms a step: the quadratic step records them
    before the first capture (which tells) and afterwards only for a forward capture saw draw."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for model, draws in ((LayerDropNet(0.0), True), (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), False)):
        c = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", example_inputs=(x,))
        for _ in range(2):
            cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
            assert (c.optimizer.quadratic._random_state.python is not None) == draws


class FirstOfTuple(nn.Module):
    """`out = layer(x); if isinstance(out, tuple): out = out[0]`, as speechbrain's Sequential and many RNN
    wrappers write it, around one torch.nn layer, then a linear head over the flattened output."""

    def __init__(self, layer: nn.Module, width: int):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(width, 3)

    def forward(self, x):
        out = self.layer(x, x, x, need_weights=False) if isinstance(self.layer, nn.MultiheadAttention) else self.layer(x)
        if isinstance(out, tuple):
            out = out[0]
        return self.head(out.flatten(1))


def assert_loss_and_gradients_of_the_model(c, model, reference, inputs: tuple, y):
    """The compiled model `c`'s cross-entropy on (inputs, y) and every gradient equal those of `reference`, a copy
    of `model` run as its own code (float64)."""
    loss, loss_ref = cross_entropy(c(*inputs), y), cross_entropy(reference(*inputs), y)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    loss.backward()
    loss_ref.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


TUPLE_LEAVES = {  # a torch.nn leaf returning a container, its input's shape, the flattened output's width
    "GRU": (lambda: nn.GRU(4, 5, batch_first=True), (6, 3, 4), 15),
    "RNN, two layers, bidirectional": (lambda: nn.RNN(4, 5, 2, batch_first=True, bidirectional=True), (6, 3, 4), 30),
    "LSTM": (lambda: nn.LSTM(4, 5, batch_first=True), (6, 3, 4), 15),
    "LSTMCell": (lambda: nn.LSTMCell(4, 5), (6, 4), 5),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), (6, 3, 4), 12),
    "MaxPool1d with indices": (lambda: nn.MaxPool1d(2, return_indices=True), (6, 4, 4), 8),
}


@pytest.mark.parametrize("name", TUPLE_LEAVES)
def test_a_torch_nn_layer_returning_a_tuple_is_traced_as_the_tuple_it_returns(name):
    """torch.fx records a torch.nn leaf's call as one value, so the trace took `isinstance(out, tuple)` as False:
    the graph passed the whole tuple on and failed at its first call ("'tuple' object has no attribute
    'flatten'"), and an attention layer's parameters, read through no indexing, fell back to diag. Traced as
    the tuple the layer returns (passes/leaf_outputs.py `torch_nn_structure`), the graph computes the model: the
    output and every gradient equal the model's own, and the layer's parameters are in curvature blocks."""
    make, shape, width = TUPLE_LEAVES[name]
    torch.manual_seed(0)
    model = FirstOfTuple(make(), width).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    c = gnfx.compile(model, "kfac", lr=1e-2)
    assert c.layers.form == "fx"
    assert_loss_and_gradients_of_the_model(c, model, reference, (x,), y)
    covered, total = c.layers.coverage(dict(model.named_parameters()))
    assert covered == total, c.layers.fallbacks
    c.step()


class MaskedWhenTensor(nn.Module):
    """A forward that tests its inputs' and its intermediates' types with Python's isinstance, which torch.fx
    answers False for every traced value: the mask and the scaling are left out of the traced graph."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, mask=None):
        if isinstance(mask, torch.Tensor):
            x = x * mask
        h = torch.tanh(self.inner(x))
        if isinstance(h, torch.Tensor):
            h = 2 * h
        return self.head(h)


def _masked_call():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return x, (torch.rand(8, 4, generator=g) > 0.5).double(), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("example", [False, True])
def test_a_traced_graph_that_computes_another_function_than_the_forward_is_captured_by_export(example):
    """torch.fx traced MaskedWhenTensor whole, without its mask and its scaling, and the graph ran on the
    statistic steps, silently: another loss, other gradients, statistics of another model. The graph is checked
    against the forward on the first call it serves (passes/trace_check.py), at compile with example inputs or
    at the first training call, and the call is captured with torch.export: the loss, every gradient and the
    K-FAC factors (against hooks on the model itself) are the model's."""
    torch.manual_seed(0)
    model = MaskedWhenTensor().double()
    reference = copy.deepcopy(model)
    x, mask, y = _masked_call()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_decay=0.0,
                     **({"example_inputs": (x, mask)} if example else {}))
    assert c.layers.form == ("export" if example else "fx")
    loss = cross_entropy(c(x, mask), y)
    assert c.layers.form == "export" and "computes another function" in c.layers.capture
    head = {}
    reference.head.register_forward_hook(lambda _, inputs, out: head.update(a=inputs[0].detach()))
    loss_ref = cross_entropy(reference(x, mask), y)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    loss.backward()
    loss_ref.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    c.step()
    a = torch.cat([head["a"], torch.ones(8, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(c.statistics("head")["A"], a.T @ a / 8, rtol=1e-10, atol=1e-12)


def test_a_traced_graph_that_differs_from_the_forward_under_capture_fx_raises_saying_where():
    x, mask, _ = _masked_call()
    c = gnfx.compile(MaskedWhenTensor().double(), "kfac", lr=1e-2, capture="fx")
    with pytest.raises(gnfx.CaptureError, match=r"computes another function than its forward on this call: the "
                                                 r"output differs by up to .*isinstance\(x, torch.Tensor\)"):
        c(x, mask)


class MaskedWhenTensorInput(MaskedWhenTensor):
    """MaskedWhenTensor's forward without its test of the intermediate's type: a call that leaves the mask out
    is traced right (the mask fixed to None), one that passes it is not (the mask a placeholder)."""

    def forward(self, x, mask=None):
        if isinstance(mask, torch.Tensor):
            x = x * mask
        return self.head(torch.tanh(self.inner(x)))


def test_a_form_of_call_whose_traced_graph_differs_after_the_first_step_runs_the_forward_and_warns():
    """gnfx.compile traces the forward with the mask a placeholder (the graph leaves it out); the first call
    leaves the mask out, a form traced with it fixed to None, whose graph computes the model, and the model
    steps; the first call with a mask is the compile-time graph's first: checked, it differs, and with a step
    taken that form runs the model's own forward."""
    torch.manual_seed(0)
    model = MaskedWhenTensorInput().double()
    reference = copy.deepcopy(model)
    x, mask, y = _masked_call()
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1)
    cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()
    reference.load_state_dict(model.state_dict())
    assert c.layers.form == "fx"
    with pytest.warns(RuntimeWarning, match="computes another function"):
        out = c(x, mask)
    torch.testing.assert_close(out, reference(x, mask), rtol=0, atol=1e-12)
    assert c.layers.form == "fx"


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x /= 2
        return self.head(x)


def test_the_check_of_a_traced_graph_runs_on_copies_of_inputs_the_forward_changes_in_place():
    """The check's two runs (the forward's, the graph's) on the call's own input tensors divided a forward's
    `x /= 2` input three times, and the graph, run on the input the first had divided, differed."""
    torch.manual_seed(0)
    model = ScalesItsInput()
    expected = model(torch.ones(5, 4))
    x = torch.ones(5, 4)
    c = gnfx.compile(model, "kfac", lr=1e-2)
    torch.testing.assert_close(c(x), expected)
    assert c.layers.form == "fx" and x.min() >= 0.5  # divided once, as the forward does, or not at all (the graph)


class DistilledStudent(nn.Module):
    """Layers run without gradient recording inside the forward (a distillation teacher, a frozen feature
    extractor under a probe): under torch.no_grad, in a method it decorates, under torch.inference_mode."""

    def __init__(self):
        super().__init__()
        self.teacher, self.frozen, self.student = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.probe = nn.Linear(4, 4)

    @torch.no_grad()
    def features(self, x):
        return torch.relu(self.frozen(x))

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        with torch.inference_mode():
            u = torch.sigmoid(self.probe(x))
        return self.student(x + t + self.features(x) + u.clone())


def test_a_teacher_the_forward_runs_without_gradient_recording_gets_no_gradient_and_no_step():
    """torch.fx ran `with torch.no_grad():` once while tracing and did not record it: the graph computed the
    teacher with gradients, which the student's loss reached, and the optimizer stepped it, silently. The
    switches are nodes of the graph (passes/grad_modes.py): the teacher and the frozen layer get no gradient
    and keep their weights; the student's gradient is the model's."""
    torch.manual_seed(0)
    model = DistilledStudent().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = gnfx.compile(model, "kfac", lr=1e-2)
    assert c.layers.form == "fx"
    # no blocks (no statistics, no factors) for what gets no gradient, and no warning of low coverage about them
    assert [b.name for b in c.layers] == ["student"]
    assert {f.param: f.reason.split(" (node")[0] for f in c.layers.fallbacks} == {
        f"{layer}.{p}": "read inside a torch.no_grad() region" for layer in ("teacher", "frozen", "probe")
        for p in ("weight", "bias")}
    assert not [w for w in caught if "curvature blocks" in str(w.message)]
    cross_entropy(c(x), y).backward()
    cross_entropy(reference(x), y).backward()
    assert all(p.grad is None for m in (model.teacher, model.frozen, model.probe) for p in m.parameters())
    torch.testing.assert_close(model.student.weight.grad, reference.student.weight.grad, rtol=0, atol=1e-12)
    c.step()
    for m, r in ((model.teacher, reference.teacher), (model.frozen, reference.frozen), (model.probe, reference.probe)):
        torch.testing.assert_close(m.weight, r.weight, rtol=0, atol=0)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("hook", ["forward", "forward_pre"])
def test_hooks_registered_on_the_model_itself_are_part_of_what_it_computes(hook):
    """torch.fx traces the model's forward method, not its call: a hook on the model itself (an output scaling,
    an input normalization) was left out of the graph, which trained another function on the statistic steps,
    silently. The check of the first call (passes/trace_check.py) finds it, and torch.export captures the call."""
    torch.manual_seed(0)
    model = MLP().double()
    if hook == "forward":
        model.register_forward_hook(lambda _, __, out: 2 * out)
    else:
        model.register_forward_pre_hook(lambda _, inputs: (3 * inputs[0],))
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert_loss_and_gradients_of_the_model(gnfx.compile(model, "kfac", lr=1e-2), model, reference, (x,), y)
