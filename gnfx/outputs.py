"""The logits of a model output, whatever structure the forward returns it in.

A forward may return a tensor, a tuple, a dict, a (named)tuple or a dataclass (Hugging Face's
`ModelOutput`, a dataclass and a dict at once). Its logits `z` (docs/design.md §1: N, the examples, is
their first dimension) are the first floating-point tensor of at least one dimension among its
leaves, in the order the structure lists them; a scalar such as a loss returned alongside is
skipped.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree

from gnfx.errors import GnfxError

# the largest Σ_n |Σ_c g_nc| / Σ_nc |g_nc| of a cross-entropy's gradient g at z (zero but for rounding:
# below 1e-3 in bfloat16; a logit regularizer such as a z-loss of weight 1e-4 adds about its weight)
CROSS_ENTROPY_ROW_SUM = 1e-2


def logits_of(out) -> torch.Tensor | None:
    """The first floating tensor of at least one dimension in `out` (module doc), or None."""
    leaves = _pytree.tree_leaves(out)  # a dataclass not registered as a pytree is one leaf: take its fields
    leaves = [x for leaf in leaves for x in ([getattr(leaf, f) for f in type(leaf).__dataclass_fields__]
                                             if hasattr(type(leaf), "__dataclass_fields__") else [leaf])]
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim()), None)


def check_cross_entropy_gradient(z: torch.Tensor, grad: torch.Tensor) -> None:
    """Raise a GnfxError unless `grad`, the gradient of the user's loss at the logits `z`, is that of
    a cross-entropy over z's last dimension, as loss="cross_entropy" declares: each row of it,
    (p - q)/M for the softmax p of the row and its target distribution q (one-hot, smoothed or class
    weighted alike; zero for an ignored target), sums to zero (CROSS_ENTROPY_ROW_SUM). A loss of
    another output (z is the first floating tensor the model returns), or over another dimension of
    z (an (N, C, H, W) segmentation output), does not."""
    rows = grad.detach().reshape(-1, grad.shape[-1]).double()
    off, total = torch.stack([rows.sum(-1).abs().sum(), rows.abs().sum()]).tolist()
    if off > CROSS_ENTROPY_ROW_SUM * total:
        raise GnfxError(
            f"loss='cross_entropy' is the cross-entropy of the model output's logits z over their last dimension "
            f"(z: the first floating tensor the model returns, here of shape {tuple(z.shape)}), and the loss "
            f"this backward ran is not: its gradient at z is not one of a cross-entropy over that dimension (the "
            f"rows of such a gradient sum to zero; here |row sums| / |gradient| = {off / total:.3g}). gnfx would "
            f"model the wrong loss. Fix: return the logits first (alone, or first in a tuple, dict or dataclass) "
            f"with the classes last (an (N, C, H, W) output: return z.movedim(1, -1) and take "
            f"F.cross_entropy(z.reshape(-1, C), y.reshape(-1))), or compile with loss='mse' for a squared error, "
            f"or without loss= (and with an lr) for another loss")
