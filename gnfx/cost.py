"""The cost model: memory and FLOPs of each preconditioner on each block, as sympy formulas.

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
    max_factor      K-FAC's big factors: a factor of d > max_factor entries (0: none; A's bias
                    entry not counted) is kept as m = factor_count(d, ...) diagonal blocks of
                    b = factor_size(d, ...) entries, the last one zero-padded
                    (gnfx.layouts.base.factor_blocks; for A, blocks of whole input units: a
                    conv's prod(kernel)); it costs m b² entries, m b³ to invert, and 2 m b² c
                    to apply to a matrix of c columns
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
Factors and statistics are float64 for a float64 weight and float32 otherwise ("factor"
storage), Adam's moments of "diag" have the parameter's dtype ("param"), counters are int64.

**FLOPs** are leading-order counts: a product (m x p)(p x q) is 2mpq, a symmetric
eigendecomposition with eigenvectors 9d³ (Golub & Van Loan, §8.3), a thin QR of an m x p matrix
with Q formed 4mp² - 4/3·p³, an elementwise operation 1 per entry; a step of AdamW is 10 per
parameter entry (the reference of the compute budget). Per block:

    statistics   per statistic step: the taps' statistics (A = Σ a aᵀ over B·R rows: 2BR·d_in²,
                 S: 2BR·d_out², per-example diagonals: 2BR·n + 2B·n; under kfac_approx="reduce"
                 A and S have B rows after a sum over positions), their moving averages, and the
                 curvature the preconditioner updates from the gradient (Shampoo's Gram matrices
                 2n·Σ_j d_j, rank-k's QR of an n x (k+1) matrix)
    refresh      per refresh: the amortized decompositions (K-FAC: a Cholesky inverse, d³ per
                 factor, or with root_method="eigh" an eigendecomposition and the inverse-power
                 reconstruction, 11d³; "newton": an estimate, NEWTON_ITERATIONS iterations)
    update       per step: the preconditioned direction (K-FAC/Shampoo: 2n·(d_out + d_a)),
                 grafting, momentum, weight decay and the step (5 per entry)
    flops        amortized per step: statistics / stat_every + refresh / interval + update

`fisher="mc"`/`"type2"` add one backward of the whole model per statistic step, not counted
here (it is the model's cost, not a block's).
"""
from __future__ import annotations

import dataclasses

import sympy as sp
import torch

from gnfx.layouts import LAYOUTS, layout_of
from gnfx.layouts.base import factor_blocks
from gnfx.fsdp import curvature_owners
from gnfx.fsdp import rows as rows_of
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.preconditioners.shampoo import root_exponent
from gnfx.report import format_bytes, format_table

SYMBOLS = {name: sp.Symbol(name, positive=True, integer=True) for name in (
    "d_in", "d_out", "B", "R", "max_block", "max_factor", "k", "stat_every", "inv_every", "precondition_frequency",
    "W")}

FACTOR, PARAM, INT64 = "factor", "param", "int64"  # storage of a state tensor (see module docstring)

