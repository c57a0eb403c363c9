"""validation checks: a forward that validates its inputs by value, captured with the checks asserted.

A forward that checks its inputs' values and raises on bad ones (Hugging Face's Wav2Vec2ForCTC:
`if labels is not None and labels.max() >= self.config.vocab_size: raise ValueError(...)`; `if (ids < 0).any():
raise ...`) branches on data, which torch.export cannot guard on (GuardOnDataDependentSymNode: the
value of `labels.max() >= V` is an unbacked symbol u0 of its fake tensors). Such a branch is a
validation check: an `if` whose every side raises, or an `assert`; the forward's computation is the side
that does not.

Only for these, capture is retried as torch.export's draft mode does it, narrowed to the checks: the
model runs once on the example call (no_grad, its buffers and random generators left as they were),
which records the value of every tensor read as a Python scalar (`bool(t)`, `t.item()`, `int(t)`,
`float(t)`) on a validation check's line, in order; the trace then gives the unbacked symbol created
on that line the example's value, so ShapeEnv specializes the branch to it and records the runtime
assertion `aten._assert_scalar(u0 == value)` in the graph (the branch it takes is the one the example
took, which did not raise). A data-dependent branch elsewhere still fails as before: a branch whose
sides both compute (`h if h.mean() > 0 else -h`) stays a CaptureError (torch.cond, or an opaque
submodule under torch.fx). torch.export.draft_export itself is not used: its propagation of real
tensors through every op fails on such models in torch 2.13 (Wav2Vec2's `torch.div(...,
rounding_mode="floor")`: "metadata mismatch ... for func: prims.signbit.default").

Each assertion's message names the check's line. A later call whose values flip a check fails that
assertion in the graph before the graph returns; gnfx then runs the model's own forward on that call,
which raises the model's error (its ValueError), or, if the model does not raise (one of several
conditions the `if` combines flipped), a GnfxError naming the check (gnfx.variants): no graph returns
the result of a branch the model would not take. (Non-strict torch.export turns some Python `assert`s
into runtime assertions itself; `assert (x.abs() < 1e6).all()` it refuses in torch 2.13, as an `if`.)
"""
from __future__ import annotations

import ast
import collections
import contextlib
import functools
import linecache
import os
import re
import traceback

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv
from torch.overrides import TorchFunctionMode

ASSERTION = torch.ops.aten._assert_scalar.default
# the start of the message of every assertion of a specialized validation check
VIOLATED = "gnfx: this call takes the other side of a data-dependent validation check"
_TORCH = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
_HERE = os.path.realpath(__file__)
_SCALAR_READS = (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__)
# ShapeEnv's makers of the unbacked symbol of a scalar read, by the type of the value read (the tensor's dtype)
_UNBACKED = {"create_unbacked_symbool": bool, "create_unbacked_symint": int, "create_unbacked_symfloat": float}


def raised_at_validation_check(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is torch.export's refusal to branch on data
    (GuardOnDataDependentSymNode) raised on a validation check's line: the innermost frame outside
    torch of its traceback."""
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        if isinstance(exc, GuardOnDataDependentSymNode):
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if not os.path.realpath(f.filename).startswith(_TORCH)]
            return bool(frames) and frames[-1].lineno in _validation_lines(frames[-1].filename)
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return False


def _raises_only(statements: list) -> bool:
    """Whether the statements of a branch are one `raise`, or an `elif` that validates in turn."""
    if len(statements) != 1:
        return False
    s = statements[0]
    return isinstance(s, ast.Raise) or isinstance(s, ast.If) and _is_validation(s)


def _is_validation(node: ast.If) -> bool:
    return _raises_only(node.body) and (not node.orelse or _raises_only(node.orelse))


@functools.lru_cache(maxsize=256)
def _validation_lines(filename: str) -> frozenset:
    """The lines of `filename` inside the test of an `if` whose sides raise or are absent (`if bad:
    raise ...`, with `elif` tests that raise), or of an `assert`."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return frozenset()
    return frozenset(line for node in ast.walk(tree)
                     if isinstance(node, ast.Assert) or isinstance(node, ast.If) and _is_validation(node)
                     for line in range(node.test.lineno, node.test.end_lineno + 1))


def _check_here() -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost frame outside torch, if that line is in a validation check."""
    for frame in reversed(traceback.extract_stack()):
        if os.path.realpath(frame.filename).startswith(_TORCH) or os.path.realpath(frame.filename) == _HERE:
            continue
        if frame.lineno in _validation_lines(frame.filename):
            return frame.filename, frame.lineno, (frame.line or "").strip()
        return None
    return None


class _ScalarReads(TorchFunctionMode):
    """Records the value of each tensor read as a Python scalar on a validation check's line, as the
    tensor's dtype has it (`item()`: a bool tensor's `int(t)` is the bool the trace's symbol stands for)."""

    def __init__(self):
        super().__init__()
        self.values = collections.defaultdict(collections.deque)  # (file, line, code) -> values, in order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SCALAR_READS and (where := _check_here()) is not None:
            self.values[where].append(args[0].item())
        return out


def example_values(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The values the validation checks read in the call model(*args, **kwargs), by (file, line, code),
    each in order: from one run of the forward without gradients, its buffers (batch-norm statistics)
    and torch's random generators restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [t.device for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
    reads = _ScalarReads()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), reads:
            model(*args, **kwargs)
    finally:
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)
    return reads.values


@contextlib.contextmanager
def specialized_to(values: dict, checks: list):
    """While torch.export traces: the unbacked symbol a validation check's line creates (its scalar
    read) takes the next of that line's example `values`; ShapeEnv then asserts it at run time
    wherever the trace branches on it. Appends ('file:line: code', value) to `checks` for each."""
    originals = {name: getattr(ShapeEnv, name) for name in _UNBACKED}
    values = {where: collections.deque(read) for where, read in values.items()}  # each trace reads them anew

    def specializing(create, kind):
        @functools.wraps(create)
        def created(shape_env, *args, **kwargs):
            symbol = create(shape_env, *args, **kwargs)
            where = _check_here()
            if where is not None and values.get(where) and type(values[where][0]) is kind:
                value = values[where].popleft()
                shape_env.set_real_tensor_prop_unbacked_vals(symbol.node.expr, value)
                checks.append((f"{where[0]}:{where[1]}: {where[2]}", value))
            return symbol
        return created

    for name, create in originals.items():
        setattr(ShapeEnv, name, specializing(create, _UNBACKED[name]))
    try:
        yield
    finally:
        for name, create in originals.items():
            setattr(ShapeEnv, name, create)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>[^\n]*)')


def name_assertions(graph_module: fx.GraphModule, checks) -> None:
    """Each runtime assertion traced at a specialized check's line (`checks`: 'file:line: code') says,
    when it fails, which check the call flips (the VIOLATED message)."""
    for node in graph_module.graph.nodes:
        frames = list(_FRAME.finditer(node.meta.get("stack_trace") or "")) if node.target is ASSERTION else []
        where = f"{frames[-1]['file']}:{frames[-1]['line']}: {frames[-1]['code'].strip()}" if frames else None
        if where in checks:
            node.args = (node.args[0], f"{VIOLATED} at {where} (the graph was captured from an example call that "
                                       f"took the side that does not raise; {node.args[1]})")
    graph_module.recompile()


def violated_check(exc: BaseException) -> str | None:
    """The message of a graph's failed validation assertion (`name_assertions`), else None."""
    text = str(exc)
    return text[text.index(VIOLATED):] if isinstance(exc, RuntimeError) and VIOLATED in text else None
