"""Does any optimizer diverge at its defaults on the examples' models? A short run of each.

    python -m benchmarks.example_models kfac ekfac rank1 [--steps 100]

Each optimizer is `gnfx.compile(model, optimizer=NAME, loss="cross_entropy")` with nothing else
(no lr: the quadratic step where it is the optimizer's default, its fixed default lr otherwise) on
the models of examples/ that are not benchmark tasks (the tasks' models, which quickstart.py,
cnn.py, demo.py and scheduler_checkpoint.py train, are `python -m benchmarks.defaults NAME
--max-steps N`): the tanh MLP of distributed.py and fsdp.py on their synthetic 5-class problem
(full batch), diagnose.py's MLP on digits (batches of 128), custom_preconditioner.py's MLP on its
teacher's labels, and policies.py's GPT on random tokens (whose loss cannot fall below log 65).
Prints the loss on a fixed batch before and after, its largest value along the way, and whether
the run diverged: a non-finite loss, or the fixed batch's loss above DIVERGENCE_FACTOR times its
initial value (benchmarks.train's rule for the validation loss).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import gnfx

from benchmarks.models import GPT
from benchmarks.tasks import _digits
from benchmarks.train import DIVERGENCE_FACTOR

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from policies import CONFIG  # noqa: E402  (the GPT of examples/policies.py)

Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _synthetic() -> tuple[nn.Module, Batches]:
    """examples/distributed.py's model and data (one rank: the whole 512 examples every step)."""
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :5] * torch.arange(1, 6)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    return model, lambda: iter(lambda: (x, y), None)


def _diagnose() -> tuple[nn.Module, Batches]:
    """examples/diagnose.py's MLP 64-32-10 on the digits, random batches of 128."""
    x, y = _digits()
    x = x / 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randint(0, len(x), (128,), generator=g)
            yield x[idx], y[idx]
    return model, batches


def _teacher() -> tuple[nn.Module, Batches]:
    """examples/custom_preconditioner.py's MLP 10-16-4 on a linear teacher's labels, batches of 64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(10, 4, generator=g)

    def batches():
        while True:
            x = torch.randn(64, 10, generator=g)
            yield x, (x @ teacher).argmax(1)
    return model, batches


def _gpt() -> tuple[nn.Module, Batches]:
    """examples/policies.py's GPT on random tokens (8 windows of 32)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            tokens = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.context + 1), generator=g)
            yield tokens[:, :-1], tokens[:, 1:]
    return model, batches


MODELS = {"distributed_mlp": _synthetic, "diagnose_mlp": _diagnose, "custom_mlp": _teacher, "policies_gpt": _gpt}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def run(name: str, optimizer: str, steps: int) -> str:
    """One short run: a line with the fixed batch's loss before, after and at most, and the verdict."""
    model, batches = MODELS[name]()
    stream = batches()
    fixed = next(batches())
    compiled = gnfx.compile(model, optimizer=optimizer, loss="cross_entropy")
    with torch.no_grad():
        first = worst = float(_loss(model, *fixed))
    last = first
    for step in range(1, steps + 1):
        _loss(compiled, *next(stream)).backward()
        compiled.step()
        compiled.zero_grad()
        with torch.no_grad():
            last = float(_loss(model, *fixed))
        worst = max(worst, last) if math.isfinite(last) else math.inf
        if not math.isfinite(last) or last > DIVERGENCE_FACTOR * first:
            return f"{name:<16} {optimizer:<6} diverged at step {step}: loss {first:.4f} -> {last:.4g}"
    step_kind = "quadratic" if compiled.optimizer.quadratic is not None else "fixed lr"
    return f"{name:<16} {optimizer:<6} ({step_kind}) ok: loss {first:.4f} -> {last:.4f} (at most {worst:.4f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("optimizers", nargs="+")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.models:
        for optimizer in args.optimizers:
            print(run(name, optimizer, args.steps), flush=True)


if __name__ == "__main__":
    main()
