"""`gnfx.compile`: capture → analyze → plan → rewrite → optimizer, in one call."""
from __future__ import annotations

import functools
import inspect

from torch import nn

from gnfx.compiled import CompiledModel
from gnfx.errors import ConfigError
from gnfx.fisher import FISHER_TYPES, LOSSES
from gnfx.fsdp import check_unsharded
from gnfx.hparams import (HParam, choice, nonnegative, nonnegative_int, open_unit_interval, positive,
                          positive_int, resolve, unit_interval)
from gnfx.lazy_modules import has_lazy_modules, materialize
from gnfx.optimizer import GnfxOptimizer
from gnfx.output_losses import output_losses, valid_loss
from gnfx.parameter_store import held_tensor
from gnfx.plan import BUDGETS, Policy, make_plan
from gnfx.statistics import KFAC_APPROX, STATISTICS, StatisticsStore
from gnfx.passes.analyze import analyze
from gnfx.passes.capture import CAPTURE_MODES
from gnfx.passes.class_tokens import copy_expanded_tables
from gnfx.passes.embedding_renorm import renorms_as_lookups
from gnfx.passes.identity_views import identity_views
from gnfx.passes.index_lookup import lookups_as_embeddings
from gnfx.passes.lower import lower_modules
from gnfx.passes.mha import lower_multihead_attention
from gnfx.passes.opaque_children import open_opaque_children
from gnfx.passes.pruning import computed_pruned_reads
from gnfx.passes.recurrent import lower_recurrent
from gnfx.passes.shared_positions import expand_shared_positions
from gnfx.passes.split_concat import split_concatenations
from gnfx.passes.unflatten import unflatten_linear
from gnfx.passes.vmapped_products import stacked_vmapped_linears
from gnfx.passes.weight_first_products import weight_first_products
from gnfx.preconditioners import REGISTRY
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.quadratic_step import QUADRATIC_DAMPING
from gnfx.variants import Variants

