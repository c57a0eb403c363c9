"""Layouts: how each layer kind's raw tensors become the rows of docs/design.md §1.

A layout turns a layer input into rows `a` (N, R, d_a) and an output gradient into rows `g`
(N, R, d_out), and says how the weight reads as the matrix `W` of `z = W a` (rows: outputs,
the S side; columns: inputs, the A side) and what shapes its factors have (gnfx.layouts.base:
a diagonal A, or independent groups of rows). A layer kind is a layout plus a detector in passes/,
registered under its name (gnfx.layouts.registration): a built-in kind is one file here, its
detector and one registration line in passes/analyze.py; a user's, one call of
gnfx.register_layer_kind.
"""
from gnfx.layouts.registration import KINDS, LayerKind, layout_class, layout_of, register_layer_kind

__all__ = ["KINDS", "LayerKind", "layout_class", "layout_of", "register_layer_kind"]
