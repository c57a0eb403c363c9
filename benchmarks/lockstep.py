"""The probes' exactness check: the compiled model and the module it was compiled from, stepped in lockstep.

Each step runs the same loss on both, the global random state seeded alike before each forward (dropout,
random augmentation, class-label dropout draw the same), backpropagates both, records the largest
|difference| of the losses and of any parameter's gradient (a missing gradient counts as zeros), then
steps the compiled model and loads its parameters and buffers into the reference, so that every step
compares the two functions at the same point.
"""
from __future__ import annotations

import random

import torch
from torch import nn

import gnfx


def lockstep_gaps(compiled: nn.Module, model: nn.Module, reference: nn.Module, loss_of, steps: int,
                  seed: int = 0, parameters_only: bool = False) -> tuple[float, float]:
    """(largest loss gap, largest gradient gap) over `steps` steps of `compiled` (gnfx.compile of `model`)
    beside `reference` (a module of the same parameters); `loss_of(module, plain)` is one forward's loss of
    `module`, `plain` the module whose parameters it uses (`model` for the compiled one); the random state
    is `seed + step` before each forward. `parameters_only`: the reference takes the model's parameters alone
    after each step, not its state dict (bitsandbytes' 4-bit layers cannot load one into a built layer)."""
    loss_gap = grad_gap = 0.0
    for step in range(steps):
        torch.manual_seed(seed + step)
        loss = loss_of(compiled, model)
        torch.manual_seed(seed + step)
        loss_ref = loss_of(reference, reference)
        loss.backward()
        loss_ref.backward()
        loss_gap = max(loss_gap, (loss - loss_ref).abs().item())
        for p, q in zip(model.parameters(), reference.parameters()):
            g, h = (torch.zeros_like(p) if x.grad is None else x.grad for x in (p, q))
            grad_gap = max(grad_gap, (g - h).abs().max().item() if p.numel() else 0.0)
        compiled.step()
        compiled.zero_grad()
        reference.zero_grad()
        if parameters_only:
            with torch.no_grad():
                for p, q in zip(model.parameters(), reference.parameters()):
                    q.copy_(p)
        else:
            reference.load_state_dict(model.state_dict())
    return loss_gap, grad_gap


def float64_gaps(build, loss_for, kind: str, hparams: dict, also=None, steps: int = 3, seed: int = 100) -> str:
    """The probes' exactness cell, 'loss Δ, grad Δ': `lockstep_gaps` of gnfx.compile(build(), kind, **hparams)
    beside a second build() from the same seed over `steps` steps, with float64 the default dtype throughout
    (both built from seed 0, Python's `random` seeded too: hyper-connections draws each layer's residual stream
    with `random.randrange`, so unseeded builds differed, and the first step's gradients with them; in float64);
    `loss_for(model)`, called after both builds, gives `loss_of(module)`, one forward's loss of a module with the
    model's parameters; `also()`, run there too, the text after '; ' (the probe's factors against hooks)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        random.seed(0)
        model = build().double()
        torch.manual_seed(0)
        random.seed(0)
        reference = build().double()
        loss_of = loss_for(model)
        c = gnfx.compile(model, kind, **hparams)
        loss_gap, grad_gap = lockstep_gaps(c, model, reference, lambda m, _: loss_of(m), steps, seed=seed)
        return f"{loss_gap:.0e}, {grad_gap:.0e}" + (f"; {also()}" if also is not None else "")
    finally:
        torch.set_default_dtype(torch.float32)
