"""The stacked-experts detector: expert weights in a grouped matrix product, rows routed by offsets, or
gathered by expert ids into a batched product.

Hugging Face's mixture-of-experts layers (transformers 5: Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss, ...)
keep their experts' weights stacked, W (E, d_out, d_in) or (E, d_in, d_out), sort the tokens by expert
and multiply them group by group, `grouped_mm(x_sorted, W.transpose(-2, -1), offs=offsets)`: rows
[offs_{e-1}, offs_e) of x times expert e's matrix (gnfx.composite_forms writes it out). Each expert is
a linear map of the tokens routed to it: the product is a site of kind "experts" (gnfx.layouts.experts),
E groups of d_out rows of the matrix `W.flatten(0, 1)` for W (E, d_out, d_in) read transposed (or of
`W.transpose(1, 2).flatten(0, 1)` for W (E, d_in, d_out) used as stored, gpt-oss's `is_transposed`
experts: `options["transposed"]`), whose input a is x_sorted and whose `routing` (the offsets, recorded
by the taps with a and the output gradient) says which rows are each expert's. A grouped product is
torch's (`torch._grouped_mm`, `F.grouped_mm`, `aten._grouped_mm`) or any operator named so
(transformers' `torch.ops.transformers.grouped_mm_fallback`, what it calls while tracing).

The same experts in transformers' `experts_implementation="batched_mm"` take each (token, choice) row's
matrix by indexing the stack with the expert ids, `W[ids]` (S, d_out, d_in), and multiply it by the rows
as columns, `torch.bmm(W[ids], x.unsqueeze(-1))` (or, stored (E, d_in, d_out),
`torch.bmm(x.unsqueeze(1), W[ids])`): row s is a row of expert ids[s]. That is a site of the same kind
whose routing is the ids (`options["routing"] = "ids"`, the layout groups the rows by id) and whose
input is the product's other operand (S, d_in, k) or (S, k, d_in) (`options["features"]`: the dimension
of its features, 1 or 2).

Left to the diagonal preconditioner, with a reason naming them (on the node that reads W, in place of
"used by call_function 'transpose.int'"): a product without offsets (a batched product, no routing) and
one with a bias.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .sites import Site, arg

aten = torch.ops.aten
TRANSPOSES = (aten.transpose.int, torch.transpose, "transpose")
BATCHED_PRODUCTS = (torch.bmm, aten.bmm.default, "bmm")
GATHERS = (aten.index.Tensor, operator.getitem)


def _is_grouped_product(node) -> bool:
    t = node.target
    if node.op != "call_function":
        return False
    if t in (torch._grouped_mm, getattr(F, "grouped_mm", None)):
        return True
    return isinstance(t, torch._ops.OpOverload) and "grouped_mm" in t.name()


def _stacked_weight(operand, param_of, shape_of):
    """(parameter name, the transpose reading it or None, its get_attr node) if `operand` is a 3-D
    parameter or its transpose of the last two dimensions, used once; else None."""
    if not isinstance(operand, fx.Node):
        return None
    name, reader, attr = param_of(operand), None, operand
    if name is None and operand.op in ("call_function", "call_method") and operand.target in TRANSPOSES \
            and len(operand.users) == 1 and all(isinstance(d, int) for d in operand.args[1:3]):
        if sorted(d % 3 for d in operand.args[1:3]) == [1, 2]:
            name, reader, attr = param_of(operand.args[0]), operand, operand.args[0]
    if name is None or len(shape_of(name)) != 3:
        return None
    return name, reader, attr


def _gathered_weight(operand, param_of, shape_of):
    """(parameter name, the indexing node, its get_attr node, the ids) if `operand` is `W[ids]` of a 3-D
    parameter W by one tensor of ids, used once; else None."""
    if not isinstance(operand, fx.Node) or operand.op != "call_function" or operand.target not in GATHERS \
            or len(operand.args) != 2 or len(operand.users) != 1:
        return None
    attr, index = operand.args
    ids = index[0] if isinstance(index, (list, tuple)) and len(index) == 1 else index
    name = param_of(attr)
    if name is None or len(shape_of(name)) != 3 or not isinstance(ids, fx.Node):
        return None
    val = ids.meta.get("val")  # (torch.export: an id tensor; torch.fx: no metadata, an int index is a node too)
    if val is not None and (not isinstance(val, torch.Tensor) or val.dim() != 1 or val.is_floating_point()
                            or val.dtype == torch.bool):
        return None
    return name, operand, attr, ids


def _gathered_site(node, param_of, shape_of) -> Site | None:
    """The "experts" site of a batched product `bmm(W[ids], x)` or `bmm(x, W[ids])` (module docstring)."""
    if node.op not in ("call_function", "call_method") or node.target not in BATCHED_PRODUCTS \
            or len(node.args) != 2 or node.kwargs:
        return None
    for position in (0, 1):
        found = _gathered_weight(node.args[position], param_of, shape_of)
        if found is not None:
            name, reader, attr, ids = found
            experts, rows, columns = shape_of(name)
            # W[ids] first: expert e's z = W_e x over x's dimension 1; second: z = x W_e over x's last
            d_out, d_in, options = (rows, columns, {"features": 1}) if position == 0 else \
                (columns, rows, {"features": 2, "transposed": True})
            return Site(node=node, input=node.args[1 - position], weight=name, bias=None, uses=[(reader, attr)],
                        d_in=d_in, d_out=experts * d_out, options={"experts": experts, "routing": "ids", **options},
                        routing=ids)
    return None


def find_expert_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list[tuple[fx.Node, str]]]:
    """The "experts" sites (module docstring), and (the node reading W, why W falls back) for every other
    stacked expert weight W of a grouped product."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        gathered = _gathered_site(node, param_of, shape_of)
        if gathered is not None:
            sites.append(gathered)
            continue
        if not _is_grouped_product(node) or len(node.args) < 2:
            continue
        found = _stacked_weight(node.args[1], param_of, shape_of)
        if found is None:
            continue
        name, reader, attr = found
        experts, rows, columns = shape_of(name)
        offsets, bias = arg(node, 2, "offs"), arg(node, 3, "bias")
        if isinstance(offsets, fx.Node) and bias is None:
            d_out, d_in = (rows, columns) if reader is not None else (columns, rows)
            options = {"experts": experts} | ({} if reader is not None else {"transposed": True})
            sites.append(Site(node=node, input=node.args[0], weight=name, bias=None, uses=[(reader or node, attr)],
                              d_in=d_in, d_out=experts * d_out, options=options, routing=offsets))
            continue
        why = "without offsets (no routing)" if not isinstance(offsets, fx.Node) else "with a bias"
        rejected.append((reader or node, f"the stacked weights of {experts} experts {tuple(shape_of(name))} in a "
                                         f"grouped matrix product {why}: the experts kind models products with "
                                         f"offsets and no bias only, these get the diagonal preconditioner "
                                         f"(experts written as nn.Linear modules are linear blocks)"))
    return sites, rejected
