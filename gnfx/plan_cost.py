"""`model.cost()`: the cost model (gnfx.cost) evaluated on a compiled model's plan, per block and
loose parameter, and per rank under FSDP2 (gnfx.fsdp)."""
from __future__ import annotations

import dataclasses

import sympy as sp

from gnfx.cost import (ADAMW, FACTOR, SYMBOLS, Formulas, Geometry, blocked, formulas, geometry_of, statistic_sizes,
                       storage_sizes, symbols_for)
from gnfx.fsdp import curvature_owners
from gnfx.fsdp import rows as rows_of
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.report import format_bytes, format_table

@dataclasses.dataclass
class Row:
    """One block or loose parameter: numbers for the plan's sizes."""

    name: str
    kind: str
    preconditioner: str
    params: int  # parameter entries
    param_bytes: int
    memory_bytes: int
    statistics_flops: float
    refresh_flops: float
    update_flops: float
    flops: float
    # under FSDP2 with world_size W (gnfx.fsdp): the bytes each rank keeps of this row's state
    rank_memory_bytes: tuple[int, ...] = ()

    @property
    def memory_ratio(self) -> float:
        """Memory relative to the parameters' own."""
        return self.memory_bytes / self.param_bytes

    @property
    def flops_ratio(self) -> float:
        """Amortized FLOPs relative to an AdamW step on the same parameters."""
        return self.flops / (ADAMW * self.params)


