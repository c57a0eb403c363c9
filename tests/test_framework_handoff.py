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
