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
  named at the first backward, where it was modelled wrongly, silently;
- torch.amp.GradScaler: gradient-only plans unscale and skip overflowing steps, the others refuse it;
- nn.Embedding(sparse=True) is refused at compile; a model returning only its loss is told the fix.
The exported nn.MultiheadAttention (tests/test_attention.py) and nn.InstanceNorm (tests/test_layer_kinds.py)
are tested with their kinds.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx


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


def test_copying_or_pickling_the_compiled_model_names_the_fix():
    model = MLP()
    c = gnfx.compile(model, "kfac", lr=0.05)
    train(c, 1)
    for attempt in (lambda: copy.deepcopy(c), lambda: pickle.dumps(c), lambda: torch.save(c, io.BytesIO())):
        with pytest.raises(gnfx.GnfxError, match=r"cannot be copied or pickled.*Fix: copy or save that model"):
            attempt()
    copy.deepcopy(model)  # the fix: the original module copies, and shares the compiled one's parameters


def test_ggn_products_and_diagnose_through_an_operation_without_jvp_raise_the_quadratic_steps_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(7, 4), nn.Linear(4, 3))
    ids, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 3, (8,))
    v = [torch.randn_like(p) for p in model.parameters()]
    message = r"(?s)gnfx.ggn .*forward-mode derivatives.*_embedding_bag.*Fix: measure a model without"
    for product in (gnfx.ggn.ggn_vp, gnfx.ggn.fisher_vp, gnfx.ggn.hvp):
        with pytest.raises(gnfx.GnfxError, match=message):
            product(model, "cross_entropy", ids, y, v)
    with pytest.warns(UserWarning, match="in curvature blocks"):
        c = gnfx.compile(model, "kfac", lr=0.1)
    F.cross_entropy(c(ids), y).backward()
    c.step()
    with pytest.raises(gnfx.GnfxError, match=message):
        gnfx.diagnose(c, (ids, y), loss="cross_entropy")


class FeaturesFirst(MLP):
    """Returns (features, logits), as models that expose an embedding do: the logits are not first."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h, self.b(h)


def segmentation_net():
    """Classes on dimension 1 of an (N, C, H, W) output, as F.cross_entropy takes them."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))


@pytest.mark.parametrize("case", ["features first", "classes on dimension 1", "summed"])
@pytest.mark.parametrize("name", ["kfac", "rank1"])
def test_a_loss_that_is_not_the_mean_cross_entropy_of_the_last_dimension_of_the_first_output_is_named(case, name):
    """loss='cross_entropy' models the mean softmax cross-entropy over the last dimension of the first
    output: these losses are not that, and gnfx used to model them as if they were, silently (the
    summed one stalled kfac's quadratic step at a loss of 1.375 where the mean reached 0.12)."""
    torch.manual_seed(0)
    if case == "classes on dimension 1":
        c = gnfx.compile(segmentation_net(), name, loss="cross_entropy")
        x, y = torch.randn(2, 2, 5, 6), torch.randint(0, 3, (2, 5, 6))
        loss = lambda: F.cross_entropy(c(x), y)  # noqa: E731
    else:
        c = gnfx.compile(FeaturesFirst() if case == "features first" else MLP(), name, loss="cross_entropy")
        x, y = batch()
        loss = (lambda: F.cross_entropy(c(x)[1], y)) if case == "features first" else (  # noqa: E731
            lambda: F.cross_entropy(c(x), y, reduction="sum"))
    what = "not one of a mean" if case == "summed" else "not one of a cross-entropy over that dimension"
    with pytest.raises(gnfx.GnfxError, match=rf"(?s){what}.*Fix: return the logits"):
        loss().backward()


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


@pytest.mark.parametrize("hparams", [dict(lr=0.05), dict(loss="cross_entropy")])
def test_grad_scaler_is_refused_where_the_statistics_carry_the_loss_scale(hparams):
    """K-FAC's S from the scaled backward (and the quadratic step's output gradient) would be s² (s)
    times too large: the kfac steps at lr=0.05 made no progress, the quadratic step's diverged. With
    loss= the scaled gradient at the logits is named at the backward already."""
    c = gnfx.compile(MLP(), "kfac", **hparams)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch()
    if "loss" in hparams:
        with pytest.raises(gnfx.GnfxError, match=r"not one of a mean.*GradScaler's scaled loss"):
            scaler.scale(F.cross_entropy(c(x), y)).backward()
        return
    scaler.scale(F.cross_entropy(c(x), y)).backward()
    with pytest.raises(gnfx.GnfxError, match=r"GradScaler scales the loss.*Fix: train without loss scaling"):
        scaler.step(c.optimizer)


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
