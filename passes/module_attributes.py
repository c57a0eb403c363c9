"""module_attributes: the attributes a traced forward sets on the model's modules, taken back after tracing.

torch.fx and torch.export run the model's forward on stand-ins for its inputs (Proxies; FakeTensors
with symbolic sizes). A forward that builds something on its first call and keeps it on a module
(ultralytics' `BaseModel.loss`: `if self.criterion is None: self.criterion = self.init_criterion()`,
whose v8DetectionLoss holds `torch.arange(reg_max)`; a cache of a rotary table or a mask) keeps what it
built from those stand-ins: torch.export puts back the attributes a module had before (as its
`_detect_attribute_assignment` does) but leaves those it did not have, so the module would keep a
FakeTensor, and every later eager call (the model's own forward where capture failed, an opaque
submodule's code) computes with it: a gradient or statistic that is itself a FakeTensor, or a
data-dependent error at the step. `attributes_kept(model)` puts back, on exit, every module's own
attributes (its `__dict__` outside torch.nn.Module's registries: parameters, submodules and hooks are
its own concern), the entries of the dicts and lists among them, and its buffers as they were on entry: those the forward added are removed, those it
replaced restored, so the first eager call builds them again from real tensors (litgpt's LoRAQKVLinear
registers its `_lora_ind` buffer at the first read of a property, inside the forward). The hooks a forward
registers on the modules while captured are removed too, with the attribute that says they are there:
transformers 5 installs its output-capturing forward hooks at a model's first call and marks the model
`_output_capturing_hooks_installed`; with the mark taken back and the hooks kept, the first eager call installed
them a second time, every stage's output was recorded twice, and Segformer's decode head, which zips the
recorded hidden states with its projections, fed a stage-0 map to the stage-1 projection (a shape error). (In-place
changes inside an attribute's object or a buffer are not seen, nor undone: BatchNorm's running
statistics are the graph's to update.) A TorchScript module (`torch.jit.script(module)`: e3nn 0.4's generated
tensor products and linear maps, in MACE) is left as it is: its compiled forward sets no Python attribute,
and its `_buffers` is a read-through view of the C++ module's, without `clear` (gnfx.compile of any model
that held one raised an AttributeError here).

A forward that changes a number it holds (torchdiffeq's ODE functions count their evaluations,
`self.nfe += 1`; a step counter, a flag) has a side effect no graph repeats: torch.fx and torch.export
record the tensor operations only, so the count would stop on every statistic step (odenet_mnist's NFE log
read 0 there). So has a forward that stores a tensor on its module for the next call: a spiking neuron's
membrane potential, carried from one time step's call to the next until the user resets it (snntorch's
`init_hidden=True` neurons assign `self.mem`; spikingjelly's MemoryModule writes `self._memories["v"]`, an
entry of a dict it holds): a graph traced through it reads the state the trace saw on every call (the first
time step's, 0.0) and never writes it, so every later step computed without the potential carried over,
silently, and the dict kept the trace's Proxy or FakeTensor. `changed_value(module, before)` names such a
change, comparing the module's own values (`held_values`: its bool, int, float and tensor attributes, and the
entries of the dicts and lists it holds) with those it had before its forward ran (a tensor by identity), and
`appended(module, before)` a tensor appended to a list it held (`list_lengths` then: every call's output kept); the
fx tracer then keeps that module opaque (its forward runs as its Python code, its layers opened,
passes/opaque_children.py), and an export during which a module's forward changed one is no capture
(ForwardSideEffect; torch.export puts the attributes back itself, though not a dict's entries, so
`changes_recorded` watches each forward call with hooks and `attributes_kept` puts the entries back). An entry of a
list or dict that the traced forward writes before anything reads it (scratch space of the call, read back by the
model: MONAI DynUNet's `heads`) carries nothing to the next call: torch.fx writes it in the graph instead
(passes/list_writes.py). So does a tensor attribute that no forward reads before the call stores it (RecurrentGemma's
recurrent state, set to zeros by its model's forward first: passes/state_writes.py).

A buffer changed in place by Python code that reads no input (performer-pytorch's ProjectionUpdater counts its
calls, `self.calls_since_last_redraw += 1`, and branches on the count) is the same side effect under torch.fx,
which proxies parameters but not buffers: the count runs once, on the buffer itself, while tracing, and the
graph holds no operation that repeats it (an update computed from the input, an EMA codebook's
`self.embed_avg.lerp_(x.mean(0), 0.2)`, is recorded in the graph instead and leaves the buffer as it was).
`changed_buffers(module, before)` names the buffers of the module or its submodules whose values changed since
`buffer_values(module)` was `before`, and puts the values back, so that capturing advances no count; the fx
tracer then traces the module again with those buffers proxied (passes/buffer_updates.py), and keeps it opaque
as for a number where that fails. (torch.export records such a change as the graph's
buffer mutation, which the graph repeats.)
"""
from __future__ import annotations

