"""Torch random numbers a forward draws outside torch.fx's graph while it is traced.

torch.fx records the calls whose arguments include a traced value; a draw from torch's generators with none
(`torch.rand([])`: the LayerDrop of Hugging Face's BART, Whisper and wav2vec2 families, `if self.training and
torch.rand([]) < self.layerdrop: skip the layer`) runs once while tracing, and its value is a constant of the
graph: the branch of that one draw is taken on every call (a layer never dropped, or always). A trace during
which a generator moved (`moved`; capture puts the generators back afterwards, passes/capture.py
`generators_kept`) drew so; it is traced again with such draws raising `TorchRandomDraw` (`raising_torch_draws`:
the functions of `torch` that draw, `DRAWS`, called with no traced argument), so that the submodule that draws
becomes a leaf that draws anew at every call, as an untraceable one does; drawn by the model's own forward, the
trace fails and torch.export captures the forward, the draw an operation of its graph. A draw through a
reference taken at import (`from torch import rand`) or by a method of a concrete tensor is not seen.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

# the functions of `torch` that draw from its generators
DRAWS = ("rand", "randn", "randint", "randperm", "bernoulli", "normal", "multinomial", "poisson", "rand_like",
         "randn_like", "randint_like")


class TorchRandomDraw(RuntimeError):
    """Raised by a torch random draw outside the traced graph inside `raising_torch_draws`."""


def moved(before: list, after: list) -> bool:
    """Whether two lists of (device, generator state) (gnfx.random_state.RandomState.states) differ."""
    return any(not torch.equal(a, b) for (_, a), (_, b) in zip(before, after))


@contextlib.contextmanager
def raising_torch_draws():
    """Every function of DRAWS called with no traced value among its arguments raises TorchRandomDraw."""
    saved = {name: getattr(torch, name) for name in DRAWS}

    def raising(name, function):
        def draw(*args, **kwargs):
            if not any(isinstance(leaf, fx.Proxy) for leaf in tree_leaves((args, kwargs))):
                raise TorchRandomDraw(f"the forward draws torch.{name} outside the traced graph; a captured graph "
                                      f"would keep the value of the one draw made while tracing on every call")
            return function(*args, **kwargs)
        return draw

    for name, function in saved.items():
        setattr(torch, name, raising(name, function))
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch, name, function)
