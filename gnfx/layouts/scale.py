"""A per-feature scale of any input, `z = x ⊙ γ` (a "layer scale"): the norm kind's scalar layers with x̂ = x.

Feature f is the linear map `z_f = γ_f x_f` of its own one-entry input (gnfx.layouts.norm, without β):

    per-example gradient   ∇γ_f = Σ_r δ_{r,f} x_{r,f}
    K-FAC, per feature     A_f = E[x_f²]  (1 x 1),    S_f = E[δ_f²]  (1 x 1)

The features are the dimension of x that broadcasting pairs with γ: the last for a 1-D γ, the
(k - 1)-th from the end for a γ viewed as (1, d, 1, ..., 1) of k dimensions (`feature_dim`, recorded
by passes/scale.py); every other dimension after N is a position r. An input whose feature dimension
is 1, broadcast against γ (`x (N, R, 1) * γ (d,)`), gives every feature the same input: its rows are
expanded to the d features, z_f = γ_f x.
"""
from __future__ import annotations

import torch

from gnfx.layouts.norm import NormLayout


class ScaleLayout(NormLayout):
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, R, d_x) with the features last (d_x: d, or 1 for an input broadcast over them; an
        unbatched (d,): (1, 1, d))."""
        x = x.movedim(self.block.options["feature_dim"], -1)
        return x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)

    def input_chunks(self, x: torch.Tensor):
        """x as (N, R, d, 1): one one-entry input per feature (one chunk)."""
        rows = self._rows(x)
        yield rows.expand(*rows.shape[:-1], self.block.d_out).unsqueeze(-1)
