"""Tensor operations per plain `model.step()`: `python -m benchmarks.op_count [--optimizers ...]`.

On the digits MLP (64-128-128-10, batch 128, benchmarks/tasks.py), each preconditioner at its
defaults with lr 1e-3 takes 12 steps, then the 13th step's `model.step()` (no statistics, no
refresh for any built-in preconditioner's defaults) runs under a TorchDispatchMode that counts
every operator dispatched: the fixed per-step cost of the generated update on a small model,
where dispatch and not arithmetic dominates. AdamW (torch.optim, foreach) is counted alike.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gnfx
from benchmarks.models import mlp

WARMUP = 12  # steps before the counted one: 12 is neither a statistic nor a refresh step
DEFAULT = ("kfac", "shampoo", "rank1", "soap", "ekfac", "muon")


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count(optimizer: str, compile_model=gnfx.compile) -> int:
    """Operators of one plain step of `optimizer` ("adamw": torch.optim.AdamW) on the digits MLP, the
    model compiled by `compile_model` (gnfx.compile, or another tree's: benchmarks/ab.py)."""
    torch.manual_seed(0)
    module = mlp([64, 128, 128, 10])
    x, y = torch.randn(128, 64), torch.randint(10, (128,))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=True)
        model, step, zero = module, opt.step, opt.zero_grad
    else:
        model = compile_model(module, optimizer=optimizer, lr=1e-3, step="lr", compile=False)
        step, zero = model.step, model.zero_grad
    for _ in range(WARMUP):
        F.cross_entropy(model(x), y).backward()
        step()
        zero()
    F.cross_entropy(model(x), y).backward()
    with OpCounter() as counter:
        step()
    return counter.count


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=[*DEFAULT, "adamw"])
    args = parser.parse_args(argv)
    counts = {name: count(name) for name in args.optimizers}
    for name, n in counts.items():
        print(f"{name:8s} {n}")
    return counts


if __name__ == "__main__":
    main()
