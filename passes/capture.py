"""capture: nn.Module -> torch.fx.GraphModule.

Symbolic tracing (`torch.fx`) comes first: it gives a readable, module-level graph and needs no
example inputs. It traces into torch.nn's own containers (nn.TransformerEncoder and its layers)
and keeps as leaves only torch.nn modules without submodules (Linear, LayerNorm, ...) and the
nn.MultiheadAttention that gnfx lowers itself. A submodule whose forward cannot be traced becomes a
leaf (an opaque call in the graph, its parameters left to the fallback preconditioner but for the
layers passes/opaque_children.py opens inside it) and is reported. torch.export (`strict=False`,
with automatic dynamic shapes) is the other form: it captures one call from its inputs and yields an
aten-level graph whose nodes keep their module path in `nn_module_stack`. Both graphs run on the very Parameter objects of the model; which form a model
gets is decided by gnfx.variants.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import sysconfig
import traceback
import types

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import transformer as transformer_module
from torch.nn.utils import rnn as rnn_utils
from torch.utils import _pytree

from gnfx.composite_forms import inlined_checkpoints
from gnfx.errors import CaptureError
from gnfx.passes.ctc_loss_shape import ctc_loss_traceable
from gnfx.passes.leaf_outputs import erase_unread, torch_nn_structure, unpacked
from gnfx.passes.mapping_output import MappingOutputTracer, keep_output_type
from gnfx.passes.default_generator import default_generator_left_out
from gnfx.passes.custom_functions import OPAQUE_FUNCTION, applied_functions, check_backwards, opaque_in_fx
from gnfx.passes.grad_modes import grad_modes_recorded
from gnfx.passes.mha import lowered_for_export
from gnfx.passes.module_attributes import (appended, attributes_kept, buffer_values, changed_buffers, changed_value,
                                          changes_recorded, held_values, list_lengths, side_effect, stored_proxies)
from gnfx.passes.buffer_updates import BufferChanged, BufferProxies
from gnfx.passes.list_writes import ListWrites
from gnfx.passes.state_writes import StoredStates, StoreRefused
from gnfx.passes.python_random import PythonRandomDraw, draws_decide, kept_state, raising_draws
from gnfx.passes.tensor_hooks import dropped_hook, tensor_hooks_registered
from gnfx.passes.buffer_draws import draws_into_buffers_traced
from gnfx.passes.numpy_scalars import python_number
from gnfx.passes.torch_draws import TorchRandomDraw, moved, raising_torch_draws
from gnfx.random_state import RandomState
from gnfx.passes.validation_checks import (example_values, flipping_branch, name_assertions, refused_branch,
                                           specialized_to)

CAPTURE_MODES = ("auto", "fx", "export")


@dataclasses.dataclass
class Captured:
    """A captured graph and how it was obtained.

    `leaves` maps the dotted path of each submodule kept opaque to the reason. `draws`: whether the
    forward drew Python-level random numbers while captured (passes/python_random.py), which a replay
    of it would draw again (gnfx.random_state). `checks`: the data-dependent validation checks the
    graph asserts, specialized to the example call (passes/validation_checks.py); `branches`: the input
    branches it asserts likewise, each a test 'file:line: code' whose side the example took. `opaque_calls`: the
    calls a torch.fx graph keeps whole that take trainable parameters (`opaque_calls_taking_parameters`:
    torchvision's Swin attention, registered with `torch.fx.wrap`; a custom autograd.Function), each
    described with those parameters' names: the layers inside such a call are no blocks of the fx graph.
    `functions`: the names of the custom autograd.Functions the forward applied while torch.export captured it,
    which the graph holds as their forwards' operations, without their own backwards.
    """

    graph_module: fx.GraphModule
    form: str  # "fx" (torch-level graph) or "export" (aten-level graph)
    leaves: dict[str, str]
    draws: bool = False
    checks: tuple[str, ...] = ()
    opaque_calls: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()  # the custom autograd.Functions a torch.export graph holds as their operations


class _DenseProxy(fx.Proxy):
    """A traced value that is not a nested tensor: `x.is_nested` is False, as it is for every
    input gnfx trains on, so torch.nn's containers take their dense path while tracing; numpy's operators
    defer to it (passes/numpy_scalars.py)."""

    is_nested = False
    __array_ufunc__ = None


class _LeafFindingTracer(MappingOutputTracer):
    """An fx tracer that treats the given module paths (and torch.nn's modules without
    submodules, and nn.MultiheadAttention) as leaves and remembers the innermost submodule whose
    forward raised during tracing; a returned dict subclass is rebuilt (passes/mapping_output.py). A leaf
    of the given paths whose output has a structure in `structures` (passes/leaf_outputs.py), and a torch.nn leaf
    that returns a container (`torch_nn_structure`), returns its value in that structure, the indexing nodes made
    for it listed in `unpacked`. The buffers named in `proxied` are read as Proxies (passes/buffer_updates.py); the
    list and dict entries a forward writes and reads back are written in the graph by `list_writes`
    (passes/list_writes.py); the tensors a forward stores on its modules by `states` (passes/state_writes.py)."""

    def __init__(self, leaves: set[str], structures: dict[str, tuple] | None = None,
                 proxied: BufferProxies | None = None, list_writes: ListWrites | None = None,
                 states: StoredStates | None = None):
        super().__init__(autowrap_functions=tuple(PACKING.values()))
        self.leaves = leaves
        self.structures = structures or {}
        self.proxied = proxied
        self.list_writes = ListWrites() if list_writes is None else list_writes
        self.states = states
        self.buffer_changes: dict[str, BufferChanged] = {}  # by module path: the buffers to proxy in the next trace
        self.unpacked: list[fx.Node] = []
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or isinstance(m, torch.jit.ScriptModule):  # (TorchScript: compiled, not traceable)
            return True
        if not m.__module__.startswith(("torch.nn", "torch.ao.nn")):
            return False
        return isinstance(m, nn.MultiheadAttention) or next(m.children(), None) is None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _DenseProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        proxy = None if self.proxied is None else self.proxied.get(self, attr_val, parameter_proxy_cache)
        return super().getattr(attr, attr_val, parameter_proxy_cache) if proxy is None else proxy

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        self.list_writes.install(self)  # the entries to write in the graph hold their stand-ins
        return out

    def create_arg(self, a):
        return super().create_arg(python_number(a))  # a numpy scalar as its number (passes/numpy_scalars.py)

    def _note_changes(self, m: nn.Module, path: str, before: tuple[dict, dict, dict]) -> None:
        """Raise the side effect of the traced forward of `m` (at `path`, "" for the model) on a value it holds that
        changed since `before` (`held_values`, `buffer_values`, `list_lengths` then), on a list it appended to, or on
        a state it carries from a None it read first (passes/carried_states.py); note the buffers it changed in place
        (their values put back) for the next trace to proxy, all of one trace at once, or raise if they were proxied;
        the list and dict entries it wrote with traced values are `list_writes`' (passes/list_writes.py)."""
        held, change = self.list_writes.take(self, m, before[0])
        if self.states is not None:  # the tensors it stores, tried in the graph (passes/state_writes.py)
            held = {k: v for k, v in held.items() if k not in self.states.names(m)}
        if change is None and (change := changed_value(m, held)) is not None and self.states is not None:
            change = None if self.states.may_store(m, stored_proxies(m, held)) else change
        if change is None and self.states is not None:  # a state started as None, read first (passes/carried_states.py)
            change = self.states.carried_change(m, self)
        change = change or appended(m, before[2])
        if change is not None:
            raise side_effect(m, path, change)
        if changed := changed_buffers(m, before[1]):
            change = BufferChanged(str(side_effect(m, path, f"buffer {changed[0]} (changed in place)")),
                                   frozenset(f"{path}.{name}" if path else name for name in changed))
            if self.proxied is not None and change.buffers <= self.proxied.buffers.keys():
                raise change
            self.buffer_changes[path] = change

    def call_module(self, m, forward, args, kwargs):
        # a module traced through whose forward changes a value it holds (a number, a tensor stored for its next call)
        # is kept opaque (passes/module_attributes.py); one that changes a buffer in place is traced again with that
        # buffer proxied (passes/buffer_updates.py)
        path = self.path_of_module(m)
        before = None if self.is_leaf_module(m, path) else (held_values(m), buffer_values(m), list_lengths(m))
        try:
            out = super().call_module(m, forward, args, kwargs)
            if before is not None:
                self._note_changes(m, path, before)
            structure = (self.structures.get(path) if path in self.leaves
                         else torch_nn_structure(m, args, kwargs) if self.is_leaf_module(m, path) else None)
            return unpacked(out, structure, self.unpacked) if structure and isinstance(out, fx.Proxy) else out
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


_SEQ_LEN = transformer_module._get_seq_len
_DETECT_CAUSAL = transformer_module._detect_is_causal_mask
_TRANSFORMER_FORWARD = transformer_module.Transformer.forward

# torch.nn.utils.rnn's packing: its lengths go through Python (`torch.as_tensor(lengths, device="cpu")`,
# sorting), which symbolic tracing cannot follow, so each is one call in the graph
PACKING = {name: getattr(rnn_utils, name) for name in ("pack_padded_sequence", "pad_packed_sequence", "pack_sequence")}


def _called_in_graph(function):
    """`function` as one call_function node of the graph when any argument is traced; else itself."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        flat = []
        fx.node.map_aggregate((args, kwargs), lambda a: flat.append(a) if isinstance(a, fx.Proxy) else None)
        if flat:
            return flat[0].tracer.create_proxy("call_function", function, args, kwargs)
        return function(*args, **kwargs)
    return call


def _seq_len_in_graph(src, batch_first):
    """torch.nn.modules.transformer's `_get_seq_len` as a call in the graph when `src` is traced
    (it branches on the input's rank, which symbolic tracing does not know)."""
    if isinstance(src, fx.Proxy):
        return src.tracer.create_proxy("call_function", _SEQ_LEN, (src, batch_first), {})
    return _SEQ_LEN(src, batch_first)


def _transformer_forward_traced(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                                src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                                src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    """nn.Transformer's forward (its signature and its two calls) without the checks of the inputs'
    batch and feature sizes, which branch on traced sizes: inputs that do not match fail in the
    graph's own ops (the cross-attention, the projections) instead."""
    memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _causal_hint_as_given(mask, is_causal=None, size=None):
    """torch.nn.modules.transformer's `_detect_is_causal_mask` without comparing the mask with the
    causal one (a branch on the mask's values, which neither symbolic tracing nor torch.export can
    take): the hint as the call gives it, a traced one included, None read as False. The attention
    computes the same: where torch would find the causal mask and pass the hint, the hint masks
    the future in place of that mask, or the mask is used (passes/mha.py `mask_scores`)."""
    return False if is_causal is None else is_causal


@contextlib.contextmanager
def causal_hints_as_given():
    """While capturing: torch.nn's transformer containers take their causal hints as given
    (`_causal_hint_as_given`)."""
    transformer_module._detect_is_causal_mask = _causal_hint_as_given
    try:
        yield
    finally:
        transformer_module._detect_is_causal_mask = _DETECT_CAUSAL


@contextlib.contextmanager
def _torch_nn_traceable():
    """While tracing: torch.nn's transformer containers without their inference fast path (which
    training never takes, and whose checks branch on the traced input) and with their sequence
    length read by a graph call, and torch.nn.utils.rnn's packing functions as graph calls (`PACKING`;
    the names a model imported from that module are wrapped by the tracer's autowrap_functions); all
    restored afterwards. Their causal hints are taken as given (`causal_hints_as_given`), so that a
    hint given to the call (`tgt_is_causal=True`) reaches the attention at run time; nn.Transformer
    traces without its size checks (`_transformer_forward_traced`)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    transformer_module._get_seq_len = _seq_len_in_graph
    transformer_module.Transformer.forward = _transformer_forward_traced
    for name, function in PACKING.items():
        setattr(rnn_utils, name, _called_in_graph(function))
    try:
        with causal_hints_as_given():
            yield
    finally:
        for name, function in PACKING.items():
            setattr(rnn_utils, name, function)
        transformer_module._get_seq_len = _SEQ_LEN
        transformer_module.Transformer.forward = _TRANSFORMER_FORWARD
        torch.backends.mha.set_fastpath_enabled(enabled)


_IS_TENSOR, _JIT_ISINSTANCE = torch.is_tensor, torch.jit.isinstance


def _is_tensor_refusing_traced(obj) -> bool:
    """torch.is_tensor, which refuses a traced value: symbolic tracing does not know what an input will be
    (a diffusers UNet's `timestep`, a tensor or a Python int), nor what an operation returned, and the
    plain check would call every traced value no tensor, so the graph would hold the branch for a Python
    number (`torch.tensor([timestep])`), which fails or computes something else on the tensor the call
    passes. So the forward (or the submodule) that asks cannot be traced, and torch.export, which
    captures the call with its real inputs, takes it."""
    if isinstance(obj, fx.Proxy):
        raise fx.proxy.TraceError(f"torch.is_tensor({obj}) of a traced value decides a branch: torch.fx cannot "
                                  f"tell a tensor input from a Python number")
    return _IS_TENSOR(obj)


def _jit_isinstance_refusing_traced(obj, target_type) -> bool:
    """torch.jit.isinstance, which refuses a traced value (or a container holding one) for the reason
    `_is_tensor_refusing_traced` gives: the plain check calls a traced value no tensor, so MONAI's
    BasicUNet, whose decoder blocks concatenate the skip connection under
    `torch.jit.isinstance(x_e, torch.Tensor)`, traced the branch without it: a graph that fails (or,
    channels permitting, computes another model) at its first call."""
    if any(isinstance(leaf, fx.Proxy) for leaf in _pytree.tree_leaves(obj)):
        raise fx.proxy.TraceError(f"torch.jit.isinstance({obj}, {target_type}) of a traced value decides a "
                                  f"branch: torch.fx cannot tell what type a traced value has")
    return _JIT_ISINSTANCE(obj, target_type)


@contextlib.contextmanager
def _type_checks_refused():
    """While tracing: torch.is_tensor and torch.jit.isinstance refuse traced values
    (`_is_tensor_refusing_traced`, `_jit_isinstance_refusing_traced`)."""
    torch.is_tensor, torch.jit.isinstance = _is_tensor_refusing_traced, _jit_isinstance_refusing_traced
    try:
        yield
    finally:
        torch.is_tensor, torch.jit.isinstance = _IS_TENSOR, _JIT_ISINSTANCE


def describe_exception(exc: BaseException) -> str:
    """`Type: first line of the message`, for a one-line reason."""
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


REQUESTED = "requested with leaf_modules"
UNUSED = "not used by the captured forward"  # a fallback's reason (passes/analyze.py): no node reads the parameter


def check_leaf_modules(model: nn.Module, leaf_modules) -> None:
    """Raise a CaptureError for a name in `leaf_modules` that is not a submodule of `model`."""
    known = dict(model.named_modules())
    for name in leaf_modules:
        if name not in known or name == "":
            raise CaptureError(
                f"leaf_modules names {name!r}, which is not a submodule of the model; "
                f"valid names are the dotted paths of model.named_modules()")


def generators_kept(model: nn.Module):
    """While inside, a forward being traced may draw from torch's generators (torch.fx runs `torch.rand([])` with
    no traced argument, as a LayerDrop does: then its submodule is traced again as a leaf, passes/torch_draws.py);
    on exit the CPU generator and those of the model's accelerators are as they were, so that capturing takes
    nothing from the user's random stream (as Python's generators, passes/python_random.py): the first training
    call draws what the module would."""
    return RandomState({p.device for p in model.parameters()}, python=False).replayed()


def trace_fx(model: nn.Module, leaf_modules=(), concrete_args=None, structures=None) -> Captured:
    """Symbolically trace `model`, turning untraceable submodules into leaves; `concrete_args`
    fixes arguments to values (e.g. an optional input left out: None); `structures`: the tuples and lists
    the submodules return on an example call (passes/leaf_outputs.py), in which the leaves' values are traced.

    Raises CaptureError when the top-level forward itself cannot be traced.
    """
    check_leaf_modules(model, leaf_modules)
    leaves: dict[str, str] = {name: REQUESTED for name in leaf_modules}
    devices = {p.device for p in model.parameters()}

    def traced(tracer):
        # a custom autograd.Function keeps its backward; a reentrant checkpoint is its function, as for export
        with (_torch_nn_traceable(), _type_checks_refused(), opaque_in_fx(), inlined_checkpoints(),
              generators_kept(model), draws_into_buffers_traced(tracer), grad_modes_recorded(tracer)):
            before = RandomState(devices, python=False).states
            graph = tracer.trace(model, concrete_args=concrete_args)
            tracer.drew_torch = moved(before, RandomState(devices, python=False).states)  # passes/torch_draws.py
            return graph

    draws = False
    proxied: set[str] = set()  # the buffers a forward changes in place (passes/buffer_updates.py)
    first_changes: dict[str, BufferChanged] = {}  # by the path of the module whose forward changed them
    writes = ListWrites()  # the list and dict entries a forward writes and reads back (passes/list_writes.py)
    new_tracer = lambda: _LeafFindingTracer(set(leaves), structures, proxies, writes, states)  # noqa: E731
    # the graph module is built inside: it copies the tensor constants fx set on the traced module
    with attributes_kept(model):
        states = StoredStates(model)  # the tensors a forward stores on its modules (passes/state_writes.py)
        while True:
            proxies = BufferProxies(model, proxied)
            tracer = new_tracer()
            before = held_values(model), buffer_values(model), list_lengths(model)
            try:
                with kept_state() as drew, states.absent(tracer):  # Python-level draws (passes/python_random.py)
                    graph = traced(tracer)
                    tracer._note_changes(model, "", before)
                    if states.watch(states.stores(model, tracer)):  # traced again, those written by nodes
                        continue
                    if tracer.buffer_changes:  # traced again, every buffer changed in place proxied
                        for path, change in tracer.buffer_changes.items():
                            proxied.update(change.buffers)
                            first_changes.setdefault(path, change)
                        continue
                    if writes.settle(graph):  # traced again, the entries found written in the graph
                        continue
                    draws = draws or drew()
                    if tracer.drew_torch:  # a torch draw outside the graph (passes/torch_draws.py): its submodule a leaf
                        tracer = new_tracer()
                        with raising_torch_draws():
                            traced(tracer)
                        raise TorchRandomDraw("the forward draws torch random numbers outside the traced graph "
                                              "(torch.rand([]) < p, a LayerDrop), whose one value the graph would keep")
                    if drew() and draws_decide(lambda: traced(new_tracer()).python_code("self").src):
                        tracer = new_tracer()
                        with raising_draws():  # the drawing submodule raises: a leaf, as an untraceable one
                            traced(tracer)
                        raise PythonRandomDraw("the forward draws Python random numbers (by a function other than "
                                               "random.random, random.uniform or numpy.random's random, rand, "
                                               "random_sample, uniform) that decide the traced graph")
            except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
                if (read := _raised_from(exc, StoreRefused)) is not None:  # passes/state_writes.py: traced
                    states.refuse(read)  # again with the state present, its store a side effect where it was one
                    continue
                failed = tracer.failed_module
                exc = first_changes.get(failed or "", exc)  # a module that fails with its buffers proxied: opaque
                if failed and failed not in leaves:
                    leaves[failed] = f"could not be traced ({describe_exception(exc)})"
                    continue
                raise CaptureError(
                    f"torch.fx could not trace the forward of {type(model).__name__}: {describe_exception(exc)}\n"
                    f"  at {_user_frame(exc, model)}\n"
                    f"Fix: this code runs in the forward of {type(model).__name__} itself (an untraceable submodule "
                    f"would have been kept opaque), which leaf_modules cannot keep opaque: move it into a submodule "
                    f"and keep that one opaque with gnfx.compile(..., leaf_modules=['path.to.module']), rewrite "
                    f"data-dependent branches with torch.cond, or use capture='export' with example_inputs=..."
                ) from exc
            finally:
                proxies.restore()
                writes.restore()
            for node in graph.nodes:  # the tracer marks its autowrapped calls, and fx's code for a marked call
                if node.target in PACKING.values():  # re-registers its qualified name as a global to wrap,
                    node.meta.pop("is_wrapped", None)  # which breaks every later trace
            erase_unread(graph, tracer.unpacked)
            _keep_input_names(graph, concrete_args or {})
            keep_output_type(graph, tracer.output_type)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            return Captured(gm, "fx", leaves, draws, opaque_calls=opaque_calls_taking_parameters(gm))


def _keep_input_names(graph: fx.Graph, fixed: dict) -> None:
    """torch.fx names the input of an argument traced as a constant `scale_1` (its graph checks that a
    call passes that value): give it back its name, so that the graph takes the call as the model's
    forward does, by position or by keyword."""
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    for name in fixed:
        if f"{name}_1" in placeholders and name not in placeholders:
            placeholders[f"{name}_1"].target = name


def opaque_calls_taking_parameters(gm: fx.GraphModule) -> tuple[str, ...]:
    """The calls torch.fx keeps opaque in `gm` that take a trainable parameter as an argument: of a
    function registered with `torch.fx.wrap` (torch.fx marks its nodes `is_wrapped`), of a custom
    autograd.Function (passes/custom_functions.py), or of F.multi_head_attention_forward, which torch.fx
    records as one call (its `__torch_function__` dispatch) where torch.export writes out its projections
    (open_clip's and OpenAI CLIP's ModifiedResNet pool with it, over q/k/v/c_proj weights: the half of the
    model's parameters fell back under torch.fx), each described with the parameters it takes."""
    params = {name for name, p in gm.named_parameters() if p.requires_grad}
    calls: dict[tuple[str, str], list[str]] = {}  # (name, kind) -> parameters
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if OPAQUE_FUNCTION in node.meta:
            call = node.meta[OPAQUE_FUNCTION], "a torch.autograd.Function"
        elif node.meta.get("is_wrapped", False):
            call = f"{getattr(node.target, '__module__', '?')}.{node.target.__qualname__}", "a torch.fx.wrap'ed function"
        elif node.target is F.multi_head_attention_forward:
            call = "torch.nn.functional.multi_head_attention_forward", "a function torch.fx records whole"
        else:
            continue
        taken = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in params]
        if taken:
            calls.setdefault(call, []).extend(taken)
    return tuple(f"{name} ({kind} taking {_listed(list(dict.fromkeys(taken)))})" for (name, kind), taken in calls.items())


def _listed(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, and how many in all if there are more."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} parameters in all)" if len(names) > shown else "")


_EXPORTABLE = (torch.Tensor, int, float, bool, str, type(None))


def _tensors_in(obj, found: dict, seen: set) -> dict:
    """The tensors inside `obj` by id, in order: through containers and objects' attributes."""
    if isinstance(obj, torch.Tensor):
        found.setdefault(id(obj), obj)
    elif not isinstance(obj, (str, bytes, type, nn.Module)) and id(obj) not in seen:
        seen.add(id(obj))
        items = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set, frozenset))
                 else vars(obj).values() if hasattr(obj, "__dict__") else ())
        for x in items:
            _tensors_in(x, found, seen)
    return found


