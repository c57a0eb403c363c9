"""Shampoo: one factor per tensor dimension, the update preconditioned along every mode.

For a piece with gradient G of order k (a matrix [∇W ∇b] for a block, k = 2) the factor of
mode j is the moving average `F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ` of the mode-j unfolding's Gram
matrix (for a matrix: `L = Σ G Gᵀ`, `R = Σ Gᵀ G`), collected every `stat_every` steps with
β = `stat_decay`, before the step's refresh, so that roots refreshed on step t include G_t. The direction is the mode product

    P = G ×_1 (F_1 + ε_1 I)^{-p} ×_2 (F_2 + ε_2 I)^{-p} ... ,    for a matrix  L^{-p} G R^{-p},

with ε_j = `damping` · (largest eigenvalue of F_j) and root p = `exponent`: "paper" for
1/(2k) (Gupta et al. 2018), or a number (1/2 is the seed's per-factor inverse square root).
The default, "paper", was chosen by benchmark: 150 steps on the digits MLP and autoencoder tasks
(benchmarks/tasks.py), best of lr in {1e-3, 3e-3, 1e-2}, gave validation losses 0.152 and 0.0052
with "paper" against 0.286 and 0.0171 with 1/2.
Dimensions above `max_block` are cut into blocks, each with its own factors, except those above
`diagonal_above` (an embedding's rows, a language model's vocabulary): kept whole with a diagonal
factor, F_j ← β F_j + (1-β) diag(G_(j) G_(j)ᵀ) (the squared entries summed over the other modes),
applied as the entrywise (F_j + ε_j)^{-p} along mode j, with ε_j = `damping` · max F_j. A whole factor
over V rows would hold V² entries and a blocked one V·max_block (a 265k x 16 table: 5 GB of state
for 17 MB of parameters, and a refresh of minutes); the diagonal holds V. The default 4096 is the
size above which Anil et al.'s distributed Shampoo leaves a dimension unpreconditioned (a diagonal keeps
more: AdaGrad's scaling along it; PSGD's Kron keeps a diagonal above 8192). Grafting (Adam or
AdaGrad, gnfx.transforms.Graft, the first stage of its default update chain) sets each block's step
size; before `start_preconditioning_step` (`active` False) the grafted direction is used alone. Inverse roots come from symmetric eigendecompositions every
`precondition_frequency` steps, or with `root_method="newton"` from the coupled Newton iteration
(matrix products only; ε then takes a power-iteration estimate of the largest eigenvalue,
gnfx.linalg); a failed one keeps the last good root and is counted.

With `refresh_tolerance` τ > 0 a refresh step recomputes only the roots whose factor may have
drifted by more than τ since its own last refresh F_r. The drift measured is

    drift(F, F_r) = ‖F/‖F‖_F − F_r/‖F_r‖_F‖_F   (with a graft; ‖F − F_r‖_F / ‖F_r‖_F for graft="none")

With a graft the scale of a factor does not matter: the damping is relative (ε = damping λ_max),
so (cF + cεI)^{-p} = c^{-p} (F + εI)^{-p}, and the graft sets each block's step length; the drift
then measures only the change of the factor's shape. F_r itself is not kept (it would add d² per
factor); each statistic step instead adds to a per-factor scalar b (state["drifted{j}"]) an
upper bound of the drift it caused, computed from F_{t-1} and F_t = β F_{t-1} + (1-β) C_t, and

    refreshed  ⇔  b > τ  or  the root is at least max_refresh_interval steps old.

b is a true upper bound of drift(F_t, F_r). With a graft, the unit vectors u_s = F_s/‖F_s‖_F
satisfy, by the triangle inequality,

    ‖u_t − u_r‖ ≤ Σ_{s=r+1..t} ‖u_s − u_{s-1}‖,   so  b ← b + drift(F_s, F_{s-1})  at each statistic step;

each term is the exact drift of one step (a pure decay F_s = β F_{s-1} adds 0, unlike a bound
built from ‖F_s − F_{s-1}‖ = (1-β)‖C_s − F_{s-1}‖, which counts the decay as change). Without a
graft, with r_s = ‖F_s − F_{s-1}‖/‖F_{s-1}‖ = drift(F_s, F_{s-1}) and b_s bounding
‖F_s − F_r‖/‖F_r‖ (b_r = 0),

    ‖F_t − F_r‖ ≤ ‖F_{t-1} − F_r‖ + r_t ‖F_{t-1}‖ ≤ ‖F_{t-1} − F_r‖ + r_t (‖F_r‖ + ‖F_{t-1} − F_r‖),
    so  b_t = b_{t-1} + r_t (1 + b_{t-1}),   i.e.  1 + b_t = Π_s (1 + r_s),

which needs no ‖F_r‖. A refresh that succeeds sets b to 0; b starts at +inf (no refresh yet: due),
and a step from or to a zero factor sets it to +inf. A sum of step drifts exceeds the drift
from F_r where successive steps cancel (batches' noise around a stationary factor), so the rule
refreshes at least as often as one that keeps F_r and compares it directly. The step drift costs a
copy of the factor and a few passes over it on statistic steps (O(d²) against the Gram matrix's
O(rows d²)); the due flags of all groups are read to the host in one transfer per refresh step. A
failed root keeps its b, so it is due again at the next refresh step. A refresh the optimizer runs
off the schedule (after a rejected quadratic step, gnfx.quadratic_step) is checked alike: Shampoo's
roots do not depend on the quadratic step's λ, so an unchanged factor keeps its root. The step of
each root's last refresh is kept in state["refreshed_at{j}"]; state counters per piece, summed over
its factors: "refreshes" (roots recomputed), "skipped" (kept by the tolerance).

The refresh is the part of the step that `precondition_frequency` trades against convergence: on
a 256-wide MLP at 1024 rows per step its eigendecompositions take 0.14-0.17 of an AdamW step
amortized over 10 steps, 0.03 over 50 and 0.015 over 100 (distributed Shampoo refreshes every 100s
of steps), but on the digits tasks of benchmarks/tasks.py intervals of 20-100 lengthened the MLP's
run to its training target by 19-46% (benchmarks/results/performance.md, "Shampoo's refresh
interval"), so the default stays 10. The factors move fast early in training and hardly later,
which the drift rule above follows: with refresh_tolerance=1e-3 (max_refresh_interval 100) the
digits tasks reached every target within one evaluation (5 steps) of the fixed interval while
recomputing 19-28% of the MLP's and the CNN's roots (10-11%, the max interval's rate, after step
200) and all of the autoencoder's, whose factors keep moving; τ = 3e-3 cost the autoencoder up to
14% more steps. At the digits MLP's and CNN's checks the bound was never below the exact drift from
F_r and at most 1.55-1.69 times it in nine checks of ten (medians 1.23-1.32), and it refreshed no
root that comparing with F_r would have kept; it replaced that comparison, whose copy of F_r cost d²
per factor (performance.md, "Shampoo's drift bound"). It stays opt-in (τ = 0 by default): on the
256-wide MLP at 1024 rows per step (rows/width 4) it took the whole step from 1.40-1.57 to 1.23-1.39
of AdamW's (medians 1.47 and 1.30 over ten runs), within the target of 1.25 in two of the ten.
"""
from __future__ import annotations

