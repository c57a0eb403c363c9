"""vmapped linears: the linear maps of a `torch.vmap` over stacked parameters, written as the stacked product.

The PyTorch model-ensembling tutorial stacks E copies of a module's parameters (`torch.func.stack_module_state`)
and runs the module on each under `torch.vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))`
(or `in_dims=(0, 0)`: each member its own input). torch.export (pre-dispatch) keeps the vmap: between
`_vmap_increment_nesting(E, ...)` and `_vmap_decrement_nesting()` every stacked parameter W (E, d_out, d_in)
is read through `_add_batch_dim(W, 0, level)` and the module's own ops run on the batched tensors,

    linear = aten.linear(x, _add_batch_dim(W, 0, level), _add_batch_dim(b, 0, level))

(x the shared input, or `_add_batch_dim(x, 0, level)` and what the layers before made of it), the result
unbatched at the end by `_remove_batch_dim(out, level, E, 0)`. No detector reads W there ("used by
call_function '_add_batch_dim'"). Member e's output is z_e = x_e W_eᵀ + b_e, so the linear is the stacked
product (passes/stacked_products.py) of W itself, taken out of the vmap and put back:

    x̄ = _remove_batch_dim(x, level, E, 0)        (E, ..., d_in): member e's rows x_e (x itself when x is
                                                  the input every member reads, no member axis)
    z̄ = einsum("e…i,eoi->e…o", x̄, W)             (E, ..., d_out), z̄_e = x_e W_eᵀ
    linear = _add_batch_dim(z̄, 0, level) + _add_batch_dim(b, 0, level)

equal to the batched linear entry for entry, its gradients too (both ops of the vmap are differentiable).
W becomes a "stacked" block of E members with the factors of each member's own linear layer. x counts as
batched at `level` when it is `_add_batch_dim(·, ·, level)` or computed from such a tensor without a
`_remove_batch_dim` between (an unbatched tensor would be expanded to E copies: the same rows). The bias stays
in the vmap: a stacked block has no bias (gnfx.layouts.stacked), so b falls back to the diagonal with its
reason. A linear is left as it is when W is not a stacked parameter read along its first axis, or when its
input is batched at a second vmap level too (a nested vmap).
"""
from __future__ import annotations

import string

import torch
from torch import fx
from torch._C import _functorch as functorch
from torch._functorch import predispatch

from .rewrite import recompiled, replace
from .shapes import value_of

aten = torch.ops.aten
LINEARS = (aten.linear.default, torch.nn.functional.linear)
ROW_LETTERS = [c for c in string.ascii_lowercase if c not in "eio"]
STACKED_BIAS = ("the bias of a linear under torch.vmap over stacked parameters, whose weight is a 'stacked' block: "
                "that kind has no bias (gnfx.layouts.stacked)")


def _levels(gm: fx.GraphModule) -> dict[fx.Node, frozenset]:
    """The vmap levels each node's value is batched at (module docstring)."""
    levels = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is predispatch._remove_batch_dim:
            levels[node] = levels.get(node.args[0], frozenset()) - {node.args[1]}
            continue
        found = frozenset().union(*(levels.get(n, frozenset()) for n in node.all_input_nodes))
        if node.op == "call_function" and node.target is predispatch._add_batch_dim:
            found |= {node.args[2]}
        levels[node] = found
    return levels


def _stacked_read(gm: fx.GraphModule, node) -> tuple[int, int] | None:
    """(E, level) of a weight operand `_add_batch_dim(W, 0, level)` of a trainable parameter W (E, d_out, d_in),
    else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is predispatch._add_batch_dim
            and node.args[1] == 0 and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
        return None
    try:
        param = gm.get_parameter(node.args[0].target)
    except AttributeError:
        return None
    return (param.shape[0], node.args[2]) if param.requires_grad and param.dim() == 3 else None


def _unbatched(value: torch.Tensor) -> torch.Tensor | None:
    """The members' values (E, ...) under the batched value the export recorded for a node in the vmap (a
    BatchedTensor over a fake tensor), None for a value that is not batched."""
    if not functorch.is_batchedtensor(value):
        return None
    return functorch.get_unwrapped(value).movedim(functorch.maybe_get_bdim(value), 0)


def stacked_vmapped_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each vmapped linear over a stacked weight rewritten as its stacked product (module docstring)."""
    levels, changed = _levels(gm), False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEARS or node.kwargs:
            continue
        x, w, bias = (list(node.args) + [None])[:3]
        found, value, out_value = _stacked_read(gm, w), value_of(x), value_of(node)
        if found is None or not isinstance(value, torch.Tensor) or not isinstance(out_value, torch.Tensor) or \
                not 1 <= value.dim() <= len(ROW_LETTERS) + 1:
            continue
        members, level = found
        if not levels[x] <= {level} or (isinstance(bias, fx.Node) and not levels[bias] <= {level}):
            continue
        rows = "".join(ROW_LETTERS[:value.dim() - 1])
        with gm.graph.inserting_before(node):
            if level in levels[x]:
                x = gm.graph.call_function(predispatch._remove_batch_dim, (x, level, members, 0))
                x.meta["val"] = _unbatched(value)
                equation = f"e{rows}i,eoi->e{rows}o"
            else:
                equation = f"{rows}i,eoi->e{rows}o"
            z = gm.graph.call_function(torch.einsum, (equation, x, w.args[0]))
            z.meta["val"] = _unbatched(out_value)
            out = gm.graph.call_function(predispatch._add_batch_dim, (z, 0, level))
            if bias is not None:
                out = gm.graph.call_function(aten.add.Tensor, (out, bias))
        if isinstance(bias, fx.Node):
            bias.meta["gnfx_fallback_reason"] = STACKED_BIAS
        out.meta.update(node.meta)
        replace(gm, node, out)
        if not w.users:
            gm.graph.erase_node(w)
        changed = True
    return recompiled(gm, changed)
