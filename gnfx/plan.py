"""plan: which preconditioner, with which hyperparameters, serves which block.

`optimizer` is one of

- a preconditioner name ("kfac"): every block gets it;
- "auto": every block gets the most faithful preconditioner that fits the budgets (below);
- a policy, a dict from glob patterns (fnmatch) to a name, "auto", or a pair (name, {hyperparameters}):

      {"*.attn.*": "shampoo", "*.fc*": ("kfac", {"damping": 1e-2}), "*": "diag"}

  Patterns match block names (and the names of parameters no block claims); the first matching
  pattern wins, a block that no pattern matches gets "diag", and so does a block that the named
  preconditioner declines (its `serves`: Muon serves hidden matrices only), with the reason. A
  pattern that wins no block raises a ConfigError, as does a preconditioner name that is not
  registered. For "auto" the pair form takes budgets: ("auto", {"memory_budget": 16}).

Parameters that no block claims get the diagonal preconditioner (docs/design.md §1), unless the
preconditioner of the pattern that matches them serves them itself (Shampoo and SOAP take every
loose tensor of order >= 2: they need only a gradient's shape); "auto" gives them "diag".

Hyperparameters: a preconditioner's defaults, overridden by the `gnfx.compile` keywords it
declares (a keyword such as `damping` reaches every preconditioner that declares one), overridden by
the pattern's own. Entries with the same preconditioner and hyperparameters share one instance;
the first instance of a class is named after it ("kfac"), further ones "kfac_v2", "kfac_v3", ...,
which names their groups ("kfac_v2_0") and their variables in the generated update
(`model.update_code`), so that several instances of one class never collide.

"auto" compares, per block, the candidates that the registered preconditioners offer
(`in_auto`, `auto_candidates`) in their fidelity order, for the built-in ones

    shampoo (its max_block) ≥ kfac > shampoo with max_block halved, down to Shampoo.MIN_BLOCK > rank1 > diag

(blocking a large dimension cuts Shampoo's cost before fidelity is given up) and takes the first
whose memory is at most `memory_budget` times the block's parameter memory and whose amortized
FLOPs per step are at most `compute_budget` times an AdamW step's on the block (gnfx.cost, with
`cost_rows` rows per call site on statistic steps). The statistics asked for beside the preconditioners'
(`statistics=`) are not counted: they are taken whatever the choice, so they cannot decide it (counted, a
Conv2d(1, 1, 3) asked for A and S needed 21x its memory even with diag, and "auto" had nothing to offer).
The plan is deterministic, and a larger
budget never gives a less faithful choice: the candidates that fit only grow with the budget.
Each entry records why it was chosen (`plan.entries[name].why`, the report's last column).

`make_plan` returns the plan as a value and leaves the analyzed LayerTable as it is. The plan's
`table` is the view of both that the rest of gnfx reads (`model.layers`): a LayerTable of copies of
the blocks and fallbacks with the plan's choices filled in, `preconditioner` (the instance's class
name) and `block.max_factor` (which blocks the block's big factors, gnfx.layouts.base: the
preconditioner's `max_factor`, or below it where the preconditioner's `factor_bound` lowers it at
`cost_rows` rows, as K-FAC does when applying its blocks would cost far more than the layer's own
products; the reason says so), and `plan` (this plan).

The plan precedes any batch. Where cost_rows was not given, the optimizer re-plans the factor bounds at
the end of the first statistic forward, before any statistic is accumulated, at the rows each block's
call sites saw (`bounds_at_rows`, `rebound`: gnfx.optimizer `GnfxOptimizer.bound_factors_at_rows`); the
block's reason then names those rows. Only the bounds are re-planned: "auto" chose its preconditioners
at cost_rows.
"""
from __future__ import annotations

import dataclasses
import fnmatch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import positive, resolve
from gnfx.layer_table import LayerTable
from gnfx.preconditioners import REGISTRY

