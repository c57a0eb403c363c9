"""SOAP: Adam run in the eigenbasis of Shampoo's factors (Vyas et al. 2024, Algorithm 3).

For a piece with gradient G of order k (a matrix [∇W ∇b] for a block), the factors are Shampoo's
(see shampoo.py): `F_j ← β F_j + (1-β) G_(j) G_(j)ᵀ`, for a matrix `L = Σ G Gᵀ`, `R = Σ Gᵀ G`,
collected every `stat_every` steps with β = `stat_decay`; dimensions above `max_block` are cut into
blocks, but those above `diagonal_above` (4096; 0: none), which are kept whole and left unrotated, with no
factor: Adam's own diagonal scaling along them (the paper's implementation leaves a dimension above its
max_precond_dim, 10000, unrotated likewise; a vocabulary's or a recommender table's rows would otherwise
hold V/max_block bases of max_block²). Each factor has an orthonormal eigenbasis Q_j (for a matrix Q_L, Q_R), and each step runs
Adam with the first moment m kept in the original coordinates and the second moment v in the
rotated ones, as the paper's algorithm does:

    G' = Q_Lᵀ G Q_R,    m ← β₁ m + (1-β₁) G,    v ← β₂ v + (1-β₂) G'²,    m' = Q_Lᵀ m Q_R,
    U = Q_L (m̂' / (√v̂' + ε)) Q_Rᵀ,    m̂' = m' / (1-β₁ᵗ),  v̂' = v / (1-β₂ᵗ)

(order k: G' = G ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ, and back with Q_j). `betas` and `eps` are Adam's (shared with
"diag", and with its defaults; the paper's experiments use betas=(0.95, 0.95)). Since
m̂'/(√v̂'+ε) already is Adam's step, the heavy-ball `momentum` of its update chain (gnfx.transforms)
defaults to 0 here.

The bases are refreshed before the steps 1, 1 + f, 1 + 2f, ... (f = `precondition_frequency`) from
the factors collected so far, so the first basis already sees the first gradient (the paper's
implementation computes it after the first step; gnfx's step 0 is Adam in the standard basis) and
a basis never includes the gradient it rotates. A refresh (`refresh_basis`) first sorts each old
basis by decreasing Rayleigh quotient diag(Qᵀ F Q), permuting v's coordinates along that mode with
it, then recomputes the basis by symmetric eigendecomposition (`refresh="eigh"`, columns by
decreasing eigenvalue) or by one warm-started step of orthogonal iteration, `Q ← qr(F Q)`
(`refresh="qr"`, the paper's cheap refresh; a basis never computed before uses eigh). v is
otherwise left in place, as in the paper: its coordinates are taken to follow the basis columns.
With `refresh_tolerance` τ > 0 a basis is kept while its factor is still nearly diagonal in it,
`‖offdiag(Qᵀ F Q)‖_F ≤ τ ‖Qᵀ F Q‖_F`. A failed decomposition keeps the last basis. State counters,
per piece and summed over its factors: "refreshes" (bases recomputed), "skipped" (kept by the
tolerance), "failures".
"""
from __future__ import annotations

import dataclasses

import sympy as sp
import torch

from gnfx import cost
from gnfx.hparams import choice, nonnegative, nonnegative_int
from gnfx.linalg import decomposition_threads
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams
from gnfx.preconditioners.diag import Diagonal
from gnfx.preconditioners.shampoo import Shampoo, mode_gram, mode_product

REFRESH = ("eigh", "qr")


def rotate(X: torch.Tensor, bases, back: bool = False) -> torch.Tensor:
    """X ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ into the eigenbasis (a matrix: Q_Lᵀ X Q_R), or with `back`
    X ×_1 Q_1 ⋯ ×_k Q_k out of it (Q_L X Q_Rᵀ), for each piece of the stack X (p, d_1, ..., d_k).
    A basis None leaves its mode as is. (`mode_product(X, P, j)` contracts mode j with the rows
    of P, that is X ×_j Pᵀ.)"""
    for j, Q in enumerate(bases):
        if Q is not None:
            X = mode_product(X, Q.transpose(1, 2) if back else Q, j)
    return X


