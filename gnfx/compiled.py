"""`CompiledModel`: the module `gnfx.compile` returns.

It shares the original model's parameters, buffers and submodules (so `state_dict()` keys and
Parameter objects are the original's) and chooses its forward per step: on a statistic step
(training mode, gradients enabled, `optimizer.collecting`) it runs the instrumented graph of
this call's form (gnfx.variants), whose taps record `a` and `δ`; on every other step it runs the
original forward, untouched, so the taps cost nothing there. A model gnfx.compile could not capture
without inputs is captured at its first training call, from that call's inputs; a model with lazy
modules not called yet is first materialized by a dry run on the inputs of its first call
(gnfx.lazy_modules). Under
`torch.compile(compiled_model)` the statistic steps (and the capture) run eagerly and the other
steps run the original forward compiled (see `_statistic_call`), so training is the same as
without the wrapper.
"""
from __future__ import annotations

import copy
import functools
import inspect
import warnings

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from gnfx.plan_cost import plan_cost
from gnfx.chunked_output import as_one_output
from gnfx.errors import ConfigError, GnfxError, StatisticsError
from gnfx.output_watch import watch_output
from gnfx.fsdp import fsdp_modules, unshard_for_graph
from gnfx.lazy_modules import has_lazy_modules, materialize
from gnfx.report import report
from gnfx.passes import graph_view
from gnfx.variants import NOT_CAPTURED, NotCaptured

_EAGER_REASON = ("gnfx runs statistic steps eagerly: its taps record statistics with Python side effects and "
                 "gradient hooks, and torch.compile(gnfx_model) compiles the other steps. So fullgraph=True "
                 "cannot work: compile the gnfx model with the default fullgraph=False")


_NO_PICKLE = ("a gnfx-compiled model cannot be pickled (torch.save(model), pickle): its captured graphs, statistic "
              "taps and optimizer are bound to the parameters of the model it was compiled from. Fix: save that "
              "model, which shares its parameters with the compiled one and trains with them; for a checkpoint "
              "save model.state_dict() and model.optimizer.state_dict(), and resume by loading both into "
              "gnfx.compile(new_model, ...)")
_PATCHED_FORWARD = (
    "the module's forward was replaced by the compiled model's (module.forward = compiled.forward), and the compiled "
    "model runs the module's forward: each would call the other without end. Fix: leave the module's forward as it "
    "is and put the compiled model where the library calls the module (stable-baselines3's SAC: model.critic = "
    "gnfx.compile(model.critic, ...)), or name the method the library trains through in gnfx.compile(..., "
    "methods=[...]) and hand over that method (policy.evaluate_actions = compiled.evaluate_actions), which is "
    "taken from the module's class")
_MISSING = object()  # inspect.getattr_static's default: no such attribute
_COPY = ("gnfx: copy.deepcopy of a compiled model returns a copy of the module it was compiled from, with the "
         "current parameters and buffers (its captured graphs, taps and optimizer are bound to the original "
         "parameters): an evaluation or EMA copy, as torch.optim.swa_utils.AveragedModel and timm's ModelEma make, "
         "whose parameters and state_dict() come in the compiled model's order. To train the copy, "
         "gnfx.compile it")


