"""lower: turn opaque module calls into explicit functional ops over the same parameters.

`lower_modules` rewrites each `call_module` of a stock `nn.Linear`, `nn.Conv1d/2d/3d` (other
padding modes as an explicit `F.pad` first, as the module does), `nn.ConvTranspose1d/2d/3d`,
`nn.Embedding` or `nn.Bilinear` (or a subclass that keeps the stock forward) into its
functional op (`F.linear`, `F.conv2d`,
`F.embedding`, `torch.bilinear` of the module's two inputs, ...) whose weight and bias are `get_attr` nodes, so that every later pass sees
layers in one form. Modules with a custom forward are left alone, and so are modules with forward
pre-hooks: a pre-hook may compute the weight the forward reads, which a `get_attr` of `weight` would
freeze at its value at capture, leaving the parameters it is computed from without gradients. The call
stays a `call_module`, which runs the hooks; its parameters fall back to the diagonal
preconditioner. Two pre-hooks are the exception, whose module is lowered with the tensors they set
computed in the graph on every call (the module's own attribute, which only the hook writes, keeps the
value of its last eager call): the old `nn.utils.weight_norm`'s (`weight = g·v/‖v‖`,
passes/weight_norm.py) and `torch.nn.utils.prune`'s (`weight = weight_mask * weight_orig`, of the weight,
the bias or both: the `get_attr` of each is computed by passes/pruning.py after lowering); so is the new API's
weight-norm parametrization
(`lower_weight_norm_modules`). (fully_shard's
hooks gather the parameters and compute nothing: an FSDP2 module is lowered.) A module's forward
hooks, which see (and may replace) its output, run after the functional op (`run_forward_hooks`), as
the module's call runs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.fsdp import FSDPModule

from .rewrite import recompiled, replace
from .pruning import pruned_tensors
from .weight_norm import hooked_weight, hooked_weight_norm, lower_weight_norm_modules

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_TRANSPOSE = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
                   nn.ConvTranspose3d: F.conv_transpose3d}


def _inputs(mod: nn.Module) -> int:
    """How many tensor inputs the forward of a stock layer takes (nn.Bilinear's two, every other one)."""
    return 2 if isinstance(mod, nn.Bilinear) else 1


def _stock(mod: nn.Module) -> type | None:
    """The stock layer class `mod` is lowered as, or None: not a stock layer, one with a custom forward, or one
    with pre-hooks that may compute the weight (module doc)."""
    stock = next((k for k in (nn.Linear, nn.Embedding, nn.Bilinear, *_CONV, *_CONV_TRANSPOSE) if isinstance(mod, k)),
                 None)
    if stock is None or type(mod).forward is not stock.forward:
        return None
    if mod._forward_pre_hooks and not isinstance(mod, FSDPModule) and hooked_weight_norm(mod) is None and not (
            set(pruned_tensors(mod) or ("other",)) <= {"weight", "bias"}):
        return None
    return stock


def _functional(mod: nn.Module, x, weight, bias):
    """(function, args, kwargs) of the op equivalent to calling `mod` on x (a tuple of the inputs for a
    layer of several, `_inputs`), or None."""
    stock = _stock(mod)
    if stock is nn.Linear:
        return F.linear, (x, weight, bias), {}
    if stock is nn.Bilinear:
        return torch.bilinear, (*x, weight, bias), {}
    if stock in _CONV:
        return _CONV[stock], (x, weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups), {}
    if stock in _CONV_TRANSPOSE:  # a call of one argument has no output_size: the output_padding is the module's
        return _CONV_TRANSPOSE[stock], (x, weight, bias, mod.stride, mod.padding, mod.output_padding, mod.groups,
                                        mod.dilation), {}
    if stock is nn.Embedding:
        return F.embedding, (x, weight), {"padding_idx": mod.padding_idx, "max_norm": mod.max_norm,
                                           "norm_type": mod.norm_type, "scale_grad_by_freq": mod.scale_grad_by_freq,
                                           "sparse": mod.sparse}
    return None


def run_forward_hooks(module: nn.Module, args: tuple, output):
    """`output` after the forward hooks of `module` on its call with `args`, as nn.Module's call runs
    them: each in order, a hook that returns a value replaces the output."""
    for key, hook in module._forward_hooks.items():
        result = (hook(module, args, {}, output) if key in module._forward_hooks_with_kwargs
                  else hook(module, args, output))
        output = output if result is None else result
    return output


def lower_modules(gm: fx.GraphModule, keep=()) -> fx.GraphModule:
    """Rewrite `call_module` nodes of stock Linear, Conv, Embedding and Bilinear modules, and of weight-norm
    parametrizations, to functional ops, except the module paths in `keep` (leaves the user asked to
    keep opaque)."""
    lower_weight_norm_modules(gm, keep)
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.kwargs or node.target in keep:
            continue
        mod = modules[node.target]
        if _stock(mod) is None or len(node.args) != _inputs(mod):
            continue
        with gm.graph.inserting_before(node):
            hook = hooked_weight_norm(mod)
            weight = (gm.graph.get_attr(f"{node.target}.weight") if hook is None
                      else hooked_weight(gm.graph, node.target, hook))
            has_bias = getattr(mod, "bias", None) is not None
            bias = gm.graph.get_attr(f"{node.target}.bias") if has_bias else None
            x = node.args[0] if len(node.args) == 1 else node.args
            padded = getattr(mod, "padding_mode", "zeros") != "zeros"
            if padded:  # as nn.ConvNd does: pad, then convolve
                x = gm.graph.call_function(F.pad, (x, mod._reversed_padding_repeated_twice),
                                           {"mode": mod.padding_mode})
            fn, args, kwargs = _functional(mod, x, weight, bias)
            if padded:
                args = args[:4] + (0,) + args[5:]
            new = gm.graph.call_function(fn, args, kwargs)
        new.meta.update(node.meta)
        new.meta["gnfx_module"] = node.target
        out = new
        if mod._forward_hooks and not isinstance(mod, FSDPModule):
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(run_forward_hooks, (gm.graph.get_attr(node.target), node.args, new))
        replace(gm, node, out)
    return recompiled(gm)
