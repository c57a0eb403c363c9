"""rewrite: insert tap nodes around every call site of every block that collects statistics.

For a site `z = linear(a, W, b)` the graph becomes

    a_tap = self.gnfx_taps.<block>_a(a)
    z = linear(a_tap, W, b)
    z_tap = self.gnfx_taps.<block>_z(z, a_tap)

and every former user of `z` reads `z_tap`. Where the block's statistics take the batch gradient `grad` with
`fisher="empirical"` and the site is the block's only one (`weight_tapped`), its weight is read through
`w_tap = self.gnfx_taps.<block>_w(W)` as well (gnfx.taps.WeightTap: autograd's gradient of that alias is the
site's Σ g aᵀ, which the ErrorTap then need not form). A layer of several inputs (a bilinear map's x1, x2, whose
rows its layout forms) has their tuple tapped, `a_tap = ..._a((x1, x2))`, and reads them as before. A site with
a `routing` (stacked experts: the offsets of
their grouped product, passes/sites.py) passes it to both taps after their other arguments. The taps
are submodules under `gnfx_taps`, so they are visible in `graph_module.code` and in
`print(graph_module)`. A site that reads a window of its parameter (passes/weight_slices.py) gives both taps
its own layout (gnfx.layouts.registration.site_layout), which they record with a and g. A site in the graph of a
layer opened inside an opaque submodule
(passes/opaque_children.py) gets its taps in that graph, under its own `gnfx_taps`.

Where a user may modify z in place (an `nn.ReLU(inplace=True)` after the layer, as VGG's and AlexNet's
convolutions and ResNet's BatchNorms have, `x.relu_()`, an `inplace=True` function, or any of these on a
view of z; or z or a view of it returned to Python code: the model's output to the training loop's,
`logits /= T`, an opened layer's graph's to the opaque submodule's, `self.act(self.bn(x))` with an
in-place act), `z_tap` is a copy of z (`ErrorTap(fresh=True)`, made on statistic forwards only, which
alone run the taps): the in-place op then modifies the copy, and the hook on z sees ∂L/∂z (an in-place
change of z itself would never call it, or, for a view, drop it) and the true Fisher's backward
differentiates with respect to z itself, not to the activation written over it. torch.export's graphs
keep the model's in-place ops as aten ops (`aten.add_.Tensor` of `x += P`, `aten.relu_`), and views as
aten views (`aten.slice`, `aten.view`): their schemas say which write or view their first input
(`_first_input_alias`).
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from gnfx.layouts.registration import site_layout
from gnfx.taps import ActivationTap, ErrorTap, WeightTap

# methods and functions whose result is a view of their first input: an in-place op on it modifies that input
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
                           "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "t", "select", "unbind", "split",
                           "chunk", "movedim", "as_strided", "contiguous"})
_VIEW_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze,
                             torch.squeeze, torch.narrow, torch.movedim, torch.chunk, torch.split, torch.unbind,
                             torch.t, operator.getitem})
_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow})
# what may return its first input itself: a dropout at p = 0 or out of training (ATen's CPU dropout returns its input
# then: Wav2Vec2's feature projection, `hidden_states[~mask] = 0` after a dropout of p = 0, wrote the tapped output),
# nn.Identity, and a cast or move to the dtype and device the tensor already has
_MAY_RETURN_INPUT_METHODS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda"})
_MAY_RETURN_INPUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                         F.feature_alpha_dropout, torch.dropout, torch.ops.aten.dropout.default})
_MAY_RETURN_INPUT_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)


def _first_input_alias(target) -> tuple[bool, bool]:
    """(writes, views): whether the aten op `target` (an OpOverload) writes its first input in place
    (`aten.add_`, `Tensor(a!) self`), and whether it returns a view of it (`aten.slice`, `Tensor(a) self`
    and a result `Tensor(a)`), as its schema declares; (False, False) for anything else."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
        return False, False
    info = target._schema.arguments[0].alias_info
    if info is None:
        return False, False
    return info.is_write, not info.is_write and any(r.alias_info is not None for r in target._schema.returns)


def writes_in_place(node: fx.Node, owner: fx.GraphModule) -> bool:
    """Whether `node` may modify its first input in place: a module with `inplace=True`, a method or
    function named with a trailing underscore (`relu_`, `torch.sigmoid_`), an augmented assignment's
    operator, an aten op whose schema writes its first input (`aten.add_.Tensor` of `x += P` in
    torch.export's graphs), or a call binding `inplace=True` (F.relu(x, True))."""
    if node.op == "call_module":
        return getattr(owner.get_submodule(node.target), "inplace", False) is True
    if _first_input_alias(node.target)[0]:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return False
    if (name.endswith("_") and not name.startswith("_")) or node.target in _IN_PLACE_OPERATORS:
        return True
    if node.op == "call_function":
        try:
            return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
        except (TypeError, ValueError):  # a builtin without a signature, or arguments it does not bind
            return node.kwargs.get("inplace") is True
    return False


