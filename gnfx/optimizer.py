"""`GnfxOptimizer`: the torch.optim.Optimizer that runs the plan's preconditioners.

One step: fold the statistics collected on this step into their averages, run the amortized
refresh of each curvature preconditioner when it is due, run the generated update function
(gnfx.codegen) for the curvature preconditioners, and the diagonal preconditioner's foreach step;
a weight-normed (or spectrally normed) block is stepped in its weight's space, gathered before and
scattered to its parameters after (gnfx.reparametrization).
Per-group `lr` and `weight_decay` work as in any torch optimizer (LR schedulers included), and
`state_dict()` carries every moment, factor, statistic and counter, so a run resumed from a
checkpoint continues exactly like the uninterrupted one.

The plan bounds K-FAC's big factors at gnfx.compile's `cost_rows` before any batch is seen; without
cost_rows given, the end of the first statistic forward plans them again at the rows each block saw,
before anything is accumulated (`bound_factors_at_rows`).

A step when no parameter has a gradient (`.grad` None everywhere: no backward since the last
`zero_grad()`) does nothing, as in torch.optim: no parameter, counter or schedule moves, and the
statistics collected since the last step stay pending for the next step that has gradients.
A statistic step whose gradients reached curvature blocks while no training call of the compiled
model ran since the last step (the module it was compiled from was called, or one of its methods
other than forward, or the compiled model in eval mode) steps on statistics that did not see that
batch, and warns once, naming the fix (`_warn_untapped`).

Under torch.amp.GradScaler (`scaler.step(optimizer)`) the step unscales the gradients itself
(`_step_supports_amp_scaling`: the scaler hands it `grad_scale` and `found_inf`; `grad_scale` is
None when `scaler.unscale_(optimizer)` divided them already, for clipping, and the scale s is then
read from the scaler whose step() runs this one). What the plan read from the scaled backward
carries s too, and is divided by it here: this step's statistics by s to the power of δ in them
(gnfx.statistics: S and the diagonals s², rank1's gradient s; none with a true Fisher, whose backward
is gnfx's own), the quadratic step's output gradient by s, and the checks of the gradient at z that
loss= makes (gnfx.output_watch) run on the gradient divided by s. One step's backwards share one s
(the scaler moves it in `scaler.update()`, after the step), so training with the scaler is training
without it (exactly for a power-of-two scale, GradScaler's default). A step whose gradients are not
finite is skipped as torch.optim's is: no parameter, counter or schedule moves, and the statistics
and checks of its backward are dropped (that step is collected again).
"""
from __future__ import annotations

import sys
import warnings

import torch

from gnfx.checkpoint import check_checkpoint, restore_dtypes
from gnfx.codegen import UpdateFunction
from gnfx.distributed import Communicator
from gnfx.errors import ConfigError, GnfxError, NoCostModel
from gnfx.fsdp import ShardedStep, local
from gnfx.output_watch import check_outputs_at_step
from gnfx.outputs import LogitsLayout
from gnfx.parameter_store import ParameterStore
from gnfx.plan_cost import plan_cost
from gnfx.preconditioners.base import STATISTIC_SETTINGS, collects_statistics
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.quadratic_step import QuadraticStep
from gnfx.report import format_bytes


