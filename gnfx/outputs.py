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


def logits_of(out) -> torch.Tensor | None:
    """The first floating tensor of at least one dimension in `out` (module doc), or None."""
    leaves = _pytree.tree_leaves(out)  # a dataclass not registered as a pytree is one leaf: take its fields
    leaves = [x for leaf in leaves for x in ([getattr(leaf, f) for f in type(leaf).__dataclass_fields__]
                                             if hasattr(type(leaf), "__dataclass_fields__") else [leaf])]
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim()), None)
