"""weight_slices: a layer whose weight is a block of consecutive entries of a parameter, chosen in the forward.

Slimmable networks and the supernets of once-for-all and dynamic-NAS training (AttentiveNAS, BigNAS, HAT)
run each layer at an active width, and the convolutions of an elastic kernel at an active kernel size, by
slicing the full parameter in the forward: `F.linear(x, self.weight[:o, :i], self.bias[:o])`,
`F.conv2d(x, self.weight[:o, :x.shape[1], c:c + k, c:c + k], self.bias[:o])` (a k x k kernel cropped from
the center of a K x K one). torch.fx records the slice as `operator.getitem` of the attribute read with a
tuple of slices, torch.export as a chain of `aten.slice.Tensor`, one per dimension (and `aten.alias` for a
full one).

`sliced_parameter` reads such a chain back to the trainable parameter it slices: its window, one
(start, stop) per dimension of the parameter (the whole dimension where the chain does not slice it; steps of
1 only, bounds given as numbers, as both captures record the widths a forward computed from Python numbers; or
a stop the graph computes from the input, `W[:, :x.shape[1]]` under torch.fx, of a window that starts at 0:
its size is then the call's own, read from its rows).
The layer's block is then the block of the full parameter W (d_out x d_in of the parameter's full shape): its
gradient matrix is the parameter's own, zero outside the window, and its statistics are those of the layer
with the active inputs and output gradients placed at the window's entries, zeros elsewhere
(gnfx.layouts.base.Layout.input_rows and error_rows): A = E[ā āᵀ] with ā = [a embedded in d_in entries, 1],
S = E[δ δᵀ] with δ embedded in d_out entries. That is the K-FAC model of the full layer at this width (the
inactive rows and columns of W carry no gradient and no curvature: their update is 0 under any damping,
since A and S are block diagonal over active and inactive entries), and it keeps one shape whatever width a
step runs at, so that factors averaged over steps of different widths add each entry's statistics from the
steps it was active in.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten
SLICE_OPS = (aten.slice.Tensor,)
ALIAS_OPS = (aten.alias.default,)
SLICES = (operator.getitem, *SLICE_OPS, *ALIAS_OPS)


def _bounds(window: tuple[int, int | None], start, stop, step) -> tuple[int, int | None] | None:
    """The window of a dimension (start, stop) sliced again by [start:stop:step] (Python's rules: None,
    negative and out-of-range bounds), or None for a step other than 1 or bounds that are no numbers. A whole
    dimension cut at a stop the graph computes (`W[:, :x.shape[1]]` under torch.fx, a graph node) is (0, None):
    the active entries are the first ones, as many as the call's rows have (gnfx.layouts.base.in_window)."""
    if step not in (None, 1):
        return None
    if isinstance(stop, fx.Node) and start in (None, 0) and window[0] == 0 and window[1] is not None:
        return 0, None
    if not all(b is None or isinstance(b, int) for b in (start, stop)) or window[1] is None:
        return None
    lo, hi = window
    first, last, _ = slice(start, stop).indices(hi - lo)
    return lo + first, lo + max(first, last)


def _sliced_once(node: fx.Node, windows: list) -> list | None:
    """The windows of the parameter after one slicing node (getitem with slices, aten.slice.Tensor or
    aten.alias), or None when `node` is no such basic slice of every dimension it indexes."""
    if node.op != "call_function" or node.kwargs and node.target is not aten.slice.Tensor:
        return None
    windows = list(windows)
    if node.target in ALIAS_OPS:
        return windows
    if node.target in SLICE_OPS:
        dim, start, stop, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
        dim = node.kwargs.get("dim", dim) % len(windows)
        window = _bounds(windows[dim], node.kwargs.get("start", start), node.kwargs.get("end", stop),
                         node.kwargs.get("step", step))
        if window is None:
            return None
        windows[dim] = window
        return windows
    if node.target is not operator.getitem:
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if Ellipsis in index:  # W[..., a:b]: the slices after it index the last dimensions
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(windows) - len(index) + 1) + index[at + 1:]
    if len(index) > len(windows) or not all(isinstance(s, slice) for s in index):
        return None
    for dim, s in enumerate(index):
        windows[dim] = _bounds(windows[dim], s.start, s.stop, s.step)
        if windows[dim] is None:
            return None
    return windows


def sliced_parameter(node, param_of, shape_of):
    """(parameter name, (first slicing node, the parameter's read), its window: (start, stop) per dimension)
    of a chain of slices (module docstring), each the only user of the one before, ending in `node`, of a
    trainable parameter; else None. A chain that slices nothing off (the full width) gives the whole window."""
    chain = []
    while isinstance(node, fx.Node) and param_of(node) is None and node.op == "call_function" and node.args \
            and node.target in SLICES:
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node) or (len(node.users) != 1 and param_of(node) is None):
            return None
    name = param_of(node)
    if name is None or not chain:
        return None
    shape = shape_of(name)
    windows = [(0, n) for n in shape]
    for step in reversed(chain):
        windows = _sliced_once(step, windows)
        if windows is None:
            return None
    return name, (chain[-1], node), tuple(windows)