FALLBACK = "diag"
ROWS_SEEN = "seen by the first statistic forward"  # where the rows of a re-planned factor bound come from
AUTO = "auto"
BUDGETS = {  # gnfx.compile keywords (gnfx.api.COMMON), and the hyperparameters of an ("auto", {...}) pattern
    "memory_budget": positive("optimizer='auto': a block's optimizer state and the statistics its preconditioner "
                              "needs (not those asked for with statistics=), at most this multiple of its parameters' "
                              "memory (AdamW: 2)", 8.0),
    "compute_budget": positive("optimizer='auto': a block's amortized optimizer FLOPs per step, at most this "
                               "multiple of an AdamW step's on it (10 per parameter)", 30.0),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    name: str  # a preconditioner name or "auto"
    overrides: dict


def _valid_names() -> str:
    return ", ".join([*REGISTRY, AUTO])


class Policy:
    """The `optimizer` argument of gnfx.compile, validated: rules (pattern, name, overrides)."""

    def __init__(self, optimizer, given: dict):
        self.explicit = isinstance(optimizer, dict)
        if isinstance(optimizer, str):
            self.rules = [Rule("*", self._name(optimizer, f"optimizer={optimizer!r}"), {})]
        elif self.explicit and optimizer:
            self.rules = [self._rule(pattern, value) for pattern, value in optimizer.items()]
        else:
            raise ConfigError(f"optimizer={optimizer!r} is not a gnfx optimizer: pass one of {_valid_names()}, "
                              f"or a dict of glob patterns such as {{'*.attn.*': 'shampoo', '*': 'diag'}}")
        if not self.uses_auto and set(given) & set(BUDGETS):
            raise ConfigError(f"{', '.join(sorted(set(given) & set(BUDGETS)))} only apply to optimizer='auto'; "
                              f"choose 'auto' (for every block or in a pattern) or leave them out")

    @staticmethod
    def _name(name, context: str) -> str:
        if not isinstance(name, str) or (name not in REGISTRY and name != AUTO):
            raise ConfigError(f"{context} is not a gnfx optimizer; valid names are: {_valid_names()}")
        return name

    def _rule(self, pattern, value) -> Rule:
        if not isinstance(pattern, str):
            raise ConfigError(f"optimizer policy keys are glob patterns on block names (str); got {pattern!r}")
        context = f"pattern {pattern!r}"
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], dict):
            name, overrides = self._name(value[0], f"{context}: {value[0]!r}"), dict(value[1])
        else:
            name, overrides = self._name(value, f"{context}: {value!r}"), {}
        if name == AUTO:
            resolve(BUDGETS, overrides, f"{context} ('auto')")
        else:
            per_group = sorted(set(overrides) & set(REGISTRY[name].per_group_hparams))
            if per_group:
                raise ConfigError(f"{', '.join(per_group)} of {name} are read from optimizer.param_groups; set them "
                                  f"per parameter group (model.optimizer.param_groups), not per pattern ({context})")
            resolve(REGISTRY[name].HPARAMS, overrides, f"{context} ({name})")
        return Rule(pattern, name, overrides)

    @property
    def uses_auto(self) -> bool:
        return any(r.name == AUTO for r in self.rules)

    @property
    def auto_names(self) -> list[str]:
        """The preconditioners "auto" may choose (registered with `in_auto`), if the policy uses it."""
        return [name for name, cls in REGISTRY.items() if cls.in_auto] if self.uses_auto else []

    @property
    def names(self) -> list[str]:
        """The preconditioners this policy may use: those named, "diag", and those "auto" may choose."""
        named = [r.name for r in self.rules if r.name != AUTO]
        return list(dict.fromkeys(named + [FALLBACK] + self.auto_names))

    def hparam_specs(self) -> dict:
        """The hyperparameters of every preconditioner the policy may use (gnfx.compile keywords)."""
        specs = {}
        for name in reversed(self.names):  # the first named preconditioner's defaults win the merge
            specs.update(REGISTRY[name].HPARAMS)
        return specs

    def match(self, name: str) -> int | None:
        """The index of the first rule whose pattern matches `name`, or None."""
        return next((i for i, r in enumerate(self.rules) if fnmatch.fnmatchcase(name, r.pattern)), None)

    def describe(self, rule: Rule) -> str:
        if not self.explicit:
            return f"optimizer={rule.name!r}"
        settings = "".join(f", {k}={v!r}" for k, v in rule.overrides.items())
        return f"pattern {rule.pattern!r}{settings}"


