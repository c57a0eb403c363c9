"""The cost model: memory and FLOPs of each preconditioner on each block, as sympy formulas.

Each preconditioner's own formulas are its class's `cost_parts(g, hp, at)` (in its file in
gnfx/preconditioners/), written with the geometry, constants and helpers of this module; this
module adds the statistics the taps keep (`tap_statistics`) and sums them (`formulas`).
gnfx.plan_cost evaluates them on a compiled model's plan (`model.cost()`).

A block `z = W a (+ b)` is seen through its folded gradient `[∇W ∇b]`, a d_out x d_a matrix with
`d_a = d_in + 1` with a bias (else d_in); n = d_out·d_a entries. For a conv, d_in = C_in·prod(kernel)
and a position is an output location; for an embedding, d_in is the vocabulary and `A` is
diagonal. A block of g independent row groups (gnfx.layouts.base: grouped convolutions, norm
affine parameters, d_out = g·s) has g factor pairs, d_a x d_a and s x s. A loose parameter (one no
block claims) is seen as its own tensor of shape (d_1, ..., d_k). The symbols:

    d_in, d_out     the block's sizes
    B, R            examples per step, positions per example summed over the block's call sites
                    (tokens, conv output locations; a tied weight used at two sites: R = 2T)
    max_block       Shampoo/SOAP blocking: a dimension d > max_block is cut into
                    c = ⌈d / max_block⌉ near-equal blocks, r of size q + 1 and c - r of size q
                    (q = ⌊d / c⌋, r = d - c q), as gnfx.targets.cut does
    diagonal_above  Shampoo/SOAP: a dimension d > diagonal_above (> 0) is kept whole, with a diagonal
                    factor of d entries (Shampoo) or unrotated (SOAP) (`above(d, diagonal_above)` is 1
                    there, else 0)
    max_factor      K-FAC's big factors: a factor of d > max_factor entries (0: none; A's bias
                    entry not counted) is kept as m = factor_count(d, ...) diagonal blocks of
                    b = factor_size(d, ...) entries, the last one zero-padded
                    (gnfx.layouts.base.factor_blocks; for A, blocks of whole input units: a
                    conv's prod(kernel)); it costs m b² entries, m b³ to invert, and
                    2 ((m - 1) b² + r²) c to apply to a matrix of c columns, r = d - (m - 1) b
                    the last block's entries (`applied_squares`: the padding is never applied)
    k               the tracked rank of "rank1"
    stat_every      steps between statistic steps
    inv_every, precondition_frequency   steps between refreshes (K-FAC/EKFAC, Shampoo/SOAP)

**Memory** is exact: the entries of every tensor the optimizer state (per preconditioner, see
gnfx/preconditioners) and the statistics (gnfx.statistics: an accumulator and a moving average
per statistic the block needs) hold once training runs. In the seed's complexity table: K-FAC
keeps `d_a² + d_out²` per factor set: the inverses, and the statistics A and S as averages and
as accumulators (A's accumulator is Σ a aᵀ, d_in², plus Σ a with a bias; A is d_a entries for an
embedding); Shampoo keeps one factor and one root per dimension, `Σ_j d_j²` per
block (with blocking `Σ_blocks Σ_j c_j²`), rank-k `(k + 2) n + k + 2` and the diagonal `2n`.
Factors, statistics and Adam's moments of "diag" are float64 for a float64 weight and float32
otherwise ("factor" storage; float16 and bfloat16 parameters included), counters are int64.

**FLOPs** are leading-order counts: a product (m x p)(p x q) is 2mpq, a symmetric
eigendecomposition with eigenvectors 9d³ (Golub & Van Loan, §8.3), a thin QR of an m x p matrix
with Q formed 4mp² - 4/3·p³, an elementwise operation 1 per entry; a step of AdamW is 10 per
parameter entry (the reference of the compute budget), and a block's own forward and backward
products are 6 per parameter entry and row (`LAYER`: W a, Wᵀ g, g aᵀ). Per block:

    statistics   per statistic step: the taps' statistics (A = Σ a aᵀ over B·R rows: 2BR·d_in²,
                 S: 2BR·d_out², per-example diagonals: 2BR·n + 2B·n; under kfac_approx="reduce"
                 A and S have B rows after a sum over positions), their moving averages, and the
                 curvature the preconditioner updates from the gradient (Shampoo's Gram matrices
                 2n·Σ_j d_j, rank-k's QR of an n x (k+1) matrix)
    refresh      per refresh: the amortized decompositions (K-FAC: a Cholesky inverse, d³ per
                 factor, or with root_method="eigh" an eigendecomposition and the inverse-power
                 reconstruction, 11d³; "newton": an estimate, NEWTON_ITERATIONS iterations)
    update       per step: the preconditioned direction (K-FAC/Shampoo: 2n·(d_out + d_a)), then
                 the stages of its update chain (gnfx.transforms: grafting, KL clipping, momentum,
                 weight decay and the step), each `flops_per_entry()` per entry, whose state
                 the chain's stages add (`chain_parts`)
    flops        amortized per step: statistics / stat_every + refresh / interval + update

`fisher="mc"`/`"type2"` add one backward of the whole model per statistic step, not counted
here (it is the model's cost, not a block's).
"""
from __future__ import annotations

