"""The call of an opaque submodule whose children have graphs of their own (passes/opaque_children.py).

`OpenedLeaf(module, graphs)` stands in the captured graph for the call of the opaque submodule
`module`: it runs `module`'s own forward, eagerly, its Python code taking its branches anew, while
each opened child (by its path under `module`) is replaced, for the call only, by a twin whose
forward is the child's instrumented graph. The twin is a shallow copy of the child: the same
buffers, submodules and attributes (`self.fc1.out_features` reads as before, `isinstance` holds),
without hooks of its own (the graph runs the child's forward hooks, as the lowering does for a module
call, passes/lower.py). The children are restored when the call returns or raises, so the model itself
never holds the graphs: its own forward (the steps without statistics, the quadratic step's replay)
runs untouched.

The statistics of an opened block see the calls of its child only. So that code using a trainable
parameter in another way (`h @ self.fc1.weight.T`, `+ self.fc1.bias`, or `self.mlp.fc(h)` past an
opened `self.mlp`) cannot go unseen, the twin holds views of the child's trainable parameters (the same
values and storage; the graph reads the parameters themselves) and copies of its submodules that hold
views of theirs: a gradient reaching a view is such a use, and its backward raises a GnfxError that
names it and the fix. Reading a view's shape or dtype passes no gradient and is free. A torch.autograd.Function
given the child's parameters (torchdiffeq's odeint_adjoint, `func.parameters()`) gets the views, and its own
backward's vector-Jacobian products in them are zero or unused (the graph reads the parameters, not the views):
the same error stops that silent zero gradient. (Code that holds
the child outside the module tree, in a plain list, reaches the parameters themselves, unwatched.)
"""
from __future__ import annotations

import collections
import inspect
import warnings

import torch
from torch import fx, nn

from gnfx.errors import GnfxError
from gnfx.passes.module_attributes import subtree_numbers

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _read_outside(leaf: str, child: str, name: str, _grad):
    # the model's own forward (leaf "", passes/opaque_root.py): the child is what stays whole
    code, whole = (f"opaque submodule {leaf!r}", leaf) if leaf else ("the model's own forward", child)
    raise GnfxError(
        f"the Python code of {code} uses the parameter {name!r} other than by calling "
        f"{child!r} (a gradient reached it outside that layer's calls: code reading the parameter, or passing it "
        f"to a torch.autograd.Function that computes its gradient in its own backward, as torchdiffeq's "
        f"odeint_adjoint does with func.parameters(), its adjoint ODE calling the layer again inside that backward), "
        f"and gnfx opened {child!r} into a curvature block whose statistics see its calls only "
        f"(passes/opaque_children.py). Fix: call the layer instead of reading its parameter (torchdiffeq: odeint, "
        f"which backpropagates through the solver's calls), or keep the submodule whole with "
        f"gnfx.compile(..., leaf_modules=[{whole!r}]) (its parameters then fall back to the diagonal preconditioner)")


def _watched(module: nn.Module, leaf: str, child: str, path: str, made: list) -> nn.Module:
    """A shallow copy of `module` (at `path`, inside the opened child `child` of the opaque submodule
    `leaf`) holding views of its trainable parameters that raise on a gradient, and watched copies of
    its submodules (module doc); each (name, parameter, view) appended to `made`."""
    # copy.copy's shallow copy, without its __getstate__, which a parametrized module (torch.nn.utils.parametrize:
    # weight_norm's, HuBERT's positional convolution) refuses ("only supported through state_dict()")
    twin = type(module).__new__(type(module))
    twin.__dict__.update(module.__dict__)
    views = {}
    for name, p in module._parameters.items():
        view = p.view_as(p) if p is not None and p.requires_grad and torch.is_grad_enabled() else p
        if view is not p:
            view.register_hook(lambda grad, name=f"{path}.{name}": _read_outside(leaf, child, name, grad))
            made.append((f"{path}.{name}", p, view))
        views[name] = view
    twin.__dict__["_parameters"] = views
    twin.__dict__["_modules"] = {name: None if m is None else _watched(m, leaf, child, f"{path}.{name}", made)
                                 for name, m in module._modules.items()}
    return twin


def _by_form(child: nn.Module, forms: dict[frozenset[str], fx.GraphModule]):
    """The forward of the opened child `child` captured in several forms of call (passes/opaque_children.py's
    `_forms`: {the inputs defaulting to None that a call gives: its graph}): each call runs the graph of its form,
    its arguments bound as the child's forward binds them (by position or keyword, defaults filled in)."""
    signature = inspect.signature(child.forward)
    optional = [p.name for p in signature.parameters.values() if p.default is None]

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return forms[frozenset(name for name in optional if bound.arguments[name] is not None)](*bound.args)
    return forward


def _twin(child: nn.Module, graph, leaf: str, path: str, made: list) -> nn.Module:
    """The opened child at `path` of the opaque submodule `leaf`, watched (`_watched`, its views appended to
    `made`), whose forward is its graph `graph` (or, a dict, the graph of each call's form: `_by_form`), without
    hooks of its own."""
    twin = _watched(child, leaf, path, path, made)
    forward = _by_form(child, graph) if isinstance(graph, dict) else graph.forward
    twin.__dict__.update({name: collections.OrderedDict() for name in _HOOKS}, forward=forward)
    return twin