import contextlib
import copy
import weakref

import torch
from torch import fx, nn
from torch.nn.parameter import UninitializedBuffer

REGISTRIES = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hook dicts, training, ...
HOOKS = tuple(sorted(name for name in REGISTRIES if "_hooks" in name))  # _forward_hooks, _forward_pre_hooks, ...


def saved_attributes(modules) -> list:
    """What `restore_attributes` puts back: each of the `modules`' own attributes, the entries of its dicts and
    lists, its buffers (the tensors themselves, not copies: a tensor changed in place is not put back) and the
    handles of its hooks (module doc)."""
    return [(m, {k: v for k, v in vars(m).items() if k not in REGISTRIES}, _entries(m), dict(m._buffers),
             set(m._non_persistent_buffers_set), {name: set(getattr(m, name)) for name in HOOKS})
            for m in modules if not isinstance(m, torch.jit.ScriptModule)]


def holding_state(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that can store a state for their next call: those holding a tensor (not a
    parameter), a dict or a list among their own attributes."""
    return [m for m in model.modules() if any(
        k not in REGISTRIES and (type(v) in (dict, list) or isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
        for k, v in vars(m).items())]


def restore_attributes(saved: list) -> None:
    """Each module's attributes, dict and list entries and buffers as `saved_attributes` saw them; the hooks
    registered since are removed."""
    for module, attributes, entries, buffers, non_persistent, hooks in saved:
        for name in [k for k in vars(module) if k not in REGISTRIES and k not in attributes]:
            del module.__dict__[name]
        module.__dict__.update(attributes)
        for name, held in entries.items():  # the same container object, its entries as they were
            attributes[name].clear()
            (attributes[name].update if isinstance(held, dict) else attributes[name].extend)(held)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(non_persistent)
        for name, handles in hooks.items():
            registered = getattr(module, name)
            for handle in [h for h in registered if h not in handles]:
                del registered[handle]


@contextlib.contextmanager
def attributes_kept(model: nn.Module):
    """While inside, the forward may set attributes and register buffers on `model`'s modules; on exit
    each module's own attributes and buffers are those it had on entry (module doc)."""
    saved = saved_attributes(model.modules())
    try:
        yield
    finally:
        restore_attributes(saved)


def _tensor_state(before: tuple, now: tuple) -> tuple[list, list]:
    """(attribute names, dict or list attribute names) of one module's `saved_attributes` entries `before` and
    `now` that hold a tensor in either: a state the forward computes with (a float 0.0 the first call turns into a
    tensor, spikingjelly's v after reset_net, included); numbers alone (a counter, a list of drawn numbers) not."""
    (_, attributes, entries, *_), (_, attributes_now, entries_now, *_) = before, now
    names = [k for k in attributes.keys() | attributes_now.keys() if k not in entries.keys() | entries_now.keys()
             and any(isinstance(a.get(k), torch.Tensor) for a in (attributes, attributes_now))]
    held = [k for k in entries.keys() & entries_now.keys() if any(
        isinstance(v, torch.Tensor) for e in (entries[k], entries_now[k]) for v in (e.values() if isinstance(e, dict) else e))]
    return names, held


def _set_tensor_state(saved: tuple, names: list, held: list) -> None:
    """The attributes `names` and the entries of the containers `held` of one module as `saved` holds them."""
    module, attributes, entries, *_ = saved
    for name in names:
        if name in attributes:
            module.__dict__[name] = attributes[name]
        else:
            module.__dict__.pop(name, None)
    for name in held:
        container = vars(module)[name]
        container.clear()
        (container.update if isinstance(container, dict) else container.extend)(entries[name])


@contextlib.contextmanager
def attributes_as(saved: list):
    """While inside, the modules of `saved` (saved_attributes, before a training forward) hold the tensor state
    it holds (`_tensor_state`): a replay of that forward starts from the state it started from (a neuron's
    membrane potential); on exit that state is as on entry, the one the training forward left."""
    now = saved_attributes(m for m, *_ in saved)
    which = [_tensor_state(before, after) for before, after in zip(saved, now)]
    for before, (names, held) in zip(saved, which):
        _set_tensor_state(before, names, held)
    try:
        yield
    finally:
        for after, (names, held) in zip(now, which):
            _set_tensor_state(after, names, held)


class ForwardSideEffect(RuntimeError):
    """Raised where a captured forward changed a number a module holds, or a buffer under torch.fx (module doc)."""


def _entries(module: nn.Module) -> dict[str, dict | list]:
    """A shallow copy of each dict and list among the module's own attributes, by attribute name."""
    return {k: copy.copy(v) for k, v in vars(module).items() if k not in REGISTRIES and type(v) in (dict, list)}


def _attributes(module: nn.Module) -> dict[str, object]:
    """The module's own attributes and the entries of the dicts and lists among them, by 'name' or 'name[key]'."""
    values = {k: v for k, v in vars(module).items() if k not in REGISTRIES}
    for name, held in _entries(module).items():
        values.update({f"{name}[{key!r}]": v for key, v in (held.items() if isinstance(held, dict) else enumerate(held))})
    return values


def held_values(module: nn.Module) -> dict[str, object]:
    """The module's own bool, int, float and tensor attributes (not its submodules'), and those entries of the
    dicts and lists it holds, by 'name' or 'name[key]'."""
    return {k: v for k, v in _attributes(module).items()
            if type(v) in (bool, int, float) or isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)}


