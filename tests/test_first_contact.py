"""What a new user's training loop does to a compiled model, second round (benchmarks/results/first_contact_2.md):
each test failed before its fix.

- `.double()` / `.to(dtype)` after steps were taken: the optimizer's state follows the parameters as a
  checkpoint loaded into the moved model would;
- a parameter without a gradient (frozen after compile, an expert no example was routed to) keeps its
  value, as torch.optim skips it, whatever the preconditioner;
- `copy.deepcopy` and pickling of the compiled model raise a GnfxError naming the fix (they used to
  crash inside torch.optim or pickle);
- gnfx.ggn and gnfx.diagnose on a model with an operation without a forward-mode derivative raise the
  GnfxError the quadratic step raises;
- loss="cross_entropy" with a loss that is not the mean cross-entropy of the last dimension of the
  first output (features returned first, an (N, C, H, W) segmentation output, reduction="sum") is
  named at the first step (the backward cannot tell it from a GradScaler's scaled loss), where it was
  modelled wrongly, silently;
- torch.amp.GradScaler: gradient-only plans unscale and skip overflowing steps (every plan: tests/test_amp.py);
- nn.Embedding(sparse=True) is refused at compile; a model returning only its loss is told the fix.
The exported nn.MultiheadAttention (tests/test_attention.py) and nn.InstanceNorm (tests/test_layer_kinds.py)
are tested with their kinds.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import itertools
import math
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.utils.prune
import torch.nn.functional as F
from torch import nn

import gnfx
from models import GridSampled
from references import per_example_grads
from steps import compile_for_statistics, statistic_step, train as train_on


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def train(c, steps, dtype=torch.float32):
    x, y = batch(dtype)
    for _ in range(steps):
        F.cross_entropy(c(x), y).backward()
        c.step()
        c.zero_grad()


HPARAMS = {  # diag and muon keep AdamW's moments like the parameter; ekfac and kfac their factors by the rule
    "diag": dict(lr=0.05),
    "muon": dict(lr=0.02),
    "ekfac": dict(lr=0.05, stat_every=1, refresh_warmup=0),
    "kfac": dict(loss="cross_entropy", stat_every=1),  # and the quadratic step's δ
}


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_moving_the_model_after_steps_moves_the_state_as_a_checkpoint_loads(name):
    """.double() after two float32 steps, then three float64 steps: the same parameters as a float64
    model compiled anew into which the float32 model's checkpoint was loaded."""
    torch.manual_seed(0)
    model = MLP()
    c = gnfx.compile(model, name, **HPARAMS[name])
    train(c, 2)
    checkpoint = copy.deepcopy((model.state_dict(), c.optimizer.state_dict()))
    c.double()
    train(c, 3, torch.float64)

    reference = gnfx.compile(MLP().double(), name, **HPARAMS[name])
    reference.load_state_dict(checkpoint[0])
    reference.optimizer.load_state_dict(checkpoint[1])
    train(reference, 3, torch.float64)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "shampoo", "soap", "rank1", "muon"])
def test_a_parameter_without_a_gradient_keeps_its_value(name):
    """Frozen after compile: its gradient stays None, and momentum (or grafting) must not move it."""
    torch.manual_seed(0)
    model = MLP()
    c = gnfx.compile(model, name, lr=0.05)
    train(c, 2)
    model.a.requires_grad_(False)
    frozen, trained = [p.detach().clone() for p in model.a.parameters()], model.b.weight.detach().clone()
    train(c, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.a.parameters(), frozen))
    assert not torch.equal(model.b.weight, trained)


@pytest.mark.parametrize("name", ["kfac", "shampoo", "rank1"])
def test_a_bias_without_a_gradient_keeps_its_value_and_its_weight_steps_as_with_a_zero_bias_gradient(name):
    """A piece [W b] whose b has no gradient: the parameter write leaves b out (nothing is copied back),
    and W takes exactly the step of a twin whose b has a zero gradient (b's momentum moves the twin's b;
    one step, after which the twins' forwards differ)."""
    models = []
    for frozen in (True, False):
        torch.manual_seed(0)
        model = MLP()
        c = gnfx.compile(model, name, lr=0.05)
        train(c, 2)
        model.a.bias.requires_grad_(not frozen)
        bias = model.a.bias.detach().clone()
        x, y = batch()
        F.cross_entropy(c(x), y).backward()
        if not frozen:
            model.a.bias.grad.zero_()
        c.step()
        assert torch.equal(model.a.bias, bias) == frozen
        models.append(model)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert n == "a.bias" or torch.equal(p, q), n


def test_pickling_the_compiled_model_names_the_fix():
    model = MLP()
    c = gnfx.compile(model, "kfac", lr=0.05)
    train(c, 1)
    for attempt in (lambda: pickle.dumps(c), lambda: torch.save(c, io.BytesIO())):
        with pytest.raises(gnfx.GnfxError, match=r"cannot be pickled.*Fix: save that model"):
            attempt()


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_an_ema_of_the_compiled_model_averages_its_parameters_and_buffers(name):
    """torch.optim.swa_utils.AveragedModel (and timm's ModelEma) deep-copy the model they are given, the
    compiled one in a training script that replaced its model by gnfx.compile's: the copy is the original
    module's (a GnfxError before), and the average follows the compiled model's parameters and batch-norm
    buffers, compared with an EMA written out by hand over the same steps."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    c = gnfx.compile(model, name, lr=0.05)
    with pytest.warns(RuntimeWarning, match="copy.deepcopy of a compiled model returns a copy of the module"):
        ema = AveragedModel(c, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    assert type(ema.module) is nn.Sequential and not any(p is q for p, q in zip(ema.parameters(), c.parameters()))
    def floating(module):
        return {n: t.detach() for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
                if t.is_floating_point()}

    expected = None  # the first update copies, the later ones average with weight 0.1 on the model
    for _ in range(3):
        train(c, 1)
        ema.update_parameters(c)
        current = {n: t.clone() for n, t in floating(model).items()}
        expected = current if expected is None else {n: 0.9 * expected[n] + 0.1 * current[n] for n in current}
    averaged = floating(ema.module)
    assert averaged.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(averaged[n], expected[n], msg=n)
    x, _ = batch()
    ema.eval()
    torch.testing.assert_close(ema(x), torch.func.functional_call(copy.deepcopy(model).eval(), expected, (x,)))


def test_ggn_products_and_diagnose_through_an_operation_without_jvp_raise_the_quadratic_steps_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), GridSampled(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    v = [torch.randn_like(p) for p in model.parameters()]
    message = r"(?s)gnfx.ggn .*forward-mode derivatives.*grid_sampler_2d.*Fix: measure a model without"
    for product in (gnfx.ggn.ggn_vp, gnfx.ggn.fisher_vp, gnfx.ggn.hvp):
        with pytest.raises(gnfx.GnfxError, match=message):
            product(model, "cross_entropy", x, y, v)
    c = gnfx.compile(model, "kfac", lr=0.1)
    F.cross_entropy(c(x), y).backward()
    c.step()
    with pytest.raises(gnfx.GnfxError, match=message):
        gnfx.diagnose(c, (x, y), loss="cross_entropy")


class FeaturesFirst(MLP):
    """Returns (features, logits), as models that expose an embedding do: the logits are not first."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h, self.b(h)


def segmentation_net():
    """Classes on dimension 1 of an (N, C, H, W) output, as F.cross_entropy takes them."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))


@pytest.mark.parametrize("case", ["features first", "classes on neither axis", "summed"])
@pytest.mark.parametrize("name", ["kfac", "rank1"])
def test_a_loss_that_is_not_the_mean_cross_entropy_of_the_classes_of_the_first_output_is_named(case, name):
    """loss='cross_entropy' models the mean softmax cross-entropy over the classes of the first output
    (its last dimension, or dimension 1 of an (N, C, H, W) one): these losses are not that, and gnfx used
    to model them as if they were, silently (the summed one stalled kfac's quadratic step at a loss of
    1.375 where the mean reached 0.12)."""
    torch.manual_seed(0)
    if case == "classes on neither axis":  # an (N, C, H, W) output's cross-entropy over H
        c = gnfx.compile(segmentation_net(), name, loss="cross_entropy")
        x, y = torch.randn(2, 2, 5, 6), torch.randint(0, 5, (2 * 3 * 6,))
        loss = lambda: F.cross_entropy(c(x).transpose(2, 3).reshape(-1, 5), y)  # noqa: E731
    else:
        c = gnfx.compile(FeaturesFirst() if case == "features first" else MLP(), name, loss="cross_entropy")
        x, y = batch()
        loss = (lambda: F.cross_entropy(c(x)[1], y)) if case == "features first" else (  # noqa: E731
            lambda: F.cross_entropy(c(x), y, reduction="sum"))
    what = "not one of a mean" if case == "summed" else "not one of a cross-entropy over that dimension"
    loss().backward()  # (the check of a gradient that fails it is told at the step, which knows a GradScaler's scale)
    with pytest.raises(gnfx.GnfxError, match=rf"(?s){what}.*Fix: return the logits"):
        c.step()


class ClassesLast(nn.Module):
    """A model's (N, C, H, W) output with its classes moved last, (N, H, W, C): the form whose mean
    cross-entropy F.cross_entropy(z.reshape(-1, C), y.reshape(-1)) is the (N, C, H, W) output's
    F.cross_entropy(z, y), term for term."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).movedim(1, -1)


@pytest.mark.parametrize("name, options", [("kfac", {}), ("ekfac", {}), ("rank1", {}), ("kfac", {"fisher": "type2"}),
                                           ("kfac", {"quadratic_rows": 20}), ("diag", {"step": "quadratic"})])
def test_an_n_c_h_w_output_under_f_cross_entropy_trains_as_its_classes_last_form(name, options):
    """A segmentation model's (N, C, H, W) logits under F.cross_entropy(z, y), the classes on dimension 1
    (with ignored targets): every statistic (T = H·W rows per example, the sampled or exact Fisher of
    each pixel's softmax), the quadratic step's GGN and ρ are those of the same net whose output is moved
    to (N, H, W, C) and whose loss is the flattened rows' F.cross_entropy: the parameters agree to
    float64 rounding after six steps. (gnfx raised a GnfxError for this loss before, asking for the
    movedim.)"""
    def net():
        torch.manual_seed(0)
        return segmentation_net().double()

    # forward-mode products: finite differences (the default's) would amplify the two nets' rounding to ~1e-8
    channels_first = gnfx.compile(net(), name, loss="cross_entropy", quadratic_products="forward", **options)
    classes_last = gnfx.compile(ClassesLast(net()), name, loss="cross_entropy", quadratic_products="forward",
                                **options)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (3, 5, 6), generator=g)
        y[0, 0, :2] = -100
        torch.manual_seed(step)  # the same sampled labels for both
        F.cross_entropy(channels_first(x), y).backward()
        channels_first.step()
        channels_first.zero_grad()
        torch.manual_seed(step)
        F.cross_entropy(classes_last(x).reshape(-1, 3), y.reshape(-1)).backward()
        classes_last.step()
        classes_last.zero_grad()
    assert channels_first.optimizer.logits.classes_axis == 1 and classes_last.optimizer.logits.classes_axis == -1
    for (n, p), q in zip(channels_first.named_parameters(), classes_last.parameters()):
        assert not torch.equal(p, net().state_dict()[n]), n  # it trained
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("resized", [False, True])
def test_a_dense_cross_entropy_of_resized_logits_is_named(resized):
    """Segformer's loss is the cross-entropy of its (N, C, h, w) logits upsampled to the (N, H, W) masks:
    its gradient at z sums to zero over dimension 1 too, with soft implied targets, which gnfx would model
    as the cross-entropy of z itself, silently. It warns; the cross-entropy of z with hard masks and
    ignored pixels (torchvision's models) does not."""
    torch.manual_seed(0)
    c = gnfx.compile(segmentation_net(), "kfac", loss="cross_entropy")
    x = torch.randn(2, 2, 4, 6)
    masks = torch.randint(0, 3, (2, 8, 12) if resized else (2, 4, 6))
    masks[:, :1] = 255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = c(x)
        z = F.interpolate(z, size=masks.shape[1:], mode="bilinear", align_corners=False) if resized else z
        F.cross_entropy(z, masks, ignore_index=255).backward()
        c.step()  # (a check that warns is told at the step)
    said = [str(w.message) for w in caught if "are not one-hot" in str(w.message)]
    assert len(said) == resized and c.optimizer.logits.classes_axis == 1
    if resized:
        assert "Segformer" in said[0] and "model.step(closure)" in said[0]


def test_the_classes_axis_is_told_by_the_first_gradient_that_tells_it():
    """LogitsLayout: the axis whose sums of a cross-entropy's gradient vanish is the classes'; an all-zero
    gradient (every target ignored) leaves it open, and a 2-dimensional output has its classes last."""
    from gnfx.outputs import LogitsLayout
    z = torch.randn(2, 3, 4, 5)
    layout = LogitsLayout()
    layout.settle(z, torch.zeros_like(z))
    assert layout.classes_axis is None
    y = torch.randint(0, 3, (2, 4, 5))
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    layout.settle(z, grad)
    assert layout.classes_axis == 1
    assert layout.classes_last(z).shape == (2, 4, 5, 3) and torch.equal(layout.as_output(layout.classes_last(z)), z)
    (grad,) = torch.autograd.grad(F.cross_entropy(z.reshape(-1, 5), torch.randint(0, 5, (24,))), z)
    last = LogitsLayout()
    last.settle(z, grad)
    assert last.classes_axis == -1
    flat = LogitsLayout()
    flat.settle(z[:, :, 0, 0], torch.zeros(2, 3))
    assert flat.classes_axis == -1


@pytest.mark.parametrize("variant", ["plain", "label smoothing", "class weights", "ignored rows", "soft targets",
                                     "bfloat16 autocast"])
def test_every_form_of_cross_entropy_passes_the_check(variant):
    torch.manual_seed(0)
    c = gnfx.compile(MLP(), "kfac", loss="cross_entropy")
    x, y = batch()
    kwargs = {"label smoothing": dict(label_smoothing=0.1), "class weights": dict(weight=torch.tensor([1., 2., 3.]))}
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bfloat16 autocast"):
            z = c(x)
        target = {"ignored rows": y.masked_fill(torch.arange(8) < 3, -100),
                  "soft targets": torch.softmax(torch.randn(8, 3), -1)}.get(variant, y)
        F.cross_entropy(z.float(), target, **kwargs.get(variant, {})).backward()
        c.step()
        c.zero_grad()


