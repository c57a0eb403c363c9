"""A forward with random numbers (dropout, DropPath) replayed by the quadratic-model step draws the
training forward's own (gnfx.random_state), in float64 against an independent evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from gnfx.random_state import RandomState


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)).double()


def test_replayed_block_draws_the_recorded_numbers_and_restores_the_generator():
    torch.manual_seed(3)
    state = RandomState()
    first = torch.rand(5)
    torch.rand(7)
    before = torch.get_rng_state()
    with state.replayed():
        again = torch.rand(5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), before)


def test_rho_of_a_dropout_model_compares_the_training_forwards_own_sub_network():
    """The actual reduction L(θ) - L(θ+s) of ρ equals the loss of the training forward minus that of the
    model at θ+s under the same dropout mask (evaluated here from the generator's state before the
    training forward), and the step leaves the generator as the backward left it. With a new mask
    per replay (before gnfx.random_state) the two differed by the mask's noise, ρ fell to -1e9 on a
    DropPath model and λ stayed at its maximum (benchmarks/results/library_models.md)."""
    model = dropout_mlp()
    compiled = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", fisher="empirical")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)
    checked = 0
    for step in range(4):
        torch.manual_seed(10 + step)
        state = torch.get_rng_state()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        after_backward = torch.get_rng_state()
        compiled.step()
        compiled.zero_grad()
        assert torch.equal(torch.get_rng_state(), after_backward)
        last = compiled.optimizer.last_step
        if not last["adapted"] or last["rejected"] or last["backtracks"] or last["expansion"] != 1.0:
            continue
        torch.set_rng_state(state)
        with torch.no_grad():
            loss_after = F.cross_entropy(model(x), y)
        assert abs(last["actual"] - float(loss.detach() - loss_after)) < 1e-12, (step, last["actual"], float(loss.detach() - loss_after))
        checked += 1
    assert checked >= 3


def test_the_closures_second_call_draws_the_first_calls_dropout_mask():
    """With `step(closure)` the actual reduction of ρ is the closure's loss before the step minus its
    loss after it, the second call (under no_grad, after the step) drawing the first call's dropout
    mask: here equal to the same model at θ+s evaluated from the generator's state before the first
    call. With a new mask on the second call ρ would compare two sub-networks, as the replays did."""
    model = dropout_mlp()
    compiled = gnfx.compile(model, optimizer="kfac", loss="cross_entropy", fisher="empirical")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)

    def closure():
        loss = F.cross_entropy(compiled(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    checked = 0
    for step in range(4):
        torch.manual_seed(10 + step)
        state = torch.get_rng_state()
        compiled.zero_grad()
        loss = compiled.step(closure)
        last = compiled.optimizer.last_step
        if not last["adapted"] or last["rejected"] or last["backtracks"] or last["expansion"] != 1.0:
            continue
        torch.set_rng_state(state)
        with torch.no_grad():
            loss_after = F.cross_entropy(model(x), y)
        assert abs(last["actual"] - float(loss.detach() - loss_after)) < 1e-12, (step, last["actual"])
        checked += 1
    assert checked >= 3