def _same(before, now) -> bool:
    """A tensor is the same object; a number of the same type and value."""
    if isinstance(before, torch.Tensor):
        return now is before
    return type(now) is type(before) and now == before


def changed_value(module: nn.Module, before: dict[str, object]) -> str | None:
    """'attribute name (before -> now)' of the first of the module's own values that changed since `before`
    (`held_values(module)` then), or None. A number replaced by a value of another type changed too: one the
    traced forward computed from its input (speechbrain's InputNormalization counts the frames it has seen,
    `self.count += mask.sum().item()`, a Proxy under torch.fx, which a later trace would read); a tensor replaced
    by another is a state stored for the next call (module doc); a dict's or list's entry removed changed."""
    now = _attributes(module)
    return next((f"attribute {k} ({_shown(before[k])} -> {_shown(now.get(k))})" for k in _changed(before, now)), None)


def _changed(before: dict[str, object], now: dict[str, object]) -> list[str]:
    """The names of `before`'s values that `now` holds changed (`_same`), and of the dict and list entries removed."""
    return [k for k, v in before.items() if k in now and not _same(v, now[k]) or k not in now and "[" in k]


def list_lengths(module: nn.Module) -> dict[str, tuple[list, int]]:
    """(the list, its length) of each list among the module's own attributes, by name: what `appended` compares."""
    return {k: (v, len(v)) for k, v in vars(module).items() if k not in REGISTRIES and type(v) is list}


def appended(module: nn.Module, before: dict[str, tuple[list, int]]) -> str | None:
    """'attribute name (...)' of the first list the module held before its forward (`list_lengths(module)` then)
    that the forward appended a tensor to (`self.history.append(h)`, the list growing from call to call: a state
    kept for the next calls, which a graph would never append to), or None. (An entry the forward writes in place,
    read back in the same call, is passes/list_writes.py's.)"""
    for name, (held, length) in before.items():
        if vars(module).get(name) is held and any(isinstance(v, (torch.Tensor, fx.Proxy)) for v in held[length:]):
            return f"attribute {name} (a list appended to: {length} -> {len(held)} entries, kept for the next call)"
    return None


def stored_proxies(module: nn.Module, before: dict[str, object]) -> list[str]:
    """Under torch.fx: the names of the module's own attributes (not dict or list entries) that held a tensor in
    `before` (`held_values(module)` then) and now hold a traced value: the states its traced forward stored (module
    doc); none where another of its values changed (passes/state_writes.py writes only these)."""
    now = _attributes(module)
    changed = _changed(before, now)
    stored = [k for k in changed if "[" not in k and isinstance(before[k], torch.Tensor) and isinstance(now[k], fx.Proxy)]
    return stored if len(stored) == len(changed) else []



class AttributeWrite:
    """A graph node's call that writes `value` where a module's forward stores it: `module.name = value`, or with a
    `key` the entry `module.name[key] = value` of a list or dict it holds (passes/state_writes.py,
    passes/list_writes.py). Marked a side effect for torch.fx (`Node.is_impure`), so that no pass takes the node,
    which nothing reads, for dead code; torch.fx's set of side-effectful functions keeps every write it is told of,
    so each holds its module weakly: the set keeps no model, nor the tensors of its last call."""

    def __init__(self, module: nn.Module, name: str, *key):
        self.module, self.name, self.key = weakref.ref(module), name, key
        self.__name__ = f"write_{name}" + "".join(f"_{k}" for k in key)
        fx.node.has_side_effect(self)

    def __call__(self, value) -> None:
        if self.key:
            getattr(self.module(), self.name)[self.key[0]] = value
        else:
            setattr(self.module(), self.name, value)

