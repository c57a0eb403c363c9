"""own_terms: a parameter's uses in terms the forward returns beside its data path, which no block needs to claim.

A forward may compute, from its parameters alone, a term it returns beside its output: bayesian-torch's
layers called with return_kl=True return (out, KL(q(μ, σ(ρ)) ‖ p)) and their models sum the KLs into an
output of their own, `return logits, kl`; the user adds it to the loss. Such a use of a parameter W, and
everything computed from it, is computed without the graph's inputs, never meets an activation, and reaches
the output only as a number (through a `sum()` or `mean()` of a whole tensor, bayesian-torch's `kl.mean()`;
a tensor of W returned as it is, prototypes the loss multiplies with the features, is no such term): its
gradient reaches ∇W directly, as the gradient of the same KL or penalty computed by the loss outside the model
does (torchbnn's `BKLLoss(model)`, an L2 term), and the layer that reads W in the data path has the same
statistics with or without it. A block over W so claims W's data-path uses and leaves such a term to the
step, which preconditions ∇W whole (the term's curvature is no part of the block's, as an L2 penalty's is
not). Such a use used to make W fall back ("used by call_function 'sub'", the KL's μ − μ_prior).

`drop_own_terms(gm, uses)` removes, from each trainable parameter's uses, those that are such terms, where
the parameter has another use (a parameter that only such terms use keeps them: nothing else is there to
claim it, and it falls back with the reason of that use).
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
# a reduction of a whole tensor to one number, called with the tensor alone
FULL_REDUCTIONS = (torch.sum, torch.mean, "sum", "mean", aten.sum.default, aten.mean.default)


def _full_reduction(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in FULL_REDUCTIONS and len(node.args) == 1 \
        and not node.kwargs


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of `gm` computed from one of its placeholders (the placeholders included)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _a_term_of_its_own(use: fx.Node, dependent: set[fx.Node]) -> bool:
    """Whether `use` and every node computed from it are computed without the input, and reach the graph's
    output only through a reduction to one number (module docstring)."""
    seen, stack = set(), [(use, False)]
    while stack:
        current, reduced = stack.pop()
        if (current, reduced) in seen:
            continue
        if current.op == "output":
            if not reduced:
                return False
            continue
        if current in dependent:
            return False
        seen.add((current, reduced))
        stack.extend((user, reduced or _full_reduction(current)) for user in current.users)
    return True


def drop_own_terms(gm: fx.GraphModule, uses: dict[str, list[tuple]]) -> None:
    """Remove the uses that are terms of their own (module docstring) from `uses` (each parameter's (consumer,
    read) pairs), for each parameter with another use."""
    dependent = _input_dependent(gm)
    for name, pairs in uses.items():
        kept = [(consumer, read) for consumer, read in pairs if not _a_term_of_its_own(consumer, dependent)]
        if kept and len(kept) < len(pairs):
            uses[name] = kept
