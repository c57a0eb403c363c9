"""Mixed precision with torch.amp.GradScaler: `scaler.scale(loss).backward(); scaler.step(optimizer);
scaler.update()` for every plan, also those that read the loss's output gradients (gnfx.optimizer's module
doc): their statistics, the quadratic step's output gradient and loss='s checks of it carry the loss scale
s, which the step divides out.

The reference is the same training without the scaler: on a CPU in float32 the scale alone
(GradScaler("cpu"), no autocast) changes nothing but s, a power of two, so the parameters and every
statistic (A, S, the per-example diagonals, rank1's gradient, a position table's energies) must be equal
to float32 rounding. The scaler's growth_interval=1 doubles s after every step: each step's backward has
another s. Each test raised a GnfxError before (the plans were refused under a scaler).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from models import TanhMLP
from steps import backward_and_step

INIT_SCALE = 2.0 ** 10
TOL = dict(rtol=1e-6, atol=1e-9)


class PositionNet(nn.Module):
    """A token embedding plus a position table (gnfx.layouts.position: its A from the energies ε of S's
    gradients, s² under a scaler), pooled into 3 classes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids) + self.pos[:, :ids.shape[1]]).mean(1))


def batches(model: str, count: int):
    """`count` (input, target) batches of 8 examples for `model` ("mlp" or "position")."""
    g = torch.Generator().manual_seed(0)
    if model == "position":
        return [(torch.randint(0, 9, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g))
                for _ in range(count)]
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(count)]


QUADRATIC = dict(loss="cross_entropy", stat_every=1, damping_every=1)  # ρ of the recovered loss on every step
CASES = {  # (model, optimizer, hparams), statistics on every step (but one)
    "kfac": ("mlp", "kfac", dict(lr=0.05, stat_every=1)),
    "kfac, stat_every=2, kfac_approx=reduce": ("mlp", "kfac", dict(lr=0.05, stat_every=2, kfac_approx="reduce")),
    "ekfac": ("mlp", "ekfac", dict(lr=0.05, stat_every=1)),
    "rank1": ("mlp", "rank1", dict(lr=0.05, stat_every=1)),
    "diag of the Fisher": ("mlp", "diag", dict(lr=0.05, source="fisher", stat_every=1)),
    "kfac, loss= (quadratic step, fisher=mc)": ("mlp", "kfac", QUADRATIC),
    "kfac, loss= (quadratic step, fisher=empirical)": ("mlp", "kfac", dict(QUADRATIC, fisher="empirical")),
    "kfac, fisher=mc, step=lr": ("mlp", "kfac", dict(loss="cross_entropy", fisher="mc", step="lr", lr=0.05,
                                                      stat_every=1)),
    # A = ε/Σε: ε's s² cancels; S's does not
    "kfac of a position table": ("position", "kfac", dict(lr=0.05, stat_every=1, capture="fx")),
}


