"""K-FAC: `G_block ≈ A ⊗ S`, update `U = (S + λ_S I)⁻¹ ∇W (A + λ_A I)⁻¹` (∇W = [∇W ∇b]).

Factored Tikhonov damping (Martens & Grosse 2015, §6.3): with damping λ and
`π = sqrt((tr A / dim A) / (tr S / dim S))`, `λ_A = π √λ` and `λ_S = √λ / π`, so that
`(A + λ_A I) ⊗ (S + λ_S I)` is close to `A ⊗ S + λ I` whatever the factors' relative scale.
The damped inverses are refreshed every `inv_every` steps, from Cholesky factorizations (the
default), eigendecompositions (`root_method="eigh"`) or Newton–Schulz iterations
(`root_method="newton"`, matrix products only); see gnfx.linalg.

Per-head blocks (`attention_blocks="head"`, `heads=h`): for the q/k/v projections that feed
attention (their `role`), S is restricted to its h diagonal blocks of d_out/h outputs each (3h for
a fused qkv projection), i.e. the curvature is modelled per head, `G ≈ A ⊗ blockdiag(S_1..S_h)`.

A block of independent row groups (gnfx.layouts.base) is `G ≈ blockdiag_j(A_j ⊗ S_j)`: each group
is damped (with its own π), inverted and applied as a layer of its own. A diagonal A (embeddings)
is inverted entrywise.

Step-size safeguard: KL clipping (Ba et al. 2017). The step is scaled by
`ν = min(1, sqrt(κ / Σ_blocks η² ⟨U, ∇W⟩))`, which bounds the change of the model's predictive
distribution as measured by the (K-FAC) Fisher itself. We chose it over grafting because it
uses the curvature K-FAC already has, costs one dot product per block, and keeps no extra state
(grafting onto Adam would need a second moment per parameter).
"""
from __future__ import annotations

import torch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import choice, nonnegative, nonnegative_int, positive, positive_int
from gnfx.layouts.base import merge_groups, split_groups
from gnfx.linalg import damped_inverse_power
from gnfx.preconditioners.base import Candidate
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams, root_method_hparam


# attention projections and their blocks of S per head (a fused qkv projection holds three)
PROJECTIONS = {"attention.q": 1, "attention.k": 1, "attention.v": 1, "attention.qkv": 3}