def _shown(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def buffer_values(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the value of each buffer of the module and its submodules that holds one (neither on the meta
    device nor a lazy module's uninitialized buffer), by name."""
    return {name: b.detach().clone() for name, b in module.named_buffers()
            if not b.is_meta and not isinstance(b, UninitializedBuffer)}


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values, a NaN the same as a NaN (a buffer allocated without values,
    `torch.Tensor(n, m)` as bayesian-torch's layers allocate their ε, may hold NaNs, which no forward changed)."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def changed_buffers(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """The names of the buffers of `module` whose values differ from `before` (`buffer_values(module)` then);
    every changed buffer gets its value from `before` back."""
    changed = [name for name, b in module.named_buffers() if name in before and not _same_values(b, before[name])]
    for name in changed:  # (detached: a gradient-mode switch here would be recorded in a graph being traced)
        module.get_buffer(name).detach().copy_(before[name])
    return changed


def side_effect(module: nn.Module, path: str, change: str) -> ForwardSideEffect:
    """The error naming the value or buffer the forward of `module` (at `path`, "" for the model) changed."""
    where = f"{type(module).__name__} {path!r}" if path else type(module).__name__
    return ForwardSideEffect(f"the forward of {where} changes its {change}, a Python side effect that "
                             f"a captured graph would not repeat (an evaluation counter would stop on the statistic "
                             f"steps; a state stored for the next call, a neuron's membrane potential, would not be carried)")


@contextlib.contextmanager
def changes_recorded(model: nn.Module, ignored=lambda module: ()):
    """While inside, each forward call of `model`'s modules that changes one of the module's own values (but those
    named `ignored(module)`: passes/state_writes.py) appends (module, path, change) to the list yielded (hooks,
    removed on exit)."""
    changes, handles = [], []
    entered: dict[int, list] = {}  # a module's values at each call it is inside of (a recursive call nests)

    def before(m, _):
        skipped = ignored(m)
        entered.setdefault(id(m), []).append(({k: v for k, v in held_values(m).items() if k not in skipped},
                                              list_lengths(m)))

    def after(m, _, __, path):
        held, lengths = entered[id(m)].pop()
        change = changed_value(m, held) or appended(m, lengths)
        if change is not None:
            changes.append((m, path, change))
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(lambda m, a, o, path=path: after(m, a, o, path), always_call=True))
    try:
        yield changes
    finally:
        for handle in handles:
            handle.remove()


def module_numbers(module: nn.Module) -> list[tuple[str, object]]:
    """The (attribute, value) pairs of `module`'s own numbers (an int or a float, not a bool) and tuples or lists
    of them, as a hashable list: what a traced forward reads as constants (gnfx.variants.Variants._module_state,
    gnfx.opened_leaf.OpenedLeaf) where it does not call the module (torch.export's `dropout(x, 0.5, True)` and
    `batch_norm(..., 0.1, 1e-05)`; under torch.fx a custom forward's `self.drop_prob`, a slimmable layer's
    `W[:self.width]`), and a training recipe may change after gnfx.compile (the dropout and drop-path schedules
    of ConvNeXt's early dropout, `module.p = rate` at every step; an annealed Gumbel-softmax temperature; the
    active width of a slimmable network or a supernet set between steps). A counter a forward increments
    (`self.nfe += 1`) is the module's own: torch.fx keeps such a module opaque and its numbers are read at each
    call; one a loop keeps on the model (an epoch count) makes a capture per value."""
    numbers = []
    for attr, value in vars(module).items():
        if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            numbers.append((attr, tuple(value)))
        elif _is_number(value):
            numbers.append((attr, value))
    return numbers


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def subtree_numbers(module: nn.Module) -> tuple:
    """`module_numbers` of `module` and of each of its submodules, by path, as one hashable tuple: a submodule held
    under two paths (SchNet's `mlp`, also its CFConv's `nn`) under both, as in gnfx.opened_leaf's watched copy of
    an opened child, which holds a copy of its own at each path."""
    return tuple((name, *number) for name, m in module.named_modules(remove_duplicate=False)
                 for number in module_numbers(m))
