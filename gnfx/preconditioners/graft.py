"""Grafting: take a direction from one method and the step size (per piece) from another.

`graft_direction` returns the grafted method's direction D for a stacked gradient G:
  "adam":    v ← β₂ v + (1-β₂) G²,  D = G / (sqrt(v / (1-β₂ᵗ)) + ε)
  "adagrad": v ← v + G²,            D = G / (sqrt(v) + ε)
  "none":    D = G
and `graft` rescales the preconditioned direction P of each piece to D's norm: P ‖D‖ / ‖P‖.
"""
from __future__ import annotations

import torch

GRAFTS = ("adam", "adagrad", "none")


def graft_state(group_zeros, shape) -> dict:
    return {"graft_v": group_zeros(*shape), "graft_t": group_zeros()}


def graft_direction(kind: str, G: torch.Tensor, state: dict, beta2: float, eps: float) -> torch.Tensor:
    if kind == "none":
        return G
    v = state["graft_v"]
    if kind == "adagrad":
        v.addcmul_(G, G)
        return G / (v.sqrt() + eps)
    t = state["graft_t"]
    t.add_(1)
    v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    correction = (1 - beta2 ** t).view((-1,) + (1,) * (G.dim() - 1))
    return G / (v / correction).sqrt_().add_(eps)


def graft(P: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """P scaled per piece (leading dimension) to the norm of D."""
    dims = tuple(range(1, P.dim()))
    p_norm = torch.linalg.vector_norm(P, dim=dims, keepdim=True)
    d_norm = torch.linalg.vector_norm(D, dim=dims, keepdim=True)
    return P * (d_norm / p_norm.clamp(min=torch.finfo(P.dtype).tiny))