def train(case: str, scaled: bool, steps: int = 3, micro_batches: int = 1, clip: float | None = None,
          not_finite_at: int | None = None):
    """Train case `case` for `steps` steps (with `micro_batches` backwards of a batch each before a step,
    their losses divided by that count), under GradScaler("cpu") if `scaled`; with `clip`, the gradients
    clipped to that norm before the step (under the scaler after scaler.unscale_). `not_finite_at`: the
    step whose gradient gets an inf under the scaler (which skips it); without the scaler that step is
    left out, forward and backward.
    (parameters, every block's statistics, the compiled model, the scaler)."""
    model_kind, name, hparams = CASES[case]
    torch.manual_seed(0)
    model = TanhMLP((4, 6, 3)) if model_kind == "mlp" else PositionNet()
    c = gnfx.compile(model, name, **hparams)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1)  # s doubles after a step
    data = iter(batches(model_kind, steps * micro_batches))
    for step in range(steps):
        if step == not_finite_at and not scaled:  # the reference: without that step's batch
            [next(data) for _ in range(micro_batches)]
            continue
        for _ in range(micro_batches):
            x, y = next(data)
            loss = F.cross_entropy(c(x), y) / micro_batches
            (scaler.scale(loss) if scaled else loss).backward()
        if step == not_finite_at:
            next(iter(model.parameters())).grad[0, 0] = float("inf")
        if clip is not None:
            if scaled:
                scaler.unscale_(c.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > clip  # it clips
        if scaled:
            scaler.step(c.optimizer)
            scaler.update()
        else:
            c.step()
        c.zero_grad()
    statistics = {b: c.statistics(b) for b in c.optimizer.statistics.blocks}
    return [p.detach().clone() for p in model.parameters()], statistics, c, scaler


def assert_same_training(scaled, plain) -> None:
    """The parameters, every statistic and the quadratic step's figures (ρ, the actual reduction of the loss
    it recovers from the output gradient, ...) of two runs of `train` equal to float32 rounding."""
    for p, q in zip(scaled[0], plain[0]):
        torch.testing.assert_close(p, q, **TOL)
    figures = [{k: v for k, v in run[2].optimizer.last_step.items() if k != "alphas"} for run in (scaled, plain)]
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)
    assert scaled[1].keys() == plain[1].keys()
    for block, stats in plain[1].items():
        assert scaled[1][block].keys() == stats.keys(), block
        for name, value in stats.items():
            torch.testing.assert_close(scaled[1][block][name], value, **TOL, msg=f"{name} of {block}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_under_a_grad_scaler_is_training_without_it(case):
    """Three steps, each backward under another scale (2¹⁰, 2¹¹, 2¹²): the same parameters and statistics."""
    scaled, plain = train(case, True), train(case, False)
    assert scaled[3].get_scale() == INIT_SCALE * 2 ** 3  # each step ran (none skipped) and s moved
    assert scaled[2].optimizer.steps == plain[2].optimizer.steps == 3
    assert_same_training(scaled, plain)


@pytest.mark.parametrize("case", ["kfac", "ekfac", "kfac, loss= (quadratic step, fisher=mc)"])
def test_micro_batches_of_one_step_share_its_scale(case):
    """Two backwards (gradient accumulation) before each step: their statistics, accumulated under one s,
    are unscaled once."""
    assert_same_training(train(case, True, micro_batches=2), train(case, False, micro_batches=2))


@pytest.mark.parametrize("case", ["kfac", "rank1", "kfac, loss= (quadratic step, fisher=empirical)"])
def test_unscale_then_clip_then_step(case):
    """scaler.unscale_(optimizer), clip_grad_norm_, scaler.step: the step gets grad_scale None (the
    gradients are unscaled and clipped already) and reads s from the scaler for the statistics."""
    assert_same_training(train(case, True, clip=0.05), train(case, False, clip=0.05))


@pytest.mark.parametrize("case", ["kfac", "rank1", "kfac, loss= (quadratic step, fisher=empirical)"])
def test_a_step_whose_gradients_are_not_finite_is_skipped_and_its_statistics_dropped(case):
    """The second of three steps has an inf in a gradient: under the scaler it moves nothing (no
    parameter, statistic or counter) and the statistics of its backward are dropped, so the run equals
    the run without that step (its batch skipped); scaler.update() then halves s."""
    scaled, plain = train(case, True, not_finite_at=1), train(case, False, not_finite_at=1)
    assert scaled[3].get_scale() == INIT_SCALE * 2  # grown, backed off, grown
    assert scaled[2].optimizer.steps == plain[2].optimizer.steps == 2
    assert scaled[2].optimizer.skipped_steps == 0  # (nan_policy's count: the scaler's skips are torch.optim's)
    assert_same_training(scaled, plain)


def test_the_skipped_step_leaves_everything_as_it_was():
    """Right after the skipped step: the parameters and the statistics of the step before, unchanged."""
    before = train("kfac", True, steps=1)
    c, scaler = before[2], before[3]
    x, y = batches("mlp", 2)[1]
    scaler.scale(F.cross_entropy(c(x), y)).backward()
    c.optimizer.parameter_store.named["layers.0.weight"].grad[0, 0] = float("nan")
    scaler.step(c.optimizer)
    assert c.optimizer.steps == 1 and not c.optimizer.collected
    for p, q in zip(c.parameters(), before[0]):
        assert torch.equal(p, q)
    for block, stats in before[1].items():
        for name, value in stats.items():
            assert torch.equal(c.statistics(block)[name], value), (block, name)


def test_a_scaled_loss_stepped_without_the_scaler_is_named():
    """With loss= the gradient at z is checked: s times a mean cross-entropy's passes at scaler.step, which
    tells its s, and is named at a plain step, which does not."""
    c = gnfx.compile(TanhMLP((4, 6, 3)), "kfac", loss="cross_entropy")
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches("mlp", 1)[0]
    scaler.scale(F.cross_entropy(c(x), y)).backward()
    with pytest.raises(gnfx.GnfxError, match=r"not one of a mean.*GradScaler's scaled loss stepped without "
                                             r"scaler.step\(optimizer\)"):
        c.step()
    assert c.optimizer.steps == 0 and not c.optimizer.statistics["layers.0"]._examples  # that backward dropped


def test_float16_autocast_under_the_scaler_trains_as_without_it():
    """The use it is for: float16 autocast (on a CPU here), the quadratic step at defaults but statistics on
    every step. The scaled backward rounds otherwise than the plain one, so the losses agree to float16's
    precision, not exactly; the output gradient is unscaled into float32 (a float16 one of the mean would
    underflow on a large batch)."""
    x, y = batches("mlp", 1)[0]
    losses = []
    for scaled in (True, False):
        torch.manual_seed(0)
        c = gnfx.compile(TanhMLP((4, 6, 3)), "kfac", loss="cross_entropy", stat_every=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        run = []
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.float16):
                z = c(x)
            loss = F.cross_entropy(z.float(), y)
            backward_and_step(c, loss, scaler if scaled else None)
            run.append(loss.item())
        assert z.dtype == torch.float16 and c.optimizer.steps == 8
        if scaled:
            assert c.optimizer.quadratic._output_grad[0].dtype == torch.float32
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert losses[0][-1] < 0.1 * losses[0][0]  # it trains


def test_bfloat16_autocast_with_a_closure_adapts_damping_as_float32_does():
    """bfloat16 autocast as a GPU user writes it, no scaler: the forward and the closure under autocast, the
    quadratic step at defaults. The model and L(θ+s) are judged at the float32 loss's resolution (the step's
    products replay the forward in float32), so λ falls from λ0 = 1 as in float32 and the runs train alike;
    at bfloat16's ε (2⁻⁷) the resolution r would exceed every predicted reduction here and λ would never move."""
    x, y = batches("mlp", 1)[0]
    runs = {}
    for dtype in (torch.bfloat16, None):
        torch.manual_seed(0)
        c = gnfx.compile(TanhMLP((4, 6, 3)), "kfac", loss="cross_entropy")

        def closure():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return F.cross_entropy(c(x).float(), y)
        losses, dampings = [], []
        for _ in range(30):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                z = c(x)
            assert z.dtype == (dtype or torch.float32)
            loss = F.cross_entropy(z.float(), y)
            loss.backward()
            c.step(closure)
            c.zero_grad()
            losses.append(loss.item())
            dampings.append(c.optimizer.last_step["damping"])
            assert c.optimizer.last_step["resolved"]
        runs[dtype] = losses, dampings
    (bf16, bf16_damping), (f32, f32_damping) = runs[torch.bfloat16], runs[None]
    assert min(bf16_damping) < 1e-2 and min(f32_damping) < 1e-2
    assert bf16[-1] < 0.1 * bf16[0] and f32[-1] < 0.1 * f32[0]
    assert bf16[:5] == pytest.approx(f32[:5], rel=3e-2)
