"""Jacobian-vector products J v by one-sided finite differences: the quadratic step's
`quadratic_products="difference"`.

For the outputs z = f(θ) of the model on the step's batch and a tangent v,

    J v ≈ (f(θ + h v) − f(θ)) / h,        h = √ε (1 + ‖θ‖) / ‖v‖,

ε the machine epsilon of z's dtype (the step h·v has norm √ε (1 + ‖θ‖), the usual choice for a
difference quotient, Nocedal & Wright §8.1). The error of each entry is the curvature term
½ h vᵀ∇²z v plus the rounding of the difference, ~ε|z| / h: a relative error of about √ε where z is
smooth in θ (~3e-4 in float32, 1.5e-8 in float64; measured ~2e-3 on the deep autoencoder of
benchmarks/ in float32, benchmarks/results/quadratic_step.md). Each tangent costs one plain forward
without gradient, z one more, where forward mode pays for each tangent the layers' product and two
more (about 2.5 forwards, gnfx.forward_mode): on a model whose forward is compute-bound (the char GPT
of benchmarks/) the products take half the time, and an operation without a forward-mode formula (a
torch.autograd.Function without jvp, a library's fused kernel) runs as it is. What it cannot do: a
forward that is not smooth in θ at the scale of h (a top-k router whose choice flips, rounding, an
iterative solver stopped at a tolerance) gives a difference that is no derivative, and a dtype of few
bits (float16, bfloat16: √ε ~ 0.03-0.06) no precision: `difference_rows` refuses such outputs. The
default, quadratic_products="auto", takes these products only where passes/discontinuities.py finds the
captured forward smooth in θ.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from gnfx.errors import GnfxError


def difference_rows(f: Callable[[list], torch.Tensor], primals: Sequence[torch.Tensor],
                    tangent_rows: Sequence[Sequence[torch.Tensor]],
                    z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, [J v_k]_k stacked on a leading axis) as gnfx.forward_mode.jvp_rows returns them, z = f(primals),
    each J v_k the one-sided difference quotient of the module docstring (zero for v_k = 0), each tangent in its
    primal's dtype (gnfx.flat_layout.FlatLayout.tangents); f runs without gradient, 1 + len(tangent_rows) times,
    or len(tangent_rows) times where `z` is given: f(primals) as f computes it, bit for bit (the training
    forward's outputs, which gnfx.quadratic_step checks), else the quotients are off by its difference / h."""
    with torch.no_grad():
        z = f(list(primals)) if z is None else z
        if z.dtype.itemsize < 4 and z.dtype.is_floating_point:
            raise GnfxError(f"quadratic_products='difference' takes finite differences of the model's outputs, which "
                            f"are {z.dtype} here: a difference quotient keeps about half of a dtype's digits, none "
                            f"worth having of a 16-bit one. Fix: quadratic_products='forward' (forward-mode "
                            f"derivatives, exact), or outputs in float32")
        theta, *lengths = _norms([primals, *tangent_rows])
        scale = math.sqrt(torch.finfo(z.dtype).eps) * (1 + theta)
        products = []
        for tangents, length in zip(tangent_rows, lengths):
            if length == 0:
                products.append(torch.zeros_like(z))
                continue
            h = scale / length
            # θ + (h v), the product rounded before the sum (as p + h * t), for every tensor in two operations
            products.append((f(torch._foreach_add(list(primals), torch._foreach_mul(list(tangents), h))) - z) / h)
    return z, torch.stack(products)


def _norms(rows: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """‖(t_1, ..., t_n)‖ of each row of tensors, the Euclidean norm of the row as one vector, in float64: every
    tensor's norm in one foreach operation (accumulated in float64, without a float64 copy of the tensor), then
    the rows', read in one transfer."""
    norms = torch.stack(torch._foreach_norm([t for row in rows for t in row], 2, dtype=torch.float64))
    return [float(n) for n in torch.stack([part.norm() for part in norms.split([len(row) for row in rows])]).tolist()]
