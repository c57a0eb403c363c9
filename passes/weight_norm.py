"""weight_norm: the weight normalizations W = g · v / ‖v‖ of a graph (gnfx.reparametrization), in one form.

Both APIs compute W with torch._weight_norm(v, g, dim). Under torch.export both show as
`aten._weight_norm.default(v, g, dim)`. Under fx the new API's parametrization
(`nn.utils.parametrizations.weight_norm`) is a `call_module` of its `_WeightNorm` on (g, v), which
`lower_weight_norm_modules` rewrites to `torch._weight_norm(v, g, dim)`; the old API's pre-hook
(`nn.utils.weight_norm`, which sets `module.weight` before each call) keeps its whole layer a module
call, which passes/lower.py lowers with `hooked_weight_norm`: the layer's functional op on
`torch._weight_norm(v, g, dim)` of the hook's parameters, computed in the graph on every call.

`find_weight_norms` then gives the nodes of that form whose v is a trainable parameter and g a trainable
or a frozen one (DINO's head: g fixed at 1), the trainable ones used by nothing else (passes/analyze.py
makes such a node stand for v, so that a layer detector sees a weight of W's shape and its block steps W).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm as WeightNormHook

from gnfx.reparametrization import WeightNorm, WeightNormFixedMagnitude

from .sites import arg

WEIGHT_NORM_OPS = (torch._weight_norm, torch.ops.aten._weight_norm.default)


def hooked_weight_norm(mod: nn.Module) -> WeightNormHook | None:
    """The old API's weight-norm pre-hook of `mod` when it is its only forward pre-hook and computes
    its `weight`, else None."""
    hooks = list(mod._forward_pre_hooks.values())
    if len(hooks) == 1 and isinstance(hooks[0], WeightNormHook) and hooks[0].name == "weight":
        return hooks[0]
    return None


def hooked_weight(graph: fx.Graph, path: str, hook: WeightNormHook) -> fx.Node:
    """The node computing the weight that `hook` of module `path` sets: torch._weight_norm(v, g, dim)."""
    v = graph.get_attr(f"{path}.{hook.name}_v")
    g = graph.get_attr(f"{path}.{hook.name}_g")
    return graph.call_function(torch._weight_norm, (v, g, hook.dim))


def lower_weight_norm_modules(gm: fx.GraphModule, keep=()) -> None:
    """Rewrite each call_module of a parametrization's `_WeightNorm` (arguments g, v) to
    torch._weight_norm(v, g, dim), except the module paths in `keep`."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target in keep or not isinstance(modules[node.target], _WeightNorm):
            continue
        if len(node.args) != 2 or node.kwargs:
            continue
        g, v = node.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch._weight_norm, (v, g, modules[node.target].dim))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def weight_name(parameter: str) -> str:
    """The model's name of a computed weight W from the parameter it is computed from: `fc.weight`
    for `fc.parametrizations.weight.original1` (weight norm's v), `fc.parametrizations.weight.original`
    (a parametrization of one tensor, spectral norm's W_o) or `fc.weight_v` (the old weight norm's v);
    the parameter's own name otherwise."""
    path, _, leaf = parameter.rpartition(".")
    owner, parametrized, name = f".{path}".rpartition(".parametrizations.")
    if leaf in ("original", "original1") and parametrized:
        return f"{owner[1:]}.{name}" if owner else name
    if leaf.endswith("_v"):
        return f"{path}.{leaf[:-2]}" if path else leaf[:-2]
    return parameter


def find_weight_norms(gm: fx.GraphModule, param_of, frozen_of, uses: dict) -> dict[fx.Node, WeightNorm]:
    """Each weight-norm node whose v is a trainable parameter (`param_of(node)` gives its name) and g a
    trainable parameter too, or a frozen one (`frozen_of(node)`: (its name, the parameter), DINO's head:
    gnfx.reparametrization.WeightNormFixedMagnitude), the trainable ones used only by weight-norm nodes of
    the same (g, v, dim) (`uses`: each parameter's (consumer, get_attr) pairs), with its
    gnfx.reparametrization.WeightNorm. A node whose g or v has another use is left out, with the reason
    for the report."""
    found: dict[fx.Node, WeightNorm] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_NORM_OPS:
            continue
        v, g, dim = param_of(arg(node, 0, "v")), param_of(arg(node, 1, "g")), int(arg(node, 2, "dim", 0))
        fixed = frozen_of(arg(node, 1, "g"))
        if v is not None and g is not None:
            found[node] = WeightNorm(weight_name(v), g, v, dim)
        elif v is not None and fixed is not None:
            found[node] = WeightNormFixedMagnitude(weight_name(v), fixed[0], v, dim, fixed[1])
    accepted = {}
    for node, wn in found.items():
        consumers = {u for name in (wn.magnitude, *wn.held, wn.direction) if name in uses for u, _ in uses[name]}
        if all(found.get(c) == wn for c in consumers):
            accepted[node] = wn
        else:
            node.meta["gnfx_fallback_reason"] = ("a weight norm whose g or v is also used by another operation, "
                                                 "which its block could not account for")
    return accepted