ADAMW = 10  # FLOPs per parameter entry of an AdamW step
EIGH = 9  # d³ coefficient of a symmetric eigendecomposition with eigenvectors
CHOLESKY = 1  # d³ coefficient of (F + λI)⁻¹ by Cholesky: the factor d³/3, the inverse from it 2d³/3
# coupled Newton iterations until convergence, an estimate (they stop on convergence; 13-22 for
# condition numbers 1e3-1e6, gnfx.linalg): the only figure of the cost model that is not exact
NEWTON_ITERATIONS = 20
TAIL = 5  # momentum m ← μm + U (2), decay θ(1 - ηλ) (1), step θ - ηm (2), per entry
EMA = 4  # normalize a batch statistic, F ← βF + (1-β)F_batch, per entry
GRAFT = {"adam": 7, "adagrad": 5, "none": 0}  # the grafted direction, per entry
RESCALE = 5  # the two norms of grafting and the rescaling, per entry
ADAM_ROTATED = 11  # SOAP's Adam step in the eigenbasis, per entry
KL_CLIP = 4  # K-FAC's ⟨U, G⟩, η² and the scaling by ν, per entry
DIAGONAL_A = 1  # K-FAC on an embedding: S⁻¹G scaled by the diagonal A⁻¹, per entry
DAMPED_DIVIDE = 2  # EKFAC's division by s + λ, per entry
SOLVE = 3  # rank-k: the coefficients s/(s+λ) and (v - U(c ⊙ Uᵀv)) / λ, per entry


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
    blocks along the other dimensions, and the power sums Σ c_j², Σ c_j³ of its own block sizes."""

    rest: sp.Expr
    count: sp.Expr
    squares: sp.Expr
    cubes: sp.Expr


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


def _cut(d, b):
    """(number of blocks, {p: Σ_blocks size^p}) of a dimension d cut into blocks of at most b (None: one)."""
    if b is None:
        return 1, {2: d ** 2, 3: d ** 3}
    return n_blocks(d, b), {p: block_sum(d, b, p) for p in (2, 3)}


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
    def diagonal_A(self) -> bool:
        return self.kind in LAYOUTS and LAYOUTS[self.kind].diagonal_A

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

    def pieces(self, b):
        return sp.Mul(*(_cut(d, b)[0] for d in self.dims))

    def modes(self, b) -> list[Mode]:
        cuts = [_cut(d, b) for d in self.dims]
        return [Mode(sp.Mul(*(d for i, d in enumerate(self.dims) if i != j)),
                     sp.Mul(*(c for i, (c, _) in enumerate(cuts) if i != j)), sums[2], sums[3])
                for j, (_, sums) in enumerate(cuts)]


@dataclasses.dataclass
class Parts:
    """One preconditioner on one target: its state tensors {name: (entries, storage)}, and FLOPs
    per statistic step, per refresh (every `every` steps) and per step."""

    state: dict
    statistics: sp.Expr = sp.Integer(0)
    refresh: sp.Expr = sp.Integer(0)
    every: sp.Expr = sp.Integer(1)
    update: sp.Expr = sp.Integer(0)


def _grafted(hp, n):
    return (GRAFT[hp["graft"]] + (RESCALE if hp["graft"] != "none" else 0)) * n


def _kl_clip(hp, n):
    return KL_CLIP * n if hp["kl_clip"] > 0 else 0


def _mode_products(g, b):
    """X ×_j P_j over every mode and block: 2 Σ_j (Π_{i≠j} d_i) Σ_blocks c_j² (also the Gram matrices)."""
    return sum(2 * m.rest * m.squares for m in g.modes(b))


def diag_parts(g, hp, at) -> Parts:
    """AdamW's two moments, each like the parameter: 2n entries, 10n FLOPs per step."""
    n = g.numel
    return Parts({"exp_avg": (n, PARAM), "exp_avg_sq": (n, PARAM)}, update=ADAMW * n)


def kfac_parts(g, hp, at) -> Parts:
    """(A + λ_A I)⁻¹ (d_a², or d_a for an embedding's diagonal A) and (S + λ_S I)⁻¹ (d_out²);
    g of each, d_a² and s², for g row groups. A factor blocked by max_factor (Geometry.factor_blocks:
    m blocks of b) keeps m b², is inverted as m matrices of b and applied to the s x d_a gradient of a
    row group as m products (b x b)(b x d_a) (S) or (s x b)(b x b) (A): 2 m b² d_a and 2 m b² s."""
    _, d_a = g.dims
    n, s, k = g.numel, g.rows, g.groups
    diagonal_A = g.diagonal_A
    (m_a, b_a), (m_s, b_s) = g.factor_blocks("A"), g.factor_blocks("S")
    return Parts(
        {"A_inv": (d_a if diagonal_A else g.factor_entries("A"), FACTOR), "S_inv": (g.factor_entries("S"), FACTOR),
         "failures": (1, INT64), "momentum": (n, FACTOR)},
        refresh=((2 * d_a if diagonal_A else k * m_a * inverse_power_flops(b_a, hp["root_method"]))
                 + k * m_s * inverse_power_flops(b_s, hp["root_method"])),
        every=at["inv_every"],
        update=(2 * k * m_s * b_s ** 2 * d_a + (DIAGONAL_A * n if diagonal_A else 2 * k * m_a * b_a ** 2 * s)
                + _kl_clip(hp, n) + TAIL * n))


