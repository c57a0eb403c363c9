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

The refresh is the part of the step that `precondition_frequency` trades against convergence: on
a 256-wide MLP at 1024 rows per step its eigendecompositions take 0.14-0.17 of an AdamW step
amortized over 10 steps, 0.03 over 50 and 0.015 over 100 (distributed Shampoo refreshes every 100s
of steps), but on the digits tasks of benchmarks/tasks.py intervals of 20-100 lengthened the MLP's
run to its training target by 19-46% (benchmarks/results/performance.md, "Shampoo's refresh
interval"), so the default stays 10.
"""
from __future__ import annotations

import torch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import HParam, choice, nonnegative_int, positive, positive_int
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
        for j, m in enumerate(g.modes(b)):
            state[f"factor{j}"] = state[f"root{j}"] = (m.count * m.squares, cost.FACTOR)
            factors += m.count * m.squares
            # inverse_power_flops over the blocks
            refresh += m.count * (cost.inverse_power_coefficient(hp["root_method"], root) * m.cubes + m.squares)
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
        state = {"failures": self.stacked_zeros(group, dtype=torch.int64)}
        for j, d in enumerate(group.shape):
            state[f"factor{j}"] = self.stacked_zeros(group, d, d)
            state[f"root{j}"] = self.stacked_eye(group, d)
        return state

    def exponent(self, order: int) -> float:
        return root_exponent(self.hp["exponent"], order)

    def refresh_due(self, step):
        start = self.hp["start_preconditioning_step"]
        self.active.fill_(step >= start)
        return step >= start and (step - start) % self.hp["precondition_frequency"] == 0

    def refresh(self, statistics, comm):
        for group in self.groups:
            state = self.group_state(group)
            order = len(group.shape)
            mine = self.owned(group, comm)
            # all pieces (one rank, or a rank that owns them all): views instead of indexed copies
            rows = slice(None) if len(mine) == len(group.pieces) else mine
            for j in range(order if len(mine) else 0):
                F, roots = state[f"factor{j}"][rows], state[f"root{j}"]
                root, ok = damped_inverse_power(F, F.new_full((len(mine),), self.hp["damping"]),
                                                self.exponent(order), self.decomposition_dtype(F), relative=True,
                                                method=self.hp["root_method"])
                # a failed root keeps the last good one
                roots[rows] = torch.where(ok.view(-1, 1, 1), root, roots[rows])
                state["failures"][rows] += (~ok).long()
            self.share(group, [state[f"root{j}"] for j in range(order)] + [state["failures"]], comm)

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
