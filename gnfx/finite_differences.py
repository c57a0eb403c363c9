"""Jacobian-vector products J v by one-sided finite differences: the quadratic step's
`quadratic_products="difference"`.

For the outputs z = f(θ) of the model on the step's batch and a tangent v,

    J v ≈ (f(θ + h v) − f(θ)) / h.

The error of the quotient is the curvature term ½ h vᵀ∇²z v plus the rounding of the difference,
~ε‖z‖ / h (ε the machine epsilon of z's dtype). Both are measured in the ratio

    r = h ‖J v‖ / (√ε ‖z‖),

how far the step moves z, in units of √ε of its size: the rounding is about √ε / r of J v, the curvature
term grows with r. h is chosen for r = 1, the balance of the two: on the char GPT of benchmarks/ in
float32 (kfac at defaults, 300 steps) the quotients were 1e-3 off J v (median; largest 4e-3), where the
default step below, at r up to 80 on the first steps (small logits), was 8e-3 off (largest 0.17)
(benchmarks/results/quadratic_step.md, "The step of a difference"). ‖J v‖ is not known before the quotient,
so h comes from the gain γ = ‖J v‖ / ‖v‖ the caller's tangent had at an earlier call,

    h = min(√ε ‖z‖ / (γ ‖v‖),  √ε (1 + ‖θ‖) / ‖v‖),

the second the step for a tangent of unknown gain (the step h·v of norm √ε (1 + ‖θ‖), the usual choice for
a difference quotient, Nocedal & Wright §8.1), which also caps the first: h never grows beyond it when
the gain falls. A tangent so small that this h exceeds the largest number of its dtype (float32: ‖v‖ below
~1e-42 (1 + ‖θ‖), subnormal; the quadratic step's previous update after a step of α ~ 1e-40) has no step in
that dtype (h·v was inf·v, NaN where v is 0): its product is taken as 0, as the zero tangent's, below
anything the dtype resolves (diag:quadratic's parameters went NaN on a batch fitted almost to rounding,
benchmarks/results/first_contact_20_fuzzwide.md). A quotient whose measured r exceeds RETAKE (its tangent's
first call, or a gain that rose since) is taken again at h / r, one more forward.

Each tangent costs one plain forward without gradient, z one more, where forward mode pays for each tangent
the layers' product and two more (about 2.5 forwards, gnfx.forward_mode): on a model whose forward is
compute-bound (the char GPT of benchmarks/) the products take half the time, and an operation without a
forward-mode formula (a torch.autograd.Function without jvp, a library's fused kernel) runs as it is. What it
cannot do: a forward that is not smooth in θ at the scale of h (a top-k router whose choice flips, rounding,
an iterative solver stopped at a tolerance) gives a difference that is no derivative, and a dtype of few
bits (float16, bfloat16: √ε ~ 0.03-0.06) no precision: `difference_rows` refuses such outputs. The
default, quadratic_products="auto", takes these products only where passes/discontinuities.py finds the
captured forward smooth in θ.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from gnfx.errors import GnfxError

# a quotient whose step moved z by more than RETAKE·√ε of itself is taken again at r = 1
RETAKE = 4.0


def difference_rows(f: Callable[[list], torch.Tensor], primals: Sequence[torch.Tensor],
                    tangent_rows: Sequence[Sequence[torch.Tensor]], z: torch.Tensor | None = None,
                    gains: Sequence[float | None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(z, [J v_k]_k stacked on a leading axis, [γ_k]_k): z = f(primals), each J v_k the one-sided difference
    quotient of the module docstring (zero for v_k = 0 and for a v_k too small for a step in its dtype),
    γ_k = ‖J v_k‖ / ‖v_k‖ its measured gain (None for those), to pass as `gains` at the next call for the same
    tangent; `gains`: each tangent's γ from an earlier call, None where unknown. Each tangent in its primal's
    dtype (gnfx.flat_layout.FlatLayout.tangents); f runs without gradient, 1 + len(tangent_rows) times (once
    more for each retaken quotient), or len(tangent_rows) times where `z` is given: f(primals) as f computes
    it, bit for bit (the training forward's outputs, which gnfx.quadratic_step checks), else the quotients are
    off by its difference / h."""
    with torch.no_grad():
        z = f(list(primals)) if z is None else z
        if z.dtype.itemsize < 4 and z.dtype.is_floating_point:
            raise GnfxError(f"quadratic_products='difference' takes finite differences of the model's outputs, which "
                            f"are {z.dtype} here: a difference quotient keeps about half of a dtype's digits, none "
                            f"worth having of a 16-bit one. Fix: quadratic_products='forward' (forward-mode "
                            f"derivatives, exact), or outputs in float32")
        theta, size, *lengths = _norms([primals, [z], *tangent_rows])
        root_eps = math.sqrt(torch.finfo(z.dtype).eps)
        gains = [None] * len(tangent_rows) if gains is None else gains
        steps = [None if length == 0 else
                 min(root_eps * (1 + theta) / length, root_eps * size / (gain * length) if gain else math.inf)
                 for length, gain in zip(lengths, gains)]
        steps = [None if h is None or h > min(torch.finfo(t.dtype).max for t in tangents) else h
                 for tangents, h in zip(tangent_rows, steps)]
        products = [torch.zeros_like(z) if h is None else _quotient(f, primals, tangents, z, h)
                    for tangents, h in zip(tangent_rows, steps)]
        norms = _product_norms(products)
        for k, (tangents, h) in enumerate(zip(tangent_rows, steps)):
            r = 0.0 if h is None or not size else h * norms[k] / (root_eps * size)
            if r > RETAKE:  # at r = 1
                products[k] = _quotient(f, primals, tangents, z, h / r)
                norms[k] = _product_norms(products[k:k + 1])[0]
        measured = [None if h is None else norm / length for norm, length, h in zip(norms, lengths, steps)]
    return z, torch.stack(products), measured


def _quotient(f, primals, tangents, z: torch.Tensor, h: float) -> torch.Tensor:
    """(f(θ + h v) − z) / h, θ + (h v) the product rounded before the sum (as p + h * t), for every tensor in two
    operations."""
    return (f(torch._foreach_add(list(primals), torch._foreach_mul(list(tangents), h))) - z) / h


def _product_norms(products: list[torch.Tensor]) -> list[float]:
    """‖J v_k‖ of each quotient, in float64, read in one transfer."""
    return torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) for p in products]).tolist()


def _norms(rows: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """‖(t_1, ..., t_n)‖ of each row of tensors, the Euclidean norm of the row as one vector, in float64: every
    tensor's norm in one foreach operation (accumulated in float64, without a float64 copy of the tensor), then
    the rows', read in one transfer."""
    norms = torch.stack(torch._foreach_norm([t for row in rows for t in row], 2, dtype=torch.float64))
    return [float(n) for n in torch.stack([part.norm() for part in norms.split([len(row) for row in rows])]).tolist()]
