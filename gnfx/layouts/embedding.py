"""Embeddings `z = W[i]`: a linear map of the one-hot vector of token i, so `A` is diagonal.

The weight W is (V, d); as the matrix of `z = Wᵀ onehot(i)` it is read transposed (d x V): the S
side is d, the A side the vocabulary. `A = 1/(N R) Σ onehot onehotᵀ` is diagonal, the token
frequencies, and is stored as a vector of V entries. (Only `kfac_approx="expand"` keeps A
diagonal, so embeddings always use it.) A lookup of positions (`pos_emb(arange(T))`) keeps the
frequencies too, unlike a position table added to activations (gnfx.layouts.position): measured,
benchmarks/results/defaults.md, "Position lookups weighted by energy".

Ids (N, R, ...) are N examples of R ids; a column of ids (N,) (a recommender's `emb(x[:, j])`) is N
examples of one id. Ids (T,) whose length is not the batch (a position table read by `arange(T)`)
are no examples of the batch: the statistics take them, and their output gradient, as one example
(gnfx.statistics). Where the model output gives no N (a method returning the loss), a column (T,) cannot
tell N examples of one id from the T ids of fewer examples looked up flat (flair's OneHotEmbeddings: the
batch's tokens in one column): it takes the N of the block nearest the loss (gnfx.statistics). The gradient
and the per-example squares never form a per-example table (N x d x V):
they add the output gradients of each (example, id) pair, O(N R d) beside the V x d result.
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout


class EmbeddingLayout(Layout):
    diagonal_A = True
    view = "t"
    tied_guest = True  # a weight it shares with a linear unembedding is that block's (gnfx.layouts.base)

    @staticmethod
    def examples(idx: torch.Tensor) -> int:
        """N: the first dimension of the ids (1 for a single id)."""
        return idx.shape[0] if idx.dim() > 0 else 1

    def tells_examples(self, idx: torch.Tensor) -> bool:
        """A column of ids (N,) does not tell N (module doc)."""
        return idx.dim() > 1

    def input_chunks(self, idx: torch.Tensor):
        """Token ids as (N, R) chunks (one chunk; one-hot rows are never materialized)."""
        yield idx.reshape(self.examples(idx), -1)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient (ids' shape, d) as (N, R, d) rows, as input_chunks reads the ids."""
        return g.reshape(g.shape[0] if g.dim() > 1 else 1, -1, g.shape[-1])

    def per_example_gradient(self, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The per-example gradients of the matrix W (d x V), `Σ_r δ_r onehot(i_r)ᵀ` (N, d, V), from
        the output gradients δ (N, R, d) and the ids (N, R) of one chunk: each δ_r added into
        column i_r; the padding row of the table (`padding_idx`) gets no gradient. (N x d x V entries:
        only for a block of several sites, whose per-example gradients are summed before squaring.)"""
        per_example = delta.new_zeros(delta.shape[0], delta.shape[2], self.block.d_in)
        per_example.scatter_add_(2, ids.unsqueeze(1).expand(-1, delta.shape[2], -1), delta.transpose(1, 2))
        return self._without_padding(per_example)

    def gradient(self, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`Σ_{n,r} δ_{n,r} onehot(i_{n,r})ᵀ` (d x V): the chunk's gradient of W, each δ added into its
        id's column."""
        out = delta.new_zeros(delta.shape[2], self.block.d_in)
        return self._without_padding(out.index_add_(1, ids.flatten(), delta.reshape(-1, delta.shape[2]).T))

    def per_example_squares(self, delta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`Σ_n (Σ_r δ_{n,r} onehot(i_{n,r})ᵀ)²` (d x V), squared entrywise: the δ of each (example, id)
        pair summed (the entry of that example's gradient), squared and added into the id's column."""
        vocab, d = self.block.d_in, delta.shape[2]
        pairs = (torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * vocab + ids).flatten()
        pair, row_pair = torch.unique(pairs, return_inverse=True)
        summed = delta.new_zeros(pair.shape[0], d).index_add_(0, row_pair, delta.reshape(-1, d))
        out = delta.new_zeros(d, vocab)
        return self._without_padding(out.index_add_(1, pair % vocab, summed.square().T))

    def _without_padding(self, gradient: torch.Tensor) -> torch.Tensor:
        """`gradient` (..., d, V) with the padding row's column (`padding_idx`) zero: it gets no gradient."""
        padding = self.block.options.get("padding_idx")
        if padding is not None:
            gradient[..., padding] = 0
        return gradient