import math

import torch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import HParam, choice, nonnegative, nonnegative_int, positive, positive_int
from gnfx.linalg import damped_diagonal_power, damped_inverse_power, method_computes
from gnfx.preconditioners.base import Candidate
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams, root_method_hparam
from gnfx.preconditioners.diag import Diagonal
from gnfx.targets import diagonal_modes
from gnfx.transforms import Graft
from gnfx.transforms.graft import GRAFTS


def _exponent_ok(x) -> bool:
    return x == "paper" or (isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1)


def root_exponent(exponent, order: int) -> float:
    """p of F^{-p} for each factor of an order-`order` tensor: 1/(2k) for "paper", else the number."""
    return 1 / (2 * order) if exponent == "paper" else float(exponent)


def mode_gram(G: torch.Tensor, j: int) -> torch.Tensor:
    """G_(j) G_(j)ᵀ for each piece of the stack G (k, d_1, ..., d_n): the mode-j Gram matrix."""
    X = G.movedim(j + 1, 1).flatten(2)
    return X @ X.transpose(1, 2)


def diagonal_gram(G: torch.Tensor, j: int) -> torch.Tensor:
    """diag(G_(j) G_(j)ᵀ) for each piece of the stack G (k, d_1, ..., d_n): (k, d_j), the squared entries
    summed over every mode but j (`mode_gram`'s diagonal, without its d_j² entries)."""
    return G.square().movedim(j + 1, 1).flatten(2).sum(2)


