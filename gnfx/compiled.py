"""`CompiledModel`: the module `gnfx.compile` returns.

It shares the original model's parameters, buffers and submodules (so `state_dict()` keys and
Parameter objects are the original's) and chooses its forward per step: on a statistic step
(training mode, gradients enabled, `optimizer.collecting`) it runs the instrumented graph, whose
taps record `a` and `δ`; on every other step it runs the original forward, untouched, so the taps
cost nothing there.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from gnfx.errors import GnfxError
from gnfx.fisher import record_true_fisher
from gnfx.report import report
from gnfx.passes import graph_view


class CompiledModel(nn.Module):
    def __init__(self, model: nn.Module, graph_module, table, optimizer, settings: dict,
                 optional_inputs=(), variant=None):
        super().__init__()
        # Share the original's registries: same Parameter objects, same state_dict keys.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self.training = model.training
        self.__dict__["_model"] = model
        self.__dict__["graph_module"] = graph_module
        self.__dict__["layers"] = table
        self.__dict__["optimizer"] = optimizer
        self.__dict__["_settings"] = settings
        # optional inputs (default None) of an fx-traced forward: a call that leaves some out runs
        # a graph traced with them fixed to None, built on first use by `variant`
        self.__dict__["_optional"] = optional_inputs
        self.__dict__["_signature"] = inspect.signature(model.forward) if optional_inputs else None
        self.__dict__["_variants"] = {(): graph_module}
        self.__dict__["_variant"] = variant

    def forward(self, *args, **kwargs):
        opt = self.optimizer
        if self.training and opt.collecting and torch.is_grad_enabled():
            store = opt.statistics
            store.forward_id += 1
            opt.collected = True
            out = self._instrumented(args, kwargs)(*args, **kwargs)
            first = next((t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.dim()), None)
            if first is not None:
                store.batch_size[store.forward_id] = first.shape[0]
            if self._settings["loss_average"] == "auto" and isinstance(out, torch.Tensor) and out.dim() > 2:
                store.terms_per_example[store.forward_id] = out.shape[1:-1].numel()
            if store.fisher != "empirical":
                self._start_true_fisher(out, store)
            return out
        return self._model(*args, **kwargs)

    def _instrumented(self, args, kwargs):
        """The instrumented graph for this call (see `_optional`)."""
        if not self._optional:
            return self.graph_module
        bound = self._signature.bind(*args, **kwargs).arguments
        key = tuple(n for n in self._optional if bound.get(n) is None)
        if key not in self._variants:
            self._variants[key] = self._variant(key)
            self._variants[key].training = self.training
        return self._variants[key]

    def _start_true_fisher(self, out, store) -> None:
        """Arrange the true-Fisher backward (gnfx.fisher) to run when the user's backward reaches `out`."""
        pending, store.pending = store.pending, []
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            raise GnfxError(f"fisher={store.fisher!r} needs the model output to be one tensor of logits "
                            f"(or predictions for mse) that requires grad; got {type(out).__name__}")
        s = self._settings
        terms = out.shape[0] if s["loss_average"] == "batch" or out.dim() < 2 else out.reshape(-1, out.shape[-1]).shape[0]

        def hook(grad):
            handle.remove()  # the extra backward starts at `out` too: run once
            record_true_fisher(out, pending, s["fisher"], s["loss"], s["mc_samples"], terms)
            return grad

        handle = out.register_hook(hook)

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.training = mode
        for gm in self._variants.values():
            gm.training = mode
        return self

    # --- training --------------------------------------------------------------------------
    def step(self, closure=None):
        """One optimizer step (same as `model.optimizer.step()`)."""
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # --- inspection ------------------------------------------------------------------------
    def statistics(self, name: str) -> dict[str, torch.Tensor]:
        """The averaged statistics of block `name`: "A", "S" and/or "diag" (see gnfx.statistics)."""
        if name not in self.layers:
            raise KeyError(f"no block named {name!r}; blocks are {[b.name for b in self.layers]}")
        store = self.optimizer.statistics
        if name not in store.blocks:
            raise KeyError(f"block {name!r} collects no statistics under this plan; ask for them with "
                           f"gnfx.compile(..., statistics=('A', 'S'))")
        return dict(store[name].values)

    def state_bytes(self, params, block: str | None = None) -> int:
        """Bytes of optimizer state and statistics held for these parameters (and block)."""
        opt, total = self.optimizer, 0
        for n in params:
            total += sum(v.numel() * v.element_size() for v in opt.state_of(n).values()
                         if isinstance(v, torch.Tensor))
        if block is not None and block in opt.statistics.blocks:
            total += sum(v.numel() * v.element_size() for v in opt.statistics[block].values.values())
        return total

    @property
    def update_code(self) -> str:
        """The source of the generated update function, plus the elementwise steps it leaves out."""
        opt = self.optimizer
        lines = [opt.update_function.source]
        for pre in opt.elementwise:
            n = len(pre.param_names) + sum(len(b.params) for b in pre.blocks)
            lines.append(f"# then {pre.name}: torch._foreach AdamW-style step over {n} parameter tensors")
        return "\n".join(lines)

    def report(self) -> str:
        return report(self)

    def __repr__(self) -> str:
        return report(self)

    def to_networkx(self):
        return graph_view.to_networkx(self.graph_module)

    def to_dot(self) -> str:
        return graph_view.to_dot(self.graph_module)
