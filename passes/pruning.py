"""pruning: the tensors `torch.nn.utils.prune` computes in a forward pre-hook, computed in the graph instead.

`prune.l1_unstructured(module, "weight", amount)` (and ln_structured, random_*, global_unstructured, custom
methods, several in a row as a PruningContainer) moves the parameter to `weight_orig`, registers the 0/1
buffer `weight_mask` and a forward pre-hook (a `prune.BasePruningMethod`) that sets the plain attribute
`module.weight = weight_mask * weight_orig` before each call. torch.fx keeps a stock layer a `call_module`,
which runs the hook, so its parameters fell back to the diagonal preconditioner. `pruned_tensors` tells the
tensors a module's pre-hooks compute when every pre-hook it has is a pruning method, and `pruned_tensor`
computes one in the graph, `mul(weight_mask, weight_orig)` on every call, which passes/lower.py gives the
layer's functional op: passes/masked_weights.py then finds W = M ⊙ V, whose block steps W and pulls the
step back to V on the mask's support (gnfx.reparametrization.MaskedWeight: the pruned entries of
`weight_orig` do not move). The attribute `module.weight`, which only the hook writes, keeps the value of its
last eager call; `prune.remove` recomputes it from `weight_orig` and the mask, as it does after eager calls.
"""
from __future__ import annotations

import operator

from torch import fx, nn
from torch.nn.utils import prune


def pruned_tensors(mod: nn.Module) -> dict[str, prune.BasePruningMethod] | None:
    """{the name of each tensor the pre-hooks of `mod` compute: its pruning hook} when every forward pre-hook
    of `mod` is a pruning method (`torch.nn.utils.prune`), else None."""
    hooks = list(mod._forward_pre_hooks.values())
    if not hooks or not all(isinstance(hook, prune.BasePruningMethod) for hook in hooks):
        return None
    return {hook._tensor_name: hook for hook in hooks}


def pruned_tensor(graph: fx.Graph, path: str, name: str) -> fx.Node:
    """The node computing the tensor `name` that a pruning hook of module `path` sets: the mask times the
    original, `mask * orig` (torch.nn.utils.prune.BasePruningMethod.apply_mask)."""
    mask = graph.get_attr(f"{path}.{name}_mask")
    orig = graph.get_attr(f"{path}.{name}_orig")
    return graph.call_function(operator.mul, (mask, orig))
