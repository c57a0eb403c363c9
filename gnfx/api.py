"""`gnfx.compile`: capture → analyze → plan → rewrite → optimizer, in one call."""
from __future__ import annotations

from torch import nn

from gnfx.compiled import CompiledModel
from gnfx.errors import ConfigError
from gnfx.fisher import FISHER_TYPES, LOSSES
from gnfx.hparams import HParam, choice, flag, nonnegative, positive, positive_int, resolve, unit_interval
from gnfx.optimizer import GnfxOptimizer
from gnfx.plan import BUDGETS, Policy, make_plan
from gnfx.statistics import KFAC_APPROX, STATISTICS, StatisticsStore
from gnfx.passes.analyze import analyze
from gnfx.passes.capture import CAPTURE_MODES, optional_inputs, trace_fx
from gnfx.passes.capture import capture as capture_graph
from gnfx.passes.lower import lower_modules
from gnfx.passes.mha import lower_multihead_attention
from gnfx.passes.taps import insert_taps

COMMON = {
    "lr": positive("learning rate η", 1e-3),
    "weight_decay": nonnegative("decoupled weight decay λ: θ ← θ(1 - ηλ)", 0.0),
    "stat_every": positive_int("collect statistics on every stat_every-th step", 10),
    "stat_decay": unit_interval("β of the statistics' moving average F ← βF + (1-β)F_batch", 0.95),
    "kfac_approx": choice("weight sharing: positions as examples or summed first", "expand", KFAC_APPROX),
    "loss_average": choice("loss terms per example: inferred from an (N, ..., C) output, or 1",
                           "auto", ("auto", "batch")),
    "fisher": choice("where δ comes from: the training loss, sampled labels, or columns of H_ℓ^(1/2)",
                     "empirical", FISHER_TYPES),
    "loss": HParam(None, f"None or one of {LOSSES}", lambda x: x is None or x in LOSSES,
                   "the training loss (mean reduction), needed by fisher='mc' and 'type2'"),
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
                              "model assumes: for optimizer='auto' and model.cost()", 256),
}
PER_GROUP = ("lr", "weight_decay", "betas", "eps")  # read from param_groups at every step


def _check_model(model) -> None:
    if isinstance(model, CompiledModel):
        raise ConfigError("this model is already compiled by gnfx; compile the original module once")
    if type(model).__name__ == "OptimizedModule":
        raise ConfigError("this model is wrapped by torch.compile; pass the original module "
                          "(model._orig_mod) to gnfx.compile, which compiles its own update")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError("this model is wrapped by DistributedDataParallel; call gnfx.compile on "
                          "model.module and wrap the compiled model instead")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"gnfx.compile expects a torch.nn.Module, got {type(model).__name__}")


def compile(model: nn.Module, optimizer: str | dict = "diag", *, capture: str = "auto", leaf_modules=(),
            example_inputs=None, example_kwargs=None, **hparams) -> CompiledModel:
    """Compile `model` for curvature-aware training with the preconditioner `optimizer`.

    Returns a CompiledModel that runs on the same Parameter objects, with `.step()`,
    `.zero_grad()` and `.optimizer`. `capture` is "auto" (torch.fx, then torch.export with
    `example_inputs` and `example_kwargs`), "fx" or "export"; `leaf_modules` lists submodule paths
    to keep opaque.
    `optimizer` is a preconditioner name, "auto", or a dict of glob patterns on block names
    (see gnfx.plan). `hparams` are the hyperparameters of gnfx.api.COMMON and of the
    preconditioners the optimizer may use (and of "diag", which serves the parameters no block
    claims); unknown names raise a ConfigError.
    """
    _check_model(model)
    policy = Policy(optimizer, hparams)
    hp = resolve({**COMMON, **policy.hparam_specs()}, hparams, f"optimizer={optimizer!r}")
    if hp["fisher"] != "empirical" and hp["loss"] is None:
        raise ConfigError(f"fisher={hp['fisher']!r} needs the training loss: pass loss='cross_entropy' or "
                          f"loss='mse' (the loss you call, with mean reduction)")

    if capture not in CAPTURE_MODES:
        raise ConfigError(f"capture={capture!r} is not a capture mode; use one of {CAPTURE_MODES}")
    captured = capture_graph(model, capture, leaf_modules, example_inputs, example_kwargs)
    gm, table, block_sites = _lower_and_analyze(model, captured)
    plan = make_plan(table, policy, hparams, hp, dict(model.named_parameters()))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    store = StatisticsStore(
        table.blocks,
        needs_of=lambda b: plan.needs(b) | set(hp["statistics"]),
        kfac_approx=hp["kfac_approx"], param_of=named.__getitem__, fisher=hp["fisher"])
    insert_taps(gm, block_sites, store)
    defaults = {k: hp[k] for k in PER_GROUP}
    opt = GnfxOptimizer(named, plan.specs(), store, hp, defaults)

    def variant(none_inputs: tuple[str, ...]):
        """The instrumented graph for calls that leave the optional inputs `none_inputs` out."""
        fixed = trace_fx(model, leaf_modules, concrete_args={name: None for name in none_inputs})
        gm, _, sites = _lower_and_analyze(model, fixed)
        return insert_taps(gm, sites, store)

    optional = optional_inputs(model) if captured.form == "fx" else ()
    return CompiledModel(model, gm, table, opt, hp, optional, variant)


def _lower_and_analyze(model, captured):
    gm = lower_modules(lower_multihead_attention(captured.graph_module, captured.leaves), captured.leaves)
    table, block_sites = analyze(model, gm, captured.leaves, captured.form)
    return gm, table, block_sites
