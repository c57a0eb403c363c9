"""Convolutions (1-, 2- and 3-d, any groups): the input rows are unfolded patches (Grosse & Martens 2016).

For an input (N, C, *S) and a kernel (C_out, C, *k) with given stride, padding, dilation, the
rows `a` are the (N, L, C·prod(k)) patches, one per output position (L positions), flattened in
the order of `weight.flatten(1)`, so that `z[:, :, l] = W.flatten(1) a_l + b`. Output gradients
(N, C_out, *S_out) become (N, L, C_out) rows. Patches are unfolded one batch chunk at a time, so
that no more than about `CHUNK_ELEMENTS` patch entries exist at once.

A grouped convolution (`groups` = g > 1, depthwise: g = C) is g independent convolutions: output
channels j·C_out/g ... (j+1)·C_out/g read input channels j·C/g ... (j+1)·C/g only, with the
kernel (C_out, C/g, *k). Its patch of C·prod(k) entries is channel-major, so the entries of group
j are the j-th consecutive C/g·prod(k) of them, and the rows of group j of `W = weight.flatten(1)`
(C_out x C/g·prod(k)) map exactly those: `z_j[:, :, l] = W_j a_{j,l} + b_j`. The rows `a` are
(N, L, g, C/g·prod(k)) and K-FAC models the groups separately (per-group A_j and S_j,
gnfx.layouts.base), as Grosse & Martens' block-diagonal K-FAC would for g separate layers.
A blocked A (a factor above the block's max_factor, gnfx.layouts.base) keeps the prod(k) entries of
each input channel's patch in one block.

A call that convolves with a window of the kernel (a supernet's `W[:o, :c, s:s + k, s:s + k]`, active channels
and a k x k kernel cropped from the center of the K x K one, passes/weight_slices.py: `options["window"]`, one
(start, stop) per dimension of the weight, in the layout of that call's site) unfolds its patches with the
active kernel and the call's own stride, padding and dilation, and places them, and its output gradients, at
the window's entries of the full kernel's rows (C_in/groups·prod(K) entries, C_out outputs), zeros elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gnfx.layouts.base import Layout, in_window

CHUNK_ELEMENTS = 1 << 24


def same_padding(kernel, dilation) -> list[tuple[int, int]]:
    """(left, right) padding of padding='same' per spatial dimension, as torch applies it."""
    out = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        out.append((total // 2, total - total // 2))
    return out


def unfold(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Patches (N, L, C·prod(k)) of x (N, C, *S); padding is a list of (left, right) pairs."""
    pad = [p for pair in reversed(padding) for p in pair]
    x = F.pad(x, pad) if any(pad) else x
    n_spatial = len(kernel)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel dim
    # x: (N, C, *L, *k) -> (N, *L, C, *k)
    n = x.shape[0]
    perm = [0] + list(range(2, 2 + n_spatial)) + [1] + list(range(2 + n_spatial, 2 + 2 * n_spatial))
    x = x.permute(perm)
    positions = math.prod(x.shape[1:1 + n_spatial])
    return x.reshape(n, positions, -1)


class ConvLayout(Layout):
    view = "flatten"

    def __init__(self, block):
        super().__init__(block)
        o = block.options
        self.groups = o.get("groups", 1)
        self.kernel, self.stride, self.dilation = o["kernel_size"], o["stride"], o["dilation"]
        self.padding = o["padding"]  # list of (left, right)
        self.input_unit = math.prod(self.kernel)  # a blocked A keeps each input channel's patch whole
        self.window = o.get("window")  # of a sliced kernel (module docstring): the active kernel is unfolded
        if self.window is not None:
            self.patch_shape = tuple(o["weight_shape"][1:])  # (C_in/groups, *K)
            self.kernel = tuple(hi - lo for lo, hi in self.window[2:])

    def examples(self, a: torch.Tensor) -> int:
        return a.shape[0] if a.dim() == len(self.kernel) + 2 else 1

    def input_chunks(self, a: torch.Tensor):
        unbatched = a.dim() == len(self.kernel) + 1
        if unbatched:
            a = a.unsqueeze(0)
        step = max(1, CHUNK_ELEMENTS // max(self.patch_entries(a[0]), 1))
        for start in range(0, a.shape[0], step):
            patches = self.patches(a[start:start + step])
            patches = patches if self.groups == 1 else patches.unflatten(-1, (self.groups, -1))
            yield patches if self.window is None else in_window(patches, self.window[1:], self.patch_shape)

    def rows(self, a: torch.Tensor) -> int:
        """N·L, with the L output positions of one example's patches (unfolding one example only)."""
        batched = a if a.dim() == len(self.kernel) + 2 else a.unsqueeze(0)
        return batched.shape[0] * (self.patches(batched[:1]).shape[1] if batched.shape[0] else 0)

    def patch_entries(self, example: torch.Tensor) -> int:
        """About how many patch entries one example (C, *S) unfolds to (for the chunk size)."""
        return example.numel() * math.prod(self.kernel)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The rows a (N, L, C·prod(k)) of a batch x (N, C, *S)."""
        return unfold(x, self.kernel, self.stride, self.padding, self.dilation)

    def error_rows(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == len(self.kernel) + 1:
            g = g.unsqueeze(0)
        rows = g.flatten(2).transpose(1, 2)
        return rows if self.window is None else in_window(rows, self.window[:1], (self.block.d_out,))