import dataclasses

import sympy as sp
import torch

from gnfx.errors import GnfxError
from gnfx.layouts import layout_class, layout_of
from gnfx.layouts.base import factor_blocks
from gnfx.statistics import LATEST

SYMBOLS = {name: sp.Symbol(name, positive=True, integer=True) for name in (
    "d_in", "d_out", "B", "R", "max_block", "diagonal_above", "max_factor", "k", "stat_every", "inv_every",
    "precondition_frequency", "W")}

FACTOR, INT64 = "factor", "int64"  # storage of a state tensor (see module docstring)

ADAMW = 10  # FLOPs per parameter entry of an AdamW step
EIGH = 9  # d³ coefficient of a symmetric eigendecomposition with eigenvectors
CHOLESKY = 1  # d³ coefficient of (F + λI)⁻¹ by Cholesky: the factor d³/3, the inverse from it 2d³/3
# coupled Newton iterations until convergence, an estimate (they stop on convergence; 13-22 for
# condition numbers 1e3-1e6, gnfx.linalg): the only figure of the cost model that is not exact
NEWTON_ITERATIONS = 20
EMA = 4  # normalize a batch statistic, F ← βF + (1-β)F_batch, per entry
# Shampoo's diagonal factors, per gradient entry along a diagonal mode: its diagonal Gram (square, add),
# the entrywise scaling that applies its root; per factor entry: the entrywise damped root
DIAGONAL_GRAM, DIAGONAL_SCALE, DIAGONAL_ROOT = 2, 1, 3
ADAM_ROTATED = 11  # SOAP's Adam step in the eigenbasis, per entry
DIAGONAL_A = 1  # K-FAC on an embedding: S⁻¹G scaled by the diagonal A⁻¹, per entry
DAMPED_DIVIDE = 2  # EKFAC's division by s + λ, per entry
FACTORED_DAMPING = 1  # EKFAC's factored damping D_ji = (λ_A σ_j + λ) + λ_S a_i (outer sum), per entry
LAYER = 6  # a block's own products per parameter entry and row: the forward W a, the backward Wᵀ g and g aᵀ
SOLVE = 2  # rank-k: Woodbury's elementwise FLOPs per entry and eigenpair (1/(D+λ), U√ŝ, E⁻¹Y) and its k x k solve per k³


def qr_flops(m, p):
    """A thin QR of an m x p matrix with Q formed (Householder)."""
    return 4 * m * p ** 2 - sp.Rational(4, 3) * p ** 3


def inverse_power_coefficient(method: str, r: int = 1) -> int:
    """The d³ coefficient of `(F + λI)^{-1/r}` by `method` (gnfx.linalg): eigh and the
    reconstruction Q diag((d + λ)^{-p}) Qᵀ; Cholesky (r = 1); or NEWTON_ITERATIONS iterations of
    the coupled Newton iteration, each X T, T^r (by squaring) and T^r M."""
    if method == "cholesky":
        return CHOLESKY
    if method == "newton":
        products = 2 + (r.bit_length() - 1) + (bin(r).count("1") - 1)
        return NEWTON_ITERATIONS * 2 * products
    return EIGH + 2


def inverse_power_flops(d, method: str = "eigh", r: int = 1):
    """`(F + λI)^{-1/r}` of one d x d factor (the damped diagonal adds d²)."""
    return inverse_power_coefficient(method, r) * d ** 3 + d ** 2


