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

Big factors (`max_factor`): a factor with more entries than max_factor keeps only its diagonal
blocks (gnfx.layouts.base: m blocks of at most max_factor entries, a conv's input channels whole),
`A ≈ blockdiag(A_1, ..., A_m)` and likewise S, so that `G ≈ blockdiag(A_i) ⊗ blockdiag(S_j)` and
`U_ji = (S_j + λ_S I)⁻¹ G_ji (A_i + λ_A I)⁻¹` on the blocks G_ji of ∇W. π is the whole factor's
(tr A / dim A: the blocks hold the whole diagonal), so λ_A and λ_S are those of the unblocked
factors; the blocks are inverted as one batch. This cuts the refresh from d³ to m·b³ ≈ d·max_factor²,
the statistics from d² to d·b per row and the step's product from 2·d_out·d² to 2·d_out·d·b (gnfx.cost).
The product, 2(b_a + b_s) per entry of ∇W, does not shrink with the rows a step sees, while the layer's
own forward and backward products do (6 per entry and row): at rows far below the factors' sizes (a
Linear(25088, 4096) classifier at batch 8) blocks of 1024 cost ~80x the layer. So the plan asks
`factor_bound` for each block's own bound: max_factor, halved until the product is within
PRODUCT_BUDGET times the layer's products at gnfx.compile's `cost_rows` rows per call site (at one row,
blocks of 4 entries); the block table gives the blocks and why. The plan is made before any batch is
seen, so at the end of the first statistic forward each block's bound is asked again at the rows its
call sites saw (`smaller_bound`), and where that bound is smaller and saves more than REBOUND_FLOPS a
step the block is re-planned with it (gnfx.optimizer, `GnfxOptimizer.bound_factors_at_rows`; with
cost_rows given, gnfx warns instead, naming the cost_rows to pass).

