"""capture: nn.Module -> torch.fx.GraphModule.

Symbolic tracing (`torch.fx`) comes first: it gives a readable, module-level graph and needs no
example inputs. A submodule whose forward cannot be traced becomes a leaf (an opaque call in the
graph, its parameters left to the fallback preconditioner) and is reported. When the top-level
forward itself cannot be traced, capture falls back to `torch.export.export(strict=False)` with
dynamic dimensions, which needs example inputs and yields an aten-level graph whose nodes keep
their module path in `nn_module_stack`; with example inputs, "auto" also prefers torch.export
when symbolic tracing had to leave submodules opaque. Both graphs run on the very Parameter
objects of the model.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sysconfig
import traceback

import torch
from torch import fx, nn

from gnfx.errors import CaptureError

CAPTURE_MODES = ("auto", "fx", "export")


@dataclasses.dataclass
class Captured:
    """A captured graph and how it was obtained.

    `leaves` maps the dotted path of each submodule kept opaque to the reason.
    """

    graph_module: fx.GraphModule
    form: str  # "fx" (torch-level graph) or "export" (aten-level graph)
    leaves: dict[str, str]


class _LeafFindingTracer(fx.Tracer):
    """An fx tracer that treats the given module paths as leaves and remembers the innermost
    submodule whose forward raised during tracing."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# code that is not the user's: torch, gnfx (its runtime and these passes), Python's standard library
_NOT_USER = tuple(os.path.realpath(d) + os.sep for d in (
    os.path.dirname(torch.__file__), os.path.dirname(inspect.getfile(CaptureError)), os.path.dirname(__file__),
    sysconfig.get_paths()["stdlib"]))


def _user_frame(exc: BaseException, model: nn.Module) -> str:
    """Where in the user's code capture failed: the innermost frame outside torch, gnfx and the
    standard library, in the traceback of `exc` or of the exceptions it was raised from (torch
    raises some failures anew), the deepest first; else the model's forward itself (a failure
    before any of its lines ran, e.g. on its signature)."""
    chain = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__
    for raised in reversed(chain):
        frames = [f for f in traceback.extract_tb(raised.__traceback__)
                  if not os.path.realpath(f.filename).startswith(_NOT_USER)]
        if frames:
            return f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}"
    forward = inspect.unwrap(type(model).forward)
    code = getattr(forward, "__code__", None)
    if code is None:
        return f"{type(model).__name__}.forward"
    return f"{code.co_filename}:{code.co_firstlineno}: {forward.__qualname__}, the forward being captured"


def trace_fx(model: nn.Module, leaf_modules=(), concrete_args=None) -> Captured:
    """Symbolically trace `model`, turning untraceable submodules into leaves; `concrete_args`
    fixes arguments to values (e.g. an optional input left out: None).

    Raises CaptureError when the top-level forward itself cannot be traced.
    """
    leaves: dict[str, str] = {name: "requested with leaf_modules" for name in leaf_modules}
    known = dict(model.named_modules())
    for name in leaves:
        if name not in known or name == "":
            raise CaptureError(
                f"leaf_modules names {name!r}, which is not a submodule of the model; "
                f"valid names are the dotted paths of model.named_modules()")
    while True:
        tracer = _LeafFindingTracer(set(leaves))
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
            failed = tracer.failed_module
            if failed and failed not in leaves:
                leaves[failed] = f"could not be traced ({_describe(exc)})"
                continue
            raise CaptureError(
                f"torch.fx could not trace the forward of {type(model).__name__}: {_describe(exc)}\n"
                f"  at {_user_frame(exc, model)}\n"
                f"Fix: mark the submodule that holds this code as opaque with "
                f"gnfx.compile(..., leaf_modules=['path.to.module']), rewrite data-dependent "
                f"branches with torch.cond, or use capture='export' with example_inputs=...") from exc
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        return Captured(gm, "fx", leaves)


def _dynamic_shapes(example_inputs):
    def dims(t):
        return {d: torch.export.Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None
    return tuple(dims(t) for t in example_inputs)


def export(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> Captured:
    """Capture with torch.export (non-strict, every tensor dimension dynamic)."""
    try:
        ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs or None,
                                 strict=False, dynamic_shapes=None if example_kwargs else _dynamic_shapes(example_inputs))
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {_describe(exc)}\n"
            f"  at {_user_frame(exc, model)}\n"
            f"Fix: rewrite data-dependent branches with torch.cond, or mark the offending submodule "
            f"with leaf_modules=[...] and capture='fx'") from exc
    return Captured(ep.module(), "export", {})


def capture(model: nn.Module, mode: str = "auto", leaf_modules=(), example_inputs=None,
            example_kwargs=None) -> Captured:
    """Capture `model` as an FX graph: `mode` is "fx", "export" or "auto" (fx, then export)."""
    if mode == "export":
        if example_inputs is None:
            raise CaptureError("capture='export' needs example inputs: pass example_inputs=(x,)")
        return export(model, example_inputs, example_kwargs)
    try:
        captured = trace_fx(model, leaf_modules)
    except CaptureError:
        if mode == "fx" or example_inputs is None:
            raise
        return export(model, example_inputs, example_kwargs)
    automatic_leaves = set(captured.leaves) - set(leaf_modules)
    if mode == "auto" and automatic_leaves and example_inputs is not None and not leaf_modules:
        try:  # torch.export may capture what symbolic tracing had to leave opaque
            return export(model, example_inputs, example_kwargs)
        except CaptureError:
            pass
    return captured


def optional_inputs(model: nn.Module) -> tuple[str, ...]:
    """The forward's parameters that default to None: symbolic tracing treats them as tensors, so
    a call that leaves one out needs a graph traced with it fixed to None."""
    params = inspect.signature(model.forward).parameters.values()
    return tuple(p.name for p in params if p.default is None)
