"""The stacked-linear detector: E linear maps of one stacked weight W (E, d_out, d_in) or (E, d_in, d_out), every
row passing through every member (gnfx.layouts.stacked).

Ensembles batched into one product (BatchEnsemble's and packed ensembles' members, the PyTorch model-ensembling
tutorial's stacked weights, experts that every token passes through) are written

- as an einsum of the input and W whose equation maps the features (the input's last axis, contracted with one
  axis of W) to W's output axis (the output's last), member by member along W's first axis: the input holds
  that axis too (`"bei,eoi->beo"`, `"ebi,eio->ebo"`: each member its own input) or not (`"bi,eoi->beo"`: every
  member reads the same input, the output holds the member axis where the equation puts it);
- as `torch.bmm(x, W)` of x (E, N, d_in) and W (E, d_in, d_out), or `torch.bmm(x, W.transpose(1, 2))` of W
  (E, d_out, d_in) (the member axis first in x and z).

Each is a site of kind "stacked" over W: `options["members"]` E, `options["transposed"]` for W stored
(E, d_in, d_out), and the member axis of the input and output (`input_member_dim`, None for an input every
member reads, and `output_member_dim`, counted from the end). A product gathered by expert ids (`W[ids]`) or
routed by offsets is the "experts" kind's (passes/grouped_products.py). The tutorial's `torch.vmap(functional_call)`
over stacked parameters reaches this detector as the einsum passes/vmapped_products.py writes for it.
"""
from __future__ import annotations

from torch import fx

from .grouped_products import BATCHED_PRODUCTS, _stacked_weight
from .linear import EINSUM_OPS
from .sites import Site


def _einsum_layout(equation: str):
    """(input terms, weight terms, transposed, input member dim or None, output member dim) of an einsum equation
    that maps the input's last axis through a stacked weight member by member (module docstring), else None."""
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    for sx, sw in (terms, terms[::-1]):
        if len(sw) != 3 or len(set(sw)) != 3 or len(set(sx)) != len(sx) or len(set(out)) != len(out) or not sx:
            continue
        member, c = sw[0], sx[-1]
        o = next((letter for letter in sw[1:] if letter != c), None)
        if c not in sw[1:] or c in out or o is None or o in sx or not out.endswith(o) or member not in out:
            continue
        if member in sx:
            if out != sx[:-1] + o or sx.index(member) == len(sx) - 1:
                continue
            return (sx, sw, sw[1] == c, sx.index(member) - len(sx), out.index(member) - len(out))
        if out.replace(member, "") != sx[:-1] + o:
            continue
        return sx, sw, sw[1] == c, None, out.index(member) - len(out)
    return None


def _einsum_site(node, param_of, shape_of) -> Site | None:
    equation, operands = node.args[0], node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    found = _einsum_layout(equation)
    if node.kwargs or found is None or len(operands) != 2:
        return None
    sx, sw, transposed, input_member, output_member = found
    terms = equation.replace(" ", "").split("->")[0].split(",")
    x, w = operands if terms[0] == sx and terms[1] == sw else operands[::-1]
    name = param_of(w)
    if name is None or len(shape_of(name)) != 3:
        return None
    return _site(node, x, name, (node, w), transposed, input_member, output_member, shape_of)


def _bmm_site(node, param_of, shape_of) -> Site | None:
    if node.target not in BATCHED_PRODUCTS or len(node.args) != 2 or node.kwargs:
        return None
    found = _stacked_weight(node.args[1], param_of, shape_of)
    if found is None:
        return None
    name, reader, attr = found
    return _site(node, node.args[0], name, (reader or node, attr), reader is None, -3, -3, shape_of)


def _site(node, x, name: str, use, transposed: bool, input_member, output_member, shape_of) -> Site:
    members, rows, columns = shape_of(name)
    d_out, d_in = (columns, rows) if transposed else (rows, columns)
    options = {"members": members, "input_member_dim": input_member, "output_member_dim": output_member,
               "weight_shape": shape_of(name)} | ({"transposed": True} if transposed else {})
    return Site(node=node, input=x, weight=name, bias=None, uses=[use], d_in=d_in, d_out=members * d_out,
                options=options)


def find_stacked_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """The "stacked" sites (module docstring); none rejected."""
    sites = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        site = _einsum_site(node, param_of, shape_of) if node.target in EINSUM_OPS else _bmm_site(node, param_of,
                                                                                                  shape_of)
        if site is not None:
            sites.append(site)
    return sites, []
