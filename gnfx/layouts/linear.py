"""Linear maps `z = W a + b` on inputs (N, ..., d_in): every leading dimension after N is a position.

An einsum may map another axis of its input (talking heads' `"bhij,hg->bgij"`, passes/linear.py): the
features are then dimension `feature_dim` (counted from the end) of a and of z, moved last before the
rows are read, and every other dimension after N is a position. A weight scaled by a number in the forward,
`x @ (V / c)` (e3nn's FullyConnectedNet), is the block of V on the input rows a/c (`options["input_scale"]`
= 1/c, passes/analyze.py): z = (a/c) V, so its A and per-example gradients are V's. A weight w of three
dimensions or more read through a reshape is the matrix W = w.flatten(1), or w.flatten(0, -2)ᵀ
(`options["weight_view"]`, passes/linear.py). A call that reads a window of the parameter (`W[:o, :i]`, passes/weight_slices.py: `options["window"]`, (out, in),
in the layout of that call's site, gnfx.layouts.registration.site_layout) has the full parameter's rows, its
inputs and output gradients at the window's entries and zeros elsewhere."""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout, in_window, position_rows


class LinearLayout(Layout):
    tied_host = True  # an unembedding `h Wᵀ` holds the weight it shares with an embedding (gnfx.layouts.base)

    def __init__(self, block):
        super().__init__(block)
        # "t": the parameter is stored (d_in, d_out) and used as `x @ W`; the matrix W is its transpose;
        # "flatten" / "flat_t": a weight of three dimensions or more read through a reshape (passes/linear.py)
        self.view = block.options.get("weight_view", "t" if block.options.get("transposed") else "")
        self.feature_dim = block.options.get("feature_dim", -1)
        self.input_scale = block.options.get("input_scale", 1.0)  # s of a weight scaled by s (module docstring)
        window = block.options.get("window")  # (out, in) of a slice (module docstring)
        self.output_window, self.input_window = (None, None) if window is None else ((window[0],), (window[1],))

    def input_chunks(self, a: torch.Tensor):
        """The input rows a (s a for a weight scaled by s), as (N, R, d_in) tensors (one chunk: nothing to
        materialize)."""
        rows = in_window(position_rows(a.movedim(self.feature_dim, -1)), self.input_window, (self.block.d_in,))
        yield rows if self.input_scale == 1.0 else rows * self.input_scale

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient as (N, R, d_out) rows."""
        return in_window(position_rows(g.movedim(self.feature_dim, -1)), self.output_window, (self.block.d_out,))
