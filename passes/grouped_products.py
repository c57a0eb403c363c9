"""Stacked expert weights in a grouped matrix product: a fallback that says what they are.

Hugging Face's mixture-of-experts layers (transformers 5: Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss, ...)
keep their experts' weights stacked, W (E, d_out, d_in) or (E, d_in, d_out), sort the tokens by expert
and multiply them group by group, `grouped_mm(x_sorted, W.transpose(-2, -1), offs=offsets)`: rows
[offs_{e-1}, offs_e) of x times expert e's matrix (gnfx.composite_forms writes it out). Each expert is
a linear map of the tokens routed to it, but which rows are its inputs is data (the offsets), and no
layer kind models a block of E linear maps over rows assigned at run time; the weights get the diagonal
preconditioner. `grouped_product_rejections` names that in the fallback reason, on the node that reads
W (the product, or the transpose in front of it), in place of "used by call_function 'transpose.int'".
A grouped product is torch's (`torch._grouped_mm`, `F.grouped_mm`, `aten._grouped_mm`) or any operator
named so (transformers' `torch.ops.transformers.grouped_mm_fallback`, what it calls while tracing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

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
    """(parameter name, the transpose reading it or None) if `operand` is a 3-D parameter or its
    transpose of the last two dimensions, used once; else None."""
    if not isinstance(operand, fx.Node):
        return None
    name, reader = param_of(operand), None
    if name is None and operand.op in ("call_function", "call_method") and operand.target in TRANSPOSES \
            and len(operand.users) == 1 and all(isinstance(d, int) for d in operand.args[1:3]):
        if sorted(d % 3 for d in operand.args[1:3]) == [1, 2]:
            name, reader = param_of(operand.args[0]), operand
    if name is None or len(shape_of(name)) != 3:
        return None
    return name, reader


def grouped_product_rejections(gm: fx.GraphModule, param_of, shape_of) -> list[tuple[fx.Node, str]]:
    """(the node reading W, why W falls back) for every stacked expert weight W of a grouped product."""
    rejected = []
    for node in gm.graph.nodes:
        if not _is_grouped_product(node) or len(node.args) < 2:
            continue
        found = _stacked_weight(node.args[1], param_of, shape_of)
        if found is None:
            continue
        name, reader = found
        experts = shape_of(name)[0]
        rejected.append((reader or node, f"the stacked weights of {experts} experts {tuple(shape_of(name))} in a "
                                         f"grouped matrix product (rows routed to each expert at run time): no layer "
                                         f"kind models stacked experts yet, they get the diagonal preconditioner "
                                         f"(experts written as nn.Linear modules are linear blocks)"))
    return rejected
