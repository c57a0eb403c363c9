"""Rank-k plus diagonal curvature: `Ĝ = D + U diag(ŝ) Uᵀ`, applied as `(Ĝ + λI)⁻¹` by Woodbury.

Per block, with n = the entries of `[W b]`, the loss `L = 1/M Σ_m ℓ_m` over N examples and M loss
terms (docs/design.md §1) and the GGN `G = 1/M Σ_m J_mᵀ H_ℓ J_m` of the block's entries:

* v is the block's gradient `∂L/∂[W b]` of the statistic backward (gnfx.statistics, "grad"). With
  `fisher="mc"` (its default whenever `loss=` is given) it is the gradient at labels
  sampled from the model, `v = 1/M Σ_m J_mᵀ r_m` with E[r_m] = 0 and E[r_m r_mᵀ] = H_ℓ independently
  per term (gnfx.fisher), so E[v] = 0 and `E[M v vᵀ] = G`: w = √M v is one sample of the GGN's
  square root and its outer products average to G (a curvature direction, not the gradient's).
  With `fisher="empirical"` (no loss given) v is the mini-batch gradient, and M v vᵀ is *not* an
  estimate of a Fisher: its top eigenvector is the persistent gradient direction (Kunstner, Balles
  & Hennig 2019); D then holds the curvature.
* The sketch `Ĝ_s = β Ĝ_s + (1-β) w wᵀ` (β = stat_decay, zero start, bias-corrected
  `ŝ = s / (1-βᵗ)` after t statistic steps) is kept as its top-k eigenpairs U diag(s) Uᵀ (U
  orthonormal, n x k): each statistic step forms `β U diag(s) Uᵀ + (1-β) w wᵀ = B Bᵀ` with
  `B = [U √(β s), √(1-β) w]`, takes its eigenpairs exactly from a thin QR of B (B = Q R,
  eig(R Rᵀ) = V diag(s') Vᵀ, eigenvectors Q V) and keeps the top k: a streaming (Oja-style)
  tracker of the leading eigenspace.
* D is the per-example Fisher diagonal of the same backward (gnfx.statistics, "diag", the moving
  average with β), `diag = 1/N Σ_n (∇ℓ̃_n)²` for the per-example loss ℓ̃_n = 1/T Σ_t ℓ_{n,t}
  (T = M/N terms per example): with sampled labels independent across the T terms,
  `E[diag] = diag(G) / T`, so `D = T · diag` estimates diag(G) on the GGN's scale, as w wᵀ
  estimates G (for T = 1, `E[diag] = diag(G)` and `E[N v vᵀ] = G`).

The step is `Δ = -(D + U diag(ŝ) Uᵀ + λI)⁻¹ g` for the training gradient g. With E = D + λI
(diagonal) and Y = U diag(√ŝ), Woodbury's identity in the form that needs no ŝ⁻¹ (ŝ may be 0),

    (E + Y Yᵀ)⁻¹ g = E⁻¹ g - E⁻¹ Y (I_k + Yᵀ E⁻¹ Y)⁻¹ Yᵀ E⁻¹ g,

costs O(n k + k³) per piece (Sherman–Morrison for k = 1). λ = `damping` is a Tikhonov damping on
the GGN's scale, so that with `step="quadratic"` (gnfx.quadratic_step) it moves with the
Levenberg–Marquardt λ while α and μ come from the exact GGN. That is not its default: measured on the
digits tasks (benchmarks/results/defaults.md, "rank1"), the LM rule lowers λ to its floor (ρ ≈ 1 along
a step whose length α the exact GGN chose) while the direction (D + λI)⁻¹ g, dominated by the
entries of smallest D, worsens (α ~ 1e-3 on the deep autoencoder: D + U diag(ŝ) Uᵀ misses most of
G's off-diagonal mass). By default it takes the fixed-lr step with its per-block step size grafted
from Adam (gnfx.transforms.Graft, the first stage of its default update chain), and `fisher="mc"`
whenever `loss=` is given. Measured there too, and not adopted: the direction on Adam's scale (D^{1/2}
and the sketch's root), λ relative to D, more sketch vectors or eigenpairs, a longer average and a
refresh warm-up reached no more targets than these defaults, and none the digits MLP's validation target.

Under data parallelism the statistics are those of the whole batch (gnfx.distributed): `grad`
averages to the whole batch's v, and M and N come from `inverse_counts` (W ranks average
[1/N_r, 1/M_r] to [W/N, W/M], exactly when every rank has the same T = M_r/N_r).

Checkpoints of the rank1 before this sketch (the empirical sketch of g gᵀ on the identity, state
without D, no statistics) do not load: the loader names the change (`state_change`).
"""
from __future__ import annotations

import sympy as sp
import torch

from gnfx import cost
from gnfx.hparams import choice, positive, positive_int
from gnfx.linalg import eigh
from gnfx.preconditioners.base import Candidate
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams
from gnfx.preconditioners.diag import Diagonal
from gnfx.transforms import Graft
from gnfx.transforms.graft import GRAFTS


