"""grad_modes: the forward's switches of gradient recording, in torch.fx's graph.

`with torch.no_grad(): t = self.teacher(x)` (a distillation teacher, a frozen feature extractor under a linear
probe, BYOL's target network) switches gradient recording off by a call of Python's (`torch.no_grad`,
`torch.set_grad_enabled`, `torch.enable_grad` all call `torch._C._set_grad_enabled`; `torch.inference_mode` its own
switch), which symbolic tracing runs
once and does not record: the graph computed the teacher with gradients, so its parameters got a gradient from
the student's loss and the optimizer stepped them, silently. `grad_modes_recorded` records each such call as a
node of the graph, in the order the forward makes them; the graph then switches as the forward does (the mode a
context restores on exit is the one it found while tracing: a training call's, with gradients on, as every call
that runs a graph is: gnfx.compiled). torch.export records these switches itself.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx

SET_GRAD_ENABLED = torch._C._set_grad_enabled
# the fallback reason of a parameter the forward reads only there (passes/analyze.py; torch.export's regions too)
NO_GRADIENT = "read inside a torch.no_grad() region"


INFERENCE_ENTER, INFERENCE_EXIT = torch.inference_mode.__enter__, torch.inference_mode.__exit__


@contextlib.contextmanager
def grad_modes_recorded(tracer: fx.Tracer):
    """While `tracer` traces: each call of torch._C._set_grad_enabled also records itself as a node, and so does
    `torch.inference_mode()` (a node switching gradient recording off at its entry and back at its exit: what
    it means for the gradients; the graph's tensors are not inference tensors)."""

    def record(mode: bool) -> None:
        tracer.create_node("call_function", SET_GRAD_ENABLED, (bool(mode),), {})

    def set_grad_enabled(mode: bool) -> None:
        SET_GRAD_ENABLED(mode)
        record(mode)

    def inference_enter(self) -> None:
        INFERENCE_ENTER(self)
        if self.mode:
            record(False)

    def inference_exit(self, *exc) -> None:
        INFERENCE_EXIT(self, *exc)
        if self.mode:
            record(torch.is_grad_enabled())

    torch._C._set_grad_enabled = set_grad_enabled
    torch.inference_mode.__enter__, torch.inference_mode.__exit__ = inference_enter, inference_exit
    try:
        yield
    finally:
        torch._C._set_grad_enabled = SET_GRAD_ENABLED
        torch.inference_mode.__enter__, torch.inference_mode.__exit__ = INFERENCE_ENTER, INFERENCE_EXIT


def nodes_without_gradients(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of `gm` that run with gradient recording switched off by the forward's own switches (recorded by
    `grad_modes_recorded`), on a call made with it on, as every call that runs a graph is: a parameter read there
    gets no gradient from them."""
    off, enabled = set(), True
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is SET_GRAD_ENABLED:
            enabled = bool(node.args[0])
        elif not enabled:
            off.add(node)
    return off
