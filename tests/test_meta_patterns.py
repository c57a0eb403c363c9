"""Meta-learning loops as learn2learn and higher write them, in plain torch (benchmarks/results/first_contact_13_meta.md;
the libraries themselves in benchmarks/meta_probe.py).

learn2learn's MAML adapts a *copy* of the model: `clone_module` makes `type(m).__new__(type(m))` with a copy
of the module's `__dict__`, its `_parameters` replaced by `p.clone()` (recursively over `_modules`), and
`update_module` puts `p - α∇p` (`autograd.grad(create_graph=True)` for second order) in their place; the
task's forwards call the copy. `clone_module` and `update_module` below are learn2learn 0.2.0's, as it writes
them (less its buffer, memo and RNN branches, which these models do not reach). The reference is the same
loop on the module itself, in float64; the statistics against plain hooks on a copy
(tests/test_filled_gradients.py's Recorded: g = ∂L/∂z of the outer loss at every call of a layer). higher's
`innerloop_ctx` calls a monkeypatched copy instead (`functional_copy` below, as higher.patch makes it). Each test
failed before its change.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnfx
from test_filled_gradients import Recorded, assert_statistics, assert_step_as_reference, mlp


def clone_module(module: nn.Module) -> nn.Module:
    """learn2learn.utils.clone_module: a copy sharing the module's attributes, its parameters cloned."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = clone._parameters.copy()
    clone._buffers = clone._buffers.copy()
    clone._modules = clone._modules.copy()
    for key, param in module._parameters.items():
        if param is not None:
            clone._parameters[key] = param.clone()
    for key in clone._modules:
        clone._modules[key] = clone_module(module._modules[key])
    return clone


def update_module(module: nn.Module) -> nn.Module:
    """learn2learn.utils.update_module: each parameter p with a `p.update` becomes p + p.update."""
    for key, p in module._parameters.items():
        if p is not None and getattr(p, "update", None) is not None:
            module._parameters[key] = p + p.update
    for key in module._modules:
        module._modules[key] = update_module(module._modules[key])
    return module


def maml_task_loss(module: nn.Module, x, y, lr: float = 0.1, first_order: bool = False) -> torch.Tensor:
    """learn2learn's `learner = maml.clone(); learner.adapt(support loss); query loss of learner(x)`, on the
    first and second half of (x, y)."""
    learner = clone_module(module)
    support = F.cross_entropy(learner(x[:5]), y[:5])
    grads = torch.autograd.grad(support, list(learner.parameters()), retain_graph=not first_order,
                                create_graph=not first_order)
    for p, g in zip(learner.parameters(), grads):  # learn2learn.algorithms.maml.maml_update
        p.update = -lr * g
    learner = update_module(learner)
    return F.cross_entropy(learner(x[5:]), y[5:])


