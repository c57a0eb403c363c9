"""trace_check: a torch.fx graph checked against the model's own forward on a real call.

Symbolic tracing runs the forward's Python code on Proxies, and Python's own type tests are answered for the
Proxy, not for the value it stands for: `isinstance(mask, torch.Tensor)` is False for a mask passed in and
`isinstance(h, torch.Tensor)` for every intermediate tensor, so the graph holds the branch the code takes for
a non-tensor and computes another function, silently (the mask left out; a scaling skipped). The same goes for
any test of a traced value Python answers without calling into it (`type(x) is torch.Tensor`, `x in (a, b)`).
No graph can be told from its trace alone; a call can: `differing_output` runs the model's forward and the
traced graph on the same inputs, from the same random state, leaving no trace (no gradient, buffers and
generators restored: passes/validation_checks.py `without_trace`), and says where their outputs differ, or
that the graph raised where the forward does not. gnfx.variants runs it on the first call a graph serves, and
captures that call with torch.export (which runs the code on the real values) where they differ.

The graph and the forward run the same torch operations in the same order, so their outputs agree to the last
bits but for what torch.fx's own tracing changes (torch.nn's fast paths are traced in their composite form):
a difference above RELATIVE_TOLERANCE of the output's largest value (OR_EPS times the dtype's epsilon for
half-precision types) is another function.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree

from .python_random import kept_state
from .validation_checks import without_trace

RELATIVE_TOLERANCE = 1e-4
OR_EPS = 64  # for a type of few bits (bfloat16, float16): this many of its epsilons, relative
COMPARED = (bool, int, float, complex, str, type(None))  # other leaves (objects the forward returns) are not compared


def _output(run, args: tuple, kwargs: dict, model: nn.Module):
    """run(*args, **kwargs) leaving no trace, its tensors detached; on copies of the input tensors, which a forward
    may change in place (`x /= 255`)."""
    args, kwargs = _pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    with kept_state(), without_trace(model, args, kwargs):
        out = run(*args, **kwargs)
    return _pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)


def _tolerance(dtype: torch.dtype) -> float:
    return max(RELATIVE_TOLERANCE, OR_EPS * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _leaf_difference(path: str, ours, theirs) -> str | None:
    """Where the graph's output leaf `ours` differs from the forward's `theirs`, or None."""
    if not isinstance(theirs, torch.Tensor):
        same = not isinstance(theirs, COMPARED) or (type(ours) is type(theirs) and ours == theirs)
        return None if same else f"{path} is {ours!r} where the forward returns {theirs!r}"
    if not isinstance(ours, torch.Tensor) or ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        described = (f"a {tuple(ours.shape)} {ours.dtype} tensor" if isinstance(ours, torch.Tensor)
                     else type(ours).__name__)
        return f"{path} is {described} where the forward returns a {tuple(theirs.shape)} {theirs.dtype} tensor"
    if theirs.numel() == 0 or not (theirs.dtype.is_floating_point or theirs.dtype.is_complex):
        return None if torch.equal(ours, theirs) else f"{path} differs in {int((ours != theirs).sum())} entries"
    scale = theirs.abs().nan_to_num(0, 0, 0).max().item()
    gap = (ours - theirs).abs()
    nan_apart = torch.isnan(ours) != torch.isnan(theirs)
    largest = gap.nan_to_num(0).max().item()
    if nan_apart.any() or largest > _tolerance(theirs.dtype) * max(scale, 1e-30):
        return f"{path} differs by up to {largest:.3g} (its entries up to {scale:.3g})"
    return None


def differing_output(model: nn.Module, graph, args: tuple, kwargs: dict) -> str | None:
    """Where `graph`'s output differs from `model`'s own forward on the call (args, kwargs) (module doc), or
    None where they agree or the forward itself raises (its error is the model's, which the call then meets).
    `graph`: an fx.GraphModule, or a run of one taking the call as it does (passes/index_lookup.py `IndexKinds`)."""
    try:
        theirs = _output(model, args, kwargs, model)
    except Exception:  # noqa: BLE001 - the model's own failure, not the graph's
        return None
    try:
        ours = _output(graph, args, kwargs, model)
    except Exception as exc:  # noqa: BLE001 - any failure of the graph where the forward runs
        return f"the graph raises {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    leaves, spec = _pytree.tree_flatten(ours)
    expected, expected_spec = _pytree.tree_flatten(theirs)
    if spec != expected_spec:
        return f"the graph returns {spec} where the forward returns {expected_spec}"
    for (path, _), a, b in zip(_pytree.tree_flatten_with_path(theirs)[0], leaves, expected):
        found = _leaf_difference("the output" + _pytree.keystr(path), a, b)
        if found is not None:
            return found
    return None
