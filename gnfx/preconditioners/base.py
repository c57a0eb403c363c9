"""The interface every preconditioner implements.

A preconditioner owns a set of curvature blocks and of loose parameters (those no block claims,
or all parameters for the diagonal preconditioner). It declares its hyperparameters (`HPARAMS`)
and the statistics it needs from the taps of each block (`needs`), and keeps its state in the
optimizer's per-parameter state, so that `state_dict`/`load_state_dict` carry it. It is given
everything it reads as values, never the optimizer: its resolved hyperparameters `hp` (with the
statistics settings of gnfx.compile every preconditioner may read, `stat_decay` β,
`stat_every` and `refresh_warmup`: STATISTIC_SETTINGS), and the parameters with their state and param groups (a
gnfx.parameter_store.ParameterStore) at construction; the statistics store and the communicator
as arguments of the calls that use them (`refresh`, `update`, `curvature_product`). The diagonal
preconditioner updates its parameters itself (`update`, foreach kernels); the curvature
preconditioners supply batched math to the generated update function (see curvature.py).

Besides the math, a class says everything else gnfx asks about it (docs/design.md, "Adding a
preconditioner"): its memory and FLOPs (`cost_parts`, for `model.cost()`, the report and
"auto"), the blocks it serves (`serves`; the others get the fallback, "diag"), what "auto" may
try (`auto_candidates`), the hyperparameters it reads from the
optimizer's param groups (`per_group_hparams`), and the state a checkpoint must hold for it
(`expected_state`).
"""
from __future__ import annotations

import dataclasses

import torch