def _stepping_scaler() -> torch.amp.GradScaler:
    """The torch.amp.GradScaler whose step() calls the optimizer's (through torch.optim's wrappers of
    step, on the same thread): `self` of the innermost frame of a GradScaler's step on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "step" and isinstance(frame.f_locals.get("self"), torch.amp.GradScaler):
            return frame.f_locals["self"]
        frame = frame.f_back
    raise GnfxError("the optimizer was stepped with found_inf set and grad_scale None, as torch.amp.GradScaler.step "
                    "does after scaler.unscale_(optimizer), but no GradScaler's step() is on the call stack to read "
                    "the loss scale from, which gnfx's statistics and quadratic step need to undo. Fix: step through "
                    "torch.amp.GradScaler (scaler.step(optimizer)), or leave grad_scale set to the loss scale")


# a block's optimizer state is outsized (`GnfxOptimizer._warn_outsized_state`) above these bytes and this multiple of
# its parameters' bytes: Shampoo's on a V x d table of d = 16 is 1024/16 = 64 times; on a square layer at most 4-6
OUTSIZED_STATE = 2 ** 28
OUTSIZED_RATIO = 32

_BUILT_BY_COMPILE = (
    "GnfxOptimizer is built by gnfx.compile, which captures the model whose layers its statistics come from; it "
    "cannot be built from parameters and an lr as torch.optim's optimizers are (a library's optimizer class, "
    "stable-baselines3's policy_kwargs=dict(optimizer_class=...)). Fix: compiled = gnfx.compile(model, ...) and "
    "hand the library compiled.optimizer (stable-baselines3's PPO: compiled = gnfx.compile(policy, ..., "
    "methods=['evaluate_actions']); policy.evaluate_actions = compiled.evaluate_actions; policy.optimizer = "
    "compiled.optimizer; README \"Training loops\")")


class GnfxOptimizer(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # torch.amp.GradScaler: `_unscale` (module doc)

    def __init__(self, named_params: dict, settings: dict | None = None, defaults: dict | None = None, **torch_style):
        """An optimizer over `named_params` (one parameter group, as any torch optimizer); it steps
        once `attach` has given it the plan's preconditioners, at the model's capture (gnfx.compile,
        or the first call of a model captured lazily), so that LR schedulers and param_groups can be
        set up in between. Its components read the parameters, their state and param groups from
        `parameter_store` (gnfx.parameter_store), and are given the statistics, the communicator and
        the step count as arguments. Built as torch.optim's optimizers are, from parameters and an lr
        (a library's optimizer class: stable-baselines3's `policy_kwargs=dict(optimizer_class=...)`), it
        raises a GnfxError naming gnfx.compile."""
        if not isinstance(named_params, dict) or settings is None or defaults is None or torch_style:
            raise GnfxError(_BUILT_BY_COMPILE)
        named_params = dict(named_params)
        super().__init__(list(named_params.values()), defaults)
        self.parameter_store = ParameterStore(named_params, self.state, self.param_groups)
        self.statistics = None
        self.stat_every = settings["stat_every"]
        self.stat_decay = settings["stat_decay"]
        self.refresh_warmup = settings["refresh_warmup"]
        self.steps = 0
        self.skipped_steps = 0
        self._betas_seen, self._momentum_warned = None, False  # the groups' betas[0] at the last step, warned once
        self._group_setting_warned = False  # a param group set one of gnfx.compile's settings (warned once)
        # the parameters' version counters and the smallest one's value at the last statistic forward since the
        # last step (None: none yet), whether they were written between two of those forwards since the last step,
        # and whether that was said (note_statistic_forward)
        self._forward_versions, self._written_between_forwards, self._stepped_by_another_warned = None, False, False
        self.nan_policy = settings["nan_policy"]
        self._settings = settings
        # gnfx.compile's settings that are not per group, which a param group may not set
        # (`_warn_if_compile_setting_in_group`; momentum: also under "diag"); once, off the step's path
        self._compile_only = frozenset((set(settings) | {"momentum"}) - set(defaults))
        self._distributed = settings["distributed"]
        self._comm = None
        self.live_params = None  # set by CompiledModel: the model's current parameters, by name
        self.collected = False  # set by the compiled model when a forward ran with taps
        self.plan = None  # the gnfx.plan.Plan, given by `attach`
        # whether the factor bounds are final: compared with (and, without cost_rows given, planned at) the
        # rows of the first statistic forward (`bound_factors_at_rows`), or a checkpoint's
        self.bounds_final = False
        self._pending_checkpoint = None  # a state_dict loaded before `attach`, loaded by it
        self.preconditioners = self.curvature = self.elementwise = []
        self.update_function = None
        # the classes' axis of a cross-entropy's logits, told by their first gradient: one per output loss= names
        # (gnfx.output_losses), `logits` the first output's
        self.layouts = [LogitsLayout() for _ in settings["losses"] or (None,)]
        self.logits = self.layouts[0]
        # step="quadratic": α, μ and λ from the exact GGN model around the chain's proposal
        self.quadratic = (QuadraticStep(self.parameter_store, settings["losses"], self.layouts,
                                        damping=settings["initial_damping"], decay=settings["damping_decay"],
                                        capped=settings["lr_cap"], rows=settings["quadratic_rows"],
                                        every=settings["damping_every"], solve_every=settings["quadratic_every"],
                                        momentum=settings["quadratic_momentum"],
                                        products=settings["quadratic_products"])
                          if settings["step"] == "quadratic" else None)

    def attach(self, plan, statistics) -> None:
        """Build the preconditioners of `plan` (a gnfx.plan.Plan) over the statistics store the taps
        fill; each gets its hyperparameters with the statistics settings (STATISTIC_SETTINGS)."""
        self.plan, self.statistics = plan, statistics
        self._build_preconditioners()
        self._warn_outsized_state()
        self._warn_quadratic_step_without_curvature()
        if self._pending_checkpoint is not None:
            checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
            self.load_state_dict(checkpoint)

    def _build_preconditioners(self) -> None:
        """The plan's preconditioners (`Plan.specs()`: (class, hparams, blocks, loose parameter names)
        each), and the update function that runs them."""
        specs = self.plan.specs()
        # reparametrized (weight- or spectrally normed) blocks step their W (gnfx.reparametrization)
        self.parameter_store.reparametrize([b.reparametrization for _, _, blocks, _ in specs
                                            for b in blocks if b.reparametrization is not None])
        shared = {k: self._settings[k] for k in STATISTIC_SETTINGS}
        self.preconditioners = [cls({**hp, **shared}, blocks, params, self.parameter_store)
                                for cls, hp, blocks, params in specs]
        for pre in self.preconditioners:
            pre.publish_bases(self.statistics)
        self.curvature = [p for p in self.preconditioners if isinstance(p, CurvaturePreconditioner)]
        self.elementwise = [p for p in self.preconditioners if not isinstance(p, CurvaturePreconditioner)]
        self.update_function = UpdateFunction(self.curvature, self.parameter_store, self._settings["compile"])

    def _warn_quadratic_step_without_curvature(self) -> None:
        """Warn, once the plan is built, when the optimizer asked for curvature blocks (kfac, ekfac, ...) under the
        quadratic step without an lr (kfac's default with loss=) and the plan has none: every parameter falls back
        to the diagonal preconditioner, so the step is Adam's direction at the length of each batch's quadratic
        model, which fits that batch and can raise the loss of the others (benchmarks/results/defaults.md,
        "diag:step=quadratic where no parameter is in a block"). Not for optimizer="diag", which asked for that."""
        settings = self._settings
        if self.curvature or settings["step"] != "quadratic" or settings["lr_cap"] or not settings["curvature_asked"]:
            return
        warnings.warn("gnfx: no parameter of the model is in a curvature block, so without an lr the step is the "
                      "diagonal preconditioner's (Adam's) direction at the length the quadratic model of each batch "
                      "chooses, which fits that batch and can raise the loss of the others (a small complex-weight "
                      "classifier held as real numbers: 2.36 to 66 in 40 steps). Fix: pass an lr "
                      "(gnfx.compile(model, ..., lr=1e-3): Adam's step on these parameters), or make the layers "
                      "curvature blocks (the coverage warning and print(model) say why they are not)",
                      RuntimeWarning, stacklevel=4)

    def _warn_outsized_state(self) -> None:
        """Warn, once the plan is built, naming the blocks whose optimizer state exceeds OUTSIZED_STATE bytes and
        OUTSIZED_RATIO times their parameters' (gnfx.plan_cost): Shampoo or SOAP on a big table, a V x d embedding
        of small d whose V is not above their diagonal_above, keeps V/max_block factors of max_block² over its row
        dimension (a 265k x 16 table: 5 GB against 17 MB, and a refresh of minutes;
        benchmarks/results/first_contact_12_recsys.md), which nothing else in the model needs."""
        try:
            costs = plan_cost(self.plan.table, self, self._settings).rows
        except NoCostModel:  # a preconditioner without cost formulas: its state is unknown (the report says so)
            return
        rows = [r for r in costs if r.memory_bytes > OUTSIZED_STATE and r.memory_ratio > OUTSIZED_RATIO]
        if not rows:
            return
        listed = "; ".join(f"{r.name} ({r.preconditioner}): {format_bytes(r.memory_bytes)} of state for "
                           f"{format_bytes(r.param_bytes)} of parameters" for r in rows[:3])
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        first = rows[0].name
        warnings.warn(f"gnfx: the optimizer state of some blocks is far larger than their parameters ({listed}{more}), "
                      f"and its refresh costs as much more. Shampoo and SOAP keep a factor per block of max_block rows "
                      f"along each dimension up to their diagonal_above, the rows of a large embedding table included. "
                      f"Fix: give such a block a cheaper preconditioner, optimizer={{{first!r}: 'kfac', '*': ...}} "
                      f"(K-FAC's factor over an embedding's rows is diagonal) or 'diag', a diagonal_above below the "
                      f"table's rows (Shampoo's factor over them diagonal, SOAP's rows unrotated), or optimizer='auto', "
                      f"which weighs the cost; model.cost() lists every block's state", RuntimeWarning, stacklevel=4)

    def bound_factors_at_rows(self) -> None:
        """At the end of the first statistic forward, before its backward accumulates any statistic:
        re-plan the factor bound of each block whose preconditioner bounds it smaller at the rows its
        call sites saw on this forward, where that pays (gnfx.plan `Plan.bounds_at_rows`: for K-FAC, where
        applying the planned blocks costs over 4x the layer's own products and the smaller ones save
        10⁹ FLOPs a step). The plan was made at cost_rows rows per call site before any batch was seen;
        the re-planned blocks are those gnfx.compile(..., cost_rows=<their rows per call site>) gives, and
        so is the training from here on: their statistics, the preconditioners and the update function
        are laid out anew before anything is accumulated. With cost_rows given (the plan is the user's),
        and under torch.distributed (ranks may see different rows and must keep one plan), it warns
        instead, naming the cost_rows to pass. With gradient accumulation the rows are the first
        micro-batch's."""
        self.bounds_final = True
        seen = {name: stats.staged_rows() for name, stats in self.statistics.blocks.items()}
        per_site = {name: max(1, rows // len(self.plan.table[name].sites)) for name, rows in seen.items() if rows}
        smaller = {name: bound for name, bound in self.plan.bounds_at_rows(per_site, self._settings).items()
                   if bound[2] is not None}
        if not smaller:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not self._settings["cost_rows_given"] and not distributed:
            self._rebound(smaller)
            return
        listed = "; ".join(f"{name}: {rows} rows, blocks of at most {self.plan.table[name].max_factor} planned, "
                           f"{bound} at these rows" for name, (bound, _, rows) in list(smaller.items())[:3])
        more = f" and {len(smaller) - 3} more" if len(smaller) > 3 else ""
        why = ("cost_rows was given, so the plan is kept" if self._settings["cost_rows_given"] else
               "under torch.distributed the plan is kept (its ranks could see different rows)")
        warnings.warn(f"gnfx: the factor blocks were planned for cost_rows={self._settings['cost_rows']} rows per call "
                      f"site, and the first statistic forward saw far fewer, at which applying them costs several "
                      f"times the layers' own products ({listed}{more}); {why}. Pass cost_rows="
                      f"{min(rows for *_, rows in smaller.values())} to gnfx.compile (the rows per call site of a "
                      f"statistic step: examples x positions) for smaller blocks and a cheaper step; print(model) "
                      f"shows the blocks", RuntimeWarning, stacklevel=4)

    def _rebound(self, bounds: dict) -> None:
        """Re-plan the factor bounds of the blocks in `bounds` (gnfx.plan `Plan.rebound`): the plan's
        table, their statistics' accumulators and the preconditioners and update function built anew
        (the curvature preconditioners' state of the former blocking dropped, as their groups change)."""
        for pre in self.curvature:
            for group in pre.groups:
                holder = self.parameter_store.state_of(pre.state_holder[group.key])
                for key in [k for k in holder if k.startswith(group.key + ".")]:
                    del holder[key]
        self.plan.rebound(bounds)
        for name in bounds:
            if name in self.statistics.blocks:
                self.statistics[name].lay_out(self.plan.table[name])
        self._build_preconditioners()

    @property
    def attached(self) -> bool:
        """Whether the plan's preconditioners are built (the model is captured)."""
        return self.statistics is not None

    def _bind_sharded(self) -> None:
        """On the first step after fully_shard: run the step on the shards (gnfx.fsdp). Checked on
        the first step and then on statistic steps under torch.distributed (a walk over the model's
        parameters: 0.5 ms a step for a 12-layer GPT-2 under DDP), so that sharding after the first
        step raises within stat_every steps."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        due = self.steps == 0 or self.statistic_step
        if self.sharded is None and self.live_params is not None and distributed and due:
            live = self.live_params()
            if any(isinstance(p, torch.distributed.tensor.DTensor) for p in live.values()):
                reparametrized = list(self.parameter_store.reparametrizations)
                if reparametrized:
                    raise ConfigError(
                        f"reparametrized layers (weight-normed layers, spectrally normed ones: "
                        f"{', '.join(repr(rp.weight) for rp in reparametrized)}) are curvature blocks stepped in "
                        f"their weight's space (gnfx.reparametrization), which gnfx's FSDP2 step does not do yet: "
                        f"remove them from the model before gnfx.compile "
                        f"({'; '.join(rp.removal for rp in reparametrized)}), "
                        f"then compile and fully_shard it, or do not shard the model")
                sharded = ShardedStep(self.parameter_store, live, self.steps, self.comm, self.statistics,
                                      self.curvature, self.elementwise)
                self.parameter_store.sharded = sharded
                self.curvature = sharded.curvature
                self.update_function = UpdateFunction(self.curvature, self.parameter_store,
                                                      self.update_function.setting)

    @property
    def sharded(self):
        """The gnfx.fsdp.ShardedStep once the parameters are FSDP2 DTensors, else None."""
        return self.parameter_store.sharded

    @property
    def last_step(self) -> dict:
        """α, μ, λ ("damping"), ρ, the predicted and actual reductions of the last step, how many
        shorter retries it took ("backtracks"), whether it solved its model ("solved"), the factor τ of
        the loss-floor cap ("floor_scale", 1: not shortened), the factor of the expansion ("expansion",
        2: taken at twice its length, 1: not) and whether it was rejected
        (gnfx.quadratic_step); {} with step="lr"."""
        return self.quadratic.last_step if self.quadratic is not None else {}

    @property
    def comm(self):
        """The gnfx.distributed.Communicator when running on several processes, else None."""
        if self._comm is None and self._distributed != "off" and Communicator.active():
            self._comm = Communicator(partition_refresh=self._distributed == "partitioned")
        return self._comm

    def follow_parameters(self) -> None:
        """Move the state with the parameters, which the model's .to(), .cuda() or .double() moved
        after steps were taken (gnfx.compiled.CompiledModel._apply): each preconditioner's to the
        device and dtype it keeps it in for the parameters as they are now, the update function's
        buffers made again, and the quadratic step's δ with them."""
        for pre in self.preconditioners:
            pre.follow_parameters()
        if self.update_function is not None:
            self.update_function = UpdateFunction(self.curvature, self.parameter_store, self.update_function.setting)
        if self.quadratic is not None:
            self.quadratic.follow_parameters()

    def state_of(self, name: str) -> dict:
        """The optimizer state of parameter `name` (its moments, factors and counters)."""
        return self.parameter_store.state_of(name)

    @property
    def state(self) -> dict:
        """torch.optim's per-parameter state (moments, factors, counters), which `state_dict` carries."""
        return self.__dict__["state"]

    @state.setter
    def state(self, state: dict) -> None:
        """A new state container (fastai's `OptimWrapper.clear_state`, run by `Learner.freeze`/`unfreeze`,
        assigns an empty one) is the one the steps read and write from then on, as for a torch optimizer:
        the per-parameter state starts again from nothing, and `state_dict` saves what the steps keep."""
        self.__dict__["state"] = state
        if "parameter_store" in self.__dict__:
            self.parameter_store.bind(state, self.param_groups)

    def __setstate__(self, state: dict) -> None:
        """torch's `load_state_dict` replaces `state` and `param_groups` by new containers: the
        parameter store reads the new ones."""
        super().__setstate__(state)
        if "parameter_store" in self.__dict__:
            self.parameter_store.bind(self.state, self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        """A group of the compiled model's own parameters (moved out of their group first, as in
        any torch optimizer); a parameter gnfx did not plan at compile time is refused."""
        if hasattr(self, "parameter_store"):
            known = {id(p) for p in self.parameter_store.named.values()}
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            strangers = [p for p in params if id(p) not in known]
            if strangers:
                raise ConfigError(f"add_param_group got {len(strangers)} parameter(s) that were not trainable "
                                  f"when the model was compiled; gnfx plans every parameter at compile time: "
                                  f"set requires_grad before gnfx.compile, or compile again. To train some "
                                  f"layers only for a while (a backbone unfrozen after the first epochs), compile "
                                  f"with them trainable and freeze them after gnfx.compile "
                                  f"(module.requires_grad_(False)): a parameter without a gradient keeps its value, "
                                  f"and requires_grad_(True) trains it again")
        super().add_param_group(param_group)

    def note_statistic_forward(self) -> None:
        """At a statistic forward: warn, once, when a parameter was written since the last statistic forward
        and this optimizer was not stepped in between: another optimizer steps the compiled model (a framework's
        own, which `learn.model = gnfx.compile(...)` without fastai's opt_func keeps, or skorch's
        optimizer=torch.optim.SGD), so gnfx's preconditioner is not used and its statistics are collected for
        nothing (a model no gnfx step ever moved stays at step 0, a statistic step, so each of its training
        forwards is one). Written: a version counter moved (torch.optim's in-place updates), or the value of the
        smallest parameter changed (fastai's optimizers write `p.data`, whose writes no counter sees; one small
        copy a statistic forward). Gradient accumulation writes no parameter between its forwards. A write is said
        when it happens a second time before this optimizer steps: once may be a perturbation its step follows,
        sharpness-aware minimization's (composer's SAM: `p.add_(e)` between its closure's two forwards, `p.sub_(e)`
        and the wrapped optimizer's step after), which a framework's own optimizer, stepping after each forward,
        repeats at the next forward."""
        if not self.parameter_store.named:
            return
        now = self._parameter_marks()
        seen, self._forward_versions = self._forward_versions, now
        if seen is None or self._stepped_by_another_warned or (seen[0] == now[0] and torch.equal(seen[1], now[1])):
            return
        written_before, self._written_between_forwards = self._written_between_forwards, True
        if not written_before:
            return
        self._stepped_by_another_warned = True
        warnings.warn("gnfx: the compiled model's parameters were written between two of its training forwards "
                      "without a step of its optimizer: another optimizer steps them (a framework's own, as fastai's "
                      "default opt_func after `learn.model = gnfx.compile(...)`, skorch's optimizer=torch.optim.SGD, "
                      "or a torch optimizer made from model.parameters()), so gnfx's preconditioner is not used and "
                      "its statistics are collected for nothing. Step model.optimizer, or hand a framework that builds "
                      "its own optimizer model.optimizer_for (README, Training loops)", RuntimeWarning, stacklevel=4)

    def note_forward_written(self) -> None:
        """After a statistic forward: the parameters as it left them are those the next one compares with, so that
        the forward's own writes are none between forwards (an embedding's max_norm renormalizes the rows it reads
        in place, as eager's forward does: gradient accumulation's second forward would see the first's)."""
        if self._forward_versions is not None:
            self._forward_versions = self._parameter_marks()

    def _parameter_marks(self) -> tuple[list[int], torch.Tensor]:
        """(each trained parameter's version counter, a copy of the smallest one's value): what
        note_statistic_forward compares."""
        named = self.parameter_store.named
        smallest = min(named.values(), key=torch.Tensor.numel)
        return [p._version for p in named.values()], local(smallest).detach().clone()

    def _warn_if_momentum_scheduled(self) -> None:
        """Warn, once, when a param group's betas[0] moves (a momentum schedule: torch's OneCycleLR and CyclicLR
        with cycle_momentum=True, fastai's fit_one_cycle, each cycling betas[0] of an optimizer whose groups
        have betas) under a plan with curvature preconditioners: they read only lr and weight_decay from the
        groups, so the schedule reaches Adam's β1 of the parameters outside their blocks (the diagonal
        preconditioner) and nothing else; the blocks' momentum is gnfx.compile's momentum= (or the μ the
        quadratic-model step solves for)."""
        firsts = [g["betas"][0] for g in self.param_groups]
        seen, self._betas_seen = self._betas_seen, firsts
        moved = [(a, b) for a, b in zip(seen or firsts, firsts) if a != b]
        if not self.curvature or self._momentum_warned or not moved or len(seen) != len(firsts):
            return  # (a param group added or removed is no schedule)
        self._momentum_warned = True
        params = self.parameter_store.named
        blocked = sum(params[n].numel() for pre in self.curvature for b in pre.blocks for n in b.held_params)
        total = sum(p.numel() for p in params.values())
        mus = ("μ, solved by the quadratic-model step" if self.quadratic is not None else
               ", ".join(f"{pre.name}'s μ={pre.hp.get('momentum', 0):g}" for pre in self.curvature) +
               ": gnfx.compile's momentum=")
        warnings.warn(f"gnfx: a param group's betas[0] moved from {moved[0][0]:g} to {moved[0][1]:g} (a momentum "
                      f"schedule: OneCycleLR or CyclicLR with cycle_momentum=True, fastai's fit_one_cycle), which is "
                      f"Adam's β1 of the parameters outside the curvature blocks only ({total - blocked} of {total} "
                      f"entries); the blocks' momentum does not follow it ({mus}). To schedule only the lr: "
                      f"cycle_momentum=False (torch), fit_one_cycle(moms=(m, m, m)) (fastai)", RuntimeWarning,
                      stacklevel=3)

    def _warn_if_compile_setting_in_group(self) -> None:
        """Warn, once, when a param group holds one of gnfx.compile's settings that are not per group (`momentum`,
        `damping`, `stat_decay`, ...: any but lr, weight_decay, betas and eps), which no part of the step reads from
        the groups: a scheduler of that name wrote it (pytorch-ignite's `LinearCyclicalScheduler(optimizer,
        "momentum", ...)` and its other ParamSchedulers set `group[name]` whatever the optimizer reads, as torch's
        optimizers silently ignore too), so the schedule would change nothing, silently. `regroup` refuses them
        when a framework hands them over at construction."""
        if self._group_setting_warned:
            return
        written = sorted({k for g in self.param_groups for k in g} & self._compile_only)
        if not written:
            return
        self._group_setting_warned = True
        values = ", ".join(f"{k}={self._settings[k]!r}" if k in self._settings else
                           f"no {k} (the diagonal preconditioner's momentum is Adam's β1, betas[0])" for k in written)
        warnings.warn(f"gnfx: a param group sets {', '.join(written)} (a scheduler of that name, as pytorch-ignite's "
                      f"ParamScheduler(optimizer, {written[0]!r}, ...), writes group[{written[0]!r}]), which gnfx's step "
                      f"does not read from the groups: it reads {', '.join(self.defaults)} there and has {values} from "
                      f"gnfx.compile for the whole run, so the schedule changes nothing. Schedule lr, weight_decay or "
                      f"betas, or set the value in gnfx.compile", RuntimeWarning, stacklevel=3)

    def regroup(self, params, **settings) -> None:
        """The param groups made again from `params`, torch.optim's first argument (an iterable of parameters,
        or of param group dicts), with `settings` (lr, weight_decay, betas, eps) as the defaults each group
        takes where it sets none, as a torch optimizer built from them would have: what a training framework
        that builds its optimizer from a class and the parameters asks for (skorch's `optimizer(param_groups,
        lr=...)`, fastai's `OptimWrapper(params, opt=...)`). Every parameter planned at compile time must be
        in a group, each once; a parameter that does not require a gradient is left out (no backward gives it
        one, so no optimizer steps it: skorch hands over the frozen ones too). The state is kept. A framework
        that builds one optimizer per parameter (pyro.optim.PyroOptim: `optimizer([p], **args)` for each p)
        hands over a single parameter: its error says so and names the loop that steps the model instead."""
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ConfigError(f"the compiled model's optimizer takes {', '.join(self.defaults)} per param group, not "
                              f"{', '.join(unknown)}: gnfx's other hyperparameters (momentum, damping, ...) are "
                              f"gnfx.compile's, e.g. gnfx.compile(model, 'kfac', lr=..., momentum=...)")
        params = list(params)
        groups = [g if isinstance(g, dict) else None for g in params]
        if not params or (None in groups and any(groups)):
            raise ConfigError("regroup expects a non-empty iterable of parameters or of param group dicts, as a "
                              "torch optimizer takes")
        groups = groups if groups[0] is not None else [{"params": params}]
        planned = {id(p): n for n, p in self.parameter_store.named.items()}
        per_parameter = (
            f" A single tensor was handed over of the {len(planned)} parameters planned: a framework that builds one "
            f"optimizer per parameter (pyro.optim's PyroOptim calls optimizer([p], **args) for each p of pyro's "
            f"param store) cannot be given the compiled model's one optimizer. Step it yourself after your loss's "
            f"backward (pyro: loss = Trace_ELBO().differentiable_loss(model, guide, x); loss.backward(); "
            f"compiled.step(); compiled.zero_grad()), and the parameters outside the compiled model with an "
            f"optimizer of their own" if len(planned) > 1 and len(params) == 1 and isinstance(params[0], torch.Tensor)
            else "")
        made, handed = [], set()
        for group in groups:
            unknown = sorted(set(group) - {"params", *self.defaults})
            if unknown:
                raise ConfigError(f"a param group sets {', '.join(unknown)}; the compiled model's optimizer takes "
                                  f"{', '.join(self.defaults)} per group (its other hyperparameters are "
                                  f"gnfx.compile's)")
            tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
            strangers = [p for p in tensors if id(p) not in planned and p.requires_grad]
            if strangers:
                raise ConfigError(f"{len(strangers)} trainable tensor(s) of shape(s) "
                                  f"{[tuple(p.shape) for p in strangers[:3]]} are no parameter of the compiled model "
                                  f"(a criterion's parameters, another model's, or one made trainable after "
                                  f"gnfx.compile): its optimizer steps only the parameters planned at compile time. "
                                  f"Train the others with an optimizer of their own, or compile a module that holds "
                                  f"them.{per_parameter}")
            kept = [p for p in tensors if id(p) in planned]
            again = [planned[id(p)] for p in kept if id(p) in handed]
            if again:
                raise ConfigError(f"parameter {again[0]!r} is in more than one param group")
            handed.update(id(p) for p in kept)
            made.append({**settings, **group, "params": kept})
        missing = [n for i, n in planned.items() if i not in handed]
        if missing:
            raise ConfigError(f"{len(missing)} parameter(s) planned at compile time are in no param group "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): gnfx steps every "
                              f"parameter it planned. To keep some fixed, set requires_grad=False before "
                              f"gnfx.compile, or give them a group with lr 0.{per_parameter}")
        self.defaults.update(settings)
        self.param_groups.clear()
        for group in made:
            if group["params"]:
                super().add_param_group(group)
        self.parameter_store.bind(self.state, self.param_groups)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's, and the statistics go with the gradients: those the backwards since the last step
        accumulated are dropped with the gradients they came with (a GAN's generator loss, backpropagated
        through the compiled discriminator, fills D's gradients and D's statistics, and D's zero_grad()
        before its own backward clears both). The layer inputs of forwards whose backward has not run yet
        stay (PyTorch Lightning's closure calls zero_grad between the forward and the backward)."""
        super().zero_grad(set_to_none=set_to_none)
        if self.statistics:
            self.statistics.discard_backwards()

    # --- the step ----------------------------------------------------------------------------
    @property
    def statistic_step(self) -> bool:
        """Whether this step collects statistics (taps, and gradient-based curvature)."""
        return collects_statistics(self.steps, self.stat_every, self.refresh_warmup)

    @property
    def collecting(self) -> bool:
        """Whether the forward/backward before the next step runs the taps."""
        return bool(self.statistics) and self.statistic_step

    @torch.no_grad()
    def step(self, closure=None):
        """One step (module doc). A `closure` (the forward and backward, as PyTorch Lightning passes
        it) runs first, so its forward may be the lazily captured model's first call."""
        # this optimizer steps: the parameters may move until the next forward (note_statistic_forward)
        self._forward_versions, self._written_between_forwards = None, False
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.attached:
            raise GnfxError("optimizer.step() before the model's first call: gnfx captures the model's graph "
                            "and plans its preconditioners at the first call (from that call's inputs); run the "
                            "forward and backward first, or pass example_inputs=... to gnfx.compile")
        self._bind_sharded()
        if all(p.grad is None for p in self.parameter_store.named.values()):
            return loss  # no gradient at all: nothing to do, as in torch.optim (module doc)
        sparse = [n for n, p in self.parameter_store.named.items() if p.grad is not None and p.grad.is_sparse]
        if sparse:
            self.statistics.discard()
            self.collected = False
            raise ConfigError(f"the gradient of {sparse[0]!r} is a sparse tensor (a lookup with sparse=True, "
                              f"F.embedding(..., sparse=True) or F.embedding_bag's, which gnfx.compile cannot see "
                              f"as it sees an nn.Embedding's), and "
                              f"gnfx's preconditioners step dense gradients; look it up with sparse=False (the "
                              f"default)")
        scale = None  # s, the loss scale of this step's backward under torch.amp.GradScaler (module doc)
        if "found_inf" in self.__dict__:  # called by torch.amp.GradScaler.step
            if bool(self.found_inf):
                self.statistics.discard()
                self.collected = False
                return loss
            scale = self._unscale()
        try:
            check_outputs_at_step(self.statistics, 1.0 if scale is None else scale)
        except GnfxError:
            self.statistics.discard()  # nothing of a refused backward stays for the next step
            self.collected = False
            raise
        if self.statistics and self.statistic_step and not self.collected:
            self._warn_untapped()
        elif self.statistics and self.statistic_step:
            self._warn_unrecorded()
        batches = self.statistics.batches() if self.collected else {}
        self.collected = False
        if scale is not None:
            batches = self.statistics.unscaled(batches, scale)
            if self.quadratic is not None:
                self.quadratic.unscale(scale)
        if batches and self.sharded is not None:  # to the ranks that keep them (gnfx.fsdp)
            batches = self.sharded.average_statistics(batches)
        elif batches and self.comm is not None:
            batches = self.comm.average_statistics(batches, self.statistics)
        problem = self._non_finite(batches) if self.nan_policy != "off" else ""
        if self.sharded is not None and self.nan_policy != "off":
            problem = self.sharded.agree(problem)
        if problem:
            self.statistics.discard()
            self.skipped_steps += 1
            message = (f"gnfx skipped step {self.steps} (no parameter or statistic changed; "
                       f"{self.skipped_steps} skipped so far): {problem}")
            if self.nan_policy == "raise":
                raise FloatingPointError(message + "; nan_policy='raise'")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return loss
        self.statistics.fold(batches, self.stat_decay)
        self.parameter_store.sync_groups()
        self._warn_if_momentum_scheduled()
        self._warn_if_compile_setting_in_group()
        self.parameter_store.gather()  # the reparametrized blocks' W and ∇W, until the chain's end
        try:
            if self.sharded is not None:
                self.sharded.begin()
            if self.quadratic is not None:  # this step's λ, also for the refreshes below
                self.quadratic.damp_preconditioners(self.preconditioners)
            for pre in self.curvature:
                if self.statistic_step:
                    pre.collect()
                if pre.refresh_due(self.steps):
                    pre.refresh(self.statistics, self.comm)
            if self.quadratic is None:
                self._apply_chain()
            else:
                self.quadratic.step(self._apply_chain, self._refresh_all, self.steps, self.comm,
                                    self.preconditioners, loss, closure)
        finally:
            self.parameter_store.release()  # no stand-in outlives the step, also one that raised
        self.steps += 1
        return loss

    def _with_gradients(self, statistics) -> list[str]:
        """The names of the blocks of `statistics` (BlockStatistics) a parameter of which has a gradient."""
        named = self.parameter_store.named
        return [s.block.name for s in statistics
                if any(named[n].grad is not None for n in (s.block.weight, s.block.bias) if n in named)]

    def _warn_unrecorded(self) -> None:
        """On a statistic step after a training call of the compiled model: warn, once, naming the curvature blocks
        whose parameters have a gradient that no tap of theirs recorded, a gradient from calls of the layer the
        statistics did not see: a reversible layer's (Reformer's, a RevNet's), run under torch.no_grad in the
        forward and recomputed inside its autograd.Function's backward."""
        if self.__dict__.get("warned_unrecorded"):
            return
        missed = self._with_gradients([s for s in self.statistics.blocks.values() if not s.recorded])
        if not missed:
            return
        self.warned_unrecorded = True
        warnings.warn(f"gnfx: step {self.steps} collects statistics, and the gradients of curvature blocks "
                      f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}) came from calls of their layers "
                      f"that the statistics did not see: no tap of theirs was reached by a backward since the last "
                      f"step. Such a block keeps the curvature it had (none, at first: its step is the plain "
                      f"gradient's). This is what a layer run under torch.no_grad in the forward and recomputed inside "
                      f"a torch.autograd.Function's backward does (reversible layers: Hugging Face's Reformer, RevNets). "
                      f"Fix: give those blocks a preconditioner that reads the gradients alone, optimizer={{"
                      f"{missed[0]!r}: 'shampoo', '*': ...}} or 'diag', or train without the reversible layers",
                      RuntimeWarning, stacklevel=4)

    def _warn_untapped(self) -> None:
        """On a statistic step without a training call of the compiled model since the last step: warn, once,
        if a curvature block's parameter has a gradient (the module doc says how that comes about)."""
        if self.__dict__.get("warned_untapped"):
            return
        reached = self._with_gradients(self.statistics.blocks.values())
        if not reached:
            return
        self.warned_untapped = True
        warnings.warn(f"gnfx: step {self.steps} collects statistics, and the gradients reached curvature blocks "
                      f"({', '.join(reached[:3])}{', ...' if len(reached) > 3 else ''}) while no training call of "
                      f"the compiled model ran since the last step, so the curvature did not see this batch: a call "
                      f"of the module it was compiled from, of one of its methods other than forward (a "
                      f"reinforcement-learning agent's get_action_and_value, stable-baselines3's evaluate_actions), "
                      f"or of the compiled model in eval mode or without gradients. Fix: call the compiled model in "
                      f"training mode, and name the methods your training calls in gnfx.compile(..., methods=[...]) "
                      f"to call them on it", RuntimeWarning, stacklevel=4)

    def _unscale(self) -> torch.Tensor | None:
        """Under torch.amp.GradScaler.step, gradients finite: divide the gradients by the loss scale s
        (`grad_scale`; None when the user called scaler.unscale_ already, which did) and return s, a
        tensor of one entry, for what the plan read from the backward (module doc); None for a plan that
        reads only the gradients, after scaler.unscale_."""
        if self.grad_scale is not None:
            grads = [p.grad for p in self.parameter_store.named.values() if p.grad is not None]
            torch._foreach_mul_(grads, self.grad_scale.double().reciprocal().float())
            return self.grad_scale
        if not (self.statistics or self.quadratic is not None):
            return None
        return torch.tensor([_stepping_scaler().get_scale()], dtype=torch.float64)

    def _refresh_all(self) -> None:
        """The refresh of every curvature preconditioner, due or not (after a rejected quadratic step)."""
        for pre in self.curvature:
            pre.refresh(self.statistics, self.comm)

    def _apply_chain(self) -> None:
        """The update chain of every preconditioner, applied to the parameters (under FSDP2: the
        owners' updates sent to the shards, gnfx.fsdp)."""
        self.update_function(self.statistic_step)
        for pre in self.elementwise:
            pre.update(self.statistics)
        self.parameter_store.scatter()  # the reparametrized blocks' change of W pulled back to their parameters
        if self.sharded is not None:
            self.sharded.end()

    def _non_finite(self, batches: dict) -> str:
        """'' if every gradient and this step's statistics are finite, else what is not (one
        host synchronization: the largest |entry| of each, max_i |t_i| (on a CPU its min and max), finite
        iff every entry is (NaN propagates), checked at once; the 2-norm would overflow to inf for finite
        entries above ~1e19 in float32, as a Swin V2's S of output gradients at zero-padded tokens, ~1e21)."""
        named = [(n, local(p.grad)) for n, p in self.parameter_store.named.items() if p.grad is not None]
        named += [(f"statistic {k} of block {b}", v) for b, batch in batches.items() for k, v in batch.items()]
        named = [(n, t) for n, t in named if t.numel()]  # an empty tensor has no entry to check (and no max)
        if not named:
            return ""
        tensors = [t for _, t in named]
        if all(t.device.type == "cpu" for t in tensors):
            # each tensor's min and max, non-finite iff an entry is: on a CPU a foreach kernel is a loop over
            # the tensors anyway, and the ∞-norm's reduction takes 18x aminmax's time (0.27 s against 0.015 s
            # for a 4096 x 25088 gradient, one thread; benchmarks/results/performance.md)
            extremes = torch.stack([x for t in tensors for x in torch.aminmax(t)]).view(-1, 2)
        else:
            extremes = torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).view(-1, 1)
        finite = torch.isfinite(extremes).all(1)  # one isfinite for all: its 4 kernels once, not per tensor
        if bool(finite.all()):
            return ""
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        return "non-finite " + ", ".join(("gradient of " + n) if not n.startswith("statistic") else n for n in bad)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        if not self.attached and self._pending_checkpoint is not None:
            return self._pending_checkpoint
        sd = super().state_dict()
        sd["gnfx"] = {"steps": self.steps, "skipped_steps": self.skipped_steps,
                      "statistics": self.statistics.state_dict() if self.attached else {},
                      "factor_rows": self.plan.rows_seen() if self.attached else {}}
        if self.quadratic is not None:
            sd["gnfx"]["quadratic"] = self.quadratic.state_dict()
        return sd

    def _checked_with_its_bounds(self, state_dict) -> dict:
        """check_checkpoint's expected state, with the plan's factor bounds planned at the checkpoint's rows
        (`factor_rows`) where they differ and cost_rows was not given; where the check fails, the bounds and
        the state are set back and it raises."""
        gnfx_state = state_dict.get("gnfx") if isinstance(state_dict, dict) else None
        rows = gnfx_state.get("factor_rows", {}) if isinstance(gnfx_state, dict) else {}
        changed = self.plan.bounds_at_rows(rows, self._settings) if isinstance(rows, dict) else {}
        if not changed or self._settings["cost_rows_given"] or self.sharded is not None:
            return check_checkpoint(self, state_dict)
        former = {name: (e.max_factor, e.bound_reason, e.rows_seen)
                  for name, e in self.plan.entries.items() if name in changed}
        former_state = {p: dict(entries) for p, entries in self.state.items()}
        self._rebound(changed)
        try:
            return check_checkpoint(self, state_dict)
        except Exception:
            self._rebound(former)
            for p, entries in former_state.items():
                self.state[p].update(entries)
            raise

    def load_state_dict(self, state_dict):
        """Load a checkpoint of this optimizer. The whole checkpoint is checked first (parameter
        groups, every state entry's name and shape, the statistics of every block, the counters), so
        one that does not fit this model and plan, or whose contents are damaged or cut short, raises
        a ConfigError naming what differs and leaves the optimizer exactly as it was. Before the
        model's first call (lazy capture) the checkpoint is kept and loaded, checked, at the capture;
        one written before a capture too (no state yet, as accelerate's round trip) only sets the
        param groups. The factor bounds are planned again at the rows per call site the checkpoint's
        blocks were bounded at (`factor_rows`, from its run's first statistic forward: `bound_factors_at_rows`),
        unless cost_rows was given; loaded from a run that stepped, they are final (no re-plan at the next
        forward)."""
        if not self.attached:
            if state_dict.get("state") or state_dict.get("gnfx", {}).get("statistics"):
                self._pending_checkpoint = state_dict
            else:
                super().load_state_dict({k: v for k, v in state_dict.items() if k != "gnfx"})
            return
        self._bind_sharded()  # under FSDP2 the checkpoint holds the state of this rank's targets
        expected = self._checked_with_its_bounds(state_dict)
        gnfx_state = state_dict["gnfx"]
        self.statistics.load_state_dict(gnfx_state["statistics"])
        plain = {k: v for k, v in state_dict.items() if k != "gnfx"}
        super().load_state_dict(plain)
        restore_dtypes(self.state, self.param_groups, state_dict, expected)
        self.steps = int(gnfx_state["steps"])
        # a run that stepped, or re-planned, keeps its bounds; a checkpoint of none is planned again at the rows
        self.bounds_final = self.bounds_final or self.steps > 0 or bool(self.plan.rows_seen())
        self.skipped_steps = int(gnfx_state.get("skipped_steps", 0))
        if self.quadratic is not None and "quadratic" in gnfx_state:
            self.quadratic.load_state_dict(gnfx_state["quadratic"], self.steps)
        if self.sharded is not None:  # every rank's taps read the bases only their owners' checkpoints hold
            self.sharded.share_bases()