def ekfac_parts(g, hp, at) -> Parts:
    """K-FAC's eigenbases Q_S (d_out²) and Q_A (d_a², none for an embedding) and the fitted
    eigenvalues s (n), copied from the "eigen_diag" statistic on every statistic step; g pairs of
    bases (s² and d_a²) for g row groups."""
    _, d_a = g.dims
    n, k = g.numel, g.groups
    sides = (g.rows,) if g.diagonal_A else (g.rows, d_a)
    state = {"Q_S": (k * g.rows ** 2, FACTOR), "scale": (n, FACTOR),
             **{c: (1, INT64) for c in ("refreshes", "skipped", "failures")}, "momentum": (n, FACTOR)}
    if not g.diagonal_A:
        state["Q_A"] = (k * d_a ** 2, FACTOR)
    # per basis: Qᵀ F Q, eigh, the carry-over (Q_oldᵀ Q)² and s ×_j P
    refresh = sum(k * ((4 + EIGH + 2) * d ** 3 + d ** 2) + 2 * n * d for d in sides)
    rotations = sum(2 * n * d for d in sides)
    return Parts(state, refresh=refresh, every=at["inv_every"],
                 update=2 * rotations + DAMPED_DIVIDE * n + _kl_clip(hp, n) + TAIL * n)


def shampoo_parts(g, hp, at) -> Parts:
    """A factor and its inverse root per dimension and block, the graft's second moment, counters."""
    b = at["max_block"]
    n, pieces = g.numel, g.pieces(b)
    state = {"failures": (pieces, INT64), "graft_v": (n, FACTOR), "graft_t": (pieces, FACTOR)}
    factors = refresh = 0
    root = round(1 / root_exponent(hp["exponent"], len(g.dims)))  # r of F^{-1/r}, for root_method="newton"
    for j, m in enumerate(g.modes(b)):
        state[f"factor{j}"] = state[f"root{j}"] = (m.count * m.squares, FACTOR)
        factors += m.count * m.squares
        # inverse_power_flops over the blocks
        refresh += m.count * (inverse_power_coefficient(hp["root_method"], root) * m.cubes + m.squares)
    state["momentum"] = (n, FACTOR)
    gram = _mode_products(g, b)
    return Parts(state, statistics=gram + EMA * factors, refresh=refresh, every=at["precondition_frequency"],
                 update=gram + _grafted(hp, n) + TAIL * n)


def soap_parts(g, hp, at) -> Parts:
    """Shampoo's factors with their eigenbases, Adam's two moments in the rotated coordinates."""
    b = at["max_block"]
    n, pieces = g.numel, g.pieces(b)
    state = {"exp_avg": (n, FACTOR), "exp_avg_sq": (n, FACTOR), "t": (pieces, FACTOR),
             **{c: (pieces, INT64) for c in ("refreshes", "skipped", "failures")}}
    factors = refresh = 0
    # a refresh per factor: Qᵀ F Q (4c³), then qr(F Q) (2c³ + QR) or an eigendecomposition
    per_cube = 4 + (2 + 4 - sp.Rational(4, 3) if hp["refresh"] == "qr" else EIGH)
    for j, m in enumerate(g.modes(b)):
        state[f"factor{j}"] = state[f"basis{j}"] = (m.count * m.squares, FACTOR)
        factors += m.count * m.squares
        refresh += m.count * m.cubes * per_cube
    state["momentum"] = (n, FACTOR)
    rotation = _mode_products(g, b)
    return Parts(state, statistics=rotation + EMA * factors, refresh=refresh,
                 every=at["precondition_frequency"], update=3 * rotation + ADAM_ROTATED * n + TAIL * n)


def rank_parts(g, hp, at) -> Parts:
    """U (n x k), s (k), t, a failure count, the graft's second moment; per statistic step the exact rank-(k+1)
    update by a thin QR of B = [U √(βs), √(1-β) v] and an eigendecomposition of R Rᵀ."""
    n = g.numel
    k = sp.Min(at["k"], n)
    state = {"U": (n * k, FACTOR), "s": (k, FACTOR), "t": (1, FACTOR), "failures": (1, INT64),
             "graft_v": (n, FACTOR), "graft_t": (1, FACTOR), "momentum": (n, FACTOR)}
    k1 = k + 1
    statistics = n * k1 + qr_flops(n, k1) + (2 + EIGH) * k1 ** 3 + 2 * n * k1 * k
    woodbury = 4 * n * k + SOLVE * n  # Uᵀv, U (c ⊙ Uᵀv), then the solve
    return Parts(state, statistics=statistics, update=woodbury + _grafted(hp, n) + TAIL * n)


