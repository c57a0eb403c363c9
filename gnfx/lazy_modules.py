"""Lazy modules (nn.LazyLinear, nn.LazyConv2d, nn.LazyBatchNorm2d, ...) compiled before their first forward.

A lazy module's parameters (and buffers) are torch.nn.parameter.UninitializedParameter until its first
call infers their shapes from its input, materializes them in place (the same Parameter objects, of
class Parameter now, with data of the inferred shape) and initializes them (`reset_parameters`,
from the random generator). gnfx's capture reads the shapes (the LayerTable, the plan, the
preconditioners' state), so a model with uninitialized parameters is materialized before its first
capture, by a dry run of its own forward on the inputs of its first call (or on `example_inputs` at
gnfx.compile): what PyTorch's documentation asks of a user before constructing an optimizer, done
where gnfx needs it. The dry run runs under torch.no_grad() with every submodule in eval mode (and
each put back in its own mode after), so that it changes nothing but the lazy parameters: no
batch-norm running statistic moves, no dropout mask is drawn; the random numbers it takes are the
initializations', drawn as the user's dry run would draw them. The compiled model's optimizer holds the
same Parameter objects from gnfx.compile on (param_groups, LR schedulers work before the first call);
its state and the preconditioners are built at the capture, after the dry run. A lazy model loaded
from a checkpoint before its first call (torch materializes the parameters on load_state_dict) still
has the lazy modules' class and pre-hook, which the capture would keep as opaque module calls: its
dry run draws no random number (its parameters are initialized) and turns the modules into their
ordinary classes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin


def has_lazy_modules(module: nn.Module) -> bool:
    """Whether a lazy submodule of `module` has not run its first forward yet: its parameters are
    uninitialized, or were loaded from a checkpoint (torch materializes them on load_state_dict)
    while the module keeps its lazy class and the forward pre-hook that infers them, until that
    forward turns it into its ordinary class (nn.LazyLinear into nn.Linear)."""
    return any(isinstance(m, LazyModuleMixin) and hasattr(m, "_initialize_hook") for m in module.modules())


def materialize(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Materialize the lazy modules of `module` by a dry run `module(*args, **kwargs)` without
    gradients, every submodule in eval mode for it (module docstring)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode
