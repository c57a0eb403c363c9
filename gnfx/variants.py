"""The captured graphs of a compiled model: the first capture, and one variant per form of call.

The first capture decides the graph form (docs/design.md §2). torch.fx comes first: when it traces the
whole forward without inputs, gnfx.compile captures at once (unless lazy modules have not inferred
their parameters' shapes yet, gnfx.lazy_modules). Otherwise capture waits for the
model's first call (as torch.compile does; or uses `example_inputs`), so that the call's real
arguments serve as the example: torch.fx is traced again with the optional inputs the call leaves
out fixed to None, and whenever it still fails anywhere (the top-level forward, a submodule it
would keep opaque, or a function a library registered with torch.fx.wrap that takes parameters, as
torchvision's Swin attention does), torch.export captures the call too, and the form that puts more trainable
parameters in curvature blocks is kept. Every torch.fx graph is checked against the model's forward on the first
call it serves (passes/trace_check.py: a type test of a traced value put another branch in the graph); one that
differs gives way to torch.export's capture of the call, the whole first capture made again if no step has used it
(`check_call`). Where neither captures the forward (capture="auto"), the model's own
forward runs as its Python code at every call, its children opened (passes/opaque_root.py, form "eager"),
with a RuntimeWarning. The LayerTable says which form was used and why.

Later calls of another form (keyword instead of positional inputs, an optional input present or
absent, a shape outside the dynamic range an exported graph was captured for, such as a shorter
last batch), or a call that takes the other side of a data-dependent branch on its integer inputs that a
graph was specialized to (passes/validation_checks.py), get their own capture of the same form on first use, lowered,
analyzed and tapped into the same StatisticsStore, so that every call collects the same blocks' statistics.

A method other than forward that gnfx.compile(methods=[...]) names is a form of its own: the method runs as
its Python code at every call with the model's children opened (passes/opaque_root.py), whatever form the
forward has. A model first called through such a method (a reinforcement-learning agent without a forward)
takes that capture as its first, form "eager", and its forward's calls are then served the same way, so
that every entry point taps the blocks of the one plan.
"""
from __future__ import annotations

import copy
import inspect
import types
import warnings

import torch
from torch import nn
from torch.fx import GraphModule

from gnfx.errors import CaptureError, GnfxError
from gnfx.lazy_modules import has_lazy_modules
from gnfx.opened_leaf import OpenedLeaf
from gnfx.passes.capture import (CONSTANTS, REQUESTED, UNUSED, accepts, check_leaf_modules, export, optional_inputs,
                                 shapes_of, trace_fx)
from gnfx.passes.index_lookup import IndexKinds, traced_indexings
from gnfx.passes.constant_parameters import constant_parameters_message, parameters_read_as_constants
from gnfx.passes.opaque_root import opaque_root
from gnfx.passes.grad_modes import NO_GRADIENT
from gnfx.passes.leaf_outputs import output_structures
from gnfx.passes.module_attributes import module_numbers
from gnfx.passes.python_random import kept_state
from gnfx.passes.taps import insert_taps
from gnfx.passes.trace_check import differing_output
from gnfx.passes.validation_checks import other_side, violated_check, without_trace

NOT_CAPTURED = ("not captured yet: gnfx captures the model's graph at its first call, from that call's inputs "
                "(pass example_inputs=... to gnfx.compile to capture at once)")
COVERAGE_WARNING = 0.9  # warn when fewer of the trainable parameters' entries are in curvature blocks


class NotCaptured:
    """`model.layers` before the first call of a model captured lazily: it says so, and using it
    as a table raises."""

    def __repr__(self) -> str:
        return NOT_CAPTURED

    def __getattr__(self, name):
        raise AttributeError(f"layers.{name}: {NOT_CAPTURED}")

    def _raise(self, *_):
        raise GnfxError(f"model.layers: {NOT_CAPTURED}")

    __iter__ = __len__ = __getitem__ = __contains__ = _raise


