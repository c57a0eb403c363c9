"""Random numbers a forward draws in place into one of the model's buffers, recorded in torch.fx's graph.

Bayesian layers sample their weight's noise ε into a buffer on every call, W = μ + σ(ρ) ⊙ ε:
bayesian-torch's LinearReparameterization and Conv2dReparameterization (and their Flipout layers) write
`eps = self.eps_weight.data.normal_()`, blitz's TrainableRandomDistribution `self.eps_w.data.normal_()`.
torch.fx proxies parameters but not buffers, so the draw ran once, on the buffer itself, while tracing: ε
was a constant of the graph (the same weight sample on every call), and the changed buffer made the layer
an opaque leaf (passes/module_attributes.py, a forward side effect), its parameters outside every block.

While tracing (`draws_into_buffers_traced(tracer)`), the in-place draws of `IN_PLACE_DRAWS` called on a
tensor that is a buffer of the traced module or a view of one's whole storage (`buffer.data`, `.detach()`:
the same storage, size, stride and offset) are nodes of the graph instead, `buffer.normal_(...)` on the
buffer's `get_attr`: each call of the graph draws a new ε into the buffer, as each call of the module's
forward does, from the same generator (the quadratic step's replays draw the training forward's ε again,
gnfx/random_state.py), and a later read of the buffer in the forward reads the new draw (a `get_attr` node
after the draw). The buffer is left as it was while tracing. A draw into a tensor that is no buffer's (a
tensor the forward made, `x.clone().uniform_(-1, 1)` of Flipout's signs) is recorded by torch.fx itself.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx

# the in-place methods of torch.Tensor that fill a tensor with random numbers
IN_PLACE_DRAWS = ("normal_", "uniform_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_",
                  "geometric_")


def _buffer_named(root: torch.nn.Module, tensor: torch.Tensor) -> str | None:
    """The name of the buffer of `root` that `tensor` is, or views whole (module docstring), else None."""
    for name, buffer in root.named_buffers():
        if tensor is buffer or (
                not buffer.is_meta and tensor.device == buffer.device and tensor.dtype == buffer.dtype
                and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                and tensor.shape == buffer.shape and tensor.stride() == buffer.stride()
                and tensor.storage_offset() == buffer.storage_offset()):
            return name
    return None


@contextlib.contextmanager
def draws_into_buffers_traced(tracer: fx.Tracer):
    """While inside, an in-place draw into a buffer of `tracer.root` is a node of the graph `tracer` traces
    (module docstring); torch.Tensor's methods are restored on exit."""
    saved = {name: getattr(torch.Tensor, name) for name in IN_PLACE_DRAWS}

    def recorded(name, method):
        def draw(self, *args, **kwargs):
            buffer = _buffer_named(tracer.root, self)
            if buffer is None:
                return method(self, *args, **kwargs)
            return tracer.create_proxy("call_method", name, (tracer.create_proxy("get_attr", buffer, (), {}), *args),
                                       kwargs)
        return draw

    for name, method in saved.items():
        setattr(torch.Tensor, name, recorded(name, method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