class PlanCost:
    """`model.cost()`: memory and amortized FLOPs per block (and loose parameter) and in total.

    `rows` are `Row`s; `formulas[name]` maps "memory" (bytes), "elements", "statistics",
    "refresh", "update", "flops" (amortized) to sympy expressions in gnfx.cost.SYMBOLS, and
    "state"/"tap_statistics" to the entries of each tensor; `values[name]` is the substitution
    that gives this plan's numbers, e.g.
    `cost.formulas["fc"]["memory"].subs({**cost.values["fc"], d_in: 4096})`.
    """

    def __init__(self, rows: list[Row], formulas: dict, values: dict):
        self.rows = rows
        self.formulas = formulas
        self.values = values
        self.param_count = sum(r.params for r in rows)
        self.param_bytes = sum(r.param_bytes for r in rows)
        self.total_memory_bytes = sum(r.memory_bytes for r in rows)
        self.total_flops = sum(r.flops for r in rows)
        self.adamw_memory_bytes = 2 * self.param_bytes
        # per rank under FSDP2 (model.cost(world_size=W)); one process: the total
        self.rank_memory_bytes = [sum(col) for col in zip(*(r.rank_memory_bytes for r in rows))]
        self.adamw_flops = ADAMW * self.param_count

    def __getitem__(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no block or parameter named {name!r}; rows are {[r.name for r in self.rows]}")

    @property
    def memory_ratio(self) -> float:
        return self.total_memory_bytes / self.param_bytes

    @property
    def flops_ratio(self) -> float:
        return self.total_flops / self.adamw_flops

    def __str__(self) -> str:
        rows = [[r.name, r.kind, r.preconditioner, f"{r.params:,}", format_bytes(r.memory_bytes),
                 f"{r.memory_ratio:.2f}", _flops(r.flops), f"{r.flops_ratio:.1f}"] for r in self.rows]
        rows.append(["total", "", "", f"{self.param_count:,}", format_bytes(self.total_memory_bytes),
                     f"{self.memory_ratio:.2f}", _flops(self.total_flops), f"{self.flops_ratio:.1f}"])
        header = ["block", "kind", "preconditioner", "params", "memory", "x params", "FLOPs/step", "x AdamW"]
        return (format_table(header, rows) + f"\nAdamW: {format_bytes(self.adamw_memory_bytes)} of state, "
                f"{_flops(self.adamw_flops)} FLOPs per step")

    __repr__ = __str__


def _flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _fsdp_memory(f: Formulas, g, needs, sizes: dict, curvature: bool, tap_state=()) -> sp.Expr:
    """The bytes of a row that every rank keeps whole under FSDP2 (gnfx.fsdp): for a curvature
    preconditioner the statistic accumulators the taps fill from the local batch and the state its
    taps read (`tap_state`: EKFAC's bases; the owner keeps the rest), for the elementwise diag all
    its statistics (only its moments are sharded)."""
    if g.loose:  # no tap statistics
        return sp.Integer(0)
    if curvature:
        copies = sum((f.state[k][0] for k in tap_state if k in f.state), sp.Integer(0))
        return (sum((statistic_sizes(g)[1][k] for k in needs), sp.Integer(0)) + copies) * sizes[FACTOR]
    return sum((e * sizes[s] for e, s in f.statistics.values()), sp.Integer(0))


def plan_cost(table, optimizer, settings: dict, batch_size: int | None = None, positions=None,
              world_size: int = 1) -> PlanCost:
    """The cost of a compiled model's plan: every block (table order), then every loose parameter.

    Under FSDP2 on `world_size` W ranks (gnfx.fsdp) a row of memory M keeps per rank
    (`formulas[name]["memory_per_rank"]`, as (owner, other ranks) for a curvature preconditioner):
    kfac, ekfac, shampoo, soap, rank1: M on the rank that owns the block (its statistics' averages,
    factors, roots and momentum live there only), and on every other rank the statistic
    accumulators M_acc the taps fill from the local batch (ekfac: and a copy of the bases Q_S, Q_A
    its taps measure in); diag: (M - M_stat) / W + M_stat (its
    moments are shaped like the rank's n_r = ⌈d_0/W⌉ rows, its statistics M_stat are whole).
    `rank_memory_bytes` of each row and of the plan give the numbers per rank, with the owners
    gnfx.fsdp assigns.

    `batch_size` is B (default: the `cost_rows` setting); `positions` R per example and call site,
    an int for every block or {block name: R} (default 1); a block's R is multiplied by its number
    of call sites. Each preconditioner's own hyperparameters and each block's collected
    statistics (including those asked for with `statistics=`) enter the formulas.
    """
    batch = settings["cost_rows"] if batch_size is None else batch_size
    served = {n: pre for pre in optimizer.preconditioners for n in [b.name for b in pre.blocks] + pre.param_names}
    stats = optimizer.statistics.blocks
    entries = [(b.name, b.kind, b.held_params, b) for b in table] + [(f.param, "fallback", (f.param,), None)
                                                               for f in table.fallbacks]
    curvature = [pre for pre in optimizer.preconditioners if isinstance(pre, CurvaturePreconditioner)]
    owners = curvature_owners(curvature, world_size)
    rows, forms, values = [], {}, {}
    for name, kind, params, block in entries:
        pre = served[name]
        pre_name = type(pre).name
        tensors = [optimizer.parameter_store.named[p] for p in params]  # the whole parameters, also under FSDP2
        sizes = storage_sizes(tensors[0])
        if block is not None:
            r = positions.get(name, 1) if isinstance(positions, dict) else positions or 1
            at = symbols_for(pre.hp, optimizer.stat_every, d_in=block.d_in, d_out=block.d_out, B=batch,
                             R=r * len(block.sites))
            if "max_factor" in pre.hp:  # the block's own bound, which the plan may have lowered (gnfx.plan)
                at["max_factor"] = block.max_factor or 0
            needs = stats[name].needs if name in stats else frozenset()
            geometry, symbolic = (blocked(geometry_of(block, x), pre.hp, x) for x in (at, SYMBOLS))
        else:
            at = symbols_for(pre.hp, optimizer.stat_every)
            needs = frozenset()
            geometry = symbolic = Geometry(tuple(tensors[0].shape), "tensor")
        approx = settings["kfac_approx"]
        numbers = formulas(type(pre), pre.hp, geometry, needs, approx, at)
        symbolic_formulas = formulas(type(pre), pre.hp, symbolic, needs, approx)
        forms[name] = symbolic_formulas.as_dict(sizes)
        values[name] = {SYMBOLS[k]: v for k, v in at.items() if not isinstance(v, sp.Symbol)}
        values[name][SYMBOLS["W"]] = world_size
        memory = int(numbers.memory(sizes))
        curvature_row = name in owners
        whole = _fsdp_memory(symbolic_formulas, symbolic, needs, sizes, curvature_row, pre.tap_state)
        everywhere = int(_fsdp_memory(numbers, geometry, needs, sizes, curvature_row, pre.tap_state))
        if curvature_row:  # all of it on the owner, the accumulators on the others
            forms[name]["memory_per_rank"] = (forms[name]["memory"], whole)
            per_rank = tuple(memory if r == owners[name] else everywhere for r in range(world_size))
        else:  # the moments sharded by rows, n_r = ceil(d_0 / W), the statistics whole
            forms[name]["memory_per_rank"] = (forms[name]["memory"] - whole) / SYMBOLS["W"] + whole
            d0 = tensors[0].shape[0] if tensors[0].dim() else 1
            # (a parameter of no rows, vit-pytorch's (0, d) cls_token at pool="mean", has no moments to shard)
            per_rank = tuple((memory - everywhere) * (s.stop - s.start) // max(d0, 1) + everywhere
                             for s in (rows_of(d0, world_size, r) for r in range(world_size)))
        rows.append(Row(name, kind, pre_name, sum(t.numel() for t in tensors),
                        sum(t.numel() * t.element_size() for t in tensors), memory,
                        float(numbers.statistics_flops), float(numbers.refresh_flops), float(numbers.update_flops),
                        float(numbers.flops), per_rank))
    return PlanCost(rows, forms, values)