def own_error(model: nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """The exception the model's own forward raises on the call (args, kwargs), run once leaving no trace
    (passes/validation_checks.py `without_trace`, Python's random generators kept as well), or None."""
    try:
        with kept_state(), without_trace(model, args, kwargs):
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any error of the model's own is what its user would see
        return exc
    return None


class Variants:
    """The instrumented graphs of `model`, one per form of call, all tapping one StatisticsStore.

    `build(captured)` lowers and analyzes a capture, returning (graph module, LayerTable, block
    sites); `start(table)` plans the first capture's table and returns the planned table (the
    analyzed one with the plan's choices, gnfx.plan) and the StatisticsStore.
    """

    def __init__(self, model: nn.Module, mode: str, leaf_modules, build, start):
        check_leaf_modules(model, leaf_modules)
        self.model, self.mode, self.leaf_modules = model, mode, tuple(leaf_modules)
        self._build, self._start = build, start
        self.table = None  # the LayerTable of the first capture, as planned
        self.graph_module = None  # its instrumented graph
        self.store = None
        self.form = None
        # whether a replay of the forward may draw Python-level random numbers (gnfx.random_state): a
        # capture saw it draw, or keeps submodules opaque, whose code capture did not run
        self.draws_python_random = False
        # the custom autograd.Functions an exported graph holds as their forwards' operations (passes/capture.py)
        self.functions: set[str] = set()
        self._graphs: dict[tuple, list] = {}  # call key -> instrumented graphs (exported: one per shape range)
        self._seen: dict[tuple, list] = {}  # call key -> input shapes of the exported graphs' captures
        self._uncapturable: set = set()  # calls whose capture failed (fx: key; export: key, shapes, branch flipped)
        self._structures: dict[str, tuple] = {}  # the tuples and lists submodules return (passes/leaf_outputs.py)
        self._unchecked: dict[tuple, tuple] = {}  # call key -> (traced graph, draws) of a capture made without inputs
        self._unused_hooks: list = []  # `_watch_unused`'s
        self._optional = optional_inputs(model)
        self._signature = inspect.signature(model.forward)
        # each submodule's flags when gnfx.compile built this (their names: those the key reads; a flag a
        # wrapper applied later sets, FSDP2's _is_fsdp_managed_module, is no branch of the model's forward)
        self._flag_names = {name: {attr for attr, _ in module_flags(m)} for name, m in model.named_modules()}
        # and their numbers (`module_numbers`), but those of the modules a torch.fx graph calls and of the
        # modules inside them, which read theirs at each call (`_read_at_call`, their names)
        self._number_names = {name: {attr for attr, _ in module_numbers(m)} for name, m in model.named_modules()}
        self._read_at_call: frozenset[str] = frozenset()
        self._warned_numbers = False

    @property
    def captured(self) -> bool:
        return self.table is not None

    def graphs(self):
        """Every instrumented graph captured so far, and the graphs of their opened children
        (gnfx.opened_leaf), whose parameters have the model's names too."""
        return [g for graphs in self._graphs.values() for gm in graphs
                for g in (gm, *(child for m in gm.modules() if isinstance(m, OpenedLeaf) for child in m.graphs))]

    def graph_ids(self) -> tuple[int, ...]:
        """The ids of the instrumented graphs captured so far, without walking them for their opened children's
        (fixed at each one's capture): a key that changes when a capture adds or drops a graph."""
        return tuple(id(gm) for graphs in self._graphs.values() for gm in graphs)

    # --- the first capture ---------------------------------------------------------------
    def capture_without_inputs(self) -> None:
        """At gnfx.compile without example inputs: capture now if torch.fx traces the whole
        forward (or the user asked for fx and leaves), else wait for the first call; always wait for it
        while a lazy module has not inferred its parameters, which that call does (gnfx.lazy_modules)."""
        if self.mode == "export" or has_lazy_modules(self.model):
            return
        try:
            fx = trace_fx(self.model, self.leaf_modules)
        except CaptureError:
            return
        if traced_indexings(fx.graph_module):  # W[x]: whether x is integer indices, the call tells
            return
        if self.mode == "fx" or not self._untraced(fx):
            self._begin(fx, self._fx_key(()), "it traced the whole forward" if not self._untraced(fx)
                        else "capture='fx': what it could not trace stays opaque", traced_copy=True)

    def capture(self, args: tuple, kwargs: dict) -> None:
        """The first capture, from the call (args, kwargs)."""
        if self.mode == "export":
            try:
                exported = export(self.model, args, _sorted(kwargs))
            except CaptureError:
                self._raise_own_error(args, kwargs)
                raise
            return self._begin(exported, self._key("export", args, kwargs), "capture='export'",
                               shapes=shapes_of(args, kwargs))
        fixed = self._fixed(args, kwargs)
        try:
            fx, fx_error = trace_fx(self.model, self.leaf_modules, dict(fixed)), None
            if fx.leaves:  # traced again with the tuples and lists its leaves return (passes/leaf_outputs.py)
                self._structures = output_structures(self.model, args, kwargs)
                if set(fx.leaves) & set(self._structures):
                    fx = trace_fx(self.model, self.leaf_modules, dict(fixed), self._structures)
            self._check_traced(fx, args, kwargs)
        except CaptureError as exc:
            fx, fx_error = None, exc
        if self.mode == "fx":
            if fx_error is not None:
                raise fx_error
            return self._begin(fx, self._fx_key(fixed), "capture='fx'")
        if fx is not None and not self._untraced(fx):
            return self._begin(fx, self._fx_key(fixed), "it traced the whole forward")
        if fx is not None and self.leaf_modules:
            return self._begin(fx, self._fx_key(fixed), "leaf_modules were requested, which torch.export cannot "
                                                 "keep opaque")
        try:
            exported, export_error = export(self.model, args, _sorted(kwargs)), None
        except CaptureError as exc:
            exported, export_error = None, exc
        if exported is None and fx is None:
            self._raise_own_error(args, kwargs)
            return self._begin_opaque(fx_error, export_error)
        if exported is None:
            return self._begin(fx, self._fx_key(fixed), f"the submodules it could not trace are leaves; torch.export "
                                                 f"failed: {str(export_error).splitlines()[0]}")
        export_key, shapes = self._key("export", args, kwargs), shapes_of(args, kwargs)
        if fx is None:
            return self._begin(exported, export_key,
                               str(fx_error).splitlines()[0],
                               shapes=shapes)
        built_fx, built_export = self._build(fx), self._build(exported)
        share_fx, share_export = self._share(built_fx[1]), self._share(built_export[1])
        leaves = ", ".join(self._untraced(fx))
        # torch.export sees the whole forward (every call a site of its graph): it is kept where it covers
        # as much as fx with the layers opened inside fx's leaves (passes/opaque_children.py) and more
        # than fx's graph alone
        if share_export >= share_fx and share_export > self._share(built_fx[1], opened=False):
            return self._begin(exported, export_key, f"torch.fx could not trace {leaves}: torch.export puts "
                               f"{100 * share_export:.1f}% of the parameters in curvature blocks, torch.fx "
                               f"{100 * share_fx:.1f}%", built_export, shapes)
        return self._begin(fx, self._fx_key(fixed), f"{leaves} could not be traced and are leaves: torch.fx puts "
                           f"{100 * share_fx:.1f}% of the parameters in curvature blocks, torch.export "
                           f"{100 * share_export:.1f}%", built_fx)

    def _check_traced(self, captured, args: tuple, kwargs: dict):
        """`captured`, a torch.fx capture, if its graph computes the model's forward on the call (args, kwargs)
        (passes/trace_check.py), else a CaptureError saying where they differ. A forward that draws Python random
        numbers is not checked (the graph replays none of them). The check's run of the graph records what each
        traced index of a trainable table is on this call (passes/index_lookup.py `IndexKinds`)."""
        gm = captured.graph_module
        indices = traced_indexings(gm)
        differs = None if captured.draws else differing_output(self.model, IndexKinds(gm, indices) if indices else gm,
                                                               args, kwargs)
        if differs is not None:
            raise CaptureError(f"torch.fx's graph of {type(self.model).__name__} computes another function than its "
                               f"forward on this call: {differs}. Tracing answers what the forward's Python asks of a "
                               f"traced value for the placeholder, not the value (passes/trace_check.py): a type test "
                               f"such as isinstance(x, torch.Tensor) is False for every traced tensor; and it traces "
                               f"the forward method, without the hooks registered on the model itself.\nFix: "
                               f"capture='export' (or 'auto' with example_inputs=...), or torch.is_tensor(x) for the "
                               f"test, which gnfx refuses to answer for a traced value")
        return captured

    def check_call(self, args: tuple, kwargs: dict, fresh: bool) -> None:
        """Before a training call runs a torch.fx graph: check the graph of its form against the model's forward on
        it (passes/trace_check.py) where it has not been: the graph gnfx.compile captured without inputs, at the
        first call of its form, and, at the model's first training call (`fresh`: no statistics collected, no step
        taken), the graph of that call's form, traced now. Where they differ, the first capture is made again from
        a fresh call (`capture`, which takes torch.export's graph where torch.fx's differs) under capture="auto"; a
        later form's calls run the model's own forward (`_refuse`); under capture="fx" a CaptureError says where."""
        if self.form != "fx" or not self._unchecked:
            return
        key = self._fx_key(self._fixed(args, kwargs))
        try:
            if key in self._unchecked:
                traced, draws = self._unchecked.pop(key)
                self._check_traced(types.SimpleNamespace(graph_module=traced, draws=draws), args, kwargs)
            elif fresh and key not in self._graphs:
                captured = self._check_traced(trace_fx(self.model, self.leaf_modules, dict(key[1]), self._structures),
                                              args, kwargs)
                self._forget_other_numbers(key)
                self._add(key, lambda: captured, key)
        except CaptureError as exc:
            if self.mode == "fx":
                raise
            if not fresh:  # the graph of the first capture: its plan has stepped
                self._graphs[key] = []
                return self._refuse(key, key, exc)
            for handle in self._unused_hooks:
                handle.remove()
            self._unused_hooks.clear()
            self._unchecked.clear()
            self._graphs.clear()
            self.table = self.graph_module = self.store = self.form = None
            self.capture(args, kwargs)

    def capture_method(self, method: str) -> None:
        """The first capture, from a call of the model's method `method` (module doc): the method as its
        Python code, the children opened."""
        captured, built = opaque_root(self.model, self.leaf_modules, self._build, method)
        if not built[1].blocks:
            raise CaptureError(f"{type(self.model).__name__}.{method} calls no layer gnfx can capture on its "
                               f"own (its children, opened as passes/opaque_children.py says, have no "
                               f"curvature block): {built[1].opened}")
        self._begin(captured, ("eager", method), f"first called through its method {method} "
                    f"(gnfx.compile(methods=...)): its Python code runs at every call, the layers of the "
                    f"submodules it calls opened", built)

    def call_method(self, method: str, args: tuple, kwargs: dict):
        """Run the instrumented graph of the model's method `method` for this call (module doc)."""
        return self._eager(method, args, kwargs)

    def _eager(self, method: str | None, args: tuple, kwargs: dict):
        """The call through the model's forward (`method` None) or its method `method` as its own Python code,
        children opened (passes/opaque_root.py), captured on first use into the one store."""
        key = ("eager",) if method is None else ("eager", method)
        if key not in self._graphs:
            _, (gm, _, sites) = opaque_root(self.model, self.leaf_modules, self._build, method)
            gm = insert_taps(gm, sites, self.store)
            gm.training = self.model.training
            self._graphs[key] = [gm]
        return self._graphs[key][0](*args, **kwargs)

    def _begin_opaque(self, fx_error: CaptureError, export_error: CaptureError) -> None:
        """Where neither torch.fx nor torch.export captured the forward (capture='auto'): its own code runs
        as written at every call, its children opened (passes/opaque_root.py), with a RuntimeWarning saying
        so. A CaptureError with both failures, the better answer, where that opens no layer."""
        name = type(self.model).__name__
        captured, built = opaque_root(self.model, self.leaf_modules, self._build)
        if not built[1].blocks:
            raise CaptureError(f"neither torch.fx nor torch.export could capture {name}, and the layers its "
                               f"forward calls cannot be captured on their own either.\n{fx_error}\n{export_error}"
                               ) from export_error
        failures = "; ".join(" ".join(line.strip() for line in str(e).splitlines()[:2] if not line.startswith("Fix:"))
                             for e in (fx_error, export_error))  # each one's failure and where
        why = f"neither torch.fx nor torch.export captured the forward of {name}: {failures}"
        warnings.warn(f"gnfx: {why}. So {name}'s own forward runs as its Python code at every call (its "
                      f"branches and loops taken anew), and the layers of the submodules it calls are curvature "
                      f"blocks, each captured on its own (print(model) lists them); parameters its own code uses "
                      f"directly fall back to the diagonal preconditioner. To capture the whole forward instead, "
                      f"rewrite the lines named with torch.cond or move them into a submodule",
                      RuntimeWarning, stacklevel=5)
        self._begin(captured, ("eager",), f"{why}; its own code runs eagerly, its submodules' layers opened", built)

    def _raise_own_error(self, args: tuple, kwargs: dict) -> None:
        """Where capture failed: raise what the model's own forward raises on this call (`own_error`), a
        failure of the model's and not of the capture's, with a note saying so; nothing if it runs."""
        own = own_error(self.model, args, kwargs)
        if own is not None:
            own.add_note(f"gnfx: {type(self.model).__name__}'s own forward raises this on the call gnfx was "
                         f"capturing its graph from (run without gnfx, leaving no trace); capture failed on it too")
            raise own

    def _begin(self, captured, key, why: str, built=None, shapes=None, traced_copy: bool = False) -> None:
        # the traced graph as torch.fx gave it, for `check_call` (lowering rewrites it)
        traced = GraphModule(captured.graph_module, copy.deepcopy(captured.graph_module.graph)) if traced_copy else None
        gm, table, sites = built or self._build(captured)
        constants = parameters_read_as_constants(gm, self.model)
        if constants:  # passes/constant_parameters.py: keras 3's models
            raise CaptureError(constant_parameters_message(constants, self.model))
        self.draws_python_random |= captured.draws or bool(captured.leaves)
        self.functions.update(captured.functions)
        if captured.checks:  # passes/validation_checks.py
            why += ("; the forward's data-dependent validation checks (`if ...: raise`, `assert`) are runtime "
                    "assertions in the graph, specialized to the side the example call took, which does not raise: "
                    + "; ".join(captured.checks) + ". A call that fails one runs the model's own forward, which "
                    "raises its error (or gnfx raises a GnfxError naming the check if the model does not)")
        if captured.branches:
            why += ("; the forward's data-dependent branches on its inputs are runtime assertions in the graph, "
                    "specialized to the side the example call took: " + "; ".join(captured.branches) + ". A call "
                    "that takes another side is captured again for it")
        table.capture = why
        self.form = captured.form
        if key[0] in ("fx", "export"):  # the key without the numbers of the modules the graph calls
            called = called_modules(gm) if captured.form == "fx" else ()
            self._read_at_call = frozenset(name for name, _ in self.model.named_modules() if _within(name, called))
            key = (*key[:-1], self._module_state())
        if traced is not None:
            self._unchecked[key] = (traced, captured.draws)
        self.table, self.store = self._start(table)
        self.graph_module = insert_taps(gm, sites, self.store)
        self._graphs[key] = [self.graph_module]
        if shapes is not None:
            self._seen[key] = [shapes]
        self._warn_if_low_coverage()
        self._watch_unused()

    # --- later calls -----------------------------------------------------------------------
    def __call__(self, args: tuple, kwargs: dict):
        """Run the instrumented graph for this call (captured on first use). A call of a form
        that cannot be captured runs the original forward, without statistics, and warns once."""
        if self.form == "eager":  # the model's own forward, with its opened children (passes/opaque_root.py)
            return self._eager(None, args, kwargs)
        if self.form == "fx":
            key = self._fx_key(self._fixed(args, kwargs))
            if key not in self._graphs:
                self._forget_other_numbers(key)
                self._add(key, lambda: self._check_traced(
                    trace_fx(self.model, self.leaf_modules, dict(key[1]), self._structures), args, kwargs), key)
            graphs = self._graphs[key]
            return graphs[0](*args, **kwargs) if graphs else self.model(*args, **kwargs)
        key, kwargs = self._key("export", args, kwargs), _sorted(kwargs)
        flipped = None
        for gm in (g for g in self._graphs.get(key, ()) if accepts(g, args, kwargs)):  # lazily: the first that holds
            out, flipped = self._run(gm, args, kwargs)
            if flipped is None:
                return out
        shapes = shapes_of(args, kwargs)
        if (key, shapes, flipped) in self._uncapturable:
            return self.model(*args, **kwargs)
        if key not in self._graphs:
            self._forget_other_numbers(key)
        if flipped is not None:
            warnings.warn(f"{flipped}: gnfx captures the call again, specialized to the side it takes, as another "
                          f"graph of this form. Each call runs the graphs in turn until one holds its side, so a "
                          f"branch that flips between ordinary batches runs the forward up to it once more each time "
                          f"it does; torch.cond (or a `problem_type` that picks the branch, in Hugging Face's "
                          f"models) avoids it", RuntimeWarning, stacklevel=4)
        seen = self._seen.setdefault(key, [])
        gm = self._add(key, lambda: export(self.model, args, kwargs, seen), (key, shapes, flipped))
        seen.append(shapes)
        if gm is None:
            return self.model(*args, **kwargs)
        out, flipped = self._run(gm, args, kwargs)
        if flipped is not None:
            raise GnfxError(f"{flipped}, in the graph captured from this very call: gnfx cannot hold this branch. Fix: "
                            f"rewrite it with torch.cond, or keep its submodule opaque with leaf_modules=[...] and "
                            f"capture='fx'")
        return out

    def _forget_other_numbers(self, key) -> None:
        """Before capturing for `key`: the graphs of the same call with other numbers of the modules
        (`_module_state`) are dropped, as no later call will have their values (a schedule moves on), and the
        change is said once."""
        others = [k for k in self._graphs if k[:-1] == key[:-1] and k[-1][:-1] == key[-1][:-1]]
        for other in others:
            del self._graphs[other]
            self._seen.pop(other, None)
        if others and not self._warned_numbers:
            self._warned_numbers = True
            before = dict(((name, attr), value) for name, attr, value in others[0][-1][-1])
            changed = [f"{name + '.' if name else ''}{attr} {before.get((name, attr))} -> {value}"
                       for name, attr, value in key[-1][-1] if before.get((name, attr)) != value]
            warnings.warn(f"gnfx: {', '.join(changed[:5])}{' and more' * (len(changed) > 5)}: a number the traced "
                          f"forward read changed since its graph was captured, which holds it as a constant (a "
                          f"dropout's p, a batch norm's momentum or eps under torch.export; a drop-path rate or a "
                          f"temperature read by a traced forward): gnfx captures the forward again with the new "
                          f"values, for the statistic steps that run the graph. A value changed at every step (a "
                          f"dropout or drop-path schedule) is captured again at every statistic step, and so is one "
                          f"the forward does not read (a running metric kept on a module: keep it off the model)",
                          RuntimeWarning, stacklevel=5)

    def _run(self, gm, args, kwargs):
        """(gm(*args, **kwargs), None), where a failed validation assertion (passes/validation_checks.py)
        raises what the model raises on this call, or, if it raises nothing, a GnfxError naming the check;
        a failed input-branch assertion gives (None, its message), and what the taps recorded in the
        stopped forward is forgotten."""
        try:
            return gm(*args, **kwargs), None
        except RuntimeError as exc:
            check, flipped = violated_check(exc), other_side(exc)
            if check is None and flipped is None:
                raise
        if flipped is not None:
            self.store.discard_forward()
            return None, flipped
        self.model(*args, **kwargs)  # the model's own error for these inputs
        raise GnfxError(f"{check}. The model does not raise on this call, so it takes a branch the graph does not "
                        f"hold. Fix: rewrite the check with torch._check(...) or torch.cond, or keep the "
                        f"checking submodule opaque with leaf_modules=[...] and capture='fx'")

    def _add(self, key, capture, call):
        """Capture (`capture()`), lower, analyze and tap the graph for the calls of `key`; None
        (and a warning) if it cannot be captured, and `call` is not tried again."""
        try:
            captured = capture()
            gm, _, sites = self._build(captured)
        except CaptureError as exc:
            return self._refuse(key, call, exc)
        self.draws_python_random |= captured.draws or bool(captured.leaves)
        self.functions.update(captured.functions)
        gm = insert_taps(gm, sites, self.store)
        gm.training = self.model.training
        self._graphs.setdefault(key, []).append(gm)
        return gm

    def _refuse(self, key, call, exc: CaptureError) -> None:
        """Calls of `key` run the original forward, without statistics, with a warning saying why (`exc`): a
        form of call that could not be captured; `call` is not tried again."""
        self._uncapturable.add(call)
        self._graphs.setdefault(key, [])
        warnings.warn(f"gnfx: a call of another form than the captured one could not be captured, so calls "
                      f"of this form run the original forward and add no statistics: {exc}",
                      RuntimeWarning, stacklevel=5)

    def _fixed(self, args, kwargs) -> tuple[tuple[str, object], ...]:
        """The optional inputs (passes/capture.py `optional_inputs`) that this call leaves at their
        defaults or gives a Python constant, with their values: a torch.fx graph of the call is traced
        with them fixed."""
        if not self._optional:
            return ()
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple((n, bound.arguments[n]) for n in self._optional if isinstance(bound.arguments[n], CONSTANTS))

    def _key(self, form: str, args, kwargs) -> tuple:
        """What an exported graph fixes about a call: the inputs' structure, the values of its
        non-tensor inputs, the rank and dtype of its tensors, and the submodules in eval mode."""
        flat, spec = torch.utils._pytree.tree_flatten((tuple(args), _sorted(kwargs)))
        leaves = tuple((x.dim(), x.dtype) if isinstance(x, torch.Tensor) else _hashable(x) for x in flat)
        return form, str(spec), leaves, self._module_state()

    def _fx_key(self, fixed: tuple) -> tuple:
        """What a torch.fx graph fixes about a call: the optional inputs traced as constants, with their
        values, and the submodules' modes and flags."""
        return "fx", fixed, self._module_state()

    def _module_state(self) -> tuple[tuple, tuple]:
        """(the submodules in eval mode, the submodules' flags): what a graph fixes about the modules it was
        captured from where the forward reads it. torch.export's batch norm and dropout ops take `training` as
        a constant, as does a custom forward's `self.training` under torch.fx, so a submodule put in eval mode
        while the model trains (a frozen batch norm) gets a capture of its own, which the statistic steps run.
        So does a forward that branches on a flag of its module, a bool, a name or a list of names
        (`module_flags`): peft's `with model.disable_adapter():` sets `_disable_adapters` on every LoRA layer,
        whose forward then skips the adapter, and `set_adapter` names the active ones; the graph of the call
        with the adapters on would compute the policy where DPO's reference forward asks for the base model.
        Only the flags the modules had when gnfx.compile built this are read: fully_shard(compiled) adds FSDP2's
        own to every module it wraps, and a capture of their own made the sharded steps differ from one
        process's."""
        modules = list(self.model.named_modules())
        return (tuple(name for name, m in modules if not m.training),
                tuple((name, *flag) for name, m in modules for flag in module_flags(m)
                      if flag[0] in self._flag_names.get(name, ())),
                tuple((name, *number) for name, m in modules if name not in self._read_at_call
                      for number in module_numbers(m) if number[0] in self._number_names.get(name, ())))

    # --- coverage --------------------------------------------------------------------------
    def _untraced(self, captured) -> list[str]:
        """What torch.fx kept opaque on its own: the submodules it could not trace, and the calls it
        keeps whole that take parameters (whose layers only torch.export sees)."""
        return sorted(set(captured.leaves) - set(self.leaf_modules)) + sorted(captured.opaque_calls)

    def _share(self, table, opened: bool = True) -> float:
        """The share of the trainable parameters' entries in curvature blocks (`opened`: with the
        blocks of layers opened inside opaque submodules)."""
        covered, total = table.coverage(dict(self.model.named_parameters()), opened)
        return covered / max(total, 1)

    def _warn_if_low_coverage(self) -> None:
        """Warn when under COVERAGE_WARNING of the trainable parameters' entries are in curvature blocks, saying
        which of the rest the captured forward does not use at all (no gradient, no step: smp's PSPNet builds
        a ResNet whose last two stages its forward never calls; or a branch the capture did not take) and which
        it uses but leaves to the diagonal preconditioner, with the largest of each."""
        params = dict(self.model.named_parameters())
        covered, total = self.table.coverage(params)
        # read only under the forward's torch.no_grad(): no gradient, nothing to precondition
        total -= sum(params[f.param].numel() for f in self.table.fallbacks if f.reason.startswith(NO_GRADIENT))
        if not total or covered >= COVERAGE_WARNING * total:
            return
        largest = lambda fallbacks: "; ".join(  # noqa: E731
            f"{f.param} ({params[f.param].numel():,} entries): {f.reason}"
            for f in sorted(fallbacks, key=lambda f: -params[f.param].numel())[:3])
        unused = [f for f in self.table.fallbacks if f.reason == UNUSED]
        used = total - sum(params[f.param].numel() for f in unused)
        said = []
        if unused:
            said.append(f"{total - used:,} of the {total:,} entries of the trainable parameters are {UNUSED} "
                        f"(graph captured with {self.form}, {self.table.capture}): they get no gradient from it "
                        f"(gnfx warns at the backward if they get one from elsewhere); largest: {largest(unused)}. If "
                        f"the model's own forward uses them, the graph took another branch than the model does: "
                        f"print(model) shows it; capture='export' captures the real call")
        if covered < COVERAGE_WARNING * used:
            said.append(self._low_coverage(covered, used, largest([f for f in self.table.fallbacks if f.reason != UNUSED
                                                                     and not f.reason.startswith(NO_GRADIENT)])))
        warnings.warn("gnfx: " + ". ".join(said), UserWarning, stacklevel=4)

    def _watch_unused(self) -> None:
        """Warn, once, when a parameter the captured forward does not use (UNUSED) gets a gradient: code
        outside the captured graph ran it, so it has no block and the diagonal preconditioner steps it. The
        usual cause: the forward returns an object that runs the layers later (zuko's flows return a
        distribution whose log_prob and rsample call their hyper-networks; a returned closure or bound method).
        A post-accumulate-grad hook on each such parameter, all removed at the first that fires."""
        params = dict(self.model.named_parameters())
        unused = [f.param for f in self.table.fallbacks if f.reason == UNUSED and params[f.param].requires_grad]
        handles = self._unused_hooks

        def reached(_, name: str) -> None:
            for handle in handles:
                handle.remove()
            handles.clear()
            warnings.warn(
                f"gnfx: the parameter {name!r} got a gradient though the forward gnfx captured from "
                f"{type(self.model).__name__} does not use it ({len(unused)} parameters are {UNUSED}): code outside "
                f"that graph ran it, so it is in no curvature block and the diagonal preconditioner steps it. Usually "
                f"the forward returns an object that runs the layers later, when the loss is computed (zuko's flows: "
                f"flow() returns a distribution whose log_prob calls the hyper-networks; a returned closure or bound "
                f"method), or the forward took a branch the captured graph did not. Fix: compile a module whose "
                f"forward computes the tensor the loss takes (class LogProb(nn.Module): forward(self, x): return "
                f"self.flow().log_prob(x)), or capture with capture='export' from the real call",
                RuntimeWarning, stacklevel=2)

        handles += [params[n].register_post_accumulate_grad_hook(lambda p, n=n: reached(p, n)) for n in unused]

    def _low_coverage(self, covered: int, used: int, listed: str) -> str:
        """The coverage warning's account of the parameters the forward uses outside curvature blocks."""
        requested = sorted(n for n, why in self.table.leaves.items() if why == REQUESTED)
        untraced = sorted(n or "(the model itself)" for n, why in self.table.leaves.items() if why != REQUESTED)
        if untraced:
            fix = (f"make the submodules {untraced} traceable by torch.fx or torch.export (the reasons above say "
                   f"where they fail), or capture with capture='export' from the model's real inputs")
        elif requested:
            fix = f"leave the submodules {requested} out of leaf_modules"
        else:
            fix = ("these parameters are used by operations gnfx has no curvature block for; print(model) lists "
                   "each one's reason. Where a layer is written with a custom op, write it with torch.nn.functional "
                   "(linear, conv, embedding) so that gnfx recognizes it, or register its layer kind with "
                   "gnfx.register_layer_kind (examples/custom_layer_kind.py)")
        return (f"only {100 * covered / used:.1f}% of the trainable parameters the captured forward uses ({covered:,} "
                f"of {used:,} entries) are in curvature blocks; the rest get the diagonal preconditioner. Graph "
                f"captured with {self.form} ({self.table.capture}). Largest uncovered: {listed}. Fix: {fix}")


def module_flags(module: nn.Module) -> list[tuple[str, object]]:
    """The (attribute, value) pairs of `module`'s own plain attributes that are flags or names (a bool, a
    string, a list or tuple of strings; `training` aside), as a hashable list: what a forward may branch on
    (Variants._module_state). Numbers are left out: a counter a forward increments would make every call a
    new capture."""
    flags = []
    for attr, value in vars(module).items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            flags.append((attr, tuple(value)))
        elif isinstance(value, (bool, str)) and attr != "training":
            flags.append((attr, value))
    return flags


def called_modules(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The paths of the modules a torch.fx graph calls (its leaves, but gnfx's taps; an opaque submodule whose
    children were opened by its path in the model), whose forwards read their numbers at each call."""
    called = (n.target for n in gm.graph.nodes if n.op == "call_module" and not n.target.startswith("gnfx_taps"))
    return tuple(sorted({module.path if isinstance(module := gm.get_submodule(target), OpenedLeaf) else target
                         for target in called}))


def _within(name: str, paths: tuple[str, ...]) -> bool:
    """Whether the module `name` is one of `paths` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def _sorted(kwargs) -> dict:
    """Keyword inputs in one order (an exported graph takes them in the order it was captured with)."""
    return {k: kwargs[k] for k in sorted(kwargs or {})}


def _hashable(x):
    try:
        hash(x)
    except TypeError:
        return type(x).__name__, id(x)
    return type(x).__name__, x
