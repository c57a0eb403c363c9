"""Embeddings `z = W[i]`: a linear map of the one-hot vector of token i, so `A` is diagonal.

The weight W is (V, d); as the matrix of `z = Wᵀ onehot(i)` it is read transposed (d x V): the S
side is d, the A side the vocabulary. `A = 1/(N R) Σ onehot onehotᵀ` is diagonal, the token
frequencies, and is stored as a vector of V entries. (Only `kfac_approx="expand"` keeps A
diagonal, so embeddings always use it.)
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout


class EmbeddingLayout(Layout):
    diagonal_A = True
    view = "t"

    def input_chunks(self, idx: torch.Tensor):
        """Token ids as (N, R) chunks (one chunk; one-hot rows are never materialized)."""
        yield idx.reshape(idx.shape[0], -1) if idx.dim() > 1 else idx.reshape(1, -1)
