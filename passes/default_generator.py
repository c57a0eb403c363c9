"""default generator: torch.export can capture a random draw given `generator=None` at a dynamic size.

`torch.randn(shape, generator=None)` (diffusers' `randn_tensor`, which every posterior sample and noise
draw of its models goes through, passes its generator argument on, None when the caller gives none)
selects the overload that takes a generator, `aten.randn.generator`, where `torch.randn(shape)` selects
`aten.randn.default`. With a size that torch.export keeps dynamic (the batch), torch 2.13 refuses the
generator overloads ("SymIntArrayRef expected to contain only concrete integers"), so a forward that
draws its noise so could not be captured at all.

While capturing, the size-taking draws `torch.rand`, `torch.randn`, `torch.randint` and
`torch.randperm` leave out a `generator=None` keyword: the same draw from the default generator (the
two overloads draw from it alike), recorded as the overload without a generator. A generator that is
given is passed on as it is.
"""
from __future__ import annotations

import contextlib
import functools

import torch

DRAWS = ("rand", "randn", "randint", "randperm")


def _without_default_generator(draw):
    """`draw` called without a `generator=None` keyword (module docstring)."""
    @functools.wraps(draw)
    def call(*args, **kwargs):
        if "generator" in kwargs and kwargs["generator"] is None:
            del kwargs["generator"]
        return draw(*args, **kwargs)
    return call


@contextlib.contextmanager
def default_generator_left_out():
    """While torch.export captures: torch's size-taking draws leave out `generator=None` (module docstring)."""
    draws = {name: getattr(torch, name) for name in DRAWS}
    for name, draw in draws.items():
        setattr(torch, name, _without_default_generator(draw))
    try:
        yield
    finally:
        for name, draw in draws.items():
            setattr(torch, name, draw)