COMMON = {
    "lr": positive("learning rate η", 1e-3),
    "weight_decay": nonnegative("decoupled weight decay λ: θ ← θ(1 - ηλ)", 0.0),
    "stat_every": positive_int("collect statistics on every stat_every-th step", 10),
    "refresh_warmup": nonnegative_int("collect statistics on each of the first refresh_warmup steps (then every "
                                      "stat_every-th), and refresh K-FAC's inverses and EKFAC's bases on each of them "
                                      "(then every inv_every-th); 10 for ekfac under step='quadratic'", 0),
    "stat_decay": unit_interval("β of the statistics' moving average F ← βF + (1-β)F_batch", 0.95),
    "kfac_approx": choice("weight sharing: positions as examples or summed first", "expand", KFAC_APPROX),
    "loss_average": choice("loss terms per example: inferred from an (N, ..., C) output, or 1",
                           "auto", ("auto", "batch")),
    "fisher": choice("where δ comes from: the training loss, sampled labels, or columns of H_ℓ^(1/2) "
                     "('mc' by default for kfac and ekfac under step='quadratic', and for rank1 when loss= is given)",
                     "empirical", FISHER_TYPES),
    "loss": HParam(None, f"None, one of {LOSSES}, or a tuple over the outputs of those, (name, weight) or None",
                   valid_loss,
                   "the training loss (mean reduction; of several outputs, their weighted sum), needed by "
                   "fisher='mc' and 'type2' and by "
                   "step='quadratic' (the default for kfac when it is given and lr is not)"),
    "step": choice("the step size: 'quadratic' (α, μ and the damping λ from the exact GGN model of the loss, "
                   "gnfx.quadratic_step; needs loss=), 'lr' (a fixed learning rate), or 'auto': 'quadratic' for "
                   "an optimizer whose class sets quadratic_by_default (kfac) when loss= is given and lr is not, "
                   "else 'lr'",
                   "auto", ("auto", "quadratic", "lr")),
    # ω = 0.5 (with Nielsen's rule and the loss-floor cap; 0.9 with the former ω rule): the kfac and ekfac
    # steps to target fell by 7-67% on the digits tasks, the char GPT's stayed (benchmarks/results/defaults.md)
    "damping_decay": open_unit_interval("ω of the Levenberg–Marquardt rule of step='quadratic' (Nielsen's form): "
                                        "λ ← λ·max(ω, 1 - (2ρ - 1)³) on an accepted step, the most λ falls "
                                        "per adaptation; λ ← νλ, ν doubling, on a rejected one", 0.5),
    # 5 (Martens & Grosse's T): the same steps to target as 1 on the digits MLP, the deep autoencoder
    # and the char GPT, 12-15% less CPU time on the GPT (benchmarks/results/quadratic_step.md). 2, with the
    # expansion of gnfx.quadratic_step, put every digits target of seeds 0-2 within 0.5x of AdamW's steps but
    # took the MLP's validation target on seeds 3 and 4 from 40 and 95 steps to 95 and 160
    # (benchmarks/results/defaults.md, "The exponential tail of cross-entropy"): not adopted
    "damping_every": positive_int("step='quadratic': compute ρ (one forward at θ+s, or the closure's second call), "
                                  "adapt λ and reject a step with ρ ≤ 0 on every damping_every-th step only (and on "
                                  "the first steps, after a rejection, and on a step predicting over twice the last "
                                  "judged reduction); the steps between keep λ", 5),
    "quadratic_every": positive_int("step='quadratic': build the GGN model (the products J v, M, b) and solve for α and μ "
                                    "on every quadratic_every-th step only (and on the first steps, after a rejected or "
                                    "retried step, and where reusing fails its guard); the steps between take the last "
                                    "α and μ with their own proposal Δ and previous update δ, and adapt λ on the next "
                                    "solved step", 1),
    "quadratic_rows": HParam(None, "None or an integer >= 1",
                             lambda x: x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 1),
                             "step='quadratic': the rows of the output z (loss terms: N·T of an (N, T, C) output), "
                             "rounded up to whole examples from the start of the step's batch, on which the GGN term "
                             "of its model is computed (b and ρ keep the whole batch); None: the whole batch (exact)"),
    "quadratic_momentum": HParam("adaptive", "'adaptive' or a number in [0, 1)",
                                 lambda x: x == "adaptive" or unit_interval("μ̂", 0.0).check(x),
                                 "step='quadratic': 'adaptive' (μ from the model, one more forward-mode product per "
                                 "step) or a fixed μ̂, the step α(Δ + μ̂ v_prev) from one product per part "
                                 "(gnfx.quadratic_step)"),
    # "auto" by default: "difference" took the char GPT's step from 84 to 45 CPU ms at the same steps to target
    # within one evaluation, and the digits tasks' steps within one evaluation at the same time (dispatch-bound
    # there), but it is no derivative across a discontinuity (a router's top-k, rounding), which "auto" looks for
    # in the captured graphs (benchmarks/results/quadratic_step.md, "Finite differences")
    "quadratic_products": choice("step='quadratic': how the products J v are taken: 'forward' (forward-mode "
                                 "derivatives, exact), 'difference' (one-sided finite differences, one forward "
                                 "without gradient per vector: cheaper on a compute-bound model, and through "
                                 "operations without a forward-mode formula; about √ε relative error, and only for "
                                 "a forward smooth in θ, gnfx.finite_differences), or 'auto': 'difference' where "
                                 "every captured graph of the forward is smooth in θ and in 32 or 64 bits "
                                 "(passes/discontinuities.py), else 'forward'",
                                 "auto", ("auto", "forward", "difference")),
    "mc_samples": positive_int("sampled labels per statistic step with fisher='mc'", 1),
    "distributed": choice("under torch.distributed: average statistics and split the refresh across ranks "
                          "('partitioned'), or let every rank refresh everything ('replicated'), or 'off'",
                          "partitioned", ("partitioned", "replicated", "off")),
    "nan_policy": choice("a step with a non-finite gradient or statistic: skipped with a warning, or raise; "
                         "'off' checks nothing (no host synchronization per step, no pass over the "
                         "gradients; non-finite values reach the parameters, as with torch.optim)",
                         "skip", ("skip", "raise", "off")),
    # "auto": gnfx.codegen.auto_compiles decides: never on a CPU (compiling costs far more than the
    # 2 s a first step may, benchmarks/results/compile_time.md), elsewhere when the curvature targets
    # hold at least 2²⁰ entries. If compiling fails, "auto" warns and runs the same update eagerly;
    # True raises.
    "compile": HParam("auto", "True, False or 'auto'", lambda x: isinstance(x, bool) or x == "auto",
                      "run the generated update function under torch.compile"),
    "statistics": HParam((), f"a tuple of names from {STATISTICS}",
                         lambda x: isinstance(x, (tuple, list)) and set(x) <= set(STATISTICS),
                         "statistics to collect beyond what the preconditioners need"),
    **BUDGETS,
    "cost_rows": positive_int("rows B·R of a statistic step per call site (examples x positions) that the cost "
                              "model assumes: for optimizer='auto', K-FAC's factor blocks (its factor_bound: "
                              "blocks below max_factor where these rows are far fewer than the factors' entries) "
                              "and model.cost(). Not given, the factor bounds are planned again at the end of the "
                              "first statistic forward at the rows each block saw (gnfx.optimizer "
                              "bound_factors_at_rows)", 256),
}
PER_GROUP = ("lr", "weight_decay", "betas", "eps")  # read from param_groups at every step


