"""pruning: the tensors `torch.nn.utils.prune` computes in a forward pre-hook, computed in the graph instead.

`prune.l1_unstructured(module, "weight", amount)` (and ln_structured, random_*, global_unstructured, custom
methods, several in a row as a PruningContainer) moves the parameter to `weight_orig`, registers the 0/1
buffer `weight_mask` and a forward pre-hook (a `prune.BasePruningMethod`) that sets the plain attribute
`module.weight = weight_mask * weight_orig` before each call. A captured graph that reads that attribute reads
the tensor it held at capture, or whatever the last eager call left there: a stock layer that passes/lower.py
lowers (`get_attr` of `weight`), nn.MultiheadAttention's `in_proj_weight` that passes/mha.py lowers, and a
module torch.fx traces through (whose hook ran while tracing: the graph keeps that tensor as a constant, with
the autograd graph of its capture, which a second backward through it refuses). `computed_pruned_reads`
replaces each such read by `mul(weight_mask, weight_orig)` of the module's own attributes, computed on every
call: passes/masked_weights.py then finds W = M ⊙ V where a linear or conv layer reads it, whose block steps W
and pulls the step back to V on the mask's support (gnfx.reparametrization.MaskedWeight: the pruned entries of
`weight_orig` do not move), and the mask is read where the module holds it, so pruning again (a new
`weight_mask`) is followed. The attribute `module.weight`, which only the hook writes, keeps the value of its
last eager call; `prune.remove` recomputes it from `weight_orig` and the mask, as it does after eager calls.
"""
from __future__ import annotations

import operator

from torch import fx, nn
from torch.nn.utils import prune

from .rewrite import recompiled, replace


def _pruning_hooks(mod: nn.Module) -> dict[str, prune.BasePruningMethod]:
    """{the name of each tensor a pruning pre-hook of `mod` computes: its hook}."""
    return {hook._tensor_name: hook for hook in mod._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)}


def pruned_tensors(mod: nn.Module) -> dict[str, prune.BasePruningMethod] | None:
    """`_pruning_hooks(mod)` when every forward pre-hook of `mod` is a pruning method, and it has one, else None."""
    hooks = _pruning_hooks(mod)
    return hooks if hooks and len(hooks) == len(mod._forward_pre_hooks) else None


def _product(graph: fx.Graph, path: str, name: str) -> fx.Node:
    """mask * orig of the tensor `name` of the module at `path` (prune.BasePruningMethod.apply_mask)."""
    prefix = f"{path}." if path else ""
    return graph.call_function(operator.mul, (graph.get_attr(f"{prefix}{name}_mask"),
                                              graph.get_attr(f"{prefix}{name}_orig")))


def _hold(gm: fx.GraphModule, path: str, mod: nn.Module, name: str) -> None:
    """Make `gm` hold the pruned module `mod` at `path`, its path in the model (the parameters' names), so that
    `path.name_mask` and `path.name_orig` resolve to its own tensors; the model itself (`path` empty): its
    `name_orig` and `name_mask` registered on `gm`."""
    if path:
        gm.add_submodule(path, mod)
    else:
        gm.register_parameter(f"{name}_orig", getattr(mod, f"{name}_orig"))
        gm.register_buffer(f"{name}_mask", getattr(mod, f"{name}_mask"))


def computed_pruned_reads(model: nn.Module, gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` (captured from `model` or one of its submodules) with each read of a tensor a pruning hook sets (module
    docstring) computed as mask * orig: a `get_attr` of that attribute of a pruned module the graph holds, or of
    a constant that is the tensor a pruned module of `model` holds there now (the trace ran its hook, or, for the
    model itself, pruning did), whose mask and orig the graph then reads at the module's path in `model`."""
    set_by_hooks = {id(getattr(mod, name)): (path, mod, name) for path, mod in model.named_modules()
                    for name in _pruning_hooks(mod) if hasattr(mod, name)}
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        path, _, name = node.target.rpartition(".")
        try:
            holder = gm.get_submodule(path)
        except AttributeError:
            continue
        if name in _pruning_hooks(holder):
            owner = path
        elif id(getattr(holder, name, None)) in set_by_hooks:
            owner, mod, name = set_by_hooks[id(getattr(holder, name))]
            _hold(gm, owner, mod, name)
        else:
            continue
        with gm.graph.inserting_before(node):
            product = _product(gm.graph, owner, name)
        replace(gm, node, product)
        changed = True
    return recompiled(gm) if changed else gm
