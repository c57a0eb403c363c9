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
Dimensions above `max_block` are cut into blocks, each with its own factors. Grafting (Adam or
AdaGrad, gnfx.transforms.Graft, the first stage of its default update chain) sets each block's step
size; before `start_preconditioning_step` (`active` False) the grafted direction is used alone. Inverse roots come from symmetric eigendecompositions every
`precondition_frequency` steps, or with `root_method="newton"` from the coupled Newton iteration
(matrix products only; ε then takes a power-iteration estimate of the largest eigenvalue,
gnfx.linalg); a failed one keeps the last good root and is counted.

With `refresh_tolerance` τ > 0 a refresh step recomputes only the roots whose factor has drifted
since its own last refresh (F_r, kept in state["refreshed{j}"]):

    drift(F, F_r) = ‖F/‖F‖_F − F_r/‖F_r‖_F‖_F   (with a graft; ‖F − F_r‖_F / ‖F_r‖_F for graft="none")
    refreshed  ⇔  drift > τ  or  the root is at least max_refresh_interval steps old.

With a graft the scale of a factor does not matter: the damping is relative (ε = damping λ_max),
so (cF + cεI)^{-p} = c^{-p} (F + εI)^{-p}, and the graft sets each block's step length; the drift
then measures only the change of the factor's shape. The check reads F and F_r once (O(d²) against
the refresh's O(d³)) and reads all due flags to the host in one transfer per refresh step. A
failed root keeps F_r, so it is due again at the next refresh step. A refresh the optimizer runs
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
digits tasks reached every target in the steps of the fixed interval (±5, one evaluation) while
recomputing 19-28% of the MLP's and the CNN's roots (10%, the max interval's rate, after step
200) and all of the autoencoder's, whose factors keep moving; τ = 3e-3 to 0.1 cost the MLP and
the autoencoder steps (performance.md, "drift-triggered refresh"). It stays opt-in (τ = 0 by
default): F_r adds d² per factor to Shampoo's state (half again its factors and roots),
which the cost model charges, so "auto" would choose Shampoo less often.
"""
from __future__ import annotations

import torch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import HParam, choice, nonnegative, nonnegative_int, positive, positive_int
from gnfx.linalg import damped_inverse_power, method_computes
from gnfx.preconditioners.base import Candidate
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams, root_method_hparam
from gnfx.preconditioners.diag import Diagonal
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


def mode_product(G: torch.Tensor, P: torch.Tensor, j: int) -> torch.Tensor:
    """G ×_j Pᵀ for each piece (= G ×_j P for a symmetric P), P of shape (k, d_j, d_j)."""
    X = G.movedim(j + 1, -1)
    shape = X.shape
    return torch.bmm(X.reshape(shape[0], -1, shape[-1]), P).reshape(shape).movedim(-1, j + 1)


# FLOPs per factor entry of the drift check: ‖F‖², ‖F_r‖², the scaled difference and its square
DRIFT_FLOPS = 7


def drift(F: torch.Tensor, reference: torch.Tensor, scale_invariant: bool) -> torch.Tensor:
    """(k,) drift of each factor F_i of the stack F (k, n, n) from `reference` F_r: ‖F/‖F‖_F − F_r/‖F_r‖_F‖_F
    with `scale_invariant` (in [0, 2]), else ‖F − F_r‖_F / ‖F_r‖_F. NaN or inf where a norm is zero
    (F_r = 0 before the first refresh): due under the rule `not drift <= τ`."""
    norm = torch.linalg.matrix_norm
    r = norm(reference).view(-1, 1, 1)
    if scale_invariant:
        return norm(F / norm(F).view(-1, 1, 1) - reference / r)
    return norm((F - reference) / r)


class Shampoo(CurvaturePreconditioner):
    name = "shampoo"
    max_block_hparam = "max_block"
    HPARAMS = {
        **common_hparams(),
        "damping": positive("ε of each factor, relative to its largest eigenvalue", 1e-6),
        "exponent": HParam("paper", "'paper' (1/(2k) for an order-k tensor) or a number in (0, 1]",
                           _exponent_ok, "root p of each factor: F^{-p}"),
        "max_block": positive_int("dimensions above max_block are cut into blocks", 1024),
        "graft": choice("the method whose per-block step size is grafted", "adam", GRAFTS),
        "start_preconditioning_step": nonnegative_int("steps that use the grafted direction alone", 10),
        "precondition_frequency": positive_int("recompute inverse roots every so many steps", 10),
        "refresh_tolerance": nonnegative("on a refresh step, keep a factor's root while the factor's drift since "
                                         "its last refresh (‖F/‖F‖ − F_r/‖F_r‖‖_F; ‖F − F_r‖/‖F_r‖ with graft="
                                         "'none') is at most this; 0 always refreshes", 0.0),
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
        self.current_step = 0  # the step of the latest refresh_due, for the age of the roots

    MIN_BLOCK = 16  # the smallest max_block "auto" tries
    in_auto = True

    @classmethod
    def claims_fallback(cls, shape) -> bool:
        return len(shape) >= 2

    @classmethod
    def cost_parts(cls, g, hp, at) -> cost.Parts:
        """A factor and its inverse root per dimension and block, failure counters (its chain adds the
        graft's second moment and the momentum, gnfx.cost.chain_parts)."""
        b = at["max_block"]
        n, pieces = g.numel, g.pieces(b)
        state = {"failures": (pieces, cost.INT64)}
        factors = refresh = 0
        root = round(1 / root_exponent(hp["exponent"], len(g.dims)))  # r of F^{-1/r}, for root_method="newton"
        drift = hp["refresh_tolerance"] > 0
        if drift:
            state.update({c: (pieces, cost.INT64) for c in ("refreshes", "skipped")})
        for j, m in enumerate(g.modes(b)):
            state[f"factor{j}"] = state[f"root{j}"] = (m.count * m.squares, cost.FACTOR)
            factors += m.count * m.squares
            # inverse_power_flops over the blocks (every root due: the most a refresh step costs)
            refresh += m.count * (cost.inverse_power_coefficient(hp["root_method"], root) * m.cubes + m.squares)
            if drift:  # F_r and its step; the drift reads F and F_r (two norms, a difference and its norm)
                state[f"refreshed{j}"] = (m.count * m.squares, cost.FACTOR)
                state[f"refreshed_at{j}"] = (pieces, cost.INT64)
                refresh += DRIFT_FLOPS * m.count * m.squares
        gram = cost._mode_products(g, b)
        return cost.Parts(state, statistics=gram + cost.EMA * factors, refresh=refresh, every=at["precondition_frequency"],
                          update=gram, pieces=pieces)

    @classmethod
    def auto_candidates(cls, hp, g):
        """With its own max_block first (fidelity 0, as faithful as K-FAC or more), then, after
        K-FAC, with max_block halved down to MIN_BLOCK (fidelity in [2, 3)): blocking a large
        dimension cuts Shampoo's cost before fidelity is given up."""
        largest = max(g.dims)
        limit = min(largest, hp["max_block"])
        sizes = []
        size = cls.MIN_BLOCK
        while size < limit:
            sizes.append(size)
            size *= 2
        own = Candidate(0, hp, "" if hp["max_block"] >= largest else f"max_block={hp['max_block']}")
        return [own] + [Candidate(2 + i / len(sizes), {**hp, "max_block": b}, f"max_block={b}")
                        for i, b in enumerate(reversed(sizes))]

    def init_group(self, group):
        counter = lambda: self.stacked_zeros(group, dtype=torch.int64)  # noqa: E731
        state = {"failures": counter()}
        if self.hp["refresh_tolerance"] > 0:
            state.update(refreshes=counter(), skipped=counter())
        for j, d in enumerate(group.shape):
            state[f"factor{j}"] = self.stacked_zeros(group, d, d)
            state[f"root{j}"] = self.stacked_eye(group, d)
            if self.hp["refresh_tolerance"] > 0:  # F_r, and the step it was refreshed on
                state[f"refreshed{j}"] = self.stacked_zeros(group, d, d)
                state[f"refreshed_at{j}"] = counter()
        return state

    def exponent(self, order: int) -> float:
        return root_exponent(self.hp["exponent"], order)

    def refresh_due(self, step):
        self.current_step = step
        start = self.hp["start_preconditioning_step"]
        self.active.fill_(step >= start)
        return step >= start and (step - start) % self.hp["precondition_frequency"] == 0

    def due_roots(self, owned: list) -> list[list[list[int]]]:
        """For each group and mode, the positions in `owned` (each group's pieces this rank refreshes)
        of the roots due at this refresh step: all of them with refresh_tolerance 0, else those whose
        factor drifted by more than τ since its last refresh (`drift`) or whose root is at least
        max_refresh_interval steps old; the flags of every group read to the host at once."""
        tolerance = self.hp["refresh_tolerance"]
        if tolerance == 0:
            return [[list(range(len(mine)))] * len(group.shape) for group, mine in zip(self.groups, owned)]
        oldest = self.current_step - self.hp["max_refresh_interval"]  # a root refreshed on this step or before is due
        flags = []
        for group, mine in zip(self.groups, owned):
            state = self.group_state(group)
            for j in range(len(group.shape)):
                d = drift(state[f"factor{j}"][mine], state[f"refreshed{j}"][mine], self.hp["graft"] != "none")
                flags.append(~(d <= tolerance) | (state[f"refreshed_at{j}"][mine] <= oldest))
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
            for j in range(order):
                if tracked:
                    kept = sorted(set(range(len(mine))) - set(due[j]))
                    state["skipped"][mine[kept]] += 1
                if not due[j]:
                    continue
                # every piece (one rank, or a rank that owns them all, each due): views, not indexed copies
                rows = slice(None) if len(due[j]) == len(group.pieces) else mine[due[j]]
                F, roots = state[f"factor{j}"][rows], state[f"root{j}"]
                root, ok = damped_inverse_power(F, F.new_full((len(due[j]),), self.hp["damping"]),
                                                self.exponent(order), self.decomposition_dtype(F), relative=True,
                                                method=self.hp["root_method"])
                # a failed root keeps the last good one (and, tracked, its F_r: due again at the next check)
                roots[rows] = torch.where(ok.view(-1, 1, 1), root, roots[rows])
                state["failures"][rows] += (~ok).long()
                if tracked:
                    state[f"refreshed{j}"][rows] = torch.where(ok.view(-1, 1, 1), F, state[f"refreshed{j}"][rows])
                    state[f"refreshed_at{j}"][rows] = torch.where(ok, self.current_step, state[f"refreshed_at{j}"][rows])
                    state["refreshes"][rows] += ok.long()
            drift_state = [f"{name}{j}" for j in range(order) for name in ("refreshed", "refreshed_at")] + ["refreshes", "skipped"]
            self.share(group, [state[f"root{j}"] for j in range(order)] + [state["failures"]]
                       + ([state[k] for k in drift_state] if tracked else []), comm)

    def collect(self):
        """F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ for every group, before this step's refresh."""
        beta = self.hp["stat_decay"]
        for group in self.groups:
            state = self.group_state(group)
            G = self.stacked_gradient(group).to(state["factor0"].dtype)
            for j in range(len(group.shape)):
                state[f"factor{j}"].mul_(beta).add_(mode_gram(G, j), alpha=1 - beta)

    @classmethod
    def default_chain(cls, hp):
        """Grafting onto hp["graft"] (with Adam's β₂ and ε), then the heavy-ball tail."""
        return [Graft(hp["graft"], hp["betas"][1], hp["eps"])] + super().default_chain(hp)

    def direction(self, G, state, collect):
        """G ×_1 R_1 ⋯ ×_k R_k with the inverse roots R_j (the identity until the first refresh)."""
        P = G.to(state["factor0"].dtype)
        for j in range(P.dim() - 1):
            P = mode_product(P, state[f"root{j}"], j)
        return P
