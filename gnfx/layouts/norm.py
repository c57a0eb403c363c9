"""Normalization affine parameters: `z = x̂ ⊙ γ + β`, per feature f a scalar linear layer.

x̂ is the normalized input (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm, or a hand-written
`x * rsqrt(mean(x²) + eps)`), with the features on its last dimension (layer and RMS norms), its last
k (`feature_dims`: a hand-written norm with a γ of x̂'s last k sizes, Cohere's per-head (H, D), whose
d = H·D features are those entries), or on dimension 1 (group and batch norms, channels first); every
other dimension after N is a position r. Feature f is the linear map `z_f = γ_f x̂_f + β_f` of its own
one-entry input, so the block is d = d_out independent layers (gnfx.layouts.base, `groups` = d,
d_in = 1, s = 1) and `[W b] = [γ β]` is d x 2 (the weight read as a column). With a = x̂ and δ = ∂ℓ/∂z as in docs/design.md §1:

    per-example gradient   ∇γ_f = Σ_r δ_{r,f} x̂_{r,f},   ∇β_f = Σ_r δ_{r,f}
    K-FAC, per feature     A_f = E[ā_f ā_fᵀ],  ā_f = (x̂_f, 1)  (2 x 2),    S_f = E[δ_f²]  (1 x 1)

that is `G ≈ blockdiag_f(S_f A_f)`: the Kronecker factorization of K-FAC applied to each feature's
scalar layer, with "expand"/"reduce" as for any layer. (EKFAC refits S_f A_f's two eigenvalues
per feature to the per-example gradients, which makes each 2 x 2 block the exact second moment
of (∇γ_f, ∇β_f) in A_f's eigenbasis; Shampoo, SOAP and the rank-k preconditioner see the d x 2
matrix [∇γ ∇β]; "diag" the per-example squares of both columns.)

The taps record the norm's input x (the graph holds no x̂ when the norm is one fused op) and the
layout recomputes x̂ from it: the same normalization without the affine parameters. A batch norm
is normalized with the batch's statistics, which is what it uses on a statistic step (statistics
are collected in training mode only), unless it is a module (a `call_module` of torch.fx) that
normalizes with its running statistics on this call: a frozen batch norm, `bn.eval()` on a
submodule of a model that trains (or an instance norm with `track_running_stats` in eval mode),
whose x̂ = (x - μ_running)/√(σ²_running + ε) is read from the module when the statistics are taken,
as its own forward reads it, whenever the mode changed. A functional batch norm captured with
running statistics (torch.export's graph of a model in eval mode) is not detected.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gnfx.layouts.base import Layout


def normalize(x: torch.Tensor, how: tuple) -> torch.Tensor:
    """x̂ from the norm's input x: `how` is (op, *arguments) as the detector recorded it, the module
    last for a batch or instance norm module that tracks running statistics."""
    op, *args = how
    module = args[-1] if args and isinstance(args[-1], torch.nn.Module) else None
    if module is not None and not module.training:  # it normalizes with its running statistics (module doc)
        return F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=module.eps)
    if op == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), eps=args[0])
    if op == "rms_norm":
        return F.rms_norm(x, (x.shape[-1],), eps=args[0])
    if op == "group_norm":
        return F.group_norm(x, args[0], eps=args[1])
    if op == "batch_norm":
        return F.batch_norm(x, None, None, training=True, eps=args[0])
    return x  # "given": the input already is x̂ (a hand-written norm)


class NormLayout(Layout):
    view = "column"

    def __init__(self, block):
        super().__init__(block)
        self.groups = block.d_out
        self.how = block.options["normalize"]
        self.channels_first = block.options["channels_first"]
        self.feature_dims = block.options.get("feature_dims", 1)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, R, d) with the features last (the last `feature_dims` dimensions flattened into d)."""
        if self.channels_first and x.dim() > 2:
            x = x.flatten(2).transpose(1, 2)
        return x.reshape(x.shape[0], -1, math.prod(x.shape[-self.feature_dims:]))

    def input_chunks(self, x: torch.Tensor):
        """x̂ as (N, R, d, 1): one one-entry input per feature (one chunk); a norm of one feature is one
        plain layer (groups = 1, no group axis, as every layout's): (N, R, 1)."""
        x_hat = self._rows(normalize(x, self.how))
        yield x_hat.unsqueeze(-1) if self.groups > 1 else x_hat

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        return self._rows(g)
