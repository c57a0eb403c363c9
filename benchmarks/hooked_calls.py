"""The probes' independent reference for K-FAC's statistics: each call of a named submodule, from plain hooks.

A forward hook on the submodule records its input a of each call, and a tensor hook on that call's output
records the gradient g the backward sends to it, so that a probe forms A and S from (a, g) itself, with
nothing gnfx computed (benchmarks.diffusers_probe, medseg_probe, pyg_probe).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def hooked_calls(model: nn.Module, names: list[str]):
    """While inside: each call of the submodules `names` of `model` appends [a, g] to its list (g None until
    the backward reaches that call's output); yields {name: [[a, g], ...]}. The hooks are removed on exit."""
    modules = dict(model.named_modules())
    calls, handles = {name: [] for name in names}, []
    for name in names:
        def hook(_, inputs, output, records=calls[name]):
            record = [inputs[0].detach(), None]
            records.append(record)
            output.register_hook(lambda g: record.__setitem__(1, g.detach()))
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def linear_factor_gap(c, calls, m) -> str:
    """The largest gap of the K-FAC A and S of the compiled model `c`'s blocks named in `calls` (hooked_calls'
    records of one backward, of linear layers) against A = mean over the calls' rows of ā āᵀ (ā = (a, 1) where
    the block has a bias) and S = m Σ g gᵀ over the rows (`m` the examples the loss averages), relative to the
    largest entry, as a cell."""
    gap, blocks = 0.0, [b.name for b in c.layers if b.name in calls]
    for block in blocks:
        records = [r for r in calls[block] if r[1] is not None]
        a = torch.cat([r[0].reshape(-1, r[0].shape[-1]) for r in records])
        g = torch.cat([r[1].reshape(-1, r[1].shape[-1]) for r in records])
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1) if c.layers[block].bias is not None else a
        for got, want in zip((c.statistics(block)["A"], c.statistics(block)["S"]), (a.T @ a / a.shape[0], m * g.T @ g)):
            gap = max(gap, ((got - want).abs().max() / want.abs().max()).item())
    return f"A, S of {len(blocks)} linear blocks {gap:.0e}" if blocks else "no linear block"
