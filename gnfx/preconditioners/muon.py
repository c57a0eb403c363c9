"""Muon: momentum orthogonalized by a Newton–Schulz iteration (Jordan et al. 2024), on the hidden
matrices the graph finds; the diagonal preconditioner (AdamW) on everything else.

**Which parameters.** A block is a hidden matrix when its layout reads it as one plain matrix W of
`z = W a` (gnfx.layouts: no diagonal A, so no embedding or position table, and one row group, so no
norm affine or grouped convolution) and it is neither an input layer (it reads the model's input)
nor the output layer (the model returns its output): `block.model_input`, `block.model_output`,
passes/boundary.py. Jordan et al. give Muon the hidden layers only, the input embedding and the
output layer to AdamW. Measured on the digits CNN (lr 0.01, AdamW at the same lr): its first convolution on
AdamW reached the training-loss target in 95 steps, on Muon in 180 (the validation target in 65
and 55). Muon serves the hidden matrices only (`serves`): gnfx.plan gives every other block, like
every parameter no block claims, the fallback "diag" (AdamW, at the learning rate η, with the same
`betas`, `eps` and weight decay), and says so in the plan's reason. Of a hidden matrix, its weight
W, d_out x d_in as the layout views it (a conv kernel flattened to d_out x C_in·k·k), gets Muon and
its bias AdamW, here: the block stays one unit of the plan. This is the split torch.optim.Muon's
users write by hand.

**Muon** (torch.optim.Muon's conventions, so that learning rates carry over). For a hidden W with
gradient G, momentum buffer M (zero at first), momentum μ, learning rate η, weight decay λ:

    M ← μ M + (1-μ) G,     X = (1-μ) G + μ M  (nesterov)  or  X = M,
    O = NS_k(X),           θ ← θ (1 - η λ) - η s O,

with the shape scale s = sqrt(max(1, d_out/d_in)) (adjust_lr="original", Keller Jordan's) or
s = 0.2 sqrt(max(d_out, d_in)) ("match_rms_adamw", Moonshot's: the step's RMS matches AdamW's, so
AdamW's learning rate serves). NS_k, k = ns_steps, approximates the orthogonal polar factor U Vᵀ of
X = U Σ Vᵀ: with X transposed so that rows ≤ columns, X₀ = X / max(‖X‖_F, ε) (singular values in
[0, 1]) and

    X_{j+1} = a X_j + (b A_j + c A_j²) X_j,    A_j = X_j X_jᵀ,    (a, b, c) = (3.4445, -4.7750, 2.0315),

each singular value σ following p(σ) = aσ + bσ³ + cσ⁵, so that O = U p^k(Σ / ‖X‖_F) Vᵀ exactly (the
same singular vectors). The coefficients maximize the slope at 0 (a) rather than converge: after 5
steps every σ ≥ 0.002 ‖X‖_F ends in [0.68, 1.21], not at 1 (smaller ones grow by about a⁵ ≈ 490).
Every group of equal shape runs as one batched iteration (bmm), in `ns_dtype` (torch.optim.Muon's
is bfloat16).

**Attention projections per head** (`per_head=True`, `heads=h`): the q, k and v projections
(`block.role`, passes/attention.py) compute head j's queries, keys or values with the rows
j·d_out/h to (j+1)·d_out/h of W (a fused qkv projection: 3h slices, q's heads, then k's, then v's),
and the output projection reads head j's output with its columns j·d_in/h to (j+1)·d_in/h. Each such
slice P (d_out/h x d_in, or d_out x d_in/h) is then a matrix of its own: its own buffer rows, its
own O_P = NS_k(X_P) and its own shape scale s(P), so that every head's step is orthogonal rather
than the projection's as a whole. The slices are pieces of the projection's target
(gnfx.targets), grouped with every other matrix of their shape into one batched iteration.
Measured on the benchmark char GPT (2 layers, 4 heads of 16, d_model 64; 3 seeds,
benchmarks/results/muon.md), whole projections reached the validation and training targets in
150 and 175 steps at the best lr (0.03), per-head slices in 175 and 225, and with
adjust_lr="match_rms_adamw" (which scales slices and whole projections alike) in 125 and 175
against 150-175 and 175-200 (lr 0.02); per head also ended at a higher validation loss after 400
steps (1.48-1.51 against 1.44-1.46). So per_head is off by default.

**AdamW** on the biases of the hidden matrices, with Adam's `betas`, `eps`, the step count t per
piece, and the learning rate η (scaled by any schedule):

    m ← β₁ m + (1-β₁) g,   v ← β₂ v + (1-β₂) g²,   θ ← θ (1 - η λ) - η · m̂ / (√v̂ + ε)

with m̂ = m / (1-β₁ᵗ), √v̂ = √v / √(1-β₂ᵗ): torch.optim.AdamW's step, and the diagonal
preconditioner's (gnfx.preconditioners.diag), at learning rate η. The buffers are the `momentum`
state every curvature piece has (M for Muon, m for AdamW), so Muon keeps n entries per hidden
matrix and AdamW 2 d_out plus a count per bias; there is no heavy-ball momentum after the step (its
own momentum precedes the orthogonalization), which is why Muon refuses step="quadratic" (that step
replaces the heavy-ball momentum by setting `momentum` to 0, which here would be Muon's own).
AdamW at another learning rate than Muon's: those parameters moved into a param group of their own
with its lr (`model.optimizer.add_param_group`; tests/test_muon.py, `compile_with_adamw_lr`).
"""
from __future__ import annotations

