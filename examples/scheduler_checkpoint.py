"""An LR scheduler and a checkpoint: gnfx's optimizer is a real torch.optim.Optimizer, and a run
resumed from a checkpoint continues bit for bit like the uninterrupted one (on the CPU).

    python examples/scheduler_checkpoint.py [--optimizer kfac] [--steps 40]
"""
import argparse
import io
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gnfx  # noqa: E402
from benchmarks.tasks import digits_mlp  # noqa: E402


def make(task, optimizer):
    model = gnfx.compile(task.make_model(seed=0), optimizer=optimizer, lr=1e-3, stat_every=3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(model.optimizer, T_max=100)
    return model, scheduler


def train(model, scheduler, batches, steps, desc):
    for _ in tqdm(range(steps), desc=desc):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        model.step()
        model.zero_grad()
        scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="kfac", choices=sorted(gnfx.REGISTRY))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    task, half = digits_mlp(), args.steps // 2

    model, scheduler = make(task, args.optimizer)
    batches = task.batches(seed=0)
    train(model, scheduler, batches, half, "first half")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": model.optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    train(model, scheduler, batches, args.steps - half, "uninterrupted")

    resumed, resumed_scheduler = make(task, args.optimizer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain tensors and numbers: no pickled code
    resumed.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    batches = task.batches(seed=0)
    for _ in range(half):
        next(batches)
    train(resumed, resumed_scheduler, batches, args.steps - half, "resumed")
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    print(f"lr now {scheduler.get_last_lr()[0]:.2e}; resumed run identical to the uninterrupted one: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
