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
its own concern) and its buffers as they were on entry: those the forward added are removed, those it
replaced restored, so the first eager call builds them again from real tensors (litgpt's LoRAQKVLinear
registers its `_lora_ind` buffer at the first read of a property, inside the forward). (In-place
changes inside an attribute's object or a buffer are not seen, nor undone: BatchNorm's running
statistics are the graph's to update.)

A forward that changes a number it holds (torchdiffeq's ODE functions count their evaluations,
`self.nfe += 1`; a step counter, a flag) has a side effect no graph repeats: torch.fx and torch.export
record the tensor operations only, so the count would stop on every statistic step (odenet_mnist's NFE log
read 0 there). `changed_number(module, before)` names such a change, comparing the module's own numbers
(`numbers`: its bool, int and float attributes) with those it had before its forward ran; the fx tracer then
keeps that module opaque (its forward runs as its Python code, its layers opened, passes/opaque_children.py),
and an export during which a module's forward changed one is no capture (ForwardSideEffect; torch.export puts
the attributes back itself, so `changes_recorded` watches each forward call with hooks).
"""
from __future__ import annotations

import contextlib

from torch import nn

REGISTRIES = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hook dicts, training, ...


@contextlib.contextmanager
def attributes_kept(model: nn.Module):
    """While inside, the forward may set attributes and register buffers on `model`'s modules; on exit
    each module's own attributes and buffers are those it had on entry (module doc)."""
    saved = [(m, {k: v for k, v in vars(m).items() if k not in REGISTRIES}, dict(m._buffers),
              set(m._non_persistent_buffers_set)) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes, buffers, non_persistent in saved:
            for name in [k for k in vars(module) if k not in REGISTRIES and k not in attributes]:
                del module.__dict__[name]
            module.__dict__.update(attributes)
            module._buffers.clear()
            module._buffers.update(buffers)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)


class ForwardSideEffect(RuntimeError):
    """Raised where a captured forward changed a number a module holds (module doc)."""


def numbers(module: nn.Module) -> dict[str, object]:
    """The module's own bool, int and float attributes (not its submodules')."""
    return {k: v for k, v in vars(module).items() if k not in REGISTRIES and type(v) in (bool, int, float)}


def changed_number(module: nn.Module, before: dict[str, object]) -> str | None:
    """'name (before -> now)' of the first of the module's own numbers that changed since `before`
    (`numbers(module)` then), or None. A number replaced by a value of another type changed too: one the
    traced forward computed from its input (speechbrain's InputNormalization counts the frames it has seen,
    `self.count += mask.sum().item()`, a Proxy under torch.fx, which a later trace would read)."""
    now = vars(module)
    return next((f"{k} ({v!r} -> {now.get(k)!r})" for k, v in before.items()
                 if k in now and (type(now[k]) is not type(v) or now[k] != v)), None)


def side_effect(module: nn.Module, path: str, change: str) -> ForwardSideEffect:
    """The error naming the number the forward of `module` (at `path`, "" for the model) changed."""
    where = f"{type(module).__name__} {path!r}" if path else type(module).__name__
    return ForwardSideEffect(f"the forward of {where} changes its attribute {change}, a Python side effect that "
                             f"a captured graph would not repeat (an evaluation counter would stop on the statistic "
                             f"steps)")


@contextlib.contextmanager
def changes_recorded(model: nn.Module):
    """While inside, each forward call of `model`'s modules that changes one of the module's own numbers
    appends (module, path, change) to the list yielded (hooks, removed on exit)."""
    changes, handles = [], []
    entered: dict[int, list] = {}  # a module's numbers at each call it is inside of (a recursive call nests)

    def before(m, _):
        entered.setdefault(id(m), []).append(numbers(m))

    def after(m, _, __, path):
        change = changed_number(m, entered[id(m)].pop())
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
