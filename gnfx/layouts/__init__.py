"""Layouts: how each layer kind's raw tensors become the rows of docs/design.md §1.

A layout turns a layer input into rows `a` (N, R, d_a) and an output gradient into rows `g`
(N, R, d_out), and says how the weight reads as the matrix `W` of `z = W a` (rows: outputs,
the S side; columns: inputs, the A side) and what shapes its factors have (gnfx.layouts.base:
a diagonal A, or independent groups of rows). A new layer kind is one file here plus one line
below, and a detector in passes/.
"""
from gnfx.layouts.conv import ConvLayout
from gnfx.layouts.embedding import EmbeddingLayout
from gnfx.layouts.linear import LinearLayout
from gnfx.layouts.norm import NormLayout
from gnfx.layouts.position import PositionLayout

LAYOUTS = {
    "linear": LinearLayout,
    "conv": ConvLayout,
    "embedding": EmbeddingLayout,
    "norm": NormLayout,
    "position": PositionLayout,
}


def layout_of(block):
    """The layout of a LayerTable block."""
    return LAYOUTS[block.kind](block)