class RankK(CurvaturePreconditioner):
    name = "rank1"
    tikhonov_damping = "damping"
    HPARAMS = {
        **common_hparams(),
        "rank": positive_int("number k of tracked eigenpairs of the curvature", 1),
        "damping": positive("λ of (D + U diag(s) Uᵀ + λI)⁻¹, on the GGN's scale", 1e-3),
        "graft": choice("the method whose per-block step size is grafted", "adam", GRAFTS),
        "betas": Diagonal.HPARAMS["betas"],
        "eps": Diagonal.HPARAMS["eps"],
    }
    state_change = ("rank1 now sketches the true Fisher on top of its per-example diagonal D (its state keeps D "
                    "and its blocks collect statistics); a checkpoint of the earlier rank1 (the empirical sketch "
                    "of g gᵀ, no D) cannot continue: load the model's parameters and start the optimizer afresh")

    in_auto = True
    # with loss= its sketch is of the true Fisher (fisher="mc"); measured (benchmarks/results/defaults.md,
    # "rank1"): its fixed-lr step grafted onto Adam reaches the digits targets in fewer steps than the
    # quadratic step, whose λ falls to its floor where D + U diag(ŝ) Uᵀ misses most of G
    true_fisher_by_default = True

    @classmethod
    def needs(cls, hp):
        return frozenset({"diag", "grad", "inverse_counts"})

    @classmethod
    def cost_parts(cls, g, hp, at):
        """U (n x k), s (k), D (n), t, a failure count (its chain adds the rest); per statistic step the
        exact rank-(k+1) update by a thin QR of B = [U √(βs), √(1-β) w] and an eigendecomposition of
        R Rᵀ; per step the Woodbury solve with E = D + λI."""
        n = g.numel
        k = sp.Min(at["k"], n)
        state = {"U": (n * k, cost.FACTOR), "s": (k, cost.FACTOR), "D": (n, cost.FACTOR), "t": (1, cost.FACTOR),
                 "failures": (1, cost.INT64)}
        k1 = k + 1
        statistics = n * k1 + cost.qr_flops(n, k1) + (2 + cost.EIGH) * k1 ** 3 + 2 * n * k1 * k + 2 * n
        # the products Yᵀ(E⁻¹ Y), Yᵀ(E⁻¹ g) and (E⁻¹ Y) c (2 n k² + 4 n k); elementwise E⁻¹ = 1/(D + λ),
        # E⁻¹ g, Y = U √ŝ and E⁻¹ Y, and the k x k solve
        woodbury = 2 * n * k ** 2 + 4 * n * k + cost.SOLVE * (n * (k + 1) + k ** 3)
        return cost.Parts(state, statistics=statistics, update=woodbury)

    @classmethod
    def auto_candidates(cls, hp, g):
        """Below K-FAC and every blocked Shampoo, above the diagonal; none for a block whose rows are routed
        at run time (stacked experts: no per-example gradients, gnfx.layouts.experts)."""
        return [] if g.layout is not None and g.layout.routed else [Candidate(3, hp)]

    def init_group(self, group):
        n = 1
        for d in group.shape:
            n *= d
        k = min(self.hp["rank"], n)
        return {"U": self.stacked_zeros(group, n, k), "s": self.stacked_zeros(group, k),
                "D": self.stacked_zeros(group, n), "failures": self.stacked_zeros(group, dtype=torch.int64),
                "t": self.stacked_zeros(group)}

    def refresh_due(self, step):
        """After every statistic step (each takes its batch's w)."""
        return self.statistic_step(step)

    def refresh(self, statistics, comm):
        """D = T · diag from the averaged statistics, and the sketch updated with w = √M v of the last
        batch (module docstring), for every piece whose block has them. A piece takes each batch's w
        once: while the sketch has taken fewer vectors (t, and the failed updates) than its block's
        statistics have batches, so that a second refresh of the same step (after a rejected quadratic
        step) adds none. Every rank computes every piece (a QR of n x (k+1) per piece: less than sharing
        the results would send)."""
        world = comm.world if comm is not None else 1
        for group in self.groups:
            stats = [statistics[p.target.block.name] for p in group.pieces]
            if not all("diag" in b.values and "inverse_counts" in b.values for b in stats):
                continue  # no statistics yet: keep the current state
            state = self.group_state(group)
            counts = torch.stack([b.values["inverse_counts"] for b in stats])  # [W/N, W/M] per piece
            terms = (counts[:, 0] / counts[:, 1]).to(state["D"].dtype)  # T = M/N
            # the statistics are laid out like [W b], the piece's target (rank1 does not cut targets)
            state["D"].copy_(torch.stack([b.values["diag"].flatten() for b in stats]) * terms.unsqueeze(1))
            batches = torch.tensor([b.updates for b in stats], dtype=state["t"].dtype, device=state["t"].device)
            fresh = state["t"] + state["failures"] < batches
            if "grad" in stats[0].values and bool(fresh.any()):
                M = (world / counts[:, 1]).to(state["U"].dtype)
                w = torch.stack([b.values["grad"].flatten() for b in stats]).to(state["U"].dtype)
                self._update_sketch(state, w * M.sqrt().unsqueeze(1), self.hp["stat_decay"], fresh)

    @staticmethod
    def _update_sketch(state, w, beta, fresh):
        """U diag(s) Uᵀ ← the top k eigenpairs of β U diag(s) Uᵀ + (1-β) w wᵀ for the pieces marked
        `fresh` (w: (pieces, n))."""
        U, s, t = state["U"], state["s"], state["t"]
        # Bᵀ (pieces, k+1, n) built row by row, so that B = Bᵀ.mT is column-major as LAPACK's QR
        # takes it, and Q comes back column-major: the products below read rows of Qᵀ. (Building
        # B (n, k+1) row-major, its QR and Q V took 3.2 ms a statistic step at n = 2 x 65792 on
        # this project's CPU; this way 1.0 ms.)
        Bt = torch.cat([(U * (beta * s).sqrt().unsqueeze(1)).mT, ((1 - beta) ** 0.5) * w.unsqueeze(1)], dim=1)
        Q, R = torch.linalg.qr(Bt.mT)
        evals, evecs = eigh(R @ R.transpose(1, 2))
        k = s.shape[1]
        new_s, new_U = evals[:, -k:].clamp(min=0), (evecs[:, :, -k:].mT @ Q.mT).mT
        # a piece whose decomposition is not finite keeps its last sketch, and is counted (0·x sums
        # to 0 exactly when every x is finite, else to NaN: 7x faster here than isfinite().all())
        finite = torch.isfinite(new_s).all(1) & (new_U.flatten(1).mul(0).sum(1) == 0)
        ok = finite & fresh
        s.copy_(torch.where(ok.unsqueeze(1), new_s, s))
        U.copy_(torch.where(ok.view(-1, 1, 1), new_U, U))
        t.add_(ok.to(t.dtype))
        state["failures"] += (fresh & ~finite).long()

    def _scaled_eigenvectors(self, state):
        """Y = U diag(√ŝ), ŝ = s / (1 - βᵗ): the bias-corrected sketch Y Yᵀ, (pieces, n, k)."""
        s_hat = state["s"] / (1 - self.hp["stat_decay"] ** state["t"].clamp(min=1)).unsqueeze(1)
        return state["U"] * s_hat.sqrt().unsqueeze(1)

    def curvature_product(self, group, i, V, statistics):
        """(D + U diag(ŝ) Uᵀ) vec(V): the modelled curvature, undamped."""
        state = self.group_state(group)
        Y = self._scaled_eigenvectors(state)[i]
        v = V.to(Y.dtype).flatten()
        return (state["D"][i] * v + Y @ (Y.T @ v)).reshape(V.shape)

    def direction(self, G, state, collect):
        """(D + Y Yᵀ + λI)⁻¹ vec(G) per piece by Woodbury (module docstring)."""
        Y = self._scaled_eigenvectors(state)
        g = G.to(Y.dtype).flatten(1)  # (pieces, n)
        E_inv = torch.add(state["D"], self.damping()).reciprocal_()
        x = E_inv * g
        # For k = 1 elementwise forms: an (n x 1) matrix product takes a slow path (8x slower than a dot
        # product at n = 10⁶ on this project's CPU). Each pass over n entries writes into a tensor this
        # step made (E⁻¹ y into E⁻¹, both products of the dots into one, the result into x): four
        # temporaries of n entries where a fresh tensor per operation made nine, with the same values.
        if Y.shape[2] == 1:
            y = Y[..., 0]
            ey = E_inv.mul_(y)  # E⁻¹ y
            products = torch.mul(y, x)
            yx = products.sum(-1)  # yᵀ x, as torch.linalg.vecdot sums it
            c = yx / (1 + torch.mul(y, ey, out=products).sum(-1))
            P = x.addcmul_(ey, c.unsqueeze(1), value=-1)
        else:
            EY = E_inv.unsqueeze(2) * Y  # E⁻¹ Y (pieces, n, k)
            inner = torch.eye(Y.shape[2], dtype=Y.dtype, device=Y.device) + Y.mT @ EY  # I + Yᵀ E⁻¹ Y, SPD
            c = torch.cholesky_solve(Y.mT @ x.unsqueeze(2), torch.linalg.cholesky(inner))
            P = torch.baddbmm(x.unsqueeze(2), EY, c, alpha=-1)
        return P.reshape(G.shape)

    @classmethod
    def default_chain(cls, hp):
        """Grafting onto hp["graft"] (with Adam's β₂ and ε), then the heavy-ball tail."""
        return [Graft(hp["graft"], hp["betas"][1], hp["eps"])] + super().default_chain(hp)
