"""A forward with random numbers (dropout, DropPath) replayed by the quadratic-model step draws the
training forward's own (gnfx.random_state), in float64 against an independent evaluation."""
from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("with_closure", [False, True])
def test_rho_of_a_dropout_model_compares_the_training_forwards_own_sub_network(with_closure):
    """The actual reduction L(θ) - L(θ+s) of ρ equals the loss of the training forward minus that of the
    model at θ+s under the same dropout mask (evaluated here from the generator's state before the
    training forward), and the step leaves the generator as the backward left it. Without a closure
    L(θ+s) is gnfx's replay; with `step(closure)` it is the closure's second call (under no_grad,
    after the step), which draws the first call's mask too. With a new mask per replay (before
    gnfx.random_state) the two differed by the mask's noise, ρ fell to -1e9 on a DropPath model and λ
    stayed at its maximum (benchmarks/results/library_models.md)."""
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
        if with_closure:
            loss = compiled.step(closure)
        else:
            loss = closure()
            after_backward = torch.get_rng_state()
            compiled.step()
            assert torch.equal(torch.get_rng_state(), after_backward)
        compiled.zero_grad()
        last = compiled.optimizer.last_step
        if not last["adapted"] or last["rejected"] or last["backtracks"] or last["expansion"] != 1.0:
            continue
        torch.set_rng_state(state)
        with torch.no_grad():
            loss_after = F.cross_entropy(model(x), y)
        assert abs(last["actual"] - float(loss.detach() - loss_after)) < 1e-12, (step, last["actual"])
        checked += 1
    assert checked >= 3
