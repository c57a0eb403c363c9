"""A module as a function of its parameters, and forward-mode products J v through it, at little
overhead per call: the quadratic-model step (gnfx.quadratic_step) evaluates them on every step.

`ModuleFunction(module, names)` is θ ↦ module(*args, **kwargs) with the tensors θ (a list, in the
order of `names`, parameters of `module`) put in the module's registries for the call and the
module's own put back after it, as torch.func.functional_call does with its default
tie_weights=True (a tensor registered under several names, tied weights or a shared submodule,
is replaced under all of them). The registries are found once, at construction, where
functional_call walks the module on every call: a forward of the deep autoencoder of benchmarks/
costs 0.95 ms CPU through functional_call, 0.72 through a ModuleFunction, 0.69 as it is.

`jvp_rows(f, primals, tangent_rows)` is (f(θ), [J v_k]_k), J = ∂f/∂θ at θ = `primals`, by one
forward-mode pass (torch.autograd.forward_ad: dual tensors) per tangent v_k, where torch.func's jvp
vmapped over the tangents runs the primal ops once but wraps every op. Measured (2 tangents, CPU
ms, medians of interleaved calls on a loaded machine; benchmarks/results/quadratic_step.md): the
deep autoencoder of benchmarks/ 4.8 against 4.9 for the vmapped jvp through a ModuleFunction and
5.2 through functional_call, with the whole step 16% shorter against 10% with the vmapped jvp;
the char GPT 147 against 164; the digits CNN 26 against 23 (its convolutions run again in the
second pass; its whole step ~7% longer). The passes need no batching rule of any op. Their
products equal the vmapped jvp's bitwise on the autoencoder and the digits MLP; where vmap batches
an op differently (convolutions, attention, layer norm) they agree to float rounding.

The dual tensors are made by `torch._make_dual`, the operation that torch.autograd.forward_ad's
make_dual calls after two things the passes do not need on every call: (1) loading PyTorch's
decompositions of the operations that have no forward-mode formula of their own (the module
torch._decomp.decompositions_for_jvp: TorchScript-compiled, ~0.15-0.2 s of CPU at a process's first
make_dual, 15-25% of AdamW's whole run to the deep autoencoder's validation target); in torch 2.13
they serve only backward operations (nll_loss_backward, _softmax_backward_data,
native_layer_norm_backward, ...: forward-over-reverse), which a model's forward rarely runs, and an
operation that needs one raises NotImplementedError without them, on which the caller loads them
(`load_decompositions`) and runs the passes again (gnfx.quadratic_step); (2) a lookup of
torch.export's pre-dispatch tracing mode, for tracing a make_dual into a graph, which the eager
passes are not. Together ~10 µs of Python per dual tensor, 24 a step of the autoencoder (its step
3-4% shorter; benchmarks/results/quadratic_step.md, "The first make_dual and its wrapper").
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence

import torch
from torch.autograd import forward_ad

from gnfx.composite_forms import spectral_norms, uses_weight_norm, written_out

# the module whose import registers PyTorch's forward-mode decompositions (module docstring)
DECOMPOSITIONS = "torch._decomp.decompositions_for_jvp"
# the warning torch.jit.script gives as that import compiles them (load_decompositions)
JIT_SCRIPT_DEPRECATED = r"`torch\.jit\.script` is deprecated"


class ModuleFunction:
    """θ ↦ the output of `module` with the tensors θ in place of its parameters `names`, and copies
    of its buffers, so that a forward in training mode leaves them as they were (batch-norm
    statistics; module docstring); reentrant activation checkpoints run inline, weight norm as its
    composite and spectral norm without its power iteration (gnfx.composite_forms)."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        self.module = module
        self.names = list(names)
        slots: dict[int, list[tuple[dict, str]]] = {}  # id(tensor) -> every (registry, key) holding it
        buffers: dict[int, torch.Tensor] = {}
        for sub in module.modules():
            for registry in (sub._parameters, sub._buffers):
                for key, tensor in registry.items():
                    if tensor is not None:
                        slots.setdefault(id(tensor), []).append((registry, key))
                        if registry is sub._buffers:
                            buffers[id(tensor)] = tensor
        params = dict(module.named_parameters())
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise KeyError(f"{type(module).__name__} has no parameter named {', '.join(unknown)}")
        # the (registry, key) slots of each parameter of `names`, then of each buffer
        self.parameter_slots = [slots[id(params[n])] for n in self.names]
        self.weight_norm = uses_weight_norm(module)
        self.spectral_norms = spectral_norms(module)
        self.buffer_slots = [slots[i] for i in buffers]
        # whether a call may run under forward mode (gnfx.composite_forms.written_out): False for plain replays
        self.forward_mode = True

    def __call__(self, values: Sequence[torch.Tensor] | None, *args, **kwargs):
        """The module's output on (args, kwargs) with `values` (in the order of `names`; None: the
        parameters as they are) and copies of the buffers."""
        replaced = [] if values is None else list(zip(self.parameter_slots, values))
        replaced += [(slots, slots[0][0][slots[0][1]].clone()) for slots in self.buffer_slots]
        original = [[registry[key] for registry, key in slots] for slots, _ in replaced]
        try:
            for slots, value in replaced:
                for registry, key in slots:
                    registry[key] = value
            # forms forward mode differentiates, and a replay of the training forward (gnfx.composite_forms)
            with written_out(self.weight_norm, self.spectral_norms, self.forward_mode):
                return self.module(*args, **kwargs)
        finally:
            for (slots, _), tensors in zip(replaced, original):
                for (registry, key), tensor in zip(slots, tensors):
                    registry[key] = tensor


def jvp_rows(f: Callable[[list], torch.Tensor], primals: Sequence[torch.Tensor],
             tangent_rows: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, [J v_k]_k stacked on a leading axis): z = f(primals), J its Jacobian at `primals`, v_k
    the k-th entry of `tangent_rows` (one tensor per primal). One dual-tensor forward per v_k
    (module docstring); z is that of the first. A z that does not depend on θ has J v_k = 0. An operation
    of f without a forward-mode formula raises NotImplementedError unless `load_decompositions` has run."""
    products, z = [], None
    for tangents in tangent_rows:
        with forward_ad.dual_level() as level:
            out = forward_ad.unpack_dual(f([torch._make_dual(p, t, level=level) for p, t in zip(primals, tangents)]))
            z = out.primal if z is None else z
            products.append(out.tangent if out.tangent is not None else torch.zeros_like(out.primal))
    return z, torch.stack(products)


def load_decompositions() -> bool:
    """Load PyTorch's forward-mode decompositions (module docstring) as torch.autograd.forward_ad's
    make_dual does, under its conditions (not with PYTORCH_JIT=0 nor python -O): True if they were
    not loaded before and are now, so that passes that failed for want of one can succeed when run again.
    PyTorch compiles them with torch.jit.script, whose DeprecationWarning (`torch.jit.script` is
    deprecated) is PyTorch's own business, not the user's: it is silenced here, and only it."""
    loaded = DECOMPOSITIONS in sys.modules
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_SCRIPT_DEPRECATED, category=DeprecationWarning)
        forward_ad._maybe_load_decompositions()
    return not loaded and DECOMPOSITIONS in sys.modules