@pytest.mark.parametrize("name", ["shampoo", "diag"])
def test_grad_scaler_steps_as_training_without_it_and_skips_non_finite_steps(name):
    """scaler.step(optimizer) lets the optimizer unscale (a power-of-two scale: exactly); a step whose
    gradients overflowed moves nothing."""
    x, y = batch()
    runs = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = MLP()
        c = gnfx.compile(model, name, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for _ in range(3):
            loss = F.cross_entropy(c(x), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(c.optimizer)
                scaler.update()
            else:
                loss.backward()
                c.step()
            c.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
        if scaled:
            F.cross_entropy(c(x), y).backward()
            model.a.weight.grad[0, 0] = float("inf")
            scaler.step(c.optimizer)
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), runs[-1]))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_sparse_embedding_gradients_are_refused_at_compile():
    """nn.Embedding(sparse=True) crashed every preconditioner's first step with torch's 'SparseCPU' error."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(gnfx.ConfigError, match=r"'0' \(Embedding\) has sparse=True.*sparse=False"):
        gnfx.compile(model, "diag", lr=0.1)


def test_a_model_that_returns_only_its_loss_names_the_fix_for_the_sampled_fisher():
    class LossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = MLP()

        def forward(self, x, y):
            return F.cross_entropy(self.m(x), y)

    c = gnfx.compile(LossOnly(), "kfac", loss="cross_entropy")
    with pytest.raises(gnfx.GnfxError, match=r"got a 0-dimensional tensor. Fix: return the logits too"):
        c(*batch())



@pytest.mark.parametrize("margin", [15.0, 18.0, 20.0, 25.0])
def test_the_cross_entropy_check_passes_a_model_that_is_nearly_certain(margin):
    """Late in training p_y - 1 is a rounding error: at a margin of 18 (loss 3e-7 in float32) the
    rows of the gradient sum to 7% of its absolute values, at 25 (loss 0) p_y is 1 and every row
    sums to its other classes' p_c; the check must not stop such a run."""
    from gnfx.outputs import CROSS_ENTROPY_TOLERANCE, check_cross_entropy_gradient
    torch.manual_seed(0)
    y = torch.randint(0, 10, (256,))
    z = (torch.randn(256, 10) + margin * F.one_hot(y, 10)).requires_grad_()
    grad, = torch.autograd.grad(F.cross_entropy(z, y), z)
    rows = grad.double()
    relative_alone_fails = bool(rows.sum(-1).abs().sum() > CROSS_ENTROPY_TOLERANCE * rows.abs().sum())
    assert relative_alone_fails == (margin > 15.0)  # at 15 rounding is still within the relative test
    check_cross_entropy_gradient(z, grad)


# --------------------------------------------------------------------------- third round
# (benchmarks/results/first_contact_3.md)


class Checkpointed(nn.Module):
    """A hidden block under torch.utils.checkpoint, as Hugging Face's gradient_checkpointing_enable
    runs each layer (`checkpoint=None`: the same model without it)."""

    def __init__(self, reentrant):
        super().__init__()
        self.a, self.block, self.c = nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.c(h)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_trains_as_the_model_without_it(capture, reentrant):
    """K-FAC at defaults (statistics and the quadratic step, fisher='mc'), float64: the statistics and
    parameters of 3 steps equal those of the same model without checkpointing. With use_reentrant=True
    torch.export captured the checkpointed block as a no-grad region (the loss did not require grad)
    and the quadratic step had no forward-mode derivative of torch's CheckpointFunction."""
    x, y = batch(torch.float64)
    runs = []
    for reentrant_or_none in (reentrant, None):
        torch.manual_seed(0)
        model = Checkpointed(reentrant_or_none).double()
        c = gnfx.compile(model, "kfac", loss="cross_entropy", capture=capture, stat_every=1)
        for step in range(3):
            torch.manual_seed(step)  # the same sampled labels of fisher="mc" in both runs
            F.cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
        runs.append(([p.detach().clone() for p in model.parameters()], c.statistics("block.0")))
    (params, stats), (reference, reference_stats) = runs
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for key in reference_stats:
        torch.testing.assert_close(stats[key], reference_stats[key], rtol=1e-10, atol=1e-12)


class WeightNormed(nn.Module):
    """wav2vec2's positional convolution: a grouped Conv1d under weight normalization over its last
    kernel dimension (dim=2), then a weight-normalized Linear (dim=0)."""

    def __init__(self, parametrization):
        super().__init__()
        norm = (nn.utils.parametrizations.weight_norm if parametrization else nn.utils.weight_norm)
        self.conv = norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), name="weight", dim=2)
        self.head = norm(nn.Linear(4 * 5, 3), name="weight", dim=0)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("parametrization", [True, False], ids=["parametrizations", "utils"])
def test_weight_norm_has_exact_forward_mode_products_and_the_quadratic_step_trains(parametrization):
    """torch's fused weight-norm kernel has no forward-mode derivative (the quadratic step and gnfx.ggn
    raised); gnfx.composite_forms writes it out. G v of gnfx.ggn equals Jᵀ H J v with J from reverse mode
    through torch's own kernel (float64), and kfac at defaults lowers the loss."""
    warnings_context = pytest.warns(FutureWarning) if not parametrization else contextlib.nullcontext()
    torch.manual_seed(0)
    with warnings_context:
        model = WeightNormed(parametrization).double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    z = model(x)
    rows = [torch.autograd.grad(z.flatten()[i], params, retain_graph=True) for i in range(z.numel())]
    J = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])  # reverse mode, fused kernel
    p = torch.softmax(z.detach(), -1)
    H = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / len(z)
    expected = J.T @ H @ J @ torch.cat([t.flatten() for t in v])
    product = gnfx.ggn.ggn_vp(model, "cross_entropy", x, y, v)
    torch.testing.assert_close(torch.cat([t.flatten() for t in product]), expected, rtol=1e-10, atol=1e-12)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old API's FutureWarning
        c = gnfx.compile(model, "kfac", loss="cross_entropy")
    losses = train_on(c, x, y, F.cross_entropy, 4)
    assert losses[-1] < losses[0]


class SpectralNormed(nn.Module):
    """An SNGAN discriminator's layers: a Conv1d and a Linear under spectral normalization."""

    def __init__(self, parametrization):
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if parametrization else nn.utils.spectral_norm
        self.conv = norm(nn.Conv1d(2, 4, 3))
        self.head = norm(nn.Linear(4 * 3, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def spectral_parts(layer, parametrization):
    """(W, u, v) of a spectrally normalized layer: its unnormalized weight and power-iteration vectors."""
    if parametrization:
        return layer.parametrizations.weight.original, layer.parametrizations.weight[0]._u, \
            layer.parametrizations.weight[0]._v
    return layer.weight_orig, layer.weight_u, layer.weight_v


def fixed_vector_model(x, conv, head, vectors):
    """SpectralNormed's output written out with the given (u, v) of each layer: W / σ, σ = uᵀ W v."""
    (u1, v1), (u2, v2) = vectors
    (w1, b1), (w2, b2) = conv, head
    w1 = w1 / (u1 @ (w1.flatten(1) @ v1))
    w2 = w2 / (u2 @ (w2 @ v2))
    return F.linear(torch.tanh(F.conv1d(x, w1, b1)).flatten(1), w2, b2)


@pytest.mark.parametrize("parametrization", [True, False], ids=["parametrizations", "utils"])
def test_spectral_norm_replays_take_the_training_forwards_singular_vectors(parametrization):
    """In training mode spectral norm's power iteration writes u, v in place (`out=`, no forward-mode
    derivative: the quadratic step and gnfx.ggn raised); replays run it without, on the u, v the
    training forward left (gnfx.composite_forms). Float64: the quadratic step's products (z, J v) equal
    the training forward's output and torch.func.jvp of the model written out with those u, v; gnfx.ggn's
    G v equals Jᵀ H J v with that model's Jacobian; neither moves u, v."""
    from torch.func import jacrev, jvp

    from gnfx.forward_mode import ModuleFunction, jvp_rows
    torch.manual_seed(0)
    model = SpectralNormed(parametrization).double()
    x, y = torch.randn(6, 2, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    trained = model(x).detach()  # the training forward: one power iteration, then σ from the new u, v
    layers = [spectral_parts(m, parametrization) for m in (model.conv, model.head)]
    vectors = [(u.clone(), v.clone()) for _, u, v in layers]
    params = [layers[0][0], model.conv.bias, layers[1][0], model.head.bias]
    names = {id(p): n for n, p in model.named_parameters()}
    theta = [p.detach() for p in params]
    v = [torch.randn_like(p) for p in theta]

    def reference(*theta):
        return fixed_vector_model(x, theta[:2], theta[2:], vectors)

    z, products = jvp_rows(lambda t: ModuleFunction(model, [names[id(p)] for p in params])(t, x), theta, [v])
    torch.testing.assert_close(z, trained, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z, reference(*theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(products[0], jvp(reference, tuple(theta), tuple(v))[1], rtol=1e-10, atol=1e-12)

    order = [names[id(p)] for p in params]
    named_v = dict(zip(order, v))
    ggn_order = [n for n, _ in model.named_parameters()]
    product = gnfx.ggn.ggn_vp(model, "cross_entropy", x, y, [named_v[n] for n in ggn_order])
    J = torch.cat([j.flatten(2) for j in jacrev(reference, argnums=(0, 1, 2, 3))(*theta)], -1).flatten(0, 1)
    q = torch.softmax(trained, -1)
    H = torch.block_diag(*[torch.diag(r) - torch.outer(r, r) for r in q]) / len(q)
    expected = J.T @ H @ J @ torch.cat([t.flatten() for t in v])
    product = dict(zip(ggn_order, product))
    torch.testing.assert_close(torch.cat([product[n].flatten() for n in order]), expected, rtol=1e-10, atol=1e-12)
    for (_, u, v_), (u0, v0) in zip(layers, vectors):
        assert torch.equal(u, u0) and torch.equal(v_, v0)


@pytest.mark.parametrize("parametrization", [True, False], ids=["parametrizations", "utils"])
def test_kfac_at_defaults_trains_a_spectrally_normalized_model_whose_vectors_only_its_forwards_move(parametrization):
    """kfac at defaults (the quadratic step, whose replays used to raise) lowers the loss, and after 4
    steps u, v are those of one power iteration per training forward on the weights it saw (u ←
    normalize(W v), v ← normalize(Wᵀu); the old API updates v first): the replays (products, the
    forward at θ + s) do not advance it."""
    torch.manual_seed(0)
    model = SpectralNormed(parametrization).double()
    x, y = torch.randn(6, 2, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    layers = [spectral_parts(m, parametrization) for m in (model.conv, model.head)]
    expected = [(u.clone(), v.clone()) for _, u, v in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning: normalized weights are computed, not parameters
        c = gnfx.compile(model, "kfac", loss="cross_entropy")
    losses = []
    for _ in range(4):
        for k, (w, _, _) in enumerate(layers):  # the power iteration the training forward runs next
            u, v = expected[k]
            W = w.detach().flatten(1)
            if parametrization:  # u first
                u = F.normalize(W @ v, dim=0, eps=1e-12)
                expected[k] = (u, F.normalize(W.T @ u, dim=0, eps=1e-12))
            else:  # v first
                v = F.normalize(W.T @ u, dim=0, eps=1e-12)
                expected[k] = (F.normalize(W @ v, dim=0, eps=1e-12), v)
        losses += train_on(c, x, y, F.cross_entropy, 1)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0], losses
    for (_, u, v), (u0, v0) in zip(layers, expected):
        torch.testing.assert_close(u, u0, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(v, v0, rtol=1e-12, atol=1e-14)


class NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


@pytest.mark.parametrize("name", ["kfac", "ekfac", "shampoo", "soap", "rank1", "muon"])
def test_biases_and_norms_in_a_param_group_without_weight_decay_are_not_decayed(name):
    """The torch.optim recipe (no weight decay on biases and norm parameters), written on the compiled
    model's optimizer: a block's bias used to take the weight's group (decay and lr), silently. With
    zero gradients a step is the decay alone: the weights shrink by exactly (1 - ηλ), the rest stays;
    a group at lr 0 keeps its parameters while the others train."""
    torch.manual_seed(0)
    model = NormedMLP()
    c = gnfx.compile(model, name, lr=0.05, weight_decay=0.5)
    group = c.optimizer.param_groups[0]
    undecayed = [p for p in group["params"] if p.dim() < 2]
    group["params"] = [p for p in group["params"] if p.dim() >= 2]
    c.optimizer.add_param_group({"params": undecayed, "weight_decay": 0.0})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c(batch()[0])  # the capture; a first step, with no momentum yet
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    c.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n] * (1 - 0.05 * 0.5) if p.dim() >= 2 else before[n], rtol=1e-6, atol=0)
    c.zero_grad()
    c.optimizer.param_groups[1]["lr"] = 0.0
    train(c, 2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.dim() < 2)
    assert not torch.equal(model.a.weight, before["a.weight"] * (1 - 0.05 * 0.5))


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2's projections): W stored (d_in, d_out), applied to the flattened rows."""

    def __init__(self, d_out, d_in):
        super().__init__()
        self.d_out = d_out
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.d_out,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Conv1DMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(6, 4), Conv1D(3, 6)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def test_hugging_face_conv1d_has_per_example_statistics():
    """Its input x.view(-1, d_in) folds the examples into rows: ekfac's and rank1's per-example diagonal
    was the whole batch's (with a warning). torch.export's graph is rewritten to the linear map of the
    batch-first input (passes/unflatten.py): diag equals the per-example gradients' (vmap), float64."""
    from references import TOL, per_example_fisher_diag
    torch.manual_seed(0)
    model = Conv1DMLP().double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5, 3))
    diags = per_example_fisher_diag(model, x, y)
    c = gnfx.compile(model, "kfac", lr=1e-2, capture="export", stat_every=1, stat_decay=0.0, statistics=("diag",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "its input's first dimension ... is not the batch"
        F.cross_entropy(c(x).reshape(-1, 3), y.reshape(-1)).backward()
        c.step()
    for name in ("c_fc", "c_proj"):
        expected = torch.cat([diags[f"{name}.weight"].T, diags[f"{name}.bias"][:, None]], dim=1)  # [W b], W = Pᵀ
        torch.testing.assert_close(c.statistics(name)["diag"], expected, **TOL)


class SharedPositions(nn.Module):
    """Token and position embeddings as Hugging Face's GPT-2 (`arange(T).unsqueeze(0)`, shared by the
    batch, `shared="batch of one"`) or nanoGPT (`arange(T)`, `shared="no batch dimension"`) look them up."""

    def __init__(self, shared):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 3)
        self.shared = shared

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        if self.shared == "batch of one":
            return self.head(torch.tanh(self.wte(ids) + self.wpe(positions.unsqueeze(0))))
        return self.head(torch.tanh(self.wpe(positions) + self.wte(ids)))  # the positions' lookup first


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("shared", ["batch of one", "no batch dimension"])
def test_a_position_embedding_shared_by_the_batch_has_per_example_statistics(shared, capture):
    """wpe's output was (1, T, d) or (T, d), broadcast onto the batch: its gradient was the batch's sum,
    and ekfac's and rank1's per-example diagonal took the whole batch as one example (with a warning).
    The graph looks up the positions expanded to the batch (passes/shared_positions.py; torch.fx's
    without shapes, at run time): the outputs are the model's, and diag equals the per-example
    gradients' (vmap), float64."""
    torch.manual_seed(0)
    _assert_position_diag_is_per_example(SharedPositions(shared).double(), "wpe.weight", capture)


def _assert_position_diag_is_per_example(model, param: str, capture: str):
    """Compile `model` (token ids (6, 5) to 3 classes per token) with the per-example diagonal
    collected; its outputs on one step equal the model's, without the whole-batch warning, and the
    diag of its block `wpe` equals the per-example gradients' of `param` (vmap), float64. Returns
    the compiled model."""
    from references import TOL, per_example_fisher_diag
    ids, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6, 5))
    expected = per_example_fisher_diag(model, ids, y)[param].T  # [d x V]
    c = gnfx.compile(model, "kfac", lr=1e-2, capture=capture, stat_every=1, stat_decay=0.0, statistics=("diag",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "its input's first dimension ... is not the batch"
        out = c(ids)
        torch.testing.assert_close(out, model(ids), rtol=0, atol=0)
        F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
        c.step()
    torch.testing.assert_close(c.statistics("wpe")["diag"], expected, **TOL)
    return c


class Lookups(nn.Module):
    """Embedding lookups added to tensors: token and shared (T,) position lookups (nanoGPT), the same
    with positions that scale their gradient by the indices' frequency, positions added to an
    activation, and tokens added to a number."""

    def __init__(self):
        super().__init__()
        self.tokens, self.table = nn.Parameter(torch.randn(7, 4)), nn.Parameter(torch.randn(5, 4))

    def forward(self, ids, x):
        positions = torch.arange(ids.shape[1], device=ids.device)
        shared = F.embedding(ids, self.tokens) + F.embedding(positions, self.table)
        by_frequency = F.embedding(ids, self.tokens) + F.embedding(positions, self.table, scale_grad_by_freq=True)
        onto_x = F.embedding(positions, self.table) + x
        return shared, by_frequency, onto_x, F.embedding(ids, self.tokens) + 2.0


def test_expanding_the_lookups_of_an_fx_graph_keeps_its_values_and_gradients():
    """passes/shared_positions.py on a torch.fx graph (no shapes): the two lookups of the token +
    position sum read their indices expanded to the sum's sizes; the lookup with scale_grad_by_freq
    (whose gradient 1/count the expansion would change), the one added to x and the one added to a
    number are left as they are; every output and the gradients of both tables and x are the model's,
    float64."""
    from gnfx.passes.shared_positions import expand_shared_positions, expand_to_the_sum
    torch.manual_seed(0)
    model = Lookups().double()
    ids, x = torch.randint(0, 7, (3, 5)), torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    gm = expand_shared_positions(torch.fx.symbolic_trace(model))
    expanded = [n for n in gm.graph.nodes if n.target is F.embedding and n.args[0].target is expand_to_the_sum]
    assert [n.args[1].target for n in expanded] == ["tokens", "table"]

    def values_and_gradients(module):
        outputs = module(ids, x)
        loss = sum((t * torch.cos(t)).sum() for t in outputs)  # a gradient that differs per example
        return [t.detach() for t in outputs] + list(torch.autograd.grad(loss, [model.tokens, model.table, x]))

    for got, want in zip(values_and_gradients(gm), values_and_gradients(model)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_the_cross_entropy_check_and_the_kept_rows_count_share_one_host_read(monkeypatch):
    """A statistic backward with loss="cross_entropy" reads from the output's gradient, to the host, the
    check's two sums and the count of rows the loss keeps (targets of -100 drop out of N and M): one
    read in all (`tolist` or a `_local_scalar_dense`; it was two), and the count is the kept rows'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))

    class Scalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    for fisher in ("empirical", "mc"):
        c = gnfx.compile(MLP(), "kfac", loss="cross_entropy", fisher=fisher, lr=0.05)
        x, y = batch()
        y[:3] = -100
        out = c(x)
        store = c.optimizer.statistics
        reads.clear()
        with Scalars():
            F.cross_entropy(out, y).backward()
        assert len(reads) == 1, reads
        assert list(store.kept_fraction.values()) == [5 / 8]
    from gnfx.outputs import check_cross_entropy_gradient
    z = torch.randn(4, 3, requires_grad=True)
    grad, = torch.autograd.grad(F.cross_entropy(z, torch.tensor([0, 1, 2, 0])), z)
    assert check_cross_entropy_gradient(z, grad, torch.tensor(7), torch.tensor(0.5)) == [7.0, 0.5]


class RoutedExperts(nn.Module):
    """Two linear experts; an example goes to expert 0 if its first feature is positive, else to expert 1."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))

    def forward(self, x):
        out = x.new_zeros(len(x), 3)
        for e, expert in enumerate(self.experts):
            rows = torch.where((x[:, 0] > 0) == (e == 0))[0]
            out = out.index_add(0, rows, expert(x.index_select(0, rows)))
        return out


def test_an_expert_that_no_example_reached_on_a_statistic_step_keeps_training():
    """A routed expert's input of 0 rows on a statistic step raised "cannot reshape tensor of 0
    elements into shape [0, -1, 4]" in the layouts' (N, R, d) rows (a MoE look-alike at kfac's
    defaults, step 51 of benchmarks/results/library_models.md's second seed): R is now given, not
    inferred. The step completes and every parameter and statistic stays finite."""
    torch.manual_seed(0)
    model = RoutedExperts().double()
    c = gnfx.compile(model, "kfac", loss="cross_entropy", stat_every=1, inv_every=1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for batch in (x, x.abs()):  # the second batch reaches expert 0 only
        F.cross_entropy(c(batch), y).backward()
        c.step()
        c.zero_grad()
        assert c.optimizer.last_step["solved"]
    assert all(p.isfinite().all() for p in model.parameters())
    assert all(s.isfinite().all() for s in c.statistics("experts.1").values())


# --------------------------------------------------------------------------- fourth round
# (benchmarks/results/first_contact_4.md)


def pruned_mlp(which):
    """An MLP whose first layer's weight a forward pre-hook computes: torch.nn.utils.prune's
    `weight = weight_orig * weight_mask`, or the old `nn.utils.weight_norm`'s `g·v/‖v‖`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if which == "prune":
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    else:
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(model[0], "weight")
    return model


@pytest.mark.parametrize("which", ["prune", "weight_norm"])
def test_a_weight_computed_by_a_forward_pre_hook_follows_its_parameters_on_statistic_steps(which):
    """The capture lowered the hooked nn.Linear to F.linear of a get_attr of `weight`, the tensor the
    hook had set at capture: the statistic steps' forward used that stale weight and weight_orig (g, v)
    got no gradient there. The call now stays the module's, hooks included (the weight-norm hook's
    formula is computed in the graph instead, passes/weight_norm.py): after the parameters move, the
    compiled model's output and every gradient equal the module's own (plain autograd, float64)."""
    model = pruned_mlp(which)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning: the pruned layer's parameters fall back
        c = gnfx.compile(model, "kfac", lr=0.1, stat_every=1)
    train(c, 2, torch.float64)  # the parameters move: the hook's weight of the capture is stale
    x, y = batch(torch.float64)
    names, params = zip(*model.named_parameters())
    expected = model(x)  # the module itself, its hook included
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, y), params)
    out = c(x)  # a statistic step (stat_every=1): the instrumented graph
    F.cross_entropy(out, y).backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, p, expected_grad in zip(names, params, expected_grads):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=1e-12, msg=name)



def test_forward_hooks_run_on_statistic_steps_and_their_layers_stay_blocks():
    """A forward hook (one that records, one that replaces the output, as feature extraction and output
    rescaling do) of an nn.Linear was dropped with the module call when capture lowered it to F.linear:
    statistic steps ran without it, another loss, silently. The hooks now run after the functional op:
    every call runs them, the output and gradients equal the module's, and both layers are still blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    calls = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    model[2].register_forward_hook(lambda module, args, out: 2 * out)
    c = gnfx.compile(model, "kfac", lr=0.1, stat_every=1)
    x, y = batch(torch.float64)
    params = list(model.parameters())
    expected = model(x)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, y), params)
    out = c(x)  # a statistic step: the instrumented graph
    F.cross_entropy(out, y).backward()
    # the model's own call; the first call's check of the graph against the forward (passes/trace_check.py), which
    # runs each once; the statistic step
    assert calls == [x.shape] * 4
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for p, expected_grad in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert [b.name for b in c.layers.blocks] == ["0", "2"]
    c.zero_grad()
    calls.clear()
    c(x)  # the next statistic step runs the hook once
    assert calls == [x.shape]


class FrozenBatchNorm(nn.Module):
    """A conv, a batch norm, a linear head; `freeze` puts the batch norm in eval mode (running
    statistics, as detection models freeze theirs) while the model trains."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("frozen", ["before compile", "after the first step"])
def test_a_frozen_batch_norm_has_the_statistics_of_its_running_normalization(frozen):
    """A batch norm in eval mode inside a training model normalizes with its running statistics; its
    block's x̂ was recomputed with the batch's, silently (its γ, β statistics those of another layer).
    The per-example Fisher diagonal of (γ, β) equals vmap's per-example gradients (float64)."""
    torch.manual_seed(0)
    model = FrozenBatchNorm().double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    if frozen == "before compile":
        model.bn.eval()
    c = compile_for_statistics(model, optimizer="kfac")
    statistic_step(c, x, y)
    model.bn.eval()
    grads = per_example_grads(model, x, y)
    statistic_step(c, x, y)
    assert c.layers["bn"].kind == "norm"
    expected = torch.stack([grads["bn.weight"], grads["bn.bias"]], -1).square().mean(0)
    torch.testing.assert_close(c.statistics("bn")["diag"], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_submodule_put_in_eval_mode_after_capture_runs_in_eval_mode_on_statistic_steps(capture):
    """torch.export's graph takes batch norm's `training` as a constant of the capture: after
    `bn.eval()` the statistic steps normalized with the batch's statistics and moved the running ones,
    silently (the other steps run the module). A change of the submodules' modes now gets its own
    capture: the statistic step's output and gradients equal the module's, its running statistics stay."""
    torch.manual_seed(0)
    model = FrozenBatchNorm().double()
    c = gnfx.compile(model, "kfac", lr=0.01, stat_every=1, capture=capture)
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    statistic_step(c, x, y)
    model.bn.eval()
    running = model.bn.running_mean.clone()
    expected = model(x)
    expected_grads = torch.autograd.grad(F.cross_entropy(expected, y), list(model.parameters()))
    out = c(x)
    F.cross_entropy(out, y).backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bn.running_mean, running, rtol=0, atol=0)
    for p, expected_grad in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-12, atol=1e-12)


class TwoHeads(nn.Module):
    """A shared body, two heads returned as (out1, out2): a multi-task model, or a VAE's (recon, mu);
    with `view`, (out1, out1[:4]): the second output rows of the first."""

    def __init__(self, view=False):
        super().__init__()
        self.body, self.head1, self.head2 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.view = view

    def forward(self, x):
        h = torch.tanh(self.body(x))
        z = self.head1(h)
        return z, (z[:4] if self.view else self.head2(h))


@pytest.mark.parametrize("case", ["two cross-entropies", "mse and a KL term", "second output unused",
                                  "second output a view of the first"])
@pytest.mark.parametrize("name", ["kfac", "rank1"])
def test_a_loss_that_also_reaches_another_output_is_named(case, name):
    """loss= models the loss of the first output z alone: a second head's loss, or a VAE's KL term on its
    mean, was left out, silently (under fisher='mc', the default here, the second head got no statistics at
    all: its block had none after the first step). Now a GnfxError at the first backward; an output the
    loss does not use, or one that is a view of z, is fine."""
    torch.manual_seed(0)
    loss = "mse" if case == "mse and a KL term" else "cross_entropy"
    c = gnfx.compile(TwoHeads(view=case == "second output a view of the first"), name, loss=loss)
    x, y = batch()
    out1, out2 = c(x)
    if case == "two cross-entropies":
        total = F.cross_entropy(out1, y) + F.cross_entropy(out2, y % 2)
    elif case == "mse and a KL term":
        total = F.mse_loss(out1, x[:, :3]) + 0.5 * out2.square().sum(1).mean()
    elif case == "second output a view of the first":  # the loss of z's first rows: the others are ignored rows
        total = F.cross_entropy(out2, y[:4])
    else:
        total = F.cross_entropy(out1, y)
    if case in ("second output unused", "second output a view of the first"):
        total.backward()
        c.step()
        assert c.statistics("head1")
        return
    with pytest.raises(gnfx.GnfxError, match=r"(?s)also reaches output 1 .*shape \(8, 2\).*Fix: compile without loss="):
        total.backward()


FIRST_PRODUCTS = """
import sys, warnings
import torch, torch.nn.functional as F
from torch import nn
import gnfx
from gnfx.forward_mode import DECOMPOSITIONS, load_decompositions
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    if sys.argv[1] == "quadratic step":
        c = gnfx.compile(model, "kfac", loss="cross_entropy")
        for _ in range(2):
            F.cross_entropy(c(x), y).backward()
            c.step()
            c.zero_grad()
        assert load_decompositions()  # as the step does for an operation that needs a decomposition
    else:
        gnfx.ggn.ggn_vp(model, "cross_entropy", x, y, [torch.ones_like(p) for p in model.parameters()])
    assert DECOMPOSITIONS in sys.modules
print(len(caught), [str(w.message) for w in caught])
"""


@pytest.mark.parametrize("first", ["quadratic step", "ggn product"])
def test_the_first_quadratic_step_and_ggn_products_emit_no_warning(first):
    """PyTorch loads its forward-mode decompositions with torch.jit.script at a process's first make_dual
    (gnfx.ggn's torch.func.jvp) or when the quadratic step retries an operation that needs one
    (load_decompositions), which warned "`torch.jit.script` is deprecated" 18 times at the user's first
    products. In a fresh process: kfac's first steps at defaults on an MLP and the decompositions' load,
    or a gnfx.ggn product, emit no warning at all."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FIRST_PRODUCTS, first], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 []", done.stdout


def distillation(z, teacher, T):
    """Hinton's distillation loss: T²·KL(softmax(teacher/T) ‖ softmax(z/T)), batch mean."""
    return F.kl_div(F.log_softmax(z / T, -1), F.softmax(teacher / T, -1), reduction="batchmean") * T * T


@pytest.mark.parametrize("loss", ["class weights", "distillation at T=4", "a mean times 1.2"])
def test_a_cross_entropy_whose_curvature_is_another_is_named(loss):
    """Gradients of the cross-entropy form whose H_ℓ is not the mean unweighted cross-entropy's of z
    passed the check, silently modelled with that H_ℓ (and, without a closure, with ρ of the recovered
    loss: kfac's ρ on distillation at T=4 was 1.55 where step(closure) measured 1.04, step 5). The targets
    they imply are not a distribution: a RuntimeWarning naming the closure and the fix."""
    torch.manual_seed(0)
    c = gnfx.compile(MLP(), "kfac", loss="cross_entropy")
    x, y = batch()
    teacher = 3 * torch.randn(8, 3)
    z = c(x)
    total = {"class weights": lambda: F.cross_entropy(z, y, weight=torch.tensor([1.0, 2.0, 3.0])),
             "distillation at T=4": lambda: distillation(z, teacher, 4.0),
             "a mean times 1.2": lambda: 1.2 * F.cross_entropy(z, y)}[loss]()
    total.backward()
    with pytest.warns(RuntimeWarning, match=r"(?s)not a distribution.*step\(closure\).*without loss="):
        c.step()


@pytest.mark.parametrize("loss", ["label smoothing", "soft targets", "distillation at T=1"])
def test_cross_entropies_of_other_targets_are_modelled_exactly_without_a_closure(loss):
    """Label smoothing, probability targets and distillation at T=1 (KL(q ‖ softmax(z)) = the cross-entropy
    of q minus its entropy) have the mean cross-entropy's H_ℓ: no warning, and the quadratic step's α, ρ and
    reductions recovered from the output gradient equal those of step(closure) with the user's loss (float64)."""
    x, y = batch(torch.float64)
    teacher = 3 * torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    user_loss = {"label smoothing": lambda z: F.cross_entropy(z, y, label_smoothing=0.1),
                 "soft targets": lambda z: F.cross_entropy(z, torch.softmax(teacher, -1)),
                 "distillation at T=1": lambda z: distillation(z, teacher, 1.0)}[loss]
    runs = []
    for closure in (False, True):
        torch.manual_seed(0)
        c = gnfx.compile(MLP().double(), "kfac", loss="cross_entropy")
        steps = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                def step_loss():
                    value = user_loss(c(x))
                    if torch.is_grad_enabled():
                        value.backward()
                    return value
                if closure:
                    c.optimizer.step(step_loss)
                else:
                    step_loss()
                    c.step()
                c.zero_grad()
                steps.append([c.optimizer.last_step[k] for k in ("alpha", "rho", "predicted", "actual")])
        runs.append(torch.tensor(steps, dtype=torch.float64))
    assert runs[0][:, 1].isfinite().all()
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean with a penalty"])
def test_a_closure_names_a_summed_squared_error(reduction):
    """With loss='mse' every gradient is a mean squared error's (to some target), so a summed one passed
    silently and the quadratic step's α was numel(z) times too long: kfac at defaults went from 114 to 1e7
    in 6 steps. With a closure, its loss at θ is compared with the squared error the gradient implies
    (numel(z) times larger for a sum): a GnfxError at the first step; a mean plus a penalty on θ trains."""
    torch.manual_seed(0)
    model = MLP()
    c = gnfx.compile(model, "kfac", loss="mse")
    x, _ = batch()
    target = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))

    def closure():
        out = c(x)
        value = (F.mse_loss(out, target, reduction="sum") if reduction == "sum" else
                 F.mse_loss(out, target) + 1e-3 * sum(p.square().sum() for p in model.parameters()))
        if torch.is_grad_enabled():
            value.backward()
        return value

    if reduction == "sum":
        with pytest.raises(gnfx.GnfxError, match=r"(?s)24 times the closure's loss.*reduction='sum'.*Fix: take the mean"):
            c.optimizer.step(closure)
        return
    losses = []
    for _ in range(4):
        c.zero_grad()
        losses.append(float(c.optimizer.step(closure)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("loss_name", ["mae", "mae of one output", "pinball", "mse"])
def test_a_piecewise_linear_loss_under_loss_mse_is_named(loss_name):
    """neuralforecast's MAE and MQLoss (the pinball loss of quantiles q, one per output column) passed
    loss='mse' silently, and gnfx modelled them as the squared error of the targets z - numel(z)·∂L/∂z/2 (the
    quadratic step's GGN, ρ without a closure). Their gradient at z takes at most two magnitudes per column
    (1/M; q/M and (1 - q)/M), which no squared error's does: a RuntimeWarning at the step naming the loss and
    the fix. A mean squared error's gradient (residuals of many sizes) warns nothing."""
    torch.manual_seed(0)
    one_output = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Flatten(0))  # an (N,) forecast
    c = gnfx.compile(one_output if loss_name == "mae of one output" else MLP(), "kfac", loss="mse")
    x, _ = batch()
    target = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    out = c(x)
    if loss_name == "mae":
        loss = (out - target).abs().mean()
    elif loss_name == "mae of one output":  # z of shape (N,): one column of N rows
        loss = (out - target[:, 0]).abs().mean()
    elif loss_name == "pinball":
        error = target - out  # columns: the quantiles 0.1, 0.5, 0.9
        q = torch.tensor([0.1, 0.5, 0.9])
        loss = torch.maximum(q * error, (q - 1) * error).mean()
    else:
        loss = F.mse_loss(out, target.expand_as(out))
    loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.step()
    named = [str(w.message) for w in caught if "piecewise-linear" in str(w.message)]
    if loss_name == "mse":
        assert not named
    else:
        assert len(named) == 1 and "compile without loss=" in named[0], named


def multi_label_batch(dtype=torch.float32):
    """Inputs and 3 binary labels each, a function of the inputs an MLP can learn (first_contact_4.md's
    BCEWithLogits row)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=dtype)
    return x, (x @ torch.randn(4, 3, generator=g, dtype=dtype) > 0).to(dtype)


@pytest.mark.parametrize("case", ["cross-entropy", "summed"])
def test_a_loss_that_is_not_the_mean_binary_cross_entropy_is_named(case):
    """loss='binary_cross_entropy' models the mean of F.binary_cross_entropy_with_logits over every entry of
    z; a cross-entropy over the classes, or a summed BCE, implies targets σ(z) - numel(z)·∂L/∂z far outside
    [0, 1]: a GnfxError at the first step naming the fix."""
    torch.manual_seed(0)
    c = gnfx.compile(MLP(), "kfac", loss="binary_cross_entropy")
    x, labels = multi_label_batch()
    out = c(x)
    loss = (F.cross_entropy(out, labels.argmax(-1)) if case == "cross-entropy" else
            F.binary_cross_entropy_with_logits(out, labels, reduction="sum"))
    loss.backward()
    with pytest.raises(gnfx.GnfxError, match=r"(?s)loss='binary_cross_entropy'.*not \[0, 1\].*Fix: return the logits"):
        c.step()


@pytest.mark.parametrize("targets", ["hard", "soft"])
def test_kfac_at_defaults_trains_a_multi_label_mlp_with_binary_cross_entropy(targets):
    """kfac at its defaults under loss='binary_cross_entropy' (the quadratic step with the exact GGN of BCE,
    fisher='mc', no lr) passes the check on hard and soft (smoothed) targets and trains: under loss='mse'
    BCE's curvature was modelled as 2/numel(z)·I, at least 8x BCE's, and the steps were short."""
    torch.manual_seed(0)
    c = gnfx.compile(MLP(), optimizer="kfac", loss="binary_cross_entropy")
    x, labels = multi_label_batch()
    y = labels if targets == "hard" else 0.9 * labels + 0.05
    losses = train_on(c, x, y, F.binary_cross_entropy_with_logits, 30)
    floor = float(F.binary_cross_entropy(y, y)) if targets == "soft" else 0.0  # the entropy of the targets
    # 1e-4 and 1% of the start's excess over the floor here; loss='mse' left 31% and 24% (its steps ~4x short)
    assert losses[-1] - floor < 0.1 * (losses[0] - floor), losses


# --------------------------------------------------------------------------- fifth round


class EncoderDecoder(nn.Module):
    """Returns (logits, encoder states) as Hugging Face's T5 and BART do (`logits`,
    `encoder_last_hidden_state`): the decoder reads the returned states."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        states = torch.tanh(self.encoder(x))
        return self.decoder(states), states


@pytest.mark.parametrize("name", ["kfac", "rank1"])
def test_an_output_the_logits_are_computed_from_is_not_a_second_loss(name):
    """The cross-entropy of the logits reaches the returned encoder states through the decoder: the
    check for a loss of a second output raised a GnfxError on every encoder-decoder of Hugging Face
    (T5, BART) under loss=. Now the states are not watched (a loss term on them besides the logits' is
    not seen, gnfx.output_watch); the statistics of both layers are taken."""
    torch.manual_seed(0)
    c = gnfx.compile(EncoderDecoder(), name, loss="cross_entropy")
    x, y = batch()
    logits, _ = c(x)
    F.cross_entropy(logits, y).backward()
    c.step()
    assert c.statistics("encoder") and c.statistics("decoder")


class Contrastive(nn.Module):
    """Returns (scores.t(), scores), CLIP's (logits_per_image, logits_per_text): the loss is of the
    second, of which the first is the transpose."""

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        scores = self.text(x) @ self.image(x).t()
        return scores.t(), scores


def test_a_loss_of_an_output_the_logits_are_computed_from_is_named():
    """CLIP's loss of logits_per_text never reaches the logits_per_image it returns first, their
    transpose: under loss= it passed the backward unseen (the output shares z's storage) and kfac's
    step raised that it found no gradient at the model output, suggesting a closure; now the backward
    raises, naming the output the loss is of."""
    torch.manual_seed(0)
    c = gnfx.compile(Contrastive(), "kfac", loss="cross_entropy")
    x, _ = batch()
    _, scores = c(x)
    with pytest.raises(gnfx.GnfxError, match=r"reaches output 1 .*\(shape \(8, 8\)\), which z is computed from, and not z"):
        F.cross_entropy(scores, torch.arange(8)).backward()


class IndexedPositions(nn.Module):
    """Position rows read by indexing the weight, as Whisper's decoder does (`weight[position_ids]`):
    per example (Whisper's positions repeated to the batch), shared by the batch ((1, T), added by
    broadcasting), or by negative indices (rows counted from the end)."""

    def __init__(self, positions):
        super().__init__()
        self.wte, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)
        self.wpe = nn.Parameter(torch.randn(5, 4))
        self.positions = positions

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        if self.positions == "per example":
            positions = positions.repeat(ids.shape[0], 1)
        elif self.positions == "negative":
            positions = positions - ids.shape[1]
        return self.head(torch.tanh(self.wte(ids) + self.wpe[positions]))


@pytest.mark.parametrize("positions", ["per example", "shared", "negative"])
def test_a_lookup_written_as_indexing_is_an_embedding_with_per_example_statistics(positions):
    """`W[ids]` reaches torch.export's graph as aten.index.Tensor, which no detector knew: Whisper's
    decoder position table fell back to diag. It is now the embedding lookup it is
    (passes/index_lookup.py): a block whose outputs are the model's and whose diag equals the
    per-example gradients' (vmap; for the shared positions after passes/shared_positions.py's
    expansion, without the whole-batch warning), float64."""
    torch.manual_seed(0)
    c = _assert_position_diag_is_per_example(IndexedPositions(positions).double(), "wpe", "export")
    assert c.layers["wpe"].kind == "embedding" and not c.layers.fallbacks


