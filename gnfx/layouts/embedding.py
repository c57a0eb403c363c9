"""Embeddings `z = W[i]`: a linear map of the one-hot vector of token i, so `A` is diagonal.

The weight W is (V, d); as the matrix of `z = Wᵀ onehot(i)` it is read transposed (d x V): the S
side is d, the A side the vocabulary. `A = 1/(N R) Σ onehot onehotᵀ` is diagonal, the token
frequencies, and is stored as a vector of V entries. (Only `kfac_approx="expand"` keeps A
diagonal, so embeddings always use it.) A lookup of positions (`pos_emb(arange(T))`) keeps the
frequencies too, unlike a position table added to activations (gnfx.layouts.position): measured,
benchmarks/results/defaults.md, "Position lookups weighted by energy".
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout


class EmbeddingLayout(Layout):
    diagonal_A = True
    view = "t"
    tied_guest = True  # a weight it shares with a linear unembedding is that block's (gnfx.layouts.base)

    def input_chunks(self, idx: torch.Tensor):
        """Token ids as (N, R) chunks (one chunk; one-hot rows are never materialized)."""
        yield idx.reshape(idx.shape[0], -1) if idx.dim() > 1 else idx.reshape(1, -1)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient as (N, R, d) rows, as input_chunks reads the ids: the output of ids
        without a batch dimension (a position table read by `arange(T)`) is (T, d), one example."""
        return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 2 else g.reshape(1, -1, g.shape[-1])

    def per_example_gradient(self, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The per-example gradients of the matrix W (d x V), `Σ_r δ_r onehot(i_r)ᵀ` (N, d, V), from
        the output gradients δ (N, R, d) and the ids (N, R) of one chunk: each δ_r added into
        column i_r; the padding row of the table (`padding_idx`) gets no gradient."""
        per_example = delta.new_zeros(delta.shape[0], delta.shape[2], self.block.d_in)
        per_example.scatter_add_(2, ids.unsqueeze(1).expand(-1, delta.shape[2], -1), delta.transpose(1, 2))
        padding = self.block.options.get("padding_idx")
        if padding is not None:
            per_example[:, :, padding] = 0
        return per_example
