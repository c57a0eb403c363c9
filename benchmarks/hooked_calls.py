"""The probes' independent reference for K-FAC's statistics: each call of a named submodule, from plain hooks.

A forward hook on the submodule records its input a of each call, and a tensor hook on that call's output
records the gradient g the backward sends to it (to the first of a tuple it returns, bayesian-torch's layers'
(out, kl); none for a call under torch.no_grad), so that a probe forms A and S from (a, g) itself, with
nothing gnfx computed (benchmarks.diffusers_probe, medseg_probe, pyg_probe, and the eleventh round's probes);
`linear_factors` forms them for a linear layer, `embedding_factors` for an embedding.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from gnfx.layouts.base import padded_blocks


@contextlib.contextmanager
def hooked_calls(model: nn.Module, names: list[str], direct: bool = False):
    """While inside: each call of the submodules `names` of `model` appends [a, g] to its list (g None until
    the backward reaches that call's output); yields {name: [[a, g], ...]}. The hooks are removed on exit.
    `direct`: the calls `module.forward(x)` too, which bypass module hooks (flair's one-hot embeddings): each
    module's forward is wrapped instead of hooked."""
    calls, handles = {name: [] for name in names}, []
    for name in names:
        def hook(_, inputs, output, records=calls[name]):
            record = [inputs[0].detach().clone(), None]  # a copy: an input may be a view of a parameter the step writes
            records.append(record)
            if isinstance(output, tuple):  # (out, kl) of bayesian-torch's layers: the layer's output first
                output = output[0]
            if output.requires_grad:  # a call under torch.no_grad (GradCache's first pass, a reversible layer's
                # forward) is never reached: no g, no rows
                output.register_hook(lambda g: record.__setitem__(1, g.detach()))
        module = model.get_submodule(name)
        handles.append(_WrappedForward(module, hook) if direct else module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class _WrappedForward:
    """`module.forward` replaced by the forward followed by `hook(module, args, output)`, as a forward hook
    would be called, until `remove()`."""

    def __init__(self, module: nn.Module, hook):
        self.module, plain = module, module.forward

        def forward(*args, **kwargs):
            output = plain(*args, **kwargs)
            hook(module, args, output)
            return output
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward


def linear_factors(records, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC's A = mean of ā āᵀ over the rows (every position) of each hooked call of a linear layer that the
    backward reached (ā = [a, 1] with a `bias`), and Σ g gᵀ over the same rows: S is M times the latter, M the
    loss's terms (docs/design.md §1)."""
    reached = [(a, g) for a, g in records if g is not None]
    a = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in reached])
    g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in reached])
    a = torch.cat([a, torch.ones_like(a[:, :1])], 1) if bias else a
    return a.T @ a / len(a), g.T @ g


def embedding_factors(records, num_embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC's diagonal A of an embedding, the frequencies of the ids of each hooked call the backward reached
    (a vector of `num_embeddings`), and Σ g gᵀ over their output gradients' rows, as `linear_factors`."""
    reached = [(a, g) for a, g in records if g is not None]
    ids = torch.cat([a.flatten() for a, _ in reached])
    g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in reached])
    return torch.bincount(ids, minlength=num_embeddings).to(g.dtype) / len(ids), g.T @ g


def linear_factor_gap(c, calls, m) -> str:
    """The largest gap of the K-FAC A and S of the compiled model `c`'s blocks named in `calls` (hooked_calls'
    records of one backward, of linear layers) against `linear_factors` (S = m Σ g gᵀ, `m` the examples the loss
    averages), relative to the largest entry, as a cell."""
    gap, blocks = 0.0, [b.name for b in c.layers if b.name in calls]
    for block in blocks:
        A, gg = linear_factors(calls[block], c.layers[block].bias is not None)
        for got, want in zip((c.statistics(block)["A"], c.statistics(block)["S"]), (A, m * gg)):
            gap = max(gap, ((got - want).abs().max() / want.abs().max()).item())
    return f"A, S of {len(blocks)} linear blocks {gap:.0e}" if blocks else "no linear block"


def diagonal_blocks(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`factor` (d, d) as gnfx stores `like`: whole, or a blocked factor's (1, m, b, b) diagonal blocks, the
    last zero-padded (gnfx/layouts/base.py)."""
    if like.dim() == 2:
        return factor
    m, b = like.shape[1:3]
    blocks = padded_blocks(padded_blocks(factor, m, b, 0), m, b, -1)  # (m, b, m, b)
    return torch.stack([blocks[i, :, i] for i in range(m)]).unsqueeze(0)