COSTS = {
    "diag": diag_parts,
    "kfac": kfac_parts,
    "ekfac": ekfac_parts,
    "shampoo": shampoo_parts,
    "soap": soap_parts,
    "rank1": rank_parts,
}


def statistic_sizes(g) -> tuple[dict, dict]:
    """Entries of each statistic's moving average and of its accumulator (the buffer the taps fill
    on a statistic step), by name."""
    d_o, d_a = g.dims
    d_i = d_a - 1 if g.bias else d_a
    k = g.groups
    # averages: A is d_a x d_a (d_a for an embedding's diagonal), S d_out x d_out (per row group:
    # d_a x d_a and s x s; a blocked factor its m blocks of b x b), the diagonals like [W b]
    sizes = {"A": d_a if g.diagonal_A else g.factor_entries("A"), "S": g.factor_entries("S"), "diag": g.numel,
             "eigen_diag": g.numel}
    # accumulators: the same, except a whole A's, Σ a aᵀ (d_in²) and with a bias Σ a (d_in), bordered
    # when averaged (a blocked A accumulates its blocks of [a 1] directly)
    if g.diagonal_A:
        return sizes, sizes
    return sizes, {**sizes, "A": sp.Piecewise((k * d_i * d_a, sp.Eq(g.factor_blocks("A")[0], 1)), (sizes["A"], True))}


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
             + 2 * b * n}
    entries = {name: (accumulators[name] + sizes[name], FACTOR) for name in sorted(needs)}
    return entries, sum((flops[name] + EMA * sizes[name] for name in needs), sp.Integer(0))


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
        """Bytes, with `sizes` the bytes per entry of each storage (FACTOR, PARAM, INT64)."""
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
    for symbol, name in (("max_block", "max_block"), ("max_factor", "max_factor"), ("k", "rank"),
                         ("inv_every", "inv_every"), ("precondition_frequency", "precondition_frequency")):
        if name in hp:
            at[symbol] = hp[name]
    return at


def formulas(name: str, hp: dict, geometry: Geometry, needs=frozenset(), kfac_approx: str = "expand",
             at: dict | None = None) -> Formulas:
    """The cost of preconditioner `name` with hyperparameters `hp` on `geometry`, whose dims are
    written in the symbols of `at` (default: all symbolic) — numbers give numbers."""
    if name not in COSTS:
        raise KeyError(f"gnfx.cost has no formulas for the preconditioner {name!r}; add them to gnfx.cost.COSTS")
    at = dict(SYMBOLS) if at is None else at
    geometry = blocked(geometry, hp, at)
    parts = COSTS[name](geometry, hp, at)
    stats, stat_flops = tap_statistics(geometry, needs, kfac_approx, at) if geometry.kind != "tensor" else ({}, 0)
    return Formulas(parts.state, stats, parts.statistics + stat_flops, parts.refresh, parts.every, parts.update,
                    at["stat_every"])


def block_geometry(kind: str, bias: bool, at: dict, groups: int = 1, unit: int = 1) -> Geometry:
    return Geometry((at["d_out"], at["d_in"] + (1 if bias else 0)), kind, bias, groups, unit)


def blocked(geometry: Geometry, hp: dict, at: dict) -> Geometry:
    """The geometry whose factors a preconditioner with a `max_factor` (K-FAC) blocks at at["max_factor"]."""
    if "max_factor" not in hp or geometry.kind == "tensor":
        return geometry
    return dataclasses.replace(geometry, max_factor=at["max_factor"])


def storage_sizes(weight: torch.Tensor) -> dict:
    """Bytes per entry of each storage for a block or parameter whose (first) tensor is `weight`."""
    return {FACTOR: 8 if weight.dtype == torch.float64 else 4, PARAM: weight.element_size(), INT64: 8}


# ----------------------------------------------------------------------------- a plan's cost


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