class CompiledModel(nn.Module):
    def __init__(self, model: nn.Module, variants, optimizer, settings: dict, methods: tuple[str, ...] = ()):
        super().__init__()
        # Share the original's registries: same Parameter objects, same state_dict keys.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self.training = model.training
        # the module compiled from, and this compiled model (a copy's call runs it at the copy's tensors,
        # __call__): in a tuple, not as module attributes, which higher's monkeypatch would re-set on its
        # functional copy as submodules of it
        self.__dict__["_compiled_from"] = (model, self)
        # the instrumented graphs, captured at gnfx.compile or at the first training call, one per
        # form of call (gnfx.variants)
        self.__dict__["_variants"] = variants
        self.__dict__["optimizer"] = optimizer
        self.__dict__["_settings"] = settings
        optimizer.live_params = lambda: dict(model.named_parameters(remove_duplicate=False))
        if has_lazy_modules(model):  # lazy modules: materialized before any other hook sees the first call
            self.__dict__["_materializing"] = self.register_forward_pre_hook(self._materialize, with_kwargs=True)
        if optimizer.quadratic is not None:  # it replays the last training forward (gnfx.quadratic_step)
            self.register_forward_pre_hook(optimizer.quadratic.observe_random_state, with_kwargs=True)
            self.register_forward_hook(optimizer.quadratic.observe, with_kwargs=True)
        # Introspection sees the original forward's signature (inspect follows __wrapped__): Hugging
        # Face's Trainer keeps only the dataset columns that the model's forward names.
        self.__dict__["forward"] = functools.update_wrapper(functools.partial(type(self).forward, self),
                                                            model.forward)
        # the model's methods named by gnfx.compile(methods=...), each served as forward is (`_call`)
        for method in methods:
            self.__dict__[method] = functools.update_wrapper(functools.partial(type(self)._method, self, method),
                                                             getattr(type(model), method))

    @property
    def _model(self) -> nn.Module:
        """The module gnfx.compile compiled (its parameters, buffers and submodules are this model's)."""
        return self.__dict__["_compiled_from"][0]

    def __call__(self, *args, **kwargs):
        """A call of the compiled model, or of a shallow copy of it: learn2learn's `clone_module` (MAML's
        `maml.clone()`) makes `type(m).__new__` with a copy of its `__dict__` and its parameters cloned, and
        `adapt` puts the fast weights θ - α∇θ in their place. Such a copy shares the compiled model's graphs and
        forward, which are bound to the module it was compiled from, so it would run that module's parameters,
        not its own: instead, its call runs the compiled model under torch.func.functional_call at the copy's
        parameters and buffers (what the statistics then see: `_check_registrations`)."""
        origin = self.__dict__["_compiled_from"][1]
        if origin is self:
            return super().__call__(*args, **kwargs)
        tensors = {**dict(nn.Module.named_buffers(self, remove_duplicate=False)),
                   **dict(nn.Module.named_parameters(self, remove_duplicate=False))}
        return torch.func.functional_call(origin, tensors, args, kwargs)

    def _replicate_for_data_parallel(self):
        """nn.DataParallel over several devices copies the model to each device at every forward and runs the
        copies in threads: their statistics would not reach the optimizer (over one device, or none, it calls
        the model itself, which trains)."""
        raise ConfigError("this compiled model is wrapped by nn.DataParallel over several devices, which copies it to "
                          "each device at every forward and runs the copies in threads, whose statistics would not "
                          "reach the optimizer; wrap it in DistributedDataParallel instead (README, 'Data-parallel "
                          "training'), or train on one device")

    def __getitem__(self, index):
        """`model[index]` of a container the model is (nn.Sequential; sentence-transformers' SentenceTransformer,
        whose GradCache losses read `model[0]`): the compiled module's item, a submodule sharing its parameters
        (as `model.<submodule>` is; calling it alone trains without gnfx's statistics)."""
        model = self._model
        if not hasattr(type(model), "__getitem__"):
            raise TypeError(f"'{type(self).__name__}' object is not subscriptable: nor is the {type(model).__name__} "
                            f"it was compiled from")
        return model[index]

    def __getattr__(self, name: str):
        """nn.Module's lookup (the shared parameters, buffers and submodules); an attribute only the
        compiled module has (a Hugging Face model's `config`, diffusers' `vae.encode`) is an AttributeError
        that says where it is, and why a method other than forward is no way to train through gnfx."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_compiled_from", (None,))[0]
            found = _MISSING if model is None else inspect.getattr_static(model, name, _MISSING)
            if found is _MISSING or name.startswith("__"):
                raise
        kind = type(model).__name__
        if callable(found):
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute {name!r}: gnfx's compiled model calls the forward "
                f"of the {kind} it was compiled from, and {name} is another method of it. Call it on that {kind}, "
                f"which shares its parameters and buffers with this model; a training call of it there runs "
                f"without gnfx's statistics, so to train through it (a reinforcement-learning agent's "
                f"get_action_and_value, a VAE's encode) name it at compile, gnfx.compile(model, ..., "
                f"methods=[{name!r}]), and call it on the compiled model, or write a module whose forward calls it "
                f"and compile that module. A library that calls the {kind}'s other methods and attributes itself "
                f"(stable-baselines3's policy) keeps the {kind}: give it the compiled model's training method and "
                f"optimizer instead (stable-baselines3's PPO: compiled = gnfx.compile(policy, ..., "
                f"methods=['evaluate_actions']); policy.evaluate_actions = compiled.evaluate_actions; "
                f"policy.optimizer = compiled.optimizer; README \"Training loops\")")
        raise AttributeError(
            f"'{type(self).__name__}' object has no attribute {name!r}: {name} is an attribute of the {kind} it was "
            f"compiled from, which the compiled model does not copy (it shares only the parameters, buffers and "
            f"submodules): read it from that {kind}")

    @torch.compiler.disable(reason="a dry run of the model's forward, once, before its first call")
    def _materialize(self, module, args, kwargs) -> None:
        """Before the first call of a model with lazy modules: their parameters materialized by a dry
        run on this call's inputs (gnfx.lazy_modules), before the quadratic step records the call's
        random state (its hooks run after this one) and before the capture reads the shapes."""
        if has_lazy_modules(self._model):
            materialize(self._model, args, kwargs)
        self._materializing.remove()

    def __deepcopy__(self, memo):
        """A deep copy of the module it was compiled from (_COPY says why), with a warning."""
        warnings.warn(_COPY, RuntimeWarning, stacklevel=3)
        return copy.deepcopy(self._model, memo)

    def __reduce_ex__(self, protocol):
        raise GnfxError(_NO_PICKLE)

    @property
    def graph_module(self):
        """The instrumented graph of the first capture."""
        return self._captured().graph_module

    @property
    def layers(self):
        """The LayerTable (before a lazy capture: a placeholder that says when capture happens)."""
        return self._variants.table if self._variants.captured else NotCaptured()

    def _captured(self):
        if not self._variants.captured:
            raise GnfxError(NOT_CAPTURED)
        return self._variants

    def forward(self, *args, **kwargs):
        return self._call(None, args, kwargs)

    def _method(self, method: str, *args, **kwargs):
        """A call of the model's method `method` that gnfx.compile(methods=...) names: served as a call of
        the forward is (gnfx.variants), the method's Python code running with the layers it calls tapped."""
        return self._call(method, args, kwargs)

    def _call(self, method: str | None, args: tuple, kwargs: dict):
        """A call of the forward (`method` None) or of the method `method`: a statistic call runs its
        instrumented graph (`_statistic_forward`), every other call the model's own code."""
        # eagerly, the switch is a plain call; while dynamo traces, a call outside its tracing
        statistic = self._traced_statistic_call() if torch.compiler.is_compiling() else self._statistic_call()
        out = self._statistic_forward(method, args, kwargs) if statistic else self._own(method)(*args, **kwargs)
        if self.optimizer.quadratic is not None and self.training and torch.is_grad_enabled():
            out = as_one_output(out)  # a list of chunks of one output, which the quadratic step reads: views of it
        return out

    def _own(self, method: str | None):
        """The model's own forward (its __call__, hooks included), or its class's method `method`, bound to it.
        A forward replaced on the module by the compiled model's raises a GnfxError (_PATCHED_FORWARD)."""
        if method is not None:
            return getattr(type(self._model), method).__get__(self._model)
        forward = self._model.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is type(self).forward:
            raise GnfxError(_PATCHED_FORWARD)
        return self._model

    def _statistic_call(self) -> bool:
        """Whether this call is a training call (training mode, gradients enabled) of a statistic
        step, or the first training call of a model captured lazily, which `_statistic_forward`
        serves; every other call runs the original forward.

        Under `torch.compile(compiled_model)` it runs outside dynamo's tracing (a graph break,
        `_traced_statistic_call`), so dynamo guards only on the boolean it returns, not on the step
        counter it reads: one graph in all, the original forward, compiled, instead of one per step.
        Eagerly it is a plain call (the disabled wrapper costs microseconds on every forward)."""
        return self.training and torch.is_grad_enabled() and (self.optimizer.statistic_step
                                                              or not self._variants.captured)

    @torch.compiler.disable(reason=_EAGER_REASON)
    def _traced_statistic_call(self) -> bool:
        """`_statistic_call` as dynamo sees it (module doc): a graph break, not a guard on the step."""
        return self._statistic_call()

    @torch.compiler.disable(reason=_EAGER_REASON)
    def _statistic_forward(self, method: str | None, args: tuple, kwargs: dict):
        """A training call of a statistic step, of the forward (`method` None) or of the method `method`: the
        registrations are checked and, when the plan collects statistics, the instrumented graph runs.
        Always eagerly, also inside `torch.compile(compiled_model)`: the taps record `a` with Python side
        effects and register the gradient hooks that record `δ`, which dynamo's tracing would drop or bake in."""
        opt = self.optimizer  # a training call (`_statistic_call`): training mode, gradients enabled
        if not self._variants.captured:  # lazy capture, from the first training call
            if method is None:
                self._variants.capture(args, kwargs)
            else:
                self._variants.capture_method(method)
        elif opt.collecting and method is None and not self._fsdp:  # a torch.fx graph checked on its first call
            self._variants.check_call(args, kwargs, fresh=opt.steps == 0 and not opt.collected)
        if opt.statistic_step:
            if opt.collecting and self._fsdp:
                unshard_for_graph(self)  # then the check binds the unsharded parameters in the graphs
            self._check_registrations()
        if opt.collecting:
            store = opt.statistics
            if store.fisher != "empirical" and self._fsdp:
                raise ConfigError(f"fisher={store.fisher!r} does not run under FSDP2 yet: its extra backward runs "
                                  f"inside yours, and fully_shard's post-backward hooks would free the parameters "
                                  f"that yours still needs; pass fisher='empirical' to gnfx.compile (step='quadratic' "
                                  f"defaults to 'mc')")
            store.forward_id += 1
            opt.note_statistic_forward()
            opt.collected = True
            out = self._variants(args, kwargs) if method is None else self._variants.call_method(method, args, kwargs)
            opt.note_forward_written()
            out = as_one_output(out)  # a list of chunks of one output: views of it, which the watch hooks
            watch_output(out, store, self._settings, opt.layouts, ignored_rows=method is None)
            if not opt.bounds_final:  # the first statistic forward: its rows, before its backward
                opt.bound_factors_at_rows()
            return out
        return self._own(method)(*args, **kwargs)

    @property
    def _fsdp(self) -> bool:
        """Whether fully_shard was applied to this model or its blocks (gnfx.fsdp)."""
        return bool(fsdp_modules(self))

    def _check_registrations(self) -> None:
        """Raise a GnfxError naming every trainable parameter replaced, removed or added since
        gnfx.compile (`model.fc.weight = nn.Parameter(...)`): the optimizer keeps the Parameter objects
        of compile time, so a new one would silently never train. Buffers and frozen parameters
        reassigned since (`model.mask = new_tensor`) are re-bound in the instrumented graphs, which
        hold the tensors they were traced with, so that they compute what the original forward does;
        so are the tensors that torch.func.functional_call puts in place of trainable parameters for one
        call (plain tensors, not Parameters: a MAML inner loop's fast weights θ - α∇θ), whose statistics
        are then those of the blocks at these values, and the next statistic forward binds the parameters
        back. Run on statistic steps only (a walk over the module tree)."""
        compiled = self.optimizer.parameter_store.named
        current = dict(self._model.named_parameters(remove_duplicate=False))
        known, present = {id(p) for p in compiled.values()}, {id(p) for p in current.values()}
        # (a tensor that is no Parameter in a parameter's place: functional_call's, for this call)
        gone = [n for n, p in compiled.items() if id(p) not in present and isinstance(current.get(n), (nn.Parameter,
                                                                                                       type(None)))]
        new = [n for n, p in current.items() if p.requires_grad and isinstance(p, nn.Parameter) and id(p) not in known
               and n not in gone]
        if (gone or new) and not self._fsdp:  # FSDP2's swaps are checked by gnfx.fsdp.ShardedStep
            what = [f"{n!r} was {'replaced' if n in current else 'removed'}" for n in gone]
            what += [f"{n!r} was created, replaced or unfrozen" for n in new]
            raise GnfxError(
                f"parameter{'s' * (len(what) > 1)} changed after gnfx.compile: {'; '.join(what)}. The optimizer "
                f"and the statistics hold the trainable parameters the model had at compile time, so a new "
                f"Parameter object would not be trained. Fix: change values in place (with torch.no_grad(): "
                f"model.<name>.copy_(new_value)), or set requires_grad and build every layer before calling "
                f"gnfx.compile, and compile the model again after changing its parameters"
                + (f". To train some layers only for a while (a backbone frozen for the first epochs, then "
                   f"unfrozen), compile with them trainable and freeze them after gnfx.compile "
                   f"(module.requires_grad_(False)): a parameter without a gradient keeps its value, and "
                   f"requires_grad_(True) trains it again" if new else ""))
        tensors = {**dict(self._model.named_buffers(remove_duplicate=False)), **current}
        for gm in self._variants.graphs():
            held = [(n, t, "_parameters") for n, t in gm.named_parameters(remove_duplicate=False)]
            held += [(n, t, "_buffers") for n, t in gm.named_buffers(remove_duplicate=False)]
            for name, t, registry in held:
                now = tensors.get(name)
                if now is not None and now is not t:
                    owner, _, field = name.rpartition(".")
                    getattr(gm.get_submodule(owner), registry)[field] = now

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but checked first: a checkpoint of another architecture (missing or
        unexpected keys, other shapes) raises a ConfigError naming them and loads nothing. An
        uninitialized parameter of a lazy module takes the checkpoint's shape (torch materializes it)."""
        own = self.state_dict()
        problems = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
                    for k, v in state_dict.items() if k in own and hasattr(v, "shape") and not is_lazy(own[k])
                    and v.shape != own[k].shape]
        if strict:
            problems += [f"{k}: missing from the checkpoint" for k in own if k not in state_dict]
            problems += [f"{k}: not in this model" for k in state_dict if k not in own]
        if problems:
            raise ConfigError("the checkpoint does not fit this model (nothing was loaded): " + "; ".join(problems[:10])
                              + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .double() and the like: the parameters move in place (the same Parameter
        objects), and the statistics and the optimizer's state follow them."""
        super()._apply(fn, recurse)
        if self.optimizer.statistics is not None:
            self.optimizer.statistics.follow_parameters()
            self.optimizer.follow_parameters()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._model.training = mode
        for gm in self._variants.graphs():
            gm.training = mode
        return self

    # --- training --------------------------------------------------------------------------
    def step(self, closure=None):
        """One optimizer step (same as `model.optimizer.step()`)."""
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def optimizer_for(self, params, **settings) -> torch.optim.Optimizer:
        """`model.optimizer`, its param groups made from `params` with `settings` (lr, weight_decay, betas,
        eps; GnfxOptimizer.regroup): the optimizer class for a training framework that builds its optimizer
        from a class and the model's parameters, `NeuralNetClassifier(model, optimizer=model.optimizer_for,
        lr=...)` (skorch), `Learner(dls, model, opt_func=partial(OptimWrapper, opt=model.optimizer_for))`
        (fastai). The framework's lr and its schedule then set the groups' lr as they would a torch optimizer's."""
        self.optimizer.regroup(params, **settings)
        return self.optimizer

    # --- inspection ------------------------------------------------------------------------
    def statistics(self, name: str) -> dict[str, torch.Tensor]:
        """The averaged statistics of block `name`: "A", "S" and/or "diag" (see gnfx.statistics).

        Raises a StatisticsError (a KeyError) for an unknown block, a block that collects no
        statistics under this plan, and before the first statistic step, when there are none yet;
        a GnfxError before a lazily captured model's first call."""
        self._captured()
        if name not in self.layers:
            raise StatisticsError(f"no block named {name!r}; blocks are {[b.name for b in self.layers]}")
        store = self.optimizer.statistics
        if name not in store.blocks:
            raise StatisticsError(f"block {name!r} collects no statistics under this plan; ask for them with "
                                  f"gnfx.compile(..., statistics=('A', 'S'))")
        if not store[name].values:
            raise StatisticsError(
                f"block {name!r} has no statistics yet: they exist after the first statistic step, a step() "
                f"after a forward in training mode with gradients enabled whose backward reached the block "
                f"(statistic steps are every stat_every={self.optimizer.stat_every} steps, from the first)")
        return dict(store[name].values)

    @property
    def update_code(self) -> str:
        """The source of the generated update function, plus the elementwise steps it leaves out."""
        self._captured()
        opt = self.optimizer
        lines = [opt.update_function.source]
        for pre in opt.elementwise:
            n = len(pre.param_names) + sum(len(b.params) for b in pre.blocks)
            lines.append(f"# then {pre.name}: torch._foreach AdamW-style step over {n} parameter tensors")
        return "\n".join(lines)

    def cost(self, batch_size: int | None = None, positions=None, world_size: int = 1):
        """Memory and amortized FLOPs of this plan per block and in total, with their sympy
        formulas (gnfx.plan_cost.plan_cost; B defaults to the `cost_rows` setting, R to 1 per call site);
        `world_size` W: the state each rank keeps under FSDP2, `rank_memory_bytes` (gnfx.fsdp)."""
        self._captured()
        return plan_cost(self.layers, self.optimizer, self._settings, batch_size, positions, world_size)

    def report(self) -> str:
        return report(self)

    def __repr__(self) -> str:
        return report(self)

    def to_networkx(self):
        return graph_view.to_networkx(self.graph_module)

    def to_dot(self) -> str:
        return graph_view.to_dot(self.graph_module)