class RelativeBias(nn.Module):
    """Swin's relative position bias: a table of (2w-1)² rows by head, read by a buffer of indices
    (here some negative, rows counted from the end), `table[index.view(-1)]`, added to the scores of
    each of the `windows` windows of w² tokens of every example, folded into the first dimension as
    Swin's window partition does ((N·windows, heads, w², w²) scores)."""

    def __init__(self, w=2, heads=2, windows=1):
        super().__init__()
        self.w, self.heads, self.windows = w, heads, windows
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads))
        index = torch.arange(w ** 4).reshape(w * w, w * w) % (2 * w - 1) ** 2
        self.register_buffer("index", torch.where(index % 3 == 0, index - (2 * w - 1) ** 2, index))
        self.qk, self.head = nn.Linear(3, 2 * heads * 2), nn.Linear(windows * heads * w * w * w * w, 4)

    def forward(self, x):  # x (N, windows·w², 3)
        bias = self.table[self.index.view(-1)].view(self.w * self.w, self.w * self.w, -1).permute(2, 0, 1)
        return self.scored(x, bias.unsqueeze(0))

    def scored(self, x, bias):
        """The output from the scores plus `bias`, (1 or N·windows, heads, w², w²)."""
        q, k = self.qk(x).reshape(-1, self.w * self.w, 2, self.heads, 2).unbind(2)
        scores = torch.einsum("nthd,nshd->nhts", q, k)
        return self.head(torch.tanh(scores + bias).reshape(x.shape[0], -1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_relative_position_bias_is_a_fallback_under_both_captures(capture):
    """Swin's `table[index.view(-1)].view(...).permute(2, 0, 1).unsqueeze(0)` added to the scores of
    N·windows windows falls back to diag under both captures (passes/index_lookup.py), with the model's
    outputs and gradients: as an embedding (torch.export's graph made one of it) the lookup of a buffer
    without a batch dimension was one example, whose S is the outer product of the gradient summed over
    the windows, not that of the batch's rows; looked up per window, with exact statistics (8b27f81),
    the block made kfac worse than the fallback on the Swin look-alike
    (benchmarks/results/library_models.md). Fails before under torch.export (an embedding block)."""
    torch.manual_seed(0)
    model = RelativeBias(windows=3).double()
    x, y = torch.randn(6, 3 * model.w ** 2, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    c = gnfx.compile(copy.deepcopy(model), "kfac", lr=1e-2, capture=capture, stat_every=1,
                     example_inputs=(x,) if capture == "export" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # qk's input (N·windows) is not the batch
        out = c(x)
        F.cross_entropy(out, y).backward()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    torch.testing.assert_close(c.table.grad, model.table.grad, rtol=1e-12, atol=1e-12)
    assert [f.param for f in c.layers.fallbacks] == ["table"]
    assert "a relative position bias" in c.layers.fallbacks[0].reason
    assert "table" not in [b.name for b in c.layers]


def diag_step(model, x, y, capture):
    """One statistic step of kfac collecting the per-example diagonal only, on (x, y) with cross-entropy
    over the output's last dimension, float64, without a RuntimeWarning (the whole-batch one: "its input's
    first dimension ... is not the batch"); the compiled model's outputs are the model's. Returns (the
    compiled model, the per-example diagonal of every parameter by vmap)."""
    from references import per_example_fisher_diag
    expected = per_example_fisher_diag(model, x, y)
    c = gnfx.compile(model, "kfac", lr=1e-2, capture=capture, stat_every=1, stat_decay=0.0, statistics=("diag",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = c(x)
        torch.testing.assert_close(out, model(x), rtol=1e-14, atol=1e-14)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        c.step()
    return c, expected


# --------------------------------------------------------------------------- sixth round (text models)


class TanhGelu(torch.autograd.Function):
    """BLOOM's GELU (transformers' GeLUFunction): the tanh approximation, with its derivative as the
    backward, and no jvp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_by_tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class TanhGeluWithSetup(torch.autograd.Function):
    """TanhGelu in the form with setup_context (forward without ctx), no jvp."""

    @staticmethod
    def forward(x):
        return gelu_by_tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    backward = TanhGelu.backward


def gelu_by_tanh(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class StraightThrough(torch.autograd.Function):
    """A straight-through rounding (quantization-aware training): round forward, ȳ passed back."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Activated(MLP):
    """MLP with the activation `activation`: by default the tanh GELU in plain ops."""

    def __init__(self, activation=gelu_by_tanh):
        super().__init__()
        self.activation = activation

    def forward(self, x):
        return self.b(self.activation(3 * self.a(x)))


def assert_trains_as_written_out(plain: nn.Module, activation, capture: str) -> None:
    """3 steps of kfac's quadratic step with forward-mode products of `plain` with its activation replaced by
    `activation` (a custom Function's apply) take the parameters where those of `plain` go (float64; the same Monte
    Carlo targets for both). (At the default, quadratic_products="auto", the Function's model takes forward mode
    and `plain` finite differences, tests/test_discontinuities.py, which agree to ~1e-8, not to rounding.)"""
    custom = copy.deepcopy(plain)
    custom.activation = activation
    models = [gnfx.compile(m, "kfac", loss="cross_entropy", capture=capture, quadratic_products="forward")
              for m in (custom, plain)]
    for c in models:
        torch.manual_seed(1)  # the same Monte Carlo targets for both
        train(c, 3, torch.float64)
    for p, q in zip(custom.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# a Function's apply looked up at the call, as BLOOM does, or bound before capture (`ste = STE.apply` at import)
APPLIES = {"at the call": lambda function: lambda h: function.apply(h), "bound before": lambda function: function.apply}


@pytest.mark.parametrize("function", [TanhGelu, TanhGeluWithSetup])
@pytest.mark.parametrize("bound", sorted(APPLIES))
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_custom_function_without_jvp_steps_as_its_forward_written_out(capture, bound, function):
    """BLOOM's GeLUFunction has no jvp: kfac at its defaults raised at its first step (the quadratic
    step's forward-mode pass). In forward mode it now has the jvp of its forward's recorded operations
    (passes/custom_functions.py), whose derivative its backward is (checked): 3 steps take the parameters
    where those of the model written with plain ops go, float64, with either binding of apply and with
    or without setup_context."""
    torch.manual_seed(0)
    assert_trains_as_written_out(Activated().double(), APPLIES[bound](function), capture)


@pytest.mark.parametrize("bound", sorted(APPLIES))
def test_a_custom_function_keeps_its_backward_in_the_fx_graph(bound):
    """torch.fx traced through a straight-through estimator's apply, keeping its forward's round, whose
    derivative is 0: on every statistic step the gradients below it were 0, not the model's (a
    difference of 0.2, silently). The graph now calls the Function (passes/custom_functions.py): the
    gradients of a statistic step are the model's, float64."""
    torch.manual_seed(0)
    model = Activated(APPLIES[bound](StraightThrough)).double()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", lr=0.01, capture="fx", stat_every=1)
    x, y = batch(torch.float64)
    F.cross_entropy(c(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    assert any(n.target.__name__ == "StraightThrough_apply" for n in c.graph_module.graph.nodes
               if n.op == "call_function")
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert model.a.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bound", sorted(APPLIES))
def test_a_custom_function_whose_backward_is_not_its_forwards_derivative_is_named(bound):
    """Where its backward cannot be kept (torch.export's graph records the forward's operations) or
    forward mode would differentiate its forward, a straight-through estimator is named with the fix;
    before, the exported graph's gradients were silently the round's (0 below it), and the quadratic
    step under fx raised that the Function has no jvp, as if any jvp would do."""
    torch.manual_seed(0)
    x, y = batch()
    with pytest.raises(gnfx.GnfxError, match=r"StraightThrough .*whose backward is not the derivative of its "
                                              r"forward.*Fix: capture='fx'"):
        gnfx.compile(Activated(APPLIES[bound](StraightThrough)), "kfac", lr=0.01, capture="export")(x)
    c = gnfx.compile(Activated(APPLIES[bound](StraightThrough)), "kfac", loss="cross_entropy", capture="fx")
    F.cross_entropy(c(x), y).backward()
    with pytest.raises(gnfx.GnfxError, match=r"StraightThrough .*which has no jvp, and whose backward is not the "
                                              r"derivative of its forward"):
        c.step()


class OffsetNormed(nn.Module):
    """Gemma's RMSNorm between two layers: x̂ ⊙ (1 + γ), γ cast (Gemma: `.float()`; here to the model's
    dtype, float64 in the test)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.weight = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        h = self.a(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.b((h * (1.0 + self.weight.to(h.dtype))).type_as(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_norm_scaled_by_one_plus_its_weight_is_a_norm_block(capture):
    """Gemma's RMSNorm weight fell back to diag (torch.export: "used by call_function
    '_assert_tensor_metadata.default'", the dtype check of its `.float()`; torch.fx: by the cast). A read
    of metadata is no use, and γ cast and offset by a number is the norm's weight (∂z/∂γ = x̂ either
    way): a norm block whose diag equals the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = OffsetNormed().double()
    x, y = batch(torch.float64)
    c, expected = diag_step(model, x, y, capture)
    assert c.layers["weight"].kind == "norm" and not c.layers.fallbacks
    torch.testing.assert_close(c.statistics("weight")["diag"].reshape(-1), expected["weight"], **TOL)


class GroupedExperts(nn.Module):
    """Top-1 routing to 3 experts as Hugging Face's mixture-of-experts layers compute it (gpt-oss's
    experts): the tokens sorted by expert, one F.grouped_mm of them with the stacked expert weights
    (3, 4, 8), unsorted, weighted by the router's probability."""

    def __init__(self):
        super().__init__()
        self.router, self.head = nn.Linear(4, 3), nn.Linear(8, 3)
        self.experts = nn.Parameter(0.5 * torch.randn(3, 4, 8))

    def forward(self, x):
        probability, expert = F.softmax(self.router(x), -1).max(-1)
        order = torch.argsort(expert)
        offsets = torch.cumsum(torch.bincount(expert, minlength=3), 0).to(torch.int32)
        products = F.grouped_mm(x[order], self.experts, offs=offsets)
        h = torch.zeros_like(products).index_copy(0, order, products)
        return self.head(torch.tanh(h) * probability.unsqueeze(-1))


class LinearExperts(nn.Module):
    """GroupedExperts (its parameters copied from `grouped`) with each expert an nn.Linear of the rows
    routed to it: `h[expert == e] = linears[e](x[expert == e])`."""

    def __init__(self, grouped):
        super().__init__()
        self.router, self.head = copy.deepcopy(grouped.router), copy.deepcopy(grouped.head)
        self.linears = nn.ModuleList(nn.Linear(4, 8, bias=False) for _ in range(3))
        for linear, weight in zip(self.linears, grouped.experts.detach()):
            linear.weight.data.copy_(weight.T)

    def forward(self, x):
        probability, expert = F.softmax(self.router(x), -1).max(-1)
        h = x.new_zeros(1, 8).expand(x.shape[0], 8)
        for e, linear in enumerate(self.linears):
            h = h.index_put((expert == e,), linear(x[expert == e]))
        return self.head(torch.tanh(h) * probability.unsqueeze(-1))


def test_kfac_at_defaults_steps_through_grouped_matrix_products():
    """torch._grouped_mm (Mixtral's experts in transformers 5) has no forward-mode derivative: kfac at
    its defaults raised at its first step. Written out for forward mode (gnfx.composite_forms), 3 steps
    take the parameters where those of the same experts as nn.Linear modules go: the experts block
    (gnfx.layouts.experts) is K-FAC per expert over its routed rows, as the linear blocks are (float32:
    the kernel has no float64; torch.fx, as torch.export's fake kernel takes bfloat16 only, which is why
    transformers calls a custom op of its own while tracing). Before the experts kind this compared with
    a one-hot einsum, both falling back to the diagonal preconditioner."""
    torch.manual_seed(0)
    grouped = GroupedExperts()
    linear = LinearExperts(grouped)
    kinds = []
    for model in (grouped, linear):
        c = gnfx.compile(model, "kfac", loss="cross_entropy", capture="fx")
        torch.manual_seed(1)  # the same Monte Carlo targets for both
        train(c, 3)
        kinds.append({b.kind for b in c.layers} if not c.layers.fallbacks else None)
    assert kinds == [{"linear", "experts"}, {"linear"}], kinds
    for e, expert in enumerate(linear.linears):
        torch.testing.assert_close(grouped.experts[e].T, expert.weight, rtol=1e-4, atol=1e-5)
    for p, q in zip([grouped.router, grouped.head], [linear.router, linear.head]):
        torch.testing.assert_close(p.weight, q.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p.bias, q.bias, rtol=1e-4, atol=1e-5)


class AffineFeatures(nn.Module):
    """MobileBERT's NoNorm (ResMLP's Affine) between two layers: `x * γ + β`, per feature."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.weight, self.bias = nn.Parameter(1 + 0.1 * torch.randn(6)), nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x) * self.weight + self.bias))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_per_feature_scale_plus_a_bias_is_one_block(capture):
    """MobileBERT's NoNorm: γ was a scale block and β fell back ("used by call_function 'add.Tensor'").
    β is now the scale block's bias: its diag equals the per-example gradients' of [γ β] (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = AffineFeatures().double()
    x, y = batch(torch.float64)
    c, diags = diag_step(model, x, y, capture)
    assert c.layers["weight"].kind == "scale" and not c.layers.fallbacks
    torch.testing.assert_close(c.statistics("weight")["diag"], torch.stack([diags["weight"], diags["bias"]], 1), **TOL)


def test_a_binary_cross_entropy_over_the_entries_a_mask_keeps_is_named():
    """ELECTRA's replaced-token loss is the mean BCE over the tokens its attention mask keeps, not over
    every entry of its (N, T) logits: the check refused it, naming reasons (a cross-entropy, a factor)
    none of which was it. The error now says that entries without a gradient are a masked mean."""
    torch.manual_seed(0)
    c = gnfx.compile(MLP(), "kfac", loss="binary_cross_entropy")
    x, labels = multi_label_batch()
    out = c(x)
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[:8, -1] = False
    F.binary_cross_entropy_with_logits(out[mask], labels[mask]).backward()
    with pytest.raises(gnfx.GnfxError, match=r"8 of the 192 entries have no gradient at all: a mean over the "
                                              r"entries a mask keeps"):
        c.step()


class ColumnMap(nn.Module):
    """Mamba's `dt_proj.weight @ time_step.transpose(1, 2)`: a (6, 4) weight mapping the columns of
    x (N, 4, L), its features on dimension 1."""

    def __init__(self):
        super().__init__()
        self.weight, self.head = nn.Parameter(0.5 * torch.randn(6, 4)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.weight @ x.transpose(1, 2)).transpose(1, 2))


def test_a_weight_first_product_is_a_linear_block_with_per_example_statistics():
    """`W @ x` with x's features on its second-to-last dimension fell back ("used by call_function
    'matmul.default'"). torch.export's graph now reads it as `(xᵀ @ Wᵀ)ᵀ` (passes/weight_first_products.py):
    a linear block, the outputs the model's, diag equal to the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = ColumnMap().double()
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5, 7))
    c, expected = diag_step(model, x, y, "export")
    assert c.layers["weight"].kind == "linear" and not c.layers.fallbacks
    torch.testing.assert_close(c.statistics("weight")["diag"], expected["weight"], **TOL)


class CausalDepthwise(nn.Module):
    """Mamba's causal depthwise conv: its kernel passed as `weight.squeeze(1)` to a helper that calls
    `F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=C)` (`reshaped`; k - 1 = 2 written out, as
    torch.export's graph has it), or the module itself."""

    def __init__(self, reshaped):
        super().__init__()
        self.conv, self.head = nn.Conv1d(4, 4, 3, groups=4, padding=2), nn.Linear(4, 3)
        self.reshaped = reshaped

    def forward(self, x):
        if self.reshaped:
            h = F.conv1d(x, self.conv.weight.squeeze(1).unsqueeze(1), self.conv.bias, padding=2, groups=4)
        else:
            h = self.conv(x)
        return self.head(torch.tanh(h[..., :x.shape[-1]]).transpose(1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_kernel_reshaped_back_to_its_shape_is_the_conv_block(capture):
    """The kernel reached the conv through squeeze(1) and unsqueeze(1) and fell back with its bias ("used
    by call_function 'squeeze.dim'"). A chain of reshapes back to the parameter's shape is the parameter
    (passes/identity_views.py): a conv block whose statistics are those of the module called directly, float64."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 7, dtype=torch.float64), torch.randint(0, 3, (5, 7))
    statistics = []
    for reshaped in (True, False):
        torch.manual_seed(0)
        c = gnfx.compile(CausalDepthwise(reshaped).double(), "kfac", lr=1e-2, capture=capture, stat_every=1)
        F.cross_entropy(c(x).reshape(-1, 3), y.reshape(-1)).backward()
        c.step()
        assert c.layers["conv"].kind == "conv" and not c.layers.fallbacks
        statistics.append(c.statistics("conv"))
    for name in statistics[1]:
        torch.testing.assert_close(statistics[0][name], statistics[1][name], rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- sixth round, vision and audio
# (benchmarks/results/first_contact_6_vision.md)


class ResponseNormalized(nn.Module):
    """ConvNeXt V2's global response normalization, `γ ⊙ (x ⊙ N(x)) + β + x` with γ and β parameters of
    shape (1, 1, 1, d) on (N, H, W, d) maps, after a convolution whose channels-first output PoolFormer's
    layer scale `s.unsqueeze(-1).unsqueeze(-1)` (d, 1, 1) multiplies."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(4))
        self.gamma, self.beta = nn.Parameter(torch.randn(1, 1, 1, 4)), nn.Parameter(torch.randn(1, 1, 1, 4))

    def forward(self, x):
        h = (self.scale.unsqueeze(-1).unsqueeze(-1) * self.conv(x)).permute(0, 2, 3, 1)
        norms = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
        h = self.gamma * (h * (norms / (norms.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + h
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_scales_and_biases_of_ones_but_the_features_dimension_are_blocks_with_per_example_statistics(capture):
    """ConvNeXt V2's GRN β (1, 1, 1, d) was read as a position table of one row, its positions the
    map's columns: the first statistics raised `RuntimeError: output with shape [1] doesn't match the
    broadcast shape [8]` (kfac at defaults, every kfac). A one-row table is a bias broadcast over every
    row (gnfx.layouts.position). Its γ (1, 1, 1, d) and PoolFormer's `s.unsqueeze(-1).unsqueeze(-1)`
    fell back to diag ('mul.Tensor, not a layer gnfx models'): they are scale blocks (passes/scale.py).
    Each block's diag equals the per-example gradients' (vmap), float64; kfac at defaults trains it."""
    from references import TOL
    torch.manual_seed(0)
    model = ResponseNormalized().double()
    x, y = torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert not c.layers.fallbacks
    blocks = {b.weight: b.name for b in c.layers.blocks}
    for param in ("scale", "gamma", "beta"):
        torch.testing.assert_close(c.statistics(blocks[param])["diag"].reshape(-1), expected[param].reshape(-1), **TOL)
    torch.manual_seed(0)
    c = gnfx.compile(ResponseNormalized(), "kfac", loss="cross_entropy", capture=capture)
    losses = train_on(c, torch.randn(6, 3, 5, 5), torch.arange(6) % 3, F.cross_entropy, steps=10)
    assert losses[-1] < 0.5 * losses[0], losses


class RowBias(nn.Module):
    """A bias kept as a (1, d) parameter, added to (N, d) activations by broadcasting."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6, bias=False), nn.Linear(6, 3)
        self.bias = nn.Parameter(torch.randn(1, 6))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) + self.bias))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_bias_of_one_row_added_to_a_batch_is_a_block_with_per_example_statistics(capture):
    """The same one-row table on a 2-D activation: its "positions" were the N examples, and every kfac
    raised `RuntimeError: output with shape [1] doesn't match the broadcast shape [8]` at its first
    statistics. Its diag now equals the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = RowBias().double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    c, expected = diag_step(model, x, y, capture)
    assert c.layers["bias"].kind == "position" and not c.layers.fallbacks
    torch.testing.assert_close(c.statistics("bias")["diag"].reshape(-1), expected["bias"].reshape(-1), **TOL)


class StandardizedConv(nn.Conv2d):
    """BiT's weight-standardized convolution, as Hugging Face's WeightStandardizedConv2d writes it."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class StandardizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = StandardizedConv(3, 4, 3, padding=1), StandardizedConv(4, 5, 3, padding=1, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_weight_standardized_convolution_is_a_conv_block_stepping_its_standardized_kernel(capture):
    """BiT's convolutions standardize their kernel V per output row (a batch_norm of V's rows): every one
    fell back to diag ('reshape.default, not a layer gnfx models'; 94% of a tiny BiT). Each is now a
    conv block over the W it computes (gnfx.reparametrization.WeightStandardization): the compiled
    model's outputs and gradients are the model's (float64); the pull-back and the gathered gradient
    are the Jacobian's (torch.func): J(s ΔW) = P ΔW and s ∇V = P ∇W with P = I − 11ᵀ/n − W Wᵀ/n per row;
    kfac at defaults trains it."""
    from gnfx.reparametrization import WeightStandardization
    torch.manual_seed(0)
    model = StandardizedNet().double()
    x, y = torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.arange(6) % 3
    c = gnfx.compile(model, "kfac", loss="cross_entropy", capture=capture)
    reference = copy.deepcopy(model)
    out = c(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert not c.layers.fallbacks
    rp = c.layers["conv2"].reparametrization
    assert isinstance(rp, WeightStandardization) and c.layers["conv2"].kind == "conv"

    v = model.conv2.weight.detach()
    named = {"conv2.weight": v}
    w = rp.value(named)
    rows, n = w.flatten(1), w[0].numel()
    delta = torch.randn_like(w)
    projected = delta - delta.flatten(1).mean(1).reshape(-1, 1, 1, 1) - \
        w * ((rows * delta.flatten(1)).sum(1) / n).reshape(-1, 1, 1, 1)
    _, image = torch.func.jvp(lambda p: rp.value({"conv2.weight": p}), (v,), (rp.pull_back(named, delta)["conv2.weight"],))
    torch.testing.assert_close(image, projected, rtol=1e-5, atol=1e-5)  # to O(ε): W's rows have norm² n σ²/(σ² + ε)
    _, vjp = torch.func.vjp(lambda p: rp.value({"conv2.weight": p}), v)
    (grad_v,) = vjp(delta)
    torch.testing.assert_close(rp.weight_gradient(named, {"conv2.weight": grad_v}), projected, rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    c = gnfx.compile(StandardizedNet(), "kfac", loss="cross_entropy", capture=capture)
    losses = train_on(c, torch.randn(6, 3, 5, 5), torch.arange(6) % 3, F.cross_entropy, steps=10)
    assert losses[-1] < 0.5 * losses[0], losses


class ClassTokens(nn.Module):
    """ViT's and DeiT's class and distillation tokens (1, 1, d), each `expand(N, -1, -1)`, and register
    tokens (1, 2, d) repeated as SigLIP's probe is, `repeat(N, 1, 1)`, and vit-pytorch's (k, d) tokens as
    einops' `repeat(P, '... d -> b ... d', b=N)` writes them, `P.unsqueeze(0).expand(N, -1, -1)`,
    concatenated before the patch embeddings, and MAE's mask token (d,) at 2 positions, as einops'
    `repeat(P, 'd -> b n d', b=N, n=2)` writes it, `P.unsqueeze(0).unsqueeze(1).expand(N, 2, -1)`, after
    them, and a (1, 1, d) token as einops' `repeat(P, '1 1 d -> b 1 d', b=N)` writes it,
    `P.reshape(d).unsqueeze(0).expand(N, -1).reshape(N, 1, d)`; the head reads the first two positions and
    the mean of the other tokens."""

    def __init__(self):
        super().__init__()
        self.patches, self.head = nn.Linear(6, 4), nn.Linear(8, 3)
        self.cls, self.distillation = nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 1, 4))
        self.registers, self.unbatched = nn.Parameter(torch.randn(1, 2, 4)), nn.Parameter(torch.randn(2, 4))
        self.mask, self.flat = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):
        n = x.shape[0]
        tokens = [self.cls.expand(n, -1, -1), self.distillation.expand(n, -1, -1), self.registers.repeat(n, 1, 1),
                  self.unbatched.unsqueeze(0).expand(n, -1, -1),
                  self.flat.reshape(4).unsqueeze(0).expand(n, -1).reshape(n, 1, 4)]
        masked = self.mask.unsqueeze(0).unsqueeze(1).expand(n, 2, -1)
        h = torch.tanh(torch.cat(tokens + [self.patches(x), masked], dim=1))
        return self.head(torch.cat([h[:, 0], h[:, 1] * h[:, 2:].mean(1)], dim=-1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_class_tokens_expanded_to_the_batch_are_position_tables_with_per_example_statistics(capture):
    """A class token `cls.expand(N, -1, -1)` concatenated before the patches fell back to diag ('expand,
    not a layer gnfx models': ViT, DeiT, DINOv2, BEiT, CvT, AST; SigLIP's probe, 'repeat'). The expanded table is copied
    (passes/class_tokens.py) and read as a position table at positions 0..k-1: outputs equal the model's,
    no whole-batch warning, and each token's diag equals the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = ClassTokens().double()
    x, y = torch.randn(6, 5, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert not c.layers.fallbacks
    for param in ("cls", "distillation", "registers", "unbatched", "mask", "flat"):
        assert c.layers[param].kind == "position"
        table = expected[param].reshape(-1, expected[param].shape[-1])  # rows x d, a vector (d,) one row
        torch.testing.assert_close(c.statistics(param)["diag"], table.T, **TOL)


class ConcatenatedBiases(nn.Module):
    """WavLM's attention: the q, k and v biases concatenated into one in-projection bias, which
    F.multi_head_attention_forward chunks into three again (`how="chunk"`), or split by sizes."""

    def __init__(self, how):
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.how = how

    def forward(self, x):
        bias = torch.cat((self.q.bias, self.k.bias, self.v.bias))
        b_q, b_k, b_v = bias.chunk(3) if self.how == "chunk" else bias.split([4, 4, 4])
        q, k, v = F.linear(x, self.q.weight, b_q), F.linear(x, self.k.weight, b_k), F.linear(x, self.v.weight, b_v)
        return self.head(torch.softmax(q @ k.transpose(1, 2), -1) @ v).mean(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", ["chunk", "split"])
def test_biases_concatenated_and_split_again_are_their_layers_biases(how, capture):
    """WavLM's q, k and v biases reach their linears through `chunk(cat([b_q, b_k, b_v]), 3)`: they fell
    back to diag ('cat.default, not a layer gnfx models'). A split of a concatenation at its own
    boundaries is the concatenated tensors (passes/split_concat.py): each bias is its linear block's, the
    outputs equal the model's, and each block's diag ([W b]) equals the per-example gradients' (vmap),
    float64."""
    from references import TOL, layer_diag, per_example_fisher_diag
    torch.manual_seed(0)
    model = ConcatenatedBiases(how).double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert not c.layers.fallbacks
    for name in ("q", "k", "v"):
        assert c.layers[name].bias == f"{name}.bias"
        torch.testing.assert_close(c.statistics(name)["diag"], layer_diag(expected, name), **TOL)


class MovedWeights(nn.Module):
    """Parameters moved or cast to the device or dtype of the activations where they are read, as
    SigLIP moves its logit scale (`self.logit_scale.to(text_embeds.device)`)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.fc.weight.to(x.device), self.fc.bias.to(x.dtype))) * self.gain.to(x.device)
        return self.head(h)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_parameter_moved_to_its_own_device_is_read_through_the_move(capture):
    """`W.to(x.device)` made W fall back to diag: under fx its use was the `to` call, under torch.export
    the `_assert_tensor_metadata` check the move leaves ('..., not a layer gnfx models'). A cast or move
    to a floating dtype now stands for the parameter (passes/parameter_casts.py): the linear block has
    its weight and bias and the gain is a scale block; outputs are the model's and each block's diag
    equals the per-example gradients' (vmap), float64."""
    from references import TOL, layer_diag, per_example_fisher_diag
    torch.manual_seed(0)
    model = MovedWeights().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert not c.layers.fallbacks and c.layers["fc"].bias == "fc.bias" and c.layers["gain"].kind == "scale"
    torch.testing.assert_close(c.statistics("fc")["diag"], layer_diag(expected, "fc"), **TOL)
    torch.testing.assert_close(c.statistics("gain")["diag"].reshape(-1), expected["gain"], **TOL)


class OneRowOfATable(nn.Module):
    """x (N, T, d) plus one row of a (1, 5, d) table, `P[:, 2:3]`, broadcast over the T positions."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(1, 5, 4))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) + self.table[:, 2:3]).mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_row_of_a_position_table_is_read_by_every_position(capture):
    """`x + P[:, 2:3]` adds row 2 to each of x's T = 3 positions; the statistics read it as positions
    2, 3 and 4 (silently: rows of P that x never reads got curvature, row 2 only its own position's).
    A slice of one row is read by every position (passes/position.py records the rows a slice leaves):
    the diag equals the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = OneRowOfATable().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert c.layers["table"].kind == "position"
    torch.testing.assert_close(c.statistics("table")["diag"], expected["table"].flatten(0, -2).T, **TOL)


# --------------------------------------------------------------------------- ninth round, Hugging Face
# (benchmarks/results/first_contact_9_hf.md)


class PerHeadNormed(nn.Module):
    """Cohere's q_norm: a hand-written LayerNorm of each head's D features, x (N, T, H, D), with a weight
    (H, D) of its own per head, `γ.to(float32) * x̂` (here cast to the model's dtype, float64)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(2, 3))

    def forward(self, x):
        h = self.a(x).unflatten(-1, (2, 3))
        centered = h - h.mean(-1, keepdim=True)
        h = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.b((self.weight.to(h.dtype) * h).flatten(-2))


def test_a_norm_with_a_weight_per_head_is_a_norm_block_of_every_heads_features():
    """Cohere's q_norm and k_norm (γ of shape (H, D) on x̂ (N, T, H, D), each head normalized over its D
    features) fell back to diag ("used by call_function 'mul.Tensor'"): the norm detector took a 1-D γ
    only. A γ whose shape is x̂'s last dimensions is the norm of its H·D features (torch.export records
    x̂'s shape; torch.fx's graph holds none, where a 1-D γ only is taken): a norm block whose diag equals
    the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = PerHeadNormed().double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6, 5))
    c, expected = diag_step(model, x, y, "export")
    assert c.layers["weight"].kind == "norm" and not c.layers.fallbacks
    torch.testing.assert_close(c.statistics("weight")["diag"].reshape(-1), expected["weight"].reshape(-1), **TOL)


class VectorClassToken(nn.Module):
    """CLIP's vision class embedding: a vector (d,), `expand(N, 1, -1)`, concatenated before the patch
    embeddings; the head reads the first position and the patches' mean."""

    def __init__(self):
        super().__init__()
        self.patches, self.head = nn.Linear(6, 4), nn.Linear(8, 3)
        self.cls = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(torch.cat([self.cls.expand(x.shape[0], 1, -1), self.patches(x)], dim=1))
        return self.head(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_vector_class_token_expanded_to_the_batch_is_a_position_table_of_one_row(capture):
    """CLIP's `class_embedding.expand(N, 1, -1)` (a (d,) vector; CLIP, LLaVA's vision tower) fell back to
    diag ("used by call_function 'expand.default'"): class tokens were taken as tables of 2 dimensions or
    more. A vector expanded to (N, 1, ..., 1, d) is a table of one row read at position 0: a position
    block whose diag equals the per-example gradients' (vmap), float64, outputs the model's."""
    from references import TOL
    torch.manual_seed(0)
    model = VectorClassToken().double()
    x, y = torch.randn(6, 5, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, x, y, capture)
    assert not c.layers.fallbacks and c.layers["cls"].kind == "position"
    torch.testing.assert_close(c.statistics("cls")["diag"].reshape(-1), expected["cls"], **TOL)


class TransposedGroupedExperts(GroupedExperts):
    """GroupedExperts with its stacked weights stored (E, d_out, d_in), read transposed, as Qwen3-MoE's and
    DeepSeek-V3's `grouped_mm(x, W.transpose(-2, -1), offs=...)` does."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(0.5 * torch.randn(3, 8, 4))

    def forward(self, x):
        probability, expert = F.softmax(self.router(x), -1).max(-1)
        order = torch.argsort(expert)
        offsets = torch.cumsum(torch.bincount(expert, minlength=3), 0).to(torch.int32)
        products = F.grouped_mm(x[order], self.experts.transpose(-2, -1), offs=offsets)
        h = torch.zeros_like(products).index_copy(0, order, products)
        return self.head(torch.tanh(h) * probability.unsqueeze(-1))


class UnroutedGroupedExperts(GroupedExperts):
    """GroupedExperts with every expert applied to every token, a batched grouped product without offsets
    (`F.grouped_mm(x.expand(3, N, 4), W)`), the outputs mixed by the router's probabilities (forward only:
    torch's batched grouped product has no backward on CPU for it)."""

    def forward(self, x):
        probabilities = F.softmax(self.router(x), -1)
        h = F.grouped_mm(x.expand(3, -1, -1).contiguous(), self.experts)
        return self.head(torch.tanh(torch.einsum("gno,ng->no", h, probabilities)))


def test_stacked_expert_weights_of_a_grouped_product_without_offsets_fall_back_for_what_they_are():
    """Qwen3-MoE's, Qwen2-MoE's, DeepSeek-V3's and gpt-oss's experts fell back "used by call_function
    'transpose.int', not a layer gnfx models" (or 'grouped_mm_fallback.default'), which says nothing of
    what they are; they are now blocks (tests/test_experts.py). A grouped product without offsets (no
    rows routed) is not what the experts kind models: the reason names the stacked weights of E experts in
    a grouped product, what is missing, and the layer that models them (nn.Linear experts); the router
    and head stay blocks."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning
        c = gnfx.compile(UnroutedGroupedExperts(), "kfac", lr=1e-2, capture="fx", example_inputs=(batch()[0],))
    (fallback,) = c.layers.fallbacks
    assert fallback.param == "experts" and "router" in c.layers and "head" in c.layers
    assert "stacked weights of 3 experts" in fallback.reason and "without offsets" in fallback.reason \
        and "nn.Linear" in fallback.reason, fallback.reason


@pytest.mark.parametrize("model", [GroupedExperts, TransposedGroupedExperts])
def test_stacked_expert_weights_of_a_routed_grouped_product_are_an_experts_block(model):
    """gpt-oss's form, `grouped_mm(x, W, offs=...)` with W (E, d_in, d_out), and Qwen3-MoE's, Qwen2-MoE's
    and DeepSeek-V3's, `grouped_mm(x, W.transpose(-2, -1), offs=...)` with W (E, d_out, d_in), fell back;
    each is now a block of kind "experts", 3 groups of 8 x 4 (its statistics against a reference:
    tests/test_experts.py), and nothing falls back."""
    torch.manual_seed(0)
    c = gnfx.compile(model(), "kfac", lr=1e-2, capture="fx")
    train(c, 1)
    block = c.layers["experts"]
    assert not c.layers.fallbacks and block.kind == "experts"
    assert block.shapes["A"] == (3, 4, 4) and block.shapes["S"] == (3, 8, 8)


class DeadKernelRead(CausalDepthwise):
    """CausalDepthwise (reshaped) whose forward also computes `weight.squeeze(1)` that nothing uses, as
    torch.export's graph of transformers' Mamba2 mixer has it (a squeeze of conv1d.weight without users,
    next to the one its causal_conv1d_fn reads)."""

    def __init__(self):
        super().__init__(reshaped=True)

    def forward(self, x):
        self.conv.weight.squeeze(1)  # unused
        return super().forward(x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_parameter_read_that_nothing_uses_is_no_use(capture):
    """Mamba2's conv1d weight and bias fell back ("used by call_function 'squeeze.dim'"): besides the
    conv's, the graph holds a squeeze of the weight whose result nothing reads, and that counted as a use
    no layer claims. A read whose result is unused and which changes nothing (not impure) is no use
    (passes/parameter_casts.py): the conv block with the statistics of the model without the dead read,
    float64."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 7, dtype=torch.float64), torch.randint(0, 3, (5, 7))
    statistics = []
    for model in (DeadKernelRead, lambda: CausalDepthwise(True)):
        torch.manual_seed(0)
        c = gnfx.compile(model().double(), "kfac", lr=1e-2, capture=capture, stat_every=1)
        F.cross_entropy(c(x).reshape(-1, 3), y.reshape(-1)).backward()
        c.step()
        assert c.layers["conv"].kind == "conv" and not c.layers.fallbacks, c.layers.fallbacks
        statistics.append(c.statistics("conv"))
    for name in statistics[1]:
        torch.testing.assert_close(statistics[0][name], statistics[1][name], rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- tenth round, open_clip,
# sentence-transformers, kornia (benchmarks/results/first_contact_10_clip.md)


class CastDtypeTextTower(nn.Module):
    """open_clip's text tower as it reads its parameters: the cast dtype from a layer's weight
    (`resblocks[0].mlp.c_fc.weight.dtype`) and the position table sliced to the sequence, then cast,
    `x + P[:T].to(cast_dtype)` (its TextTransformer)."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.positional_embedding = nn.Parameter(torch.randn(7, 4))

    def forward(self, ids):
        cast_dtype = self.fc.weight.dtype
        x = self.embed(ids).to(cast_dtype) + self.positional_embedding[:ids.shape[1]].to(cast_dtype)
        return self.head(torch.tanh(self.fc(x)).mean(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_weights_dtype_read_and_a_sliced_table_cast_are_no_other_uses(capture):
    """open_clip's text towers: `fc.weight.dtype` is `getattr(W, 'dtype')` in torch.fx's graph, which made
    fc fall back ("used by call_function 'getattr'"), and `P[:T].to(dtype)` made the position table fall
    back under both captures (a cast after the slice; torch.export also checks the slice's metadata). Both
    are reads of metadata or casts (passes/parameter_casts.py): every parameter in a block, the position
    table's diag equal to the per-example gradients' (vmap), float64."""
    from references import TOL
    torch.manual_seed(0)
    model = CastDtypeTextTower().double()
    ids, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    c, expected = diag_step(model, ids, y, capture)
    assert not c.layers.fallbacks, c.layers.fallbacks
    assert c.layers["fc"].kind == "linear" and c.layers["positional_embedding"].kind == "position"
    torch.testing.assert_close(c.statistics("positional_embedding")["diag"], expected["positional_embedding"].T, **TOL)


class FunctionalAttentionPool(nn.Module):
    """OpenAI CLIP's (and open_clip's) ModifiedResNet pool: the tokens (N, T, C), their mean prepended,
    sequence-first, attended by that mean alone with F.multi_head_attention_forward over separate q/k/v
    projections and the output projection c_proj; a linear head on the pooled (N, C)."""

    def __init__(self, c=4, heads=2):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = (nn.Linear(c, c) for _ in range(4))
        self.head, self.heads = nn.Linear(c, 3), heads

    def forward(self, x):
        x = x.transpose(0, 1)
        x = torch.cat([x.mean(0, keepdim=True), x])
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return self.head(out[0])


def test_functional_multi_head_attention_is_captured_where_its_projections_are_blocks():
    """torch.fx records F.multi_head_attention_forward as one call (its __torch_function__ dispatch), so
    the q/k/v/c projections it takes fell back (open_clip's RN CLIP: 57% of the parameters), while
    torch.fx "traced the whole forward" and capture='auto' kept it. It is an opaque call now
    (passes/capture.py): torch.export captures the forward too and its graph is kept, every projection a
    linear block; the key projection's A is E[ā āᵀ] over the key rows (ā: the row and a 1), float64."""
    torch.manual_seed(0)
    model = FunctionalAttentionPool().double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    out = c(x)
    torch.testing.assert_close(out, model(x), rtol=1e-14, atol=1e-14)
    F.cross_entropy(out, y).backward()
    c.step()
    assert c.layers.form == "export" and not c.layers.fallbacks, c.layers.fallbacks
    assert all(c.layers[name].kind == "linear" for name in ("q_proj", "k_proj", "v_proj", "c_proj"))
    tokens = torch.cat([x.mean(1, keepdim=True), x], 1).transpose(0, 1).reshape(-1, 4)
    rows = torch.cat([tokens, torch.ones(len(tokens), 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(c.statistics("k_proj")["A"], rows.T @ rows / len(rows), rtol=1e-12, atol=1e-12)


class TwoTowers(nn.Module):
    """A CLIP of two linear towers returning logits_per_image, `s · normalize(img) @ normalize(txt)ᵀ`
    (N, N), with its logit scale s = exp(t) a trainable scalar as CLIP's."""

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts):
        img, txt = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return self.logit_scale.exp() * img @ txt.T


def clip_loss(logits, symmetric=True):
    """open_clip's ClipLoss on logits_per_image (labels arange(N)), or its image-to-text half alone."""
    labels = torch.arange(len(logits))
    image_to_text = F.cross_entropy(logits, labels)
    return (image_to_text + F.cross_entropy(logits.T, labels)) / 2 if symmetric else image_to_text


def test_a_symmetric_contrastive_loss_is_named_and_its_one_directional_half_trains():
    """CLIP's loss over the similarity matrix z (N, N) is the mean of the cross-entropy of its rows and
    of its columns: its H_ℓ couples the rows, which loss='cross_entropy' (a cross-entropy of the rows)
    would model wrongly. The first backward raises a GnfxError that names that loss and both fixes
    (the old text listed CLIP among a generic list and told to return the logits first, which these are);
    compiled without loss= it trains at an lr, and the one-directional loss with loss='cross_entropy'
    (exact: its GGN is the rows' cross-entropy's) at kfac's defaults."""
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    torch.manual_seed(0)
    c = gnfx.compile(TwoTowers(), "kfac", loss="cross_entropy")
    clip_loss(c(images, texts)).backward()
    with pytest.raises(gnfx.GnfxError, match="symmetric contrastive loss.*compile without loss= and with an lr.*"
                                             "one-directional"):
        c.step()  # (told at the step, which knows a GradScaler's loss scale)
    for loss, symmetric in (({"lr": 1e-2}, True), ({"loss": "cross_entropy"}, False)):
        torch.manual_seed(0)
        c = gnfx.compile(TwoTowers(), "kfac", **loss)
        losses = []
        for _ in range(4):
            losses.append(clip_loss(c(images, texts), symmetric))
            losses[-1].backward()
            c.step()
            c.zero_grad()
        assert losses[-1] < losses[0], (loss, losses)


class Scored(collections.UserDict):
    """transformers' BatchEncoding: a UserDict, no pytree torch knows."""


class ScoresInAMapping(nn.Module):
    """sentence-transformers' CrossEncoder: its forward writes "scores" into the features mapping it was
    given (a BatchEncoding) and returns that mapping; `as_dict`: a plain dict instead."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.embed, self.a, self.b, self.as_dict = nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 3), as_dict

    def forward(self, features):
        out = (dict if self.as_dict else Scored)(features)
        out["scores"] = self.b(torch.tanh(self.a(self.embed(features["input_ids"]).mean(1))))
        return out


def test_logits_in_a_mapping_that_is_no_pytree_are_the_output():
    """CrossEncoder's output is a BatchEncoding, which torch's pytree takes as one leaf: gnfx found no
    logits in it ("fisher='mc' needs a model output of logits ...; got BatchEncoding") and kfac at its
    defaults could not train it. A mapping's values are its leaves (gnfx.outputs): the statistics and the
    steps are those of the same model returning a plain dict, float64."""
    ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
    runs = []
    for as_dict in (False, True):
        torch.manual_seed(0)
        model = ScoresInAMapping(as_dict).double()
        c = gnfx.compile(model, "kfac", loss="cross_entropy", stat_every=1)
        for _ in range(2):
            torch.manual_seed(1)  # the same sampled labels
            F.cross_entropy(c({"input_ids": ids})["scores"], y).backward()
            c.step()
            c.zero_grad()
        runs.append((c.statistics("a"), [p.detach().clone() for p in model.parameters()]))
    for name in runs[1][0]:
        torch.testing.assert_close(runs[0][0][name], runs[1][0][name], rtol=1e-14, atol=1e-14)
    for p, q in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)


class PooledEmbeddings(nn.Module):
    """sentence-transformers' SentenceTransformer: a token encoder, the mask's mean of its token embeddings
    as the sentence embedding, both returned in a dict, the tokens first (`only_sentences`: the sentence
    embedding alone)."""

    def __init__(self, only_sentences=False):
        super().__init__()
        self.embed, self.a, self.b, self.only_sentences = nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 3), \
            only_sentences

    def forward(self, features):
        tokens = self.b(torch.tanh(self.a(self.embed(features["input_ids"]))))
        mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        sentences = (tokens * mask).sum(1) / mask.sum(1)
        return sentences if self.only_sentences else {"token_embeddings": tokens, "sentence_embedding": sentences}


def test_without_a_loss_the_statistics_count_the_sentences_a_pooled_output_is_of():
    """sentence-transformers' output lists the token embeddings (N, T, d) before the sentence embeddings
    pooled from them, and a loss of the sentences (here a contrastive one) reaches the tokens through the
    pooling: taking the tokens as the output, M counted the unpadded tokens the loss reached and the per-example n
    the share of them times N, scaling S and the diagonal by the mean sentence length and its share of T. Without loss= the
    output the statistics count by is the last one computed from the first with its rows (gnfx.output_watch):
    A, S and the diagonal are those of the model returning the sentence embeddings alone, float64."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 5, 3, 5, 1, 4])
    ids = torch.randint(0, 10, (2, 6, 5), generator=g)
    mask = (torch.arange(5) < lengths[:, None]).long()
    runs = []
    for only_sentences in (False, True):
        torch.manual_seed(0)
        model = PooledEmbeddings(only_sentences).double()
        c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0, statistics=("A", "S", "diag"))
        embeddings = [c({"input_ids": ids[i], "attention_mask": mask}) for i in range(2)]
        anchors, positives = (e if only_sentences else e["sentence_embedding"] for e in embeddings)
        F.cross_entropy(20 * F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T, torch.arange(6)).backward()
        c.step()
        runs.append({name: c.statistics(name) for name in ("a", "b")})
    for name in ("a", "b"):
        for key in ("A", "S", "diag"):
            torch.testing.assert_close(runs[0][name][key], runs[1][name][key], rtol=1e-12, atol=1e-14)


class CenteredEmbeddings(nn.Module):
    """An embedding model whose output a LayerNorm without affine centers (each row's features sum to zero),
    as a BERT's token embeddings."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False)

    def forward(self, x):
        return self.norm(self.a(x))


def test_a_loss_that_is_no_cross_entropy_of_centered_embeddings_is_named():
    """sentence-transformers' CosineSimilarityLoss compiled with loss='cross_entropy': the cosine's gradient at
    centered embeddings sums to zero over each row, so it passed the rows' test and warned that the targets
    are no distribution naming class weights or a temperature only, as though the loss were a cross-entropy.
    The warning names a loss that is none and the fix for it; so does the error of MultipleNegativesRankingLoss
    (scale 20), which passed the rows' test too and was told apart as a sum or a scaled loss only."""
    g = torch.Generator().manual_seed(0)
    x1, x2, score = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.rand(8, generator=g)
    torch.manual_seed(0)
    c = gnfx.compile(CenteredEmbeddings(), "kfac", loss="cross_entropy")
    F.mse_loss(torch.cosine_similarity(c(x1), c(x2)), score).backward()
    with pytest.warns(RuntimeWarning, match=r"(?s)no cross-entropy of z at all.*LayerNorm.*cosine.*without loss="):
        c.step()  # (told at the step, which knows a GradScaler's loss scale)
    torch.manual_seed(0)
    c = gnfx.compile(CenteredEmbeddings(), "kfac", loss="cross_entropy")
    similarities = 20 * F.normalize(c(x1), dim=-1) @ F.normalize(c(x2), dim=-1).T  # MultipleNegativesRankingLoss
    F.cross_entropy(similarities, torch.arange(8)).backward()
    with pytest.raises(gnfx.GnfxError, match=r"(?s)not one of a mean.*no cross-entropy of z at all.*LayerNorm.*"
                                             r"contrastive.*without loss="):
        c.step()  # (told at the step, which knows a GradScaler's loss scale)


def test_data_parallel_over_several_devices_is_named():
    """nn.DataParallel over several devices copies the model to each device at every forward and runs the copies
    in threads, whose taps' statistics the optimizer would never see: refused at gnfx.compile (the wrapper given)
    and when DataParallel copies the compiled model (the compiled model wrapped); over one device, or none (a CPU), it
    calls the module itself and trains. The devices are set by hand: this machine may have none."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    wrapped = nn.DataParallel(net)
    wrapped.device_ids = [0, 1]
    with pytest.raises(gnfx.ConfigError, match="DataParallel over 2 devices"):
        gnfx.compile(wrapped, "kfac", lr=1e-3)
    compiled = gnfx.compile(net, "kfac", lr=1e-3, stat_every=1)
    with pytest.raises(gnfx.ConfigError, match="wrapped by nn.DataParallel over several devices"):
        compiled._replicate_for_data_parallel()  # what torch.nn.parallel.replicate asks of every module, per device
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    on_cpu = gnfx.compile(nn.DataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))), "kfac",
                          lr=1e-2, stat_every=1)
    losses = train_on(on_cpu, x, y, F.cross_entropy, 5)
    assert losses[-1] < losses[0] and [b.name for b in on_cpu.layers.blocks] == ["module.0", "module.2"]


# --------------------------------------------------------------------------- eleventh round, tabular and time series


class ShiftedSoftmax(torch.autograd.Function):
    """pytorch-tabnet's sparsemax pattern: the forward shifts its input by its maximum in place
    (`input -= max`), then the backward of the result (here a softmax's)."""

    @staticmethod
    def forward(ctx, x):
        x -= x.max(-1, keepdim=True).values
        y = torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_custom_function_writing_its_input_in_place_is_checked_and_differentiated_on_copies(capture):
    """TabNet's sparsemax writes its input in place: gnfx's check of its backward against its forward (torch.export)
    and the jvp of its forward (the quadratic step's forward mode) ran that forward on a leaf that requires grad
    ("a leaf Variable that requires grad is being used in an in-place operation", at capture or at the first
    step). They run it on a copy now: 3 steps of the quadratic step go where those of the model with the softmax
    written out go, float64."""
    torch.manual_seed(0)
    assert_trains_as_written_out(Activated(lambda h: torch.softmax(h, -1)).double(), ShiftedSoftmax.apply, capture)


class Density:
    """What zuko's flows return from their forward: a distribution holding the layer, which its log_prob calls."""

    def __init__(self, net: nn.Module, loc: torch.Tensor):
        self.net, self.loc = net, loc

    def log_prob(self, x):
        return -((self.net(x) - self.loc) ** 2).sum(-1)


class LazyFlow(nn.Module):
    """A forward that returns a Density: its layer runs after the forward, when the loss is computed."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 3)
        self.register_buffer("loc", torch.zeros(3))

    def forward(self):
        return Density(self.net, self.loc)


def test_a_layer_run_after_the_forward_returns_is_named_at_its_gradient():
    """zuko's `-flow().log_prob(x).mean()`: the captured forward uses no parameter, and gnfx's warning said they
    would get no gradient and keep their values, while log_prob ran the layers and the diagonal preconditioner
    stepped them (0% in blocks, silently). Their first gradient is now named, once, with the fix (a module
    whose forward computes the tensor the loss takes), which puts the layer in a block."""
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    with pytest.warns(UserWarning, match="not used by the captured forward"):
        c = gnfx.compile(LazyFlow(), "kfac", lr=1e-3, example_inputs=())
    with pytest.warns(RuntimeWarning, match=r"(?s)'net\.\w+' got a gradient though the forward.*LogProb"):
        (-c().log_prob(x).mean()).backward()
    c.step()
    c.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        (-c().log_prob(x).mean()).backward()

    class LogProb(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = LazyFlow()

        def forward(self, x):
            return self.flow().log_prob(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = gnfx.compile(LogProb(), "kfac", lr=1e-3)
        (-c(x).mean()).backward()
        c.step()
    assert [b.name for b in c.layers] == ["flow.net"]


def euler_field() -> nn.Sequential:
    """f(y) of a neural ODE dy/dt = f(y) (torchdiffeq's ODEFunc), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def euler(f, y, steps: int = 4):
    """y(1) by `steps` Euler steps y + f(y)/steps: f called `steps` times inside one loss, as an ODE solver does."""
    for _ in range(steps):
        y = y + f(y) / steps
    return y


class EulerSolve(nn.Module):
    """The fix: the module whose forward runs the solver, so that f's calls are positions of its examples."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, y):
        return euler(self.f, y)


def test_one_backward_through_several_calls_of_the_compiled_model_is_named():
    """torchdiffeq's ode_demo compiles its ODEFunc and calls odeint(func, y0, t): the solver calls the compiled
    model at every stage, each call a statistic forward of the same N examples, and M summed over the calls made
    S K times the hooks' (M = N, the calls positions), silently. One backward reaching two forwards is named now,
    once; gradient accumulation (a backward per forward) is not; the fix, the solver inside the compiled
    module, gives the hooks' S."""
    g = torch.Generator().manual_seed(0)
    y0, target = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulated = gnfx.compile(euler_field(), "kfac", lr=1e-3)
        for _ in range(2):
            F.mse_loss(accumulated(y0), target).backward()
        accumulated.step()
    c = gnfx.compile(euler_field(), "kfac", lr=1e-3, stat_decay=0.0, stat_every=1)
    with pytest.warns(RuntimeWarning, match=r"(?s)one backward reached the outputs of two or more.*odeint.*"
                                            r"compile the module whose forward makes the calls"):
        F.mse_loss(euler(c, y0), target).backward()
    c.step()
    fixed = gnfx.compile(EulerSolve(euler_field()), "kfac", lr=1e-3, stat_decay=0.0, stat_every=1)
    F.mse_loss(fixed(y0), target).backward()
    fixed.step()
    calls = collections.defaultdict(list)
    reference = EulerSolve(euler_field())
    def record(name):
        def hook(_, inputs, out):
            out.register_hook(lambda g: calls[name].append(g))
        return hook

    for name in ("0", "2"):
        reference.f.get_submodule(name).register_forward_hook(record(name))
    F.mse_loss(reference(y0), target).backward()
    for name in ("0", "2"):
        g = torch.cat(calls[name])
        want = 6 * g.T @ g  # S = M Σ g gᵀ, M = N = 6 (docs/design.md §1)
        torch.testing.assert_close(fixed.statistics(f"f.{name}")["S"], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.statistics(name)["S"], 4 * want, rtol=1e-10, atol=1e-12)  # the calls' M


# ----------------------------------------------------------------------------- eleventh round (vision, multimodal)


class NoGradTable(nn.Module):
    """LayoutLMv3's relative position bias (transformers 5): a linear layer's weight indexed as a table inside
    `with torch.no_grad():`, so that it never gets a gradient, beside a layer that does."""

    def __init__(self):
        super().__init__()
        self.fc, self.table = nn.Linear(4, 3), nn.Linear(5, 2, bias=False)

    def forward(self, x):
        with torch.no_grad():
            bias = self.table.weight[:, torch.tensor([0, 2, 4])]
        return self.fc(x) + bias.sum(0)


def test_a_parameter_read_under_no_grad_falls_back_for_what_it_is():
    """Before: "used by call_function 'wrap_with_set_grad_enabled' (node index), not a layer gnfx models"."""
    x = torch.randn(2, 4)
    c = gnfx.compile(NoGradTable(), "kfac", lr=0.1, capture="export", example_inputs=(x,))
    c(x).sum().backward()
    c.step()
    assert [(f.param, f.reason) for f in c.layers.fallbacks] == [
        ("table.weight", "read inside a torch.no_grad() region (node index), where it gets no gradient: no "
                         "curvature to model there")]
    assert c.table.weight.grad is None and [b.name for b in c.layers] == ["fc"]


def test_two_augmented_views_in_one_loss_count_2n_terms_and_the_warning_says_so():
    """lightly's BYOL (SimCLR, DINO alike): the compiled student is called on two augmented views of one batch
    and the loss averages over both views' rows, ½(cos(p0, z1) + cos(p1, z0)) against a momentum teacher's
    detached targets: 2N loss terms. S equals the plain hooks' with M = 2N (each view's rows terms of their
    own); the warning at the backward used to tell such a user that "forwards [that] see the same examples"
    make S twice too large and to compile the module making the calls; it now names augmented views whose rows
    the loss averages as right."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    teacher = copy.deepcopy(student).requires_grad_(False)
    reference = copy.deepcopy(student)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    views = [x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2)]

    def byol(model):
        p0, p1 = model(views[0]), model(views[1])
        z0, z1 = teacher(views[0]).detach(), teacher(views[1]).detach()
        return -0.5 * (F.cosine_similarity(p0, z1).mean() + F.cosine_similarity(p1, z0).mean())
    c = gnfx.compile(student, "kfac", lr=1e-3, stat_decay=0.0, stat_every=1)
    with pytest.warns(RuntimeWarning, match=r"(?s)one backward reached the outputs of two or more.*augmented views "
                                            r"of one batch whose every row is a term of the loss.*nothing to do"):
        byol(c).backward()
    c.step()
    calls = collections.defaultdict(list)

    def record(name):
        def hook(_, inputs, out):
            out.register_hook(lambda g: calls[name].append(g))
        return hook
    for name in ("0", "2"):
        reference.get_submodule(name).register_forward_hook(record(name))
    byol(reference).backward()
    for name in ("0", "2"):
        g = torch.cat(calls[name])
        torch.testing.assert_close(c.statistics(name)["S"], 2 * 5 * g.T @ g, rtol=1e-10, atol=1e-12)  # M = 2N


# --------------------------------------------------------------------------- eleventh round, litgpt
# (benchmarks/results/first_contact_11_llm.md)


class LazyIndexBuffer(nn.Module):
    """litgpt's LoRAQKVLinear: a property registers an index buffer on its first read (`if not hasattr(self,
    "_lora_ind"): self.register_buffer("_lora_ind", torch.tensor(...), persistent=False)`) and the forward
    scatters an update into the columns it names."""

    def __init__(self):
        super().__init__()
        self.fc, self.update = nn.Linear(4, 6), nn.Linear(4, 3)

    @property
    def index(self):
        if not hasattr(self, "_index"):
            self.register_buffer("_index", torch.tensor([0, 2, 4]), persistent=False)
        return self._index.clone()

    def forward(self, x):
        return self.fc(x).index_copy(1, self.index, self.fc(x)[:, :3] + self.update(x))


class LazyIndexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.head = LazyIndexBuffer(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.qkv(x)))


def test_a_buffer_the_forward_registers_while_captured_is_registered_again_from_real_tensors():
    """Before: torch.export's capture left `_index` a FakeTensor buffer on the module, the steps' forwards
    that run the module's own code (no statistics: stat_every=2) indexed with it, the gradients were
    FakeTensors and the second step raised a data-dependent GuardOnDataDependentSymNode. Now the buffer is
    gone after the capture, the first eager read registers it again, and the losses and gradients are the
    module's own."""
    torch.manual_seed(0)
    model = LazyIndexNet().double()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, "kfac", lr=0.1, capture="export", stat_every=2)
    x, y = batch(torch.float64)
    for _ in range(4):
        loss, loss_ref = F.cross_entropy(c(x), y), F.cross_entropy(reference(x), y)
        assert torch.equal(loss, loss_ref)
        loss.backward()
        loss_ref.backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert type(p.grad) is torch.Tensor and torch.equal(p.grad, q.grad)
        c.step()
        c.zero_grad()
        reference.zero_grad()
        reference.load_state_dict(model.state_dict())
    assert type(model.qkv._index) is torch.Tensor and model.qkv._index.tolist() == [0, 2, 4]


class ComplexLinear(nn.Module):
    """y = z Wᵀ + b over complex z, W and b held as real (…, 2) parameters (the fix the error names)."""

    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i, 2) / (2 * i) ** 0.5)
        self.b = nn.Parameter(torch.zeros(o, 2))

    def forward(self, z):
        return z @ torch.view_as_complex(self.w).T + torch.view_as_complex(self.b)


@pytest.mark.parametrize("layer", ["linear", "matmul"])
def test_complex_parameters_are_refused_at_compile_naming_the_fix(layer):
    """A complex parameter crashed every preconditioner's first step inside the non-finite check
    (torch.aminmax has no complex kernel), after the taps had cast its complex statistics to real with only
    torch's warning (benchmarks/results/first_contact_21_families.md)."""
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6, dtype=torch.cfloat)
            self.w = nn.Parameter(torch.randn(6, 3, dtype=torch.cfloat))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x.to(torch.cfloat)) if layer == "linear" else x.to(torch.cfloat) @ self.a.weight.T
            return self.head(torch.view_as_real(torch.matmul(h, self.w)).flatten(1))

    model = Complex()
    for optimizer, hparams in (("kfac", {"loss": "mse"}), ("shampoo", {"lr": 1e-3}), ("auto", {"lr": 1e-3})):
        with pytest.raises(gnfx.ConfigError, match=r"'w' is a complex parameter \(torch.complex64, and 2 "
                                                   r"more\).*torch.view_as_real\(w\).*torch.view_as_complex"):
            gnfx.compile(model, optimizer, **hparams)
    model.a.requires_grad_(False)
    model.w.requires_grad_(False)
    gnfx.compile(model, "diag", lr=1e-3)  # frozen complex parameters are not trained: nothing to refuse


def test_complex_weights_held_as_real_numbers_train_as_adamw_trains_them():
    """The fix the refusal names: diag at an lr steps the real-held complex weights exactly as torch's AdamW."""
    torch.manual_seed(0)
    model = nn.Sequential(ComplexLinear(4, 6), ComplexLinear(6, 3))
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"0.0% of the trainable parameters.*0.w .*'view_as_complex'"):
        compiled = gnfx.compile(model, "diag", lr=1e-2)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)  # gnfx.compile's default
    x, y = batch()
    for _ in range(3):
        for net, step in ((compiled, compiled.step), (reference, adamw.step)):
            F.cross_entropy(net(x.to(torch.cfloat)).abs(), y).backward()
            step()
            net.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer, hparams", [("kfac", {"loss": "cross_entropy"}),
                                                ("kfac", {"loss": "cross_entropy", "fisher": "empirical"}),
                                                ("diag", {"loss": "mse", "step": "quadratic"})])
def test_a_complex_output_under_loss_is_named_with_the_fix(optimizer, hparams):
    """A model returning complex z (real parameters; the loss takes z.abs()) was told "got a 2-dimensional tensor"
    (the sampled Fisher) or "this forward returned 0 (shapes [])" (loss= elsewhere): complex tensors are no
    floating outputs. Now both name the complex output and the fix; without loss= it trains (lr given)."""
    class ComplexOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x):
            return torch.view_as_complex(self.a(x).view(-1, 3, 2))

    x, y = batch()
    compiled = gnfx.compile(ComplexOut(), optimizer, **hparams)
    with pytest.raises(gnfx.GnfxError, match=r"complex tensor \(torch.complex64, shape \(8, 3\)\).*"
                                             r"z.abs\(\), torch.view_as_real\(z\)\).*without loss= and with an lr"):
        out = compiled(x).abs()
        loss = F.cross_entropy(out, y) if hparams["loss"] == "cross_entropy" else F.mse_loss(out, torch.ones_like(out))
        loss.backward()
        compiled.step()
    compiled = gnfx.compile(ComplexOut(), optimizer, lr=1e-2)
    before = [p.detach().clone() for p in compiled.parameters()]
    F.cross_entropy(compiled(x).abs(), y).backward()
    compiled.step()
    assert compiled.optimizer.steps == 1 and not any(torch.equal(p, q) for p, q in zip(compiled.parameters(), before))
