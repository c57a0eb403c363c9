"""Python-level random numbers drawn by a forward while it is captured.

A forward that draws with Python's `random` or `numpy.random` (LayerDrop in several model libraries:
`if self.training and random.uniform(0, 1) < self.layerdrop: continue`) runs that code once while
torch.fx or torch.export captures it: the graph keeps the branch of that one draw, and every training
call then takes it (a layer dropped on every step, or never). Capture therefore

1. notes whether the forward drew at all (`drawn`: the generators' states before and after; nothing
   else runs on a forward that draws nothing);
2. if it did, captures it again with every draw forced to the bottom and to the top of [0, 1)
   (`forced_draws`: `random.random` and what is built on it, such as `random.uniform`, and numpy's
   `random`, `rand`, `random_sample`, `uniform`): the same graph both times means the draws decide
   nothing in it (a LayerDrop at probability 0), and the graph stands;
3. otherwise the draws decide the graph: under `raising_draws` a draw raises `PythonRandomDraw`, which
   the fx capture reports as it reports any submodule it cannot trace (that submodule becomes an
   opaque call, which draws anew on every call), and torch.export as an error.

The generators' states are put back after every capture (`kept_state`): capturing draws nothing from
the user's stream. Draws through other functions (`random.randint`, `random.choice`, numpy's `choice`,
`randint`, `permutation`, ...) cannot be forced in (2): a forced capture during which the generators still
move drew with one, and its draws decide the graph (its values at least: Hugging Face's wav2vec2 and HuBERT
draw SpecAugment's masked spans with `np.random.choice`, which torch.export bakes into the graph as a constant
mask, the same code under either forced draw); they raise in (3) too (`UNFORCED_NUMPY`, and Python's
`getrandbits`, which its integer and sequence draws are built on). A private `random.Random()` instance or
numpy `Generator` is not seen.
"""
from __future__ import annotations

import contextlib
import random
import sys

from gnfx.random_state import numpy_random, python_state, restore_python_state, same_python_state

_LOW, _HIGH = 0.0, 1.0 - 2.0 ** -53  # the least and the greatest value random.random() returns


class PythonRandomDraw(RuntimeError):
    """Raised by a Python-level random draw inside `raising_draws`."""


@contextlib.contextmanager
def kept_state():
    """The generators' states put back on exit; yields a function telling whether anything was drawn."""
    before = python_state()
    try:
        yield lambda: not same_python_state(before, python_state())
    finally:
        restore_python_state(before)


# numpy's module functions that draw and that `forced_draws` cannot force (module doc); `raising_draws` makes them raise
UNFORCED_NUMPY = ("choice", "randint", "permutation", "shuffle", "randn", "normal", "standard_normal", "binomial",
                  "poisson", "exponential", "beta", "gamma")


@contextlib.contextmanager
def _patched(python_random, numpy_draw, unforced=None):
    """`random.random` (module function and the hidden instance's method, which `uniform` and the
    other continuous draws call) replaced by `python_random()`, numpy's module functions by
    `numpy_draw(name, args, kwargs)`; with `unforced`, also Python's `getrandbits` and UNFORCED_NUMPY by it."""
    instance = random._inst
    methods = ("random",) + (("getrandbits",) if unforced else ())
    saved_instance = {m: instance.__dict__.get(m) for m in methods}
    saved_module = random.random
    np_random = numpy_random()
    names = ("random", "rand", "random_sample", "uniform") + (UNFORCED_NUMPY if unforced else ())
    saved_numpy = {} if np_random is None else {n: getattr(np_random, n) for n in names if hasattr(np_random, n)}
    random.random = instance.random = python_random
    if unforced:
        instance.getrandbits = unforced
    for name in saved_numpy:
        setattr(np_random, name, lambda *args, _name=name, **kwargs: numpy_draw(_name, args, kwargs))
    try:
        yield
    finally:
        random.random = saved_module
        for method, saved in saved_instance.items():
            if saved is None:
                delattr(instance, method)
            else:
                setattr(instance, method, saved)
        for name, function in saved_numpy.items():
            setattr(np_random, name, function)


def forced_draws(high: bool):
    """Every draw that `_patched` covers at the top (`high`) or the bottom of [0, 1)."""
    u = _HIGH if high else _LOW

    def numpy_draw(name, args, kwargs):
        numpy = sys.modules["numpy"]
        if name == "uniform":
            low, top = (list(args) + [kwargs.get("low", 0.0), kwargs.get("high", 1.0)][len(args):])[:2]
            size = args[2] if len(args) > 2 else kwargs.get("size")
            value = low + (top - low) * u
        else:
            size = args if name == "rand" else (args[0] if args else kwargs.get("size"))
            value = u
        return value if size in (None, ()) else numpy.full(size, value)

    return _patched(lambda: u, numpy_draw)


def raising_draws():
    """Every draw that `_patched` covers raises PythonRandomDraw."""
    def draw(*_args, **_kwargs):
        raise PythonRandomDraw(
            "the forward draws a Python random number (random or numpy.random); a captured graph would keep the "
            "branch of the one draw made while capturing on every call")

    return _patched(draw, lambda *_: draw(), unforced=draw)


def draws_decide(capture) -> bool:
    """Whether the graph that `capture()` gives (as its code) differs between every draw forced to the
    bottom and to the top of [0, 1); a capture that fails under either counts as differing, and so does one
    during which the generators moved: a draw that cannot be forced (module doc)."""
    graphs = []
    for high in (False, True):
        try:
            with kept_state() as drawn, forced_draws(high):
                graphs.append(capture())
                if drawn():
                    return True
        except Exception:  # noqa: BLE001 - a forced draw that leads the forward into an error decides it too
            return True
    return graphs[0] != graphs[1]