import dataclasses
import math

import sympy as sp
import torch

from gnfx.cost import ADAMW, FACTOR, Parts
from gnfx.errors import ConfigError
from gnfx.hparams import choice, flag, nonnegative_int, positive_int, unit_interval
from gnfx.layouts import layout_of
from gnfx.preconditioners.curvature import CurvaturePreconditioner
from gnfx.preconditioners.diag import Diagonal
from gnfx.preconditioners.kfac import PROJECTIONS
from gnfx.targets import Piece, Target, cut, group_pieces, make_groups, param_target
from gnfx.transforms import Step
from gnfx.transforms.chain import chain_hparam

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of Keller Jordan's quintic, as torch.optim.Muon
NS_EPS = 1e-7  # ε of the normalization X / max(‖X‖_F, ε), as torch.optim.Muon
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ADJUST_LR = ("original", "match_rms_adamw")


def newton_schulz(X: torch.Tensor, steps: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NS_steps(X) for each matrix of the stack X (k, r, c) (module doc), in `dtype` (None: X's),
    returned in X's dtype: approximately the orthogonal polar factor U Vᵀ of each X = U Σ Vᵀ."""
    a, b, c = COEFFICIENTS
    Y = X.to(dtype or X.dtype)
    wide = Y.shape[1] <= Y.shape[2]
    Y = Y if wide else Y.transpose(1, 2)
    Y = Y / torch.linalg.matrix_norm(Y).clamp(min=NS_EPS)[:, None, None]
    for _ in range(steps):
        A = torch.bmm(Y, Y.transpose(1, 2))
        Y = torch.baddbmm(Y, torch.baddbmm(A, A, A, beta=b, alpha=c), Y, beta=a)
    return (Y if wide else Y.transpose(1, 2)).to(X.dtype)


def shape_scale(adjust_lr: str, rows: int, cols: int) -> float:
    """s of the step η s O for a rows x cols matrix (module doc; torch.optim.Muon's adjust_lr_fn)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


@dataclasses.dataclass
class WeightTarget(Target):
    """A block's weight W alone, as its layout views it (d_out x d_in), its bias not folded in."""

    @property
    def folded_bias(self) -> bool:
        return False


def head_pieces(target: Target, heads: int) -> list[Piece]:
    """The pieces Muon orthogonalizes one by one in the d_out x d_in matrix W of `target` (module
    doc): with heads h > 0, h row slices of d_out/h rows for a q, k or v projection (3h for a fused
    qkv: q's heads, k's, v's), h column slices of d_in/h columns for the output projection (the
    rows of head j's output, concatenated in head order, are the columns j·d_in/h.. of W_o); else W whole."""
    d_out, d_in = target.shape
    role = target.block.role
    if heads and role in PROJECTIONS:
        n = heads * PROJECTIONS[role]
        return [Piece(target, (slice(j * d_out // n, (j + 1) * d_out // n), slice(0, d_in))) for j in range(n)]
    if heads and role == "attention.out":
        return [Piece(target, (slice(0, d_out), slice(j * d_in // heads, (j + 1) * d_in // heads)))
                for j in range(heads)]
    return cut(target, None)


def is_hidden_matrix(block) -> bool:
    """Whether Muon serves the block's weight (module doc): one plain matrix, neither an input nor
    an output layer."""
    layout = layout_of(block)
    return not layout.diagonal_A and layout.groups == 1 and not (block.model_input or block.model_output)


class Muon(CurvaturePreconditioner):
    name = "muon"
    serves_only = "hidden matrices"
    no_quadratic_step = ("its momentum precedes the orthogonalization, and step='quadratic' would set it to 0: use "
                         "step='lr' with an lr (0.02 to start from)")
    unshardable = "its split of each block between Muon and AdamW is not wired to gnfx.fsdp's owners yet"
    HPARAMS = {
        "momentum": unit_interval("Muon's momentum μ, M ← μM + (1-μ)G, before the orthogonalization", 0.95),
        "nesterov": flag("orthogonalize (1-μ)G + μM (Nesterov) instead of M", True),
        "ns_steps": positive_int("Newton–Schulz iterations k of the orthogonalization", 5),
        "ns_dtype": choice("dtype of the Newton–Schulz iteration ('auto': float64 for a float64 weight, else "
                           "float32; torch.optim.Muon's is bfloat16)", "auto", ("auto", *NS_DTYPES)),
        "adjust_lr": choice("shape scale of the step: sqrt(max(1, rows/cols)) ('original') or "
                            "0.2 sqrt(max(rows, cols)) ('match_rms_adamw')", "original", ADJUST_LR),
        # off: whole projections reached the char GPT's targets in fewer steps (module doc)
        "per_head": flag("orthogonalize each attention head's slice of the q, k, v and output projections on "
                         "its own (needs heads=h) instead of each projection whole", False),
        "heads": nonnegative_int("attention heads h, for per_head=True", 0),
        "betas": Diagonal.HPARAMS["betas"],
        "eps": Diagonal.HPARAMS["eps"],
        "chain": chain_hparam(),
    }

    def __init__(self, hp, blocks, params, optimizer):
        if hp["per_head"]:
            h = hp["heads"]
            if h < 1:
                raise ConfigError("per_head=True cuts the attention projections into their heads: pass heads=h "
                                  "(the model's number of attention heads), or per_head=False")
            for b in blocks:
                slices = h * PROJECTIONS.get(b.role, 1)
                size = b.d_out if b.role in PROJECTIONS else b.d_in
                if b.role in (*PROJECTIONS, "attention.out") and size % slices:
                    side = "outputs" if b.role in PROJECTIONS else "inputs"
                    raise ConfigError(f"per_head=True: block {b.name!r} ({b.role}) has {size} {side}, not divisible "
                                      f"into heads={h} heads")
        super().__init__(hp, blocks, params, optimizer)

    @classmethod
    def serves(cls, block, hp):
        """The hidden matrices (module doc); gnfx.plan gives the other blocks "diag"."""
        return is_hidden_matrix(block)

    def piece_groups(self, blocks, params):
        """The hidden matrices W (as their layouts view them, biases apart; attention projections cut
        into their heads with per_head, `head_pieces`) grouped by shape, then AdamW's groups
        ("<name>_adamw_<i>") of their biases. `params` is empty: Muon claims no loose parameter."""
        heads = self.hp["heads"] if self.hp["per_head"] else 0
        matrices = [WeightTarget(b.name, (b.weight,), (b.d_out, b.d_in), b, layout_of(b).view) for b in blocks]
        biases = [param_target(b.bias, self.parameters.param(b.bias).shape) for b in blocks if b.bias is not None]
        return (group_pieces(self.name, [p for t in matrices for p in head_pieces(t, heads)])
                + make_groups(f"{self.name}_adamw", biases))

    def is_adamw(self, group) -> bool:
        return group.key.startswith(f"{self.name}_adamw_")

    def init_group(self, group):
        """The buffer M (Muon) or m (AdamW), as the `momentum` state; AdamW's second moment and step count."""
        state = {"momentum": self.stacked_zeros(group, *group.shape)}
        if self.is_adamw(group):
            state.update(exp_avg_sq=self.stacked_zeros(group, *group.shape), t=self.stacked_zeros(group))
        return state

    def direction(self, G, state, collect):
        """Muon's step s·NS_k(X) for a group of hidden matrices, AdamW's m̂ / (√v̂ + ε) for a group of
        their biases (module doc); the buffers M and m are state["momentum"]."""
        M = state["momentum"]
        G = G.to(M.dtype)
        if "exp_avg_sq" in state:
            beta1, beta2 = self.hp["betas"]
            t, v = state["t"], state["exp_avg_sq"]
            t.add_(1)
            M.lerp_(G, 1 - beta1)
            v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
            shape = (-1,) + (1,) * (G.dim() - 1)
            denominator = (v.sqrt() / (1 - beta2 ** t).sqrt().view(shape)).add_(self.hp["eps"])
            return M / denominator / (1 - beta1 ** t).view(shape)
        mu = self.hp["momentum"]
        M.lerp_(G, 1 - mu)
        X = G.lerp(M, mu) if self.hp["nesterov"] else M
        O = newton_schulz(X, self.hp["ns_steps"], NS_DTYPES.get(self.hp["ns_dtype"]))
        return O * shape_scale(self.hp["adjust_lr"], G.shape[1], G.shape[2])

    @classmethod
    def default_chain(cls, hp):
        """θ ← θ(1 - ηλ) - η U alone: the direction already holds the momentum (no heavy-ball stage)."""
        return [Step()]

    @classmethod
    def cost_parts(cls, g, hp, at):
        """A hidden matrix (d_out x d_in, n entries): the buffer M (n), and per step the momenta
        (6 per entry), ns_steps iterations on the r x c matrix, r = min, c = max(d_out, d_in)
        (X Xᵀ: 2r²c; b A + c A²: 2r³ + 2r²; a X + B X: 2r²c + 2rc), the normalization and the
        shape scale (4 per entry); its chain's θ(1-ηλ) - η U (gnfx.transforms.Step) over the matrix
        and the bias is added by gnfx.cost (`chained`). Its bias (d_out entries) gets
        AdamW: m, v (2 per entry) and a step count, ADAMW FLOPs per entry with the step (gnfx.cost, as the diagonal
        preconditioner). Muon serves no other block (`serves`). An attention projection cut into its
        heads (per_head) is counted whole, an upper bound: h slices of d/h x d cost
        h(4(d/h)²d + 2(d/h)³ + ...) ≤ 4d³ + 2d³ + ... per iteration (gnfx.cost's geometry does not
        know the block's role)."""
        d_out, d_a = g.dims
        n = d_out * (d_a - 1 if g.bias else d_a)
        r, c = sp.Min(d_out, n / d_out), sp.Max(d_out, n / d_out)
        iteration = 4 * r ** 2 * c + 2 * r ** 3 + 2 * r ** 2 + 2 * r * c
        state = {"momentum": (n, FACTOR)}
        update = 10 * n + hp["ns_steps"] * iteration
        if g.bias:
            state.update({"bias momentum": (d_out, FACTOR), "bias exp_avg_sq": (d_out, FACTOR), "bias t": (1, FACTOR)})
            update += (ADAMW - Step().flops_per_entry()) * d_out
        return Parts(state, update=update, chained=n + (d_out if g.bias else 0))