Step-size safeguard: KL clipping (Ba et al. 2017), the first stage of its default update chain
(gnfx.transforms.KLClip). The step is scaled by
`ν = min(1, sqrt(κ / Σ_blocks η² ⟨U, ∇W⟩))`, which bounds the change of the model's predictive
distribution as measured by the (K-FAC) Fisher itself. We chose it over grafting because it
uses the curvature K-FAC already has, costs one dot product per block, and keeps no extra state
(grafting onto Adam would need a second moment per parameter).
"""
from __future__ import annotations

import dataclasses

import torch

from gnfx import cost
from gnfx.errors import ConfigError
from gnfx.hparams import choice, nonnegative, nonnegative_int, positive, positive_int
from gnfx.layouts import layout_of
from gnfx.layouts.base import blockdiag_left, blockdiag_right, merge_groups, split_groups
from gnfx.linalg import damped_inverse_power
from gnfx.preconditioners.base import Candidate
from gnfx.preconditioners.curvature import CurvaturePreconditioner, common_hparams, root_method_hparam
from gnfx.transforms import KLClip


# attention projections and their blocks of S per head (a fused qkv projection holds three)
PROJECTIONS = {"attention.q": 1, "attention.k": 1, "attention.v": 1, "attention.qkv": 3}
# the default max_factor (measured: benchmarks/results/performance.md, "Big factors")
MAX_FACTOR = 1024
# a block's preconditioned product S⁻¹ G A⁻¹ is kept within this multiple of its own forward and backward
# products at the plan's rows (gnfx.api's cost_rows): above it the plan halves the block's max_factor
# (`factor_bound`). 4: at the default cost_rows (256) a factor of up to 1024 entries keeps its blocks,
# 2·(1025 + 1024) FLOPs per entry <= 4·6·256, so only rows far below the factors' sizes (a wide
# classifier at a small batch: benchmarks/results/performance.md, "big factors at few rows") make the
# blocks smaller
PRODUCT_BUDGET = 4
# the FLOPs per step (10⁹, a few milliseconds on a CPU core) that smaller factor blocks must save before
# the rows of the first statistic forward, far fewer than cost_rows, re-plan a block (`smaller_bound`): a
# small model at a small batch keeps its whole factors, whose products cost microseconds
REBOUND_FLOPS = 1e9


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
        "max_factor": nonnegative_int("a factor A or S of more entries than this keeps only its diagonal blocks of "
                                      "at most max_factor entries (gnfx.layouts.base); 0: every factor whole",
                                      MAX_FACTOR),
    }

    def __init__(self, hp, blocks, params, parameters):
        super().__init__(hp, blocks, params, parameters)
        if hp.get("attention_blocks") == "head":
            if hp["heads"] < 1:
                raise ConfigError("attention_blocks='head' needs the number of heads: pass heads=h")
            for b in blocks:
                if b.role in PROJECTIONS and b.d_out % (hp["heads"] * PROJECTIONS[b.role]):
                    raise ConfigError(f"attention_blocks='head': block {b.name!r} ({b.role}) has {b.d_out} outputs, "
                                      f"not divisible into heads={hp['heads']} heads")
                if b.role in PROJECTIONS and layout_of(b).factor_blocking()["S"]:
                    raise ConfigError(f"attention_blocks='head' restricts S to its heads, but block {b.name!r} "
                                      f"({b.role}) has {b.d_out} outputs, more than max_factor={hp['max_factor']}, "
                                      f"so its S is blocked already: pass max_factor >= {b.d_out} (or 0), or "
                                      f"attention_blocks='layer'")

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
    # measured (benchmarks/results/defaults.md, fisher="mc", Nielsen's rule with damping_decay=0.5, the
    # loss-floor cap and the expansion, seeds 0-2): 0.14-0.41x AdamW's best steps on the digits MLP and
    # autoencoder targets, 0.33-0.52x on the digits CNN's, 0.71/0.70x on the char GPT's (seed 0)
    quadratic_by_default = True

    @classmethod
    def needs(cls, hp):
        return frozenset({"A", "S"})

    @classmethod
    def cost_parts(cls, g, hp, at) -> cost.Parts:
        """(A + λ_A I)⁻¹ (d_a², or d_a for an embedding's diagonal A) and (S + λ_S I)⁻¹ (d_out²);
        g of each, d_a² and s², for g row groups. A factor blocked by max_factor (Geometry.factor_blocks:
        m blocks of b) keeps m b², is inverted as m matrices of b and applied to the s x d_a gradient of a
        row group as m products (b x b)(b x d_a) (S) or (s x b)(b x b) (A), the last one on its r
        entries only (cost.applied_squares): 2 ((m-1) b² + r²) d_a and 2 ((m-1) b² + r²) s."""
        _, d_a = g.dims
        n, s, k = g.numel, g.rows, g.groups
        diagonal_A = g.diagonal_A
        (m_a, b_a), (m_s, b_s) = g.factor_blocks("A"), g.factor_blocks("S")
        squares_a, squares_s = cost.applied_squares(d_a, m_a, b_a), cost.applied_squares(s, m_s, b_s)
        return cost.Parts(
            {"A_inv": (d_a if diagonal_A else g.factor_entries("A"), cost.FACTOR),
             "S_inv": (g.factor_entries("S"), cost.FACTOR), "failures": (1, cost.INT64)},
            refresh=((2 * d_a if diagonal_A else k * m_a * cost.inverse_power_flops(b_a, hp["root_method"]))
                     + k * m_s * cost.inverse_power_flops(b_s, hp["root_method"])),
            every=at["inv_every"],
            update=(2 * k * squares_s * d_a + (cost.DIAGONAL_A * n if diagonal_A else 2 * k * squares_a * s)))

    @classmethod
    def factor_bound(cls, hp, block, g, at, rows_from="cost_rows per call site"):
        """max_factor, halved while the preconditioned product S⁻¹ G A⁻¹ (cost_parts' update: 2 (b_a + b_s)
        FLOPs per entry of [∇W ∇b] with blocks of b_a and b_s entries) exceeds PRODUCT_BUDGET times the
        block's own forward and backward products at the plan's rows B·R (cost.LAYER per entry and row),
        down to 1 (at one row it stops at 4: 2(4 + 4) <= 4·6); never below the d_out of a q/k/v projection
        whose S attention_blocks="head" restricts to its heads. None for max_factor = 0 (every factor whole,
        as asked, and without one). The reason says what the product cost at max_factor where it was halved,
        and where the rows came from (`rows_from`)."""
        bound = hp.get("max_factor")  # none for EKFAC, which keeps its factors whole
        if not bound:
            return None, ""
        rows = at["B"] * at["R"]
        limit = PRODUCT_BUDGET * cost.LAYER * rows
        floor = block.d_out if hp.get("attention_blocks") == "head" and block.role in PROJECTIONS else 1

        def per_entry(f):
            return cls.update_flops(hp, g, at, f) / float(g.numel)

        asked = per_entry(bound)
        while bound // 2 >= floor and per_entry(bound) > limit:
            bound //= 2
        if bound == hp["max_factor"]:
            return bound, ""
        return bound, (f"factors in blocks of at most {bound} (max_factor={hp['max_factor']}: S⁻¹GA⁻¹ {asked:.0f} "
                       f"FLOPs per entry, over {PRODUCT_BUDGET}x the layer's forward and backward at {rows} rows "
                       f"({rows_from}), {cost.LAYER * rows})")

    @classmethod
    def update_flops(cls, hp, g, at, max_factor) -> float:
        """FLOPs of one preconditioned product S⁻¹ G A⁻¹ of a block of geometry `g` with its factors in
        blocks of at most `max_factor` entries (cost_parts' update)."""
        return float(cls.cost_parts(dataclasses.replace(g, max_factor=max_factor), hp, {**at, "max_factor": max_factor}).update)

    @classmethod
    def smaller_bound(cls, hp, block, g, at, rows_from):
        """`factor_bound` at the rows of `at` where it is below the block's planned `max_factor` and its
        product S⁻¹ G A⁻¹ saves over REBOUND_FLOPS a step against the planned blocks' (else None)."""
        bound, why = cls.factor_bound(hp, block, g, at, rows_from)
        if bound is None or bound >= block.max_factor:
            return None
        saved = cls.update_flops(hp, g, at, block.max_factor) - cls.update_flops(hp, g, at, bound)
        return (bound, why) if saved > REBOUND_FLOPS else None

    @classmethod
    def auto_candidates(cls, hp, g):
        """Below Shampoo with its own max_block, above Shampoo blocked finer (gnfx.plan)."""
        return [Candidate(1, hp)]

    def init_group(self, group):
        shapes = self.layout(group).factor_shapes()
        return {"A_inv": self.stacked_identity(group, shapes["A"]), "S_inv": self.stacked_identity(group, shapes["S"]),
                "failures": self.stacked_zeros(group, dtype=torch.int64)}

    def refresh_due(self, step):
        """Every inv_every steps, and on each of the first refresh_warmup steps."""
        return step % self.hp["inv_every"] == 0 or step < self.hp["refresh_warmup"]

    def refresh(self, statistics, comm):
        for group in self.groups:
            values = [statistics[p.target.block.name].values for p in group.pieces]
            if not all("A" in v and "S" in v for v in values):
                continue  # no statistics yet: keep the current inverses
            state = self.group_state(group)
            mine = self.owned(group, comm)
            if len(mine):
                A = torch.stack([values[i]["A"] for i in mine.tolist()])
                S = torch.stack([self._per_head(group.pieces[i].target.block, values[i]["S"]) for i in mine.tolist()])
                A_inv, S_inv, ok = self._inverses(A, S, self.layout(group))
                state["A_inv"][mine[ok]] = A_inv[ok]
                state["S_inv"][mine[ok]] = S_inv[ok]
                state["failures"][mine] += (~ok).long()
            self.share(group, [state["A_inv"], state["S_inv"], state["failures"]], comm)

    def _inverses(self, A, S, layout):
        """The damped inverses of the stacked factors A and S of k pieces, shaped as the layout's
        factors (gnfx.layouts.base), and which pieces' inverses are all finite. Each row group (and
        each piece) is damped with its own π, from its whole factors' traces."""
        k, groups, diagonal_A = len(A), layout.groups, layout.diagonal_A
        d_a, s = (layout.block.d_in + (layout.block.bias is not None), layout.block.d_out // groups)
        # per (piece, row group): the factor as (k·groups, m, b, b) blocks (m = 1 for a whole factor)
        A_b = A if diagonal_A else as_blocks(A, groups)
        S_b = as_blocks(S, groups)
        trace_a = A_b.sum(1) if diagonal_A else A_b.diagonal(dim1=-2, dim2=-1).flatten(1).sum(1)
        mean_a, mean_s = trace_a / d_a, S_b.diagonal(dim1=-2, dim2=-1).flatten(1).sum(1) / s
        damping_A, damping_S = factored_damping(mean_a, mean_s, self.hp["damping"])
        dtype = self.decomposition_dtype(S)
        if diagonal_A:
            A_inv = 1 / (A_b.clamp(min=0) + damping_A.unsqueeze(1))
            ok_a = torch.isfinite(A_inv).all(1)
        else:
            A_inv, ok_a = self._block_inverses(A_b, damping_A, dtype)
        S_inv, ok_s = self._block_inverses(S_b, damping_S, dtype)
        ok = (ok_a & ok_s).view(k, groups).all(1)
        return A_inv.reshape(A.shape), S_inv.reshape(S.shape), ok

    def _block_inverses(self, F, damping, dtype):
        """(F_i + λ_i I)⁻¹ of each block of F (n, m, b, b), λ_i = damping[n] (n,), and which of the n
        factors have all blocks finite and hold statistics (an all-zero block, e.g. of inputs that
        were all zero, is fine: its inverse is I/λ)."""
        n, m = F.shape[:2]
        F_inv, ok = damped_inverse_power(F.flatten(0, 1), damping.repeat_interleave(m), 1.0, dtype,
                                         method=self.hp["root_method"])
        empty = (F == 0).flatten(2).all(2)  # (n, m)
        ok = ok.view(n, m)
        return F_inv.view(F.shape), (ok | empty).all(1) & ~empty.all(1)

    def curvature_product(self, group, i, V, statistics):
        """(A ⊗ S) vec(V) = S V A from the averaged statistics (A stored as its diagonal for
        embeddings; S restricted to its heads with attention_blocks='head'; per row group,
        S_j V_j A_j, for a grouped block; blockdiag(S_j) V blockdiag(A_i) for blocked factors:
        gnfx.layouts.base)."""
        block = group.pieces[i].target.block
        values = statistics[block.name].values
        S = self._per_head(block, values["S"])
        return factored_product(S.unsqueeze(0), V.to(S.dtype).unsqueeze(0), values["A"].unsqueeze(0))[0]

    def direction(self, G, state, collect):
        """S⁻¹ G A⁻¹ for each piece; the inverses are stacked as the layout's factors (init_group)."""
        S_inv = state["S_inv"]
        return factored_product(S_inv, G.to(S_inv.dtype), state["A_inv"])

    @classmethod
    def default_chain(cls, hp):
        """KL clipping with κ = hp["kl_clip"] (none for κ = 0), then the heavy-ball tail."""
        clip = [KLClip(hp["kl_clip"])] if hp["kl_clip"] > 0 else []
        return clip + super().default_chain(hp)


def factored_damping(mean_a: torch.Tensor, mean_s: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ_A, λ_S) = (π√λ, √λ/π) of factored Tikhonov damping (module docstring) for factors whose mean
    eigenvalues (tr A / dim A, tr S / dim S) are `mean_a` and `mean_s` (any shape, alike); π = 1 where a
    factor holds nothing (a mean of 0), so that λ_A λ_S = λ always."""
    ok_scale = (mean_a > 0) & (mean_s > 0)
    pi = torch.where(ok_scale, (mean_a / mean_s.where(ok_scale, 1)).sqrt(), torch.ones_like(mean_a))
    root = damping ** 0.5
    return pi * root, root / pi


def as_blocks(F: torch.Tensor, groups: int) -> torch.Tensor:
    """Stacked factors (k, *shape) of a layout's shape (gnfx.layouts.base: (d, d), (groups, d, d) or
    blocked (groups, m, b, b)) as (k·groups, m, b, b): per piece and row group its diagonal blocks,
    m = 1 for a whole factor."""
    if F.dim() == 5:
        return F.flatten(0, 1)
    return F.reshape(len(F) * groups, 1, F.shape[-1], F.shape[-1])


def factored_product(S: torch.Tensor, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """S_p X_p A_p for each piece p of the stack X (k, d_out, d_a), with S and A stacked (k, *shape) in a
    layout's factor shapes (gnfx.layouts.base): A a diagonal (k, d_a), whole (k, d, d), per row group
    (k, groups, d, d), or blocked (k, groups, m, b, b), likewise S (never diagonal). Per row group j:
    S_j X_j A_j, with blockdiag(S_1..) and blockdiag(A_1..) for blocked factors."""
    groups = S.shape[1] if S.dim() >= 4 else 1
    per_group = lambda F: F.flatten(0, 1) if F.dim() >= 4 else F  # noqa: E731 - (k·groups, ...)
    Y = blockdiag_right(blockdiag_left(per_group(S), split_groups(X, groups)), per_group(A))
    return merge_groups(Y, len(X))