class KFAC(CurvaturePreconditioner):
    name = "kfac"
    tikhonov_damping = "damping"
    HPARAMS = {
        **common_hparams(),
        "damping": positive("Tikhonov damping λ, split between A and S by the π correction", 1e-3),
        "inv_every": positive_int("recompute the damped inverses every inv_every steps", 10),
        # Cholesky by default: K-FAC needs plain inverses, and they cost a fraction of an eigh
        # (benchmarks/results/profile.md)
        "root_method": root_method_hparam("cholesky"),
        "kl_clip": nonnegative("KL clipping κ of the step; 0 disables it", 1e-3),
        "attention_blocks": choice("S of attention q/k/v projections: one block per layer, or per head",
                                   "layer", ("layer", "head")),
        "heads": nonnegative_int("attention heads h, for attention_blocks='head'", 0),
    }

    def __init__(self, hp, blocks, params, optimizer):
        super().__init__(hp, blocks, params, optimizer)
        if hp.get("attention_blocks") == "head":
            if hp["heads"] < 1:
                raise ConfigError("attention_blocks='head' needs the number of heads: pass heads=h")
            for b in blocks:
                if b.role in PROJECTIONS and b.d_out % (hp["heads"] * PROJECTIONS[b.role]):
                    raise ConfigError(f"attention_blocks='head': block {b.name!r} ({b.role}) has {b.d_out} outputs, "
                                      f"not divisible into heads={hp['heads']} heads")

    def _per_head(self, block, S: torch.Tensor) -> torch.Tensor:
        """S restricted to its per-head diagonal blocks (h blocks of d_out/h; 3h for a fused qkv)
        when attention_blocks='head' and the block is a q/k/v projection; else S."""
        if self.hp.get("attention_blocks") != "head" or block.role not in PROJECTIONS:
            return S
        blocks = self.hp["heads"] * PROJECTIONS[block.role]
        size = S.shape[-1] // blocks
        head = torch.arange(S.shape[-1], device=S.device) // size
        return S * (head.unsqueeze(0) == head.unsqueeze(1)).to(S.dtype)

    in_auto = True
    # measured (benchmarks/results/quadratic_step.md): every target in 0.58-1.03x AdamW's best steps
    quadratic_by_default = True

    @classmethod
    def needs(cls, hp):
        return frozenset({"A", "S"})

    @classmethod
    def cost_parts(cls, g, hp, at) -> cost.Parts:
        """(A + λ_A I)⁻¹ (d_a², or d_a for an embedding's diagonal A) and (S + λ_S I)⁻¹ (d_out²);
        g of each, d_a² and s², for g row groups."""
        _, d_a = g.dims
        n, s, k = g.numel, g.rows, g.groups
        diagonal_A = g.diagonal_A
        return cost.Parts(
            {"A_inv": (d_a if diagonal_A else k * d_a ** 2, cost.FACTOR), "S_inv": (k * s ** 2, cost.FACTOR),
             "failures": (1, cost.INT64), "momentum": (n, cost.FACTOR)},
            refresh=((2 * d_a if diagonal_A else k * cost.inverse_power_flops(d_a, hp["root_method"]))
                     + k * cost.inverse_power_flops(s, hp["root_method"])),
            every=at["inv_every"],
            update=2 * n * s + (cost.DIAGONAL_A * n if diagonal_A else 2 * n * d_a) + cost._kl_clip(hp, n) + cost.TAIL * n)

    @classmethod
    def auto_candidates(cls, hp, g):
        """Below Shampoo with its own max_block, above Shampoo blocked finer (gnfx.plan)."""
        return [Candidate(1, hp)]

    def init_group(self, group):
        shapes = self.layout(group).factor_shapes()
        return {"A_inv": self.stacked_identity(group, shapes["A"]), "S_inv": self.stacked_identity(group, shapes["S"]),
                "failures": self.stacked_zeros(group, dtype=torch.int64)}

    def refresh_due(self, step):
        return step % self.hp["inv_every"] == 0

    def refresh(self):
        stats = self.opt.statistics
        for group in self.groups:
            values = [stats[p.target.block.name].values for p in group.pieces]
            if not all("A" in v and "S" in v for v in values):
                continue  # no statistics yet: keep the current inverses
            state = self.group_state(group)
            mine = self.owned(group)
            if len(mine):
                A = torch.stack([values[i]["A"] for i in mine.tolist()])
                S = torch.stack([self._per_head(group.pieces[i].target.block, values[i]["S"]) for i in mine.tolist()])
                if group.groups > 1:  # every row group a layer of its own
                    A_inv, S_inv, ok = self._inverses(A.flatten(0, 1), S.flatten(0, 1), False)
                    A_inv, S_inv = A_inv.unflatten(0, A.shape[:2]), S_inv.unflatten(0, S.shape[:2])
                    ok = ok.view(A.shape[:2]).all(1)
                else:
                    A_inv, S_inv, ok = self._inverses(A, S, self.layout(group).diagonal_A)
                state["A_inv"][mine[ok]] = A_inv[ok]
                state["S_inv"][mine[ok]] = S_inv[ok]
                state["failures"][mine] += (~ok).long()
            self.share(group, [state["A_inv"], state["S_inv"], state["failures"]])

    def _inverses(self, A, S, diagonal_A: bool):
        """The damped inverses of stacked factors A and S (A stacked diagonals where `diagonal_A`),
        and which of them are finite."""
        mean_a = A.mean(1) if diagonal_A else A.diagonal(dim1=1, dim2=2).mean(1)
        mean_s = S.diagonal(dim1=1, dim2=2).mean(1)
        ok_scale = (mean_a > 0) & (mean_s > 0)
        pi = torch.where(ok_scale, (mean_a / mean_s.where(ok_scale, 1)).sqrt(), torch.ones_like(mean_a))
        root = self.hp["damping"] ** 0.5
        dtype = self.decomposition_dtype(S)
        if diagonal_A:
            A_inv = 1 / (A.clamp(min=0) + (pi * root).unsqueeze(1))
            ok_a = torch.isfinite(A_inv).all(1)
        else:
            A_inv, ok_a = damped_inverse_power(A, pi * root, 1.0, dtype, method=self.hp["root_method"])
        S_inv, ok_s = damped_inverse_power(S, root / pi, 1.0, dtype, method=self.hp["root_method"])
        return A_inv, S_inv, ok_a & ok_s

    def curvature_product(self, group, i, V):
        """(A ⊗ S) vec(V) = S V A from the averaged statistics (A stored as its diagonal for
        embeddings; S restricted to its heads with attention_blocks='head'; per row group,
        S_j V_j A_j, for a grouped block: gnfx.layouts.base)."""
        block = group.pieces[i].target.block
        values = self.opt.statistics[block.name].values
        A, S = values["A"], self._per_head(block, values["S"])
        V = V.to(S.dtype)
        if A.dim() == 3:
            return (S @ V.reshape(len(S), -1, V.shape[1]) @ A).reshape(V.shape)
        SV = S @ V
        return SV * A if A.dim() == 1 else SV @ A

    def direction(self, G, state, collect):
        """S⁻¹ G A⁻¹ for each piece; the inverses are stacked as the layout's factors (init_group)."""
        S_inv, A_inv = state["S_inv"], state["A_inv"]
        G = G.to(S_inv.dtype)
        if A_inv.dim() == 2:  # a diagonal A, stacked (k, d_a)
            return torch.bmm(S_inv, G) * A_inv.unsqueeze(1)  # bmm: matmul's reshapes cost dispatches
        if A_inv.dim() == 4:  # row groups, stacked (k, groups, ., .)
            groups = A_inv.shape[1]
            return merge_groups(torch.bmm(torch.bmm(S_inv.flatten(0, 1), split_groups(G, groups)),
                                          A_inv.flatten(0, 1)), G.shape[0])
        return torch.bmm(torch.bmm(S_inv, G), A_inv)

    def safeguard(self, Us, Gs, lr):
        kappa = self.hp["kl_clip"]
        if kappa == 0:
            return None
        dots = torch.cat([torch.linalg.vecdot(U.flatten(1), G.to(U.dtype).flatten(1)) for U, G in zip(Us, Gs)])
        vfv = self.sum_over_owners((lr.to(dots.dtype) ** 2 * dots).sum())  # Σ_blocks η² ⟨U, ∇W⟩
        return (kappa / vfv.abs().clamp(min=torch.finfo(vfv.dtype).tiny)).sqrt().clamp(max=1.0)
