"""Transposed convolutions (1-, 2- and 3-d, any groups): rows a are patches of the zero-inserted input.

A transposed convolution `z = conv_transpose(x, W)` of an input (N, C_in, *S) with the kernel W
(C_in, C_out/g, *k), stride s, padding p, output_padding op, dilation d and g groups is a
convolution of stride 1 and dilation d of the input x̃ that has s - 1 zeros inserted between its
entries along each spatial dimension, padded by d(k-1) - p zeros on the left and
d(k-1) - p + op on the right (a negative pad crops), with the kernel W' flipped in its spatial
dimensions and its channels swapped per group: output channel j·C_out/g + o reads input channel
j·C_in/g + c through `W'[j·C_out/g + o, c, κ] = W[j·C_in/g + c, o, k-1-κ]` (κ a multi-index of
kernel positions). Per spatial dimension the output has (S-1)s - 2p + d(k-1) + op + 1 positions,
as torch's.

The flip is moved into the rows: the row of group j at output position l (of L) is the patch of x̃
read with the kernel positions reversed, `a_{j,l}[c·prod(k) + κ] = x̃[j·C_in/g + c, l + d·(k-1-κ)]`
(κ flattened in the order of `W[c, o].flatten()`), so that
`z[:, j·C_out/g + o, l] = Σ_{c,κ} W[j·C_in/g + c, o, κ] a_{j,l}[c·prod(k) + κ] + b`. The weight
reads as the matrix Wmat (C_out x C_in/g·prod(k)), `Wmat[j·C_out/g + o, c·prod(k) + κ] =
W[j·C_in/g + c, o, κ]` (gnfx.targets view "in_out_flatten": a copy, which a write puts back), and
the per-example gradient of W is `Σ_l δ_l a_lᵀ` in that matrix, group by group. As for a convolution
(gnfx.layouts.conv, whose unfolding, chunking and row groups this layout reuses) the rows are
(N, L, C_in·prod(k)), or (N, L, g, C_in/g·prod(k)) with groups, output gradients (N, C_out, *S_out)
are (N, L, C_out) rows, K-FAC keeps one A_j ⊗ S_j per group, and a blocked A keeps each input
channel's patch of prod(k) entries whole.
"""
from __future__ import annotations

import math

import torch

from gnfx.layouts.conv import ConvLayout, unfold


def insert_zeros(x: torch.Tensor, stride) -> torch.Tensor:
    """x (N, C, *S) with s - 1 zeros between neighbouring entries of each spatial dimension:
    (N, C, *((S - 1)s + 1)), x̃[..., i·s] = x[..., i]."""
    if all(s == 1 for s in stride):
        return x
    size = tuple((n - 1) * s + 1 for n, s in zip(x.shape[2:], stride))
    out = x.new_zeros(x.shape[:2] + size)
    out[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
    return out


class ConvTransposeLayout(ConvLayout):
    view = "in_out_flatten"

    def __init__(self, block):
        super().__init__(block)
        o = block.options
        self.upsampling = o["stride"]  # the zeros inserted into the input: s - 1 per gap
        self.stride = (1,) * len(self.kernel)  # of the equivalent convolution
        self.padding = [(d * (k - 1) - p, d * (k - 1) - p + op)
                        for k, d, p, op in zip(self.kernel, self.dilation, o["padding"], o["output_padding"])]

    def patch_entries(self, example: torch.Tensor) -> int:
        return example.numel() * math.prod(self.kernel) * math.prod(self.upsampling)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The rows a (N, L, C_in·prod(k)) of a batch x (N, C_in, *S): patches of x̃, kernel positions
        reversed (module docstring)."""
        n = len(self.kernel)
        rows = unfold(insert_zeros(x, self.upsampling), self.kernel, self.stride, self.padding, self.dilation)
        return rows.unflatten(-1, (-1, *self.kernel)).flip(tuple(range(-n, 0))).flatten(2)
