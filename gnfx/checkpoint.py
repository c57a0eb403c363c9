"""Checking an optimizer checkpoint against the model and plan it is loaded into.

`GnfxOptimizer.load_state_dict` checks the whole checkpoint before it changes anything: the
parameter groups, every per-parameter state entry against the state the plan's preconditioners
keep (each says what it keeps: `expected_state`, gnfx.preconditioners.base), the statistics of
every block (gnfx.statistics) and the counters. One that does not fit, or whose contents are
damaged or cut short, raises a ConfigError naming what differs. Once torch has loaded it,
`restore_dtypes` puts the saved tensors back in the dtypes the plan keeps them in.
"""
from __future__ import annotations

import torch

from gnfx.errors import ConfigError


def expected_state(opt) -> dict[int, dict]:
    """id(parameter) -> {state key: (shape, dtype) of a tensor, or None for a number}: the state the
    plan's preconditioners keep in `opt` (the current tensors where they exist, else fresh ones;
    under FSDP2 the curvature preconditioners of this rank's targets, gnfx.fsdp)."""
    expected: dict[int, dict] = {}
    for pre in opt.elementwise + opt.curvature:
        for name, entries in pre.expected_state().items():
            expected.setdefault(id(opt.parameter_store.named[name]), {}).update(entries)
    return expected


def check_checkpoint(opt, state_dict) -> dict[int, dict]:
    """Raise a ConfigError naming the first thing in `state_dict` that does not fit the optimizer
    `opt` (a gnfx.optimizer.GnfxOptimizer, attached); returns the expected state (`expected_state`)."""
    def fail(what: str):
        raise ConfigError(f"cannot load this optimizer checkpoint, nothing was loaded: {what}")

    if not isinstance(state_dict, dict) or "gnfx" not in state_dict:
        raise ConfigError("this state_dict was not written by a gnfx optimizer (no 'gnfx' entry)")
    missing = [k for k in ("state", "param_groups") if not isinstance(state_dict.get(k), (dict, list))]
    if missing:
        fail(f"it has no valid {' or '.join(map(repr, missing))} entry (a damaged or cut-short checkpoint?)")
    gnfx_state = state_dict["gnfx"]
    if not isinstance(gnfx_state, dict) or not isinstance(gnfx_state.get("statistics"), dict):
        fail("its 'gnfx' entry has no 'statistics' (a damaged or cut-short checkpoint?)")
    for counter in ("steps", "skipped_steps")[:1 + ("skipped_steps" in gnfx_state)]:
        if not _is_count(gnfx_state.get(counter)):
            fail(f"its 'gnfx' entry has no valid {counter!r} counter (a damaged or cut-short checkpoint?)")
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        fail(f"it has {len(groups)} parameter group(s), this optimizer {len(opt.param_groups)}")
    for i, (saved, mine) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            fail(f"its parameter group {i} has no 'params' list")
        if len(saved["params"]) != len(mine["params"]):
            fail(f"its parameter group {i} has {len(saved['params'])} parameters, this optimizer's "
                 f"{len(mine['params'])}: was it saved from a model with a different architecture?")
    names = {id(p): n for n, p in opt.parameter_store.named.items()}
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    strangers = set(state_dict["state"]) - set(ids)
    if strangers:
        fail(f"it has state for {len(strangers)} parameter id(s) its parameter groups do not list")
    expected = expected_state(opt)
    for i, p in zip(ids, params):
        entries = state_dict["state"].get(i, {})
        if not isinstance(entries, dict):
            fail(f"the state of parameter {names[id(p)]!r} is not a dict")
        want = expected.get(id(p), {})
        for prefix in {k.rpartition(".")[0] for k in entries}:  # a preconditioner's state: all or nothing
            lacking = sorted(k for k in want if k.rpartition(".")[0] == prefix and k not in entries)
            if lacking and any(k in want for k in entries if k.rpartition(".")[0] == prefix):
                change = next((pre.state_change for pre in opt.curvature
                               if pre.state_change and any(g.key == prefix for g in pre.groups)), "")
                fail(f"the state of parameter {names[id(p)]!r} lacks {', '.join(map(repr, lacking))} "
                     + (f"({change})" if change else "(saved under other hyperparameters or by an older gnfx, "
                                                     "whose state differs, or a damaged or cut-short checkpoint?)"))
        for k, v in entries.items():
            where = f"parameter {names[id(p)]!r} {tuple(p.shape)}: state {k!r}"
            if k not in want:
                fail(f"{where} is not kept by this optimizer's plan (a different preconditioner, "
                     f"hyperparameters or architecture?); it keeps {sorted(want) or 'no state'} there")
            if want[k] is None:
                if not _is_count(v):
                    fail(f"{where} should be a number, the checkpoint has {type(v).__name__}")
            elif not isinstance(v, torch.Tensor):
                fail(f"{where} should be a tensor of shape {tuple(want[k][0])}, the checkpoint has "
                     f"{type(v).__name__}")
            elif v.shape != want[k][0]:
                fail(f"{where} has shape {tuple(v.shape)} in the checkpoint and {tuple(want[k][0])} here: "
                     f"was it saved from a model with a different architecture?")
    stats = gnfx_state["statistics"]
    if set(stats) != set(opt.statistics.blocks):
        fail(f"its statistics are for blocks {sorted(stats)}, this model's are {sorted(opt.statistics.blocks)}")
    for block, entry in stats.items():
        complete = isinstance(entry, dict) and isinstance(entry.get("values"), dict)
        if not complete or not _is_count(entry.get("updates")):
            fail(f"the statistics of block {block!r} are incomplete (a damaged or cut-short checkpoint?)")
        for k, v in entry["values"].items():
            shape = _statistic_shape(opt.statistics[block], k)
            if shape is None:
                fail(f"statistic {k!r} of block {block!r} is not collected under this optimizer's plan")
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                fail(f"statistic {k!r} of block {block!r} is {got} in the checkpoint and {shape} "
                     f"here: was it saved from a model with a different architecture?")
    return expected

def restore_dtypes(state: dict, param_groups: list, state_dict, expected: dict[int, dict]) -> None:
    """torch's load_state_dict casts floating state to each parameter's dtype; gnfx keeps factors in
    their own dtype (float32/float64 whatever the model's): put the tensors saved in `state_dict` into
    `state` (the optimizer's, loaded by torch, over `param_groups`) in the dtype this plan keeps them
    in (`expected`, from `check_checkpoint`; the saved one for a checkpoint of the same model)."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    for i, p in zip(ids, params):
        for k, v in state_dict["state"].get(i, {}).items():
            if isinstance(v, torch.Tensor):
                dtype = (expected.get(id(p), {}).get(k) or (None, v.dtype))[1]
                state[p][k] = v.detach().clone().to(device=p.device, dtype=dtype)


def _is_count(x) -> bool:
    """Whether `x` is a counter a checkpoint may hold: an int or float, or a one-element tensor."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _statistic_shape(stats, name: str) -> tuple | None:
    """The shape of the averaged statistic `name` of a block (gnfx.statistics), None if not collected."""
    if name not in stats.needs:
        return None
    if name == "inverse_counts":
        return (2,)
    d_a, d_out = stats.block.d_in + stats.bias, stats.block.d_out
    return stats.layout.factor_shapes().get(name, (d_out, d_a))
