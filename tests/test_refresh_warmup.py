"""`refresh_warmup` W: statistics, K-FAC's inverses and EKFAC's bases on each of the first W steps, then
on the usual intervals (stat_every, inv_every), counted on a small MLP."""
import pytest
import torch
from torch import nn

import gnfx
from gnfx.preconditioners import REGISTRY
from references import cross_entropy


# what each preconditioner refreshes on its refresh steps: K-FAC's damped inverses, EKFAC's eigenbases
REFRESHES = {"kfac": "refresh", "ekfac": "_refresh_bases"}


def run(optimizer: str, steps: int, **options) -> tuple[list[int], list[int], gnfx.CompiledModel]:
    """(the steps whose forward ran the taps, the steps that refreshed `optimizer`'s REFRESHES, the
    compiled model) of `steps` steps of a small MLP at a fixed lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    c = gnfx.compile(model, optimizer=optimizer, lr=1e-2, **options)
    collected, refreshed = [], []
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    cross_entropy(c(x), y).backward()  # the first call captures the model and builds the preconditioners
    (pre,) = c.optimizer.curvature
    name = REFRESHES.get(optimizer, "refresh")
    refresh = getattr(pre, name)
    setattr(pre, name, lambda *args: (refreshed.append(c.optimizer.steps), refresh(*args)))
    for step in range(steps):
        if step:
            cross_entropy(c(x), y).backward()
        if c.optimizer.collected:
            collected.append(step)
        c.step()
        c.zero_grad()
    return collected, sorted(set(refreshed)), c  # EKFAC refreshes the bases of each group of equal shape


@pytest.mark.parametrize("optimizer", REFRESHES)
def test_the_first_refresh_warmup_steps_collect_and_refresh_then_the_intervals_resume(optimizer):
    collected, refreshed, _ = run(optimizer, 13, stat_every=4, inv_every=4, refresh_warmup=3)
    assert collected == [0, 1, 2, 4, 8, 12]
    assert refreshed == [0, 1, 2, 4, 8, 12]


@pytest.mark.parametrize("optimizer", REFRESHES)
def test_without_warmup_only_the_intervals_collect_and_refresh(optimizer):
    collected, refreshed, _ = run(optimizer, 13, stat_every=4, inv_every=6, refresh_warmup=0)
    assert collected == [0, 4, 8, 12]
    assert refreshed == [0, 6, 12]


def test_rank1_takes_every_statistic_step_of_the_warmup_into_its_sketch():
    """rank1 refreshes after every statistic step, the warm-up's included: its sketch takes one
    vector w per batch (t counts them), none skipped and none twice."""
    collected, refreshed, c = run("rank1", 13, stat_every=4, refresh_warmup=3)
    assert collected == refreshed == [0, 1, 2, 4, 8, 12]
    (pre,) = c.optimizer.curvature
    for group in pre.groups:
        state = pre.group_state(group)
        assert (state["t"] + state["failures"]).tolist() == [len(collected)] * len(group.pieces)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_a_refresh_warmup_that_is_not_a_count_of_steps_is_a_config_error(bad):
    with pytest.raises(gnfx.ConfigError, match="refresh_warmup"):
        gnfx.compile(nn.Linear(3, 2), optimizer="kfac", lr=1e-2, refresh_warmup=bad)


@pytest.mark.parametrize("optimizer", REFRESHES)
def test_the_quadratic_step_warms_up_by_the_preconditioners_default_and_a_fixed_lr_does_not(optimizer):
    quadratic = gnfx.compile(nn.Linear(3, 2), optimizer=optimizer, loss="cross_entropy")
    assert quadratic.optimizer.refresh_warmup == REGISTRY[optimizer].quadratic_refresh_warmup
    fixed = gnfx.compile(nn.Linear(3, 2), optimizer=optimizer, lr=1e-2)
    assert fixed.optimizer.refresh_warmup == 0
    given = gnfx.compile(nn.Linear(3, 2), optimizer=optimizer, loss="cross_entropy", refresh_warmup=3)
    assert given.optimizer.refresh_warmup == 3

