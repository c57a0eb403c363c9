"""The quadratic-model step: step size α, momentum μ and damping λ from the exact GGN.

docs/design.md §1 ("Step size and damping") states every rule below with its reasons; the measurements
behind each choice are in benchmarks/results/quadratic_step.md and defaults.md (sections named below).

The model. The update chain of every preconditioner of the plan proposes Δ (the step at the param
groups' lr); with δ the previous update applied and g the gradient of the batch loss L, the step is
d = αΔ + μδ minimizing the local quadratic model (Martens & Grosse 2015, §6–7)

    q(d) = gᵀd + ½ dᵀ(G + λI)d,        G = Jᵀ H_ℓ J   (the exact GGN on the step's batch).

With the rows (v_1, v_2) = (Δ, δ) of V, q along d = Σ_i c_i v_i is bᵀc + ½ cᵀMc with

    b_i = gᵀv_i,   M_ij = (J v_i)ᵀ H_ℓ (J v_j) + λ v_iᵀv_j,

so c = -M⁻¹b and the predicted reduction is -q(c) = -½ bᵀc (`minimize_quadratic`). With P
preconditioners Δ is split into their parts Δ_k, each with its own α_k: a (P+1)x(P+1) system. μ is
kept in MOMENTUM_RANGE (the other coefficients re-minimized at a bound); with no previous update μ = 0;
with an lr given (`capped`) every α ≤ 1. A loss over several outputs, L = Σ_k w_k L_k(z_k)
(gnfx.output_losses), has M_ij = Σ_k w_k (J_k v_i)ᵀ H_k (J_k v_j) + λ v_iᵀv_j.

The products. J v by forward mode through the replayed training forward (gnfx.forward_mode: one
tangent per row of V), H_ℓ in closed form from the output z (gnfx.ggn.output_hessian_product).
`quadratic_products="difference"` takes J v ≈ (f(θ + hv) − f(θ))/h instead (gnfx.finite_differences:
one forward without gradient per row); "auto", the default, does so where every captured graph is
smooth in θ (gnfx.passes.discontinuities) and θ and z are 32- or 64-bit (`_by_difference`), with the
training forward's z as f(θ) where the replay computes it bit for bit (`_difference_rows`).
`quadratic_rows=R` takes the GGN term of M on the first R loss terms only, rounded up to whole examples;
b and ρ stay the whole batch's.

The rules of a step, in the order `_step` applies them:

- The loss floor. The named losses are ≥ 0, so a predicted reduction above κ·L(θ) (κ = FLOOR_CAP) is
  wrong: the step is shortened along its ray to τc with -q(τc) = κ·L(θ) (`floor_capped`;
  `last_step["floor_scale"]` = τ). defaults.md, "Nielsen's rule and the loss floor".
- Levenberg–Marquardt damping, Nielsen's form (Madsen, Nielsen & Tingleff 2004, §3.2). With
  ρ = (L(θ) - L(θ+s)) / (-q(c)) on the same batch: accepted (ρ > 0) λ ← λ·max(ω, 1 - (2ρ - 1)³),
  ν ← 2; rejected λ ← νλ, ν ← 2ν; λ in [LAMBDA_MIN, LAMBDA_MAX] (`levenberg_marquardt`). The
  preconditioners whose damping is a Tikhonov λ on G's scale (K-FAC's factored damping, EKFAC) take λ.
- Rejection. A step with ρ ≤ 0 (or a non-finite loss) is retried on its batch at θ + t·s for up to
  BACKTRACKS values of t (safeguarded interpolation, `_backtrack`), λ raised to the damping whose model
  has t·s as its minimizer, sᵀ(G + λI)s = -gᵀs/t (Nocedal & Wright, Algorithm 4.1 and Theorem 4.1).
  None accepted: the step is undone, δ dropped, λ raised, the curvature preconditioners refreshed.
  Moving on to the next batch instead skipped the batches the model fits worst (defaults.md).
- The resolution of the float loss. A predicted reduction below r = ε·(Σ_k w_k c_k + LOSS_ROUNDING·L(θ))
  (c_k = 1 for the cross-entropies, whose log of a sum ≥ 1 rounds at ε/2 a row, 0 for mse; ε the
  loss's precision, `_precision`; `loss_resolution`) is not judged: λ and ν kept, the step taken unless
  its loss rose by more than r (`last_step["resolved"]` False). Judged, the rounding's ρ = 0 raised λ
  until the proposal rounded away (first_contact_20_rounding.md).
- The expansion (cross-entropy only, after DAMPING_WARMUP steps). An accepted judged step with ρ > 1
  is tried at e·s (e = EXPANSION) and kept if its batch loss is lower there (`_expand`): along s
  cross-entropy on a classified batch is near φ(t) = L∞ + D e^{-kt}, whose quadratic model stops at
  t = 1/k, ρ ≈ 2(1 - 1/e) whatever λ. The momentum carries s (defaults.md, "The exponential tail").
- The held-out step length κ (`held_out_scale`, 1 to start). After an adaptation judged below RHO_LOW
  or a rejection, the next step first tests δ on its own batch, which δ was not fitted on: κ ← eκ if
  L(θ + δ) is below L(θ) and at most L(θ - δ/2), κ ← κ/e if the latter is lower (e = HELD_OUT_FACTOR),
  κ in [1, HELD_OUT_MAX], and the step is κc. Where -q(κc) ≤ 0 there is no ρ: the step is kept only if
  its batch loss fell, else retried shorter with κ ← κ/e (`_held_out_scale`; torchvision_models.md).
- ρ every T steps (`damping_every`). ρ costs one forward at θ+s; it is computed on t mod T = 0, the
  first DAMPING_WARMUP steps, a step without δ, and a step predicting over PREDICTED_GROWTH times the
  last accepted adaptation's reduction (`adapts`); the others keep λ (ρ NaN, `adapted` False).
- The model every T_q steps (`quadratic_every`). Between solves the step is s = Σ_k α̂_k Δ_k + μ̂δ
  with the last solve's ĉ, provided 0 < -gᵀs ≤ PREDICTED_GROWTH·(-b̂ᵀĉ) and that solve was not judged
  below RHO_LOW (`_reuses`, `_reuse`); λ is adapted on solved steps only. quadratic_step.md, "The model
  every T_q steps".
- A fixed momentum (`quadratic_momentum` = μ̂). The step keeps a velocity on the proposal's scale,
  v = Δ + μ̂ v_prev, and takes s = Σ_k α_k v_k from the PxP system of the rows v_k (P tangents instead of
  P+1); a part whose velocity goes uphill, gᵀv_prev,k > 0, restarts at v_k = Δ_k (O'Donoghue & Candès
  2015; `_velocity`). quadratic_step.md, "One tangent".

L(θ+s). With `step(closure)` the closure's loss, called under torch.no_grad(). Without one, the loss
recovered from the output gradient g_z = ∂L/∂z of the step's backward at the output of one forward at
θ+s (`recovered_loss`): g_z fixes the targets of a mean-reduced named loss exactly (cross-entropy
t = softmax(z) - M g_z, mse y = z - g_z·numel(z)/2, binary cross-entropy y = σ(z) - g_z·numel(z); under a
GradScaler g_z is divided by its scale, `unscale`). Terms that do not go through z are left out; a loss
that is not the named one gives a wrong, finite ρ: pass a closure then. With loss="mse" and a closure
the recovered error at θ must not exceed the closure's loss (`_check_mean`: a summed squared error is
refused by name). A loss of the output's gradient (forces F = -∂E/∂x, a gradient penalty) is refused
(`_refuse_a_loss_of_the_output_gradient`).

Several forwards before one step: the model is the last forward's (gnfx warns once where one backward
reaches several outputs). Under torch.distributed M, b, L(θ) and the actual reduction are averaged over
the ranks, so every rank takes the same step; under FSDP2 θ, g, Δ and δ are gathered whole and the
products run without fully_shard's hooks (gnfx.fsdp).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from gnfx.errors import GnfxError
from gnfx.filled_gradients import fills_gradients
from gnfx.forward_mode import ModuleFunction, jvp_rows, load_decompositions
from gnfx.finite_differences import difference_rows
from gnfx.passes.discontinuities import discontinuities
from gnfx.flat_layout import FlatLayout, double_products
from gnfx.fsdp import local, without_fsdp_hooks
from gnfx.ggn import IGNORE_INDEX, forward_mode_error, forward_mode_kernels, output_hessian_product
from gnfx.output_losses import OutputLoss, named_outputs
from gnfx.outputs import LogitsLayout, log_softmax_gradient
from gnfx.parameter_store import held_tensor, holder
from gnfx.passes.module_attributes import attributes_as, holding_state, saved_attributes
from gnfx.random_state import RandomState

# λ's floor. At 1e-8 the char GPT's ρ stayed above 3/4, λ fell by ω each step to the floor by step
# 200, K-FAC's factored damping with it, α shrank to ~1e-4 and kfac at defaults missed both targets
# in 800 steps (val 1.841); at 1e-5 it reached them in 300/350 steps (seed 0) and 300/375 (seed 1),
# against AdamW's 425/500, and every digits run took the same steps as at 1e-8
# (benchmarks/results/quadratic_step.md, "λ's floor")
LAMBDA_MIN, LAMBDA_MAX = 1e-5, 1e6
# a solve judged at ρ below RHO_LOW is not reused by the steps between solves, and after an adaptation judged
# below it the next steps test their length on the next batch (module docstring)
RHO_LOW = 0.25
# the held-out step length κ (QuadraticStep._held_out_scale, module docstring): its factor per test and its
# upper bound (its lower bound is 1: shortening a step is the λ rule's)
HELD_OUT_FACTOR = 2.0
HELD_OUT_MAX = 64.0
# μ is kept a heavy-ball momentum (module docstring)
MOMENTUM_RANGE = (0.0, 0.99)
# the starting λ (K-FAC's `damping` under step="quadratic" unless given): a large λ0 acts as a warm-up,
# as λ only falls while ρ stays near 1. Measured on the digits MLP (kfac, val loss after 200 steps):
# λ0 = 1: 0.057 (0.07 first at ~160 steps); 0.1: 0.21 (best 0.12, overfits the batches); 1e-3: 1.5
# (a step fitted to one batch raised the training-set loss from 0.07 to 0.69)
# With fisher="mc" and ω = 0.9 (benchmarks/results/defaults.md, seeds 0-2): kfac at λ0 = 10 reached all 18
# digits targets where λ0 = 1 misses the CNN's on seeds 1-2, but the 22-step warm-up (10 → 1 at ω = 0.9)
# cost the small full-batch problems of tests/test_quadratic_step.py their bar of half AdamW's steps
# (deep_linear); λ0 = 3 diverged on CNN seed 2. Since a rejected step is retried on its batch (_backtrack),
# λ0 = 1 reaches the CNN's targets on every seed too (benchmarks/results/defaults.md).
QUADRATIC_DAMPING = 1.0
# ρ on every one of the first steps whatever `damping_every`, and on a step between adaptations whose
# predicted reduction exceeds PREDICTED_GROWTH times that of the last accepted adaptation (module docstring)
DAMPING_WARMUP = 10
PREDICTED_GROWTH = 2.0
# a rejected step is retried on its batch at up to BACKTRACKS shorter lengths (QuadraticStep._backtrack)
BACKTRACKS = 8
# finite differences take the training forward's z for f(θ) where it was the replay's, bit for bit, which they
# check at the first step of each kind of forward and on every REPLAY_CHECK-th after (QuadraticStep._difference_rows)
REPLAY_CHECK = 16

# κ of the loss-floor cap: a step whose model predicts a reduction above κ·L(θ) is shortened to predict
# κ·L(θ) (`floor_capped`, module docstring); None: no cap
FLOOR_CAP: float | None = 1.0
# the resolution of a float loss difference, ε·(Σ_k w_k c_k + LOSS_ROUNDING·L(θ)) (loss_resolution, module docstring)
LOSS_ROUNDING = 8.0
# with loss="mse" and a closure, the squared error recovered from the gradient may exceed the closure's loss by
# this relative margin (rounding) before the loss is named as no mean squared error (QuadraticStep._check_mean)
MEAN_TOLERANCE = 1e-2
# e of the expansion: with cross-entropy, an accepted adaptation after the warm-up whose loss fell by more than
# its model predicted (ρ > 1) is tried at e times its length, kept if the loss is lower there (QuadraticStep._expand,
# module docstring); None: no expansion
EXPANSION: float | None = 2.0


def minimize_quadratic(M: torch.Tensor, b: torch.Tensor, capped: bool = False,
                       momentum: bool = True) -> tuple[torch.Tensor, float]:
    """(c, -q(c)): the minimizer c of q(c) = bᵀc + ½ cᵀMc and the predicted reduction -q(c).

    The coefficients are step sizes α_k, and with `momentum` (and more than one coefficient) a last
    one μ, kept in MOMENTUM_RANGE; `capped` keeps every α_k ≤ 1. Active set: solve for the free
    coefficients with the others fixed, c_F = -M_FF⁺(b_F + M_FX c_X), fix one that leaves its range
    at its bound (μ first), repeat. q is convex, so for one bounded coefficient this is the exact constrained
    minimizer. The pseudo-inverse takes μ = 0 where δ adds nothing (parallel to Δ, or no curvature)."""
    M, b = M.to(torch.float64), b.to(torch.float64)
    n = len(b)
    c = torch.zeros_like(b)
    mu = n - 1 if momentum and n > 1 else None
    fixed: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in fixed]
        held = sorted(fixed)
        if free and not held:
            c = -torch.linalg.pinv(M, rtol=1e-12, hermitian=True) @ b
        elif free:
            rhs = b[free] + M[free][:, held] @ c[held]
            c[free] = -torch.linalg.pinv(M[free][:, free], rtol=1e-12, hermitian=True) @ rhs
        values = c.tolist()
        out = [i for i in free if (i == mu and not MOMENTUM_RANGE[0] <= values[i] <= MOMENTUM_RANGE[1])
               or (i != mu and capped and values[i] > 1)]
        if not out:
            break
        i = mu if mu in out else out[0]  # one at a time, μ first: the others move when it is fixed
        c[i] = min(max(values[i], MOMENTUM_RANGE[0]), MOMENTUM_RANGE[1]) if i == mu else 1.0
        fixed.add(i)
    return c, float(-(b @ c + 0.5 * c @ M @ c))


def levenberg_marquardt(damping: float, rho: float, growth: float, decay: float) -> tuple[float, float]:
    """(λ, ν) after one adaptation of the Levenberg–Marquardt rule in Nielsen's form (module
    docstring): an accepted step, ρ > 0, λ ← λ·max(ω, 1 - (2ρ - 1)³) and ν ← 2; a rejected one (ρ ≤ 0
    or not finite) λ ← νλ and ν ← 2ν. ω = `decay`, ν = `growth`; λ within [LAMBDA_MIN, LAMBDA_MAX]."""
    if math.isfinite(rho) and rho > 0:
        damping, growth = damping * max(decay, 1 - (2 * rho - 1) ** 3), 2.0
    else:
        damping, growth = damping * growth, 2 * growth
    return min(max(damping, LAMBDA_MIN), LAMBDA_MAX), growth


def held_out_scale(scale: float, longer: float, shorter: float) -> float:
    """κ after one held-out test (module docstring, "The held-out step length"): `longer` and `shorter` are
    the reductions of this batch's loss when the last step is taken to twice and to half its length. κ ←
    eκ (e = HELD_OUT_FACTOR) if twice lowers the loss and at least as much as half, κ ← κ/e if half lowers
    it more, else κ; within [1, HELD_OUT_MAX]. A non-finite reduction (a non-finite loss) counts as none."""
    longer, shorter = (r if math.isfinite(r) else -math.inf for r in (longer, shorter))
    if longer > 0 and longer >= shorter:
        return min(scale * HELD_OUT_FACTOR, HELD_OUT_MAX)
    if shorter > 0:
        return max(scale / HELD_OUT_FACTOR, 1.0)
    return scale


def loss_resolution(losses: tuple[OutputLoss, ...], loss: float, eps: float) -> float:
    """r = ε·(Σ_k w_k c_k + LOSS_ROUNDING·L): below it a difference of the float loss L = Σ_k w_k L_k of one batch
    at two parameters is rounding (module docstring, "The resolution of the float loss"). ε: the machine epsilon the
    loss is computed in; c_k = 1 for cross-entropy and binary cross-entropy (the log of a sum ≥ 1, rounded at
    ε/2 per row at each end), 0 for mse; L: the loss at θ (a negative or non-finite L counts as its size)."""
    constant = sum(k.weight for k in losses if k.name != "mse")
    return eps * (constant + LOSS_ROUNDING * abs(loss))


def floor_capped(c: torch.Tensor, M: torch.Tensor, b: torch.Tensor, reduction: float) -> tuple[torch.Tensor, float]:
    """(τc, τ): the coefficients c shortened so that the model predicts the reduction `reduction` = D,
    -q(τc) = D, when it predicts more, -q(c) > D (else (c, 1)).

    Along the ray τc, -q(τc) = -τ bᵀc - ½τ² cᵀMc. c minimizes the convex q over a set that holds τc
    for τ in [0, 1] (MOMENTUM_RANGE and the cap α ≤ 1 contain 0), so -q(τc) increases on [0, 1] and
    the smaller root of ½ cᵀMc τ² + bᵀc τ + D = 0 is the τ in (0, 1) sought; written without
    cancellation, τ = 2D / (-bᵀc + √((bᵀc)² - 2D cᵀMc)). τc is the minimizer of q on the ray under the
    constraint -q ≤ D (q decreases along the ray up to τ = 1)."""
    slope, curvature = float(b @ c), float(c @ M @ c)
    if -(slope + 0.5 * curvature) <= reduction:
        return c, 1.0
    tau = 2 * reduction / (-slope + math.sqrt(max(slope * slope - 2 * reduction * curvature, 0.0)))
    return tau * c, tau


def recovered_loss(loss: str, z0: torch.Tensor, grad_z: torch.Tensor):
    """z ↦ the mean-reduced `loss` at output z whose gradient at z0 is grad_z (module docstring)."""
    if loss == "mse":
        target = z0 - grad_z * (z0.numel() / 2)
        return lambda z: ((z - target) ** 2).mean()
    if loss == "binary_cross_entropy":
        target = torch.sigmoid(z0) - grad_z * z0.numel()
        return lambda z: F.binary_cross_entropy_with_logits(z, target)
    classes = z0.shape[-1]
    # F.nll_loss's gradient at log-probabilities as the cross-entropy's (the identity on that one)
    probs = torch.softmax(z0.reshape(-1, classes), -1)
    g = log_softmax_gradient(probs, grad_z.reshape(-1, classes))
    kept = g.ne(0).any(1)
    terms = kept.sum().clamp(min=1)
    target = probs - terms * g
    return lambda z: -(target * torch.log_softmax(z.reshape(-1, classes), -1))[kept].sum() / terms


class QuadraticStep:
    """The quadratic-model step of one GnfxOptimizer (module docstring). `last_step` holds α, μ, λ
    (the damping the step used), ρ, the predicted and actual reductions, whether ρ was computed
    (`adapted`, damping_every), whether the model was built and solved (`solved`, quadratic_every),
    whether its products J v were finite differences (`finite_differences`, quadratic_products), whether
    the step was rejected, and whether its predicted reduction was above the loss's resolution r (`resolved`,
    `resolution` = r: below it a due adaptation is not judged). `parameters`: the optimizer's
    gnfx.parameter_store.ParameterStore; `losses`: the OutputLoss of each output loss= names
    (gnfx.output_losses); `layouts`: the optimizer's gnfx.outputs.LogitsLayout of each."""

    def __init__(self, parameters, losses: tuple[OutputLoss, ...], layouts: list[LogitsLayout], *, damping: float,
                 decay: float, capped: bool, rows: int | None, every: int, solve_every: int, momentum: str | float,
                 products: str):
        self.parameters = parameters
        # the classes' axis of each cross-entropy's z_k (gnfx.outputs.LogitsLayout): the model is built on z_c
        self.layouts = layouts
        self.momentum = momentum  # quadratic_momentum: "adaptive" (μ from the model) or the fixed μ̂
        # quadratic_products: J v by "forward" mode, by finite "difference", or "auto" (_by_difference)
        self.products = products
        self._variants = None  # the compiled model's captured graphs (gnfx.variants), which "auto" reads
        self._rough: tuple[tuple, list[str]] | None = None  # (their ids, discontinuities found in them)
        self.products_taken: str | None = None  # how the last solve took them: "forward" or "difference"
        self.every = every  # damping_every: ρ and the λ rule on every every-th step (module docstring)
        self.solve_every = solve_every  # quadratic_every: the model and its solve on every solve_every-th step
        self.solved_at = -1  # the optimizer's step of the last solve
        # (names of the parts, ĉ, b̂ᵀĉ) of the last trusted solve, which the steps between reuse; None: solve next
        self.coefficients: tuple[list[str], torch.Tensor, float] | None = None
        self.judged = math.inf  # the predicted reduction of the last accepted adaptation
        self.held_out_scale = 1.0  # κ: the steps are κ times the model's (_held_out_scale)
        self.misjudged = False  # the last adaptation's ρ was below RHO_LOW (or the step rejected)
        self.rows = rows  # quadratic_rows: the GGN term of the model on the first rows only
        self.losses = losses
        self.damping = damping
        self.decay = decay
        self.growth = 2.0  # ν of the λ rule: λ's factor at the next rejection
        self.capped = capped
        self._lrs: list[float] | None = None  # the param groups' lr at the last step (_warn_if_lr_moved)
        self._lr_warned = False
        # δ, the last update applied, or with a fixed μ̂ the last velocity v (under FSDP2: local rows)
        self.previous: list[torch.Tensor] | None = None
        self._flat_layout: FlatLayout | None = None
        self._module_function: ModuleFunction | None = None  # the model as a function of θ (_function)
        self.last_step: dict = {}
        self._call = None  # (model, args, kwargs) of the last training forward
        # (model, parameter names, each one's (submodule, attribute)) for _held_parameters, found once
        self._holders: tuple | None = None
        self._random_state: RandomState | None = None  # the generators' states before it (gnfx.random_state)
        self._attributes_before: list | None = None  # the modules' attributes before it (a neuron's state)
        self._holding_state: tuple | None = None  # (model, its modules that can hold a state), found once
        self._examples = 0  # its batch size, the first dimension of z
        # its z_k, one per output loss= names, in the model's own layout (_outputs: the classes-last z_c), and
        # the gradients the user's backward sent there (None: not reached)
        self._output_before: list | None = None
        self._output_versions: list | None = None
        self._statistic_forward = False  # whether the last training forward was a statistic step's
        # whether the training forward's z equals the replay's f(θ), bit for bit, by the kind of forward (a statistic
        # step's instrumented graph or the model's own): checked at its first use and every REPLAY_CHECK-th
        self._outputs_replayed: dict[bool, bool] = {}
        self._replay_uses: dict[bool, int] = {}
        # the gain ‖J v‖/‖v‖ each row of V had at its last difference quotient, by row ("part k" the proposal of
        # preconditioner k, "previous" δ): the step h of its next one (gnfx.finite_differences)
        self._gains: dict[str, float] = {}
        self._output_grad: list = [None] * len(losses)
        # the products run on ATen's recurrent kernels (gnfx.ggn.forward_mode_kernels) once oneDNN's or
        # cuDNN's failed: an nn.LSTM; not from the start, as disabling oneDNN slows convolutions on a CPU
        self._native_recurrent = False
        self._forwards = 0  # training forwards seen (observe), which numbers their output hooks
        self._warned_forwards = False  # _keep_output_grad's warning, given once
        # the training forward whose output a backward with create_graph differentiated (forces, a penalty)
        self._output_differentiated = 0
        self._warned_functional_call = False  # observe's warning, given once
        self._mean_checked = False  # _check_mean passed once: a loss's reduction does not change between steps
        # the closure called backward under no_grad once (torch's closure idiom): L(θ+s) from loss= since
        self._closure_backpropagates = False

    # --- the forward it replays (hooks of the CompiledModel) -----------------------------------
    def observe_random_state(self, module, args, kwargs) -> None:
        """Before a training forward: record the random generators' states, which every replay of it
        restores (its dropout masks; gnfx.random_state); Python's and numpy's too where the forward may
        draw with them (before the first capture, which tells, and after one that saw it draw); and the
        modules' tensor state, which every replay starts from and leaves as the training forward left it: a
        spiking neuron's membrane potential, stored on its module for its next call (spikingjelly's
        `self._memories["v"]`, snntorch's `self.mem`), was advanced again by each replay, which also started
        from the state the training forward ended in (passes/module_attributes.py attributes_as)."""
        if module.training and torch.is_grad_enabled():
            devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            variants = self._variants = module.__dict__["_variants"]
            self._random_state = RandomState(devices, not variants.captured or variants.draws_python_random)
            model = module._model
            if self._holding_state is None or self._holding_state[0] is not model:
                self._holding_state = (model, holding_state(model))
            self._attributes_before = saved_attributes(self._holding_state[1])

    def observe(self, module, args, kwargs, out) -> None:
        """Remember a training forward's inputs, and the gradient its backward sends to z."""
        if not (module.training and torch.is_grad_enabled()):
            return
        self._call = (module._model, args, kwargs)
        self._warn_if_functional_call(module._model)
        self._output_grad = [None] * len(self.losses)
        self._forwards += 1
        # a missing output: the step names it (_recovered), a forward that returns none is no error yet
        heads = named_outputs(out, self.losses, missing_ok=True)
        self._examples = len(heads[0]) if heads[0] is not None else 0
        self._output_before = [None if z is None else z.detach() for z in heads]
        # what tells whether they can stand for the replay's f(θ) (_trained_outputs): their version counters,
        # which an in-place op on them (`logits /= T`) moves, and whether the instrumented graph computed them
        self._output_versions = [None if z is None else z._version for z in heads]
        self._statistic_forward = bool(module.optimizer.statistic_step)
        for j, z in enumerate(heads):
            if z is not None and z.requires_grad:
                z.register_hook(functools.partial(self._keep_output_grad, self._forwards, j))

    def _warn_if_functional_call(self, model) -> None:
        """Warn, once, when a training forward of `model` (the module the compiled model runs, whose
        attribute paths are the parameters' names; the compiled one has attributes of its own, such as
        `layers`) ran under torch.func.functional_call (a plain tensor, not a Parameter, in a parameter's
        place: a MAML inner loop's fast weights θ - α∇θ): the step replays the forward at θ itself, so its
        model, α and ρ would be those of the module at θ on that call's inputs, not of the function of θ
        the loss was computed through."""
        first = next(iter(self.parameters.named), None)
        if self._warned_functional_call or first is None or isinstance(held_tensor(model, first), torch.nn.Parameter):
            return
        self._warned_functional_call = True
        warnings.warn("gnfx: a training forward ran under torch.func.functional_call, with tensors in place of the "
                      "parameters (a MAML inner loop's fast weights): the quadratic-model step (loss= without lr) "
                      "replays the last training forward at the parameters θ themselves, so its GGN model, α and ρ "
                      "are those of the module at θ on that call's inputs, not of the function of θ your loss went "
                      "through. For such a loop compile with an lr (step='lr'), or make the last training forward "
                      "before step() a plain call", RuntimeWarning, stacklevel=3)

    def _held_parameters(self) -> list[torch.Tensor]:
        """The trained parameters as the last training forward's model holds them now (gnfx.parameter_store
        .held_tensor): under FSDP2 its unsharded copies, which the backward accumulates into, not the shards."""
        model, names = self._call[0], list(self.parameters.named)
        if self._holders is None or self._holders[0] is not model or self._holders[1] != names:
            self._holders = (model, names, [holder(model, name) for name in names])
        return [t for t in (getattr(owner, field) for owner, field in self._holders[2]) if t.requires_grad]

    def _refuse_a_loss_of_the_output_gradient(self) -> None:
        """Raise a GnfxError when the last training forward's output was differentiated by a backward that
        kept its graph (module docstring: forces F = -∂E/∂x, a gradient penalty), whose loss the
        quadratic model of the named loss of the output would leave out."""
        if self._output_differentiated != self._forwards:
            return
        named = " + ".join(k.name for k in self.losses)
        raise GnfxError(f"the training forward's output was differentiated with torch.autograd.grad(..., "
                        f"create_graph=True) (forces F = -∂E/∂x of an energy model, a gradient penalty), so the "
                        f"loss is presumably of that gradient too; the quadratic-model step (loss={named!r} "
                        f"without lr) models the {named} loss of the output alone, and would size the step and "
                        f"judge it (ρ) on that term only. Fix: compile without loss= and with an lr (the fixed-lr "
                        f"step); optimizer='shampoo' or 'diag' take their statistics from the gradient itself")

    def _warn_if_lr_moved(self) -> None:
        """Warn, once, when a param group's lr moves (an LR scheduler) under the uncapped step: the
        proposal Δ is made at the group's lr and α rescales it (the minimizer of q along cΔ is the same
        step for every c > 0), so the lr has no effect there. With a given lr (`capped`) α ≤ 1 makes
        the proposal at the group's lr a cap, which a schedule moves."""
        if self.capped or self._lr_warned:
            return
        lrs = [float(g["lr"]) for g in self.parameters.param_groups]
        moved = [(a, b) for a, b in zip(self._lrs or lrs, lrs) if a != b]
        if moved and len(lrs) == len(self._lrs):  # (a param group added or removed is no schedule)
            warnings.warn(f"gnfx: a param group's lr moved from {moved[0][0]:g} to {moved[0][1]:g} (an LR scheduler?), "
                          "which does not change the quadratic-model step: without lr= its step size α comes from the "
                          "GGN model, which rescales a proposal made at any lr. For a schedule to act, compile "
                          "with lr= (the step is then at most the proposal at the group's lr: the schedule moves "
                          "that cap) or with step='lr' (the fixed-lr step)", RuntimeWarning, stacklevel=3)
            self._lr_warned = True
        self._lrs = lrs

    def _keep_output_grad(self, forward: int, j: int, grad):
        """The gradient the user's backward sends to the output z_j of training forward number `forward`.
        A backward that reaches the output of an earlier forward than the last (one loss over two
        forwards: a Siamese pair, R-Drop's two dropout masks, micro-batches summed before one backward)
        is modelled by the last forward's output alone (module docstring): warned once; only the last
        forward's gradient is kept, which belongs to the inputs the step replays. A backward that fills no
        parameter's gradient (torch.autograd.grad) is no loss's: noted when it keeps a graph (module docstring,
        `_refuse_a_loss_of_the_output_gradient`), else passed over."""
        if not fills_gradients(self._held_parameters()):
            if torch.is_grad_enabled():
                self._output_differentiated = forward
            return
        if forward == self._forwards:
            self._output_grad[j] = grad.detach()
            if self.losses[j].name == "cross_entropy":  # told at a statistic forward's output already, unless none ran
                self.layouts[j].settle(self._output_before[j], self._output_grad[j])
        elif not self._warned_forwards:
            self._warned_forwards = True
            warnings.warn("gnfx: one backward reached the outputs of two training forwards (a loss over both, as "
                          "for a Siamese pair or R-Drop, or micro-batch losses summed before one backward): the "
                          "quadratic-model step (loss=) models the GGN of the last forward's output and its own "
                          "loss, leaving the earlier output's curvature and any coupling between the outputs out. "
                          "That is gradient accumulation's model, fine for summed micro-batch losses; for one "
                          "loss over several outputs compile without loss= (and with an lr)",
                          RuntimeWarning, stacklevel=2)

    def unscale(self, scale: torch.Tensor) -> None:
        """The output gradients of a backward of the loss scaled by `scale`, s (a tensor of one entry:
        torch.amp.GradScaler's), divided by s, in at least float32: the unscaled gradient of a float16 output
        underflows (what the scale is for)."""
        def unscaled(g):
            precision = torch.promote_types(g.dtype, torch.float32)
            return g.to(precision) / scale.reshape(()).to(g.device, precision)
        self._output_grad = [None if g is None else unscaled(g) for g in self._output_grad]

    def _function(self, subset: bool = False, forward_mode: bool = False):
        """θ ↦ [z_k]_k, the classes-last outputs loss= names, on the remembered inputs, θ the list of the
        optimizer's parameters in its order (None: the parameters as they are), with copies of the buffers,
        so that batch-norm statistics do not move (gnfx.forward_mode.ModuleFunction, built once). With
        `subset` and `rows` (quadratic_rows, in rows of z_0) the inputs are the first ⌈rows / T⌉ examples
        (T rows of z_0 each) of every input tensor whose first dimension is the batch's. `forward_mode`: whether
        forward mode differentiates it (ModuleFunction.forward_mode)."""
        model, args, kwargs = self._call
        if self.parameters.sharded is not None:  # whole parameters, past fully_shard's hooks (gnfx.fsdp)
            model = without_fsdp_hooks(model)
        examples = self._modelled_examples()
        if subset and examples is not None:
            args, kwargs = tree_map(lambda t: t[:examples] if isinstance(t, torch.Tensor) and t.dim()
                                    and len(t) == self._examples else t, (args, kwargs))
        if self._module_function is None or self._module_function.module is not model:
            self._module_function = ModuleFunction(model, list(self.parameters.named))
        function, random_state, before = self._module_function, self._random_state, self._attributes_before

        def f(theta):
            function.forward_mode = forward_mode
            # the training forward's random numbers (gnfx.random_state) and the state it started from
            with random_state.replayed(), attributes_as(before):
                heads = named_outputs(function(theta, *args, **kwargs), self.losses)
                return [layout.classes_last(z) for layout, z in zip(self.layouts, heads)]
        return f

    def _modelled_examples(self) -> int | None:
        """How many examples of the batch the model's GGN term takes (quadratic_rows: ⌈rows / T⌉); None: all."""
        examples = None if self.rows is None else -(-self.rows // self._rows_per_example())
        return examples if examples is not None and examples < self._examples else None

    def _trained_outputs(self) -> torch.Tensor | None:
        """The training forward's z_c of every output, concatenated as `_output` concatenates f(θ), where they
        may stand for it: every example is modelled (no quadratic_rows subset) and no in-place op has changed
        them since the forward (their version counters); None otherwise. Whether they do is `_difference_rows`'s
        check."""
        if self._modelled_examples() is not None or any(z is None for z in self._output_before):
            return None
        if [z._version for z in self._output_before] != self._output_versions:
            return None
        return torch.cat([z.reshape(-1) for z in self._outputs()[0]])

    def _rows_per_example(self) -> int:
        """Rows of z_c per example: T of an (N, T, C) output (H·W of an (N, C, H, W) one), 1 of an (N, C) one."""
        z = self._outputs()[0][0]
        return z[0].numel() // z.shape[-1] if z is not None and z.dim() > 1 else 1

    def _outputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The last training forward's z_c of each output loss= names and the gradients its backward sent
        there (None where it reached none), classes last."""
        return tuple([None if t is None else layout.classes_last(t) for layout, t in zip(self.layouts, tensors)]
                     for tensors in (self._output_before, self._output_grad))

    def _output(self, theta: list[torch.Tensor], tangent_rows: list, keys: list[str]) -> tuple[list, list]:
        """([z_j]_j, [[J_j v_k]_k stacked]_j) at parameters `theta` for the tangents v_k (`tangent_rows`, one
        list of per-parameter tensors each, `keys` the rows they are) and each output z_j loss= names, by one pass
        per tangent through
        all of them, concatenated: forward mode (`_forward_mode_rows`), or finite differences where
        `_by_difference` says so (`_difference_rows`, gnfx.finite_differences; benchmarks/results/quadratic_step.md)."""
        self.products_taken = "difference" if self._by_difference(theta) else "forward"
        f = self._function(subset=True, forward_mode=self.products_taken == "forward")
        shapes = []

        def concatenated(theta):
            heads = f(theta)
            shapes[:] = [z.shape for z in heads]
            return torch.cat([z.reshape(-1) for z in heads])
        if self.products_taken == "difference":
            z, J = self._difference_rows(concatenated, theta, tangent_rows, shapes, keys)
        else:
            z, J = self._forward_mode_rows(concatenated, theta, tangent_rows)
        sizes = [shape.numel() for shape in shapes]
        return ([t.view(shape) for t, shape in zip(z.split(sizes), shapes)],
                [t.view(len(J), *shape) for t, shape in zip(J.split(sizes, 1), shapes)])

    def _by_difference(self, theta: list[torch.Tensor]) -> bool:
        """Whether the products are taken by finite differences: quadratic_products="difference", or "auto" where
        θ and the outputs z are floats of 32 bits or more, no autocast is on, and every captured graph of the
        forward is smooth in θ (`discontinuities`; a forward no graph holds is not known to be)."""
        if self.products != "auto":
            return self.products == "difference"
        if any(t.dtype.itemsize < 4 for t in theta) or any(z is not None and z.dtype.itemsize < 4
                                                           for z in self._output_before):
            return False
        if theta and torch.is_autocast_enabled(theta[0].device.type):
            return False
        return not self.discontinuities()

    def discontinuities(self) -> list[str]:
        """Where the forward the step replays may not be smooth in θ, as passes/discontinuities.py finds them in
        every graph captured so far ("auto" takes forward-mode products then)."""
        variants = self._variants
        if variants is None or not variants.captured or variants.form == "eager":
            return ["the forward runs as its own Python code (no captured graph holds it)"]
        key = variants.graph_ids()  # every step: the graphs are walked only when a capture changed them
        if self._rough is None or self._rough[0] != key:
            trainable = set(self.parameters.named)
            functions = [f"{name}: a torch.autograd.Function, whose backward is its own" for name in
                         sorted(variants.functions)]  # the operations of its forward are in the exported graph
            self._rough = (key, functions + [found for gm in variants.graphs()
                                             for found in discontinuities(gm, trainable)])
        return self._rough[1]

    def _difference_rows(self, f, theta: list[torch.Tensor], tangent_rows: list, shapes: list, keys: list[str]):
        """gnfx.finite_differences.difference_rows(f, θ, tangent_rows), each row's h from the gain its key's row had
        at the last step (`_gains`), its f(θ) the training forward's z where that
        is the replay's, bit for bit: checked at the first step of each kind of training forward (a statistic
        step's graph, the model's own forward) and every REPLAY_CHECK-th one of that kind after, by computing
        f(θ) too; a forward whose z differed once is replayed for f(θ) from then on. (One forward of 1 + P per
        step fewer: the char GPT's z was the replay's, bit for bit, on every step.)"""
        kind = self._statistic_forward
        uses = self._replay_uses[kind] = self._replay_uses.get(kind, -1) + 1
        trained = self._trained_outputs() if self._outputs_replayed.get(kind, True) else None
        gains = [self._gains.get(key) for key in keys]
        if trained is not None and kind in self._outputs_replayed and uses % REPLAY_CHECK:
            shapes[:] = [z.shape for z in self._outputs()[0]]
            z, J, measured = difference_rows(f, theta, tangent_rows, trained, gains)
        else:
            z, J, measured = difference_rows(f, theta, tangent_rows, gains=gains)
            if trained is not None:  # the first use of this kind, or a REPLAY_CHECK-th
                self._outputs_replayed[kind] = torch.equal(z, trained)
        self._gains.update((key, gain) for key, gain in zip(keys, measured) if gain is not None)
        return z, J

    def _forward_mode_rows(self, f, theta: list[torch.Tensor], tangent_rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        """gnfx.forward_mode.jvp_rows(f, theta, tangent_rows), run again with PyTorch's decompositions or ATen's
        own recurrent kernels where an operation has no forward-mode formula, else a GnfxError naming it."""
        try:
            with forward_mode_kernels(self._native_recurrent):
                return jvp_rows(f, theta, tangent_rows)
        except (NotImplementedError, RuntimeError) as error:  # an op without a forward-mode derivative
            if isinstance(error, NotImplementedError) and load_decompositions():
                return self._forward_mode_rows(f, theta, tangent_rows)  # with PyTorch's decomposition
            if isinstance(error, NotImplementedError) and not self._native_recurrent:
                self._native_recurrent = True  # oneDNN's or cuDNN's recurrent kernel: from now on ATen's own
                return self._forward_mode_rows(f, theta, tangent_rows)
            raise forward_mode_error(error, "the quadratic-model step (loss= without lr)",
                                     "pass lr= for a fixed-learning-rate step (step='lr'), or "
                                     "quadratic_products='difference' (finite differences: for a forward smooth in "
                                     "the parameters), or leave that operation out of the model") from error

    # --- the step ------------------------------------------------------------------------------
    def step(self, chain, refresh, t: int, comm, preconditioners, loss_before=None, closure=None) -> None:
        """Run the update `chain` as a proposal, then apply αΔ + μδ and adapt λ. `refresh`: the
        refresh of every curvature preconditioner (run after a rejected step); `t`: the optimizer's
        steps so far; `comm`: its gnfx.distributed.Communicator (None on one process);
        `preconditioners`: all of its preconditioners."""
        try:
            self._step(chain, refresh, t, comm, preconditioners, loss_before, closure)
        finally:  # a large model's flat vectors are the step's own (FlatLayout)
            if self._flat_layout is not None:
                self._flat_layout.release()

    def _step(self, chain, refresh, t: int, comm, preconditioners, loss_before, closure) -> None:
        if self._call is None:
            raise GnfxError("the quadratic-model step needs the inputs of the training forward: call the "
                            "compiled model (in training mode, with gradients enabled) before step()")
        self._refuse_a_loss_of_the_output_gradient()
        self._warn_if_lr_moved()
        named = self.parameters.named
        names = list(named)
        params = [local(named[n]) for n in names]  # under FSDP2 the local shards
        sharded = self.parameters.sharded
        # on one process θ, Δ and g go into the layout's buffers (FlatLayout), under FSDP2 their local rows apart
        layout = self._layout(names, params, preconditioners) if sharded is None else None
        before = layout.copy("theta", params) if layout else [p.detach().clone() for p in params]
        chain()
        if layout:
            proposal = layout.copy("proposal", params)
            torch._foreach_sub_(proposal, before)
        else:
            proposal = torch._foreach_sub([p.detach() for p in params], before)
        torch._foreach_copy_(params, before)
        grads = [local(named[n].grad) if named[n].grad is not None else torch.zeros_like(p)
                 for n, p in zip(names, params)]
        theta_values, previous = before, self.previous
        if sharded is not None:  # the model of the whole parameters, the same on every rank (gnfx.fsdp)
            whole = sharded.whole([*proposal, *grads, *before, *(previous or [])])
            p = len(names)
            proposal, grads, theta_values = whole[:p], whole[p:2 * p], whole[2 * p:3 * p]
            previous = whole[3 * p:] or None
            layout = self._layout(names, theta_values, preconditioners)
        parts = self._parts(layout, proposal)
        if not parts:  # no proposal (no gradient anywhere): no step, and no previous update to continue
            self.previous = None
            self.last_step = {"alpha": 0.0, "alphas": {}, "mu": 0.0, "damping": self.damping, "rho": float("nan"),
                              "predicted": 0.0, "actual": 0.0, "rejected": False, "adapted": False, "solved": False}
            return
        flat_grads = layout.flat(grads, "grads")
        if self.momentum == "adaptive":  # the rows Δ_k and δ
            rows = layout.rows(parts, layout.flat(proposal), None if previous is None else layout.flat(previous))
        else:  # the rows v_k of the velocity v = Δ + μ̂ v_prev
            rows = layout.rows(parts, self._velocity(layout, parts, layout.flat(proposal), previous, flat_grads), None)
        V = torch.stack(rows)
        if self._reuses(parts, previous is not None, t, len(V)) and self._reuse(params, layout, parts, V, flat_grads, comm):
            return
        if previous is not None and self.momentum == "adaptive" and (self.misjudged or self.held_out_scale != 1.0):
            self._held_out_scale(params, before, loss_before, closure, layout, theta_values, layout.flat(previous),
                                 comm)
        keys = [f"part {layout.preconditioners.index(pre)}" for pre in parts] + ["previous"] * (len(rows) > len(parts))
        z, outputs = self._output(theta_values, layout.tangents(rows), keys)
        z, outputs = [t.detach() for t in z], [t.detach() for t in outputs]  # the first rows with quadratic_rows
        M, b = self._model_terms(V, flat_grads, z, outputs)
        device, k = params[0].device, len(b)
        # with the loss-floor cap, L(θ) travels with M and b (the same all-reduce and transfer)
        self._check_mean(z, loss_before)
        # L(θ) travels with M and b (the same all-reduce and transfer): the loss-floor cap's and the resolution's
        Mb = torch.cat([M.reshape(-1), b, self._batch_loss(z, loss_before).to(M.device)])
        if comm is not None:  # the model of the global batch (equal local batches): every rank takes one step
            Mb = comm.mean(Mb, device)  # one all-reduce
        # one transfer: the small solve runs on the host, not a synchronization per comparison of it
        Mb = Mb.cpu()
        M, b = Mb[:k * k].view(k, k), Mb[k * k:k * k + k]
        adaptive = self.momentum == "adaptive"
        c, predicted = minimize_quadratic(M, b, self.capped, momentum=adaptive and previous is not None)
        floor_scale = 1.0
        if FLOOR_CAP is not None and predicted > 0:  # the loss-floor cap (module docstring)
            c, floor_scale = floor_capped(c, M, b, FLOOR_CAP * float(Mb[-1]))
            predicted = float(-(b @ c + 0.5 * c @ M @ c))
        if self.held_out_scale != 1.0:  # the held-out step length (module docstring)
            c = c * self.held_out_scale
            predicted = float(-(b @ c + 0.5 * c @ M @ c))
        coefficients = c.tolist()
        alphas = {pre.name: a for pre, a in zip(parts, coefficients)}
        mu = (coefficients[-1] if adaptive else self.momentum) if previous is not None else 0.0
        flat_update = layout.combine(c, V)  # s = Σ_k α_k Δ_k + μδ
        update = self._place(layout, flat_update, 1.0)
        torch._foreach_add_(params, update)
        due = predicted > 0 and (self.adapts(previous is not None, t) or predicted > PREDICTED_GROWTH * self.judged)
        # a reduction the float loss cannot resolve judges nothing (module docstring, "The resolution of the float loss")
        resolution = loss_resolution(self.losses, float(Mb[-1]), self._precision(z, loss_before))
        unresolved = due and predicted < resolution
        adapted = due and not unresolved
        self.solved_at = t
        # a step κ took so far past the model's minimizer that the model predicts no reduction: taken only if the
        # loss of its own batch fell (module docstring, "The held-out step length"); κc = 0 is the minimizer
        overshot = self.held_out_scale != 1.0 and not predicted > 0 and bool(c.any())
        actual = self._reduction(z, loss_before, closure, layout, theta_values, flat_update, 1.0, comm) \
            if due or overshot else float("nan")
        rho = actual / predicted if adapted else float("nan")
        # also for a non-finite loss or ratio
        rejected = adapted and not (rho > 0) or overshot and not (actual > 0) or \
            unresolved and not (actual >= -resolution)
        if overshot and rejected:
            self.held_out_scale = max(self.held_out_scale / HELD_OUT_FACTOR, 1.0)
        used = self.damping
        if adapted or unresolved and rejected:  # a rise the loss resolves is a rejection whatever the prediction
            self.damping, self.growth = levenberg_marquardt(self.damping, actual / predicted, self.growth,
                                                            self.decay)
            self.misjudged = not rho >= RHO_LOW
        backtracks, expansion = 0, 1.0
        if adapted and rho > 1 and t >= DAMPING_WARMUP and EXPANSION is not None and all(
                k.name == "cross_entropy" for k in self.losses):
            # module docstring, "The expansion"
            expansion = self._expand(params, before, z, loss_before, closure, layout, theta_values, flat_update,
                                     actual, comm)
            alphas = {k: a * expansion for k, a in alphas.items()}
            mu *= expansion if adaptive else 1.0  # a fixed μ̂ is the velocity's, which e does not scale
        if rejected:  # retried shorter on the same batch; λ moved either way, and the preconditioners with it
            torch._foreach_copy_(params, before)
            slope, curvature = float(b @ c), float(c @ M @ c)  # gᵀs and sᵀ(G + λI)s
            found = self._backtrack(params, before, z, loss_before, closure, layout, theta_values, flat_update,
                                    slope, curvature, actual, comm)  # the parameters at θ + t·s, or back at θ
            if found is not None:
                scale, actual, predicted, backtracks = found
                rho, rejected = actual / predicted, False
                # the λ whose model has t·s as its minimizer along s (with the former LM rule's λ/ω instead,
                # ekfac diverged on digits CNN seed 0: benchmarks/results/defaults.md)
                norm2 = float(double_products(flat_update[None], flat_update)[1])
                self.damping = min(max(self.damping, used + (-slope / scale - curvature) / norm2), LAMBDA_MAX)
                update = self._place(layout, flat_update, scale)
                alphas = {k: a * scale for k, a in alphas.items()}
                mu *= scale
            self.damp_preconditioners(preconditioners)
            refresh()
        if rejected:
            self.previous = None
        else:
            self.previous = self._carried(layout, update, V)
            self.judged = predicted if adapted else self.judged
        # the steps between reuse a solve the model did not misjudge (module docstring); else the next step solves
        trusted = not (rejected or backtracks or (adapted and rho < RHO_LOW))
        self.coefficients = ([pre.name for pre in parts], c, float(b @ c)) if trusted else None
        self.last_step = {"alpha": next(iter(alphas.values())), "alphas": alphas, "mu": mu, "damping": used,
                          "rho": rho, "predicted": predicted, "actual": actual, "rejected": rejected,
                          "adapted": adapted, "backtracks": backtracks, "solved": True, "floor_scale": floor_scale,
                          "expansion": expansion, "held_out_scale": self.held_out_scale,
                          "resolved": not unresolved, "resolution": resolution,
                          "finite_differences": self.products_taken == "difference"}

    def _reuses(self, parts: list, continues: bool, t: int, rows: int) -> bool:
        """Whether step `t` is one between solves (module docstring, quadratic_every): not a scheduled
        or forced solve, and the last clean solve had these parts and as many directions (`rows`: Δ_k
        and δ, or the velocities v_k of a fixed μ̂). `continues`: there is a previous update δ (or v_prev)."""
        if self.coefficients is None or not continues or t < DAMPING_WARMUP or t % self.solve_every == 0:
            return False
        names, c = self.coefficients[:2]
        return names == [pre.name for pre in parts] and len(c) == rows

    def _reuse(self, params, layout: FlatLayout, parts: list, V: torch.Tensor, grads: torch.Tensor, comm) -> bool:
        """The step s = Σ_k α̂_k Δ_k + μ̂δ with the last solve's coefficients ĉ = (α̂, μ̂) (with a fixed
        μ̂: s = Σ_k α̂_k v_k), applied, if it passes the guard: 0 < -gᵀs ≤ PREDICTED_GROWTH·(-b̂ᵀĉ), b̂ᵀĉ
        the solve's (module docstring). False (nothing applied) if it does not; then the step solves."""
        _, c, solved_slope = self.coefficients
        b = double_products(V, grads)[1]  # gᵀΔ_k, gᵀδ
        if comm is not None:  # every rank decides alike
            b = comm.mean(b, V.device)
        slope = float(b.cpu() @ c)
        if not 0 < -slope <= PREDICTED_GROWTH * -solved_slope:
            return False
        flat_update = layout.combine(c, V)
        update = self._place(layout, flat_update, 1.0)
        torch._foreach_add_(params, update)
        self.previous = self._carried(layout, update, V)
        coefficients = c.tolist()
        alphas = {pre.name: a for pre, a in zip(parts, coefficients)}
        nan = float("nan")
        mu = coefficients[-1] if self.momentum == "adaptive" else self.momentum
        self.last_step = {"alpha": coefficients[0], "alphas": alphas, "mu": mu, "damping": self.damping,
                          "rho": nan, "predicted": nan, "actual": nan, "rejected": False, "adapted": False,
                          "backtracks": 0, "solved": False, "expansion": 1.0}
        return True

    def _carried(self, layout: FlatLayout, update: list, V: torch.Tensor) -> list:
        """What the next step continues: the update δ applied (adaptive μ), or with a fixed μ̂ the
        velocity v = Σ_k v_k, the rows of V (on the proposal's scale: unchanged by a retry's t)."""
        return update if self.momentum == "adaptive" else self._place(layout, V.sum(0), 1.0)

    def _velocity(self, layout: FlatLayout, parts: list, proposal: torch.Tensor, previous: list | None,
                  grads: torch.Tensor) -> torch.Tensor:
        """The flat velocity v = Δ + μ̂ v_prev on the parameters of `parts` (zero elsewhere), restarted
        to v_k = Δ_k on each part k whose carried velocity goes uphill, gᵀv_prev,k > 0 (module
        docstring; one host synchronization when there is a carried velocity)."""
        owned = layout.vectors(parts, proposal, None).sum(0)  # Δ on the parts' parameters
        if previous is None:
            return owned
        carried = layout.vectors(parts, layout.flat(previous), None)  # v_prev,k
        restarted = [layout.preconditioners.index(pre) for pre, up in zip(parts, (carried @ grads > 0).tolist()) if up]
        keep = ~torch.isin(layout.owner, torch.tensor(restarted, dtype=layout.owner.dtype, device=proposal.device))
        return owned + self.momentum * torch.where(keep, carried.sum(0), 0)

    def _place(self, layout: FlatLayout, flat_update: torch.Tensor, scale: float) -> list:
        """The per-parameter update t·s (under FSDP2 the rows of this rank), t = `scale`."""
        update = layout.split(flat_update * scale if scale != 1.0 else flat_update)
        sharded = self.parameters.sharded
        return update if sharded is None else [u[sharded.local_rows(n)] for n, u in zip(layout.names, update)]

    def _reduction(self, z, loss_before, closure, layout, theta_values, flat_update, scale, comm) -> float:
        """The actual reduction L(θ) - L(θ + t·s) with the parameters at θ + t·s (t = `scale`),
        averaged over the ranks of `comm` (None: one process)."""
        after = None
        if self.parameters.sharded is not None:  # θ + t·s whole, as the shards compute it
            after = [w + u for w, u in zip(theta_values, layout.split(flat_update * scale))]
        actual = self._actual_reduction(z, loss_before, closure, after)
        if comm is not None:
            device = flat_update.device
            actual = float(comm.mean(torch.tensor([actual], dtype=torch.float64), device))
        return actual

    def _backtrack(self, params, before, z, loss_before, closure, layout, theta_values, flat_update,
                   slope: float, curvature: float, actual: float, comm):
        """A rejected step s retried on the same batch at θ + t·s for shorter t (the parameters are
        at θ on entry): (t, actual, predicted reduction, tries) of the first t whose predicted and actual
        reductions are both positive (ρ > 0, where a step the held-out κ took past the model's minimizer predicts
        none at t near 1), or None (the parameters back at θ) after BACKTRACKS tries.

        As a trust-region method stays at the point of a rejected step and retries with a smaller
        radius (Nocedal & Wright, Algorithm 4.1; why, in the module docstring). t is the minimizer of the
        quadratic through φ(0) = L(θ), φ'(0) = gᵀs and the last φ(t) = L(θ + t·s), kept within
        [t/10, t/2] (safeguarded interpolation, Nocedal & Wright §3.5); a non-finite loss gives t/10.
        The predicted reduction at t is that of the step's model along s,
        -(t gᵀs + ½ t² sᵀ(G + λI)s)."""
        t, rise = 1.0, -actual  # φ(t) - φ(0)
        for tries in range(1, BACKTRACKS + 1):
            fitted = -slope * t * t / (2 * (rise - slope * t)) if math.isfinite(rise) else 0.0
            t = min(max(fitted, 0.1 * t), 0.5 * t)
            torch._foreach_add_(params, self._place(layout, flat_update, t))
            actual = self._reduction(z, loss_before, closure, layout, theta_values, flat_update, t, comm)
            predicted = -(t * slope + 0.5 * t * t * curvature)
            if predicted > 0 and actual > 0:
                return t, actual, predicted, tries
            torch._foreach_copy_(params, before)
            rise = -actual
        return None

    def _held_out_scale(self, params, before, loss_before, closure, layout, theta_values, flat_previous, comm) -> None:
        """κ after one test of the last update δ's length on this step's batch, which δ was not fitted on (the
        parameters are at θ on entry and exit, `before` holds θ): `held_out_scale` of the actual reductions
        L(θ) - L(θ + δ) and L(θ) - L(θ - δ/2), the last step taken to twice and to half its length (module
        docstring, "The held-out step length"). Two forwards, with a closure two calls."""
        z = self._outputs()[0]  # the training forward's output at θ, whose recovered loss is L(θ)
        trials = []
        for scale in (1.0, -0.5):
            torch._foreach_add_(params, self._place(layout, flat_previous, scale))
            trials.append(self._reduction(z, loss_before, closure, layout, theta_values, flat_previous, scale, comm))
            torch._foreach_copy_(params, before)
        self.held_out_scale = held_out_scale(self.held_out_scale, *trials)

    def _expand(self, params, before, z, loss_before, closure, layout, theta_values, flat_update, actual: float,
                comm) -> float:
        """The factor e of an accepted step s whose loss fell by more than its model predicted (ρ > 1; the
        parameters are at θ + s on entry, `before` holds θ): the parameters at θ + e·s, e = EXPANSION, if
        the batch loss is lower there than at θ + s (one forward), else back at θ + s and e = 1 (module
        docstring: the exponential tail of cross-entropy). `actual`: L(θ) - L(θ + s)."""
        further = self._place(layout, flat_update, EXPANSION - 1.0)
        torch._foreach_add_(params, further)
        if self._reduction(z, loss_before, closure, layout, theta_values, flat_update, EXPANSION, comm) > actual:
            return EXPANSION
        torch._foreach_copy_(params, before)  # θ + s as it was computed, not θ + e·s - (e - 1)·s
        torch._foreach_add_(params, self._place(layout, flat_update, 1.0))
        return 1.0

    def adapts(self, continues: bool, t: int) -> bool:
        """Whether the optimizer's current step `t`, a solved one, computes ρ and adapts λ (module
        docstring): an adaptation of damping_every falls due at t mod T = 0, and on a step between
        solves it waits for the next solve; `continues`: it has a previous update δ. The last solve
        before this one was at `solved_at` (t - 1 with quadratic_every 1)."""
        return not continues or t < DAMPING_WARMUP or t // self.every > self.solved_at // self.every

    def damp_preconditioners(self, preconditioners) -> None:
        """Give λ to every preconditioner's Tikhonov damping (K-FAC's factored damping moves with it):
        called by the optimizer before the step's refreshes, so that they use the λ of this step,
        and after a rejected step, before its refresh."""
        for pre in preconditioners:
            if pre.tikhonov_damping:
                pre.hp[pre.tikhonov_damping] = self.damping

    def _layout(self, names: list[str], params: list[torch.Tensor], preconditioners) -> FlatLayout:
        """The flat layout of the optimizer's parameters and `preconditioners` (built at the first
        step, and again if the parameters change)."""
        if self._flat_layout is None or self._flat_layout.names != names:
            self._flat_layout = FlatLayout(names, params, preconditioners)
        return self._flat_layout

    def _parts(self, layout: FlatLayout, proposal: list[torch.Tensor]) -> list:
        """The preconditioners whose proposal is not zero (one host synchronization): each gets its
        own step size α, so that one whose proposal is on another scale (the diagonal fallback's
        Adam step at lr 1 beside K-FAC's) does not set the step of the others."""
        norms = torch.stack(torch._foreach_norm(proposal)).tolist()
        moved = {k for k, norm in zip(layout.parameter_owner, norms) if k >= 0 and norm != 0}
        return [layout.preconditioners[k] for k in sorted(moved)]

    def _model_terms(self, V: torch.Tensor, grads: torch.Tensor, z: list,
                     J: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, b) of the module docstring in float64 for the vectors v_k, the rows of V, with
        J_j v_k the rows of J[j] for each output z_j loss= names: M = Σ_j w_j [J_j v_i]ᵀ H_j [J_j v_k] + λ V Vᵀ
        (a loss over several outputs: gnfx.output_losses), b = V g (z and J on the first rows of the batch
        with quadratic_rows: H_j that of their mean loss)."""
        curvature = 0
        for j, (loss, z_j, J_j) in enumerate(zip(self.losses, z, J)):
            # H_ℓ of mse (2/numel(z)·I) and of binary cross-entropy (diag(p(1-p))/numel(z)) needs no targets
            kept = self._kept_rows(j, z_j) if loss.name == "cross_entropy" else None
            H_J = output_hessian_product(loss.name, z_j, kept, J_j).flatten(1).double()
            curvature = curvature + loss.weight * (H_J @ J_j.flatten(1).double().T)
        gram, b = double_products(V, grads)
        M = 0.5 * (curvature + curvature.T) + self.damping * gram
        return M, b

    def _kept_rows(self, j: int, z: torch.Tensor) -> torch.Tensor:
        """The rows of z = z_j (the batch's first rows with quadratic_rows) cross-entropy counts as targets
        for output_hessian_product: the rows its gradient reaches (an ignored target's row gets
        exactly zero), all rows when unknown."""
        classes, grad = z.shape[-1], self._outputs()[1][j]
        if grad is None:
            kept = torch.ones(z.reshape(-1, classes).shape[0], dtype=torch.bool, device=z.device)
        else:
            kept = grad[:len(z)].reshape(-1, classes).ne(0).any(1)
        return torch.where(kept, 0, IGNORE_INDEX).reshape(z.shape[:-1])

    def _actual_reduction(self, z, loss_before, closure, after=None) -> float:
        """L(θ) - L(θ+s) on the step's batch (module docstring), z the output at θ of the products'
        forward (on the first rows only with quadratic_rows: then the training forward's output);
        `after`: θ + s in the optimizer's order, if not the parameters as they are (under FSDP2). A closure
        written as torch's documentation writes it (and skorch's train_step), which always calls backward,
        cannot run under no_grad: from its first such failure on, L(θ+s) is loss='s, recovered from the output
        gradient, as for a step without a closure."""
        if closure is not None and loss_before is not None and not self._closure_backpropagates:
            # the closure's first call ran the training forward whose generators' states were recorded:
            # its second call draws the same dropout masks, so ρ compares one sub-network (gnfx.random_state)
            replay = self._random_state.replayed() if self._random_state is not None else contextlib.nullcontext()
            try:
                with replay:
                    loss_after = closure()
                return float(loss_before) - float(loss_after)
            except RuntimeError as error:
                if "does not require grad" not in str(error):  # not the backward under no_grad
                    raise GnfxError(f"the quadratic-model step calls the closure again after the step, under "
                                    f"torch.no_grad(), for the loss at the new parameters; it raised "
                                    f"{error}") from error
                self._closure_backpropagates = True
        loss, z0 = self._recovered(z)
        f = self._function()
        # f(None): at the parameters as they are now, θ + s; both losses read in one transfer, subtracted in float64
        at_theta, at_step = torch.stack([loss(z0), loss(f(after))]).tolist()
        return at_theta - at_step

    def _recovered(self, z: list):
        """(the recovered loss of the outputs [z_j]_j, Σ_j w_j L_j(z_j) with each L_j recovered from the
        gradient at z_j divided by w_j; the training forward's outputs [z0_j]_j at θ) of the step's batch."""
        before, grads = self._outputs()
        if grads[0] is None:
            raise GnfxError("the quadratic-model step found no gradient at the model output: the loss must be "
                            "computed from the compiled model's output (the first tensor it returns), or pass "
                            "model.step(closure) with a closure that returns the batch loss")
        missing = [k for k, grad in zip(self.losses, grads) if grad is None]
        if missing:
            raise GnfxError(f"loss= names the {missing[0].name} loss of output {missing[0].position} (weight "
                            f"{missing[0].weight:g}), and the step's backward did not reach that output: the "
                            f"quadratic-model step would model a loss term you did not take. Fix: drop its entry "
                            f"from loss= (None), or add its loss")
        z0 = [z_j if len(z_j) == len(grad) else b.to(z_j.dtype) for z_j, grad, b in zip(z, grads, before)]
        terms = [(k.weight, recovered_loss(k.name, z0_j, grad / k.weight))
                 for k, z0_j, grad in zip(self.losses, z0, grads)]
        return (lambda outputs: sum(w * loss(z_j) for (w, loss), z_j in zip(terms, outputs))), z0

    def _check_mean(self, z, loss_before) -> None:
        """With loss="mse" and a closure: raise a GnfxError if the squared error recovered from the output
        gradient exceeds the closure's loss at θ (module docstring, "L(θ+s)"); on the first step with a closure
        only (its host read is one synchronization)."""
        if self._mean_checked or all(k.name != "mse" for k in self.losses) or loss_before is None or \
                self._output_grad[0] is None:
            return
        loss, z0 = self._recovered(z)
        recovered, given = torch.stack([loss(z0).detach().double(),
                                        torch.as_tensor(loss_before).detach().double().to(z0[0].device)]).tolist()
        squared = next(z_j for k, z_j in zip(self.losses, z0) if k.name == "mse")
        if recovered > (1 + MEAN_TOLERANCE) * given + torch.finfo(squared.dtype).tiny:
            raise GnfxError(
                f"loss='mse' is the mean squared error of the model output z, and the loss your closure returns is "
                f"not: the squared error its gradient at z implies is {recovered / max(given, 1e-300):.4g} times the "
                f"closure's loss ({recovered:.4g} against {given:.4g}): reduction='sum' (a factor of numel(z) = "
                f"{squared.numel()}) or a mean multiplied by a factor, which the quadratic-model step would take "
                f"that many times too long, or a mean weighted per example (a diffusion loss's weighting λ(σ): "
                f"k-diffusion's 1/c_out² on its Denoiser's output D = c_skip x + c_out F, min-SNR), whose curvature "
                f"the unweighted squared error misjudges. Fix: take the mean (F.mse_loss's default reduction='mean'); "
                f"for a weighted denoising loss, compile the network F inside the preconditioner and train its "
                f"unweighted mean squared error to the scaled target (k-diffusion: K.Denoiser(gnfx.compile(inner), "
                f"sigma_data).loss(...) with weighting='karras'); or compile without loss= (and with an lr)")
        self._mean_checked = True

    @staticmethod
    def _precision(z: list, loss_before) -> float:
        """ε of the loss difference: the machine epsilon of the coarsest of the outputs z_k and the closure's loss."""
        dtypes = [t.dtype for t in z] + ([loss_before.dtype] if isinstance(loss_before, torch.Tensor) else [])
        return max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)

    def _batch_loss(self, z, loss_before) -> torch.Tensor:
        """L(θ) on the step's batch, (1,) in float64 where it was computed: the closure's loss, or the
        loss recovered from the output gradient."""
        if loss_before is not None:
            return torch.as_tensor(loss_before).detach().double().reshape(1)
        loss, z0 = self._recovered(z)
        return loss(z0).detach().double().reshape(1)

    def follow_parameters(self) -> None:
        """The parameters moved (.to(), .double()): δ follows them, the flat buffers are made again."""
        self.previous = None if self.previous is None else self._placed(self.previous)
        self._flat_layout = self._module_function = None

    def _placed(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """`tensors`, one per parameter in the optimizer's order, on each parameter's device and dtype."""
        return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, self.parameters.named.values())]

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # δ may be views of a buffer the next step writes (FlatLayout): a copy
        previous = None if self.previous is None else [t.clone() for t in self.previous]
        return {"damping": self.damping, "previous": previous, "growth": self.growth,
                "judged": self.judged, "solved_at": self.solved_at, "coefficients": self.coefficients,
                "held_out_scale": self.held_out_scale, "misjudged": self.misjudged, "gains": dict(self._gains)}

    def load_state_dict(self, state: dict, steps: int) -> None:
        """The state of `state_dict`, into an optimizer that has taken `steps` steps."""
        self.damping = float(state["damping"])
        self.growth = float(state.get("growth", 2.0))  # a checkpoint from before ν
        self.judged = float(state.get("judged", math.inf))
        # a checkpoint from before the held-out step length: the model's steps, as it took them
        self.held_out_scale = float(state.get("held_out_scale", 1.0))
        self.misjudged = bool(state.get("misjudged", False))
        self._gains = dict(state.get("gains", {}))  # a checkpoint from before: h of unknown gain first
        # a checkpoint from before quadratic_every solved on every step: the next step solves
        self.solved_at = int(state.get("solved_at", steps - 1))
        self.coefficients = state.get("coefficients")
        previous = state["previous"]
        self.previous = None if previous is None else self._placed(previous)
