"""The tap modules that the rewrite pass inserts around each block.

`ActivationTap(a)` returns `a` and records the layer input; `ErrorTap(z, a)` returns `z` and
registers a gradient hook on it that records `g = ∂L/∂z` (and, for per-example statistics, pairs
it with the `a` of the same call); with a true Fisher (`fisher="mc"`/`"type2"`) it hands `z` to
the extra backward of gnfx.fisher instead. Both are identities: the model computes the same values and
gradients. They only run on statistic steps: on other steps the compiled model calls the
original, untapped forward. A block whose rows are routed to its groups at run time (stacked experts)
gets the routing (the offsets) as both taps' last argument and records it with a and g. A call site that
reads a window of its parameter (passes/weight_slices.py) has a layout of its own (`layout`), recorded with a
and g, which places its rows into the full parameter's.
A block's statistics count only the backwards that fill its gradient (gnfx.filled_gradients): the
ErrorTap of a block whose parameters are all frozen registers nothing, and its hook skips a backward
that does not accumulate into the block's parameters (torch.autograd.grad), and warns once when that
backward keeps its graph (forces, a gradient penalty: gnfx.filled_gradients.tell_a_graph_backward).

`WeightTap(W)` returns an alias W' of a block's weight for its one site (passes/taps.py `weight_tapped`), on
statistic forwards of `fisher="empirical"` where the block's statistics take the batch gradient `grad`: autograd's
gradient of W' is then the site's own `Σ_{n,r} g_{n,r} a_{n,r}ᵀ`, W's part of `grad`, which the backward forms
anyway, so the ErrorTap's hook leaves that product to it (gnfx.statistics, "the weight's part of grad").
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gnfx.filled_gradients import fills_gradients, tell_a_graph_backward


class ActivationTap(nn.Module):
    """Identity on a block's input `a`; accumulates `A` (docs/design.md §1) on statistic steps. A call
    under torch.no_grad (a target an opaque submodule's code computes with the layer,
    passes/opaque_children.py) has no output gradient, so no `S` rows: its `a` is not recorded either."""

    def __init__(self, stats, store, layout=None):
        super().__init__()
        self.stats, self.store, self.layout = stats, store, layout

    def forward(self, a, routing=None):
        if torch.is_grad_enabled():
            self.stats.record_activation(a, self.store.forward_id, routing, self.layout)
        return a

    def extra_repr(self) -> str:
        return f"block={self.stats.block.name!r}"


class ErrorTap(nn.Module):
    """Identity on a block's output `z`; its gradient hook accumulates `S` (and per-example terms). With
    `fresh` (a user of z may modify it in place, passes/taps.py) it returns a copy of z, which that op
    then modifies, so that the hook and the true Fisher's backward read ∂L/∂z of z itself."""

    def __init__(self, stats, store, fresh: bool, layout=None):
        super().__init__()
        self.stats, self.store, self.fresh, self.layout = stats, store, fresh, layout

    def forward(self, z, a, routing=None):
        leaves = self.store.trained_leaves(self.stats.block) if z.requires_grad else []
        if leaves:  # (none: every parameter of the block is frozen, and no backward fills its gradient)
            # a (to the backward): the per-example statistics' input, and the staged input this call's gradient
            # commits to A (gnfx.statistics: a call whose output no backward reaches adds no rows)
            fid, stats, layout = self.store.forward_id, self.stats, self.layout
            self.store.trained.extend(leaves)
            if self.store.fisher == "empirical":
                store = self.store
                z.register_hook(lambda g: stats.record_error(g, a, fid, routing, layout) if fills_gradients(leaves)
                                else tell_a_graph_backward(store, stats.block.name))
            else:  # the true-Fisher backward (gnfx.fisher) differentiates with respect to z
                self.store.pending.append((z, a, stats, fid, routing, layout))
        if self.fresh and z.requires_grad:
            return z.clone()
        return z

    def extra_repr(self) -> str:
        return f"block={self.stats.block.name!r}" + (", fresh (a copy: a user modifies it in place)" if self.fresh else "")


class WeightTap(nn.Module):
    """Identity on a block's weight W read by its one site; on a statistic forward whose block takes `grad` with
    `fisher="empirical"` it returns an alias W' (a view of all of W), whose gradient hook adds autograd's ∂L/∂W' —
    the site's `Σ g aᵀ` as the backward forms it for W's `.grad` — to the block's `grad`. Only where that product
    is the statistic's to float rounding: W a trained leaf of the statistics' dtype (float32, or float64 for a
    float64 layer), not a DTensor, and the forward not under autocast (whose product in float16 or bfloat16
    would round coarser than the taps' own); else W as it is, and the ErrorTap forms the product."""

    def __init__(self, stats, store):
        super().__init__()
        self.stats, self.store = stats, store

    def forward(self, w):
        stats = self.stats
        if (self.store.fisher != "empirical" or not stats.takes_grad or not torch.is_grad_enabled()
                or not (w.is_leaf and w.requires_grad) or w.dtype != stats.dtype or isinstance(w, DTensor)
                or torch.is_autocast_enabled(w.device.type)):
            return w
        alias = w.view_as(w)
        fid = self.store.forward_id
        stats.record_weight_alias(alias, fid)
        alias.register_hook(lambda g: stats.record_weight_gradient(g, fid))
        return alias

    def extra_repr(self) -> str:
        return f"block={self.stats.block.name!r}"
