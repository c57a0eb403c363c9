"""Position embeddings added to activations: `z = x + P[start : start + T]`.

P is a parameter (T_max, d), or (1, T_max, d) and the like, whose rows are positions; the graph
adds the rows of T consecutive positions to an activation x (N, T, d). Position t of every
example reads row `start + t`: this is an embedding (gnfx.layouts.embedding) whose token ids are
the positions, `z_{n,t} = x_{n,t} + Pᵀ onehot(start + t)`, with the K-FAC model

    per-example gradient   ∇P_n = Σ_t δ_{n,t} onehot(start + t)ᵀ   (row start + t of it is δ_{n,t})
    A = diag(e) / Σ_t e_t,   e_t = Σ_n |δ_{n,t}|²   (stored as its diagonal; 0 on the rows not read)
    S = E[δ δᵀ]  (d x d)

The exact GGN's block of row t is F_t = 1/N Σ_n δ_{n,t} δ_{n,t}ᵀ (each example reads each row once).
An embedding's A, the rows' frequencies (here 1/T each), would give every row the mean block
1/T Σ_t F_t: right when the rows' output gradients are alike, and they are not where the model reads
the positions differently. A ViT's head reads the class token's position only: at initialization
(benchmarks/library_lookalikes.py's ViT) e_0 is 1,800x the mean of the 16 patch rows', so K-FAC
took the patch rows' curvature ~100x too large and their steps ~100x too short, and the table
hardly moved (benchmarks/results/library_models.md, "kfac at defaults on vit and moe"). Weighted
by the energies, the block of row t, A_t S, has the exact block's trace, tr(A_t S) = tr F_t (the
same normalization as S),
and the blocks' sum Σ_t A_t S = S is unchanged, so are tr A = 1 and the factored damping's π. The
energies come with S, from the same output gradients (the sampled ones with fisher="mc"): a vector of
T_max entries, normalized into A after the average over ranks (gnfx.statistics), so that under
torch.distributed e_t sums over all ranks' examples, as in one process on their concatenated batch.
(A token embedding keeps the frequencies: its ids are data, and nothing measured
there asks for more. So does a table of positions written as an embedding, `pos_emb(arange(T))`,
which passes/shared_positions.py expands to the batch: weighted by the energies as here it was
measured on the char GPT and the GPT-2 and BERT look-alikes, and its steps were no better,
worse on some seeds: benchmarks/results/defaults.md, "Position lookups weighted by energy".)

The taps record x only to read N and T from its shape. A table added to an activation with more
dimensions, (N, H, T, d) say, is read by every h: the H T rows of an example are its positions.
A table of one row, P (1, ..., 1, d) or a vector (d,) expanded (CLIP's class embedding,
passes/class_tokens.py; the view "column", d x 1), is a bias that broadcasting adds to every row of x (ConvNeXt
V2's GRN bias, (1, 1, 1, d) on (N, H, W, d) maps; a (1, d) bias on (N, d)): every row reads row 0,
and the examples are x's first dimension whatever x's rank (A = [1], S = E[δ δᵀ] over all rows). So
is one row of a larger table, `P[:, s:s + 1]` (`rows` 1, recorded by passes/position.py): every row
of x reads row s; and a vector P (d,) expanded to the positions (`rows` 1, passes/class_tokens.py),
d x 1 as a matrix.

A table of several position dimensions is the same model over all of them (passes/position.py
recognizes two forms, taken whole). NesT's (1, B, T, d) on (N, B, T, d): its positions are
(b, t), row b·T + t of P as the matrix d x B·T (the view "flat_t", as for one dimension). A
channels-first table (1, C, *S) on a map (N, C, *S) (PiT, Visformer: (1, C, H, W)) has its features
on dimension 1 (`feature_dim`, counted from the end: 1 - len(P.shape)) and positions the entries s
of S, row s flattened of P as the matrix C x prod(S) (the view "features_first": no transpose, each
channel's map is its row of W), `z_{n,c,s} = x_{n,c,s} + P_{c,s}`; the taps move the features of x
and δ last, δ_{n,s} = ∂ℓ/∂z_{n,:,s} (C entries), and the rest is the model above: A = diag(e) / Σ e
with e_s = Σ_n |δ_{n,s}|², S = E[δ δᵀ] (C x C). Dimensions of x ahead of the table's (heads) repeat
its positions; a dimension of one in the table that x has more of (P (1, B, 1, d) on (N, B, T, d)) is
read by every entry of it, as broadcasting adds it.
"""
from __future__ import annotations

import math

import torch

from gnfx.layouts.embedding import EmbeddingLayout


class PositionLayout(EmbeddingLayout):
    view = "flat_t"  # P as the matrix d x T_max: its leading dimensions of one dropped, transposed
    energy_weighted_A = True  # A from the rows' output-gradient energies (module docstring)

    def __init__(self, block):
        super().__init__(block)
        self.feature_dim = block.options.get("feature_dim", -1)  # counted from the end (module docstring)
        if self.feature_dim != -1:
            self.view = "features_first"  # (1, C, *S) as C x prod(S)
        elif len(block.options["weight_shape"]) == 1:
            self.view = "column"  # a vector (d,) of one row, d x 1: CLIP's class embedding, MAE's mask token

    @property
    def one_row(self) -> bool:
        """Whether x reads one row of P (P has one row: a vector or (..., 1, d); or a slice of one row of
        it is added), a bias broadcast over every row of x (module docstring)."""
        shape = self.block.options["weight_shape"]
        return self.block.options.get("rows", shape[-2] if len(shape) > 1 else 1) == 1

    @property
    def table_positions(self) -> tuple[int, ...]:
        """The shape of P's rows as x reads them: (1,) for one row; P's dimensions after its features
        for a channels-first table; else those before its features, leading ones dropped; (-1,) for a
        table of one position dimension (its rows read: as many as x has, from `start`)."""
        shape = tuple(self.block.options["weight_shape"])
        positions = shape[self.feature_dim + 1:] if self.feature_dim != -1 else shape[:-1]
        while len(positions) > 1 and positions[0] == 1:
            positions = positions[1:]
        return (1,) if self.one_row else positions if len(positions) > 1 else (-1,)

    def _features_last(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.feature_dim == -1 else t.movedim(self.feature_dim, -1)

    def examples(self, x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 2 or self.one_row else 1

    def input_chunks(self, x: torch.Tensor):
        """The positions read, as ids (N, R) (one chunk): x's dimensions but its features, the last
        ones P's positions (the second to last of x for a table of one position dimension); any
        dimension between N and them (heads, say) repeats the positions. A table of one row is read by
        every row of x (row `start`)."""
        shape = self._features_last(x).shape[:-1]
        positions = self.table_positions
        positions = shape[-1:] if positions == (-1,) else positions
        ids = torch.arange(math.prod(positions), device=x.device).add_(self.block.options["start"])
        yield ids.reshape(positions).expand(shape).reshape(self.examples(x), -1)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        """The output gradient as (N, R, d) rows, its examples as input_chunks reads x's (the output has
        x's shape)."""
        rows = self._features_last(g)
        return rows.reshape(self.examples(g), -1, rows.shape[-1])

    def error_ids(self, g: torch.Tensor) -> torch.Tensor:
        """The rows of P that the output gradient's rows (error_rows) belong to, (N, R): the output
        has the input's shape, so they are input_chunks' of the gradient."""
        return next(self.input_chunks(g))
