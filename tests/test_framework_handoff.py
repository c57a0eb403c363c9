"""The compiled model's optimizer handed to training frameworks that build or reset the optimizer themselves.

skorch builds its optimizer as `optimizer(param_groups, lr=...)` from a class and the module's parameters;
fastai wraps a torch optimizer in `OptimWrapper(params, opt=...)`, builds it the same way, and its
`clear_state` (run by `Learner.freeze`, `unfreeze`, `fine_tune`) assigns the optimizer a new, empty
`state`. Each pattern is reproduced here in plain torch (neither library is needed): `model.optimizer_for`
takes torch.optim's arguments, and an assigned state is the one the steps use and `state_dict` saves.
The references: the same model compiled with those settings directly, and a second compiled model loaded
from the first's checkpoint (which must step as the first does).
"""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import gnfx
from tests.models import TanhMLP

X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))


def train(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
        optimizer.zero_grad()


def mlp():
    torch.manual_seed(0)
    return TanhMLP((8, 16, 4))


def test_a_framework_s_lr_reaches_the_step_as_compiling_with_it():
    """skorch's `optimizer(param_groups, lr=...)`: the same steps as gnfx.compile(..., lr=...)."""
    net, reference_net = mlp(), mlp()
    model = gnfx.compile(net, "kfac", lr=1e-3)
    handed = model.optimizer_for([{"params": list(model.parameters())}], lr=0.05)
    assert handed is model.optimizer and handed.param_groups[0]["lr"] == 0.05
    reference = gnfx.compile(reference_net, "kfac", lr=0.05)
    train(model, handed, 3)
    train(reference, reference.optimizer, 3)
    for p, q in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_groups_from_a_splitter_each_step_at_their_own_lr():
    """fastai's splitter gives lists of parameters (OptimWrapper makes each a group): a group at lr 0 stays."""
    net = mlp()
    model = gnfx.compile(net, "kfac", lr=1e-3)
    first, rest = net.layers[0].parameters(), [p for m in list(net.layers)[1:] for p in m.parameters()]
    optimizer = model.optimizer_for([{"params": list(first), "lr": 0.0}, {"params": rest}], lr=0.05)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.05]
    before = [p.detach().clone() for p in net.parameters()]
    train(model, optimizer, 2)
    moved = [not torch.equal(p, b) for p, b in zip(net.parameters(), before)]
    assert moved == [False, False] + [True] * (len(moved) - 2)


@pytest.mark.parametrize("first", ["its own", "another model's"])
def test_an_optimizer_built_per_parameter_is_refused_naming_the_loop_instead(first):
    """pyro.optim.PyroOptim(constructor, args) builds one optimizer per parameter of pyro's param store,
    constructor([p], **args), the first call at SVI's first step; with model.optimizer_for that first call
    handed over one tensor, and the error spoke of parameters left out or of a criterion's parameter, which
    the user had not done. Now it says that the framework builds an optimizer per parameter and names the
    loop that steps the compiled model instead. Reproduced in plain torch: a decoder's parameter is another
    model's, as pyro's param store holds the model's and the guide's."""
    net, decoder = mlp(), torch.nn.Linear(4, 8)
    model = gnfx.compile(net, "kfac", lr=1e-3)
    store = list(net.parameters()) + list(decoder.parameters())
    store = store if first == "its own" else store[::-1]
    with pytest.raises(gnfx.ConfigError, match=r"(?s)optimizer per parameter.*PyroOptim.*loss.backward\(\); "
                                               r"compiled.step\(\)"):
        {id(p): model.optimizer_for([p], lr=1e-3) for p in store}  # PyroOptim's optimizer per parameter


def test_frozen_parameters_are_left_out_and_strangers_and_gaps_are_named():
    net = mlp()
    net.layers[0].bias.requires_grad_(False)  # frozen before compile: skorch hands it over anyway
    model = gnfx.compile(net, "kfac", lr=1e-3)
    model.optimizer_for(list(net.parameters()), lr=0.1)
    assert sum(len(g["params"]) for g in model.optimizer.param_groups) == len(list(net.parameters())) - 1
    criterion_weight = torch.nn.Parameter(torch.ones(4))  # a criterion's parameter (skorch's criterion_)
    with pytest.raises(gnfx.ConfigError, match="no parameter of the compiled model"):
        model.optimizer_for(list(net.parameters()) + [criterion_weight], lr=0.1)
    with pytest.raises(gnfx.ConfigError, match="in no param group"):
        model.optimizer_for(list(net.layers[0].parameters()), lr=0.1)
    with pytest.raises(gnfx.ConfigError, match="momentum"):
        model.optimizer_for(list(net.parameters()), lr=0.1, momentum=0.9)
    with pytest.raises(gnfx.ConfigError, match="more than one param group"):
        model.optimizer_for([{"params": list(net.parameters())}, {"params": [net.layers[0].weight]}])


