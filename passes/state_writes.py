"""A tensor a forward stores on its module, written by a graph node where no read of its old value precedes the write.

Hugging Face's RecurrentGemma with its default `use_cache=True`: each call of RecurrentGemmaModel's forward sets every
recurrent block's state to zeros (`_setup_cache`), then each block stores its convolution's input window,
`self.conv1d_state = pad(x)`, and its RG-LRU its last hidden state h_T, `self.recurrent_states = h_T`, for a decoding
step that training never runs. passes/module_attributes.py names a tensor a forward stores on its module a side effect
(a neuron's membrane potential, carried to the next call, which a graph would read as the constant the trace saw), so
torch.export refused the model and it ran eagerly (74.2% of its parameters in blocks for 93.2%).

Under torch.fx it was worse: the model's zeros were a Proxy, which `held_values` does not hold, so the block's store
over it was no change at all, and the graph captured never stored h_T (after a compiled call the attribute held
what it held before). Every attribute a capture leaves holding a value it computed is now a store too (`stores`).

The capture is retried with each stored attribute absent from its module (`StoredStates.absent`): a forward that
reads it before a forward of the same call writes it raises `StateReadBeforeWrite` (a `hasattr` or `getattr` with a
default included: the error is no AttributeError; an `is None` test too), and the store is refused, a side effect as
before (a neuron that reads its potential stays opaque). A capture that reads none computes its output from the call's
inputs alone, as the module does whatever the attribute held, and each write is a node `AttributeWrite`
(passes/module_attributes.py) of the graph,
run at each call as the module's own assignment is: under torch.fx where the forward assigns it, under torch.export
(whose graph holds no Python assignment) before the output, of the value the forward left, exported as an extra
output (`exported`, `write_exported`). After a call of the graph the attribute holds what an eager call leaves (h_T,
with its autograd history), and a forward run as its Python code after it (an opaque submodule, the model's own
forward, a decoding step) sees it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as symbolic_trace

from gnfx.passes.carried_states import computed_from_data, export_nodes, fx_nodes
from gnfx.passes.module_attributes import REGISTRIES, AttributeWrite, ForwardSideEffect, side_effect

Key = tuple[int, str]  # (id of the module, attribute name)


class StoreRefused(ForwardSideEffect):
    """The attribute `key` of a module, stored by a captured forward, cannot be written in the graph (module doc)."""

    def __init__(self, key: Key, message: str):
        super().__init__(message)
        self.key = key


class StateReadBeforeWrite(StoreRefused):
    """A captured forward read the attribute `key` of a module before a forward of the same call wrote it."""


_GETATTR, _SETATTR = nn.Module.__getattr__, nn.Module.__setattr__


class StoredStates:
    """The tensor attributes a captured forward stores on `model`'s modules (module doc), by (id of the module, name):
    `watched`, those the capture holds absent and writes in the graph; `refused`, those read before their write;
    `original`, each module's attributes before the capture."""

    def __init__(self, model: nn.Module):
        self.original = {id(m): dict(vars(m)) for m in model.modules()}
        self.watched: dict[Key, nn.Module] = {}
        self.refused: set[Key] = set()
        self.active = False
        self.found: list[tuple[nn.Module, list[str]]] = []  # the stores of the last export not yet watched (`exported`)
        self.exported_writes: list[tuple[Key, nn.Module]] = []  # the watched attributes it returned, in order
        self.carried: set[Key] = set()  # those stored with a value computed from the call's input data (`stores`)
        self.read_first: dict[Key, bool] = {}  # by refused attribute: whether a read before its write refused it

    def names(self, module: nn.Module) -> set[str]:
        """The names of `module`'s watched attributes."""
        return {name for (i, name) in self.watched if i == id(module)}

    def watch(self, stores: list[tuple[nn.Module, list[str]]]) -> bool:
        """Watch each attribute of `stores` ((module, names) of the values a forward stored, `stores`); whether any
        is new (the capture is then retried)."""
        keys = {(id(m), name): m for m, names in stores for name in names if (id(m), name) not in self.refused}
        if keys.keys() <= self.watched.keys():
            return False
        self.watched.update(keys)
        if self.active:
            for (_, name), module in keys.items():
                module.__dict__.pop(name, None)
        return True

    def may_store(self, module: nn.Module, names: list[str]) -> bool:
        """Whether the forward of `module` replacing the tensors `names` it held (`stored_proxies`, a side effect of
        `changed_value`) is a store to try in the graph: some, none of them refused (else the side effect stands: the
        module is kept opaque, its Python code carrying the state)."""
        return bool(names) and not any((id(module), name) in self.refused for name in names)

    def refuse(self, refusal: StoreRefused) -> None:
        """The attribute `refusal.key` was read before its write, or written with a value the graph cannot store: no
        longer watched (present, as before the capture)."""
        key = refusal.key
        self._put_back(key, self.watched.pop(key))
        self.refused.add(key)
        self.read_first[key] = isinstance(refusal, StateReadBeforeWrite)

    def _put_back(self, key: Key, module: nn.Module) -> None:
        held = self.original.get(key[0], {})
        if key[1] in held:
            module.__dict__[key[1]] = held[key[1]]
        else:
            module.__dict__.pop(key[1], None)

    def _computed(self, m: nn.Module, k: str, v, tracer: fx.Tracer | None) -> bool:
        """Whether `v`, the attribute `k` of `m`, holds a value the capture computed: a Proxy of `tracer`'s trace or a
        tuple of them (an LSTM's (h, c)); under torch.export a tensor or a tuple of tensors other than the value held
        before the capture."""
        if not isinstance(v, (fx.Proxy, torch.Tensor, tuple)) or isinstance(v, nn.Parameter) or k in _recomputed(m):
            return False
        if tracer is not None:
            return bool(fx_nodes(v, tracer)) and (isinstance(v, fx.Proxy) or all(
                isinstance(x, fx.Proxy) for x in torch.utils._pytree.tree_leaves(v)))
        leaves = torch.utils._pytree.tree_leaves(v)
        return (bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)
                and v is not self.original.get(id(m), {}).get(k))

    def stores(self, model: nn.Module, tracer: fx.Tracer | None = None,
               inputs: list[fx.Node] = ()) -> list[tuple[nn.Module, list[str]]]:
        """After a forward traced by `tracer` (torch.fx) or inside one torch.export traces (the nodes of its call's
        `inputs`): (module, names) of the attributes of `model`'s modules, neither watched nor refused, that hold a
        value the capture computed (`_computed`); those computed from the input's data noted `carried`
        (passes/carried_states.py). A store over a Proxy the module held before its own forward (RecurrentGemma's
        state set by its model) is none of `changed_value`'s; nor is a store over None, which, refused, is left as it
        was where it is a cache, `if self.cached is None: self.cached = f(x.shape)` (the graph computes it at each
        call, and stores it nowhere), and is a side effect where it is carried (`carried_change`)."""
        found = [(m, [k for k, v in vars(m).items() if k not in REGISTRIES and (id(m), k) not in self.watched
                      and (id(m), k) not in self.refused and self._computed(m, k, v, tracer)])
                 for m in model.modules()]
        found = [(m, names) for m, names in found if names]
        placeholders = {n for n in tracer.graph.nodes if n.op == "placeholder"} if tracer is not None else set(inputs)
        for m, names in found:
            for k in names:
                value = vars(m)[k]
                if computed_from_data(fx_nodes(value, tracer) if tracer is not None else export_nodes(value),
                                      placeholders):
                    self.carried.add((id(m), k))
        return found

    def carried_change(self, module: nn.Module, tracer: fx.Tracer | None = None) -> str | None:
        """'attribute name (...)', the change `side_effect` names, of a store of `module` refused and carried
        (computed from the call's input data, `stores`) that this capture made again; else None: read before its write,
        the state of the last call, which a graph would read as the trace's None at every call; or a value the graph
        cannot store (a tuple), which it would leave as it was."""
        for k, v in vars(module).items():
            key = (id(module), k)
            if key in self.refused and key in self.carried and self._computed(module, k, v, tracer):
                why = ("which its forward reads at its next call" if self.read_first[key] else
                       "other than one tensor, which a graph cannot store")
                return f"attribute {k} (None at the capture -> a value computed from the call's input, {why})"
        return None

    @contextlib.contextmanager
    def absent(self, tracer: fx.Tracer | None = None):
        """While inside, each watched attribute is absent from its module, and reading it before a write raises
        `StateReadBeforeWrite`; under torch.fx (`tracer`) each write of one is a node `AttributeWrite` of the graph
        where the forward writes it (of the trace that computed the value), and a write of a constant is refused
        (`StoreRefused`). On exit each holds its value from before the capture."""
        watched = self.watched

        def getattr_watched(module, name):
            key = (id(module), name)
            if key in watched and name not in module.__dict__:
                raise StateReadBeforeWrite(key, f"the forward of {type(module).__name__} reads its attribute {name} "
                                                f"before a forward of the same call writes it (a state of the last call)")
            return _GETATTR(module, name)

        def setattr_watched(module, name, value):
            _SETATTR(module, name, value)
            key = (id(module), name)
            if tracer is None or key not in watched:
                return
            if not isinstance(value, fx.Proxy):  # (a constant: the graph would not know when the forward stores it)
                raise StoreRefused(key, f"the forward of {type(module).__name__} stores a value other than one traced "
                                        f"tensor in its attribute {name}")
            value.tracer.create_proxy("call_function", AttributeWrite(module, name), (value,), {}, name=f"write_{name}")

        for (_, name), module in watched.items():
            module.__dict__.pop(name, None)
        nn.Module.__getattr__, nn.Module.__setattr__, self.active = getattr_watched, setattr_watched, True
        symbolic_trace._orig_module_getattr = getattr_watched  # (what torch.fx's tracer calls in its place)
        try:
            yield
        finally:
            nn.Module.__getattr__, nn.Module.__setattr__, self.active = _GETATTR, _SETATTR, False
            symbolic_trace._orig_module_getattr = _GETATTR
            for key, module in watched.items():
                self._put_back(key, module)

    def exported(self, model: nn.Module, out, inputs):
        """Under torch.export, at the end of the forward exported (of `model`, called with `inputs`, which returned
        `out`): the attributes it stored that are not watched noted in `found`; `out`, and the tensors the watched
        attributes hold, whose writes `write_exported` makes graph nodes (`out` alone where none is watched). Raises
        the side effect of a carried state stored again (`carried_change`)."""
        for path, m in model.named_modules():
            if (change := self.carried_change(m)) is not None:
                raise side_effect(m, path, change)
        self.found = self.stores(model, inputs=export_nodes(inputs))
        if not self.watched:
            return out
        for (_, name), m in self.watched.items():
            if not isinstance(m.__dict__.get(name), torch.Tensor):
                raise StoreRefused((id(m), name), f"the forward of {type(m).__name__} leaves no tensor in its "
                                                  f"attribute {name}")
        self.exported_writes = list(self.watched.items())
        return out, tuple(m.__dict__[name] for (_, name), m in self.exported_writes)

    def write_exported(self, gm: fx.GraphModule) -> None:
        """The exported graph of `exported`'s output: its last outputs written to their attributes by nodes before the
        output, which is `out`'s again."""
        if not self.watched:
            return
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        flat = list(output.args[0])
        count = len(self.exported_writes)
        with gm.graph.inserting_before(output):
            for ((_, name), module), value in zip(self.exported_writes, flat[-count:]):
                gm.graph.call_function(AttributeWrite(module, name), (value,))
        output.args = (tuple(flat[:-count]),)
        spec = gm.graph._codegen.pytree_info.out_spec.children()[0]
        gm.graph._codegen.pytree_info = gm.graph._codegen.pytree_info._replace(out_spec=spec)
        gm._out_spec = spec
        gm.recompile()


def _recomputed(module: nn.Module) -> set[str]:
    """The attributes a forward pre-hook of `module` computes afresh at every call from its parameters: the weight
    of torch.nn.utils.weight_norm and spectral_norm (their hooks' `name`) and of torch.nn.utils.prune (`_tensor_name`),
    which the graph reads as the layer's weight; no state of a call."""
    hooks = module._forward_pre_hooks.values()
    return {name for hook in hooks for name in (getattr(hook, "name", None), getattr(hook, "_tensor_name", None))
            if isinstance(name, str)}
