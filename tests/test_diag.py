"""optimizer="diag": AdamW whose second moment is g ⊙ g (source="grad2") or the per-example
Fisher diagonal of the taps (source="fisher"):

    m ← β₁ m + (1-β₁) g,    v ← β₂ v + (1-β₂) s,
    θ ← θ (1 - ηλ) - η/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + ε)

With source="grad2" it must be torch.optim.AdamW (schedulers, param groups, checkpoints
included); with source="fisher", s = 1/N Σ_n (∇ℓ̃_n)² on block parameters (per-example gradients
from torch.func.vmap) and g ⊙ g on the fallback parameters.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gnfx
from models import SquashedAffine
from references import TOL, cross_entropy, per_example_grads

ADAMW_TOL = dict(rtol=1e-6, atol=1e-6)


def model_with_a_fallback(dtype=torch.float32, seed=0):
    """Two linear blocks around a SquashedAffine (whose weight and bias fall back)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), SquashedAffine(8), nn.Linear(8, 3))
    nn.init.normal_(model[2].weight)
    nn.init.normal_(model[2].bias)
    return model.to(dtype)


def data(step, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train(model, optimizer, steps, start=0, scheduler=None):
    """The standard loop; `model` is a gnfx-compiled model or a plain one."""
    for step in range(start, start + steps):
        x, y = data(step, next(model.parameters()).dtype)
        cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same_parameters(a: nn.Module, b: nn.Module, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


def twins(**hparams):
    """A gnfx-compiled model and an identical plain copy with torch.optim.AdamW."""
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) | hparams
    model = model_with_a_fallback()
    reference = copy.deepcopy(model)
    c = gnfx.compile(model, optimizer="diag", source="grad2", **hp)
    return c, reference, torch.optim.AdamW(reference.parameters(), **hp)


# ----------------------------------------------------------------------------- = AdamW


@pytest.mark.parametrize("hparams", [
    dict(),
    dict(weight_decay=0.1, lr=3e-2),
    dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.05),
], ids=["defaults", "weight_decay", "betas_eps"])
def test_grad2_is_adamw(hparams):
    c, reference, adamw = twins(**hparams)
    assert len(c.layers) == 2 and len(c.layers.fallbacks) == 2
    train(c, c.optimizer, 20)
    train(reference, adamw, 20)
    assert_same_parameters(c, reference, **ADAMW_TOL)
    assert c.optimizer.steps == 20
    assert not torch.equal(c.get_submodule("0").weight, model_with_a_fallback()[0].weight)  # it trained


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad2_on_low_precision_parameters_is_adamw_on_float32_rounded_once_a_step(dtype):
    """A float16/bfloat16 model at the default ε = 1e-8: each step is torch.optim.AdamW's on float32
    copies of the parameters (float32 moments) whose result is rounded to the model's dtype. In the
    parameter's own dtype the first float16 step is 0/0 (ε and (1-β₂)g² are 0 there) and bfloat16's
    β₂ v rounds back to v."""
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    model = model_with_a_fallback(dtype)
    shadow = copy.deepcopy(model)  # the reference's gradients, from the same low-precision forward
    master = [p.detach().float().requires_grad_() for p in shadow.parameters()]
    adamw = torch.optim.AdamW(master, **hp)
    c = gnfx.compile(model, optimizer="diag", source="grad2", **hp)
    for step in range(20):
        train(c, c.optimizer, 1, start=step)
        x, y = data(step, dtype)
        cross_entropy(shadow(x), y).backward()
        for p, q in zip(master, shadow.parameters()):
            p.grad, q.grad = q.grad.float(), None
        adamw.step()
        with torch.no_grad():
            for p, q in zip(master, shadow.parameters()):
                q.copy_(p)  # rounded to the model's dtype
                p.copy_(q)
    assert c.optimizer.skipped_steps == 0
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in c.parameters())
    assert_same_parameters(c, shadow, rtol=0, atol=0)
    assert not torch.equal(c.get_submodule("0").weight, model_with_a_fallback(dtype)[0].weight)  # it trained
    for name, _ in c.named_parameters():
        state = c.optimizer.state_of(name)
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("schedule", ["step", "lambda"])
def test_grad2_is_adamw_under_an_lr_scheduler(schedule):
    c, reference, adamw = twins(lr=5e-2, weight_decay=0.1)

    def scheduler(opt):
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    ours, theirs = scheduler(c.optimizer), scheduler(adamw)
    train(c, c.optimizer, 20, scheduler=ours)
    train(reference, adamw, 20, scheduler=theirs)
    assert c.optimizer.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] < 5e-2
    assert_same_parameters(c, reference, **ADAMW_TOL)


def split_groups(optimizer, model, lr):
    """Move the last linear layer into a second param group with its own lr."""
    last = list(model.get_submodule("3").parameters())
    group = optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if all(p is not q for q in last)]
    optimizer.add_param_group({"params": last, "lr": lr})


def test_grad2_is_adamw_with_two_param_groups():
    c, reference, adamw = twins(lr=1e-2)
    split_groups(c.optimizer, c, lr=1e-1)
    split_groups(adamw, reference, lr=1e-1)
    train(c, c.optimizer, 10)
    train(reference, adamw, 10)
    for group in c.optimizer.param_groups:  # edit the groups in place, as a schedule would
        group["lr"] *= 0.3
    for group in adamw.param_groups:
        group["lr"] *= 0.3
    train(c, c.optimizer, 10, start=10)
    train(reference, adamw, 10, start=10)
    assert_same_parameters(c, reference, **ADAMW_TOL)


