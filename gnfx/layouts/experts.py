"""Stacked experts (`grouped_mm(x_sorted, W.transpose(-2, -1), offs=offsets)`, or `bmm(W[ids], x)`,
passes/grouped_products.py): E linear maps whose rows are routed to them at run time.

W (E, d_out, d_in) reads as the matrix `W.flatten(0, 1)` (E·d_out x d_in) of E groups (gnfx.layouts.base):
group e, rows e·d_out ... (e+1)·d_out, is expert e's matrix W_e; a W stored (E, d_in, d_out) and used as
stored (`options["transposed"]`, gpt-oss) as `W.transpose(1, 2).flatten(0, 1)` (gnfx.targets view
"in_out_stacked", a copy that a write puts back). The layer input a is the (T, d_in)
tokens sorted by expert and the output gradient g the (T, d_out) rows of the product; the offsets
o (E,) (`routing`, recorded by the taps with both) give expert e the rows [o_{e-1}, o_e) (o_{-1} = 0;
rows from o_{E-1} on belong to no expert: transformers' sentinels of dropped tokens). Each expert is
modelled as its own linear layer over the rows routed to it ("expand": every routed row a position),

    A_e = 1/T_e Σ_{t ∈ e} a_t a_tᵀ          (T_e = o_e - o_{e-1} rows; A_e = 0 for an expert no row reached)
    S_e = 1/M   Σ_{t ∈ e} δ_t δ_tᵀ = M Σ_{t ∈ e} g_t g_tᵀ

(gnfx.statistics' normalizations, per group), so that K-FAC's `A_e ⊗ S_e` is the Fisher block of W_e
with its row mean taken over expert e's rows. The tokens are sorted across the examples, so no
statistic that needs each example's rows (per-example diagonals, rank1's and EKFAC's, kfac_approx=
"reduce") can be formed: gnfx.statistics refuses the first and uses "expand" for the last.

Experts gathered by ids (`options["routing"] == "ids"`: transformers' batched_mm, `bmm(W[ids], x)` with x
(S, d_in, k), or `bmm(x, W[ids])` with x (S, k, d_in), `options["features"]` the dimension of the
features) have the same statistics: the rows of a and g are those of each pair s (k per s, k = 1 in
transformers), expert ids[s]'s; sorting the pairs by id (stable) and counting them per expert gives the
offsets o_e = k·#{s : ids[s] <= e} of the sorted rows, and the rows are split as above.
"""
from __future__ import annotations

import torch

from gnfx.layouts.base import Layout, position_rows


class ExpertsLayout(Layout):
    routed = True

    def __init__(self, block):
        super().__init__(block)
        self.groups = block.options["experts"]
        # the last routing read to the host: (tensor, its version, (the ids' sort or None, o as ints))
        self._read = (None, -1, (None, []))
        self.by_ids = block.options.get("routing") == "ids"
        self.features = block.options.get("features", 2)
        # (E, d_out, d_in) -> (E·d_out, d_in); stored (E, d_in, d_out): transposed per expert first
        self.view = "in_out_stacked" if block.options.get("transposed") else "features_first"

    def _pair_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A layer input or output gradient as (S, k, d): the sorted tokens (T, d) as (T, 1, d); a gathered
        product's operand (S, d, k) or (S, k, d) (module docstring) with its features last."""
        if self.by_ids and self.features == 1:
            x = x.transpose(1, 2)
        return position_rows(x)

    def input_chunks(self, a: torch.Tensor):
        """All the rows as one chunk (S, k, d_in) (the routed and the sentinel rows; `routed_rows` splits
        them by expert)."""
        yield self._pair_rows(a)

    def routed_rows(self, rows: torch.Tensor, routing: torch.Tensor):
        """(e, rows_e) for each expert e that some row reached: rows_e the rows [o_{e-1}, o_e) of the
        (T, d) rows (the layer input or the output gradient) that the offsets o route to it; for ids, of
        the rows sorted by id (module docstring)."""
        order, ends = self._grouping(routing)
        rows = self._pair_rows(rows)
        k = rows.shape[1]
        rows = (rows if order is None else rows[order]).flatten(0, 1)
        start = 0
        for e, end in enumerate(ends):
            if k * end > start:
                yield e, rows[start:k * end]
            start = k * end

    def _grouping(self, routing: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """(None, o) for offsets, (the stable sort of the ids, o) for ids (module docstring), o as Python
        ints, read to the host once per routing tensor: A's rows, S's and every sampled backward's of one
        call take the same tensor, so one call costs one device synchronization (a tensor changed in place
        since, its version moved, is read again)."""
        tensor, version, grouping = self._read
        if routing.is_inference() or routing is not tensor or routing._version != version:
            if self.by_ids:
                ids = routing.reshape(-1)
                counts = torch.bincount(ids, minlength=self.groups)[:self.groups]
                grouping = (torch.argsort(ids, stable=True), torch.cumsum(counts, 0).tolist())
            else:
                grouping = (None, routing.tolist())
            if not routing.is_inference():  # (no version counter: read every time)
                self._read = (routing, routing._version, grouping)
        return grouping
