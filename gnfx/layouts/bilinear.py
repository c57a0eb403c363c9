"""Bilinear maps `z_k = x1ᵀ W_k x2 + b_k` (nn.Bilinear, F.bilinear): a linear map of the outer product.

With W (d_out, d1, d2) read as the matrix W.flatten(1) (d_out x d1·d2, entry (k, i·d2 + j) = W_kij), the
layer is `z = W a + b` on the rows `a = vec(x1 x2ᵀ)` (entry i·d2 + j = x1_i x2_j, the row-major flattening
of x1[..., :, None] * x2[..., None, :]), so its per-example gradient is `δ aᵀ` and it is a linear block over
d_in = d1·d2 inputs: A = E[ã ãᵀ] with ã = [a; 1], S = E[δ δᵀ] (docs/design.md §1). Both inputs have the same
leading shape (N, ..., d) (torch.bilinear's rule); every dimension after N is a position.

The forward keeps torch's bilinear kernel: the taps record the pair (x1, x2) and the outer products exist
only while the statistics read them, on statistic steps, one batch chunk at a time (at most about
`CHUNK_ELEMENTS` entries of a, as a convolution's patches). A blocked A (gnfx.layouts.base) keeps the d2
entries x1_i x2 of each i in one block (`input_unit`).
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout, position_rows
from gnfx.layouts.conv import CHUNK_ELEMENTS


class BilinearLayout(Layout):
    view = "flatten"  # W (d_out, d1, d2) as W.flatten(1)

    def __init__(self, block):
        super().__init__(block)
        self.input_unit = block.options["weight_shape"][2]  # d2: the entries x1_i x2 of one i

    @staticmethod
    def examples(a: tuple[torch.Tensor, torch.Tensor]) -> int:
        """N of the pair (x1, x2): x1's first dimension (1 for an unbatched pair)."""
        return Layout.examples(a[0])

    def rows(self, a: tuple[torch.Tensor, torch.Tensor]) -> int:
        """N·R of the pair (x1, x2), without forming the outer products."""
        x1 = a[0]
        return x1.numel() // x1.shape[-1] if x1.shape[-1] else 0

    def input_chunks(self, a: tuple[torch.Tensor, torch.Tensor]):
        """The rows vec(x1 x2ᵀ) (N, R, d1·d2) of the pair (x1, x2), a few examples at a time (module doc)."""
        x1, x2 = (position_rows(x) for x in a)
        per_example = max(x1.shape[1] * x1.shape[2] * x2.shape[2], 1)
        step = max(1, CHUNK_ELEMENTS // per_example)
        for start in range(0, x1.shape[0], step):
            u, v = x1[start:start + step], x2[start:start + step]
            yield (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)