def test_an_assigned_state_is_the_one_stepped_and_saved():
    """fastai's clear_state (`opt.state = defaultdict(dict)`): the steps after it keep their state in the
    new container, so a checkpoint taken then resumes as the run goes on."""
    net = mlp()
    model = gnfx.compile(net, "kfac", lr=0.05)
    train(model, model.optimizer, 2)
    model.optimizer.state = defaultdict(dict)
    train(model, model.optimizer, 2)
    assert len(model.optimizer.state) > 0
    resumed_net = copy.deepcopy(net)
    resumed = gnfx.compile(resumed_net, "kfac", lr=0.05)
    resumed.optimizer.load_state_dict(model.optimizer.state_dict())
    train(model, model.optimizer, 2)
    train(resumed, resumed.optimizer, 2)
    for p, q in zip(net.parameters(), resumed_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer, warns", [("kfac", True), ("diag", False)])
def test_a_momentum_schedule_says_what_it_reaches(optimizer, warns):
    """torch's OneCycleLR (and fastai's fit_one_cycle) cycle betas[0], Adam's β1 of the diagonal preconditioner
    only: under a curvature plan, whose momentum is gnfx.compile's, that is said once; under "diag" (Adam on
    every parameter) the schedule acts on every step and nothing is said."""
    model = gnfx.compile(mlp(), optimizer, lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(model.optimizer, max_lr=0.05, total_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            train(model, model.optimizer, 1)
            schedule.step()
    said = [str(w.message) for w in caught if "betas[0] moved" in str(w.message)]
    assert len(said) == warns
    if warns:
        assert "kfac's μ=0.9" in said[0] and "cycle_momentum=False" in said[0]
    unscheduled = gnfx.compile(mlp(), optimizer, lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(unscheduled.optimizer, max_lr=0.05, total_steps=4,
                                                   cycle_momentum=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            train(unscheduled, unscheduled.optimizer, 1)
            schedule.step()
    assert not [w for w in caught if "betas[0] moved" in str(w.message)]


def test_a_model_stepped_by_another_optimizer_is_said_once():
    """The compiled model handed to a framework whose own optimizer steps it (fastai's default opt_func after
    `learn.model = gnfx.compile(...)`, skorch's optimizer=torch.optim.SGD): gnfx's step never runs and every
    forward collected statistics for nothing, silently. That is said once; gradient accumulation (two forwards
    and backwards before gnfx's step) and gnfx's own steps say nothing."""
    model = gnfx.compile(mlp(), "kfac", lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # accumulation, then gnfx's step
            F.cross_entropy(model(X), Y).backward()
        train(model, model.optimizer, 3)
    assert not [w for w in caught if "another optimizer" in str(w.message)]
    handed_to_another = gnfx.compile(mlp(), "kfac", lr=1e-3)
    other = torch.optim.SGD(handed_to_another.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(handed_to_another, other, 3)
    assert len([w for w in caught if "another optimizer steps them" in str(w.message)]) == 1


def test_a_closure_that_always_backpropagates_steps_as_no_closure():
    """skorch steps `optimizer.step(step_fn)`, a closure written as torch's documentation writes one (zero_grad,
    forward, backward, return the loss) whatever the grad mode; the quadratic step calls it again under no_grad
    for L(θ+s), where its backward raised a GnfxError on skorch's first step. It is now taken as no closure for
    L(θ+s): 3 steps go exactly where those of the loop without a closure go."""
    net, reference_net = mlp(), mlp()
    model, reference = (gnfx.compile(n, "kfac", loss="cross_entropy") for n in (net, reference_net))

    def closure():
        model.optimizer.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss
    torch.manual_seed(1)  # the same Monte Carlo targets for both
    for _ in range(3):
        model.optimizer.step(closure)
    torch.manual_seed(1)
    train(reference, reference.optimizer, 3)
    for p, q in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_model_stepped_through_data_by_another_optimizer_is_said_once():
    """fastai's optimizers write `p.data` (`p.data.add_(...)`), which moves no version counter: the smallest
    parameter's value tells."""
    model = gnfx.compile(mlp(), "kfac", lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            F.cross_entropy(model(X), Y).backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)
                p.grad = None
    assert len([w for w in caught if "another optimizer steps them" in str(w.message)]) == 1
