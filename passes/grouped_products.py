"""The stacked-experts detector: expert weights in a grouped matrix product, rows routed by offsets.

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

Left to the diagonal preconditioner, with a reason naming them (on the node that reads W, in place of
"used by call_function 'transpose.int'"): a product without offsets (a batched product, no routing) and
one with a bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .sites import Site, arg

aten = torch.ops.aten
TRANSPOSES = (aten.transpose.int, torch.transpose, "transpose")


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


def find_expert_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list[tuple[fx.Node, str]]]:
    """The "experts" sites (module docstring), and (the node reading W, why W falls back) for every other
    stacked expert weight W of a grouped product."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
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
