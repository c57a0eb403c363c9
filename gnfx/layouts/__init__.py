"""Layouts: how each layer kind's raw tensors become the rows of docs/design.md §1.

A layout turns a layer input into rows `a` (N, R, d_a) and an output gradient into rows `g`
(N, R, d_out), and says how the weight reads as the matrix `W` of `z = W a` (rows: outputs,
the S side; columns: inputs, the A side). A new layer kind is one file here plus one line below,
and a detector in passes/.
"""
from gnfx.layouts.conv import ConvLayout
from gnfx.layouts.embedding import EmbeddingLayout
from gnfx.layouts.linear import LinearLayout

LAYOUTS = {
    "linear": LinearLayout,
    "conv": ConvLayout,
    "embedding": EmbeddingLayout,
}