def _check_model(model) -> None:
    if isinstance(model, CompiledModel):
        raise ConfigError("this model is already compiled by gnfx; compile the original module once")
    if type(model).__name__ == "OptimizedModule":
        raise ConfigError("this model is wrapped by torch.compile; pass the original module "
                          "(model._orig_mod) to gnfx.compile, which compiles its own update, and wrap what it "
                          "returns in torch.compile instead: torch.compile(gnfx.compile(model._orig_mod, ...)) "
                          "trains exactly as the compiled model without it")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError("this model is wrapped by DistributedDataParallel; call gnfx.compile on "
                          "model.module and wrap the compiled model instead")
    if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
        raise ConfigError(f"this model is wrapped by nn.DataParallel over {len(model.device_ids)} devices, which "
                          f"copies it to each device at every forward and runs the copies in threads: the copies' "
                          f"statistics would not reach the optimizer; wrap the compiled model of model.module in "
                          f"DistributedDataParallel instead (README, 'Data-parallel training'), or train on one device")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"gnfx.compile expects a torch.nn.Module, got {type(model).__name__}")
    sparse = [name for name, m in model.named_modules() if getattr(m, "sparse", False) is True
              and isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight.requires_grad]
    if sparse:
        raise ConfigError(f"{sparse[0]!r} ({type(model.get_submodule(sparse[0])).__name__}) has sparse=True, whose "
                          f"gradients are sparse tensors, and gnfx's preconditioners step dense gradients; "
                          f"construct it with sparse=False (the default)")
    complex_ = [name for name, p in model.named_parameters() if p.requires_grad and p.is_complex()]
    if complex_:
        raise ConfigError(f"{complex_[0]!r} is a complex parameter ({model.get_parameter(complex_[0]).dtype}"
                          f"{f', and {len(complex_) - 1} more' if len(complex_) > 1 else ''}); gnfx's curvature "
                          f"statistics, preconditioners and step model are real. Fix: hold it as real numbers, "
                          f"nn.Parameter(torch.view_as_real(w)) (a trailing dimension of 2), and read it as "
                          f"torch.view_as_complex(self.w) in the forward: the same function of the same numbers, "
                          f"which falls back (no layer kind reads a complex weight) and trains as a real parameter")
    check_unsharded(model)


def _check_methods(model: nn.Module, methods, loss) -> tuple[str, ...]:
    """`methods` as a tuple of names, each a method of the model's class that the compiled model does not
    have itself; a ConfigError otherwise, and with `loss`: loss= names a loss of the forward's output (its
    logits), which the sampled Fisher and step='quadratic' replay and read, and a method's outputs are
    whatever it returns (an agent's actions, log-probabilities and values)."""
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"methods={methods!r}: pass a list of method names, e.g. methods=['get_action_and_value']")
    for method in methods:
        found = inspect.getattr_static(type(model), method, None)
        if method == "forward" or hasattr(CompiledModel, method):
            raise ConfigError(f"methods=[{method!r}]: {method} is the compiled model's own "
                              f"({'its forward, served without methods=' if method == 'forward' else 'an nn.Module or gnfx method'}); "
                              f"name the methods of {type(model).__name__} that your training calls instead")
        if not inspect.isfunction(found):
            raise ConfigError(f"methods=[{method!r}]: {type(model).__name__} has no method {method!r} (a function "
                              f"defined on its class; got {type(found).__name__})")
    if methods and loss is not None:
        raise ConfigError(f"methods={list(methods)} with loss={loss!r}: loss= names the loss of the forward's output "
                          f"(the logits), which the sampled Fisher and step='quadratic' read and replay, and a "
                          f"method's outputs are what it returns (an agent's actions, log-probabilities, values). "
                          f"Fix: compile without loss= and with an lr (K-FAC's empirical Fisher, from your "
                          f"backward)")
    return tuple(methods)