@dataclasses.dataclass(frozen=True)
class Mode:
    """Dimension j of a target cut into blocks: `rest` = Π_{i≠j} d_i entries and `count` = Π_{i≠j} c_i
    blocks along the other dimensions, and the power sums Σ c_j², Σ c_j³ of its own block sizes; for a
    dimension kept whole and diagonal (`whole`: above diagonal_above, 1, else 0) those are 0 and `diagonal`
    is its size d_j (else 0)."""

    rest: sp.Expr
    count: sp.Expr
    squares: sp.Expr
    cubes: sp.Expr
    whole: sp.Expr = sp.Integer(0)
    size: sp.Expr = sp.Integer(0)

    @property
    def diagonal(self):
        return self.whole * self.size


class n_blocks(sp.Function):
    """n_blocks(d, b) = ⌈d / b⌉: the blocks of a dimension d cut at max_block b (1 if d <= b)."""

    @classmethod
    def eval(cls, d, b):
        if (b - d).is_nonnegative:
            return sp.Integer(1)
        if d.is_Integer and b.is_Integer:
            return sp.ceiling(d / b)
        return None


class block_sum(sp.Function):
    """block_sum(d, b, p) = Σ_blocks size^p of a dimension d cut at max_block b into c = ⌈d / b⌉
    near-equal blocks: r = d - c q of size q + 1 and c - r of size q, q = ⌊d / c⌋ (d^p if d <= b)."""

    @classmethod
    def eval(cls, d, b, p):
        if (b - d).is_nonnegative:
            return d ** p
        if d.is_Integer and b.is_Integer:
            c = sp.ceiling(d / b)
            q = d // c
            r = d - c * q
            return r * (q + 1) ** p + (c - r) * q ** p
        return None


def _factor_blocks(d, f, u, e, i: int):
    """Entry i of (m, b) = gnfx.layouts.base.factor_blocks(d, f, u, e) where it is known: (1, d) when
    f = 0 or d - e <= f, the numbers for numbers; None (unevaluated) otherwise."""
    if f.is_zero or (f - d + e).is_nonnegative:
        return (sp.Integer(1), d)[i]
    if all(x.is_Integer for x in (d, f, u, e)):
        return sp.Integer(factor_blocks(int(d), int(f), int(u), int(e))[i])
    return None


class factor_count(sp.Function):
    """factor_count(d, f, u, e): the m diagonal blocks a K-FAC factor of d entries (e of them a bias
    entry) is kept as with max_factor f and input unit u (gnfx.layouts.base.factor_blocks; 1 if
    d - e <= f or f = 0)."""

    @classmethod
    def eval(cls, d, f, u, e):
        return _factor_blocks(d, f, u, e, 0)


class factor_size(sp.Function):
    """factor_size(d, f, u, e): the entries b of each diagonal block of that factor (d if whole)."""

    @classmethod
    def eval(cls, d, f, u, e):
        return _factor_blocks(d, f, u, e, 1)


def applied_squares(d, m, b):
    """Σ_blocks size² of a factor of d entries kept as m diagonal blocks of b (gnfx.layouts.base), as
    blockdiag_left/right apply it: m - 1 whole blocks and the last one's r = d - (m - 1) b entries
    (d² for a whole factor, m = 1 and b = d)."""
    return (m - 1) * b ** 2 + (d - (m - 1) * b) ** 2


class above(sp.Function):
    """above(d, w) = 1 for a dimension d kept whole and diagonal by Shampoo's or SOAP's diagonal_above w
    (w > 0 and d > w, gnfx.targets.diagonal_modes), else 0."""

    @classmethod
    def eval(cls, d, w):
        if w.is_zero or (w - d).is_nonnegative:
            return sp.Integer(0)
        if (d - w).is_positive:
            return sp.Integer(1)
        return None


