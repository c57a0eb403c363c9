"""Linear maps `z = W a + b` on inputs (N, ..., d_in): every leading dimension after N is a position."""
from __future__ import annotations

import torch


class LinearLayout:
    diagonal_A = False

    def __init__(self, block):
        self.block = block
        # "t": the parameter is stored (d_in, d_out) and used as `x @ W`; the matrix W is its transpose
        self.view = "t" if block.options.get("transposed") else ""

    @staticmethod
    def examples(a: torch.Tensor) -> int:
        return a.shape[0] if a.dim() > 1 else 1

    def input_chunks(self, a: torch.Tensor):
        """The input rows a, as (N, R, d_in) tensors (one chunk: nothing to materialize)."""
        yield a.reshape(a.shape[0], -1, a.shape[-1]) if a.dim() > 1 else a.reshape(1, 1, -1)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)