def compile(model: nn.Module, optimizer: str | dict = "diag", *, capture: str = "auto", leaf_modules=(),
            methods=(), example_inputs=None, example_kwargs=None, **hparams) -> CompiledModel:
    """Compile `model` for curvature-aware training with the preconditioner `optimizer`.

    Returns a CompiledModel that runs on the same Parameter objects, with `.step()`,
    `.zero_grad()` and `.optimizer` (usable at once, e.g. for an LR scheduler). `capture` is "auto"
    (torch.fx, and torch.export when fx fails anywhere, keeping the graph with more parameters in
    curvature blocks), "fx" or "export"; the graph is captured now when torch.fx traces the whole
    forward or `example_inputs` (and `example_kwargs`) are given, else at the model's first call,
    from its inputs (see gnfx.variants). Lazy modules (nn.LazyLinear, ...) not called yet are
    materialized by a dry run of the forward on those inputs first (gnfx.lazy_modules).
    `leaf_modules` lists submodule paths to keep opaque. `methods` names methods of the model other than
    forward that training calls (a reinforcement-learning agent's `get_action_and_value`): the compiled
    model has them, and a training call of one runs its Python code with the layers it calls as curvature
    blocks (passes/opaque_root.py).
    `optimizer` is a preconditioner name, "auto", or a dict of glob patterns on block names
    (see gnfx.plan). `hparams` are the hyperparameters of gnfx.api.COMMON and of the
    preconditioners the optimizer may use (and of "diag", which serves the parameters no block
    claims); unknown names raise a ConfigError.
    """
    _check_model(model)
    policy = Policy(optimizer, hparams)
    lr_cap = "lr" in hparams  # with step="quadratic" a given lr caps α at 1
    hparams = _step_defaults(optimizer, policy, hparams)
    hp = resolve({**COMMON, **policy.hparam_specs()}, hparams, f"optimizer={optimizer!r}")
    hp["lr_cap"] = lr_cap
    # whether the optimizer asked for a curvature preconditioner (GnfxOptimizer warns when the plan has none)
    hp["curvature_asked"] = any(issubclass(REGISTRY[n], CurvaturePreconditioner) for n in policy.names)
    # the factor bounds are planned at the given cost_rows; else again at the first statistic forward's rows
    hp["cost_rows_given"] = "cost_rows" in hparams
    hp["initial_damping"] = hp["damping"] if _tikhonov(policy) else QUADRATIC_DAMPING
    hp["losses"] = output_losses(hp["loss"])  # the OutputLoss of each output loss= names (gnfx.output_losses)
    if hp["fisher"] != "empirical" and hp["loss"] is None:
        raise ConfigError(f"fisher={hp['fisher']!r} needs the training loss: pass loss='cross_entropy', "
                          f"loss='mse' or loss='binary_cross_entropy' (the loss you call, with mean reduction)")

    methods = _check_methods(model, methods, hp["loss"])
    if capture not in CAPTURE_MODES:
        raise ConfigError(f"capture={capture!r} is not a capture mode; use one of {CAPTURE_MODES}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = GnfxOptimizer(named, hp, {k: hp[k] for k in PER_GROUP})

    def start(table):
        """Plan the first capture's blocks and attach the preconditioners to the optimizer; the
        planned table (gnfx.plan) and the statistics store."""
        plan = make_plan(table, policy, hparams, hp, dict(model.named_parameters()))
        store = StatisticsStore(
            plan.table.blocks,
            needs_of=lambda b: plan.needs(b) | set(hp["statistics"]),
            kfac_approx=hp["kfac_approx"], param_of=named.__getitem__, fisher=hp["fisher"],
            live_param=functools.partial(held_tensor, model))
        store.warn_sequence_first(model)
        opt.attach(plan, store)
        return plan.table, store

    variants = Variants(model, capture, leaf_modules, lambda captured: _lower_and_analyze(model, captured), start)
    if example_inputs is not None:
        if has_lazy_modules(model):  # lazy modules: a dry run on the example first (gnfx.lazy_modules)
            materialize(model, tuple(example_inputs), dict(example_kwargs or {}))
        variants.capture(tuple(example_inputs), dict(example_kwargs or {}))
    else:
        variants.capture_without_inputs()
    return CompiledModel(model, variants, opt, hp, methods)


def _step_defaults(optimizer, policy: Policy, hparams: dict) -> dict:
    """`hparams` with `step` resolved ("auto": "quadratic" for an optimizer quadratic_by_default when loss=
    is given and lr is not) and, for step="quadratic", the defaults that suit it where not given: lr 1
    (the proposal is the preconditioner's full step, which α scales; a given lr caps α at 1, `lr_cap`),
    no heavy-ball momentum and no KL clipping inside the chain (μ and α replace them: KL clipping
    scales the proposal, which α undoes, so it changed no step, benchmarks/results/defaults.md), and
    for K-FAC and EKFAC the starting damping λ0 = QUADRATIC_DAMPING, fisher="mc" (the loss is
    known; on the deep autoencoder it reached the targets in 0.6x the steps of the empirical Fisher,
    the same steps as "type2" at one backward per statistic step instead of one per output), and the
    largest `quadratic_refresh_warmup` of the plan's preconditioners as refresh_warmup (EKFAC's 10). An
    optimizer whose class sets true_fisher_by_default (rank1) takes fisher="mc" whenever loss= is given."""
    step = hparams.get("step", "auto")
    if hparams.get("loss") is not None and any(REGISTRY[n].true_fisher_by_default for n in policy.names):
        hparams = {"fisher": "mc", **hparams}
    if step == "auto":
        auto = isinstance(optimizer, str) and optimizer in REGISTRY and REGISTRY[optimizer].quadratic_by_default
        step = "quadratic" if auto and hparams.get("loss") is not None and "lr" not in hparams else "lr"
    hparams = {**hparams, "step": step}
    if step != "quadratic":
        return hparams
    if hparams.get("loss") is None:
        raise ConfigError("step='quadratic' builds the GGN model from the training loss: pass loss='cross_entropy', "
                          "loss='mse' or loss='binary_cross_entropy' (the loss you call, with mean reduction), or "
                          "step='lr' with an lr")
    for name in policy.names:
        if REGISTRY[name].no_quadratic_step:
            raise ConfigError(f"optimizer {name!r} cannot take step='quadratic': {REGISTRY[name].no_quadratic_step}")
    specs = policy.hparam_specs()
    defaults = {k: v for k, v in (("momentum", 0.0), ("kl_clip", 0.0)) if k in specs}
    if _tikhonov(policy):
        defaults.update(damping=QUADRATIC_DAMPING, fisher="mc")
    warmup = max(REGISTRY[name].quadratic_refresh_warmup for name in policy.names)
    if warmup:
        defaults["refresh_warmup"] = warmup
    return {"lr": 1.0, **defaults, **hparams}


def _tikhonov(policy: Policy) -> bool:
    """Whether a preconditioner of the policy has a Tikhonov damping on the GGN's scale (`damping`)."""
    return any(REGISTRY[n].tikhonov_damping for n in policy.names)


def _lower_and_analyze(model, captured):
    gm = lower_recurrent(lower_multihead_attention(captured.graph_module, captured.leaves), captured.leaves)
    gm = computed_pruned_reads(model, lower_modules(gm, captured.leaves))
    gm = lookups_as_embeddings(renorms_as_lookups(split_concatenations(identity_views(gm))))
    gm = copy_expanded_tables(expand_shared_positions(unflatten_linear(weight_first_products(gm))))
    gm = stacked_vmapped_linears(gm)
    table, block_sites = analyze(model, gm, captured.leaves, captured.form)
    # the children of opaque submodules, each captured on its own and built as this graph is (its own
    # opaque submodules opened in turn)
    return open_opaque_children(model, gm, table, block_sites, lambda child: _lower_and_analyze(model, child))