class _ExportView(nn.Module):
    """What torch.export traces: the model's forward, sharing its registries (so the captured
    graph has the model's parameter names and objects). An output that holds objects torch.export
    cannot return (a transformers DynamicCache) is exported as the tuple of its tensors, and the
    structure around them, recorded while tracing, is rebuilt around the computed tensors by a
    forward hook of the captured graph: the caller gets the output the model returns. The tensors the forward
    stored on the modules, held by `states`, are exported with the output, and written by nodes of the graph
    (passes/state_writes.py)."""

    def __init__(self, model: nn.Module, keywords, states: StoredStates):
        super().__init__()
        self._parameters, self._buffers, self._modules = model._parameters, model._buffers, model._modules
        self.training = model.training
        self.__dict__["_gnfx_model"] = model  # not a submodule: its registries are this view's
        # .value: (output while tracing, ids of its tensors in export order); set on a namespace, as
        # torch.export restores the module attributes (and containers in them) a traced forward changes
        self.__dict__["_gnfx_template"] = types.SimpleNamespace(value=None)
        self.__dict__["_gnfx_states"] = states
        # the model's signature, which torch.export binds the call's inputs (and their dynamic
        # shapes) to, as it does for the model itself; the call's `keywords` that the model takes
        # through **kwargs become keyword parameters of their own (torch.export's binding of
        # **kwargs does not match the dynamic shapes it is given)
        signature = inspect.signature(model.forward)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        named = {p.name for p in params}
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in keywords if k not in named]
        forward = functools.partial(self._gnfx_forward)
        forward.__signature__ = signature.replace(parameters=params)
        self.__dict__["forward"] = forward

    def _gnfx_forward(self, *args, **kwargs):
        out = self._gnfx_model(*args, **kwargs)
        if not all(isinstance(x, _EXPORTABLE) for x in torch.utils._pytree.tree_leaves(out)):
            tensors = _tensors_in(out, {}, set())
            self._gnfx_template.value = (out, list(tensors))
            out = tuple(tensors.values())
        return self._gnfx_states.exported(self._gnfx_model, out, (args, kwargs))

    def _gnfx_rebuild(self, _module, _inputs, flat):
        """The model's output with the exported tensors `flat` in place of the traced ones."""
        out, ids = self._gnfx_template.value
        return copy.deepcopy(out, memo=dict(zip(ids, flat)))


