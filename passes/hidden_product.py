"""The detector of recurrent layers' hidden-product blocks: `hp_t = W_hh h_{t-1} + b_hh`, and an LSTM's
projections `h_t = W_hr h̃_t`.

The lowering of nn.LSTM / nn.GRU / nn.RNN (passes/recurrent.py) writes each layer and direction as
`scan = scan_rows(gx, offset, W_hh, b_hh, h0, c0, kind, reverse, input, W_hr, projection_offset)` followed
by `hidden_product_site(scan[1], offset)` (gnfx.recurrent): the site's input is the rows h_{t-1}
(N, T, P), its output the offset whose gradient is δ = ∂L/∂hp_t, and W_hh, b_hh are read by the
scan. An LSTM with projections (W_hr given) also has `projection_site(scan[4], projection_offset)`: input
the rows h̃_t (N, T, H), output the offset whose gradient is ∂L/∂h_t, W_hr (no bias) read by the scan.
Their input products `F.linear(x, W_ih, b_ih)` are linear sites (passes/linear.py).
"""
from __future__ import annotations

from torch import fx

from gnfx.recurrent import hidden_product_site, projection_site

from .sites import Site, arg

# each site's weight and bias among the scan's arguments: (position, name) of each, or None
_OPERANDS = {hidden_product_site: ((2, "w_hh"), (3, "b_hh")), projection_site: ((9, "w_hr"), None)}


def find_hidden_product_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Every hidden product and projection of a lowered recurrent layer whose weight is trainable."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _OPERANDS:
            continue
        rows = node.args[0]
        scan = rows.args[0]  # rows = scan[1] or scan[4]
        weight_at, bias_at = _OPERANDS[node.target]
        w_node = arg(scan, *weight_at)
        b_node = None if bias_at is None else arg(scan, *bias_at)
        weight, bias = param_of(w_node), None if b_node is None else param_of(b_node)
        if weight is None:
            continue
        d_out, d_in = shape_of(weight)
        uses = [(scan, w_node)] + ([(scan, b_node)] if bias is not None else [])
        sites.append(Site(node=node, input=rows, weight=weight, bias=bias, uses=uses, d_in=d_in, d_out=d_out,
                          options={"weight_shape": (d_out, d_in)}))
    return sites, []