def _cut(d, b, w=None):
    """(number of blocks, {p: Σ_blocks size^p}, whole) of a dimension d cut into blocks of at most b (None:
    one), or kept whole (1) where above w (None: never)."""
    if b is None:
        return 1, {2: d ** 2, 3: d ** 3}, sp.Integer(0)
    a = sp.Integer(0) if w is None else above(d, w)
    return a + (1 - a) * n_blocks(d, b), {p: (1 - a) * block_sum(d, b, p) for p in (2, 3)}, a


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a preconditioner treats as a unit: `dims` = (d_out, d_a) of a block's folded gradient
    (`bias`: d_a = d_in + 1), or a loose parameter's shape; `kind` a layer kind (gnfx.layouts) or
    "tensor"; `groups` the block's independent row groups; `max_factor` and `unit` how its factors
    are blocked."""

    dims: tuple
    kind: str
    bias: bool = False
    groups: int = 1
    unit: int = 1  # the entries of `a` a blocked A keeps together (gnfx.layouts.base)
    max_factor: object = None  # K-FAC's max_factor (a number or the symbol); None: factors whole

    @property
    def layout(self):
        """The layout class of the block's kind (gnfx.layouts), None for a loose parameter."""
        return layout_class(self.kind)

    @property
    def loose(self) -> bool:
        """A loose parameter ("tensor"): no layout, no factors, no tap statistics."""
        return self.layout is None

    @property
    def diagonal_A(self) -> bool:
        return not self.loose and self.layout.diagonal_A

    @property
    def rows(self):
        """s: the outputs of one row group (d_out for an ungrouped block)."""
        return sp.sympify(self.dims[0]) / self.groups if self.groups != 1 else self.dims[0]

    @property
    def numel(self):
        return sp.Mul(*self.dims)

    def factor_blocks(self, side: str):
        """(m, b) of factor "A" (d_a entries) or "S" (s entries): m diagonal blocks of b entries; (1, d)
        for a factor kept whole (always for an embedding's diagonal A)."""
        d, unit, extra = (self.dims[1], self.unit, int(self.bias)) if side == "A" else (self.rows, 1, 0)
        if self.max_factor is None or (side == "A" and self.diagonal_A):
            return sp.Integer(1), d
        return tuple(f(d, self.max_factor, unit, extra) for f in (factor_count, factor_size))

    def factor_entries(self, side: str):
        """The entries of factor A or S of every row group: groups · m · b² (groups · d² when whole)."""
        m, b = self.factor_blocks(side)
        return self.groups * m * b ** 2

    def pieces(self, b, w=None):
        """The pieces gnfx.targets.cut cuts the target into at max_block b and diagonal_above w."""
        return sp.Mul(*(_cut(d, b, w)[0] for d in self.dims))

    def modes(self, b, w=None) -> list[Mode]:
        cuts = [_cut(d, b, w) for d in self.dims]
        return [Mode(sp.Mul(*(d for i, d in enumerate(self.dims) if i != j)),
                     sp.Mul(*(c for i, (c, _, _) in enumerate(cuts) if i != j)), sums[2], sums[3], whole, d)
                for j, (d, (_, sums, whole)) in enumerate(zip(self.dims, cuts))]


@dataclasses.dataclass
class Parts:
    """One preconditioner on one target: its state tensors {name: (entries, storage)}, and FLOPs
    per statistic step, per refresh (every `every` steps) and per step, without its update chain
    (`chain_parts` adds that); `pieces`: the pieces the target is cut into (a chain stage keeps a
    number per piece), `chained`: the entries its chain maps (None: the target's)."""

    state: dict
    statistics: sp.Expr = sp.Integer(0)
    refresh: sp.Expr = sp.Integer(0)
    every: sp.Expr = sp.Integer(1)
    update: sp.Expr = sp.Integer(0)
    pieces: sp.Expr = sp.Integer(1)
    chained: sp.Expr | None = None


def chain_parts(chain, n, pieces) -> tuple[dict, sp.Expr]:
    """The state {name: (entries, storage)} and per-step FLOPs of an update chain (gnfx.transforms)
    mapping n entries cut into `pieces` pieces: a stage's state tensor shaped like a piece holds n
    entries, a number per piece `pieces` (both stacked like the directions: FACTOR storage); its
    FLOPs are its `flops_per_entry()` per entry."""
    state = {k: (n if shape else pieces, FACTOR) for t in chain for k, shape in t.state_shapes((1,)).items()}
    return state, sum((t.flops_per_entry() * n for t in chain), sp.Integer(0))


def _mode_products(g, b, w=None):
    """X ×_j P_j over every mode and block: 2 Σ_j (Π_{i≠j} d_i) Σ_blocks c_j² (also the Gram matrices);
    a diagonal mode (above w) has none."""
    return sum(2 * m.rest * m.squares for m in g.modes(b, w))