def eigenbasis(F: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of each symmetric F_i of the stack F (p, n, n), by decreasing eigenvalue;
    NaN for a matrix whose decomposition fails (a failure in a batch is isolated by retrying)."""
    try:
        return torch.linalg.eigh(F).eigenvectors.flip(-1)
    except RuntimeError:  # torch.linalg.LinAlgError, or the backend failing on one matrix
        if len(F) == 1:
            return torch.full_like(F, float("nan"))
        return torch.cat([eigenbasis(F[i:i + 1]) for i in range(len(F))])


def refresh_basis(F, Q, state, tolerance: float, dtype, qr=None):
    """Recompute, in place, the eigenbases Q (p, n, n) of the factors F (p, n, n) that are due.

    A basis is due unless `tolerance` τ > 0 and `‖offdiag(Qᵀ F Q)‖_F ≤ τ ‖Qᵀ F Q‖_F`. For a due
    basis the old columns are sorted by decreasing Rayleigh quotient diag(Qᵀ F Q); the new basis is
    `qr(F Q_sorted)` where the (p,) bool mask `qr` says so, else the eigenvectors by decreasing
    eigenvalue. Computed in `dtype` (on the CPU, with the threads gnfx.linalg chooses for the size).
    Counts into state["refreshes"], ["skipped"], ["failures"]; a failure keeps the old basis.

    Returns (changed (p,) bool, order (p, n)): the bases replaced, and the sort of each old basis
    (the identity where it was kept): new column i continues old column order[i].
    """
    Fd, Qd = F.to(dtype), Q.to(dtype)
    with decomposition_threads(F.device, F.shape[-1]):
        D = Qd.transpose(1, 2) @ Fd @ Qd
        quotients = D.diagonal(dim1=1, dim2=2)
        due = torch.ones(len(F), dtype=torch.bool, device=F.device)
        if tolerance > 0:
            off = torch.linalg.matrix_norm(D - torch.diag_embed(quotients))
            due = ~(off <= tolerance * torch.linalg.matrix_norm(D))
        order = quotients.argsort(dim=1, descending=True, stable=True)
        by_qr = due & qr if qr is not None else torch.zeros_like(due)
        by_eigh = due & ~by_qr
        new = torch.full_like(Qd, float("nan"))
        if by_eigh.any():
            new[by_eigh] = eigenbasis(Fd[by_eigh])
        if by_qr.any():
            sorted_Q = Qd[by_qr].gather(2, order[by_qr].unsqueeze(1).expand(-1, Qd.shape[1], -1))
            new[by_qr] = torch.linalg.qr(Fd[by_qr] @ sorted_Q).Q
    ok = torch.isfinite(new).flatten(1).all(1)
    changed = due & ok
    Q[changed] = new[changed].to(Q.dtype)
    state["refreshes"] += changed.long()
    state["skipped"] += (~due).long()
    state["failures"] += (due & ~ok).long()
    kept = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return changed, torch.where(changed.unsqueeze(1), order, kept)


class SOAP(CurvaturePreconditioner):
    name = "soap"
    max_block_hparam = "max_block"
    diagonal_hparam = "diagonal_above"
    HPARAMS = {
        **common_hparams(),
        "momentum": dataclasses.replace(common_hparams()["momentum"], default=0.0),
        "betas": Diagonal.HPARAMS["betas"],
        "eps": Diagonal.HPARAMS["eps"],
        "max_block": Shampoo.HPARAMS["max_block"],
        "diagonal_above": nonnegative_int("dimensions above this are kept whole and left unrotated: Adam's "
                                          "diagonal scaling along them (0: none)", Shampoo.HPARAMS["diagonal_above"].default),
        "precondition_frequency": Shampoo.HPARAMS["precondition_frequency"],
        "refresh": choice("how a basis is recomputed: eigendecomposition, or one warm-started "
                          "power-iteration step with QR", "qr", REFRESH),
        "refresh_tolerance": nonnegative("keep a basis while its factor's relative off-diagonal mass "
                                         "‖offdiag(QᵀFQ)‖/‖QᵀFQ‖ is at most this; 0 always refreshes", 0.0),
    }
    claims_fallback = Shampoo.claims_fallback  # the same rule: every loose tensor of order >= 2

    @classmethod
    def cost_parts(cls, g, hp, at):
        """Shampoo's factors with their eigenbases (none along an unrotated mode), Adam's two moments in the
        rotated coordinates."""
        b, w = at["max_block"], at["diagonal_above"]
        n, pieces = g.numel, g.pieces(b, w)
        state = {"exp_avg": (n, cost.FACTOR), "exp_avg_sq": (n, cost.FACTOR), "t": (pieces, cost.FACTOR),
                 **{c: (pieces, cost.INT64) for c in ("refreshes", "skipped", "failures")}}
        factors = refresh = 0
        # a refresh per factor: Qᵀ F Q (4c³), then qr(F Q) (2c³ + QR) or an eigendecomposition
        per_cube = 4 + (2 + 4 - sp.Rational(4, 3) if hp["refresh"] == "qr" else cost.EIGH)
        for j, m in enumerate(g.modes(b, w)):
            if m.whole == 1:  # unrotated: no factor, no basis
                continue
            state[f"factor{j}"] = state[f"basis{j}"] = (m.count * m.squares, cost.FACTOR)
            factors += m.count * m.squares
            refresh += m.count * m.cubes * per_cube
        rotation = cost._mode_products(g, b, w)
        return cost.Parts(state, statistics=rotation + cost.EMA * factors, refresh=refresh,
                     every=at["precondition_frequency"], update=3 * rotation + cost.ADAM_ROTATED * n, pieces=pieces)

    def init_group(self, group):
        counter = lambda: self.stacked_zeros(group, dtype=torch.int64)  # noqa: E731
        state = {"exp_avg": self.stacked_zeros(group, *group.shape),
                 "exp_avg_sq": self.stacked_zeros(group, *group.shape),
                 "t": self.stacked_zeros(group),
                 "refreshes": counter(), "skipped": counter(), "failures": counter()}
        for j, (d, unrotated) in enumerate(zip(group.shape, self.diagonal_modes(group))):
            if not unrotated:
                state[f"factor{j}"] = self.stacked_zeros(group, d, d)
                state[f"basis{j}"] = self.stacked_eye(group, d)
        return state

    def rotated_modes(self, group) -> list[int]:
        """The modes with a factor and a basis: all but those above diagonal_above."""
        return [j for j, unrotated in enumerate(self.diagonal_modes(group)) if not unrotated]

    def refresh_due(self, step):
        return step >= 1 and (step - 1) % self.hp["precondition_frequency"] == 0

    def refresh(self, statistics, comm):
        for group in self.groups:
            state = self.group_state(group)
            v = state["exp_avg_sq"]
            dtype = self.decomposition_dtype(v)
            qr = state["refreshes"] > 0 if self.hp["refresh"] == "qr" else None
            for j in self.rotated_modes(group):
                _, order = refresh_basis(state[f"factor{j}"], state[f"basis{j}"], state,
                                         self.hp["refresh_tolerance"], dtype, qr)
                index = order.view(order.shape[:1] + (1,) * j + order.shape[1:] + (1,) * (v.dim() - j - 2))
                v.copy_(v.gather(j + 1, index.expand_as(v)))

    def direction(self, G, state, collect):
        Gf = G.to(state["exp_avg"].dtype)
        order = Gf.dim() - 1
        bases = [state.get(f"basis{j}") for j in range(order)]  # None: unrotated
        beta1, beta2 = self.hp["betas"]
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["t"]
        t.add_(1)
        m.mul_(beta1).add_(Gf, alpha=1 - beta1)
        R = rotate(Gf, bases)
        v.mul_(beta2).addcmul_(R, R, value=1 - beta2)
        shape = (-1,) + (1,) * order
        m_hat = rotate(m, bases) / (1 - beta1 ** t).view(shape)
        v_hat = v / (1 - beta2 ** t).view(shape)
        if collect:
            beta = self.hp["stat_decay"]
            for j in range(order):
                if bases[j] is not None:
                    state[f"factor{j}"].mul_(beta).add_(mode_gram(Gf, j), alpha=1 - beta)
        return rotate(m_hat / (v_hat.sqrt() + self.hp["eps"]), bases, back=True)
