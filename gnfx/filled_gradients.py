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

A loss of such a gradient (the backward kept its graph, `create_graph=True`) reaches W through its use in
that backward too: an energy model trained on forces, `F = -∂E/∂x = -autograd.grad(E.sum(), x,
create_graph=True)` (SchNet, PaiNN, NequIP, MACE, whose default weights the force term 100 to 1), or a
gradient penalty. The backward of `z = W a` computes `u = Wᵀ δ` (δ = ∂E/∂z), so that

    ∇W L = Σ_rows ( g aᵀ + δ ūᵀ ),    g = ∂L/∂z,  ū = ∂L/∂u,

and the taps see g (and a) only: the statistics, `Σ g gᵀ` and `Σ a aᵀ`, are those of the first term, the
loss's path through the layer outputs, not of the gradient the step applies (the second term is 48-98% of
∇W by norm on the radial-basis potential of tests/test_molecular_patterns.py at a force weight of 10;
benchmarks/results/first_contact_12_molecular.md for e3nn's and MACE's).
The taps do not model the second term; `tell_a_graph_backward` says so, once, when such a backward reaches
a block. Shampoo and the diagonal (AdamW) precondition the gradient from the gradient itself and are exact
there.
"""
from __future__ import annotations

import warnings

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


def tell_a_graph_backward(store, block: str) -> None:
    """Called from a block's gradient hook in a backward that fills no gradient of it: when that backward
    keeps its graph (`torch.is_grad_enabled()` inside it: create_graph=True), warn once per model (`store`, its
    gnfx.statistics.StatisticsStore) that a loss of its gradient has a part the statistics do not hold
    (module docstring)."""
    if store.graph_backward_told or not torch.is_grad_enabled():
        return
    store.graph_backward_told = True
    warnings.warn(f"gnfx: torch.autograd.grad(..., create_graph=True) ran back through block {block!r} (forces "
                  f"F = -∂E/∂x of an energy model, a gradient penalty, MAML's inner gradient). A loss of that "
                  f"gradient reaches the blocks' weights through their use in that backward too (∇W = Σ g aᵀ + "
                  f"Σ δ ūᵀ, gnfx/filled_gradients.py), and the curvature statistics, built from the gradients g at "
                  f"the layer outputs, hold the first term only: they model the loss's path through the layer "
                  f"outputs, not the gradient the step applies. For a force-matching loss prefer "
                  f"optimizer='shampoo' or 'diag', whose statistics are the gradient itself", RuntimeWarning,
                  stacklevel=2)