@dataclasses.dataclass
class Entry:
    """The plan for one block or loose parameter. `fidelity` is the chosen candidate's position in
    auto's order for this block (0: the most faithful), None where a name was given."""

    name: str
    hparams: dict
    reason: str
    fidelity: int | None = None
    # a block's factor bound (gnfx.layouts.base; None: factors whole), the preconditioner's `factor_bound`,
    # and why where it is below the preconditioner's max_factor
    max_factor: int | None = None
    bound_reason: str = ""
    rows_seen: int | None = None  # the rows per call site the bound was chosen at (None: cost_rows)

    @property
    def why(self) -> str:
        """Why the preconditioner serves it, and why its factors are bounded as they are."""
        return self.reason + (f"; {self.bound_reason}" if self.bound_reason else "")


class Plan:
    """Entries by block or parameter name; `table`, the analyzed table with the plan's choices (module
    docstring); `specs()` for the optimizer, `needs(block)` for the taps."""

    def __init__(self, table: LayerTable, entries: dict[str, Entry]):
        self.entries = entries
        blocks = [dataclasses.replace(b, preconditioner=entries[b.name].name, max_factor=entries[b.name].max_factor)
                  for b in table]
        fallbacks = [dataclasses.replace(f, preconditioner=entries[f.param].name) for f in table.fallbacks]
        self.table = LayerTable(blocks, fallbacks, table.leaves, table.form, table.notes, table.opened)
        self.table.capture = table.capture
        self.table.plan = self

    def bounds_at_rows(self, rows_per_site: dict[str, int], settings: dict) -> dict[str, tuple]:
        """(max_factor, why, rows per call site or None) of each block with a factor bound whose bound is
        not the plan's now: the bound at cost_rows (the plan's at gnfx.compile), or, for a block given its
        rows per call site (`rows_per_site`), the smaller bound its preconditioner chooses at those rows
        where that pays (`smaller_bound`), with the rows."""
        out = {}
        for block in self.table:
            entry = self.entries[block.name]
            bound, why = _planned_bound(block, entry, settings)
            rows = rows_per_site.get(block.name)
            if bound is not None and rows:
                at, g = _cost_at(block, entry, settings, rows)
                smaller = REGISTRY[entry.name].smaller_bound(entry.hparams, dataclasses.replace(block, max_factor=bound),
                                                             g, at, f"{rows} per call site, {ROWS_SEEN}")
                bound, why, rows = (*smaller, rows) if smaller is not None else (bound, why, None)
            else:
                rows = None
            if (bound, why, rows) != (entry.max_factor, entry.bound_reason, entry.rows_seen):
                out[block.name] = (bound, why, rows)
        return out

    def rebound(self, bounds: dict[str, tuple]) -> None:
        """Set the factor bound, its reason and the rows it was chosen at of the blocks in `bounds` (by
        name, as `bounds_at_rows` gives them) in the entries and in `table`'s blocks."""
        for name, (bound, why, rows) in bounds.items():
            entry = self.entries[name]
            entry.max_factor, entry.bound_reason, entry.rows_seen = bound, why, rows
        self.table.blocks = [dataclasses.replace(b, max_factor=self.entries[b.name].max_factor)
                             if b.name in bounds else b for b in self.table.blocks]
        self.table.reindex()

    def rows_seen(self) -> dict[str, int]:
        """The rows per call site of each block whose factor bound was chosen at the rows it saw."""
        return {name: e.rows_seen for name, e in self.entries.items() if e.rows_seen is not None}

    def needs(self, block) -> frozenset[str]:
        e = self.entries[block.name]
        return REGISTRY[e.name].needs(e.hparams)

    def specs(self) -> list:
        """(constructor, hparams, blocks, loose parameters), one per preconditioner instance: per
        (class, hyperparameters), in the order the table first uses them."""
        instances: dict[tuple, tuple] = {}
        members = [(b.name, b, True) for b in self.table] + [(f.param, f.param, False) for f in self.table.fallbacks]
        for key, member, is_block in members:
            e = self.entries[key]
            spec = instances.setdefault((e.name, repr(sorted(e.hparams.items()))), (e.name, e.hparams, [], []))
            spec[2 if is_block else 3].append(member)
        count: dict[str, int] = {}
        out = []
        for name, hp, blocks, params in instances.values():
            count[name] = count.get(name, 0) + 1
            instance = name if count[name] == 1 else f"{name}_v{count[name]}"
            out.append((_constructor(REGISTRY[name], instance), hp, blocks, params))
        return out


