"""tensor_hooks: a forward that registers a gradient hook on a tensor, which torch.export leaves out of its graph.

A hook registered in the forward (`h.register_hook(fn)`: torchdeq's `hook_ift=True` implicit differentiation,
which replaces the gradient of f(z*) by the solution of the adjoint fixed point; a gradient-reversal layer
written as `x.register_hook(lambda g: -g)`; a hook that clips or records a gradient) changes the backward, not
the forward: torch.export records the forward's tensor operations and drops the registration, so the captured
graph's backward ran without the hook and the parameters got other gradients than the model's, silently
(2e-2 on a stand-in of torchdeq's). `tensor_hooks_registered()` records, while an export runs, where the forward
registered one (the user's line), so that the export is no capture and gnfx runs the forward as its Python code
(torch.fx records the call as a node, which registers the hook again on each run).
"""
from __future__ import annotations

import contextlib
import traceback

import torch


class ForwardTensorHook(RuntimeError):
    """Raised where an exported forward registered a gradient hook on a tensor (module docstring)."""


@contextlib.contextmanager
def tensor_hooks_registered():
    """While inside, each torch.Tensor.register_hook call appends the line that made it ('file:line') to the
    list yielded, and registers the hook as usual."""
    register, lines = torch.Tensor.register_hook, []

    def recorded(tensor, hook):
        caller = traceback.extract_stack(limit=2)[0]
        lines.append(f"{caller.filename}:{caller.lineno}")
        return register(tensor, hook)

    torch.Tensor.register_hook = recorded
    try:
        yield lines
    finally:
        torch.Tensor.register_hook = register


def dropped_hook(lines: list[str]) -> ForwardTensorHook:
    """The error naming the first line of the forward that registered a tensor hook."""
    return ForwardTensorHook(f"the forward registers a gradient hook on a tensor (Tensor.register_hook at {lines[0]}), "
                             f"which torch.export leaves out of its graph: the graph's backward would not run it")
