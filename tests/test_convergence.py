"""Convergence in steps (never time): curvature must pay for itself on ill-conditioned problems.

Two full-batch MSE problems in float64:

* least squares: one bias-free nn.Linear(16, 4) on inputs whose feature scales span 1e-2..1e1;
  the scaled features are rotated by a fixed random orthogonal matrix, so that the
  ill-conditioning is not axis-aligned (a diagonal method is not handed the answer);
* a deep linear network 16 -> 16 -> 16 -> 8, no nonlinearity, fitting a linear map whose singular
  values span 1e-2..1e1.

The target is 1e-3 of the initial loss. AdamW (torch.optim.AdamW) gets its best learning rate
from a 6-point grid, and that best must lie inside the grid. K-FAC (the GGN of the MSE loss,
fisher="type2") and Shampoo (the paper's exponent, Adam grafting) get as many configurations each,
and must reach the target in at most half of AdamW's best step count.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx

DTYPE = torch.float64
BUDGET = 300  # steps, for AdamW
TARGET = 1e-3  # of the initial loss
ADAMW_LRS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
CONFIGS = {
    # the GGN of the MSE loss; KL clipping on or off, three learning rates
    "kfac": [dict(lr=lr, kl_clip=kl, fisher="type2", loss="mse", damping=1e-3, stat_every=1, inv_every=1,
                  momentum=0.0) for kl in (0.0, 1e-2) for lr in (0.1, 0.3, 1.0)],
    # fresh roots on every step after the first; the grid of AdamW's learning rates
    "shampoo": [dict(lr=lr, stat_every=1, precondition_frequency=1, start_preconditioning_step=1, momentum=0.0)
                for lr in ADAMW_LRS],
}


# ----------------------------------------------------------------------------- problems


def least_squares():
    g = torch.Generator().manual_seed(0)
    n, d, out = 256, 16, 4
    scales = torch.logspace(-2, 1, d, dtype=DTYPE)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    X = (torch.randn(n, d, generator=g, dtype=DTYPE) * scales) @ Q.T
    W = torch.randn(out, d, generator=g, dtype=DTYPE)

    def model():
        torch.manual_seed(0)
        return nn.Linear(d, out, bias=False).to(DTYPE)

    return model, X, X @ W.T


def deep_linear():
    g = torch.Generator().manual_seed(0)
    n, widths = 256, (16, 16, 16, 8)
    X = torch.randn(n, widths[0], generator=g, dtype=DTYPE)
    U, _ = torch.linalg.qr(torch.randn(widths[-1], widths[-1], generator=g, dtype=DTYPE))
    V, _ = torch.linalg.qr(torch.randn(widths[0], widths[-1], generator=g, dtype=DTYPE))
    M = U @ torch.diag(torch.logspace(-2, 1, widths[-1], dtype=DTYPE)) @ V.T

    def model():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(i, o, bias=False) for i, o in zip(widths, widths[1:])]).to(DTYPE)

    return model, X, X @ M.T


PROBLEMS = {"least_squares": least_squares, "deep_linear": deep_linear}


# ----------------------------------------------------------------------------- counting steps


def steps_to_target(forward, optimizer, X, Y, target, budget):
    """The number of optimizer steps after which the full-batch loss is <= target, or None if
    that takes more than `budget` steps (or the loss stops being finite)."""
    for t in range(budget + 1):
        loss = F.mse_loss(forward(X), Y)
        if loss.item() <= target:
            return t
        if t == budget or not math.isfinite(loss.item()):
            return None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@functools.lru_cache(maxsize=None)
def problem(name):
    model, X, Y = PROBLEMS[name]()
    with torch.no_grad():
        initial = F.mse_loss(model()(X), Y).item()
    return model, X, Y, TARGET * initial


@functools.lru_cache(maxsize=None)
def adamw_steps(name):
    """{lr: steps to the target} for AdamW's grid."""
    model, X, Y, target = problem(name)
    counts = {}
    for lr in ADAMW_LRS:
        m = model()
        counts[lr] = steps_to_target(m, torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), X, Y, target, BUDGET)
    return counts


def gnfx_steps(name, optimizer, budget):
    """[steps to the target within `budget`, or None] for each configuration of `optimizer`."""
    model, X, Y, target = problem(name)
    counts = []
    for hp in CONFIGS[optimizer]:
        c = gnfx.compile(model(), optimizer=optimizer, **hp)
        counts.append(steps_to_target(c, c, X, Y, target, budget))
    return counts


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", PROBLEMS)
def test_adamw_grid_brackets_its_best_learning_rate(name):
    """AdamW reaches the target, and its best learning rate is not at an end of the grid."""
    counts = adamw_steps(name)
    reached = {lr: s for lr, s in counts.items() if s is not None}
    assert reached, counts
    best = min(reached, key=reached.get)
    assert ADAMW_LRS[0] < best < ADAMW_LRS[-1], counts


@pytest.mark.parametrize("name, optimizer", [
    ("least_squares", "kfac"),
    ("least_squares", "shampoo"),
    ("deep_linear", "kfac"),
    ("deep_linear", "shampoo"),
])
def test_curvature_reaches_the_target_in_at_most_half_of_adamws_best_steps(name, optimizer):
    counts = adamw_steps(name)
    best = min(s for s in counts.values() if s is not None)
    limit = best // 2
    reached = gnfx_steps(name, optimizer, budget=limit)
    assert any(s is not None for s in reached), (
        f"{optimizer} on {name}: no configuration reached the target within {limit} steps "
        f"(AdamW's best: {best}, by lr: {counts}); per configuration: {reached}")