def _constructor(cls, instance: str):
    """`cls` itself, or for a further instance of it a constructor whose instance is called
    `instance` (set before __init__, which names the groups after it)."""
    if instance == cls.name:
        return cls

    def construct(hp, blocks, params, parameters):
        pre = cls.__new__(cls)
        pre.name = instance
        pre.__init__(hp, blocks, params, parameters)
        return pre

    return construct


def make_plan(table, policy: Policy, given: dict, settings: dict, params: dict) -> Plan:
    """The plan: a preconditioner and its hyperparameters for every block and loose parameter of
    `table`, which is left as it is (the plan's `table` holds the choices).

    `given` are the gnfx.compile keywords, `settings` the resolved ones (budgets, statistics,
    stat_every, kfac_approx, cost_rows), `params` the model's parameters by name.
    """
    base = {name: resolve(REGISTRY[name].HPARAMS, {k: v for k, v in given.items() if k in REGISTRY[name].HPARAMS},
                          f"optimizer {name!r}") for name in policy.names}
    wins = [0] * len(policy.rules)
    entries = {}
    for block in table:
        i = policy.match(block.name)
        if i is None:
            entries[block.name] = Entry(FALLBACK, base[FALLBACK], "no pattern matches it: diag")
            continue
        rule = policy.rules[i]
        if rule.name == AUTO:
            budgets = {**{k: settings[k] for k in BUDGETS}, **rule.overrides}
            entries[block.name] = choose(block, base, policy.auto_names, budgets, settings, params)
        else:
            hp, cls = {**base[rule.name], **rule.overrides}, REGISTRY[rule.name]
            if not cls.serves(block, hp):  # declined: the fallback, and the pattern wins nothing by it
                entries[block.name] = Entry(FALLBACK, base[FALLBACK], f"{policy.describe(rule)}: {rule.name} "
                                                                      f"serves {cls.serves_only} only: diag")
                continue
            entries[block.name] = Entry(rule.name, hp, policy.describe(rule))
        wins[i] += 1
    for block in table:
        entries[block.name].max_factor, entries[block.name].bound_reason = _planned_bound(block, entries[block.name],
                                                                                          settings)
    for fb in table.fallbacks:
        i = policy.match(fb.param)
        rule = policy.rules[i] if i is not None else None
        serves = rule is not None and (rule.name == FALLBACK or (
            rule.name != AUTO and REGISTRY[rule.name].claims_fallback(fb.shape)))
        if serves:
            wins[i] += 1
            entries[fb.param] = Entry(rule.name, {**base[rule.name], **rule.overrides}, policy.describe(rule))
        else:
            entries[fb.param] = Entry(FALLBACK, base[FALLBACK], "not in a curvature block: diag")
    if policy.explicit:
        _check_patterns(policy, wins, table)
    return Plan(table, entries)


def _planned_bound(block, entry: Entry, settings: dict) -> tuple[int | None, str]:
    """The entry's factor bound, the largest factor dimension its block keeps whole, as its
    preconditioner's `factor_bound` chooses it at the cost model's rows (`cost_rows` per call site),
    and why where that is not the preconditioner's own max_factor."""
    at, g = _cost_at(block, entry, settings, settings["cost_rows"])
    return REGISTRY[entry.name].factor_bound(entry.hparams, block, g, at)