def _modified_in_place(node: fx.Node, owner: fx.GraphModule) -> bool:
    """Whether a user of `node`, or of a view of it, may modify it in place (`writes_in_place`), or it or a view
    of it is an output of the graph, which goes back to Python code that may: the training loop's
    (`logits /= T` of a distillation loss), or, for an opened layer's graph, the opaque submodule's (gluonts'
    NegativeBinomialOutput returns `logits.squeeze(-1)` of its projection, which its distribution then writes in
    place, `logits += scale.log()`)."""
    for user in node.users:
        if user.op == "output":
            return True
        if user.args and user.args[0] is node and writes_in_place(user, owner):
            return True
        if user.args and user.args[0] is node and aliases_first_input(user, owner) and _modified_in_place(user, owner):
            return True
    return False


def aliases_first_input(node: fx.Node, owner: fx.GraphModule) -> bool:
    """Whether `node`'s result may be its first input or a view of it, so that an in-place op on it modifies that
    input: a view (`_VIEW_METHODS`, `_VIEW_FUNCTIONS`, an aten view), or an op that may return its input itself
    (a dropout, nn.Identity, a cast to the tensor's own dtype)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS or node.target in _MAY_RETURN_INPUT_METHODS
    if node.op == "call_module":
        return isinstance(owner.get_submodule(node.target), _MAY_RETURN_INPUT_MODULES)
    return node.op == "call_function" and (node.target in _VIEW_FUNCTIONS or node.target in _MAY_RETURN_INPUT_FUNCTIONS
                                           or _first_input_alias(node.target)[1])


def weight_tapped(stats, store, site, sites: list) -> bool:
    """Whether the site's weight is read through a WeightTap: a linear or convolution block of one site in the
    captured graph (no tied use, no call from an opaque submodule's code) that reads its whole weight parameter
    as it is (no window, no reparametrization, one row group) and whose statistics take `grad` with
    `fisher="empirical"` (gnfx.taps.WeightTap checks the rest at each forward)."""
    block = stats.block
    return (store.fisher == "empirical" and stats.takes_grad and block.kind in ("linear", "conv") and len(sites) == 1
            and len(block.sites) == 1 and block.called_by is None and block.reparametrization is None
            and site.window is None and site.routing is None and stats.groups == 1 and not isinstance(site.input, tuple))


def insert_taps(gm: fx.GraphModule, block_sites: dict, store) -> fx.GraphModule:
    """Wrap each site's input and output in taps bound to the block's statistics in `store`, in the
    graph of the site (`gm`, or an opened child's graph)."""
    owners = {id(gm): gm}
    gm.add_module("gnfx_taps", nn.Module())
    for block_name, sites in block_sites.items():
        if block_name not in store.blocks:
            continue
        stats = store[block_name]
        for k, site in enumerate(sites):
            stem = block_name.replace(".", "_") + (f"_{k}" if len(sites) > 1 else "")
            node = site.node
            owner = node.graph.owning_module
            if id(owner) not in owners:
                owners[id(owner)] = owner
                owner.add_module("gnfx_taps", nn.Module())
            layout = site_layout(stats.block, site)  # a window of the parameter (passes/weight_slices.py)
            owner.gnfx_taps.add_module(f"{stem}_a", ActivationTap(stats, store, layout))
            graph = node.graph
            with graph.inserting_before(node):
                routing = () if site.routing is None else (site.routing,)  # a routed layout's (Site.routing)
                a_tap = graph.call_module(f"gnfx_taps.{stem}_a", (site.input,) + routing)
            if not isinstance(site.input, tuple):  # (a layer of several inputs reads them as they were)
                node.replace_input_with(site.input, a_tap)
            owner.gnfx_taps.add_module(f"{stem}_z", ErrorTap(stats, store, fresh=_modified_in_place(node, owner),
                                                              layout=layout))
            if weight_tapped(stats, store, site, sites):
                consumer, w = site.uses[0]  # the weight's use (passes/linear.py, passes/conv.py)
                owner.gnfx_taps.add_module(f"{stem}_w", WeightTap(stats, store))
                with graph.inserting_before(consumer):
                    w_tap = graph.call_module(f"gnfx_taps.{stem}_w", (w,))
                consumer.replace_input_with(w, w_tap)
                w_tap.meta["gnfx_role"] = "tap"
            with graph.inserting_after(node):
                z_tap = graph.call_module(f"gnfx_taps.{stem}_z", (node, a_tap) + routing)
            node.replace_all_uses_with(z_tap, delete_user_cb=lambda user: user is not z_tap)
            for n in (a_tap, z_tap):
                n.meta["gnfx_role"] = "tap"
            node.meta["gnfx_role"] = site.kind
            node.meta["gnfx_block"] = block_name
    for owner in owners.values():
        owner.graph.lint()
        owner.recompile()
    return gm
