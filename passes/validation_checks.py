"""validation checks: a forward that validates its inputs by value, captured with the check asserted.

A forward that checks its inputs' values and raises on bad ones (Hugging Face's Wav2Vec2ForCTC:
`if labels is not None and labels.max() >= self.config.vocab_size: raise ValueError(...)`; `if (ids < 0).any():
raise ...`) branches on data, which torch.export cannot guard on (GuardOnDataDependentSymNode). Such a
branch is a validation: one side raises, the other is the forward's only computation. Only then,
capture retries with `torch.export.draft_export`, which takes the branch the example call took (the one
that does not raise) and records the data-dependent condition as a runtime assertion in the graph
(`aten._assert_scalar` of the condition, specialized to its value in the example). A later call
whose values flip the condition fails that assertion in the graph, before the graph returns; gnfx
then runs the model's own forward on that call, which raises the model's error (its ValueError), or, if the
model does not raise (the condition was one of several the `if` combines), a GnfxError naming the
check: no graph ever returns the result of a branch the model would not take.

A branch whose sides both compute (`h if h.mean() > 0 else -h`) is no validation: it stays a
CaptureError (torch.cond, or an opaque submodule under torch.fx). Python `assert` statements need none
of this: non-strict torch.export already records them as runtime assertions.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import linecache
import logging
import re

import torch
from torch import fx
from torch.export._draft_export import FailureType
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

ASSERTION = torch.ops.aten._assert_scalar.default
# the message of every assertion in a graph captured with specialized validation checks
VIOLATED = "gnfx: this call takes the other side of a data-dependent validation check"
# torch's loggers that report draft_export's specializations (gnfx reports them in the capture description)
_QUIET = ("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes", "torch._export.non_strict_utils")


class NotValidations(Exception):
    """The data-dependent branches of a forward are not all validation checks."""


def is_data_dependent_guard(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is torch.export's refusal to branch on data."""
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        if isinstance(exc, GuardOnDataDependentSymNode):
            return True
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
    """The lines of `filename` inside the test of an `if` whose sides either raise or are absent
    (`if bad: raise ...`, with `elif` tests that raise), or of an `assert`."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return frozenset()
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_validation(node) or isinstance(node, ast.Assert):
            lines.update(range(node.test.lineno, node.test.end_lineno + 1))
    return frozenset(lines)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in \S+\n\s*(?P<code>[^\n]*)')


def _check_of(node: fx.Node) -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost frame of the code a graph node was traced from."""
    frames = list(_FRAME.finditer(node.meta.get("stack_trace") or ""))
    if not frames:
        return None
    last = frames[-1]
    return last["file"], int(last["line"]), last["code"].strip()


@contextlib.contextmanager
def _quiet():
    """torch's warnings about the specialization (gnfx's capture description names each check)."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def specialized_export(module, args: tuple, kwargs: dict, dynamic_shapes) -> tuple:
    """`torch.export.draft_export` of the call, when every specialization it makes is a validation
    check asserted in the graph: (ExportedProgram, checks), the checks as 'file:line: code (value
    in the example)' and each of the graph's assertions renamed to say what failing it means.
    Raises NotValidations, naming the first other specialization, otherwise."""
    with _quiet():
        ep = torch.export.draft_export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    assertions = [n for n in ep.graph_module.graph.nodes if n.op == "call_function" and n.target is ASSERTION]
    asserted = {(line, code): (file, line, code) for n in assertions if (c := _check_of(n)) for file, line, code in [c]}
    checks = []
    for failure in ep._report.failures:
        frame = failure.data.get("user_stack", [{}])[-1] if failure.data.get("user_stack") else {}
        where = asserted.get((frame.get("line"), str(frame.get("loc", "")).strip()))
        if failure.failure_type is not FailureType.DATA_DEPENDENT_ERROR or where is None:
            raise NotValidations(f"draft_export's {failure.failure_type} at line {frame.get('line')}: "
                                 f"{frame.get('loc')} is not asserted in the graph")
        file, line, code = where
        if line not in _validation_lines(file):
            raise NotValidations(f"{file}:{line}: {code} branches on data and is no validation check "
                                 f"(an `if` whose every side raises)")
        checks.append(f"{file}:{line}: {code} ({failure.data['expr']} was {failure.data['result']} in the example)")
    if not checks:
        raise NotValidations("draft_export specialized nothing")
    for node in assertions:
        file, line, code = _check_of(node) or ("?", 0, "")
        node.args = (node.args[0], f"{VIOLATED} at {file}:{line}: {code} (the graph was captured from an example "
                                   f"call that took the side that does not raise; {node.args[1]})")
    ep.graph_module.recompile()
    return ep, tuple(dict.fromkeys(checks))


def violated_check(exc: BaseException) -> str | None:
    """The message of a graph's failed validation assertion (`specialized_export`), else None."""
    text = str(exc)
    return text[text.index(VIOLATED):] if isinstance(exc, RuntimeError) and VIOLATED in text else None
