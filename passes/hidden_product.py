"""The detector of recurrent layers' hidden-product blocks: `hp_t = W_hh h_{t-1} + b_hh`.

The lowering of nn.LSTM / nn.GRU / nn.RNN (passes/recurrent.py) writes each layer and direction as
`scan = scan_rows(gx, offset, W_hh, b_hh, h0, c0, ...)` followed by
`hidden_product_site(scan[1], offset)` (gnfx.recurrent): the site's input is the rows h_{t-1}
(N, T, H), its output the offset whose gradient is δ = ∂L/∂hp_t, and W_hh, b_hh are read by the
scan. Their input products `F.linear(x, W_ih, b_ih)` are linear sites (passes/linear.py).
"""
from __future__ import annotations

from torch import fx

from gnfx.recurrent import hidden_product_site

from .sites import Site


def find_hidden_product_sites(gm: fx.GraphModule, param_of, shape_of) -> tuple[list[Site], list]:
    """Every hidden product of a lowered recurrent layer whose W_hh is trainable."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not hidden_product_site:
            continue
        h_prev = node.args[0]
        scan = h_prev.args[0]  # h_prev = scan[1]
        w_node, b_node = scan.args[2], scan.args[3]
        weight, bias = param_of(w_node), param_of(b_node)
        if weight is None:
            continue
        d_out, d_in = shape_of(weight)
        uses = [(scan, w_node)] + ([(scan, b_node)] if bias is not None else [])
        sites.append(Site(node=node, input=h_prev, weight=weight, bias=bias, uses=uses, d_in=d_in, d_out=d_out,
                          options={"weight_shape": (d_out, d_in)}))
    return sites, []