# a `.data` assignment through the twin's view (speechbrain's Linear with max_norm renormalizes its layer's rows,
# `self.w.weight.data = torch.renorm(self.w.weight.data, ...)`, before calling it) reaches the view, not the
# parameter the graph reads
_DATA_WRITTEN = ("the Python code of {code} assigns the .data of the parameter {name!r} of a layer gnfx opened into a "
                 "curvature block (passes/opaque_children.py): the assignment reached a view of it, and the layer's "
                 "graph computed with the parameter as it was, so the forward is not the module's. Fix: keep the "
                 "submodule whole with gnfx.compile(..., leaf_modules=[{leaf!r}]) (its parameters then fall back to "
                 "the diagonal preconditioner), or change the parameter outside the forward (after model.step())")


class OpenedLeaf(nn.Module):
    """The opaque submodule `module`, called with its opened children's graphs in their place.

    `path` is the submodule's path in the model; `graphs` maps each opened child's path under `module`
    to (its graph (rooted at the model, with its taps), or {form of call: graph} for a child captured in
    several (passes/opaque_children.py); the numbers the child and its submodules held when it was traced,
    passes.module_attributes.subtree_numbers); the graphs are submodules, so that they print with the captured
    graph; `module` is not (its parameters keep their one name).

    A graph holds the numbers it was traced with as constants (a slimmable layer's width, `W[:self.width]`): a
    call where the child holds others (the Python code around it set them: a width drawn in the forward) runs
    the child's own forward, whose values are right but whose statistics its block does not get, and warns
    once per child."""

    def __init__(self, module: nn.Module, path: str, graphs: dict[str, tuple[fx.GraphModule | dict, tuple]]):
        super().__init__()
        self.__dict__["module"] = module
        self.path = path  # the submodule's path in the model
        self.paths = list(graphs)
        # each path's forms (None: one graph), the graphs flat, in the order of the paths and their forms
        self.forms = [list(g) if isinstance(g, dict) else None for g, _ in graphs.values()]
        self.graphs = nn.ModuleList(gm for g, _ in graphs.values() for gm in (g.values() if isinstance(g, dict) else (g,)))
        self.numbers = [numbers for _, numbers in graphs.values()]  # (class doc)
        self._warned: set[str] = set()

    def _path_graphs(self) -> list:
        """Each path's graph, or {form: graph} (module doc)."""
        flat, graphs = iter(self.graphs), []
        for forms in self.forms:
            graphs.append(next(flat) if forms is None else {form: next(flat) for form in forms})
        return graphs

    def forward(self, *args, **kwargs):
        return self.call(self.module, *args, **kwargs)

    def call(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` with the opened children's graphs in their places: the submodule's
        forward, or a method of the model that gnfx.compile(methods=...) names (passes/opaque_root.py)."""
        swapped, views = [], []
        try:
            for path, graph, numbers in zip(self.paths, self._path_graphs(), self.numbers):
                parent, _, name = path.rpartition(".")
                owner = self.module.get_submodule(parent)
                child = owner._modules[name]
                swapped.append((owner, name, child))
                twin = _twin(child, graph, self.path, f"{self.path}.{path}" if self.path else path, views)
                twin.__dict__["forward"] = self._checked(path, child, twin, numbers, twin.forward)
                owner._modules[name] = twin
            out = function(*args, **kwargs)
        finally:
            for owner, name, child in swapped:
                owner._modules[name] = child
        for name, p, view in views:
            if view.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                raise GnfxError(_DATA_WRITTEN.format(code=f"opaque submodule {self.path!r}" if self.path else
                                                     "the model's own forward", name=name,
                                                     leaf=self.path or name.rpartition(".")[0]))
        return out

    def _checked(self, path: str, child: nn.Module, twin: nn.Module, numbers: tuple, forward):
        """The twin's forward `forward` (its graph), for a call where the twin holds the numbers the graph was
        traced with (class doc); else the child's own forward, given the twin's numbers (those the code around
        it set on the twin), with a warning."""
        def call(*args, **kwargs):
            now = subtree_numbers(twin)
            if now == numbers:
                return forward(*args, **kwargs)
            self._warn_numbers(path, now, numbers)
            for name, attr, _ in now:
                setattr(child.get_submodule(name), attr, getattr(twin.get_submodule(name), attr))
            return child(*args, **kwargs)
        return call

    def _warn_numbers(self, path: str, now: tuple, numbers: tuple) -> None:
        """Warn, once per child, that the child at `path` holds the numbers `now`, its graph others."""
        if path in self._warned:
            return
        self._warned.add(path)
        now = dict(((name, attr), value) for name, attr, value in now)
        then = dict(((name, attr), value) for name, attr, value in numbers)
        changed = next(k for k in {**then, **now} if then.get(k) != now.get(k))
        where = f"{path}.{changed[0]}" if changed[0] else path
        warnings.warn(
            f"gnfx: {where}.{changed[1]} is {now.get(changed, 'unset')}, where the graph gnfx captured of "
            f"{path!r} (opened inside {'the model' if not self.path else repr(self.path)}'s own forward, "
            f"passes/opaque_children.py) has {then.get(changed, 'unset')} as a constant: such calls run its own "
            f"forward, whose statistics its block does not get. Usually the Python code around it sets the number "
            f"(a slimmable network's width drawn in the forward). Fix: set it before calling the model, where the "
            f"training loop draws it: gnfx then captures the model's forward once per value",
            RuntimeWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return f"opened: {', '.join(self.paths)}"