from gnfx.errors import NoCostModel
from gnfx.hparams import HParam


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration "auto" may choose for a block: the preconditioner's hyperparameters, a
    note for the report (e.g. "max_block=64"), and its fidelity: "auto" tries the candidates of all
    registered preconditioners from the lowest fidelity number (the most faithful) up. The built-in
    scale: 0 Shampoo with its own max_block, 1 K-FAC, [2, 3) Shampoo with max_block halved, 3
    rank-k, 4 the diagonal."""

    fidelity: float
    hparams: dict
    detail: str = ""


# gnfx.compile's statistics settings, added to every preconditioner's `hp` by the optimizer
STATISTIC_SETTINGS = ("stat_decay", "stat_every", "refresh_warmup")


def collects_statistics(step: int, stat_every: int, refresh_warmup: int) -> bool:
    """Whether step `step` collects statistics: every stat_every-th and each of the first
    refresh_warmup (the optimizer's rule, which the preconditioners follow)."""
    return step % stat_every == 0 or step < refresh_warmup


class Preconditioner:
    name: str = ""
    HPARAMS: dict[str, HParam] = {}
    # the hyperparameter that is a Tikhonov damping λ on the scale of the GGN, which the
    # quadratic-model step (gnfx.quadratic_step) moves with its Levenberg–Marquardt λ; None: none
    tikhonov_damping: str | None = None
    # λ as the compiled update reads it (`damping`), filled by `hold_damping`; None until then
    held_damping: torch.Tensor | None = None
    _held_value: float | None = None  # the λ held_damping holds
    # state every rank keeps a copy of under FSDP2 (gnfx.fsdp): the bases its taps measure in (EKFAC)
    tap_state: tuple[str, ...] = ()
    # why it does not run under FSDP2 yet (gnfx.fsdp refuses it with this reason); "": it does
    unshardable: str = ""
    # whether gnfx.compile's step="auto" means step="quadratic" for optimizer=<this name> when loss= is
    # given and lr is not (benchmarks/results/quadratic_step.md measures which gain by it)
    quadratic_by_default: bool = False
    # gnfx.compile's `refresh_warmup` under step="quadratic" unless given (the largest of the plan's)
    quadratic_refresh_warmup: int = 0
    # whether optimizer="auto" may choose it (as `auto_candidates` offers)
    in_auto: bool = False
    # hyperparameters read from optimizer.param_groups (set per group, never per pattern)
    per_group_hparams: tuple[str, ...] = ()
    # whether gnfx.compile takes fisher="mc" for it when loss= is given, whatever the step (a
    # preconditioner whose curvature is a sketch of the true Fisher: rank1)
    true_fisher_by_default: bool = False
    # why it cannot take step="quadratic" (gnfx.compile refuses it with this reason); "": it can
    no_quadratic_step: str = ""
    # the blocks it serves, for the plan's reason where `serves` declines one ("hidden matrices")
    serves_only: str = ""
    # what changed in the state it keeps, said by gnfx.checkpoint when a checkpoint lacks an entry
    # of it (one written before the change); "": nothing changed
    state_change: str = ""

    def __init__(self, hp: dict, blocks: list, params: list[str], parameters):
        """Serve `blocks` and the loose parameters named `params`, with hyperparameters `hp`,
        over `parameters` (a gnfx.parameter_store.ParameterStore)."""
        self.hp = hp
        self.blocks = blocks
        self.param_names = params
        self.parameters = parameters

    def publish_bases(self, statistics) -> None:
        """Give the taps of `statistics` (a gnfx.statistics.StatisticsStore) the bases they measure
        statistics in (`BlockStatistics.basis`: EKFAC's); called once the instance is built. None by
        default."""

    @classmethod
    def needs(cls, hp: dict) -> frozenset[str]:
        """The statistics (names in gnfx.statistics.STATISTICS) this preconditioner needs per block."""
        return frozenset()

    @classmethod
    def serves(cls, block, hp: dict) -> bool:
        """Whether it serves `block` (a gnfx.table block) when a rule of the policy names it, with
        its resolved hyperparameters `hp` (default: every block). gnfx.plan gives a declined block
        the fallback, "diag", and says why ("<name> serves <serves_only> only: diag")."""
        return True

    @classmethod
    def default_chain(cls, hp: dict) -> list:
        """The update chain (gnfx.transforms) after its direction, from its hyperparameters `hp`;
        none for a preconditioner that updates its parameters itself (`update`, as the diagonal)."""
        return []

    @classmethod
    def claims_fallback(cls, shape) -> bool:
        """Whether this preconditioner also serves a parameter no block claims (default: no,
        such parameters get the diagonal preconditioner)."""
        return False

    @classmethod
    def cost_parts(cls, g, hp: dict, at: dict):
        """Memory and FLOPs on one block or loose parameter `g` (a gnfx.cost.Geometry), as a
        gnfx.cost.Parts of sympy expressions in the symbols of `at` (gnfx.cost.SYMBOLS, or numbers).
        Without it (this default raises NoCostModel) `model.cost()` raises, the report shows the
        state memory as unknown, and "auto" cannot weigh this preconditioner."""
        raise NoCostModel(f"preconditioner {cls.name!r} ({cls.__module__}.{cls.__qualname__}) has no cost formulas: "
                          f"define the classmethod cost_parts(g, hp, at) returning a gnfx.cost.Parts "
                          f"(docs/design.md, 'Adding a preconditioner')")

    @classmethod
    def factor_bound(cls, hp: dict, block, g, at: dict, rows_from: str = "cost_rows per call site") -> tuple[int | None, str]:
        """The largest factor dimension `block` keeps whole (`block.max_factor`, gnfx.layouts.base;
        None: every factor whole), with `g` its gnfx.cost.Geometry and `at` the cost model's numbers
        (its rows B·R, which `rows_from` says where they came from), and why where that is not the
        preconditioner's own `max_factor` ("" otherwise).
        Default: hp's max_factor, for a preconditioner that declares one."""
        return hp.get("max_factor") or None, ""

    @classmethod
    def smaller_bound(cls, hp: dict, block, g, at: dict, rows_from: str) -> tuple[int, str] | None:
        """A factor bound below the planned `block.max_factor` (and why) that `factor_bound` gives at the
        rows of `at` (the rows the block's call sites saw on the first statistic forward) where re-planning
        the block with it pays, else None (gnfx.plan `Plan.bounds_at_rows`). None by default."""
        return None

    @classmethod
    def auto_candidates(cls, hp: dict, g) -> list[Candidate]:
        """The configurations "auto" may try on a block of geometry `g` (gnfx.cost.Geometry, in
        numbers), `hp` this preconditioner's resolved hyperparameters; asked only of a class with
        `in_auto` set. None by default."""
        return []

    def parameter_direction(self, name: str, grad):
        """P(g): this preconditioner's direction for parameter `name`'s gradient `grad`, from its
        state as it is (left unchanged), for gnfx.diagnose. An elementwise preconditioner defines it
        (a curvature one is asked per piece: its `direction` on a copy of the state)."""
        raise NotImplementedError(f"{type(self).__qualname__} defines no parameter_direction(name, grad) for "
                                  f"gnfx.diagnose (docs/design.md, 'Adding a preconditioner')")

    def parameter_curvature(self, name: str, V):
        """Ĝ V for parameter `name`, V shaped like it: the curvature this preconditioner models,
        undamped (gnfx.diagnose); None where it models none (the default)."""
        return None

    def damping(self):
        """λ = hp[tikhonov_damping] as the update reads it: inside the compiled update the 0-d tensor
        `held_damping` that the update function filled with it before the call (`hold_damping`),
        since dynamo takes a Python float for a constant and guards on its value, and the quadratic
        step's λ, which moves at each adaptation, would compile a new graph each time (until dynamo's
        recompile limit, after which the update runs eagerly); elsewhere the number itself."""
        if torch.compiler.is_compiling():
            return self.held_damping
        return self.hp[self.tikhonov_damping]

    def hold_damping(self, device: torch.device) -> None:
        """Fill `held_damping` (float64, on `device`) with λ = hp[tikhonov_damping], outside the
        compiled update (`damping`)."""
        value = self.hp[self.tikhonov_damping]
        if self.held_damping is None or self.held_damping.device != device:
            self.held_damping = torch.zeros((), dtype=torch.float64, device=device)
        elif value == self._held_value:
            return  # unchanged since the last fill (λ moves at adaptations only): no op on the step
        self.held_damping.fill_(value)
        self._held_value = value

    def follow_parameters(self) -> None:
        """Move the state this instance keeps with its parameters, which the model's .to(), .cuda() or
        .double() moved after steps were taken; by default as torch.optim's load_state_dict places a
        checkpoint's state: each tensor of a parameter's state (its blocks' parameters and its loose ones)
        to that parameter's device, a floating one in its dtype."""
        for name in [n for b in self.blocks for n in b.params] + list(self.param_names):
            p, state = self.parameters.param(name), self.parameters.state_of(name)
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)

    def expected_state(self) -> dict[str, dict]:
        """Parameter name -> {state key: (shape, dtype) of a tensor, or None for a number}: the state
        this instance keeps in optimizer.state (the current tensors where they exist, else what it
        would create), against which gnfx.checkpoint checks a loaded checkpoint; none by default."""
        return {}
