"""validation checks and input branches: a forward that branches on its inputs' values, captured
with the branch asserted.

A forward that checks its inputs' values and raises on bad ones (Hugging Face's Wav2Vec2ForCTC:
`if labels is not None and labels.max() >= self.config.vocab_size: raise ValueError(...)`; `if (ids < 0).any():
raise ...`) branches on data, which torch.export cannot guard on (GuardOnDataDependentSymNode: the
value of `labels.max() >= V` is an unbacked symbol u0 of its fake tensors). Such a branch is a
validation check: an `if` whose every side raises, or an `assert`; the forward's computation is the side
that does not. An input branch is an `if` (or `a if c else b`) whose sides both compute and whose
condition is computed from the call's integer and boolean inputs alone (labels, masks, token ids; no
parameter, buffer or floating-point input, whose values change between ordinary batches): Hugging Face's
DebertaV2ForSequenceClassification's default loss, `label_index = (labels >= 0).nonzero(); if
label_index.size(0) > 0: <cross-entropy of the labelled rows> else: <a zero loss>`.

Only for these, capture is retried as torch.export's draft mode does it, narrowed to them: the
model runs once on the example call (no_grad, its buffers and random generators left as they were),
which records the value of every tensor read as a Python scalar (`bool(t)`, `t.item()`, `int(t)`,
`float(t)`) and the row count of every data-sized result (`nonzero`, `argwhere`, `masked_select`),
by line, in order; the trace then gives the unbacked symbols created on a validation check's line, and
on the lines that created the symbols an input branch's test refused to guard on, the example's values,
so ShapeEnv specializes the branch to them and records the runtime assertion of the side taken
(`aten._assert_scalar(u0 == value)` for a check's read, `u0 > 0` for DeBERTa's test: the condition,
not the count) in the graph. Each refusal at another input branch retries once more with its symbols'
lines added. After the trace an input branch whose asserted condition the graph computes from a
parameter, a buffer or a floating-point input (`h if h.mean() > 0 else -h`, which flips as the weights
train; `if x.sum() > 0:`, which flips from batch to batch) is refused, and
any other data-dependent branch still fails as before: a CaptureError (torch.cond, or an opaque
submodule under torch.fx). torch.export.draft_export itself is not used: its propagation of real
tensors through every op fails on such models in torch 2.13 (Wav2Vec2's `torch.div(...,
rounding_mode="floor")`: "metadata mismatch ... for func: prims.signbit.default").

Each assertion's message names its line. A later call whose values flip a validation check fails that
assertion in the graph before the graph returns; gnfx then runs the model's own forward on that call,
which raises the model's error (its ValueError), or, if the model does not raise (one of several
conditions the `if` combines flipped), a GnfxError naming the check (gnfx.variants). A later call that
takes the other side of an input branch (a batch whose labels are all -100 for DeBERTa) fails its
assertion likewise; gnfx.variants then captures the call again, specialized to that side, as another
variant of the same form: no graph returns the result of a branch the model would not take. (Non-strict
torch.export turns some Python `assert`s into runtime assertions itself; `assert (x.abs() < 1e6).all()`
it refuses in torch 2.13, as an `if`.)
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
from .module_attributes import attributes_kept

ASSERTION = torch.ops.aten._assert_scalar.default
# the start of the message of every assertion of a specialized validation check
VIOLATED = "gnfx: this call takes the other side of a data-dependent validation check"
# the start of the message of every assertion of a specialized input branch
OTHER_SIDE = "gnfx: this call takes the other side of a data-dependent branch"
_TORCH = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
_HERE = os.path.realpath(__file__)
_SCALAR_READS = (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__)
# results whose row count is data (an unbacked symbol of the trace): the example records it
_DATA_SIZED = (torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.masked_select,
               torch.Tensor.masked_select)
# ShapeEnv's makers of the unbacked symbol of a scalar read, by the type of the value read (the tensor's dtype)
_UNBACKED = {"create_unbacked_symbool": bool, "create_unbacked_symint": int, "create_unbacked_symfloat": float}


def refused_branch(exc: BaseException) -> tuple[tuple[str, int, str], bool, frozenset] | None:
    """Where torch.export refused to branch on data, if `exc` (or an exception it was raised from) is
    its refusal (GuardOnDataDependentSymNode) raised on a validation check's line or in an input
    branch's test (the innermost frame outside torch of its traceback): ((file, line, code), whether
    it is a validation check, the names of the unbacked symbols the refused condition holds); else None."""
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        if isinstance(exc, GuardOnDataDependentSymNode):
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if not os.path.realpath(f.filename).startswith(_TORCH)]
            if not frames:
                return None
            f = frames[-1]
            check, branch = f.lineno in _validation_lines(f.filename), f.lineno in _branch_lines(f.filename)
            if not (check or branch):
                return None
            return (f.filename, f.lineno, (f.line or "").strip()), check, frozenset(map(str, exc.cond.free_symbols))
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _raises_only(statements: list) -> bool:
    """Whether the statements of a branch are one `raise`, or an `elif` that validates in turn."""
    if len(statements) != 1:
        return False
    s = statements[0]
    return isinstance(s, ast.Raise) or isinstance(s, ast.If) and _is_validation(s)


def _is_validation(node: ast.If) -> bool:
    return _raises_only(node.body) and (not node.orelse or _raises_only(node.orelse))


@functools.lru_cache(maxsize=256)
def _tree(filename: str) -> ast.AST | None:
    try:
        return ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return None


def _test_lines(node) -> range:
    return range(node.test.lineno, node.test.end_lineno + 1)


@functools.lru_cache(maxsize=256)
def _validation_lines(filename: str) -> frozenset:
    """The lines of `filename` inside the test of an `if` whose sides raise or are absent (`if bad:
    raise ...`, with `elif` tests that raise), or of an `assert`."""
    tree = _tree(filename)
    return frozenset() if tree is None else frozenset(
        line for node in ast.walk(tree)
        if isinstance(node, ast.Assert) or isinstance(node, ast.If) and _is_validation(node)
        for line in _test_lines(node))


@functools.lru_cache(maxsize=256)
def _branch_lines(filename: str) -> frozenset:
    """The lines of `filename` inside the test of an `if` statement or expression whose sides compute."""
    tree = _tree(filename)
    return frozenset() if tree is None else frozenset(
        line for node in ast.walk(tree)
        if isinstance(node, ast.IfExp) or isinstance(node, ast.If) and not _is_validation(node)
        for line in _test_lines(node)) - _validation_lines(filename)


def _line_here() -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost frame outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        if not (os.path.realpath(frame.filename).startswith(_TORCH) or os.path.realpath(frame.filename) == _HERE):
            return frame.filename, frame.lineno, (frame.line or "").strip()
    return None


class _ExampleReads(TorchFunctionMode):
    """Records the value of each tensor read as a Python scalar, as the tensor's dtype has it (`item()`:
    a bool tensor's `int(t)` is the bool the trace's symbol stands for), and the row count of each
    data-sized result, by the line outside torch that reads or makes it."""

    def __init__(self):
        super().__init__()
        self.values = collections.defaultdict(collections.deque)  # (file, line, code) -> values, in order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SCALAR_READS or func in _DATA_SIZED:
            where = _line_here()
            if where is not None:
                rows = out[0] if isinstance(out, tuple) else out  # nonzero(as_tuple=True): one index per dim
                self.values[where].append(args[0].item() if func in _SCALAR_READS else rows.shape[0])
        return out


@contextlib.contextmanager
def without_trace(model: nn.Module, args: tuple, kwargs: dict):
    """For a run of the forward on the call (args, kwargs) that leaves no trace: no backward runs, so no
    gradient is left (the forward runs in the caller's grad mode: one that differentiates inside, an
    interatomic potential's forces F = -∂E/∂x by torch.autograd.grad as MACE's, raised under torch.no_grad,
    an error gnfx then named as the model's own), and the model's buffers (batch-norm statistics), its
    modules' own attributes (an evaluation counter, passes/module_attributes.py) and torch's random
    generators restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [t.device for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
    try:
        with torch.random.fork_rng(devices=devices), attributes_kept(model):
            yield
    finally:
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)


def example_values(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The values the call model(*args, **kwargs) reads as Python scalars and the row counts of its
    data-sized results, by (file, line, code), each in order: from one run of the forward that leaves
    no trace (`without_trace`)."""
    reads = _ExampleReads()
    with without_trace(model, args, kwargs), reads:
        model(*args, **kwargs)
    return reads.values


@contextlib.contextmanager
def specialized_to(values: dict, lines: set, created: dict, checks: list):
    """While torch.export traces: records in `created` the (file, line, code) that creates each unbacked
    symbol, by its name; the symbol a validation check's line creates (its scalar read), or one of the
    `lines` (those of an input branch's symbols), takes the next of that line's example `values`, so that
    ShapeEnv asserts at run time the side it decides wherever the trace branches on it. Appends
    ('file:line: code', value) to `checks` for each validation check's."""
    originals = {name: getattr(ShapeEnv, name) for name in _UNBACKED}
    values = {where: collections.deque(read) for where, read in values.items()}  # each trace reads them anew

    def specializing(create, kind):
        @functools.wraps(create)
        def made(shape_env, *args, **kwargs):
            symbol = create(shape_env, *args, **kwargs)
            where = _line_here()
            if where is None:
                return symbol
            created.update(dict.fromkeys(map(str, symbol.node.expr.free_symbols), where))  # a bool's: Eq(u0, 1)
            check = where[1] in _validation_lines(where[0])
            if (check or where in lines) and values.get(where) and type(values[where][0]) is kind:
                value = values[where].popleft()
                shape_env.set_real_tensor_prop_unbacked_vals(symbol.node.expr, value)
                if check:
                    checks.append((f"{where[0]}:{where[1]}: {where[2]}", value))
            return symbol
        return made

    for name, create in originals.items():
        setattr(ShapeEnv, name, specializing(create, _UNBACKED[name]))
    try:
        yield
    finally:
        for name, create in originals.items():
            setattr(ShapeEnv, name, create)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>[^\n]*)')


def _assertions_at(graph_module: fx.GraphModule, places) -> list[tuple[fx.Node, str]]:
    """The runtime assertions traced at one of `places` ('file:line: code'), with their place."""
    found = []
    for node in graph_module.graph.nodes:
        frames = list(_FRAME.finditer(node.meta.get("stack_trace") or "")) if node.target is ASSERTION else []
        where = f"{frames[-1]['file']}:{frames[-1]['line']}: {frames[-1]['code'].strip()}" if frames else None
        if where in places:
            found.append((node, where))
    return found


def name_assertions(graph_module: fx.GraphModule, checks, branches=None) -> None:
    """Each runtime assertion traced at a specialized check's line (`checks`: 'file:line: code'), or at
    a line whose symbols an input branch tests (`branches`: that line -> the branch's test, each
    'file:line: code'; torch.export places the assertion where the symbol is created), says, when it
    fails, which one the call flips (the VIOLATED and OTHER_SIDE messages)."""
    branches = branches or {}
    for node, where in _assertions_at(graph_module, set(checks) | set(branches)):
        if where in checks:
            node.args = (node.args[0], f"{VIOLATED} at {where} (the graph was captured from an example call that "
                                       f"took the side that does not raise; {node.args[1]})")
        else:
            node.args = (node.args[0], f"{OTHER_SIDE} at {branches[where]} (the graph was captured from an "
                                       f"example call that took the other side; asserted where {where} is "
                                       f"computed: {node.args[1]})")
    graph_module.recompile()


def flipping_branch(graph_module: fx.GraphModule, branches: dict) -> str | None:
    """The first input branch (`branches`: as for `name_assertions`) whose assertion the graph computes
    from floating-point data, a parameter or buffer (a get_attr) or a floating-point input (a placeholder),
    among its inputs, transitively, with that tensor's name; else None. Such a condition changes between
    ordinary batches and as the model trains (`h if h.mean() > 0 else -h`, `if x.sum() > 0:`); one on the
    call's integer and boolean inputs (labels, masks, token ids) holds for the batches alike, as DeBERTa's.
    A branch none of whose lines has an assertion in the graph is returned too: nothing would name it."""
    found = _assertions_at(graph_module, set(branches))
    asserted = {branches[where] for _, where in found}
    for branch in dict.fromkeys(branches.values()):
        if branch not in asserted:
            return f"{branch} (its condition reads data whose assertion gnfx cannot find in the graph)"
    for node, where in found:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n.op == "get_attr" and _is_state(graph_module, n.target):
                return f"{branches[where]} (its condition reads the model's {n.target!r})"
            value = n.meta.get("val")
            if n.op == "placeholder" and isinstance(value, torch.Tensor) and value.is_floating_point():
                return f"{branches[where]} (its condition reads the floating-point input {n.target!r})"
            for m in n.all_input_nodes:
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
    return None


def _is_state(graph_module: fx.GraphModule, target: str) -> bool:
    """Whether `target` of a get_attr is one of the model's parameters or buffers (not a constant)."""
    owner, _, field = target.rpartition(".")
    module = graph_module.get_submodule(owner) if owner else graph_module
    return field in module._parameters or field in module._buffers


def violated_check(exc: BaseException) -> str | None:
    """The message of a graph's failed validation assertion (`name_assertions`), else None."""
    text = str(exc)
    return text[text.index(VIOLATED):] if isinstance(exc, RuntimeError) and VIOLATED in text else None


def other_side(exc: BaseException) -> str | None:
    """The message of a graph's failed input-branch assertion (`name_assertions`), else None."""
    text = str(exc)
    return text[text.index(OTHER_SIDE):] if isinstance(exc, RuntimeError) and OTHER_SIDE in text else None