def _cost_at(block, entry: Entry, settings: dict, rows_per_site: int):
    """The cost model's numbers for `block` under `entry` at `rows_per_site` rows per call site, and the
    block's geometry at them."""
    at = cost.symbols_for(entry.hparams, settings["stat_every"], d_in=block.d_in, d_out=block.d_out,
                          B=rows_per_site, R=len(block.sites))
    return at, cost.geometry_of(block, at)


def _check_patterns(policy: Policy, wins: list[int], table) -> None:
    names = [b.name for b in table] + [f.param for f in table.fallbacks]
    for rule, won in zip(policy.rules, wins):
        if won:
            continue
        matched = [n for n in names if fnmatch.fnmatchcase(n, rule.pattern)]
        if not matched:
            raise ConfigError(f"optimizer policy: pattern {rule.pattern!r} matches no block; blocks are: "
                              f"{', '.join(b.name for b in table)}")
        raise ConfigError(f"optimizer policy: pattern {rule.pattern!r} takes nothing: {', '.join(matched)} "
                          f"{'is' if len(matched) == 1 else 'are'} taken by an earlier pattern or not served by "
                          f"{rule.name} (the first matching pattern wins: put specific patterns first)")


def candidates(geometry: cost.Geometry, base: dict, names) -> list[tuple[str, dict, str]]:
    """(preconditioner, hyperparameters, detail) in auto's fidelity order for a block of `geometry`:
    the candidates every preconditioner in `names` offers (`auto_candidates`, with its hyperparameters
    `base[name]`), sorted by fidelity (ties in the order of `names`)."""
    offered = [(c.fidelity, name, c) for name in names for c in REGISTRY[name].auto_candidates(base[name], geometry)]
    return [(name, c.hparams, c.detail) for _, name, c in sorted(offered, key=lambda x: x[0])]


def choose(block, base: dict, names, budgets: dict, settings: dict, params: dict) -> Entry:
    """The first of `candidates` of the preconditioners `names` within the budgets (module
    docstring), with the reason."""
    memory_budget, compute_budget = budgets["memory_budget"], budgets["compute_budget"]
    tensors = [params[n] for n in block.params]
    numel = sum(t.numel() for t in tensors)
    param_bytes = sum(t.numel() * t.element_size() for t in tensors)
    sizes = cost.storage_sizes(tensors[0])
    first_miss = None
    geometry = cost.geometry_of(block, {"d_in": block.d_in, "d_out": block.d_out})
    names = [name for name in names if REGISTRY[name].serves(block, base[name])]
    for rank, (name, hp, detail) in enumerate(candidates(geometry, base, names)):
        at = cost.symbols_for(hp, settings["stat_every"], d_in=block.d_in, d_out=block.d_out,
                              B=settings["cost_rows"], R=len(block.sites))
        f = cost.formulas(REGISTRY[name], hp, cost.geometry_of(block, at), REGISTRY[name].needs(hp),
                          settings["kfac_approx"], at)
        memory = float(f.memory(sizes)) / param_bytes
        compute = float(f.flops) / (cost.ADAMW * numel)
        usage = f"memory {memory:.1f}x, compute {compute:.1f}x"
        if memory <= memory_budget and compute <= compute_budget:
            reason = f"auto{f' ({detail})' if detail else ''}: {usage} within {memory_budget:g}x, {compute_budget:g}x"
            return Entry(name, hp, reason + (f"; {first_miss}" if first_miss else ""), rank)
        first_miss = first_miss or f"{name}{f' ({detail})' if detail else ''} needs {usage}"
    raise ConfigError(f"optimizer='auto': nothing fits block {block.name!r} within memory_budget={memory_budget:g} "
                      f"and compute_budget={compute_budget:g}; the cheapest, diag, needs {usage} (of the block's "
                      f"parameter memory and of an AdamW step): raise the budgets")
