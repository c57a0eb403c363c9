"""Embeddings `z = W[i]`: a linear map of the one-hot vector of token i, so `A` is diagonal.

The weight W is (V, d); as the matrix of `z = Wᵀ onehot(i)` it is read transposed (d x V): the S
side is d, the A side the vocabulary. `A = 1/(N R) Σ onehot onehotᵀ` is diagonal, the token
frequencies, and is stored as a vector of V entries. (Only `kfac_approx="expand"` keeps A
diagonal, so embeddings always use it.)

A lookup whose ids are positions, the same for every example (nanoGPT's `pos_emb(arange(T))`,
GPT-2's wpe, BERT's position_embeddings, expanded to the batch by passes/shared_positions.py, which
leaves ids of stride 0 along the examples), is a position table (gnfx.layouts.position) and takes
its A as one: each row weighted by its output-gradient energy, `A = diag(e) / Σ_v e_v`,
`e_v = Σ_{n,r: i_{n,r} = v} |δ_{n,r}|²`, from the ids `error_ids` pairs with the output gradient's
rows. Token ids (data) keep the frequencies.
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout


class EmbeddingLayout(Layout):
    diagonal_A = True
    view = "t"
    tied_guest = True  # a weight it shares with a linear unembedding is that block's (gnfx.layouts.base)
    error_ids_read_input = True  # the backward tap keeps the ids for `error_ids`

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

    def error_ids(self, g: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
        """The ids (N, R) of the output gradient's rows (error_rows) where they are positions, whose
        A is weighted by the rows' output-gradient energies (module docstring); None for token ids,
        whose A is their frequencies. The ids are positions where they are shared by the N > 1
        examples: a view of stride 0 along them, as passes/shared_positions.py expands them."""
        if ids is None or ids.dim() < 2 or ids.shape[0] < 2 or ids.stride(0) != 0:
            return None
        return next(self.input_chunks(ids))