def statistic_sizes(g) -> tuple[dict, dict]:
    """Entries of each statistic's moving average and of its accumulator (the buffer the taps fill
    on a statistic step), by name."""
    d_o, d_a = g.dims
    d_i = d_a - 1 if g.bias else d_a
    k = g.groups
    # averages: A is d_a x d_a (d_a for an embedding's diagonal), S d_out x d_out (per row group:
    # d_a x d_a and s x s; a blocked factor its m blocks of b x b), the diagonals like [W b]
    # (the batch's gradient "grad" like [W b], and "inverse_counts" [1/N, 1/M])
    sizes = {"A": d_a if g.diagonal_A else g.factor_entries("A"), "S": g.factor_entries("S"), "diag": g.numel,
             "eigen_diag": g.numel, "grad": g.numel, "inverse_counts": 2}
    # accumulators: the same, except a whole A's, Σ a aᵀ (d_in²) and with a bias Σ a (d_in), bordered
    # when averaged (a blocked A accumulates its blocks of [a 1] directly), and none for the counts
    accumulators = {**sizes, "inverse_counts": 0}
    if g.diagonal_A:
        return sizes, accumulators
    return sizes, {**accumulators,
                   "A": sp.Piecewise((k * d_i * d_a, sp.Eq(g.factor_blocks("A")[0], 1)), (sizes["A"], True))}


def tap_statistics(g, needs, kfac_approx: str, at: dict) -> tuple[dict, sp.Expr]:
    """The statistics the taps keep for a block ({name: (entries, storage)}, accumulator and
    moving average together) and their FLOPs per statistic step (module docstring)."""
    d_o, d_a = g.dims
    d_i = d_a - 1 if g.bias else d_a
    n, s, k = g.numel, g.rows, g.groups
    b, positions = at["B"], at["B"] * at["R"]
    embedding = g.diagonal_A
    reduce = kfac_approx == "reduce" and not embedding  # sum over positions, then B rows
    rows, pooling = (b, positions) if reduce else (positions, 0)
    sizes, accumulators = statistic_sizes(g)
    scatter = positions * d_o  # an embedding's per-example gradient: δ added into token rows
    (m_a, b_a), (m_s, b_s) = g.factor_blocks("A"), g.factor_blocks("S")
    gram_a = sp.Piecewise((2 * rows * d_i ** 2 + (rows * d_i if g.bias else 0), sp.Eq(m_a, 1)),
                          (2 * rows * m_a * b_a ** 2, True))
    flops = {"A": positions if embedding else k * (pooling * d_i + gram_a),
             "S": pooling * d_o + 2 * rows * k * m_s * b_s ** 2,
             "diag": (scatter if embedding else 2 * positions * n) + 2 * b * n,
             "eigen_diag": 2 * positions * k * s ** 2 + (scatter if embedding else 2 * positions * (k * d_a ** 2 + n))
             + 2 * b * n,
             "grad": scatter if embedding else 2 * positions * n, "inverse_counts": 0}
    entries = {name: (accumulators[name] + sizes[name], FACTOR) for name in sorted(needs)}
    # (a statistic kept as the last batch's, LATEST, is copied, not averaged)
    return entries, sum((flops[name] + (0 if name in LATEST else EMA) * sizes[name] for name in needs), sp.Integer(0))


@dataclasses.dataclass
class Formulas:
    """The cost of one preconditioner on one block or loose parameter, as sympy expressions."""

    state: dict  # optimizer state tensor -> (entries, storage)
    statistics: dict  # statistic -> (entries of its accumulator and average, storage)
    statistics_flops: sp.Expr  # per statistic step
    refresh_flops: sp.Expr  # per refresh
    every: sp.Expr  # steps between refreshes
    update_flops: sp.Expr  # per step
    stat_every: sp.Expr

    @property
    def elements(self) -> sp.Expr:
        return sum((e for e, _ in (*self.state.values(), *self.statistics.values())), sp.Integer(0))

    def memory(self, sizes: dict) -> sp.Expr:
        """Bytes, with `sizes` the bytes per entry of each storage (FACTOR, INT64)."""
        return sum((e * sizes[s] for e, s in (*self.state.values(), *self.statistics.values())), sp.Integer(0))

    @property
    def flops(self) -> sp.Expr:
        """Amortized FLOPs per step: statistics / stat_every + refresh / interval + update."""
        return self.statistics_flops / self.stat_every + self.refresh_flops / self.every + self.update_flops

    def as_dict(self, sizes: dict) -> dict:
        """The formulas by name, as sympy expressions (see PlanCost)."""
        return {"memory": self.memory(sizes), "elements": self.elements,
                **{k: sp.sympify(v) for k, v in (("statistics", self.statistics_flops), ("refresh", self.refresh_flops),
                                                 ("update", self.update_flops), ("flops", self.flops))},
                "state": {k: sp.sympify(e) for k, (e, _) in self.state.items()},
                "tap_statistics": {k: sp.sympify(e) for k, (e, _) in self.statistics.items()}}