def _raised_from(exc: BaseException | None, kind: type) -> BaseException | None:
    """`exc`, or the exception it was raised from, that is a `kind`, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def shapes_of(args: tuple, kwargs: dict) -> tuple:
    """The shape of each input tensor of a call (None for other inputs), in pytree order."""
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None
                 for x in torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs))))


def export(model: nn.Module, args: tuple, kwargs: dict | None = None, seen=()) -> Captured:
    """Capture the call `model(*args, **kwargs)` with torch.export (non-strict). As torch.compile's
    automatic dynamic shapes: the first dimension of every input tensor is dynamic (a shorter last
    batch), and so is every dimension whose size differs from that of the same input in the calls
    of the same form captured before, whose shapes (`shapes_of`) are `seen` (a new sequence length).
    The captured graph takes calls of this form within its guards (see `accepts`)."""
    args, kwargs = tuple(args), dict(kwargs or {})
    states = StoredStates(model)  # the tensors a forward stores on its modules (passes/state_writes.py)
    view = _ExportView(model, kwargs, states)
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    dims = {}
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor) and x.dim():
            changed = {d for shapes in seen for d in range(x.dim()) if shapes[i][d] != x.shape[d]}
            dims.setdefault(id(x), {d: torch.export.Dim.AUTO for d in sorted({0} | changed)})
    # passes/validation_checks.py: the example's values, the lines of the input branches' symbols, what
    # created each unbacked symbol, the specialized checks, and the input branch each line's symbols decide
    values, lines, created, checks, branches, refused, ran = {}, set(), {}, [], {}, "", False
    try:
        inputs = inspect.signature(view.forward).bind(*args, **kwargs).arguments
        dynamic = {name: torch.utils._pytree.tree_map(lambda x: dims.get(id(x)), value)
                   for name, value in inputs.items()}

        def exported():
            checks.clear()
            with specialized_to(values, lines, created, checks):
                return torch.export.export(view, args, kwargs=kwargs, strict=False, dynamic_shapes=dynamic)

        with (lowered_for_export(), causal_hints_as_given(), inlined_checkpoints(), ctc_loss_traceable(),
              default_generator_left_out(), kept_state() as drew, applied_functions() as functions,
              attributes_kept(model), generators_kept(model), changes_recorded(model, states.names) as changes,
              tensor_hooks_registered() as hooks, states.absent()):
            ep = first = failure = None
            while ep is None:  # a branch on data that validates the inputs, or branches on them, is retried
                try:
                    ep = exported()
                except Exception as exc:  # noqa: BLE001 - the first failure is the one to report
                    if (read := _raised_from(exc, StoreRefused)) is not None:  # passes/state_writes.py: exported
                        states.refuse(read)  # again with the state present, its store a side effect where it was one
                        changes.clear()
                        continue
                    refusal = refused_branch(exc)
                    wanted = {created[s] for s in refusal[2] if s in created} if refusal else set()
                    if refusal is None or ran and wanted <= lines:  # no branch to specialize, or no new one
                        failure = exc
                        break
                    if not refusal[1]:
                        for line in wanted:
                            branches.setdefault("{}:{}: {}".format(*line), "{}:{}: {}".format(*refusal[0]))
                    first = first or exc
                    if not ran:
                        values.update(example_values(model, args, kwargs))
                        ran = True
                    lines |= wanted
                if ep is not None and states.watch(states.found):  # exported again, the stores written by nodes
                    ep = None
                    changes.clear()
            if failure is not None and first is None:
                raise failure
            if failure is not None:
                refused = (f"\n  retried with its data-dependent branches specialized to the example: "
                           f"{describe_exception(failure)}")
                raise first
            if changes:  # passes/module_attributes.py
                raise side_effect(*changes[0])
            if hooks:  # passes/tensor_hooks.py
                raise dropped_hook(hooks)
            draws = drew()
            if draws and draws_decide(lambda: exported().graph_module.code):  # passes/python_random.py
                with raising_draws():  # raises at the user's line
                    exported()
                raise PythonRandomDraw("the forward draws Python random numbers that decide the exported graph")
    except Exception as exc:  # noqa: BLE001
        fix = ("draw with torch in the graph (torch.rand, used as a tensor: a mask or torch.where) or turn the "
               "draw's effect off (a LayerDrop's probability 0), or keep the drawing submodule opaque with "
               "leaf_modules=[...] and capture='fx'" if isinstance(exc, PythonRandomDraw) else
               "rewrite data-dependent branches with torch.cond, or mark the offending submodule with "
               "leaf_modules=[...] and capture='fx'")
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {describe_exception(exc)}\n"
            f"  at {_user_frame(exc, model)}{refused}\n"
            f"Fix: {fix}") from exc
    if functions:  # their operations are in the graph, their backwards not (passes/custom_functions.py)
        check_backwards(model, args, kwargs, functions)
    gm = ep.module()
    states.write_exported(gm)
    if (flipping := flipping_branch(gm, branches)) is not None:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: the data-dependent branch at {flipping} "
            f"depends on floating-point data, whose side changes from batch to batch or as the model trains, or on "
            f"data it cannot assert: gnfx specializes only branches on the call's integer and boolean inputs "
            f"(labels, masks, token ids), asserted in the graph\n"
            f"Fix: rewrite the branch with torch.cond, or mark the submodule that holds it with leaf_modules=[...] "
            f"and capture='fx'") from first
    name_assertions(gm, {where for where, _ in checks}, branches)
    if view._gnfx_template.value is not None:
        gm.register_forward_hook(view._gnfx_rebuild)
    described = dict.fromkeys(f"{where} (read {value!r} in the example)" for where, value in checks)
    return Captured(gm, "export", {}, draws, tuple(described), branches=tuple(dict.fromkeys(branches.values())),
                    functions=tuple(cls.__qualname__ for cls in functions))


def accepts(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether the exported graph `gm` takes the call (args, kwargs): inputs of the structure it
    was captured with, and shapes its guards allow. (An fx graph takes any call of its forward's
    signature.)"""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return True
    flat, call_spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
    if call_spec != spec:
        return False
    guards = getattr(gm, "_guards_fn", None)
    try:
        guards is None or guards(*flat)
    except AssertionError:  # "Guard failed: x.size()[0] >= 5"
        return False
    return True


CONSTANTS = (bool, int, float, str, type(None))  # the values a torch.fx graph is traced with fixed


def optional_inputs(model: nn.Module) -> tuple[str, ...]:
    """The forward's parameters that default to None or to another Python constant (a flag such as
    timm's `is_causal=False`): symbolic tracing treats them as tensors, so a call that leaves one out,
    or passes a constant, needs a graph traced with it fixed to that value (a branch `if is_causal:`
    on a traced flag is a TraceError)."""
    params = inspect.signature(model.forward).parameters.values()
    return tuple(p.name for p in params if p.default is not p.empty and isinstance(p.default, CONSTANTS))
