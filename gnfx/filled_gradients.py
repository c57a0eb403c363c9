"""Which backward passes the statistics count: those that fill the gradients the optimizer applies.

The taps' gradient hooks run in every backward pass that reaches a block output z, not only in the
`loss.backward()` whose gradients `step()` applies: also in `torch.autograd.grad` calls (the input
gradient of a gradient penalty, WGAN-GP's `autograd.grad(D(x̂).sum(), x̂, create_graph=True)` and R1's,
an adversarial example's `autograd.grad(loss, x)`, a MAML inner loop's gradient with respect to the
fast weights), and in a backward that only passes through the block (a GAN's generator loss through a
discriminator whose parameters are frozen for that step). None of these adds to the block's `.grad`, so
none adds to its statistics: a block's statistics follow its gradient, `Σ_{n,r} g_{n,r} a_{n,r}ᵀ` of the
backwards that accumulate into `∇W`, and its curvature is that of the same loss. (`zero_grad()` then
drops the statistics of the backwards whose gradients it clears, gnfx.optimizer.)

A backward fills a parameter's gradient when autograd will run the parameter's AccumulateGrad node in
it: `loss.backward()` does for every trainable parameter it reaches (and `backward(inputs=...)` for the
inputs named); `torch.autograd.grad` returns its gradients instead, for its inputs or for tensors the
parameters are not among.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge
from torch.distributed.tensor import DTensor


def fills_gradients(leaves: list[torch.Tensor]) -> bool:
    """Whether the backward running now accumulates into the `.grad` of one of `leaves` (the trained
    parameters a block's output is computed from, as the forward used them). Called from a gradient
    hook. A sharded FSDP2 parameter (a DTensor, whose gradient comes from its unsharded copy) counts as
    filled, as before this check."""
    for p in leaves:
        if isinstance(p, DTensor):
            return True
        try:
            if torch._C._will_engine_execute_node(get_gradient_edge(p).node):
                return True
        except RuntimeError:  # torch.autograd.grad with p among its inputs: p's gradient is returned, not accumulated
            continue
    return False
