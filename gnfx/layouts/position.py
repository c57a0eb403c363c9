"""Position embeddings added to activations: `z = x + P[start : start + T]`.

P is a parameter (T_max, d), or (1, T_max, d) and the like, whose rows are positions; the graph
adds the rows of T consecutive positions to an activation x (N, T, d). Position t of every
example reads row `start + t`: this is an embedding (gnfx.layouts.embedding) whose token ids are
the positions, `z_{n,t} = x_{n,t} + Pᵀ onehot(start + t)`, with the same K-FAC model:

    per-example gradient   ∇P_n = Σ_t δ_{n,t} onehot(start + t)ᵀ   (row start + t of it is δ_{n,t})
    A = 1/(N T) Σ_{n,t} onehot onehotᵀ = diag(1/T on the T rows used)   (stored as its diagonal)
    S = E[δ δᵀ]  (d x d)

The taps record x only to read N and T from its shape. A table added to an activation with more
dimensions, (N, H, T, d) say, is read by every h: the H T rows of an example are its positions.
"""
from __future__ import annotations

import torch

from gnfx.layouts.embedding import EmbeddingLayout


class PositionLayout(EmbeddingLayout):
    view = "flat_t"  # P as the matrix d x T_max: its leading dimensions of one dropped, transposed

    @staticmethod
    def examples(x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 2 else 1

    def input_chunks(self, x: torch.Tensor):
        """The positions read, as ids (N, R) (one chunk): the second to last dimension of x is the
        position; any dimension between N and it (heads, say) repeats the positions."""
        n, t = self.examples(x), x.shape[-2]
        start = self.block.options["start"]
        yield torch.arange(start, start + t, device=x.device).expand(x.shape[:-1]).reshape(n, -1)