@pytest.mark.parametrize("first_order", [False, True])
def test_a_learn2learn_clone_runs_its_own_parameters(first_order):
    """A clone of the compiled model (learn2learn's clone_module) ran the compiled model's forward, bound to
    the original: the original's parameters, not the clone's, so learn2learn's adapt raised 'the differentiated
    Tensor ... appears to not have been used in the graph' (and with allow_unused=True the adaptation was
    silently dropped: plain training). Now a call of the copy runs the compiled model at the copy's tensors
    (torch.func.functional_call): the meta-loss and θ's gradients are the module's own, the statistics those of
    the outer backward (the query forward's rows and, second order, the support forward's that it reaches)."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    reference = Recorded(model)
    loss_ref = maml_task_loss(reference.model, x, y, first_order=first_order)
    expected = reference.statistics(loss_ref)
    loss_ref.backward()
    loss = maml_task_loss(c, x, y, first_order=first_order)
    assert_step_as_reference(c, model, reference, loss, loss_ref, expected)
    assert all(t is p for t, p in zip(c.parameters(), model.parameters()))


@pytest.mark.parametrize("first_order", [False, True])
def test_an_inner_gradient_with_respect_to_fast_weights_records_nothing(first_order):
    """MAML written with torch.func.functional_call at fast weights that are computed tensors (θ.clone(), as
    learn2learn's clone is), the inner `autograd.grad` taken with respect to them: the blocks' gradient check
    asked whether the backward runs the fast weights' own nodes, which an autograd.grad with them as its
    inputs does (it captures there), so the inner backward's g = ∂L_support/∂z was added to S (and, second
    order, nothing warned). Now the check asks whether the backward accumulates into θ.grad: the statistics are
    the outer backward's (plain hooks), and a second-order inner gradient warns that its loss's extra path is
    not modelled."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))

    def meta_loss(module, net):
        fast = {name: p.clone() for name, p in net.named_parameters()}
        support = F.cross_entropy(torch.func.functional_call(module, fast, (x[:5],)), y[:5])
        grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order)
        fast = {name: p - 0.1 * g for (name, p), g in zip(fast.items(), grads)}
        return F.cross_entropy(torch.func.functional_call(module, fast, (x[5:],)), y[5:])

    reference = Recorded(model)
    loss_ref = meta_loss(reference.model, reference.model)
    expected = reference.statistics(loss_ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = meta_loss(c, model)
    told = [str(w.message) for w in caught if "create_graph=True" in str(w.message)]
    assert len(told) == (0 if first_order else 1)
    loss.backward()
    c.step()
    assert_statistics(c, expected)


HIGHER_INTERNAL = {"_backend", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks",
                   "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules"}


def functional_copy(module: nn.Module) -> nn.Module:
    """higher.patch._make_functional's copy: an instance of a subclass of the module's class, made by
    nn.Module.__init__, the module's other attributes set on it with setattr (a module among them becomes a
    submodule of the copy), its children functional copies too; the fast weights go into `_parameters`."""
    patched = type("InnerFunctional" + type(module).__name__, (type(module),), {})
    copy = patched.__new__(patched)
    nn.Module.__init__(copy)
    for name, attr in module.__dict__.items():
        if name not in HIGHER_INTERNAL:
            setattr(copy, name, attr)
    for name, child in module._modules.items():
        copy._modules[name] = functional_copy(child)
    return copy


def set_fast_weights(copy: nn.Module, names: list[str], fast: list[torch.Tensor]) -> None:
    """higher's update_params: each parameter's fast weight in the `_parameters` of the copy's submodule."""
    for name, tensor in zip(names, fast):
        owner, _, field = name.rpartition(".")
        copy.get_submodule(owner)._parameters[field] = tensor


def test_a_higher_functional_copy_runs_its_fast_weights():
    """higher's `innerloop_ctx(model, opt)` calls a functional copy of the compiled model, which setattr gave
    the compiled model's attributes, the module it was compiled from among them, as submodules: higher's walk
    over the copy's submodules then met that module's own layers (AttributeError: 'Linear' object has no
    attribute '_param_names'), and the copy's call ran the original's parameters. Now that module is held in
    a tuple, not as an attribute, and the copy's call runs the compiled model at its fast weights: the
    meta-loss, θ's gradients and the statistics are those of the same loop by functional_call on a plain copy
    (plain hooks)."""
    torch.manual_seed(0)
    model = mlp(4, 3)
    c = gnfx.compile(model, "kfac", lr=1e-2, stat_every=1, stat_decay=0.0)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    names = [name for name, _ in model.named_parameters()]

    def meta_loss(forward, params):
        """higher's loop (copy_initial_weights=False: the fast weights start at θ; DifferentiableSGD's step)."""
        support = F.cross_entropy(forward(params, x[:5]), y[:5])
        grads = torch.autograd.grad(support, params, create_graph=True)
        return F.cross_entropy(forward([p - 0.1 * g for p, g in zip(params, grads)], x[5:]), y[5:])

    reference = Recorded(model)
    loss_ref = meta_loss(lambda fast, inputs: torch.func.functional_call(reference.model, dict(zip(names, fast)),
                                                                         (inputs,)), list(reference.model.parameters()))
    expected = reference.statistics(loss_ref)
    loss_ref.backward()
    fmodel = functional_copy(c)

    def through_copy(fast, inputs):
        set_fast_weights(fmodel, names, fast)
        return fmodel(inputs)
    loss = meta_loss(through_copy, list(model.parameters()))
    assert_step_as_reference(c, model, reference, loss, loss_ref, expected)