def symbols_for(hp: dict, stat_every, **sizes) -> dict:
    """Values for the symbols: the given sizes (d_in, d_out, B, R) and the hyperparameters in `hp`."""
    at = dict(SYMBOLS)
    at.update(sizes)
    at["stat_every"] = stat_every
    for symbol, name in (("max_block", "max_block"), ("diagonal_above", "diagonal_above"),
                         ("max_factor", "max_factor"), ("k", "rank"),
                         ("inv_every", "inv_every"), ("precondition_frequency", "precondition_frequency")):
        if name in hp:
            at[symbol] = hp[name]
    return at


def formulas(preconditioner, hp: dict, geometry: Geometry, needs=frozenset(), kfac_approx: str = "expand",
             at: dict | None = None) -> Formulas:
    """The cost of `preconditioner` (a class of gnfx.preconditioners, or its registered name) with
    hyperparameters `hp` on `geometry`, whose dims are written in the symbols of `at` (default: all
    symbolic) — numbers give numbers. The preconditioner's own part is its `cost_parts`, to which
    its update chain (`hp["chain"]`, or its `default_chain(hp)`) adds its stages' state and FLOPs;
    a class without `cost_parts` raises gnfx.errors.NoCostModel."""
    if isinstance(preconditioner, str):
        from gnfx.preconditioners import REGISTRY  # here: the preconditioners import this module

        if preconditioner not in REGISTRY:
            raise GnfxError(f"no preconditioner is registered as {preconditioner!r}; registered: {', '.join(REGISTRY)}")
        preconditioner = REGISTRY[preconditioner]
    at = dict(SYMBOLS) if at is None else at
    geometry = blocked(geometry, hp, at)
    parts = preconditioner.cost_parts(geometry, hp, at)
    chain = hp.get("chain") or preconditioner.default_chain(hp)
    chain_state, chain_flops = chain_parts(chain, geometry.numel if parts.chained is None else parts.chained,
                                           parts.pieces)
    state, update = {**parts.state, **chain_state}, parts.update + chain_flops
    stats, stat_flops = ({}, 0) if geometry.loose else tap_statistics(geometry, needs, kfac_approx, at)
    return Formulas(state, stats, parts.statistics + stat_flops, parts.refresh, parts.every, update,
                    at["stat_every"])


def block_geometry(kind: str, bias: bool, at: dict, groups: int = 1, unit: int = 1) -> Geometry:
    return Geometry((at["d_out"], at["d_in"] + (1 if bias else 0)), kind, bias, groups, unit)


def geometry_of(block, at: dict) -> Geometry:
    """The geometry of a LayerTable block with its sizes d_in, d_out from `at`, its row groups and
    input unit as its layout says (gnfx.layouts)."""
    layout = layout_of(block)
    return block_geometry(block.kind, block.bias is not None, at, layout.groups, layout.input_unit)


def blocked(geometry: Geometry, hp: dict, at: dict) -> Geometry:
    """The geometry whose factors a preconditioner with a `max_factor` (K-FAC) blocks at at["max_factor"]."""
    if "max_factor" not in hp or geometry.loose:
        return geometry
    return dataclasses.replace(geometry, max_factor=at["max_factor"])


def storage_sizes(weight: torch.Tensor) -> dict:
    """Bytes per entry of each storage for a block or parameter whose (first) tensor is `weight`."""
    return {FACTOR: 8 if weight.dtype == torch.float64 else 4, INT64: 8}
