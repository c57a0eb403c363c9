"""The diagonal preconditioner: AdamW whose second moment can be the diagonal of the Fisher.

For each parameter, with gradient g, first moment m, second moment v, step t, learning rate η,
weight decay λ (decoupled):

    m ← β₁ m + (1-β₁) g
    v ← β₂ v + (1-β₂) s          s = g ⊙ g                         (source="grad2")
                                 s = diag F = 1/N Σ_n g_n ⊙ g_n    (source="fisher", on blocks)
    θ ← θ (1 - η λ) - η / (1-β₁ᵗ) · m / (√v / √(1-β₂ᵗ) + ε)

With source="grad2" this is exactly torch.optim.AdamW. With source="fisher", `s` for a block's
weight and bias is the per-example diagonal of the empirical Fisher from the taps (the most recent
statistic, see gnfx.statistics); parameters no block covers use g ⊙ g.

Low-precision parameters (float16, bfloat16) keep m and v in float32, and the step runs on a float32
copy of θ rounded back once: in their own dtype (1-β₂) g ⊙ g underflows to 0 in float16, ε = 1e-8 is
0 there (the first step divides 0 by 0, as torch.optim.AdamW's does), and in bfloat16 β₂ v rounds back
to v (its 8-bit significand cannot hold a change of 1e-3), so v never follows the gradients. float32
and float64 parameters keep their own dtype: bit for bit AdamW's step.
"""
from __future__ import annotations

import torch

from gnfx import cost
from gnfx.errors import GnfxError
from gnfx.hparams import betas, choice, positive
from gnfx.layouts import layout_of
from gnfx.preconditioners.base import Candidate, Preconditioner
from gnfx.targets import from_matrix