def test_param_groups_split_after_training_started():
    c, reference, adamw = twins(lr=1e-2)
    train(c, c.optimizer, 3)
    train(reference, adamw, 3)
    split_groups(c.optimizer, c, lr=1e-1)
    split_groups(adamw, reference, lr=1e-1)
    train(c, c.optimizer, 5, start=3)
    train(reference, adamw, 5, start=3)
    assert_same_parameters(c, reference, **ADAMW_TOL)


# ----------------------------------------------------------------------------- checkpoints


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("hparams", [
    dict(source="grad2", weight_decay=0.1),
    dict(source="fisher", stat_every=3, stat_decay=0.9, weight_decay=0.1),
], ids=["grad2", "fisher"])
def test_resume_from_a_checkpoint_is_bit_for_bit_the_uninterrupted_run(hparams):
    hp = dict(lr=1e-2) | hparams
    c = gnfx.compile(model_with_a_fallback(), **hp)
    scheduler = torch.optim.lr_scheduler.StepLR(c.optimizer, step_size=3, gamma=0.7)
    train(c, c.optimizer, 10, scheduler=scheduler)
    checkpoint = roundtrip({"model": c.state_dict(), "optimizer": c.optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()})
    train(c, c.optimizer, 10, start=10, scheduler=scheduler)

    resumed = gnfx.compile(model_with_a_fallback(seed=1), **hp)  # other initial values, overwritten
    resumed.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler = torch.optim.lr_scheduler.StepLR(resumed.optimizer, step_size=3, gamma=0.7)
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    assert resumed.optimizer.steps == 10
    train(resumed, resumed.optimizer, 10, start=10, scheduler=resumed_scheduler)

    for (name, p), q in zip(c.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    if hparams["source"] == "fisher":
        for block in c.layers:
            for k, v in c.statistics(block.name).items():
                assert torch.equal(v, resumed.statistics(block.name)[k])


# ----------------------------------------------------------------------------- source="fisher"


def test_fisher_second_moment_is_the_per_example_fisher_diagonal():
    """One step with β₁ = 0: m = g, v = (1-β₂) s, with s = 1/N Σ_n (∇ℓ̃_n)² on the blocks' weights
    and biases and s = g ⊙ g (the mini-batch gradient) on the SquashedAffine's fallback parameters."""
    beta2 = 0.99
    model = model_with_a_fallback(torch.float64)
    c = gnfx.compile(model, source="fisher", betas=(0.0, beta2), lr=1e-3, eps=1e-8, stat_decay=0.0)
    blocks = {p for b in c.layers for p in b.params}
    fallbacks = {f.param for f in c.layers.fallbacks}
    assert blocks == {"0.weight", "0.bias", "3.weight", "3.bias"} and fallbacks == {"2.weight", "2.bias"}
    x, y = data(0, torch.float64)
    grads = per_example_grads(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cross_entropy(c(x), y).backward()
    c.step()
    for name, p in model.named_parameters():
        g = grads[name].mean(0)  # the mini-batch gradient is the mean of the per-example ones
        s = grads[name].square().mean(0) if name in blocks else g * g
        state = c.optimizer.state[p]
        torch.testing.assert_close(state["exp_avg"], g, **TOL)
        torch.testing.assert_close(state["exp_avg_sq"], (1 - beta2) * s, **TOL)
        # the step: θ - η m / (√(v / (1-β₂)) + ε) = θ - η g / (√s + ε)
        torch.testing.assert_close(p.detach(), before[name] - 1e-3 * g / (s.sqrt() + 1e-8), **TOL)
    # the per-example diagonal is not the squared mean gradient
    assert not torch.allclose(grads["3.weight"].square().mean(0), grads["3.weight"].mean(0).square())


def test_fisher_second_moment_uses_the_last_statistic_between_statistic_steps():
    """With stat_every=2, step 1 collects nothing and adds the diag of step 0 again."""
    beta2 = 0.9
    model = model_with_a_fallback(torch.float64)
    c = gnfx.compile(model, source="fisher", betas=(0.0, beta2), stat_every=2, stat_decay=0.0)
    x, y = data(0, torch.float64)
    s0 = per_example_grads(model, x, y)["3.weight"].square().mean(0)
    cross_entropy(c(x), y).backward()
    c.step()
    c.zero_grad()
    assert not c.optimizer.collecting
    cross_entropy(c(data(1, torch.float64)[0]), data(1, torch.float64)[1]).backward()
    c.step()
    v = c.optimizer.state[model[3].weight]["exp_avg_sq"]
    torch.testing.assert_close(v, beta2 * (1 - beta2) * s0 + (1 - beta2) * s0, **TOL)


@pytest.mark.parametrize("source", ["grad2", "fisher"])
def test_frozen_parameters_never_change(source):
    model = model_with_a_fallback()
    for p in [model[0].bias, *model[2].parameters(), model[3].weight]:
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    c = gnfx.compile(model, source=source, lr=1e-1, weight_decay=0.5, stat_every=2)
    train(c, c.optimizer, 6)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None and not c.optimizer.state[p], name
        else:
            assert c.optimizer.state[p]["step"] == 6, name
    assert not torch.equal(model[0].weight, model_with_a_fallback()[0].weight)


def test_a_parameter_added_after_compile_is_updated_or_rejected():
    model = model_with_a_fallback()
    model[3].weight.requires_grad_(False)
    c = gnfx.compile(model, lr=1e-1)
    model[3].weight.requires_grad_(True)
    before = model[3].weight.detach().clone()
    try:
        c.optimizer.add_param_group({"params": [model[3].weight]})
    except gnfx.GnfxError:
        return  # rejected with a gnfx error: fine
    train(c, c.optimizer, 1)
    assert not torch.equal(model[3].weight, before)