def _fsdp_memory(f: Formulas, g, needs, sizes: dict, curvature: bool) -> sp.Expr:
    """The bytes of a row that every rank keeps whole under FSDP2 (gnfx.fsdp): for a curvature
    preconditioner the statistic accumulators the taps fill from the local batch (the owner keeps
    the rest), for the elementwise diag all its statistics (only its moments are sharded)."""
    if g.kind == "tensor":  # a loose parameter: no tap statistics
        return sp.Integer(0)
    if curvature:
        return sum((statistic_sizes(g)[1][k] for k in needs), sp.Integer(0)) * sizes[FACTOR]
    return sum((e * sizes[s] for e, s in f.statistics.values()), sp.Integer(0))


def plan_cost(table, optimizer, settings: dict, batch_size: int | None = None, positions=None,
              world_size: int = 1) -> PlanCost:
    """The cost of a compiled model's plan: every block (table order), then every loose parameter.

    Under FSDP2 on `world_size` W ranks (gnfx.fsdp) a row of memory M keeps per rank
    (`formulas[name]["memory_per_rank"]`, as (owner, other ranks) for a curvature preconditioner):
    kfac, ekfac, shampoo, soap, rank1: M on the rank that owns the block (its statistics' averages,
    factors, roots and momentum live there only), and on every other rank the statistic
    accumulators M_acc the taps fill from the local batch; diag: (M - M_stat) / W + M_stat (its
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
    entries = [(b.name, b.kind, b.params, b) for b in table] + [(f.param, "fallback", (f.param,), None)
                                                               for f in table.fallbacks]
    curvature = [pre for pre in optimizer.preconditioners if isinstance(pre, CurvaturePreconditioner)]
    owners = curvature_owners(curvature, world_size)
    rows, forms, values = [], {}, {}
    for name, kind, params, block in entries:
        pre = served[name]
        pre_name = type(pre).name
        tensors = [optimizer._named[p] for p in params]  # the whole parameters, also under FSDP2
        sizes = storage_sizes(tensors[0])
        if block is not None:
            r = positions.get(name, 1) if isinstance(positions, dict) else positions or 1
            at = symbols_for(pre.hp, optimizer.stat_every, d_in=block.d_in, d_out=block.d_out, B=batch,
                             R=r * len(block.sites))
            needs = stats[name].needs if name in stats else frozenset()
            layout = layout_of(block)
            geometry, symbolic = (
                blocked(block_geometry(kind, block.bias is not None, x, layout.groups, layout.input_unit), pre.hp, x)
                for x in (at, SYMBOLS))
        else:
            at = symbols_for(pre.hp, optimizer.stat_every)
            needs = frozenset()
            geometry = symbolic = Geometry(tuple(tensors[0].shape), "tensor")
        approx = settings["kfac_approx"]
        numbers = formulas(pre_name, pre.hp, geometry, needs, approx, at)
        symbolic_formulas = formulas(pre_name, pre.hp, symbolic, needs, approx)
        forms[name] = symbolic_formulas.as_dict(sizes)
        values[name] = {SYMBOLS[k]: v for k, v in at.items() if not isinstance(v, sp.Symbol)}
        values[name][SYMBOLS["W"]] = world_size
        memory = int(numbers.memory(sizes))
        curvature_row = name in owners
        whole = _fsdp_memory(symbolic_formulas, symbolic, needs, sizes, curvature_row)
        everywhere = int(_fsdp_memory(numbers, geometry, needs, sizes, curvature_row))
        if curvature_row:  # all of it on the owner, the accumulators on the others
            forms[name]["memory_per_rank"] = (forms[name]["memory"], whole)
            per_rank = tuple(memory if r == owners[name] else everywhere for r in range(world_size))
        else:  # the moments sharded by rows, n_r = ceil(d_0 / W), the statistics whole
            forms[name]["memory_per_rank"] = (forms[name]["memory"] - whole) / SYMBOLS["W"] + whole
            d0 = tensors[0].shape[0] if tensors[0].dim() else 1
            per_rank = tuple((memory - everywhere) * (s.stop - s.start) // d0 + everywhere
                             for s in (rows_of(d0, world_size, r) for r in range(world_size)))
        rows.append(Row(name, kind, pre_name, sum(t.numel() for t in tensors),
                        sum(t.numel() * t.element_size() for t in tensors), memory,
                        float(numbers.statistics_flops), float(numbers.refresh_flops), float(numbers.update_flops),
                        float(numbers.flops), per_rank))
    return PlanCost(rows, forms, values)