class Diagonal(Preconditioner):
    name = "diag"
    HPARAMS = {
        "betas": betas("Adam's decay rates of the first and second moments", (0.9, 0.999)),
        "eps": positive("added to the root of the second moment", 1e-8),
        "source": choice("second moment: squared mini-batch gradient or per-example Fisher diagonal",
                         "grad2", ("grad2", "fisher")),
    }
    per_group_hparams = ("betas", "eps")
    in_auto = True
    STATE = ("exp_avg", "exp_avg_sq")  # AdamW's moments m and v, each shaped like its parameter
    LOW_PRECISION = (torch.float16, torch.bfloat16)  # stepped in float32 (module docstring)

    @classmethod
    def needs(cls, hp):
        return frozenset({"diag"}) if hp["source"] == "fisher" else frozenset()

    @classmethod
    def cost_parts(cls, g, hp, at) -> cost.Parts:
        """AdamW's two moments, each like the parameter (in float32 for a low-precision one): 2n entries,
        10n FLOPs per step."""
        n = g.numel
        return cost.Parts({k: (n, cost.FACTOR) for k in cls.STATE}, update=cost.ADAMW * n)

    @classmethod
    def auto_candidates(cls, hp, g):
        """The least faithful and cheapest: "auto"'s last resort."""
        return [Candidate(4, hp)]

    def expected_state(self):
        """AdamW's state per parameter: the step count and the two moments (under FSDP2 shaped like
        the rank's shard)."""
        param = self.parameters.param
        return {n: {"step": None, **{k: (param(n).shape, self.moment_dtype(param(n))) for k in self.STATE}}
                for n in self._names}

    @classmethod
    def moment_dtype(cls, param: torch.Tensor) -> torch.dtype:
        """The dtype of m and v, and of the step's arithmetic: float32 for a low-precision parameter,
        else the parameter's own (module docstring)."""
        return torch.float32 if param.dtype in cls.LOW_PRECISION else param.dtype

    def __init__(self, hp, blocks, params, parameters):
        super().__init__(hp, blocks, params, parameters)
        # parameter name -> (block name, its columns of the [W b] diagonal, the layout's view of W and
        # the row groups it may read)
        self._fisher_of = {}
        if hp["source"] == "fisher":
            for b in blocks:
                layout = layout_of(b)
                self._fisher_of[b.weight] = (b.name, slice(0, b.d_in), layout.view, layout.groups)
                if b.bias is not None:
                    self._fisher_of[b.bias] = (b.name, b.d_in, "", 1)
        self._names = [n for b in blocks for n in b.params] + list(params)
        self._partition = (None, [])  # (groups version, [(param group, its parameter names)])

    def _second_moment_term(self, name, grad, statistics):
        source = self._fisher_of.get(name)
        if source is None:
            return grad * grad
        block, columns, view, groups = source
        stats = statistics.blocks[block].values.get("diag")
        if stats is None:
            return grad * grad
        # in the layout of the matrix W of z = W a (gnfx.layouts), the full parameter's shape
        term = from_matrix(stats[:, columns], view, self.parameters.named[name].shape, groups)
        # under FSDP2 (gnfx.fsdp) the rows of this rank's shard
        sharded = self.parameters.sharded
        return term[sharded.local_rows(name) if sharded else slice(None)].to(grad.dtype)

    def second_moment(self, name: str) -> torch.Tensor:
        """v̂ = v / (1 - β₂ᵗ), the bias-corrected second moment of parameter `name`: the curvature
        diag(v̂) this preconditioner models (read by gnfx.diagnose)."""
        state = self.parameters.state_of(name)
        if "exp_avg_sq" not in state:
            raise GnfxError(f"parameter {name!r} has no second moment yet (it never had a gradient at a step)")
        return state["exp_avg_sq"] / (1 - self.parameters.group_of(name)["betas"][1] ** state["step"])

    def parameter_direction(self, name, grad):
        """g / (√v̂ + ε): Adam's step without its first moment."""
        return grad / (self.second_moment(name).sqrt() + self.parameters.group_of(name)["eps"])

    def parameter_curvature(self, name, V):
        """diag(v̂) V."""
        return self.second_moment(name) * V

    def _groups(self):
        """This preconditioner's parameter names by param group, recomputed when the groups change."""
        version = self.parameters.sync_groups()
        if self._partition[0] != version:
            group_of = self.parameters.group_of
            by_group = [(g, [n for n in self._names if group_of(n) is g]) for g in self.parameters.param_groups]
            self._partition = (version, [(g, names) for g, names in by_group if names])
        return self._partition[1]

    @torch.no_grad()
    def update(self, statistics):
        """One AdamW step of every parameter with a gradient (module docstring); `statistics` (a
        gnfx.statistics.StatisticsStore) holds the Fisher diagonals of source="fisher"."""
        for group, names in self._groups():
            names = [n for n in names if self.parameters.param(n).grad is not None]
            params = [self.parameters.param(n) for n in names]
            if not params:
                continue
            # float32 copies of low-precision parameters and their gradients (module docstring)
            low = [p.dtype in self.LOW_PRECISION for p in params]  # no conversion call for the others
            work = [p.float() if half else p for p, half in zip(params, low)]
            grads = [p.grad.float() if half else p.grad for p, half in zip(params, low)]
            states = [self.parameters.state_of(n) for n in names]
            for w, s in zip(work, states):
                if not s:
                    s["step"] = 0
                    s.update({k: torch.zeros_like(w, memory_format=torch.preserve_format) for k in self.STATE})
                s["step"] += 1
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            if wd != 0:
                torch._foreach_mul_(work, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            if self._fisher_of:
                terms = [self._second_moment_term(n, g, statistics) for n, g in zip(names, grads)]
                torch._foreach_add_(exp_avg_sqs, terms, alpha=1 - beta2)
            else:
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            step_sizes = [-lr / (1 - beta1 ** s["step"]) for s in states]
            bias2_sqrt = [(1 - beta2 ** s["step"]) ** 0.5 for s in states]
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, bias2_sqrt)
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(work, exp_avgs, denoms, step_sizes)
            for p, w, half in zip(params, work, low):
                if half:
                    p.copy_(w)  # θ rounded to its dtype once
