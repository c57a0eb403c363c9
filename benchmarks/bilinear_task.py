"""A synthetic bilinear task: K-FAC with nn.Bilinear as a curvature block against AdamW, steps to a loss target.

Task: x1 (16), x2 (16) standard normal; the class (4) is the argmax of four fixed bilinear forms
x1ᵀ T_c x2. Model: nn.Bilinear(16, 16, 32) -> ReLU -> nn.Linear(32, 4). 2048 training pairs in batches
of 128 (a fixed order per seed); after each step the loss on the whole training set is measured, and a
run's figure is the first step at which it is at most the target. kfac runs at its defaults
(`loss="cross_entropy"`, the quadratic-model step, no lr); AdamW (torch.optim.AdamW) at each lr of
`ADAMW_LRS`, the best one reported. Everything in one process, float32, CPU.

    PYTHONPATH=. python -m benchmarks.bilinear_task [--steps 400] [--target 0.2] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import gnfx

D1 = D2 = 16
HIDDEN, CLASSES, N, BATCH = 32, 4, 2048, 128
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(D1, D2, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x1, x2):
        return self.head(torch.relu(self.bil(x1, x2)))


def data(seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    x1, x2 = torch.randn(N, D1, generator=g), torch.randn(N, D2, generator=g)
    forms = torch.randn(CLASSES, D1, D2, generator=g)
    y = torch.einsum("ni,cij,nj->nc", x1, forms, x2).argmax(1)
    return x1, x2, y, torch.randperm(N, generator=g)


def run(seed: int, optimizer: str, lr: float | None, steps: int, target: float) -> tuple[int | None, float, float]:
    """(first step whose training-set loss is <= target or None, final loss, seconds)."""
    x1, x2, y, order = data(seed)
    torch.manual_seed(seed)
    model = BilinearNet()
    if optimizer == "adamw":
        model_call, opt = model, torch.optim.AdamW(model.parameters(), lr=lr)
        step, zero = opt.step, opt.zero_grad
    else:
        c = gnfx.compile(model, optimizer, loss="cross_entropy", example_inputs=(x1[:BATCH], x2[:BATCH]))
        assert c.layers["bil"].kind == "bilinear", c.layers
        model_call, step, zero = c, c.step, c.zero_grad
    reached, start = None, time.perf_counter()
    for t in range(1, steps + 1):
        i = order[((t - 1) * BATCH) % N:][:BATCH]
        F.cross_entropy(model_call(x1[i], x2[i]), y[i]).backward()
        step()
        zero()
        with torch.no_grad():
            loss = F.cross_entropy(model(x1, x2), y).item()
        if reached is None and loss <= target:
            reached = t
            break
    return reached, loss, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--target", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| seed | kfac (defaults) steps | AdamW steps per lr {ADAMW_LRS} | best AdamW | kfac s | AdamW (best) s |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        k_steps, k_loss, k_time = run(seed, "kfac", None, args.steps, args.target)
        adam = {lr: run(seed, "adamw", lr, args.steps, args.target) for lr in ADAMW_LRS}
        best = min(adam, key=lambda lr: (adam[lr][0] is None, adam[lr][0] or 0, adam[lr][1]))
        show = lambda r: str(r[0]) if r[0] is not None else f"> {args.steps} (loss {r[1]:.3f})"  # noqa: E731
        print(f"| {seed} | {show((k_steps, k_loss))} | {' / '.join(show(adam[lr]) for lr in ADAMW_LRS)} | "
              f"{show(adam[best])} (lr {best:g}) | {k_time:.1f} | {adam[best][2]:.1f} |")


if __name__ == "__main__":
    main()