def mode_scale(G: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
    """G ×_j diag(v) for each piece: mode j of G scaled entrywise by v (k, d_j)."""
    return G * v.view(v.shape[:1] + (1,) * j + v.shape[1:] + (1,) * (G.dim() - j - 2))


def mode_product(G: torch.Tensor, P: torch.Tensor, j: int) -> torch.Tensor:
    """G ×_j Pᵀ for each piece (= G ×_j P for a symmetric P), P of shape (k, d_j, d_j). The rows are given,
    not inferred: a -1 is ambiguous for a parameter of no entries (a (0, d) table of no class tokens)."""
    X = G.movedim(j + 1, -1)
    shape = X.shape
    return torch.bmm(X.reshape(shape[0], math.prod(shape[1:-1]), shape[-1]), P).reshape(shape).movedim(-1, j + 1)


# FLOPs per factor entry of a statistic step's drift: the copy of F_{t-1}, ‖F_t‖², ‖F_{t-1}‖², the
# scaled difference and its square
DRIFT_FLOPS = 8


def drift(F: torch.Tensor, reference: torch.Tensor, scale_invariant: bool) -> torch.Tensor:
    """(k,) drift of each factor F_i of the stack F (k, n, n), or (k, n) of diagonal factors, from
    `reference` F_r: ‖F/‖F‖_F − F_r/‖F_r‖_F‖_F with `scale_invariant` (in [0, 2]), else
    ‖F − F_r‖_F / ‖F_r‖_F. NaN or inf where a norm is zero."""
    shape = (-1,) + (1,) * (F.dim() - 1)
    norm = lambda X: torch.linalg.vector_norm(X.flatten(1), dim=1)  # noqa: E731 (Frobenius)
    r = norm(reference).view(shape)
    if scale_invariant:
        return norm(F / norm(F).view(shape) - reference / r)
    return norm((F - reference) / r)


def accumulate_drift(bound: torch.Tensor, F: torch.Tensor, previous: torch.Tensor, scale_invariant: bool) -> None:
    """Add to `bound` b (k,), in place, the drift of one statistic step from `previous` F_{t-1} to F
    (module doc): b ← b + drift(F, F_{t-1}) with `scale_invariant`, else b ← b + r (1 + b) with
    r = ‖F − F_{t-1}‖/‖F_{t-1}‖; either way b stays an upper bound of the drift from F_r. A step from
    or to a zero factor (NaN: no direction) makes b +inf, as before the first refresh."""
    step = drift(F, previous, scale_invariant)
    bound.add_(step if scale_invariant else step * (1 + bound)).nan_to_num_(nan=math.inf, posinf=math.inf)


class Shampoo(CurvaturePreconditioner):
    name = "shampoo"
    max_block_hparam = "max_block"
    diagonal_hparam = "diagonal_above"
    HPARAMS = {
        **common_hparams(),
        "damping": positive("ε of each factor, relative to its largest eigenvalue", 1e-6),
        "exponent": HParam("paper", "'paper' (1/(2k) for an order-k tensor) or a number in (0, 1]",
                           _exponent_ok, "root p of each factor: F^{-p}"),
        "max_block": positive_int("dimensions above max_block are cut into blocks", 1024),
        "diagonal_above": nonnegative_int("dimensions above this keep a diagonal factor, whole, instead of "
                                          "blocks of matrices (0: none)", 4096),
        "graft": choice("the method whose per-block step size is grafted", "adam", GRAFTS),
        "start_preconditioning_step": nonnegative_int("steps that use the grafted direction alone", 10),
        "precondition_frequency": positive_int("recompute inverse roots every so many steps", 10),
        "refresh_tolerance": nonnegative("on a refresh step, keep a factor's root while an upper bound of the "
                                         "factor's drift since its last refresh (‖F/‖F‖ − F_r/‖F_r‖‖_F; "
                                         "‖F − F_r‖/‖F_r‖ with graft='none'), summed over its statistic steps, "
                                         "is at most this; 0 always refreshes", 0.0),
        "max_refresh_interval": positive_int("with refresh_tolerance > 0, refresh a root whatever its drift once "
                                             "it is this many steps old", 100),
        "root_method": root_method_hparam("eigh", ("eigh", "newton")),
        "betas": Diagonal.HPARAMS["betas"],
        "eps": Diagonal.HPARAMS["eps"],
    }

    def __init__(self, hp, blocks, params, parameters):
        super().__init__(hp, blocks, params, parameters)
        if hp["root_method"] == "newton":
            for group in self.groups:
                if not method_computes("newton", self.exponent(len(group.shape)), relative=True):
                    raise ConfigError(f"root_method='newton' computes F^(-1/r) for integer r; exponent="
                                      f"{hp['exponent']!r} gives {self.exponent(len(group.shape)):g} for the order-"
                                      f"{len(group.shape)} tensors of {group.key!r}: use root_method='eigh'")
        # preconditioning started: a tensor, not a Python flag, so that the compiled update keeps
        # one graph across the start (a flag would recompile at start_preconditioning_step)
        device = parameters.param(self.groups[0].pieces[0].target.params[0]).device if self.groups else None
        self.active = torch.zeros((), dtype=torch.bool, device=device)
        self.started = False
        self.current_step = 0  # the step of the latest refresh_due, for the age of the roots

    def follow_parameters(self):
        """The groups' state (CurvaturePreconditioner's) and the started flag to the parameters' device."""
        super().follow_parameters()
        if self.groups:
            self.active = self.active.to(self.parameters.param(self.groups[0].pieces[0].target.params[0]).device)

    MIN_BLOCK = 16  # the smallest max_block "auto" tries
    in_auto = True

    @classmethod
    def claims_fallback(cls, shape) -> bool:
        return len(shape) >= 2

    @classmethod
    def cost_parts(cls, g, hp, at) -> cost.Parts:
        """A factor and its inverse root per dimension and block, failure counters (its chain adds the
        graft's second moment and the momentum, gnfx.cost.chain_parts)."""
        b, w = at["max_block"], at["diagonal_above"]
        n, pieces = g.numel, g.pieces(b, w)
        state = {"failures": (pieces, cost.INT64)}
        factors = refresh = 0
        root = round(1 / root_exponent(hp["exponent"], len(g.dims)))  # r of F^{-1/r}, for root_method="newton"
        drift = hp["refresh_tolerance"] > 0
        if drift:
            state.update({c: (pieces, cost.INT64) for c in ("refreshes", "skipped")})
        drift_flops = diagonal = 0
        for j, m in enumerate(g.modes(b, w)):
            entries = m.count * (m.squares + m.diagonal)  # matrix blocks, or a diagonal factor
            state[f"factor{j}"] = state[f"root{j}"] = (entries, cost.FACTOR)
            factors += entries
            # inverse_power_flops over the blocks (every root due: the most a refresh step costs), or the
            # diagonal's entrywise root
            refresh += m.count * (cost.inverse_power_coefficient(hp["root_method"], root) * m.cubes + m.squares
                                  + cost.DIAGONAL_ROOT * m.diagonal)
            diagonal += m.rest * m.diagonal  # n along a diagonal mode, else 0
            if drift:  # the drift bound and the step of the last refresh; each statistic step's drift
                state[f"drifted{j}"] = (pieces, cost.FACTOR)
                state[f"refreshed_at{j}"] = (pieces, cost.INT64)
                drift_flops += DRIFT_FLOPS * entries
        gram = cost._mode_products(g, b, w)
        return cost.Parts(state, statistics=gram + cost.DIAGONAL_GRAM * diagonal + cost.EMA * factors + drift_flops,
                          refresh=refresh, every=at["precondition_frequency"],
                          update=gram + cost.DIAGONAL_SCALE * diagonal, pieces=pieces)

    @classmethod
    def auto_candidates(cls, hp, g):
        """With its own max_block first (fidelity 0, as faithful as K-FAC or more), then, after
        K-FAC, with max_block halved down to MIN_BLOCK (fidelity in [2, 3)): blocking a large
        dimension cuts Shampoo's cost before fidelity is given up. Dimensions above diagonal_above are
        diagonal whatever max_block is (the report notes them)."""
        diagonal = diagonal_modes(g.dims, hp["diagonal_above"])
        largest = max([d for d, whole in zip(g.dims, diagonal) if not whole], default=0)
        limit = min(largest, hp["max_block"])
        sizes = []
        size = cls.MIN_BLOCK
        while size < limit:
            sizes.append(size)
            size *= 2
        whole = [f"diagonal dims {', '.join(str(d) for d, w in zip(g.dims, diagonal) if w)}"] if any(diagonal) else []
        detail = lambda b: ", ".join(([] if b >= largest else [f"max_block={b}"]) + whole)  # noqa: E731
        return [Candidate(0, hp, detail(hp["max_block"]))] + [
            Candidate(2 + i / len(sizes), {**hp, "max_block": b}, detail(b)) for i, b in enumerate(reversed(sizes))]

    def init_group(self, group):
        counter = lambda: self.stacked_zeros(group, dtype=torch.int64)  # noqa: E731
        state = {"failures": counter()}
        if self.hp["refresh_tolerance"] > 0:
            state.update(refreshes=counter(), skipped=counter())
        for j, (d, diagonal) in enumerate(zip(group.shape, self.diagonal_modes(group))):
            shape = (d,) if diagonal else (d, d)
            state[f"factor{j}"] = self.stacked_zeros(group, *shape)
            state[f"root{j}"] = self.stacked_identity(group, shape)
            if self.hp["refresh_tolerance"] > 0:  # the drift bound (no refresh yet: inf), the step of the last refresh
                state[f"drifted{j}"] = self.stacked_zeros(group).fill_(float("inf"))
                state[f"refreshed_at{j}"] = counter()
        return state

    def exponent(self, order: int) -> float:
        return root_exponent(self.hp["exponent"], order)



    def refresh_due(self, step):
        self.current_step = step
        start = self.hp["start_preconditioning_step"]
        self.active.fill_(step >= start)
        self.started = step >= start
        return step >= start and (step - start) % self.hp["precondition_frequency"] == 0

    def due_roots(self, owned: list) -> list[list[list[int]]]:
        """For each group and mode, the positions in `owned` (each group's pieces this rank refreshes)
        of the roots due at this refresh step: all of them with refresh_tolerance 0, else those whose
        drift bound since its last refresh (`accumulate_drift`) exceeds τ or whose root is at least
        max_refresh_interval steps old; the flags of every group read to the host at once."""
        tolerance = self.hp["refresh_tolerance"]
        if tolerance == 0:
            return [[list(range(len(mine)))] * len(group.shape) for group, mine in zip(self.groups, owned)]
        oldest = self.current_step - self.hp["max_refresh_interval"]  # a root refreshed on this step or before is due
        flags = []
        for group, mine in zip(self.groups, owned):
            state = self.group_state(group)
            for j in range(len(group.shape)):
                flags.append(~(state[f"drifted{j}"][mine] <= tolerance) | (state[f"refreshed_at{j}"][mine] <= oldest))
        flags = torch.cat(flags).tolist() if flags else []
        due, at = [], 0
        for group, mine in zip(self.groups, owned):
            due.append([])
            for _ in group.shape:
                due[-1].append([i for i in range(len(mine)) if flags[at + i]])
                at += len(mine)
        return due

    def refresh(self, statistics, comm):
        owned = [self.owned(group, comm) for group in self.groups]
        tracked = self.hp["refresh_tolerance"] > 0
        for group, mine, due in zip(self.groups, owned, self.due_roots(owned)):
            state = self.group_state(group)
            order = len(group.shape)
            for j, diagonal in enumerate(self.diagonal_modes(group)):
                if tracked:
                    kept = sorted(set(range(len(mine))) - set(due[j]))
                    state["skipped"][mine[kept]] += 1
                if not due[j]:
                    continue
                # every piece (one rank, or a rank that owns them all, each due): views, not indexed copies
                rows = slice(None) if len(due[j]) == len(group.pieces) else mine[due[j]]
                F, roots = state[f"factor{j}"][rows], state[f"root{j}"]
                if diagonal:
                    root, ok = damped_diagonal_power(F, self.hp["damping"], self.exponent(order))
                else:
                    root, ok = damped_inverse_power(F, F.new_full((len(due[j]),), self.hp["damping"]),
                                                    self.exponent(order), self.decomposition_dtype(F), relative=True,
                                                    method=self.hp["root_method"])
                # a failed root keeps the last good one (and, tracked, its drift bound: due again at the next check)
                roots[rows] = torch.where(ok.view((-1,) + (1,) * (F.dim() - 1)), root, roots[rows])
                state["failures"][rows] += (~ok).long()
                if tracked:
                    state[f"drifted{j}"][rows] = torch.where(ok, 0.0, state[f"drifted{j}"][rows])
                    state[f"refreshed_at{j}"][rows] = torch.where(ok, self.current_step, state[f"refreshed_at{j}"][rows])
                    state["refreshes"][rows] += ok.long()
            drift_state = [f"{name}{j}" for j in range(order) for name in ("drifted", "refreshed_at")] + ["refreshes", "skipped"]
            self.share(group, [state[f"root{j}"] for j in range(order)] + [state["failures"]]
                       + ([state[k] for k in drift_state] if tracked else []), comm)

    def collect(self):
        """F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ for every group (its diagonal along a diagonal mode), before
        this step's refresh; with refresh_tolerance > 0 each factor's drift bound takes this step's drift."""
        beta, tracked = self.hp["stat_decay"], self.hp["refresh_tolerance"] > 0
        for group, G in zip(self.groups, self.stacked_gradients()):
            state = self.group_state(group)
            G = G.to(state["factor0"].dtype)
            for j, diagonal in enumerate(self.diagonal_modes(group)):
                F = state[f"factor{j}"]
                previous = F.clone() if tracked else None
                F.mul_(beta).add_((diagonal_gram if diagonal else mode_gram)(G, j), alpha=1 - beta)
                if tracked:
                    accumulate_drift(state[f"drifted{j}"], F, previous, self.hp["graft"] != "none")

    @classmethod
    def default_chain(cls, hp):
        """Grafting onto hp["graft"] (with Adam's β₂ and ε), then the heavy-ball tail."""
        return [Graft(hp["graft"], hp["betas"][1], hp["eps"])] + super().default_chain(hp)

    def direction(self, G, state, collect):
        """G ×_1 R_1 ⋯ ×_k R_k with the inverse roots R_j (the identity until the first refresh; a diagonal
        mode's root scales its entries)."""
        P = G.to(state["factor0"].dtype)
        for j in range(P.dim() - 1):
            R = state[f"root{j}"]
            P = mode_scale(P, R, j) if R.dim() == 2 else mode_product(P, R, j)
        return P
