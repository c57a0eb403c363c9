"""numpy scalars in a forward traced by torch.fx: the Python numbers they are.

A forward that computes with a numpy scalar (`scores / np.sqrt(d_k)`, blitz's `-np.log(np.sqrt(2π)) -
torch.log(σ)`: numpy's functions of a Python number return numpy.float64) put `np.float64(2.83)` into torch.fx's
graph as an argument, whose generated code names `np`, which it does not import: every call of the captured
graph raised "NameError: name 'np' is not defined". With the scalar on the left (`np.float64 - x`), numpy
tried to read the traced value as an array first and the trace failed ("invalid __array_struct__"), so the
submodule was an opaque leaf (the model's own forward: no capture by torch.fx).

`python_number(a)` is a numpy scalar's value as the Python number it holds (`.item()`: a float, int, bool or
complex of the same value; numpy.float64 is a Python float already, numpy.float32 widens exactly), anything
else as it is; the fx tracer records every argument through it. A traced value declares `__array_ufunc__ =
None` (passes/capture.py's proxies), so that numpy's operators return NotImplemented to it and Python calls its
reflected operator (`x.__rsub__(c)`), which records the operation in the graph.
"""
from __future__ import annotations

import sys


def python_number(a):
    """`a` as a Python number when it is a numpy scalar (module docstring), else `a`."""
    numpy = sys.modules.get("numpy")  # only a numpy the model's code could have imported
    return a.item() if numpy is not None and isinstance(a, numpy.generic) else a
